from __future__ import annotations

import brevitas.nn as qnn
import pytest
import snntorch as snn
import torch
from snntorch import utils as snn_utils
from torch import nn

from hq_ptq import swap
from hq_ptq.schemes import (
    SCHEMES,
    channel_axis,
    dequantize,
    mse_threshold,
    quantized_weight,
    threshold_parameter,
    weight_codes,
)
from hq_ptq.swap import (
    SCALE_INITS,
    find_layers,
    float_layers,
    layer_quant,
    quant_layers,
    set_layer_quant,
    swap_layers,
    weight_error,
)
from hq_ptq.swap import _why_float as _why

CANDIDATES = [(s, b) for s in SCHEMES if s in ("uniform", "pot") for b in SCHEMES[s].bits]


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect"),
            nn.ReLU(),
            nn.Conv2d(8, 4, 1, bias=False),
        )
        self.head = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16, bias=False), nn.Tanh(),
                         nn.Linear(16, 3))


def _conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(4, 6, 3, padding="same", dilation=2),
        nn.ReLU(),
        nn.Conv1d(6, 6, 5, stride=2, padding=2, padding_mode="circular", groups=3),
    )


def _decoder() -> nn.Module:
    # a transposed convolution keeps its output channels in the weight's second dimension: [C_in, C_out, k, k]
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 5, 3, stride=2, padding=1, output_padding=1),
        nn.Flatten(2),
        nn.ConvTranspose1d(5, 2, 4, stride=3, dilation=2, bias=False),
    )


class SNN(nn.Module):
    """snnTorch style: an nn.Sequential of layers and Leaky(init_hidden=True), looped over T."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2, 6, 3, padding=1),
            snn.Leaky(beta=0.8, init_hidden=True, threshold=0.5),
            nn.Flatten(),
            nn.Linear(6 * 8 * 8, 4),
            snn.Leaky(beta=0.8, init_hidden=True, threshold=0.5, output=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        snn_utils.reset(self.net)
        mems = []
        for t in range(x.shape[0]):
            _, mem = self.net(x[t])
            mems.append(mem)
        return torch.stack(mems)


MODELS = {
    "cnn": (CNN, lambda g: torch.randn(2, 3, 8, 8, generator=g),
            ["features.0", "features.2", "features.4", "head"]),
    "mlp": (_mlp, lambda g: torch.randn(5, 12, generator=g), ["0", "2", "4"]),
    "conv1d": (_conv1d, lambda g: torch.randn(2, 4, 20, generator=g), ["0", "2"]),
    "decoder": (_decoder, lambda g: torch.randn(2, 3, 8, 8, generator=g), ["0", "2", "4"]),
    "snn": (SNN, lambda g: (torch.rand(4, 2, 2, 8, 8, generator=g) < 0.4).float(), ["net.0", "net.3"]),
}

_CTOR = ("stride", "padding", "output_padding", "dilation", "groups", "padding_mode", "in_channels",
         "out_channels", "kernel_size", "in_features", "out_features")


def _build(kind: str) -> tuple[nn.Module, torch.Tensor, list[str]]:
    torch.manual_seed(0)
    ctor, make_x, names = MODELS[kind]
    return ctor(), make_x(torch.Generator().manual_seed(1)), names


@pytest.mark.parametrize("kind", list(MODELS))
def test_swap_keeps_weights_attributes_and_outputs(kind):
    model, x, names = _build(kind)
    before = dict(model.named_modules())
    params = {n: (m.weight, m.bias) for n, m in before.items() if n in names}
    weights = {n: m.weight.detach().clone() for n, m in before.items() if n in names}
    with torch.no_grad():
        ref = model(x)

    assert swap_layers(model, scheme="uniform", bits=8) == names
    layers = quant_layers(model)
    assert list(layers) == names
    for n, q in layers.items():
        old = before[n]
        assert type(q) is {
            nn.Conv1d: qnn.QuantConv1d, nn.Conv2d: qnn.QuantConv2d, nn.Linear: qnn.QuantLinear,
            nn.ConvTranspose1d: swap.QuantConvTranspose1d, nn.ConvTranspose2d: swap.QuantConvTranspose2d,
        }[type(old)]
        for attr in (a for a in _CTOR if hasattr(old, a)):
            assert getattr(q, attr) == getattr(old, attr), (n, attr)
        assert q.weight is params[n][0] and q.bias is params[n][1]
        assert torch.equal(q.weight, weights[n])
        assert q.weight.dtype == old.weight.dtype and q.weight.device == old.weight.device
        assert not q.return_quant_tensor
        assert not q.input_quant.is_quant_enabled and not q.output_quant.is_quant_enabled
        assert not q.bias_quant.is_quant_enabled and q.weight_quant.is_quant_enabled
        assert layer_quant(q) == ("uniform", 8)

    # with the weight quantizer switched off the swapped model is the float model, bit for bit
    for q in layers.values():
        q.weight_quant.disable_quant = True
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    for q in layers.values():
        q.weight_quant.disable_quant = False
    with torch.no_grad():
        out = model(x)
    if kind != "snn":  # spikes may flip under int8; the float-equality check above covers it
        assert not torch.equal(out, ref)
        torch.testing.assert_close(out, ref, rtol=0.05, atol=0.02)


def test_swap_is_idempotent_and_keeps_existing_quantizers():
    model, _, names = _build("cnn")
    swap_layers(model, include=("features.*",), scheme="pot", bits=4)
    layers = quant_layers(model)
    assert swap_layers(model, scheme="uniform", bits=8) == ["head"]
    assert swap_layers(model) == []
    after = quant_layers(model)
    assert list(after) == names
    assert all(after[n] is layers[n] for n in layers)
    assert layer_quant(after["features.0"]) == ("pot", 4) and layer_quant(after["head"]) == ("uniform", 8)


def test_include_exclude_globs():
    model, _, _ = _build("cnn")
    assert find_layers(model, include="features.*", exclude=("*.2",)) == ["features.0", "features.4"]
    got = swap_layers(model, include=("features.*", "head"), exclude=("features.[24]",), bits=4)
    assert got == ["features.0", "head"]
    assert isinstance(model.features[2], nn.Conv2d) and not isinstance(model.features[2], qnn.QuantConv2d)
    assert isinstance(model.features[4], nn.Conv2d) and not isinstance(model.features[4], qnn.QuantConv2d)


def test_nothing_matched_names_the_globs():
    model, _, _ = _build("mlp")
    with pytest.raises(ValueError, match=r"include=\['blocks\.\*'\] exclude=\['\*head'\]"):
        swap_layers(model, include=("blocks.*",), exclude=("*head",))
    with pytest.raises(ValueError, match="no Linear, Conv1d/Conv2d or ConvTranspose1d/2d layer"):
        swap_layers(model, exclude=("*",))
    assert not quant_layers(model)


def test_nothing_matched_in_a_model_of_subclasses_says_why():
    """A model whose only weight layers are Linear subclasses with their own forward: "check the globs" alone
    sent the user looking for a typo."""

    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(ScaledLinear(3, 4), nn.ReLU(), ScaledLinear(4, 2))
    with pytest.raises(ValueError, match=r"float32, e\.g\. 0 \(ScaledLinear: a subclass of a Linear/Conv"):
        swap_layers(model)
    with pytest.raises(ValueError, match=r"exclude=\['0'\]; the weight layers they select .* e\.g\. 2 "):
        swap_layers(model, exclude=("0",))


def test_bad_scheme_or_bits():
    model, _, _ = _build("mlp")
    with pytest.raises(ValueError, match="unknown scheme 'log'"):
        swap_layers(model, scheme="log", bits=4)
    with pytest.raises(ValueError, match="choose one of 2, 3, 4, 5, 6$"):
        swap_layers(model, scheme="pot", bits=8)
    assert not quant_layers(model)
    swap_layers(model)
    with pytest.raises(ValueError, match="bits=7"):
        set_layer_quant(model[0], "uniform", 7)
    with pytest.raises(ValueError, match="not an hq_ptq quant layer"):
        layer_quant(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not an hq_ptq quant layer"):
        weight_error(qnn.QuantLinear(2, 2), "pot", 3)


def test_shared_module_is_swapped_once_everywhere():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert swap_layers(model, bits=4) == ["0"]
    assert model[0] is model[2] and isinstance(model[0], qnn.QuantLinear)
    assert model[0].weight is shared.weight


def test_dtype_is_kept():
    model = nn.Sequential(nn.Linear(5, 3).double())
    swap_layers(model, scheme="pot", bits=3)
    q = model[0]
    assert q.weight.dtype == torch.float64
    assert q.weight_quant.tensor_quant.scale.dtype == torch.float64
    assert q(torch.randn(2, 5, dtype=torch.float64)).dtype == torch.float64


def test_set_layer_quant_changes_levels_and_metadata():
    model, x, _ = _build("cnn")
    swap_layers(model, scheme="uniform", bits=8)
    layer = quant_layers(model)["features.2"]
    w8 = quantized_weight(layer).detach()
    s = layer.weight.detach().abs().flatten(1).amax(1)[:, None]
    assert len((w8.flatten(1) / s).unique()) > 20

    set_layer_quant(layer, "pot", 3)
    assert layer_quant(layer) == ("pot", 3)
    s = threshold_parameter(layer.weight_quant, "pot", 3).detach()[:, None]  # the MSE-fitted scale
    ratios = set((quantized_weight(layer).detach().abs().flatten(1) / s).unique().tolist())
    assert ratios <= {0.0, 0.25, 0.5, 1.0}
    assert isinstance(model.features[2], qnn.QuantConv2d) and model.features[2] is layer

    set_layer_quant(layer, "uniform", 2)
    assert layer_quant(layer) == ("uniform", 2)
    s = threshold_parameter(layer.weight_quant, "uniform", 2).detach().flatten(1)
    assert set(torch.round(quantized_weight(layer).detach().flatten(1) / s).unique().tolist()) <= {
        -1.0, 0.0, 1.0}
    with torch.no_grad():
        model(x)  # still runs after switching schemes both ways
    # the new quantizer trains: gradients reach weight and scale
    model.zero_grad()
    model(x).square().sum().backward()
    scale = [p for n, p in layer.named_parameters() if n.startswith("weight_quant.")]
    assert len(scale) == 1 and scale[0].grad is not None and scale[0].grad.abs().sum() > 0
    assert layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("scale_init", SCALE_INITS)
def test_weight_error_matches_set_layer_quant_and_leaves_layer_alone(scale_init):
    model, _, _ = _build("cnn")
    swap_layers(model, scheme="uniform", bits=8)
    layer = quant_layers(model)["features.0"]
    proxy, wq = layer.weight_quant, quantized_weight(layer).detach().clone()
    errors = {c: weight_error(layer, *c, scale_init=scale_init) for c in CANDIDATES}
    assert layer.weight_quant is proxy and layer_quant(layer) == ("uniform", 8)
    assert torch.equal(quantized_weight(layer).detach(), wq)
    for cand, err in errors.items():
        set_layer_quant(layer, *cand, scale_init=scale_init)
        with torch.no_grad():
            direct = float((quantized_weight(layer) - layer.weight).pow(2).sum())
        assert err == direct, cand
    # more bits, less error within each scheme
    for scheme in ("uniform", "pot"):
        errs = [errors[(scheme, b)] for b in SCHEMES[scheme].bits]
        assert errs == sorted(errs, reverse=True) and errs[0] > errs[-1] > 0


@pytest.mark.parametrize("scheme, bits", CANDIDATES)
def test_applied_scale_is_the_mse_threshold_or_the_absmax(scheme, bits):
    model, _, _ = _build("cnn")
    swap_layers(model, scheme="uniform", bits=8)
    layer = quant_layers(model)["features.2"]
    w = layer.weight.detach()
    set_layer_quant(layer, scheme, bits, scale_init="absmax")
    absmax_err = weight_error(layer, scheme, bits, scale_init="absmax")
    torch.testing.assert_close(
        threshold_parameter(layer.weight_quant, scheme, bits).detach().flatten(),
        w.abs().flatten(1).amax(1), rtol=0, atol=0,
    )
    set_layer_quant(layer, scheme, bits)  # the default: the error-minimising threshold
    fitted = threshold_parameter(layer.weight_quant, scheme, bits)
    assert fitted.requires_grad  # QAT refines it from here
    assert torch.equal(fitted.detach().flatten(), mse_threshold(w, scheme, bits))
    assert weight_error(layer, scheme, bits) <= absmax_err
    if bits <= 3:
        assert weight_error(layer, scheme, bits) < absmax_err


@pytest.mark.parametrize("scheme, bits", CANDIDATES)
def test_transposed_convs_are_quantized_per_output_channel(scheme, bits):
    model, x, _ = _build("decoder")
    swap_layers(model, scheme=scheme, bits=bits)
    for name in ("2", "4"):
        layer = quant_layers(model)[name]
        w, wq = layer.weight.detach(), quantized_weight(layer).detach()
        assert channel_axis(layer) == 1 and w.shape[1] == layer.out_channels
        threshold = threshold_parameter(layer.weight_quant, scheme, bits).detach().flatten()
        assert threshold.shape == (layer.out_channels,)
        # the fitted threshold of output channel o is the one of the channel-first weight's row o
        assert torch.equal(threshold, mse_threshold(w.transpose(0, 1), scheme, bits))
        assert torch.equal(threshold, mse_threshold(w, scheme, bits, axis=1))
        codes, scale = weight_codes(layer)
        assert scale.shape == (layer.out_channels,)
        assert torch.equal(dequantize(codes, scale, scheme, bits, axis=1), wq)
        # every output channel holds its own scheme's levels of its own scale
        for o in range(layer.out_channels):
            r = wq[:, o] / scale[o]
            if scheme == "uniform":
                torch.testing.assert_close(r, r.round(), rtol=0, atol=1e-4)  # c*step/step, in float
                assert r.abs().max() <= 2 ** (bits - 1) - 1 + 1e-4
            else:
                k = torch.log2(r.abs()[r != 0])
                assert torch.equal(k, k.round()) and k.max() <= 0
    with torch.no_grad():
        assert model(x).shape == (2, 2, (8 * 8 - 1) * 3 + 2 * (4 - 1) + 1)  # 8x8 back out, then 1-D


def test_a_dilated_transposed_conv_still_takes_output_size():
    # Brevitas 0.13.4 sizes the output padding without the dilation; hq_ptq's subclass passes it
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose1d(2, 3, 3, stride=2, dilation=2))
    x = torch.randn(1, 2, 5)
    with torch.no_grad():
        want = model[0](x, output_size=[14])
    swap_layers(model, scheme="uniform", bits=8)
    model[0].weight_quant.disable_quant = True
    with torch.no_grad():
        assert torch.equal(model[0](x, output_size=[14]), want)


def test_a_plan_naming_a_grouped_transposed_conv_is_refused_before_any_swap():
    from hq_ptq.plan import LayerChoice, Plan
    from hq_ptq.state import apply_plan

    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2))
    plan = Plan((LayerChoice("0", "uniform", 4, 8, 0.0), LayerChoice("1", "uniform", 4, 32, 0.0)))
    with pytest.raises(ValueError, match=r"groups=1 if transposed\): 1 \(ConvTranspose2d\)"):
        apply_plan(model, plan)
    assert type(model[0]) is nn.Conv2d  # nothing swapped


def test_torchao_baseline_leaves_a_transposed_conv_float_and_says_why():
    from hq_ptq.baselines import torchao_weight_only

    torch.manual_seed(0)
    model = _decoder()
    res = torchao_weight_only(model, 8)
    assert set(res.bits) == {"0"} and set(res.refused) == {"2", "4"}
    assert "transposed" in res.refused["2"]
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 8))  # still runs


class _StandardizedConv(nn.Conv2d):
    """A user's Conv2d subclass that reads its weight in its own forward (weight standardization)."""

    def forward(self, x):
        mean, std = self.weight.mean((1, 2, 3), keepdim=True), self.weight.std((1, 2, 3), keepdim=True)
        w = (self.weight - mean) / std
        return self._conv_forward(x, w, self.bias)


def test_layers_hq_ptq_cannot_quantize_are_named_with_their_weights_and_reason():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 1), nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2), _StandardizedConv(4, 4, 3),
        nn.Flatten(), nn.Linear(4, 8), nn.MultiheadAttention(8, 2), nn.Conv3d(1, 2, 3), nn.LayerNorm(8),
    )
    assert float_layers(model).keys() == {"1", "2", "6"}  # the attention will be split, so it is not listed
    # the attention is split into four Linear layers (hq_ptq.attention), which are swapped
    projections = ["5.q_proj", "5.k_proj", "5.v_proj", "5.out_proj"]
    assert swap_layers(model, scheme="pot", bits=4) == ["0", "4", *projections]
    assert type(model[1]) is nn.ConvTranspose2d and type(model[2]) is _StandardizedConv
    left = float_layers(model)
    assert list(left) == ["1", "2", "6"]  # LayerNorm's weight is a vector: not a weight layer
    assert [kind for kind, _, _ in left.values()] == ["ConvTranspose2d", "_StandardizedConv", "Conv3d"]
    assert [w for _, w, _ in left.values()] == [4 * 2 * 2 * 2, 4 * 4 * 9, 2 * 27]
    assert "grouped" in left["1"][2] and "subclass" in left["2"][2]
    assert float_layers(nn.Sequential(nn.Linear(2, 2), nn.ConvTranspose1d(2, 2, 3))) == {}
    # an LSTM cell (snnTorch's SLSTM holds one), a Brevitas layer the model brought, a tied weight once
    plain = "this layer type is not quantized"
    assert float_layers(nn.Sequential(nn.LSTMCell(3, 4))) == {"0": ("LSTMCell", 4 * 4 * (3 + 4), plain)}
    assert float_layers(nn.Sequential(qnn.QuantEmbedding(10, 4), nn.Linear(4, 10))) == {}
    emb, tied = nn.Embedding(10, 4), nn.Embedding(10, 4)
    tied.weight = emb.weight
    mha = _OwnAttention(4, 1)
    assert float_layers(nn.Sequential(emb, tied, mha)) == {
        "0": ("Embedding", 40, plain), "2": ("_OwnAttention", 3 * 4 * 4 + 4 * 4, _why(mha))}
    assert "subclass of nn.MultiheadAttention" in _why(mha)
    # an attention that is the model itself cannot be replaced in place: it stays float, its out_proj in it
    assert list(float_layers(nn.MultiheadAttention(4, 1))) == [""]


class _OwnAttention(nn.MultiheadAttention):
    """A user's subclass: it may override forward, so hq_ptq does not split it."""


def test_swap_layers_warns_about_a_grouped_transposed_conv_it_leaves_float():
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2))
    with pytest.warns(UserWarning, match=r"grouped transposed convolutions stay float32.*\['1'\]"):
        assert swap_layers(model, scheme="pot", bits=4) == ["0"]


def test_swap_layers_fits_the_scale_too():
    fitted, plain = _build("mlp")[0], _build("mlp")[0]
    swap_layers(fitted, scheme="pot", bits=3)
    swap_layers(plain, scheme="pot", bits=3, scale_init="absmax")
    for name, layer in quant_layers(fitted).items():
        other = quant_layers(plain)[name]
        assert torch.equal(layer.weight_quant.tensor_quant.scale, mse_threshold(layer.weight, "pot", 3))
        assert weight_error(layer, "pot", 3) < weight_error(other, "pot", 3, scale_init="absmax")


def test_bad_scale_init_names_the_choices():
    model, _, _ = _build("mlp")
    with pytest.raises(ValueError, match="scale_init must be one of mse, absmax, got 'max'"):
        swap_layers(model, scale_init="max")
    assert not quant_layers(model)  # refused before any layer changed
    swap_layers(model)
    layer = quant_layers(model)["0"]
    with pytest.raises(ValueError, match="scale_init must be one of"):
        set_layer_quant(layer, "pot", 3, scale_init="max")
    assert layer_quant(layer) == ("uniform", 8)
    with pytest.raises(ValueError, match="scale_init must be one of"):
        weight_error(layer, "pot", 3, scale_init="max")


def test_loading_a_state_dict_restores_learned_scales_without_refitting():
    # a QAT-like change moves every scale off its MSE fit; a fresh model (fitted at swap) that loads the
    # state must take the stored scales, not refit them from the loaded weights
    def quantized() -> nn.Module:
        model, _, _ = _build("cnn")
        swap_layers(model, exclude="head", scheme="pot", bits=3)
        swap_layers(model, include="head", scheme="uniform", bits=3)
        return model

    model, x = quantized(), torch.randn(3, 3, 8, 8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in quant_layers(model).values():
            layer.weight.add_(0.01 * torch.randn(layer.weight.shape, generator=g))
            for p in layer.weight_quant.parameters():
                p.mul_(0.7 + 0.4 * torch.rand(p.shape, generator=g))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    other = quantized()
    other.load_state_dict(state)
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


def test_spikformer_tiny_swaps_and_runs():
    models = pytest.importorskip("hq_ptq.models")
    torch.manual_seed(0)
    model = models.build_model("spikformer-tiny").train()  # batch-stat BN gives nonzero logits
    x = (torch.rand(2, 2, 2, 32, 32, generator=torch.Generator().manual_seed(2)) < 0.3).float()
    with torch.no_grad():
        ref = model(x)
    assert ref.abs().sum() > 0
    float_layers = [n for n, m in model.named_modules() if type(m) in (nn.Conv1d, nn.Conv2d, nn.Linear)]
    names = swap_layers(model, exclude=("head",), scheme="pot", bits=4)
    assert names == [n for n in float_layers if n != "head"] and len(names) >= 10
    swap_layers(model, include="head", scheme="uniform", bits=8)
    for q in quant_layers(model).values():
        q.weight_quant.disable_quant = True
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    for q in quant_layers(model).values():
        q.weight_quant.disable_quant = False
    set_layer_quant(quant_layers(model)["blocks.0.attn.q.conv"], "uniform", 3)
    out = model(x)
    assert torch.isfinite(out).all() and out.shape == ref.shape
    out.square().sum().backward()
    head = quant_layers(model)["head"]
    assert head.weight.grad.abs().sum() > 0
    assert head.weight_quant.tensor_quant.scaling_impl.value.grad.abs().sum() > 0


def test_state_dict_round_trip_and_deepcopy():
    import copy

    def quantized() -> nn.Module:
        model, _, _ = _build("cnn")
        swap_layers(model, exclude="head", scheme="pot", bits=3)
        swap_layers(model, include="head", scheme="uniform", bits=4)
        return model

    model, x = quantized(), torch.randn(3, 3, 8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    keys = [k for k in model.state_dict() if "weight_quant" in k]
    assert len(keys) == 4  # one learned scale per layer, present from the swap on
    other = quantized()
    other.load_state_dict(model.state_dict())
    twin = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(other(x), ref)
        assert torch.equal(twin(x), ref)
    assert layer_quant(twin.head) == ("uniform", 4)
    assert twin.head.weight is not model.head.weight


def test_shared_module_matched_by_its_name_is_replaced_under_every_alias():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Sequential(shared), nn.ReLU())
    model.add_module("alias", shared)  # named "0.0" first, "alias" second
    assert swap_layers(model, include="0.0", bits=4) == ["0.0"]
    assert model[0][0] is model.alias and isinstance(model.alias, qnn.QuantLinear)
