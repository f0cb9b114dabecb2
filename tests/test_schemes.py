from __future__ import annotations

import dataclasses

import brevitas.nn as qnn
import numpy as np
import pytest
import torch
from brevitas.quant import Int8WeightPerTensorFloat

from hq_ptq.schemes import (
    SCHEMES,
    dequantize,
    fake_quant,
    list_schemes,
    mse_threshold,
    quantized_weight,
    register_scheme,
    threshold_parameter,
    weight_codes,
    weight_quant,
)

CANDIDATES = [(s, b) for s in ("uniform", "pot") for b in SCHEMES[s].bits]
IDS = [f"{s}{b}" for s, b in CANDIDATES]


def _wide_weight(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Log-uniform magnitudes over 2^0 … 2^-34 times a per-channel scale: every PoT level gets hit."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(-34 * torch.rand(shape, generator=g))
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    chan = 0.05 + torch.rand(shape[0], generator=g)
    w = sign * mag * chan.view((-1,) + (1,) * (len(shape) - 1))
    w.view(shape[0], -1)[:, 0] = chan  # pin each channel's absmax
    return w


def _layer(scheme: str, bits: int, kind: str = "conv", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    wq = weight_quant(scheme, bits)
    if kind == "conv":
        layer = qnn.QuantConv2d(6, 5, 3, weight_quant=wq, return_quant_tensor=False)
    elif kind == "conv1d":
        layer = qnn.QuantConv1d(6, 5, 9, weight_quant=wq, return_quant_tensor=False)
    else:
        layer = qnn.QuantLinear(40, 7, weight_quant=wq, return_quant_tensor=False)
    layer.weight = torch.nn.Parameter(_wide_weight(tuple(layer.weight.shape), seed))
    return layer


def test_registry_lists_both_schemes_and_the_11_candidates():
    assert list_schemes()[:2] == ["uniform", "pot"]
    assert SCHEMES["uniform"].bits == (2, 3, 4, 5, 6, 8)
    assert SCHEMES["pot"].bits == (2, 3, 4, 5, 6)
    assert len(CANDIDATES) == 11
    with pytest.raises(dataclasses.FrozenInstanceError):
        SCHEMES["pot"].bits = (4,)


@pytest.mark.parametrize(
    "scheme, bits, needle",
    [("log", 4, "uniform, pot"), ("pot", 8, "2, 3, 4, 5, 6"), ("uniform", 7, "2, 3, 4, 5, 6, 8"),
     ("uniform", 1, "8")],
)
def test_bad_scheme_or_bits_names_the_choices(scheme, bits, needle):
    with pytest.raises(ValueError, match=needle):
        weight_quant(scheme, bits)
    with pytest.raises(ValueError, match=needle):
        dequantize(torch.zeros(2, 2, dtype=torch.int8), torch.ones(2), scheme, bits)


def test_register_scheme_adds_a_scheme_in_one_function():
    @register_scheme("test_per_tensor", bits=(8, 4))
    def _per_tensor(bits: int) -> type:
        return Int8WeightPerTensorFloat.let(bit_width=bits)

    try:
        assert SCHEMES["test_per_tensor"].bits == (4, 8)
        assert "test_per_tensor" in list_schemes()
        layer = qnn.QuantLinear(8, 3, weight_quant=weight_quant("test_per_tensor", 4))
        codes, scale = weight_codes(layer)
        assert scale.shape == (3,) and int(codes.abs().max()) <= 7
        assert torch.equal(dequantize(codes, scale, "test_per_tensor", 4), quantized_weight(layer))
        with pytest.raises(ValueError, match="already registered"):
            register_scheme("test_per_tensor", bits=(4,))
    finally:
        SCHEMES.pop("test_per_tensor", None)
    with pytest.raises(ValueError, match="bits"):
        register_scheme("nobits", bits=())


@pytest.mark.parametrize("bits", SCHEMES["pot"].bits)
@pytest.mark.parametrize("kind", ["conv", "conv1d", "linear"])
def test_pot_level_set_per_channel(kind, bits):
    layer = _layer("pot", bits, kind)
    wq = quantized_weight(layer).detach()
    s = layer.weight.detach().abs().flatten(1).amax(1)  # absmax init
    allowed = {0.0} | {2.0**-k for k in range(2 ** (bits - 1) - 1)}
    ratios = wq.abs().flatten(1) / s[:, None]
    for c in range(wq.shape[0]):
        got = set(ratios[c].unique().tolist())
        assert got <= allowed, sorted(got - allowed)
    all_got = set(ratios.unique().tolist())
    # the log-uniform weights reach every level (2^-30 for 6 bits included)
    assert all_got == allowed
    if bits == 2:
        assert all_got == {0.0, 1.0}  # ternary


@pytest.mark.parametrize("bits", SCHEMES["uniform"].bits)
def test_uniform_codes_in_range_and_wq_is_code_times_scale(bits):
    layer = _layer("uniform", bits, "conv")
    wq = quantized_weight(layer).detach()
    codes, scale = weight_codes(layer)
    n = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and scale.shape == (5,)
    assert int(codes.min()) >= -n and int(codes.abs().max()) == n  # narrow range, absmax hits n
    assert torch.equal(wq, codes.float() * scale.view(-1, 1, 1, 1))
    absmax = layer.weight.detach().abs().flatten(1).amax(1)
    torch.testing.assert_close(scale, absmax / n)


@pytest.mark.parametrize("scheme, bits", CANDIDATES, ids=IDS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_codes_dequantize_round_trip_is_exact(scheme, bits, kind):
    layer = _layer(scheme, bits, kind, seed=bits)
    wq = quantized_weight(layer).detach()
    codes, scale = weight_codes(layer)
    assert codes.dtype == torch.int8 and codes.shape == wq.shape
    assert int(codes.abs().max()) <= 2 ** (bits - 1) - 1  # fits in `bits` signed bits
    assert len(codes.unique()) <= 2**bits
    out = dequantize(codes, scale, scheme, bits)
    assert out.dtype == wq.dtype and torch.equal(out, wq)


def test_pot_codes_meaning():
    layer = qnn.QuantLinear(4, 1, bias=False, weight_quant=weight_quant("pot", 3))
    layer.weight = torch.nn.Parameter(torch.tensor([[-2.0, 1.0, 0.4, 0.1]]))
    codes, scale = weight_codes(layer)
    # s = 2 (absmax); -2 = -s·2^0 -> -1, 1 = s·2^-1 -> 2, 0.4 ≈ s·2^-2 -> 3, 0.1 < s·2^-3 -> 0
    assert codes.tolist() == [[-1, 2, 3, 0]] and scale.tolist() == [2.0]
    assert quantized_weight(layer).tolist() == [[-2.0, 1.0, 0.5, 0.0]]


def test_dequantize_rejects_codes_wider_than_bits():
    with pytest.raises(ValueError, match="exceed"):
        dequantize(torch.tensor([[4, 0]], dtype=torch.int8), torch.ones(1), "pot", 3)


@pytest.mark.parametrize("scheme", ["uniform", "pot"])
def test_gradients_reach_weights_and_scales(scheme):
    layer = _layer(scheme, 4, "conv")
    scales = [p for n, p in layer.named_parameters() if n.startswith("weight_quant.")]
    assert len(scales) == 1 and scales[0].requires_grad and scales[0].shape[0] == 5
    x = torch.randn(3, 6, 8, 8, generator=torch.Generator().manual_seed(1))
    layer(x).square().mean().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert scales[0].grad is not None and (scales[0].grad.abs().flatten() > 0).all()


@pytest.mark.parametrize("scheme", ["uniform", "pot"])
def test_scale_is_learned_and_used(scheme):
    layer = _layer(scheme, 3, "linear")
    (scale,) = [p for n, p in layer.named_parameters() if n.startswith("weight_quant.")]
    before = quantized_weight(layer).detach().clone()
    with torch.no_grad():
        scale.mul_(0.5)
    after = quantized_weight(layer).detach()
    assert not torch.equal(before, after)
    assert after.abs().max() <= before.abs().max() * 0.5 + 1e-6  # the halved clip range is used
    assert any(k.endswith(("scaling_impl.value", "tensor_quant.scale")) for k in layer.state_dict())


def test_pot_straight_through_gradients_are_lsq():
    layer = _layer("pot", 4, "linear")
    s_param = layer.weight_quant.tensor_quant.scale
    w = layer.weight
    y = quantized_weight(layer)
    y.sum().backward()
    # every |w| <= s at absmax init: dy/dw = 1, dy/ds = sum over the row of (q - w/s)
    assert torch.equal(w.grad, torch.ones_like(w))
    s = s_param.detach()[:, None]
    expected = (y.detach() / s - w.detach() / s).sum(1)
    torch.testing.assert_close(s_param.grad, expected)


def test_pot_matches_qonnx_float_quant_bit_for_bit():
    from qonnx.custom_op.general.floatquant import float_quant

    for bits in SCHEMES["pot"].bits:
        layer = _layer("pot", bits, "conv", seed=3)
        qt = layer.quant_weight()
        assert float(qt.mantissa_bit_width) == 0 and float(qt.exponent_bit_width) == bits - 1
        ref = float_quant(
            layer.weight.detach().numpy(), qt.scale.detach().numpy(), bits - 1, 0,
            exponent_bias=float(qt.exponent_bias),
            max_val=layer.weight_quant.quant_injector.max_available_float, has_subnormal=True,
        )
        assert np.array_equal(ref, qt.value.detach().numpy()), bits


def test_weight_codes_needs_a_quant_layer():
    with pytest.raises(ValueError, match="not a Brevitas quant layer"):
        weight_codes(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# the pure fake-quantizers and the MSE threshold


def _heavy_tailed(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Student-t (2 dof) weights with per-channel spread: the heavy tails a trained layer has."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(shape, generator=g)
    chi2 = torch.randn((2, *shape), generator=g).pow(2).sum(0)
    spread = 0.02 + 0.2 * torch.rand(shape[0], generator=g)
    return normal / (chi2 / 2).sqrt() * spread.view((-1,) + (1,) * (len(shape) - 1))


def _channel_error(w: torch.Tensor, t: torch.Tensor, scheme: str, bits: int) -> torch.Tensor:
    return (fake_quant(w, t, scheme, bits) - w).pow(2).flatten(1).sum(1)


@pytest.mark.parametrize("scheme, bits", CANDIDATES, ids=IDS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_fake_quant_is_the_brevitas_quantizer_bit_for_bit(scheme, bits, kind):
    layer = _layer(scheme, bits, kind, seed=4)
    w = _heavy_tailed(tuple(layer.weight.shape), seed=5)
    w.view(w.shape[0], -1)[0, :3] = torch.tensor([0.0, -0.0, 1e-12])  # zeros' signs and a tiny weight
    w.view(w.shape[0], -1)[1] = 0.0  # an all-zero channel
    layer.weight = torch.nn.Parameter(w)
    quantized_weight(layer)  # Brevitas creates uniform's threshold on the first call
    param = threshold_parameter(layer.weight_quant, scheme, bits)
    absmax = w.flatten(1).abs().amax(1)
    g = torch.Generator().manual_seed(6)
    for t in (absmax, mse_threshold(w, scheme, bits), absmax * (0.1 + torch.rand(absmax.shape, generator=g))):
        with torch.no_grad():
            param.copy_(t.reshape(param.shape))
        ref = quantized_weight(layer).detach()
        mine = fake_quant(w, t, scheme, bits)
        assert torch.equal(ref.view(torch.int32), mine.view(torch.int32))


@pytest.mark.parametrize("scheme, bits", CANDIDATES, ids=IDS)
def test_mse_threshold_is_never_worse_than_absmax(scheme, bits):
    w = _heavy_tailed((16, 8, 3, 3), seed=bits)
    absmax = w.flatten(1).abs().amax(1)
    t = mse_threshold(w, scheme, bits)
    assert t.shape == (16,) and (t > 0).all() and (t <= absmax).all()
    mse_err, absmax_err = _channel_error(w, t, scheme, bits), _channel_error(w, absmax, scheme, bits)
    assert (mse_err <= absmax_err).all()
    if bits <= 3:  # at low bits heavy tails always leave something to gain (measured: 0.61 … 0.87)
        assert mse_err.sum() < 0.9 * absmax_err.sum()
    elif bits == 4:
        assert mse_err.sum() < absmax_err.sum()
    assert torch.equal(mse_threshold(w, scheme, bits), t)  # deterministic


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_threshold_beats_absmax_when_one_outlier_sets_the_pot_scale(bits):
    g = torch.Generator().manual_seed(7)
    w = 0.5 * (2 * torch.rand(8, 64, generator=g) - 1)
    w[:, 0] = 1.0  # one outlier per channel: at absmax the PoT levels below it are too coarse for the rest
    absmax = w.abs().amax(1)
    mse_err = _channel_error(w, mse_threshold(w, "pot", bits), "pot", bits)
    absmax_err = _channel_error(w, absmax, "pot", bits)
    assert (mse_err <= absmax_err).all()
    assert mse_err.sum() < 0.9 * absmax_err.sum()  # measured: 0.19, 0.79, 0.83 of absmax's error
    if bits <= 3:
        assert (mse_err < absmax_err).all()


def test_mse_threshold_keeps_absmax_when_it_is_best():
    # weights on the absmax-scaled PoT grid are quantized exactly at absmax; no smaller ratio ties
    w = torch.tensor([[1.0, 0.5, -0.25, 0.0], [2.0, -1.0, 0.5, 2.0]])
    assert torch.equal(mse_threshold(w, "pot", 3), torch.tensor([1.0, 2.0]))


def test_a_scheme_without_fake_quant_cannot_fit_a_threshold():
    @register_scheme("test_no_fit", bits=(4,))
    def _per_tensor(bits: int) -> type:
        return Int8WeightPerTensorFloat.let(bit_width=bits)

    try:
        with pytest.raises(ValueError, match="registers no fake_quant/threshold"):
            mse_threshold(torch.ones(2, 2), "test_no_fit", 4)
    finally:
        SCHEMES.pop("test_no_fit", None)
    with pytest.raises(ValueError, match="both fake_quant and threshold"):
        register_scheme("half", bits=(4,), fake_quant=lambda w, t, b: w)
