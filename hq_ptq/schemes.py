"""Weight quantization schemes: a registry of Brevitas weight-quant injectors keyed by (name, bits).

Two schemes ship (spikes are already binary, so only weights are quantized):

* ``uniform``: symmetric narrow-range signed integer, per-output-channel learnable float scale
  (``Int8WeightPerChannelFloat`` with ``parameter_from_stats``: the scale is a Parameter initialised
  from the channel absmax on the first forward, then trained with straight-through gradients).
  Levels ``{c·s, c = -(2^(b-1)-1) … 2^(b-1)-1}``.
* ``pot``: power of two, 1 sign + (b-1) exponent bits, per-output-channel learnable scale ``s``
  (absmax init). Levels ``{0} ∪ {±s·2^-k, k = 0 … 2^(b-1)-2}``; b=2 is ternary ``{0, ±s}``.
  It is a minifloat with 0 mantissa bits on Brevitas' float proxy, so it exports as a faithful
  QONNX ``FloatQuant`` node.

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
    "PoTTensorQuant",
    "PoTWeightQuant",
    "Scheme",
    "dequantize",
    "list_schemes",
    "quantized_weight",
    "register_scheme",
    "weight_codes",
    "weight_quant",
]

log = logging.getLogger(__name__)

CodeFormat = Literal["int", "pot"]
Factory = Callable[[int], type]


@dataclass(frozen=True)
class Scheme:
    """A registered weight quantization scheme.

    Attributes:
        name: registry key, e.g. ``"uniform"``.
        bits: the allowed bit widths, ascending.
        factory: ``bits -> Brevitas weight-quant injector class``.
        codes: how ``dequantize`` reads integer codes: ``"int"`` (``c·s``) or ``"pot"`` (``±s·2^-(|c|-1)``).
    """

    name: str
    bits: tuple[int, ...]
    factory: Factory
    codes: CodeFormat = "int"


SCHEMES: dict[str, Scheme] = {}


def register_scheme(
    name: str, bits: tuple[int, ...], codes: CodeFormat = "int"
) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory(bits) -> injector`` as scheme ``name`` for the given bit widths.

    Raises:
        ValueError: the name is taken, no bits are given, or ``codes`` is unknown.
    """
    if name in SCHEMES:
        raise ValueError(f"scheme {name!r} is already registered; pick another name")
    if not bits or any(int(b) != b or b < 2 for b in bits):
        raise ValueError(f"scheme {name!r}: bits must be integers >= 2, got {bits!r}")
    if codes not in ("int", "pot"):
        raise ValueError(f"scheme {name!r}: codes must be 'int' or 'pot', got {codes!r}")

    def deco(factory: Factory) -> Factory:
        SCHEMES[name] = Scheme(name, tuple(sorted(int(b) for b in bits)), factory, codes)
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


@register_scheme("uniform", bits=(2, 3, 4, 5, 6, 8), codes="int")
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
    e = (ex - 1).clamp(min=-(n_levels - 1))
    mag = torch.ldexp(torch.round(torch.ldexp(a, -e)), e).clamp(max=1.0)
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

    def __init__(self, bit_width: int, tracked_parameter_list: list[Tensor], learn_scale: bool = True):
        super().__init__()
        w = tracked_parameter_list[0].detach()
        self.bit_width = int(bit_width)
        self.exponent_bit_width = self.bit_width - 1
        self.exponent_bias = 2 ** (self.exponent_bit_width - 1) - 1
        self.max_exp = 2**self.exponent_bit_width - 1 - self.exponent_bias
        self.n_levels = 2 ** (self.bit_width - 1) - 1
        absmax = w.abs().reshape(w.shape[0], -1).amax(1).clamp_min(1e-8)
        self.scale = nn.Parameter(absmax, requires_grad=learn_scale)
        self.view = (-1,) + (1,) * (w.dim() - 1)
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
    def max_available_float(bit_width):  # noqa: N805 - Brevitas resolves it by argument name
        # read by the QONNX FloatQuant handler: the natural minifloat max, 2^max_exp
        e = bit_width - 1
        return float(2 ** (2**e - 1 - (2 ** (e - 1) - 1)))


@register_scheme("pot", bits=(2, 3, 4, 5, 6), codes="pot")
def _pot(bits: int) -> type:
    return PoTWeightQuant.let(bit_width=bits)


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
        ``scale`` float of shape ``(C_out,)``. For uniform ``w_q = c·scale``; for PoT ``0`` is zero
        and ``±(k+1)`` is ``±scale·2^-k``. ``dequantize(codes, scale, scheme, bits)`` gives the
        layer's quantized weight exactly.

    Raises:
        ValueError: not a quant layer, or a quantizer whose values are neither integer nor PoT.
    """
    _check_quant_layer(layer)
    with torch.no_grad():
        qt = layer.quant_weight()
    channels = qt.value.shape[0]
    if isinstance(qt, IntQuantTensor):
        if torch.any(qt.zero_point != 0):
            raise ValueError(f"{type(layer).__name__}: asymmetric (zero-point) weights have no signed codes")
        scale = _per_channel(qt.scale, channels)
        codes = torch.round(qt.value / scale.view((-1,) + (1,) * (qt.value.dim() - 1)))
        limit = 2 ** (int(qt.bit_width) - 1) - 1
    elif isinstance(qt, FloatQuantTensor):
        if float(qt.mantissa_bit_width) != 0:
            mant = int(qt.mantissa_bit_width)
            raise ValueError(f"{type(layer).__name__}: minifloat with {mant} mantissa bits is not PoT")
        e, bias = int(qt.exponent_bit_width), int(qt.exponent_bias)
        # largest level s = scale_f·2^max_exp (an exact power-of-two rescale)
        scale = _per_channel(qt.scale, channels) * 2.0 ** (2**e - 1 - bias)
        r = qt.value / scale.view((-1,) + (1,) * (qt.value.dim() - 1))
        _, ex = torch.frexp(r.abs())  # |r| = 2^-k exactly, so ex = 1 - k
        codes = torch.where(r != 0, torch.sign(r) * (2 - ex).to(r.dtype), torch.zeros_like(r))
        limit = 2**e - 1
    else:
        raise ValueError(f"{type(layer).__name__}: weight quantization is disabled; no codes")
    if codes.abs().max() > limit:
        raise ValueError(f"{type(layer).__name__}: codes exceed ±{limit}; quantizer is not symmetric PoT/int")
    return codes.to(torch.int8), scale


def dequantize(codes: Tensor, scale: Tensor, scheme: str, bits: int) -> Tensor:
    """Float weights from ``weight_codes`` output; bit-identical to the layer's quantized weight.

    Args:
        codes: integer codes, output channels first.
        scale: per-output-channel scale ``(C_out,)`` (or one value).
        scheme: registered scheme name; its ``codes`` format picks the decoding.
        bits: bit width, used to validate the code range.

    Raises:
        ValueError: unknown scheme/bits, or a code outside ``±(2^(bits-1)-1)``.
    """
    fmt = _scheme(scheme, bits).codes
    limit = 2 ** (bits - 1) - 1
    if codes.numel() and int(codes.abs().max()) > limit:
        raise ValueError(f"codes exceed ±{limit} for {scheme} at {bits} bits; wrong bits for these codes?")
    s = scale.reshape(-1).view((-1,) + (1,) * (codes.dim() - 1)) if codes.dim() else scale
    c = codes.to(scale.dtype)
    if fmt == "int":
        return c * s
    mag = torch.ldexp(torch.ones_like(c), (1 - c.abs()).to(torch.int32))
    return torch.where(c != 0, torch.sign(c) * mag, torch.zeros_like(c)) * s
