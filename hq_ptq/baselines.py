"""Baselines from other libraries, measured on hq_ptq's models for the Pareto benchmark.

torchao's weight-only integer quantization (``IntxWeightOnlyConfig`` through
``torchao.quantization.quantize_``) is the off-the-shelf reference: symmetric per-output-channel int8 or int4
weights, no calibration data, no fine-tuning. torchao 0.18 takes 2-d (Linear) and 4-d (Conv2d) weights and
refuses the 3-d weights of Conv1d. The token projections that make up most of a spiking transformer's blocks
are pointwise Conv1d (kernel 1), which are Linear layers over the channel dimension: each is offered to
torchao as the equivalent ``nn.Linear`` (:class:`PointwiseConv1dAsLinear`), so the baseline quantizes the
same layers hq_ptq does instead of leaving them float32. Other Conv1d stay float32, with torchao's reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from hq_ptq.swap import find_layers, split_matching_attention

__all__ = ["TORCHAO_BITS", "PointwiseConv1dAsLinear", "TorchaoResult", "torchao_weight_only"]

log = logging.getLogger(__name__)

TORCHAO_BITS = (8, 4)
FP_BITS = 32


@dataclass(frozen=True)
class TorchaoResult:
    """What torchao did to a model.

    Attributes:
        bits: layer name → weight bits for every layer torchao quantized.
        refused: layer name → torchao's reason, for every layer it would not take (left float32).
        sizes: layer name → weight parameters, over all the layers offered.
        seconds: wall time of the ``quantize_`` calls.
        modules: layer name → the module torchao quantized (``name.linear`` for a reshaped pointwise
            Conv1d, else the name itself), e.g. to find the layer's activity in the quantized model.
    """

    bits: dict[str, int]
    refused: dict[str, str]
    sizes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    modules: dict[str, str] = field(default_factory=dict)

    @property
    def avg_bits(self) -> float:
        """Parameter-weighted average weight bits over the offered layers; refused layers count 32."""
        total = sum(self.sizes.values())
        return sum(n * self.bits.get(name, FP_BITS) for name, n in self.sizes.items()) / total


class PointwiseConv1dAsLinear(nn.Module):
    """A kernel-1 ``Conv1d`` on ``[N, C, L]`` computed by the equivalent ``nn.Linear`` on ``[N, L, C]``."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        self.linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None,
                                device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight[:, :, 0])
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.transpose(-1, -2)).transpose(-1, -2)


def _is_pointwise_conv1d(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv1d) and m.kernel_size == (1,) and m.stride == (1,)
            and m.padding in ((0,), "valid") and m.dilation == (1,) and m.groups == 1
            and m.padding_mode == "zeros")


def torchao_weight_only(
    model: nn.Module,
    bits: int,
    *,
    fixed: Mapping[str, int] | None = None,
    include: str | Iterable[str] = ("*",),
    exclude: str | Iterable[str] = (),
) -> TorchaoResult:
    """Quantize ``model``'s weights in place with torchao ``IntxWeightOnlyConfig`` (per-channel, symmetric).

    Each Conv/Linear matching the globs is offered to torchao on its own, so one layer it refuses does not
    stop the rest; the refusals are returned with torchao's message. Pointwise Conv1d layers are first
    replaced in place by the equivalent :class:`PointwiseConv1dAsLinear` (same outputs, same parameter
    count), which torchao takes; results are keyed by the original layer names.

    Args:
        model: a float model (not hq_ptq-quantized).
        bits: 8 or 4.
        fixed: layer name → bits overriding ``bits`` (e.g. first/last layer kept at 8).
        include: globs of layers to offer, as for :func:`hq_ptq.swap.find_layers`.
        exclude: globs of layers not to offer.

    Raises:
        ValueError: bits other than 8 or 4.
    """
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    dtypes = {8: torch.int8, 4: torch.int4}
    fixed = dict(fixed or {})
    for b in (bits, *fixed.values()):
        if b not in dtypes:
            raise ValueError(f"torchao weight-only bits must be 8 or 4, got {b}")
    split_matching_attention(model, include, exclude)  # the same layers as hq_ptq's plans
    names = find_layers(model, include, exclude)
    sizes = {n: model.get_submodule(n).weight.numel() for n in names}
    targets = {}  # layer name -> the name torchao sees (the Linear inside a reshaped pointwise Conv1d)
    for name in names:
        module = model.get_submodule(name)
        targets[name] = name
        if _is_pointwise_conv1d(module):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, PointwiseConv1dAsLinear(module))
            targets[name] = f"{name}.linear"
    done: dict[str, int] = {}
    refused: dict[str, str] = {}
    start = time.perf_counter()
    for name in names:
        b = fixed.get(name, bits)
        if isinstance(model.get_submodule(targets[name]), nn.modules.conv._ConvTransposeNd):
            # torchao takes it, quantizes along PerAxis(0) (the input channels here) and then cannot run it
            refused[name] = "torchao weight-only has no transposed convolution"
            continue
        config = IntxWeightOnlyConfig(weight_dtype=dtypes[b], granularity=PerAxis(0))
        try:
            quantize_(model, config, filter_fn=lambda _m, fqn, target=targets[name]: fqn == target)
        except (ValueError, NotImplementedError, RuntimeError, AssertionError) as err:
            refused[name] = (str(err).splitlines() or [type(err).__name__])[0]
            continue
        done[name] = b
    seconds = time.perf_counter() - start
    log.info("torchao int%d: quantized %d layers, refused %d", bits, len(done), len(refused))
    return TorchaoResult(bits=done, refused=refused, sizes=sizes, seconds=seconds, modules=targets)
