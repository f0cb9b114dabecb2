"""Differentiable search baseline: relaxed layers, gradients, plan decoding under a budget."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hq_ptq.config import QuantConfig, SearchConfig
from hq_ptq.dnas import DNASConfig, MixedQuantLayer, decode_plan, dnas_search, relax
from hq_ptq.schemes import quantized_weight
from hq_ptq.space import candidates
from hq_ptq.swap import LAYER_MAP, find_layers

CANDS = [("uniform", 2), ("uniform", 4), ("uniform", 8), ("pot", 3)]
CONFIG = QuantConfig(search=SearchConfig(schemes=("uniform", "pot"), bits=(2, 3, 4, 8)))


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16), nn.ReLU(),
        nn.Linear(16, 3),
    )


def batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(8, 1, 6, 6, generator=gen)
        y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
        out.append((x, y))
    return out


def test_relaxed_weights_get_gradients():
    model = tiny_cnn()
    protected = {"0": ("uniform", 8), "7": ("uniform", 8)}
    layers = relax(model, CANDS, protected)
    assert list(layers) == ["0", "2", "5", "7"]
    assert all(isinstance(model.get_submodule(n), MixedQuantLayer) for n in layers)
    model.train()
    for m in layers.values():
        m.tau = 1.0
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    for name in ("2", "5"):
        m = layers[name]
        assert m.alpha.grad is not None and torch.isfinite(m.alpha.grad).all()
        assert m.alpha.grad.abs().sum() > 0, name
        assert m.layer.weight.grad.abs().sum() > 0, name
        # every candidate's learnable scale is reached through the mixture
        for q in m.quants:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in q.weight_quant.parameters())
    for name in protected:
        assert not layers[name].alpha.requires_grad and layers[name].alpha.grad is None
        assert layers[name].layer.weight.grad.abs().sum() > 0


def test_mixed_weight_is_the_chosen_candidate_when_one_hot():
    model = tiny_cnn()
    layer = relax(model, CANDS)["2"]
    layer.eval()
    for k in range(len(CANDS)):
        with torch.no_grad():
            layer.alpha.copy_(torch.full((len(CANDS),), -1e4))
            layer.alpha[k] = 0.0
        torch.testing.assert_close(layer.mixed_weight(), quantized_weight(layer.quants[k]))
    # candidates share the one float weight: no copies
    assert all(q.weight is layer.layer.weight for q in layer.quants)


def test_a_relaxed_transposed_conv_runs_its_own_forward_with_the_mixed_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1))
    layer = relax(model, CANDS)["0"]
    x = torch.randn(2, 3, 5, 5)
    w = layer.mixed_weight()
    want = F.conv_transpose2d(x, w, layer.layer.bias, stride=2, padding=1, output_padding=1)
    torch.testing.assert_close(layer(x), want)
    # the float layer's output_size argument passes through
    assert layer(x, output_size=[9, 9]).shape == (2, 4, 9, 9)


def test_dnas_search_returns_a_valid_plan_within_budget():
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = dnas_search(model, batches(), 4.0, config=CONFIG, dnas=DNASConfig(steps=6, arch_lr=0.2))
    assert plan.method == "dnas" and plan.budget == 4.0
    assert plan.avg_bits <= 4.0
    assert [c.name for c in plan.layers] == find_layers(model)
    allowed = set(candidates(CONFIG))
    for c in plan.layers:
        assert (c.scheme, c.bits) in allowed
    # first and last layer protected at uniform 8 as in the Hessian search
    assert (plan["0"].scheme, plan["0"].bits) == ("uniform", 8)
    assert (plan["7"].scheme, plan["7"].bits) == ("uniform", 8)
    assert plan.meta["seconds"] > 0 and plan.meta["steps"] == 6
    # the search ran on a copy: the caller's float model is untouched
    assert all(type(m) in LAYER_MAP for n, m in model.named_modules() if n in plan)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_dnas_search_moves_the_logits_toward_the_budget():
    model = tiny_cnn()
    # a budget below the candidates' mean (4.25 over 2, 3, 4, 8) makes the penalty push bits down
    dnas = DNASConfig(steps=8, arch_lr=0.2, fill=False)
    plan = dnas_search(model, batches(), 3.0, config=CONFIG, dnas=dnas)
    assert plan.meta["expected_avg_bits"] < 4.25
    assert plan.avg_bits <= 3.0


def test_decode_plan_repairs_down_and_fills_up():
    cands = {"a": CANDS, "b": CANDS, "c": [("uniform", 8)]}
    sizes = {"a": 100, "b": 50, "c": 10}
    want8 = {"a": [0.0, 0.0, 5.0, 0.0], "b": [0.0, 1.0, 4.0, 0.0], "c": [0.0]}
    plan = decode_plan(want8, cands, sizes, 3.0)
    assert plan.avg_bits <= 3.0 and plan.meta["repair_moves"] > 0
    assert plan.meta["argmax_avg_bits"] == 8.0
    assert plan["c"].bits == 8
    want2 = {"a": [5.0, 0.0, 0.0, 0.0], "b": [5.0, 0.0, 0.0, 0.0], "c": [0.0]}
    argmax = decode_plan(want2, cands, sizes, 6.0, fill=False)
    assert argmax.meta["fill_moves"] == 0 and argmax.avg_bits == pytest.approx((150 * 2 + 80) / 160)
    filled = decode_plan(want2, cands, sizes, 6.0)
    assert argmax.avg_bits < filled.avg_bits <= 6.0 and filled.meta["fill_moves"] > 0
    # sensitivities are -log p of the chosen candidate
    assert argmax["a"].sensitivity == pytest.approx(-torch.log_softmax(torch.tensor(want2["a"]), 0)[0].item())
    with pytest.raises(ValueError, match="unreachable"):
        decode_plan(want2, cands, sizes, 2.0)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="steps"):
        DNASConfig(steps=0)
    with pytest.raises(ValueError, match="tau_end"):
        DNASConfig(tau_start=0.5, tau_end=1.0)
    with pytest.raises(ValueError, match="unreachable"):
        dnas_search(tiny_cnn(), batches(), 1.0, config=CONFIG, dnas=DNASConfig(steps=1))
    with pytest.raises(ValueError, match="Linear, Conv1d/Conv2d or ConvTranspose1d/2d layer"):
        MixedQuantLayer(nn.ReLU(), CANDS)
    cfg = DNASConfig(steps=5, tau_start=4.0, tau_end=1.0)
    assert cfg.tau(0) == pytest.approx(4.0) and cfg.tau(4) == pytest.approx(1.0)
