"""nn.MultiheadAttention split into four quantizable Linear projections (hq_ptq/attention.py): the same
outputs as torch's module in every calling mode, and quantized, saved, loaded and exported like any layer."""

from __future__ import annotations

import itertools

import pytest
import snntorch as snn
import torch
from torch import nn

import hq_ptq
from hq_ptq.attention import SplitMultiheadAttention, split_attention
from hq_ptq.snn import reset_states
from hq_ptq.swap import float_layers, quant_layers


def _pairs():
    """(torch attention, split copy) over the constructor options that change the arithmetic."""
    for batch_first, cross_dims, bias, bias_kv, zero_attn in itertools.product((False, True), repeat=5):
        dims = 6 if cross_dims else None
        mha = nn.MultiheadAttention(8, 2, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero_attn, kdim=dims,
                                    vdim=dims, batch_first=batch_first)
        yield mha, SplitMultiheadAttention.from_float(mha), batch_first, dims or 8


def test_split_attention_matches_torch_in_every_calling_mode():
    torch.manual_seed(0)
    B, L, S = 3, 5, 4
    padding = torch.tensor([[False, False, True, True], [False] * 4, [False, True, False, True]])
    scores_mask = torch.randn(L, S)
    blocked = scores_mask < 0
    blocked[:, 0] = False  # a row with every key blocked is NaN in torch as here
    calls = 0
    for mha, split, batch_first, kv_dim in _pairs():
        for training in (False, True):  # dropout 0: training changes the path torch takes, not the result
            mha.train(training), split.train(training)
            query = torch.randn(B, L, 8) if batch_first else torch.randn(L, B, 8)
            key = torch.randn(B, S, kv_dim) if batch_first else torch.randn(S, B, kv_dim)
            masks = ({}, {"key_padding_mask": padding}, {"attn_mask": scores_mask},
                     {"attn_mask": blocked, "key_padding_mask": padding})
            for mask, need_weights, average in itertools.product(masks, (True, False), (True, False)):
                args = dict(need_weights=need_weights, average_attn_weights=average, **mask)
                (want, want_w), (got, got_w) = mha(query, key, key, **args), split(query, key, key, **args)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
                assert (got_w is None) == (want_w is None)
                if want_w is not None:
                    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
                calls += 1
            if kv_dim == 8:  # self-attention: unbatched inputs and the causal hint
                x = query[0] if batch_first else query[:, 0]
                torch.testing.assert_close(split(x, x, x)[0], mha(x, x, x)[0], rtol=1e-5, atol=1e-6)
                causal = nn.Transformer.generate_square_subsequent_mask(L)
                for need_weights in (True, False):
                    args = dict(attn_mask=causal, is_causal=True, need_weights=need_weights)
                    torch.testing.assert_close(split(query, query, query, **args)[0],
                                               mha(query, query, query, **args)[0], rtol=1e-5, atol=1e-6)
    assert calls == 32 * 2 * 16
    with pytest.raises(RuntimeError, match="is_causal=True needs attn_mask"):
        split(query, query, query, is_causal=True)


def test_transformer_encoder_runs_the_split_projections_not_its_fused_fast_path():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2)
    encoder.eval()  # eval + batch_first + bias: torch would take its fused kernel, reading in_proj_weight
    x, padding = torch.randn(2, 7, 16), torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    with torch.no_grad():
        want, want_padded = encoder(x), encoder(x, src_key_padding_mask=padding)
        assert split_attention(encoder) == ["layers.0.self_attn", "layers.1.self_attn"]
        assert split_attention(encoder) == []  # idempotent
        torch.testing.assert_close(encoder(x), want, rtol=1e-5, atol=1e-5)
        got_padded = encoder(x, src_key_padding_mask=padding)  # regular tensors, not nested ones
        torch.testing.assert_close(got_padded[~padding], want_padded[~padding], rtol=1e-5, atol=1e-5)
        # no hooks registered: the encoder layer must still call the split module
        encoder.layers[0].self_attn.q_proj.weight.mul_(2)
        assert not torch.allclose(encoder(x), want, atol=1e-3)


class _SpikingEncoder(nn.Module):
    """A spiking token encoder built from torch's transformer modules, and a cross-attention readout."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.lif = snn.Leaky(beta=0.9, init_hidden=True)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1)
        self.query = nn.Parameter(torch.randn(1, 2, 16))
        self.readout = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        tokens = self.encoder(self.lif(self.embed(x)))
        out, _ = self.readout(self.query.expand(len(x), -1, -1), tokens, tokens)
        return self.head(out.flatten(1))


def _model() -> _SpikingEncoder:
    torch.manual_seed(0)
    return _SpikingEncoder().eval()


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 6, 12, generator=gen), torch.randint(0, 5, (4,), generator=gen))
            for _ in range(4)]


PROJECTIONS = [f"{attn}.{p}_proj" for attn in ("encoder.layers.0.self_attn", "readout") for p in "qkvo"]
PROJECTIONS = [n.replace(".o_proj", ".out_proj") for n in PROJECTIONS]


def test_attention_projections_are_quantized_saved_loaded_bit_exact_and_exported(tmp_path):
    model, data = _model(), _batches()
    assert float_layers(model) == {}  # nothing will be left float
    x = data[0][0]
    want = model(x).detach()
    hq_ptq.quantize(model, 4.0, calib_data=data)
    names = [c.name for c in hq_ptq.get_plan(model).layers]
    assert set(PROJECTIONS) <= set(names) and set(names) == set(quant_layers(model))
    assert hq_ptq.get_plan(model).meta.get("float_layers", {}) == {}
    reset_states(model)
    got = model(x).detach()
    assert 0 < (got - want).abs().max() < 1.0  # quantized, and still the same function roughly

    path = hq_ptq.save(model, tmp_path / "m.hqpt")
    loaded = hq_ptq.load(path, model=_model())  # a fresh float model: split the same way on load
    reset_states(loaded)
    assert torch.equal(loaded(x), got)

    onnx = hq_ptq.export_qonnx(model, x, tmp_path / "m.onnx")
    report = hq_ptq.verify_export(model, onnx, x)
    assert report["max_abs_output_error"] < 1e-4 and report["spike_mismatches"] == 0
    assert set(PROJECTIONS) <= {n.removesuffix(".weight") for n in report["spec_check"]["weight_datatypes"]}


def test_a_failed_quantize_puts_the_torch_attention_back():
    model, data = _model(), _batches()
    keys = list(model.state_dict())
    calls = []

    def broken_loss(outputs, targets):  # passes the first-batch check, then fails inside the analysis
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("the user's loss failed")
        return nn.functional.cross_entropy(outputs, targets)

    with pytest.raises(RuntimeError, match="the user's loss failed"):
        hq_ptq.quantize(model, 4.0, calib_data=data, loss_fn=broken_loss)
    assert type(model.readout) is nn.MultiheadAttention
    assert type(model.encoder.layers[0].self_attn) is nn.MultiheadAttention
    assert model.encoder.use_nested_tensor is True
    assert list(model.state_dict()) == keys


def test_a_frozen_attention_stays_frozen_and_a_wrong_mask_is_refused():
    mha = nn.MultiheadAttention(8, 2)
    mha.requires_grad_(False)
    rng = torch.get_rng_state()
    split = SplitMultiheadAttention.from_float(mha)
    assert torch.equal(torch.get_rng_state(), rng)  # a split draws nothing from the user's RNG
    assert not any(p.requires_grad for p in split.parameters())  # QAT trains requires_grad parameters only
    x = torch.randn(5, 3, 8)
    with pytest.raises(RuntimeError, match=r"2-D attn_mask has shape \(1, 5\), but should be \(5, 5\)"):
        split(x, x, x, attn_mask=torch.zeros(1, 5))
    with pytest.raises(RuntimeError, match=r"key_padding_mask has shape \(3, 4\), but should be \(3, 5\)"):
        split(x, x, x, key_padding_mask=torch.zeros(3, 4, dtype=torch.bool))


def test_what_is_not_split_stays_torch_attention():
    """An attention with a hook of its own (the split would drop it) stays float and is named; one the
    globs exclude is left alone; a plan that does not name an attention (e.g. from a file saved before
    hq_ptq split attention) applies to torch's module as it is."""
    model = _model()
    model.readout.register_forward_hook(lambda *args: None)
    assert list(float_layers(model)) == ["readout"]
    assert "hooks" in float_layers(model)["readout"][2]
    names = hq_ptq.swap.swap_layers(model, exclude=("encoder.*",))
    assert type(model.readout) is nn.MultiheadAttention and "encoder.layers.0.linear1" not in names
    assert type(model.encoder.layers[0].self_attn) is nn.MultiheadAttention

    plan = hq_ptq.get_plan(model)
    fresh = _model()
    hq_ptq.apply_plan(fresh, plan)
    assert type(fresh.encoder.layers[0].self_attn) is nn.MultiheadAttention


def test_a_quantize_refused_before_any_forward_leaves_the_membranes():
    model, data = _model(), _batches()
    with torch.no_grad():
        model(data[0][0])
    membrane = model.lif.mem.clone()
    with pytest.raises(ValueError, match="no Linear"):
        hq_ptq.quantize(model, 4.0, calib_data=data, config=hq_ptq.QuantConfig(include=("nothing*",)))
    assert torch.equal(model.lif.mem, membrane)
    assert type(model.readout) is nn.MultiheadAttention


def test_integerize_names_the_attention_it_cannot_express():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0))
    hq_ptq.swap.swap_layers(model, scheme="uniform", bits=8)
    with pytest.raises(ValueError, match=r"^1.self_attn: attention \(softmax over q·k\) is not supported"):
        hq_ptq.integerize(model, _batches())
