"""Attach hq_ptq weight quantizers to any model: swap Linear, Conv1d/Conv2d and ConvTranspose1d/2d for
Brevitas layers in place.

Swapped layers quantize weights only (no input/output/bias quantization, ``return_quant_tensor=False``),
share the original ``weight``/``bias`` Parameters, and carry their quantization state as one frozen record,
``layer.hq_quant`` (:class:`hq_ptq.plan.LayerQuant`: scheme, bits, search score), written only here
(:func:`swap_layers`, :func:`set_layer_quant`) and read with :func:`layer_state` / :func:`layer_quant`.

Every quantizer built here starts at its best scale: the per-channel threshold minimising the weight's
quantization error (:func:`hq_ptq.schemes.mse_threshold`, ``scale_init="mse"``, the default), or at the
channel absmax (``scale_init="absmax"``, Brevitas' own init). The scale is a learnable Parameter written
once, here; a state_dict load (packed or QAT checkpoint) restores the stored value and never refits it.
"""

from __future__ import annotations

import fnmatch
import logging
import sys
import warnings
from collections.abc import Iterable

import brevitas.nn as qnn
import torch
from brevitas.nn.mixin.parameter import QuantWeightMixin
from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
from torch import nn

from hq_ptq.attention import split_attention, splittable
from hq_ptq.config import SCALE_INITS
from hq_ptq.plan import LayerQuant
from hq_ptq.schemes import SCHEMES, channel_axis, mse_threshold, threshold_parameter, weight_quant

__all__ = [
    "LAYER_MAP",
    "SCALE_INITS",
    "find_layers",
    "float_layers",
    "layer_quant",
    "layer_state",
    "quant_layers",
    "quantizable",
    "set_layer_quant",
    "swap_layers",
    "weight_error",
]

log = logging.getLogger(__name__)

# Exact types only: subclasses (e.g. MultiheadAttention's out_proj, which F.multi_head_attention_forward
# reads as a raw tensor) would be silently bypassed if swapped, and Brevitas layers subclass these too. The
# one exception is SpikingJelly's step-mode layers, whose forward is known (StepQuant* below).
# Transposed convolutions (decoders, e.g. snnTorch's spiking autoencoder) keep their output channels in the
# weight's second dimension; schemes.channel_axis tells every per-channel step so.
class QuantConvTranspose1d(qnn.QuantConvTranspose1d):
    """Brevitas' layer, with ``forward(x, output_size)`` sized as torch sizes it: Brevitas 0.13.4 leaves the
    dilation out of the output padding, so a dilated layer called with ``output_size`` was refused."""

    def compute_output_padding(self, inp, output_size):
        return self._output_padding(inp, output_size, self.stride, self.padding, self.kernel_size,
                                    num_spatial_dims=1, dilation=self.dilation)


class QuantConvTranspose2d(qnn.QuantConvTranspose2d):
    """As :class:`QuantConvTranspose1d`, in 2-D."""

    def compute_output_padding(self, inp, output_size):
        return self._output_padding(inp, output_size, self.stride, self.padding, self.kernel_size,
                                    num_spatial_dims=2, dilation=self.dilation)


LAYER_MAP: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: qnn.QuantConv1d,
    nn.Conv2d: qnn.QuantConv2d,
    nn.ConvTranspose1d: QuantConvTranspose1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.Linear: qnn.QuantLinear,
}
LAYER_TYPES = "Linear, Conv1d/Conv2d or ConvTranspose1d/2d"


class _StepMode:
    """SpikingJelly's step modes on an hq_ptq quant layer, as ``spikingjelly.activation_based.layer`` has
    them: with ``step_mode = "m"`` a convolution takes ``[T, N, C, ...]``, folds time into the batch
    around the layer and unfolds its output; a Linear takes any leading dimensions in both modes.
    ``step_mode`` is a plain attribute, so SpikingJelly's ``functional.set_step_mode`` changes it as it does
    on its own layers."""

    step_mode = "s"
    _fold_time = True  # False for a Linear

    def forward(self, x):  # type: ignore[no-untyped-def]
        if self.step_mode != "m" or not self._fold_time:
            return super().forward(x)  # type: ignore[misc]
        dims = len(self.kernel_size) + 3  # type: ignore[attr-defined]
        if x.dim() != dims:  # the same check (and message shape) as SpikingJelly's own layer
            raise ValueError(f"expected x with shape [T, N, C, ...] ({dims} dimensions) in step_mode 'm', "
                             f"but got x with shape {x.shape}")
        y = super().forward(x.flatten(0, 1))  # type: ignore[misc]
        return y.reshape(x.shape[0], x.shape[1], *y.shape[1:])


class StepQuantLinear(_StepMode, qnn.QuantLinear):
    """hq_ptq's quantized ``spikingjelly.activation_based.layer.Linear``."""

    _fold_time = False


class StepQuantConv1d(_StepMode, qnn.QuantConv1d):
    """hq_ptq's quantized ``spikingjelly.activation_based.layer.Conv1d``."""


class StepQuantConv2d(_StepMode, qnn.QuantConv2d):
    """hq_ptq's quantized ``spikingjelly.activation_based.layer.Conv2d``."""


def _step_layers() -> dict[type[nn.Module], type[nn.Module]]:
    """SpikingJelly's step-mode Linear/Conv1d/Conv2d → the hq_ptq layer that quantizes each. These subclass
    torch's layers only to fold time into the batch (``functional.seq_to_ann_forward``) around torch's own
    forward, so they are quantized like torch's; empty unless SpikingJelly's ``activation_based`` is imported
    (a model built from it has imported it)."""
    layer = sys.modules.get("spikingjelly.activation_based.layer")
    if layer is None:
        return {}
    return {layer.Linear: StepQuantLinear, layer.Conv1d: StepQuantConv1d, layer.Conv2d: StepQuantConv2d}


def _quant_type(module: nn.Module) -> type[nn.Module] | None:
    """The hq_ptq quant layer type for a float layer: exact LAYER_MAP types and SpikingJelly's step layers."""
    return LAYER_MAP.get(type(module)) or _step_layers().get(type(module))

QUANT_ATTR = "hq_quant"



def _as_globs(globs: str | Iterable[str], what: str) -> tuple[str, ...]:
    out = (globs,) if isinstance(globs, str) else tuple(globs)
    if not all(isinstance(g, str) for g in out):
        raise ValueError(f"{what} must be glob strings, got {globs!r}")
    return out


def _matches(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in include) and not any(
        fnmatch.fnmatchcase(name, g) for g in exclude
    )


def split_matching_attention(model: nn.Module, include: str | Iterable[str] = ("*",),
                             exclude: str | Iterable[str] = ()) -> list[str]:
    """:func:`hq_ptq.attention.split_attention` for the attentions with a projection the globs select, so
    an attention the globs leave out stays torch's own module."""
    inc, exc = _as_globs(include, "include"), _as_globs(exclude, "exclude")
    return split_attention(model, lambda name: _matches(name, inc, exc))


def _grouped_transposed(module: nn.Module) -> bool:
    # Brevitas sizes a transposed convolution's per-channel scale by out_channels, but its weight holds
    # out_channels / groups per input channel: only groups=1 is quantized
    return isinstance(module, nn.modules.conv._ConvTransposeNd) and module.groups != 1


def quantizable(module: nn.Module) -> bool:
    """A float layer hq_ptq swaps (an exact LAYER_MAP type, transposed only with groups=1, or one of
    SpikingJelly's step-mode Linear/Conv1d/Conv2d)."""
    return _quant_type(module) is not None and not _grouped_transposed(module)


def _quantizable(module: nn.Module) -> bool:
    return _is_hq_layer(module) or quantizable(module)


def _why_float(module: nn.Module) -> str | None:
    """Why hq_ptq leaves this weight layer float32, or None when it is not a weight layer hq_ptq knows."""
    if type(module) is nn.MultiheadAttention:  # and not splittable (hq_ptq.attention)
        return ("an nn.MultiheadAttention with hooks of its own (or the model itself) is not split into "
                "quantizable projections: the split module would drop them")
    if isinstance(module, nn.MultiheadAttention):
        return ("a subclass of nn.MultiheadAttention may have its own forward; only the exact type is split "
                "into quantizable projections")
    if type(module) in LAYER_MAP:
        return "a grouped transposed convolution (only groups=1 is quantized)"
    if type(module) in (nn.Conv3d, nn.ConvTranspose3d):
        return "3-D convolutions are not quantized"
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return ("a subclass of a Linear/Conv type may read its weight in its own forward, which a Brevitas "
                "layer would bypass; only exact types are swapped")
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase, nn.Bilinear, nn.Embedding, nn.EmbeddingBag)):
        return "this layer type is not quantized"
    return None


def float_layers(model: nn.Module) -> dict[str, tuple[str, int, str]]:
    """Weight layers of ``model`` that hq_ptq does not quantize whatever the globs say, and stay float32:
    name → ``(type name, weights in matrices/kernels, why)``. A Linear/Conv *subclass*, a grouped or 3-D
    transposed convolution, a Conv3d, a *subclass* of ``nn.MultiheadAttention`` (its ``out_proj`` counted with
    it; the exact type is split into quantizable projections, :func:`hq_ptq.attention.split_attention`),
    RNNs, Bilinear and embeddings. :func:`hq_ptq.api.analyze` warns about them: the plan's average bits
    cover the quantized layers only."""
    out: dict[str, tuple[str, int, str]] = {}
    seen: set[int] = set()  # a weight tied between layers counts once
    split: list[str] = []  # exact nn.MultiheadAttention: quantized once split (hq_ptq.attention)
    for name, module in model.named_modules():
        if _quantizable(module) or isinstance(module, QuantWeightMixin):
            continue  # ours, or a Brevitas layer the model brought
        if any(n == "" or name.startswith(n + ".") for n in [*out, *split]):
            continue  # inside a layer already named (the root included)
        if splittable(name, module):
            split.append(name)
            continue
        why = _why_float(module)
        if why is None:
            continue
        mats = [p for p in module.parameters() if p.dim() >= 2 and id(p) not in seen]
        seen.update(id(p) for p in mats)
        if mats:
            out[name] = (type(module).__name__, sum(p.numel() for p in mats), why)
    return out


def _warn_grouped_transposed(model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]) -> None:
    grouped = [n for n, m in model.named_modules()
               if n and type(m) in LAYER_MAP and _grouped_transposed(m) and _matches(n, include, exclude)]
    if grouped:
        warnings.warn(f"grouped transposed convolutions stay float32 (only groups=1 is quantized): {grouped}",
                      stacklevel=3)


def _is_hq_layer(module: nn.Module) -> bool:
    return isinstance(module, QuantWeightBiasInputOutputLayer) and isinstance(
        getattr(module, QUANT_ATTR, None), LayerQuant
    )


def find_layers(
    model: nn.Module, include: str | Iterable[str] = ("*",), exclude: str | Iterable[str] = ()
) -> list[str]:
    """Qualified names (model order) of the float Linear/Conv1d/Conv2d/ConvTranspose1d/ConvTranspose2d and
    hq_ptq-quantized layers matching an ``include`` glob and no ``exclude`` glob (``fnmatch``,
    case-sensitive). A grouped transposed convolution is left out (:func:`float_layers` names it).

    Raises:
        ValueError: no layer matched (the message names the globs).
    """
    inc, exc = _as_globs(include, "include"), _as_globs(exclude, "exclude")
    names = [n for n, m in model.named_modules() if n and _quantizable(m) and _matches(n, inc, exc)]
    if not names:
        left = {n: v for n, v in float_layers(model).items() if _matches(n, inc, exc)}
        why = ""
        if left:  # weight layers the globs select that hq_ptq cannot swap: say which and why
            first, (kind, _, reason) = next(iter(left.items()))
            why = f"; the weight layers they select stay float32, e.g. {first or 'the model'} ({kind}: " \
                  f"{reason})"
        raise ValueError(
            f"no {LAYER_TYPES} layer matches include={list(inc)} exclude={list(exc)}{why}; "
            "check the globs against [n for n, _ in model.named_modules()]"
        )
    return names


def _quant_layer_like(module: nn.Module, injector: type) -> nn.Module:
    w = module.weight
    common = dict(
        bias=module.bias is not None, weight_quant=injector, bias_quant=None, input_quant=None,
        output_quant=None, return_quant_tensor=False, device=w.device, dtype=w.dtype,
    )
    quant_type: type = _quant_type(module)  # type: ignore[assignment]
    if isinstance(module, nn.Linear):
        q = quant_type(module.in_features, module.out_features, **common)
    else:
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            common["output_padding"] = module.output_padding
        q = quant_type(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups,
            padding_mode=module.padding_mode, **common,
        )
    if isinstance(q, _StepMode):
        q.step_mode = module.step_mode
    # Reuse the very Parameters (bit-identical, optimizer references stay valid); Brevitas'
    # register_parameter hook re-initialises the quantizer from the assigned weight.
    q.weight = w
    q.bias = module.bias
    q.train(module.training)
    return q


def _check_scale_init(scale_init: str) -> None:
    if scale_init not in SCALE_INITS:
        raise ValueError(f"scale_init must be one of {', '.join(SCALE_INITS)}, got {scale_init!r}")


def _init_scales(proxy: nn.Module, layer: nn.Module, scheme: str, bits: int, scale_init: str) -> None:
    weight = layer.weight
    with torch.no_grad():
        # One call initialises stats-based scales now (absmax), so the state_dict has the same keys for
        # every scheme from the start: Brevitas creates `scaling_impl.value` lazily on the first call,
        # and only then (`init_done`) does the Parameter hold the threshold the quantizer uses.
        proxy(weight)
        # a scheme without a pure fake_quant (e.g. a user's per-tensor one) keeps the absmax init
        if scale_init == "mse" and SCHEMES[scheme].fake_quant is not None:
            threshold = threshold_parameter(proxy, scheme, bits)
            axis = channel_axis(layer)
            threshold.copy_(mse_threshold(weight, scheme, bits, axis).reshape(threshold.shape))


def swap_layers(
    model: nn.Module,
    *,
    include: str | Iterable[str] = ("*",),
    exclude: str | Iterable[str] = (),
    scheme: str = "uniform",
    bits: int = 8,
    scale_init: str = "mse",
) -> list[str]:
    """Replace matching ``Linear``/``Conv1d``/``Conv2d``/``ConvTranspose1d``/``ConvTranspose2d`` in place by
    Brevitas quant layers.

    Each new layer quantizes its weight with ``scheme`` at ``bits`` and keeps the original weight and
    bias Parameters and constructor attributes (stride, padding, dilation, groups, padding_mode,
    device, dtype). Layers already quantized are left alone, so calling it twice is harmless. A module
    registered under several names is swapped once and replaced everywhere. An ``nn.MultiheadAttention`` with
    a projection the globs select is split first (:func:`split_matching_attention`), so its four projections
    are layers here.

    Args:
        model: any ``nn.Module``; changed in place.
        include: ``fnmatch`` globs on qualified module names; a layer must match one.
        exclude: globs; a layer matching any is skipped.
        scheme: registered scheme name (``hq_ptq.schemes.list_schemes()``).
        bits: bit width allowed by the scheme.
        scale_init: ``"mse"`` (the per-channel threshold minimising the weight error) or ``"absmax"``.

    Returns:
        Names of the newly swapped layers, in model order.

    Raises:
        ValueError: unknown scheme/bits or scale_init, or no layer matched the globs.

    Example:
        >>> swap_layers(model, include=("blocks.*",), exclude=("*.head",), scheme="pot", bits=4)
    """
    injector = weight_quant(scheme, bits)
    _check_scale_init(scale_init)
    split_matching_attention(model, include, exclude)
    targets = set(find_layers(model, include, exclude))
    _warn_grouped_transposed(model, _as_globs(include, "include"), _as_globs(exclude, "exclude"))
    modules = list(model.named_modules(remove_duplicate=False))
    already = sum(1 for n, m in model.named_modules() if n in targets and _is_hq_layer(m))
    replaced: dict[int, nn.Module] = {}
    swapped: list[str] = []
    for name, module in modules:
        if name in targets and quantizable(module) and id(module) not in replaced:
            new = _quant_layer_like(module, injector)
            setattr(new, QUANT_ATTR, LayerQuant(scheme, int(bits)))
            _init_scales(new.weight_quant, new, scheme, bits, scale_init)
            replaced[id(module)] = new
            swapped.append(name)
    # second pass: a module registered under several names is replaced under all of them
    for name, module in modules:
        if id(module) in replaced:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, replaced[id(module)])
    log.info("swapped %d layers to %s/%d bits (%d matching layers already quantized)",
             len(swapped), scheme, bits, already)
    return swapped


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name → hq_ptq-quantized Brevitas layer, in model order."""
    return {n: m for n, m in model.named_modules() if n and _is_hq_layer(m)}


def _check_hq_layer(layer: nn.Module) -> None:
    if not _is_hq_layer(layer):
        raise ValueError(
            f"{type(layer).__name__} is not an hq_ptq quant layer; swap it first with swap_layers"
        )


def layer_state(layer: nn.Module) -> LayerQuant:
    """The layer's quantization record (scheme, bits, search score).

    Raises:
        ValueError: the layer was not swapped by hq_ptq.
    """
    _check_hq_layer(layer)
    return getattr(layer, QUANT_ATTR)


def layer_quant(layer: nn.Module) -> tuple[str, int]:
    """The layer's ``(scheme, bits)``, read from :func:`layer_state`.

    Raises:
        ValueError: the layer was not swapped by hq_ptq.
    """
    state = layer_state(layer)
    return state.scheme, state.bits


def _new_proxy(layer: nn.Module, injector: type) -> nn.Module:
    # The proxy class differs between schemes (int vs float proxy), so build a fresh proxy rather than
    # patching the old one's injector; it tracks `layer` without being attached to it.
    proxy = injector.proxy_class(layer, injector)
    # on the weight's device: Brevitas places the scale there, but not every submodule of every scheme
    # (the layer is tracked in a plain list, so this moves the proxy alone)
    proxy.to(layer.weight.device)
    proxy.train(layer.training)
    return proxy


def set_layer_quant(
    layer: nn.Module,
    scheme: str,
    bits: int,
    sensitivity: float | None = None,
    *,
    scale_init: str = "mse",
) -> None:
    """Give an hq_ptq quant layer a new ``scheme``/``bits`` in place (and the search score that chose it).

    The quantizer is rebuilt (on the weight's device), so its scale is re-initialised from the current
    weight (``scale_init``: ``"mse"``, the threshold minimising the weight error, or ``"absmax"``; a learned
    scale is not carried over), and its parameters are new objects: build the optimizer after the last call.

    Raises:
        ValueError: not an hq_ptq layer, or unknown scheme/bits or scale_init.
    """
    _check_hq_layer(layer)
    injector = weight_quant(scheme, bits)
    _check_scale_init(scale_init)
    layer.weight_quant = _new_proxy(layer, injector)
    layer._cached_sub_tensor_slice_list_modules = None  # Brevitas caches submodules of the old proxy
    setattr(layer, QUANT_ATTR, LayerQuant(scheme, int(bits), sensitivity))
    _init_scales(layer.weight_quant, layer, scheme, bits, scale_init)


def weight_error(layer: nn.Module, scheme: str, bits: int, *, scale_init: str = "mse") -> float:
    """``‖Q(W) − W‖²`` for candidate ``(scheme, bits)``, leaving the layer unchanged.

    ``Q`` is a fresh quantizer on the current weight, initialised as ``set_layer_quant`` initialises it
    (same ``scale_init``), i.e. exactly what the layer produces right after
    ``set_layer_quant(layer, scheme, bits)``.

    Raises:
        ValueError: not an hq_ptq layer, or unknown scheme/bits or scale_init.
    """
    _check_hq_layer(layer)
    proxy = _new_proxy(layer, weight_quant(scheme, bits))
    _check_scale_init(scale_init)
    _init_scales(proxy, layer, scheme, bits, scale_init)
    with torch.no_grad():
        out = proxy(layer.weight)
        wq = out.value if hasattr(out, "value") else out
        return float((wq - layer.weight).pow(2).sum())
