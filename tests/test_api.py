"""The public one-liner end to end: data-free and with data, on a plain CNN and on the spiking zoo."""

from __future__ import annotations

import pytest
import snntorch as snn
import torch
from conftest import small_cnn
from torch import nn

import hq_ptq
from hq_ptq.config import QATConfig, QuantConfig, SearchConfig
from hq_ptq.models import build_model
from hq_ptq.schemes import quantized_weight, weight_codes
from hq_ptq.snn import reset_states
from hq_ptq.swap import quant_layers


def _batches(n=3, b=8, shape=(1, 8, 8), classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(b, *shape, generator=g), torch.randint(0, classes, (b,), generator=g)) for _ in range(n)
    ]


def test_data_free_quantize_warns_and_respects_budget():
    model = small_cnn()
    with pytest.warns(UserWarning, match="calib_data"):
        out = hq_ptq.quantize(model, budget=4.0)
    assert out is model
    plan = hq_ptq.get_plan(model)
    assert plan.avg_bits <= 4.0 + 1e-9
    assert len(plan.layers) == 4
    assert {c.name for c in plan.layers} == set(quant_layers(model))
    # first and last are protected at uniform 8 bits by default
    assert (plan.layers[0].scheme, plan.layers[0].bits) == ("uniform", 8)
    assert (plan.layers[-1].scheme, plan.layers[-1].bits) == ("uniform", 8)
    assert plan.meta["metric"] == "data_free"
    model(torch.randn(2, 1, 8, 8))


class _OwnAttention(nn.MultiheadAttention):
    """A user's subclass: it may override forward, so hq_ptq does not split it and it stays float32."""


class _WithAttention(nn.Module):
    """A CNN whose head attends with a subclass of nn.MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.attn = _OwnAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        return self.head(self.attn(tokens, tokens, tokens)[0].mean(1))


def test_layers_left_float_are_warned_about_and_recorded_in_the_plan():
    torch.manual_seed(0)
    model = _WithAttention()
    # in_proj 3*8 x 8 and out_proj 8 x 8 = 256 float weights; conv 8*9 and head 4*8 = 104 quantized
    match = r"1 weight layers stay float32 \(256 of 360 layer weights, 71\.1%.*attn \(_OwnAttention: a sub"
    with pytest.warns(UserWarning, match=match):
        hq_ptq.quantize(model, 4.0, calib_data=_batches())  # the default metric: fisher
    left = hq_ptq.get_plan(model).meta["float_layers"]
    assert left == {"attn": {"type": "_OwnAttention", "weights": 256, "why": left["attn"]["why"]}}
    assert set(quant_layers(model)) == {"conv", "head"}


def test_quantize_with_calibration_and_qat_changes_weights():
    model = small_cnn()
    data = _batches()
    search = SearchConfig(metric="hessian", hutchinson_probes=8, hutchinson_rel_tol=0.5)
    cfg = QuantConfig(search=search, qat=QATConfig(steps=3))
    before = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)
    }
    hq_ptq.quantize(model, budget=3.0, calib_data=data, train_data=data, config=cfg)
    # the plan alone keeps the float weights; only the QAT steps move them
    after = quant_layers(model)
    assert set(after) == set(before)
    assert all(not torch.equal(after[n].weight.detach(), w) for n, w in before.items())
    plan = hq_ptq.get_plan(model)
    assert plan.meta["metric"] == "hessian"
    assert all(v > 0 for v in plan.meta["traces"].values())
    assert plan.avg_bits <= 3.0 + 1e-9
    # the greedy-vs-MILP check: MILP Ω ≤ greedy Ω and gap = (Ω_greedy − Ω_milp) / Ω_milp
    omega_greedy, omega_milp = plan.meta["omega_total"], plan.meta["omega_milp"]
    assert omega_greedy == pytest.approx(plan.omega_total, rel=1e-12)
    assert omega_milp <= omega_greedy * (1 + 1e-12)
    assert plan.meta["gap"] == pytest.approx((omega_greedy - omega_milp) / max(omega_milp, 1e-12), abs=1e-12)


def test_plan_round_trip_reproduces_the_model():
    model = small_cnn()
    data = _batches()
    cfg = QuantConfig(search=SearchConfig(metric="fisher"), qat=QATConfig(steps=0))
    hq_ptq.quantize(model, budget=3.5, calib_data=data, config=cfg)
    plan = hq_ptq.Plan.from_dict(hq_ptq.get_plan(model).to_dict())
    fresh = small_cnn()
    hq_ptq.apply_plan(fresh, plan)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(fresh(x), model(x))
    assert [(c.scheme, c.bits) for c in hq_ptq.get_plan(fresh).layers] == [
        (c.scheme, c.bits) for c in plan.layers
    ]


def test_unreachable_budget_names_range():
    with pytest.raises(ValueError, match="unreachable"):
        hq_ptq.quantize(
            small_cnn(),
            budget=1.0,
            calib_data=_batches(),
            config=QuantConfig(search=SearchConfig(metric="data_free")),
        )


def test_model_without_layers_and_bad_weights_fail_loudly():
    with pytest.raises(ValueError, match="no Linear, Conv1d/Conv2d or ConvTranspose1d/2d layer matches"):
        hq_ptq.quantize(nn.Sequential(nn.ReLU()), budget=4, calib_data=_batches())
    model = small_cnn()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hq_ptq.quantize(model, budget=4, calib_data=_batches())


def test_snntorch_sequential_with_init_hidden():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 32),
        snn.Leaky(beta=0.5, init_hidden=True),
        nn.Linear(32, 32),
        snn.Leaky(beta=0.5, init_hidden=True),
        nn.Linear(32, 4),
    )

    class Over_time(nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):  # x: [T, B, 1, 8, 8]
            reset_states(self.body)
            return torch.stack([self.body(x_t) for x_t in x]).mean(0)

    model = Over_time(net)
    data = [(torch.rand(4, 6, 1, 8, 8) * 3, torch.randint(0, 4, (6,))) for _ in range(2)]
    search = SearchConfig(hutchinson_probes=8, hutchinson_rel_tol=0.5, protect_first_last=False)
    cfg = QuantConfig(search=search)
    hq_ptq.quantize(model, budget=3.0, calib_data=data, config=cfg)
    plan = hq_ptq.get_plan(model)
    assert len(plan.layers) == 3 and plan.avg_bits <= 3.0 + 1e-9
    assert model(data[0][0]).shape == (6, 4)


def test_spikformer_tiny_end_to_end():
    torch.manual_seed(0)
    model = build_model("spikformer-tiny", num_classes=4, depth=1)
    data = [(torch.rand(2, 4, 2, 32, 32).round(), torch.randint(0, 4, (4,))) for _ in range(2)]
    # an untrained model is silent in eval mode (BN running stats at init): give BN real statistics
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.momentum = None  # cumulative average: exact statistics after a few passes
    model.train()
    with torch.no_grad():
        for x, _ in data:
            model(x)
    cfg = QuantConfig(
        search=SearchConfig(hutchinson_probes=4, hutchinson_rel_tol=0.9, calib_batches=2),
        qat=QATConfig(steps=2),
    )
    hq_ptq.quantize(model, budget=3.5, calib_data=data, train_data=data, config=cfg)
    plan = hq_ptq.get_plan(model)
    assert plan.avg_bits <= 3.5 + 1e-9
    assert {c.scheme for c in plan.layers} <= {"uniform", "pot"}
    layers = quant_layers(model)
    for c in plan.layers:
        w = quantized_weight(layers[c.name]).detach().flatten(1)
        _, scale = weight_codes(layers[c.name])
        r = w / scale[:, None]  # each channel's weights in units of its own scale
        n = 2 ** (c.bits - 1) - 1
        if c.scheme == "pot":
            # per channel: 0 and ±scale·2^-k, k < 2^(b-1)-1, so at most 2^(b-1) distinct magnitudes
            assert max(len(row.abs().unique()) for row in r) <= 2 ** (c.bits - 1), c
            mags = r.abs()[r != 0]
            k = -torch.log2(mags)
            assert torch.equal(k, k.round()) and k.min() >= 0 and k.max() <= n - 1, c
        else:
            # uniform: integer multiples of the scale in [-(2^(b-1)-1), 2^(b-1)-1]
            torch.testing.assert_close(r, r.round(), rtol=0, atol=1e-4)
            assert r.abs().max() <= n + 1e-4, c


def _bnsmall_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.5),  # must stay off while the statistics are measured
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8, momentum=0.3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(512, 4),
    )


def test_recalibrate_bn_averages_the_quantized_models_batch_statistics():
    model = _bnsmall_cnn()
    data = _batches(n=4)
    with pytest.warns(UserWarning, match="calib_data"):  # the data-free plan is enough here
        hq_ptq.quantize(model, budget=3.0, config=QuantConfig(search=SearchConfig(protect_first_last=False)))
    bn = model[5]
    seen: list[torch.Tensor] = []
    hook = bn.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().clone()))
    model.train()
    model[1].eval()  # a flag that must come back as it was
    assert hq_ptq.recalibrate_bn(model, data, 3) == 3
    hook.remove()
    assert len(seen) == 3  # the first 3 batches only
    per_batch = [x.transpose(0, 1).flatten(1) for x in seen]
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(1) for x in per_batch]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(1) for x in per_batch]).mean(0))
    assert bn.momentum == 0.3 and model[1].momentum == 0.1
    assert model.training and model[3].training and not model[1].training
    # dropout was off: the same batches give the same statistics again
    mean = bn.running_mean.clone()
    hq_ptq.recalibrate_bn(model, data, 3)
    torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=0)

    before = bn.running_mean.clone()
    with pytest.raises(ValueError, match="no batches"):
        hq_ptq.recalibrate_bn(model, [], 2)
    with pytest.raises(ValueError, match="at least one batch"):
        hq_ptq.recalibrate_bn(model, data, 0)
    assert torch.equal(bn.running_mean, before)  # left untouched
    with pytest.raises(ValueError, match="bn_recalibration_batches"):
        QuantConfig(bn_recalibration_batches=-1)


def test_quantize_recalibrates_bn_when_asked():
    data = _batches(n=3)
    runs = {}
    for batches in (0, 2):
        model = _bnsmall_cnn()
        search = SearchConfig(hutchinson_probes=8, protect_first_last=False)
        cfg = QuantConfig(search=search, bn_recalibration_batches=batches)
        hq_ptq.quantize(model, budget=3.0, calib_data=data, config=cfg)
        runs[batches] = model[1].running_mean.clone()
    assert torch.equal(runs[0], torch.zeros(8))  # never trained: the float model's initial statistics
    assert not torch.equal(runs[2], runs[0])


def test_scale_init_reaches_scoring_and_the_applied_plan():
    """quant.scale_init is used both where candidates are scored and where the plan is applied, so the
    score table's weight errors are those of the layers the plan produces."""
    from hq_ptq.swap import weight_error

    errors = {}
    for init in ("mse", "absmax"):
        model = small_cnn()
        config = QuantConfig(scale_init=init, search=SearchConfig(metric="data_free"))
        analysis = hq_ptq.analyze(model, config=config)
        layer = quant_layers(model)["2"]
        errors[init] = analysis.table["2"][("pot", 3)]
        assert errors[init] == pytest.approx(weight_error(layer, "pot", 3, scale_init=init), rel=1e-6)
        plan = hq_ptq.search_plan(analysis, 4.0, config)
        fresh = small_cnn()
        hq_ptq.apply_plan(fresh, plan, scale_init=init)
        applied = quant_layers(fresh)["2"]
        scheme, bits = applied.hq_quant.scheme, applied.hq_quant.bits
        assert float((applied.quant_weight().value - applied.weight).pow(2).sum()) == pytest.approx(
            weight_error(applied, scheme, bits, scale_init=init), rel=1e-5)
    assert errors["mse"] < errors["absmax"]
    with pytest.raises(ValueError, match="quant.scale_init must be one of mse, absmax, got 'max'"):
        QuantConfig(scale_init="max")
