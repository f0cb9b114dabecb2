"""Where a run computes: resolving a device setting and moving batches to the model's device.

The one rule: the model decides. :func:`hq_ptq.quantize` moves the model to ``QuantConfig.device`` (``"auto"``
keeps it where it is), and every batch it, :func:`hq_ptq.recalibrate_bn`, QAT and evaluation use is moved
to the device of the model at the point of use, inputs and targets alike (any nesting of tuples, lists and
dicts, :mod:`hq_ptq.model_io`). Data that cannot be moved there (a ``meta`` tensor holds no values) is one
ValueError line naming both devices.

What a run computes in (``QuantConfig.precision``) is the other half of where: :func:`autocast_context` is the
one place QAT turns on ``torch.autocast`` to bfloat16, and :func:`analysis_autocast` the one place the
sensitivity analysis decides to stay in float32 (it does for every metric, and says why at INFO).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from hq_ptq.config import check_device, check_precision
from hq_ptq.errors import first_line
from hq_ptq.model_io import map_tensors, tensors

__all__ = [
    "BF16_METRICS",
    "analysis_autocast",
    "autocast_context",
    "batch_to",
    "model_device",
    "resolve_device",
    "tensor_devices",
]

log = logging.getLogger(__name__)


def _cuda_device(index: int | None, what: str) -> torch.device:
    if not torch.cuda.is_available():
        raise ValueError(
            f"{what} asks for CUDA but torch {torch.__version__} sees no CUDA device; use 'cpu' or 'auto'"
        )
    count = torch.cuda.device_count()
    if index is None:
        index = torch.cuda.current_device()  # under torchrun: the device of this rank's LOCAL_RANK
    if not 0 <= index < count:
        raise ValueError(f"{what} asks for cuda:{index} but there are {count} CUDA device(s) (cuda:0..)")
    return torch.device("cuda", index)


def resolve_device(
    device: str | torch.device = "auto", model: nn.Module | None = None, *, what: str = "quant.device"
) -> torch.device:
    """The ``torch.device`` a setting names, always with its index for CUDA (``cuda:0``, not ``cuda``).

    ``"auto"`` is the device of ``model`` when one is given (:func:`model_device`), else ``cuda`` when
    CUDA is available, else ``cpu``. ``"cuda"`` is the current CUDA device.

    Raises:
        ValueError: a setting other than "auto", "cpu", "cuda", "cuda:N" (or a cpu/cuda ``torch.device``),
            CUDA asked for where there is none, or a GPU index past the last device; one line naming
            ``what``.
    """
    if isinstance(device, torch.device):
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{what} must be a cpu or cuda device, got {device}")
        return _cuda_device(device.index, what) if device.type == "cuda" else torch.device("cpu")
    name = check_device(device, what)
    if name == "auto":
        if model is not None:
            return model_device(model)
        return _cuda_device(None, what) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    _, _, index = name.partition(":")
    return _cuda_device(int(index) if index else None, what)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (else its first buffer); ``cpu`` for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def tensor_devices(value: Any) -> list[torch.device]:
    """The distinct devices of the tensors inside ``value``, in order of appearance."""
    return list(dict.fromkeys(t.device for t in tensors(value)))


def _names(devices: list[torch.device]) -> str:
    return " and ".join(str(d) for d in devices)


def batch_to(value: Any, device: torch.device, *, what: str = "inputs") -> Any:
    """``value`` (a tensor, or tensors nested in tuples, lists and dicts) with every tensor on ``device``;
    tensors already there are kept as they are, and everything that is not a tensor too.

    Raises:
        ValueError: a tensor cannot be moved to ``device`` (e.g. a ``meta`` tensor, which holds no
            values): one line naming both devices and ``what`` (e.g. "calibration inputs").
    """
    try:
        return map_tensors(value, lambda t: t if t.device == device else t.to(device))
    except (RuntimeError, NotImplementedError) as err:
        others = [d for d in tensor_devices(value) if d != device]
        where = "" if device.type == "cpu" else f" or on {device}"
        raise ValueError(
            f"the model is on {device} but the {what} are on {_names(others)} and cannot be moved there "
            f"({first_line(err)}); give tensors that hold values (on the CPU{where})"
        ) from None


# ------------------------------------------------------------------------------------------------
# precision


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def autocast_context(
    precision: str, device: torch.device | str, *, what: str = "quant.precision"
) -> contextlib.AbstractContextManager[Any]:
    """The block a forward (and its loss) of ``precision`` runs in on ``device``.

    ``"bf16"``: ``torch.autocast(device.type, dtype=torch.bfloat16)``. Autocast runs the matmul-like ops
    (Linear, Conv, matmul) in bfloat16 and keeps softmax, the losses and every reduction in float32. It
    casts copies, never a parameter or buffer, so weights, their gradients, the optimizer state and what is
    saved stay float32; call ``backward`` after the block (its ops follow the forward's dtypes). Brevitas'
    weight quantizers need nothing kept in float32 by hand: the scale, the rounding and the clamp are
    elementwise ops and reductions, which autocast leaves in float32 (their output is a float32 quantized
    weight, checked); only that weight is rounded to bfloat16 where the Conv/Linear consumes it, by at most
    2^-8 of its value (up to half a step of an 8-bit code, 1/37 of a step of a 4-bit one): forward noise of
    QAT only, since the weights that are trained, saved and exported stay float32. The fused LIF keeps its
    membrane in float32 too (its float32 reset promotes the bfloat16 input currents).
    ``"fp32"``: nothing, so an autocast the caller opened stays in force.

    Raises:
        ValueError: a precision other than "fp32"/"bf16", bfloat16 on a CUDA device without it, or a
            device other than cpu/cuda; one line naming ``what``.
    """
    precision = check_precision(precision, what)
    if precision == "fp32":
        return contextlib.nullcontext()
    kind = _device_type(device)
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"{what} 'bf16' runs on cpu or cuda, not on {device}")
    if kind == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(torch.device(device))
        raise ValueError(f"{what} 'bf16' needs a GPU with bfloat16 support, {name} has none; use 'fp32'")
    return torch.autocast(kind, dtype=torch.bfloat16)


# the sensitivity metrics that may run under bfloat16 autocast when precision is "bf16": none. Measured on the
# digits recipe's float model and calibration batches, bfloat16 against float32 (benchmarks/bf16.py,
# benchmarks/results/bf16-digits.json); why, per metric:
BF16_METRICS: frozenset[str] = frozenset()
_FP32_WHY = {
    "fisher": "in bfloat16 its one-pass per-sample gradients fail their 1e-3 row check (bfloat16 rounds at "
    "~4e-3), so every batch falls back to single-sample micro-batches (39x slower on the digits recipe), and "
    "the traces move by 11% (median over layers, 28% at most)",
    "hessian": "Hutchinson's double backward differentiates the surrogate gradient twice; in bfloat16 the "
    "digits traces moved by 16% (median over layers, 282% at most) on the same probes, 5.9x slower",
    "loss": "not measured in bfloat16: the loss increases it measures per candidate can be as small as "
    "bfloat16's rounding of the loss",
}


def analysis_autocast(
    precision: str, metric: str, device: torch.device | str
) -> contextlib.AbstractContextManager[Any]:
    """The block the sensitivity analysis (metric ``metric``) runs its forwards and backwards in.

    Float32 for every metric (:data:`BF16_METRICS` is empty; ``_FP32_WHY`` gives each reason): autocast is
    switched off inside the block, also when the caller opened one, because the metrics' own checks (the
    per-sample split, Hutchinson's stopping rule) assume float32 arithmetic. For the same reason cuDNN's
    TF32 convolutions (torch's default on CUDA: a 10-bit mantissa) are switched off in the block, so the
    traces are those of the CPU up to float32 rounding. With ``precision == "bf16"`` one INFO line says so
    and why.
    """
    precision = check_precision(precision)
    if precision == "bf16" and metric in BF16_METRICS:
        return autocast_context(precision, device)
    if precision == "bf16":
        why = _FP32_WHY.get(metric, "it has not been measured in bfloat16")
        log.info("the sensitivity analysis (%s) runs in fp32, not bf16: %s", metric, why)
    return full_fp32(device)


def full_fp32(device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """A block that computes in float32 on ``device`` whatever the caller set: autocast off, and on CUDA
    cuDNN's TF32 convolutions off (torch's default there; a 10-bit mantissa), restored after. Used where
    results are compared with the CPU's or with a float32 runtime (the analysis, export verification)."""
    kind = _device_type(device)
    return _fp32_block(kind) if kind in ("cpu", "cuda") else contextlib.nullcontext()


@contextlib.contextmanager
def _fp32_block(kind: str) -> Any:
    with contextlib.ExitStack() as block:
        block.enter_context(torch.autocast(kind, enabled=False))
        if kind == "cuda":
            cudnn = torch.backends.cudnn
            try:
                block.enter_context(cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                                                deterministic=cudnn.deterministic, allow_tf32=False))
            except RuntimeError:  # TF32 set through torch's newer fp32_precision API: the caller's choice
                pass
        yield
