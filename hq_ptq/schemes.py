"""Weight quantization schemes: a registry of Brevitas weight-quant injectors keyed by (name, bits).

Two schemes ship (spikes are already binary, so only weights are quantized):

"Per output channel" follows the layer's weight layout: the first dimension of a Linear/Conv weight, the
second of a transposed convolution's ``[C_in, C_out/groups, k…]`` (:func:`channel_axis`; Brevitas' own
``output_channel_dim``), for every scheme, fit and codec here.

* ``uniform``: symmetric narrow-range signed integer, per-output-channel learnable float scale
  (``Int8WeightPerChannelFloat`` with ``parameter_from_stats``: the scale is a Parameter initialised
  from the channel absmax on the first forward, then trained with straight-through gradients).
  Levels ``{c·s, c = -(2^(b-1)-1) … 2^(b-1)-1}``.
* ``pot``: power of two, 1 sign + (b-1) exponent bits, per-output-channel learnable scale ``s``
  (absmax init). Levels ``{0} ∪ {±s·2^-k, k = 0 … 2^(b-1)-2}``; b=2 is ternary ``{0, ±s}``.
  It is a minifloat with 0 mantissa bits on Brevitas' float proxy, so it exports as a faithful
  QONNX ``FloatQuant`` node.

Scale initialisation: besides its Brevitas injector a scheme may register a pure-torch ``fake_quant``
(the weight it produces at a per-channel clip threshold, bit for bit) and a ``threshold`` accessor (the
quantizer's learnable threshold Parameter). :func:`mse_threshold` then finds the per-channel threshold
minimising ``‖Q_t(W) − W‖²``, which :mod:`hq_ptq.swap` writes into the quantizer as its starting scale;
QAT refines it from there. (The injectors alone start at the channel absmax, as above; every layer
:mod:`hq_ptq.swap` builds starts at the MSE threshold unless ``scale_init="absmax"``.)

Integer codes (what a packer stores in ``b`` bits, ``2^b - 1`` values used):

* ``uniform``: the signed integer ``c`` itself, ``w_q = c·s``.
* ``pot``: ``0`` is zero and ``±(k+1)`` is ``±s·2^-k``; so ``|c| ≤ 2^(b-1)-1`` as for uniform.

Adding a scheme is one function::

    @register_scheme("uniform_pt", bits=(4, 8))
    def _uniform_per_tensor(bits: int) -> type:
        return Int8WeightPerTensorFloat.let(bit_width=bits)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import brevitas.config
import torch
from brevitas.core.function_wrapper.misc import Identity
from brevitas.inject import ExtendedInjector, value
from brevitas.inject.enum import FloatToIntImplType, ScalingImplType
from brevitas.proxy import WeightFloatQuantProxyFromInjector
from brevitas.quant import Int8WeightPerChannelFloat
from brevitas.quant_tensor import FloatQuantTensor, IntQuantTensor
from torch import Tensor, nn

__all__ = [
    "SCHEMES",
    "channel_axis",
    "PoTTensorQuant",
    "PoTWeightQuant",
    "Scheme",
    "dequantize",
    "fake_quant",
    "list_schemes",
    "mse_threshold",
    "quantized_weight",
    "register_scheme",
    "threshold_parameter",
    "weight_codes",
    "weight_quant",
]

log = logging.getLogger(__name__)

CodeFormat = Literal["int", "pot"]
Factory = Callable[[int], type]
# (weight, per-channel threshold (C_out,), bits) -> the quantizer's output at that threshold
FakeQuant = Callable[[Tensor, Tensor, int], Tensor]
# a scheme's weight-quant proxy -> its learnable per-channel threshold Parameter
ThresholdOf = Callable[[nn.Module], nn.Parameter]


@dataclass(frozen=True)
class Scheme:
    """A registered weight quantization scheme.

    Attributes:
        name: registry key, e.g. ``"uniform"``.
        bits: the allowed bit widths, ascending.
        factory: ``bits -> Brevitas weight-quant injector class``.
        codes: how ``dequantize`` reads integer codes: ``"int"`` (``c·s``) or ``"pot"`` (``±s·2^-(|c|-1)``).
        fake_quant: pure-torch twin of the quantizer at a given per-channel threshold (its largest
            level); ``None``: the scheme keeps its injector's own scale init (no MSE init).
        threshold: where the quantizer keeps that threshold as a learnable Parameter; needed with
            ``fake_quant``.
    """

    name: str
    bits: tuple[int, ...]
    factory: Factory
    codes: CodeFormat = "int"
    fake_quant: FakeQuant | None = None
    threshold: ThresholdOf | None = None


SCHEMES: dict[str, Scheme] = {}


def register_scheme(
    name: str,
    bits: tuple[int, ...],
    codes: CodeFormat = "int",
    fake_quant: FakeQuant | None = None,
    threshold: ThresholdOf | None = None,
) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory(bits) -> injector`` as scheme ``name`` for the given bit widths.

    ``fake_quant`` and ``threshold`` (both or neither) let :func:`mse_threshold` choose the scheme's
    starting scale; see :class:`Scheme`.

    Raises:
        ValueError: the name is taken, no bits are given, ``codes`` is unknown, or only one of
            ``fake_quant``/``threshold`` is given.
    """
    if name in SCHEMES:
        raise ValueError(f"scheme {name!r} is already registered; pick another name")
    if not bits or any(int(b) != b or b < 2 for b in bits):
        raise ValueError(f"scheme {name!r}: bits must be integers >= 2, got {bits!r}")
    if codes not in ("int", "pot"):
        raise ValueError(f"scheme {name!r}: codes must be 'int' or 'pot', got {codes!r}")
    if (fake_quant is None) != (threshold is None):
        raise ValueError(f"scheme {name!r}: give both fake_quant and threshold, or neither")

    def deco(factory: Factory) -> Factory:
        sorted_bits = tuple(sorted(int(b) for b in bits))
        SCHEMES[name] = Scheme(name, sorted_bits, factory, codes, fake_quant, threshold)
        return factory

    return deco


def list_schemes() -> list[str]:
    """Names of the registered schemes, in registration order."""
    return list(SCHEMES)


def _scheme(scheme: str, bits: int) -> Scheme:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    s = SCHEMES[scheme]
    if bits not in s.bits:
        allowed = ", ".join(map(str, s.bits))
        raise ValueError(f"scheme {scheme!r} does not support bits={bits!r}; choose one of {allowed}")
    return s


def weight_quant(scheme: str, bits: int) -> type:
    """The Brevitas weight-quant injector for ``scheme`` at ``bits``.

    Raises:
        ValueError: unknown scheme, or bits the scheme does not allow (the message lists the choices).
    """
    return _scheme(scheme, bits).factory(int(bits))


# ---------------------------------------------------------------------------------------------
# uniform


def channel_axis(layer: nn.Module) -> int:
    """The output-channel dimension of ``layer``'s weight: 1 for a transposed convolution, else 0."""
    return 1 if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0


def _axis_shape(n_dims: int, axis: int) -> tuple[int, ...]:
    # (1, …, -1 at axis, …, 1): a per-channel vector broadcast along the weight's output channels
    return tuple(-1 if d == axis else 1 for d in range(max(n_dims, 1)))


def _channel_view(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(_axis_shape(like.dim(), 0))


def _uniform_fake_quant(w: Tensor, threshold: Tensor, bits: int) -> Tensor:
    """Brevitas ``RescalingIntQuant`` of the ``uniform`` scheme at clip ``threshold``, op for op.

    The step is ``|t|`` clamped at Brevitas' ``scaling_min_val`` (1e-10) over ``2^(b-1)-1``;
    ``torch.round`` (half to even) then the narrow-range clamp ``±(2^(b-1)-1)``.
    """
    levels = 2 ** (bits - 1) - 1
    step = _channel_view(threshold, w).abs().clamp_min(1e-10) / float(levels)
    # `+ 0.0` is Brevitas' zero point: it turns a -0.0 weight into +0.0, so even the zeros' bits match
    return torch.round(w / step + 0.0).clamp(-levels, levels) * step


def _uniform_threshold(proxy: nn.Module) -> nn.Parameter:
    # ParameterFromStatsFromParameterScaling: `value` is the clip threshold once `init_done`
    return proxy.tensor_quant.scaling_impl.value


@register_scheme(
    "uniform", bits=(2, 3, 4, 5, 6, 8), codes="int",
    fake_quant=_uniform_fake_quant, threshold=_uniform_threshold,
)
def _uniform(bits: int) -> type:
    # PARAMETER_FROM_STATS: `scaling_impl.value` (the clip threshold, absmax at init) is a Parameter;
    # the step is value / (2^(b-1)-1), so the scale learns with straight-through gradients.
    return Int8WeightPerChannelFloat.let(
        bit_width=bits, scaling_impl_type=ScalingImplType.PARAMETER_FROM_STATS
    )


# ---------------------------------------------------------------------------------------------
# power of two


def _pot_round(r: Tensor, n_levels: int) -> Tensor:
    """Nearest of ``{0} ∪ {±2^-k, k = 0 … n_levels-1}`` to ``r``, saturating at ±1.

    This is exactly QONNX/Brevitas ``FloatQuant`` with 0 mantissa bits (and subnormals): the
    rounding is in the linear domain (cut between 2^-k and 2^-k+1 at 1.5·2^-k, ties to even),
    and magnitudes below half the smallest level go to 0.
    """
    a = r.abs().clamp(max=1.0)
    # frexp is exact: a = m·2^ex with m in [0.5, 1), so floor(log2 a) = ex - 1 without log2 rounding
    _, ex = torch.frexp(a)
    # dividing and multiplying by an exact power of two is exact (and faster than ldexp, which
    # mse_threshold calls ~80 times per layer)
    level = torch.exp2((ex - 1).clamp(min=-(n_levels - 1)).to(a.dtype))
    mag = (torch.round(a / level) * level).clamp(max=1.0)
    return torch.sign(r) * mag


class PoTTensorQuant(nn.Module):
    """Power-of-two weight quantizer (minifloat E=b-1, M=0) with a learnable per-channel scale.

    Plugs into Brevitas' ``WeightFloatQuantProxyFromInjector``: ``forward`` returns the minifloat
    9-tuple ``(y, scale_f, zero_point, exp_bw, mant_bw, exp_bias, saturating, inf, nan)`` where
    ``scale_f = s / 2^max_exp`` is the FloatQuant scale whose largest level is ``s``.

    Gradients are LSQ-style straight-through: inside ``|w| ≤ s`` dy/dw = 1 and dy/ds = q - w/s;
    outside dy/dw = 0 and dy/ds = q. The forward value is exactly ``q·s`` (not ``s·(r + (q-r))``)
    so codes and the exported FloatQuant node reproduce it bit for bit.
    """

    def __init__(
        self, bit_width: int, tracked_parameter_list: list[Tensor], output_channel_dim: int = 0,
        learn_scale: bool = True,
    ):
        super().__init__()
        w = tracked_parameter_list[0].detach()
        self.bit_width = int(bit_width)
        self.exponent_bit_width = self.bit_width - 1
        self.exponent_bias = 2 ** (self.exponent_bit_width - 1) - 1
        self.max_exp = 2**self.exponent_bit_width - 1 - self.exponent_bias
        self.n_levels = 2 ** (self.bit_width - 1) - 1
        axis = int(output_channel_dim)
        absmax = w.abs().movedim(axis, 0).reshape(w.shape[axis], -1).amax(1).clamp_min(1e-8)
        self.scale = nn.Parameter(absmax, requires_grad=learn_scale)
        self.view = _axis_shape(w.dim(), axis)
        # the float proxy's input_view_impl reads this (Brevitas' inference export handler)
        self.input_view_impl = Identity()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # like Brevitas' own learned scales: a float checkpoint has no scale; with
        # IGNORE_MISSING_KEYS keep the absmax init (the proxy re-initialised it from the loaded weights)
        key = prefix + "scale"
        if brevitas.config.IGNORE_MISSING_KEYS and key in missing_keys:
            missing_keys.remove(key)

    def forward(self, w: Tensor) -> tuple:
        s = self.scale.abs().clamp_min(1e-8).view(self.view)
        r = w / s
        rd = r.detach()
        q = _pot_round(rd, self.n_levels)
        # g carries the STE gradients and is exactly 0 in value (g - g.detach())
        g = torch.where(rd.abs() <= 1, w - rd * s, torch.zeros_like(w))
        y = q * s + (g - g.detach())
        t = lambda v: w.new_tensor(float(v))  # noqa: E731
        scale_f = s / 2.0**self.max_exp
        return (
            y, scale_f, t(0.0), t(self.exponent_bit_width), t(0.0), t(self.exponent_bias),
            True, None, None,
        )


class PoTWeightQuant(ExtendedInjector):
    """Brevitas injector for :class:`PoTTensorQuant` on the float proxy (``.let(bit_width=b)``)."""

    proxy_class = WeightFloatQuantProxyFromInjector
    tensor_quant = PoTTensorQuant
    bit_width = 4
    learn_scale = True
    signed = True
    float_to_int_impl_type = FloatToIntImplType.ROUND  # the proxy reports it as FloatQuant rounding_mode

    @value
    def output_channel_dim(module):  # noqa: N805 - the layer Brevitas' proxy injects (1 for ConvTranspose)
        return getattr(module, "output_channel_dim", 0)

    @value
    def max_available_float(bit_width):  # noqa: N805 - Brevitas resolves it by argument name
        # read by the QONNX FloatQuant handler: the natural minifloat max, 2^max_exp
        e = bit_width - 1
        return float(2 ** (2**e - 1 - (2 ** (e - 1) - 1)))


def _pot_fake_quant(w: Tensor, threshold: Tensor, bits: int) -> Tensor:
    """:class:`PoTTensorQuant`'s forward value at scale ``threshold``, op for op."""
    s = _channel_view(threshold, w).abs().clamp_min(1e-8)
    # `+ 0.0` stands for the quantizer's zero-valued STE term: it turns -0.0 into +0.0 as the forward does
    return _pot_round(w / s, 2 ** (bits - 1) - 1) * s + 0.0


def _pot_threshold(proxy: nn.Module) -> nn.Parameter:
    return proxy.tensor_quant.scale


@register_scheme(
    "pot", bits=(2, 3, 4, 5, 6), codes="pot", fake_quant=_pot_fake_quant, threshold=_pot_threshold
)
def _pot(bits: int) -> type:
    return PoTWeightQuant.let(bit_width=bits)


# ---------------------------------------------------------------------------------------------
# scale initialisation

# clip ratios tried by mse_threshold, relative to the channel absmax. Descending, so that on a tie the
# larger ratio wins and a channel nothing improves keeps exactly its absmax threshold. The coarse grid
# reaches down to 0.05: ternary (2-bit) channels with heavy tails want ratios well below 0.2.
_COARSE_RATIOS = torch.linspace(1.0, 0.05, 64, dtype=torch.float64)
_FINE_POINTS = 17  # around the coarse winner, ± one coarse step


def _scheme_with_fake_quant(scheme: str, bits: int) -> Scheme:
    s = _scheme(scheme, bits)
    if s.fake_quant is None or s.threshold is None:
        raise ValueError(
            f"scheme {scheme!r} registers no fake_quant/threshold; register them to fit its scale"
        )
    return s


def fake_quant(weight: Tensor, threshold: Tensor, scheme: str, bits: int, axis: int = 0) -> Tensor:
    """What ``scheme`` at ``bits`` makes of ``weight`` when its per-channel threshold is ``threshold``.

    Pure torch, bit-identical to the Brevitas quantizer holding that threshold (uniform: the clip
    value, step ``t/(2^(b-1)-1)``; pot: the largest level ``s``). ``axis`` is the weight's output-channel
    dimension (:func:`channel_axis`).

    Raises:
        ValueError: unknown scheme/bits, or a scheme registered without ``fake_quant``.
    """
    quant = _scheme_with_fake_quant(scheme, bits).fake_quant
    # a registered fake_quant takes channels first; move the layer's output channels there and back
    return quant(weight.movedim(axis, 0), threshold.reshape(-1), int(bits)).movedim(0, axis)


def threshold_parameter(proxy: nn.Module, scheme: str, bits: int) -> nn.Parameter:
    """The learnable per-channel threshold Parameter inside a ``scheme`` weight-quant proxy.

    For ``uniform`` it exists only after the proxy's first call (Brevitas creates the stats-based value
    lazily); :mod:`hq_ptq.swap` makes that call when it builds a quantizer.

    Raises:
        ValueError: unknown scheme/bits, or a scheme registered without ``threshold``.
    """
    return _scheme_with_fake_quant(scheme, bits).threshold(proxy)


def _channel_errors(w2d: Tensor, thresholds: Tensor, quant: FakeQuant, bits: int) -> Tensor:
    # (C, G) squared errors, one threshold column at a time: memory stays at one weight copy
    cols = [(quant(w2d, thresholds[:, g], bits) - w2d).pow(2).sum(1) for g in range(thresholds.shape[1])]
    return torch.stack(cols, 1)


def mse_threshold(weight: Tensor, scheme: str, bits: int, axis: int = 0) -> Tensor:
    """Per-output-channel threshold minimising ``‖fake_quant(W, t) − W‖²`` (shape ``(C_out,)``; ``axis``
    is the weight's output-channel dimension, :func:`channel_axis`).

    A deterministic coarse-to-fine search over clip ratios ``t / absmax``: 64 ratios from 1.0 down to
    0.05, then 17 around the best. The absmax threshold (ratio 1) is a candidate and wins ties, so the
    result's error is never above the absmax init's.

    Raises:
        ValueError: unknown scheme/bits, or a scheme registered without ``fake_quant``.
    """
    quant = _scheme_with_fake_quant(scheme, bits).fake_quant
    with torch.no_grad():
        w2d = weight.detach().movedim(axis, 0).reshape(weight.shape[axis], -1)
        absmax = w2d.abs().amax(1)
        ratios = _COARSE_RATIOS.to(device=w2d.device, dtype=w2d.dtype)  # on the weight's device
        cand = absmax[:, None] * ratios[None, :]
        err = _channel_errors(w2d, cand, quant, bits)
        best = err.argmin(1)  # the first minimum: the largest ratio among ties
        best_err = err.gather(1, best[:, None])[:, 0]
        best_t = cand.gather(1, best[:, None])[:, 0]
        # refine between the coarse neighbours of the winner (ratio capped at 1: beyond absmax nothing clips)
        step = float(_COARSE_RATIOS[0] - _COARSE_RATIOS[1])
        offsets = torch.linspace(step, -step, _FINE_POINTS, dtype=w2d.dtype, device=w2d.device)
        fine_ratios = (ratios[best][:, None] + offsets[None, :]).clamp(0.01, 1.0)
        fine = absmax[:, None] * fine_ratios
        fine_err = _channel_errors(w2d, fine, quant, bits)
        f_best = fine_err.argmin(1)
        f_err = fine_err.gather(1, f_best[:, None])[:, 0]
        better = f_err < best_err  # strictly: ties keep the coarse (larger-or-equal) choice
        return torch.where(better, fine.gather(1, f_best[:, None])[:, 0], best_t)


# ---------------------------------------------------------------------------------------------
# codes


def _check_quant_layer(layer: nn.Module) -> None:
    if not hasattr(layer, "quant_weight") or not hasattr(layer, "weight_quant"):
        raise ValueError(
            f"{type(layer).__name__} is not a Brevitas quant layer; swap it first (hq_ptq.swap.swap_layers)"
        )


def quantized_weight(layer: nn.Module) -> Tensor:
    """The fake-quantized float weight the layer's quantizer currently produces (keeps autograd)."""
    _check_quant_layer(layer)
    out = layer.quant_weight()
    return out.value if isinstance(out, (IntQuantTensor, FloatQuantTensor)) else out


def _per_channel(scale: Tensor, channels: int) -> Tensor:
    # a per-tensor scale is broadcast so every scheme hands the packer a (C_out,) vector
    flat = scale.detach().reshape(-1)
    return flat.expand(channels).clone() if flat.numel() == 1 else flat.reshape(channels)


def weight_codes(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """Integer codes and per-output-channel scale of the layer's quantized weight.

    Returns:
        ``(codes, scale)``: ``codes`` int8 with the weight's shape, ``|codes| ≤ 2^(b-1)-1``;
        ``scale`` float of shape ``(C_out,)``, along the weight's :func:`channel_axis`. For uniform
        ``w_q = c·scale``; for PoT ``0`` is zero and ``±(k+1)`` is ``±scale·2^-k``.
        ``dequantize(codes, scale, scheme, bits, channel_axis(layer))`` gives the
        layer's quantized weight exactly.

    Raises:
        ValueError: not a quant layer, or a quantizer whose values are neither integer nor PoT.
    """
    _check_quant_layer(layer)
    with torch.no_grad():
        qt = layer.quant_weight()
    axis = channel_axis(layer)
    channels = qt.value.shape[axis]
    view = _axis_shape(qt.value.dim(), axis)
    if isinstance(qt, IntQuantTensor):
        if torch.any(qt.zero_point != 0):
            raise ValueError(f"{type(layer).__name__}: asymmetric (zero-point) weights have no signed codes")
        scale = _per_channel(qt.scale, channels)
        codes = torch.round(qt.value / scale.view(view))
        limit = 2 ** (int(qt.bit_width) - 1) - 1
    elif isinstance(qt, FloatQuantTensor):
        if float(qt.mantissa_bit_width) != 0:
            mant = int(qt.mantissa_bit_width)
            raise ValueError(f"{type(layer).__name__}: minifloat with {mant} mantissa bits is not PoT")
        e, bias = int(qt.exponent_bit_width), int(qt.exponent_bias)
        # largest level s = scale_f·2^max_exp (an exact power-of-two rescale)
        scale = _per_channel(qt.scale, channels) * 2.0 ** (2**e - 1 - bias)
        r = qt.value / scale.view(view)
        _, ex = torch.frexp(r.abs())  # |r| = 2^-k exactly, so ex = 1 - k
        codes = torch.where(r != 0, torch.sign(r) * (2 - ex).to(r.dtype), torch.zeros_like(r))
        limit = 2**e - 1
    else:
        raise ValueError(f"{type(layer).__name__}: weight quantization is disabled; no codes")
    if codes.abs().max() > limit:
        raise ValueError(f"{type(layer).__name__}: codes exceed ±{limit}; quantizer is not symmetric PoT/int")
    return codes.to(torch.int8), scale


def dequantize(codes: Tensor, scale: Tensor, scheme: str, bits: int, axis: int = 0) -> Tensor:
    """Float weights from ``weight_codes`` output; bit-identical to the layer's quantized weight.

    Args:
        codes: integer codes with the weight's shape.
        scale: per-output-channel scale ``(C_out,)`` (or one value).
        axis: the codes' output-channel dimension (:func:`channel_axis` of the layer; 0 unless transposed).
        scheme: registered scheme name; its ``codes`` format picks the decoding.
        bits: bit width, used to validate the code range.

    Raises:
        ValueError: unknown scheme/bits, or a code outside ``±(2^(bits-1)-1)``.
    """
    fmt = _scheme(scheme, bits).codes
    limit = 2 ** (bits - 1) - 1
    if codes.numel() and int(codes.abs().max()) > limit:
        raise ValueError(f"codes exceed ±{limit} for {scheme} at {bits} bits; wrong bits for these codes?")
    s = scale.reshape(-1).view(_axis_shape(codes.dim(), axis)) if codes.dim() else scale
    c = codes.to(device=scale.device, dtype=scale.dtype)
    if fmt == "int":
        return c * s
    mag = torch.ldexp(torch.ones_like(c), (1 - c.abs()).to(torch.int32))
    return torch.where(c != 0, torch.sign(c) * mag, torch.zeros_like(c)) * s
