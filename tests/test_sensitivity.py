from __future__ import annotations

import json
import math

import pytest
import snntorch as snn
import torch
import torch.nn.functional as F
from snntorch import utils as snn_utils
from torch import nn
from torch.func import functional_call

from hq_ptq.sensitivity import (
    fill_dead_layers,
    fisher_traces,
    hutchinson_estimates,
    hutchinson_traces,
    loss_table,
    sensitivity_table,
    weight_traces,
)
from hq_ptq.sensitivity_cache import cached_traces, fingerprint, table_from_json, table_to_json


@pytest.fixture(autouse=True)
def _one_thread():
    # These nets are tiny: intra-op threads only add contention on a busy 2-core machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _mlp_batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _exact_mean_trace(model: nn.Module, name: str, batches) -> float:
    """Tr(H)/n of the batch-averaged loss w.r.t. one parameter, from the full Hessian block."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(w: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(())
        for x, y in batches:
            total = total + F.cross_entropy(functional_call(model, {**params, name: w}, (x,)), y)
        return total / len(batches)

    w0 = params[name]
    h = torch.autograd.functional.hessian(loss, w0).reshape(w0.numel(), w0.numel())
    return float(h.trace()) / w0.numel()


class SpikingNet(nn.Module):
    """conv -> BN -> Leaky -> linear, rate readout over T steps; input [B, T, 2, 8, 8]."""

    def __init__(self, init_hidden: bool, steps: int = 4) -> None:
        super().__init__()
        self.steps = steps
        self.init_hidden = init_hidden
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.lif = snn.Leaky(beta=0.9, init_hidden=init_hidden)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mem = None if self.init_hidden else self.lif.reset_mem()
        out = torch.zeros(())
        for t in range(self.steps):
            cur = self.bn(self.conv(x[:, t]))
            if self.init_hidden:
                spk = self.lif(cur)
            else:
                spk, mem = self.lif(cur, mem)
            out = out + self.fc(spk.flatten(1))
        return out / self.steps


def _snn_batches(n: int = 2):
    g = torch.Generator().manual_seed(2)
    return [
        (3 * torch.rand(8, 4, 2, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)
    ]


def test_hutchinson_matches_exact_hessian_trace():
    model = _mlp()
    batches = _mlp_batches()
    layers = {"0": model[0], "2": model[2]}
    est = hutchinson_estimates(model, layers, batches, rel_tol=1e-3, max_samples=2000, hvps_per_batch=25)
    for name, e in est.items():
        exact = _exact_mean_trace(model, f"{name}.weight", batches)
        assert e.n_samples == 2000
        # 2000 probes give ~2.5% relative standard error here; allow 10% and 4 sigma.
        assert abs(e.mean - exact) <= 0.10 * abs(exact)
        assert abs(e.mean - exact) <= 4 * e.stderr


def test_hutchinson_traces_are_magnitudes_of_the_estimates():
    model = _mlp()
    args = (model, {"0": model[0], "2": model[2]}, _mlp_batches())
    est = hutchinson_estimates(*args, max_samples=32, seed=5)
    assert hutchinson_traces(*args, max_samples=32, seed=5) == {n: abs(e.mean) for n, e in est.items()}


def test_hutchinson_stops_early_and_reports_progress():
    model = _mlp()
    calls: list[tuple[int, int]] = []
    est = hutchinson_estimates(
        model,
        {"0": model[0], "2": model[2]},
        _mlp_batches(),
        rel_tol=10.0,
        min_samples=6,
        max_samples=50,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert {e.n_samples for e in est.values()} == {6}
    assert calls == [(i, 50) for i in range(1, 7)]


@pytest.mark.parametrize("init_hidden", [False, True], ids=["local_mem", "init_hidden"])
def test_hutchinson_spiking_net_finite_positive_deterministic(init_hidden):
    torch.manual_seed(0)
    net = SpikingNet(init_hidden)
    layers = {"conv": net.conv, "fc": net.fc}
    batches = _snn_batches()
    reset = snn_utils.reset if init_hidden else None
    kwargs = dict(reset=reset, min_samples=8, max_samples=16)
    first = hutchinson_traces(net, layers, batches, seed=3, **kwargs)
    second = hutchinson_traces(net, layers, batches, seed=3, **kwargs)
    other = hutchinson_traces(net, layers, batches, seed=4, **kwargs)
    assert set(first) == {"conv", "fc"}
    assert all(math.isfinite(t) and t > 0 for t in first.values())
    assert first == second
    assert first != other


def test_analysis_restores_model_state_and_global_rng():
    torch.manual_seed(0)
    net = SpikingNet(init_hidden=False)
    net.train()
    net.bn.bias.requires_grad_(False)
    stats = {k: v.clone() for k, v in net.bn.state_dict().items()}
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    rng = torch.get_rng_state()
    seen_grad_flags: list[dict[str, bool]] = []

    def loss_fn(out, y):
        # Record, mid-analysis, which parameters require grad and whether BN is in eval mode.
        seen_grad_flags.append({n: p.requires_grad for n, p in net.named_parameters()})
        assert not net.bn.training
        return F.cross_entropy(out, y)

    hutchinson_traces(net, {"fc": net.fc}, _snn_batches(), loss_fn, max_samples=8)
    fisher_traces(net, {"fc": net.fc}, _snn_batches(), loss_fn)
    assert all(m.training for m in net.modules())
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    for k, v in net.bn.state_dict().items():
        assert torch.equal(v, stats[k]), k
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(f == {n: n == "fc.weight" for n in flags} for f in seen_grad_flags)


def test_fisher_traces_positive():
    torch.manual_seed(0)
    net = SpikingNet(init_hidden=True)
    traces = fisher_traces(net, {"conv": net.conv, "fc": net.fc}, _snn_batches(), reset=snn_utils.reset)
    assert set(traces) == {"conv", "fc"}
    assert all(math.isfinite(t) and t > 0 for t in traces.values())


class _WithDeadLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)  # never called in forward
        self.detached = nn.Linear(4, 3)
        self.zeroed = nn.Linear(4, 3)  # in the graph, but its gradient is exactly zero

    def forward(self, x):
        return self.fc(x) + self.detached(x).detach() + 0 * self.zeroed(x)


@pytest.mark.parametrize("dead", ["unused", "detached", "zeroed"])
@pytest.mark.parametrize("metric", ["hessian", "fisher"])
def test_layer_without_gradient_measures_zero(metric, dead):
    # a layer no gradient reaches is a measurement (0), not an error; the caller applies fill_dead_layers
    model = _WithDeadLayer()
    layers = {"fc": model.fc, dead: getattr(model, dead)}
    kwargs = {"max_samples": 8} if metric == "hessian" else {}
    measure = hutchinson_traces if metric == "hessian" else fisher_traces
    traces = measure(model, layers, _mlp_batches(1), **kwargs)
    assert traces[dead] == 0.0 and traces["fc"] > 0


def test_fill_dead_layers_gives_the_smallest_live_trace():
    traces, dead = fill_dead_layers({"a": 0.5, "b": 0.0, "c": 2.0, "d": 0.0})
    assert dead == ["b", "d"]
    assert traces == {"a": 0.5, "b": 0.5, "c": 2.0, "d": 0.5}
    assert fill_dead_layers({"a": 0.0, "b": 0.0}) == ({"a": 1.0, "b": 1.0}, ["a", "b"])
    assert fill_dead_layers({"a": 3.0}) == ({"a": 3.0}, [])
    assert fill_dead_layers({"a": 1.0, "b": 1e-10, "c": 1e-8}) == ({"a": 1.0, "b": 1e-8, "c": 1e-8}, ["b"])


def test_only_dead_layers_raise_before_sampling():
    model = _WithDeadLayer()
    with pytest.raises(ValueError, match="does not depend"):
        hutchinson_traces(model, {"unused": model.unused}, _mlp_batches(1))


def test_non_finite_loss_raises():
    model = _mlp()
    layers = {"0": model[0], "2": model[2]}

    def nan_loss(out, y):
        return F.cross_entropy(out, y) * float("nan")

    with pytest.raises(ValueError, match="non-finite"):
        hutchinson_traces(model, layers, _mlp_batches(1), nan_loss)
    with pytest.raises(ValueError, match="non-finite"):
        fisher_traces(model, layers, _mlp_batches(1), nan_loss)


def test_bad_inputs_raise():
    model = _mlp()
    layers = {"0": model[0]}
    with pytest.raises(ValueError, match="batches is empty"):
        hutchinson_traces(model, layers, [])
    with pytest.raises(ValueError, match="no tensor .weight"):
        hutchinson_traces(model, {"act": model[1]}, _mlp_batches(1))
    with pytest.raises(ValueError, match="share one weight"):
        hutchinson_traces(model, {"a": model[0], "b": model[0]}, _mlp_batches(1))
    with pytest.raises(ValueError, match="hvps_per_batch"):
        hutchinson_traces(model, layers, _mlp_batches(1), hvps_per_batch=0)
    with pytest.raises(ValueError, match="min_samples"):
        hutchinson_traces(model, layers, _mlp_batches(1), min_samples=10, max_samples=5)


def test_weight_traces_are_ones():
    model = _mlp()
    assert weight_traces({"0": model[0], "2": model[2]}) == {"0": 1.0, "2": 1.0}


def _uniform_error(layer: nn.Module, scheme: str, bits: int) -> float:
    # Real per-tensor symmetric quantization error; the scheme only scales it in this test.
    w = layer.weight.detach()
    scale = w.abs().max() / (2 ** (bits - 1) - 1)
    err = float(((torch.round(w / scale) * scale - w) ** 2).sum())
    return err * (2.0 if scheme == "pot" else 1.0)


def test_sensitivity_table_is_trace_times_error():
    model = _mlp()
    layers = {"0": model[0], "2": model[2]}
    traces = {"0": 0.5, "2": 3.0}
    cands = [("uniform", 2), ("uniform", 4), ("pot", 4)]
    table = sensitivity_table(layers, traces, cands, _uniform_error)
    assert list(table) == ["0", "2"]
    for name, row in table.items():
        assert list(row) == cands
        for (scheme, bits), omega in row.items():
            assert omega == pytest.approx(traces[name] * _uniform_error(layers[name], scheme, bits))
    assert table["0"][("uniform", 2)] > table["0"][("uniform", 4)]
    with pytest.raises(KeyError, match="no trace"):
        sensitivity_table(layers, {"0": 1.0}, cands, _uniform_error)


def test_table_json_round_trip(tmp_path):
    model = _mlp()
    layers = {"0": model[0], "2": model[2]}
    traces = {"0": 0.25, "2": 1.5}
    table = sensitivity_table(layers, traces, [("uniform", 3), ("pot", 4)], _uniform_error)
    path = tmp_path / "sub" / "sens.json"
    table_to_json(table, traces, path, {"fingerprint": "abc", "metric": "hessian"})
    assert json.loads(path.read_text())["table"]["0"].keys() == {"uniform:3", "pot:4"}
    table2, traces2, meta = table_from_json(path)
    assert table2 == table
    assert traces2 == traces
    assert meta == {"fingerprint": "abc", "metric": "hessian"}
    assert [p.name for p in path.parent.iterdir()] == ["sens.json"]  # no temp file left
    with pytest.raises(FileNotFoundError):
        table_from_json(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="malformed"):
        table_from_json(path)


def test_fingerprint_tracks_weights_and_options():
    model = _mlp()
    names = ["0", "2"]
    base = fingerprint(model, names, "hessian", 4, 0, rel_tol=0.05)
    assert base == fingerprint(model, names, "hessian", 4, 0, rel_tol=0.05)
    assert base != fingerprint(model, names, "hessian", 4, 1, rel_tol=0.05)
    assert base != fingerprint(model, names, "fisher", 4, 0, rel_tol=0.05)
    assert base != fingerprint(model, names, "hessian", 8, 0, rel_tol=0.05)
    assert base != fingerprint(model, names, "hessian", 4, 0, rel_tol=0.01)
    assert base != fingerprint(model, ["0"], "hessian", 4, 0, rel_tol=0.05)
    with torch.no_grad():
        model[2].weight[0, 0] += 1e-6
    assert base != fingerprint(model, names, "hessian", 4, 0, rel_tol=0.05)
    with pytest.raises(KeyError, match="nope"):
        fingerprint(model, ["nope"], "hessian", 4, 0)


def test_fingerprint_ignores_spiking_state():
    torch.manual_seed(0)
    net = SpikingNet(init_hidden=True)
    before = fingerprint(net, ["conv", "fc"], "hessian", 2, 0)
    net.eval()
    net(_snn_batches(1)[0][0])  # leaves membrane state behind; it is not persistent
    assert fingerprint(net, ["conv", "fc"], "hessian", 2, 0) == before


def test_cached_traces_reuse_and_recompute(tmp_path):
    model = _mlp()
    layers = {"0": model[0], "2": model[2]}
    path = tmp_path / "traces.json"
    calls = []

    def compute():
        calls.append(1)
        return fisher_traces(model, layers, _mlp_batches())

    def table(tr):
        return sensitivity_table(layers, tr, [("uniform", 4)], _uniform_error)

    fp = fingerprint(model, list(layers), "fisher", 2, 0)
    first = cached_traces(path, fp, compute, table=table, meta={"metric": "fisher"})
    again = cached_traces(path, fp, compute, table=table)
    assert len(calls) == 1 and again == first
    saved_table, _, meta = table_from_json(path)
    assert meta == {"metric": "fisher", "fingerprint": fp}
    assert saved_table == table(first)

    with torch.no_grad():
        model[0].weight.mul_(2.0)
    fp2 = fingerprint(model, list(layers), "fisher", 2, 0)
    changed = cached_traces(path, fp2, compute)
    assert len(calls) == 2 and changed != first
    assert table_from_json(path)[2]["fingerprint"] == fp2

    path.write_text("garbage")
    assert cached_traces(path, fp2, compute) == changed
    assert len(calls) == 3


def test_hutchinson_through_brevitas_quant_layers():
    import brevitas.nn as qnn

    torch.manual_seed(0)
    model = nn.Sequential(
        qnn.QuantLinear(6, 8, bias=True, weight_bit_width=4),
        nn.Tanh(),
        qnn.QuantLinear(8, 3, bias=True, weight_bit_width=4),
    )
    batches = [(torch.randn(16, 6), torch.randint(0, 3, (16,)))]
    traces = hutchinson_traces(model, {"0": model[0], "2": model[2]}, batches, max_samples=16)
    assert all(math.isfinite(t) and t > 0 for t in traces.values())


# ------------------------------------------------------------------------------------------------
# metric "loss": the measured table


def _mean_ce(model: nn.Module, batches, overrides: dict[str, torch.Tensor] | None = None) -> float:
    params = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        losses = [
            float(F.cross_entropy(functional_call(model, {**params, **(overrides or {})}, (x,)), y))
            for x, y in batches
        ]
    return sum(losses) / len(losses)


def _quantized(layer: nn.Linear, scheme: str, bits: int) -> torch.Tensor:
    """The weight an hq_ptq quant layer at (scheme, bits) uses, computed on a separate copy."""
    import copy

    from hq_ptq.schemes import quantized_weight
    from hq_ptq.swap import swap_layers

    holder = nn.Sequential(copy.deepcopy(layer))
    swap_layers(holder, scheme=scheme, bits=bits)
    with torch.no_grad():
        return quantized_weight(holder[0]).detach()


def test_loss_table_is_the_loss_increase_of_one_layer_alone():
    model = _mlp()
    batches = _mlp_batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = {"0": [("uniform", 2), ("pot", 3)], "2": [("uniform", 2)]}
    table = loss_table(model, rows, batches)
    base = _mean_ce(model, batches)
    increases = []
    for name, row in rows.items():
        for scheme, bits in row:
            # only this layer's weight is quantized: the others keep their float weights
            hand = _mean_ce(model, batches, {f"{name}.weight": _quantized(model[int(name)], scheme, bits)})
            assert abs(hand - base) > 1e-4  # every candidate moves the loss measurably
            assert table[name][(scheme, bits)] == pytest.approx(max(0.0, hand - base), rel=1e-4, abs=1e-6)
            increases.append(hand - base)
    assert max(increases) > 1e-3  # not all clamped: the check compares real increases
    assert set(table) == {"0", "2"} and set(table["0"]) == {("uniform", 2), ("pot", 3)}
    # the model is never changed: still float layers, same values
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_loss_table_clamps_negative_increases_at_zero():
    model = _mlp()
    batches = _mlp_batches()

    def gain(out, y):  # quantization that raises the cross-entropy lowers this loss
        return -F.cross_entropy(out, y)

    rows = {"0": [("uniform", 2), ("pot", 3)], "2": [("uniform", 2)]}
    table = loss_table(model, rows, batches, gain)
    base = -_mean_ce(model, batches)
    clamped = 0
    for name, row in rows.items():
        for scheme, bits in row:
            hand = -_mean_ce(model, batches, {f"{name}.weight": _quantized(model[int(name)], scheme, bits)})
            assert table[name][(scheme, bits)] == pytest.approx(max(0.0, hand - base), rel=1e-4, abs=1e-6)
            clamped += hand - base < -1e-4
    assert clamped and all(v >= 0 for row in table.values() for v in row.values())


def test_loss_table_reports_progress_and_bad_rows():
    model = _mlp()
    calls: list[tuple[int, int]] = []
    rows = {"0": [("uniform", 4)], "2": [("uniform", 4), ("pot", 4)]}
    loss_table(model, rows, _mlp_batches(1), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 4) for i in range(1, 5)]  # the float model, then each (layer, candidate)
    with pytest.raises(ValueError, match="no candidates for layers"):
        loss_table(model, {"0": []}, _mlp_batches(1))
    with pytest.raises(ValueError, match="not submodules"):
        loss_table(model, {"nope": [("uniform", 4)]}, _mlp_batches(1))


def test_analyze_loss_metric_caches_the_table_and_scores_protected_layers(tmp_path, monkeypatch):
    import hq_ptq.api as api
    from hq_ptq.config import QuantConfig, SearchConfig

    def three_layers() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))

    calls = []
    measured = api.loss_table
    monkeypatch.setattr(api, "loss_table", lambda *a, **k: calls.append(1) or measured(*a, **k))
    config = QuantConfig(
        search=SearchConfig(metric="loss", schemes=("uniform",), bits=(2, 4), calib_batches=1),
        cache_dir=str(tmp_path),
    )
    first = api.analyze(three_layers(), calib_data=_mlp_batches(), config=config)
    assert first.metric == "loss" and len(calls) == 1
    # protected first/last layers carry their own candidate, measured like the others
    assert set(first.table["0"]) == set(first.table["4"]) == {("uniform", 2), ("uniform", 4), ("uniform", 8)}
    assert set(first.table["2"]) == {("uniform", 2), ("uniform", 4)}
    assert all(v >= 0 for row in first.table.values() for v in row.values())
    assert max(v for row in first.table.values() for v in row.values()) > 0
    assert first.traces == {n: max(row.values()) for n, row in first.table.items()}
    again = api.analyze(three_layers(), calib_data=_mlp_batches(), config=config)
    assert len(calls) == 1 and again.table == first.table  # read back from the cache
    assert len(list(tmp_path.glob("table-*.json"))) == 1
    wider = QuantConfig(
        search=SearchConfig(metric="loss", schemes=("uniform",), bits=(2, 3, 4), calib_batches=1),
        cache_dir=str(tmp_path),
    )
    api.analyze(three_layers(), calib_data=_mlp_batches(), config=wider)
    assert len(calls) == 2  # other candidates, other table


# ------------------------------------------------------------------------------------------------
# metric "fisher": per-sample squared gradients


def _grad(model: nn.Module, name: str, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}
    w = params[name].clone().requires_grad_(True)
    loss = F.cross_entropy(functional_call(model, {**params, name: w}, (inputs,)), targets)
    return torch.autograd.grad(loss, w)[0]


def _hand_fisher(model: nn.Module, name: str, batches, batch_dim: int = 0) -> tuple[float, float]:
    """(mean_i ||g_i||^2 / n, mean over batches of ||mean_i g_i||^2 / n) for one weight, by hand."""
    n = dict(model.named_parameters())[name].numel()
    squares, batch_means = [], []
    for x, y in batches:
        grads = [_grad(model, name, x.narrow(batch_dim, i, 1), y[i : i + 1]) for i in range(len(y))]
        squares += [float(g.pow(2).sum()) for g in grads]
        batch_means.append(float(torch.stack(grads).mean(0).pow(2).sum()))
    return sum(squares) / len(squares) / n, sum(batch_means) / len(batch_means) / n


def test_fisher_is_the_mean_per_sample_squared_gradient():
    model = _mlp()
    batches = _mlp_batches()
    layers = {"0": model[0], "2": model[2]}
    default = fisher_traces(model, layers, batches)
    custom = fisher_traces(model, layers, batches, lambda out, y: F.cross_entropy(out, y))  # micro-batches
    for name in layers:
        true, batch_mean = _hand_fisher(model, f"{name}.weight", batches)
        assert default[name] == pytest.approx(true, rel=1e-4)
        assert custom[name] == pytest.approx(true, rel=1e-4)
        assert true > 2 * batch_mean  # the old estimator is a different (smaller) number


class _TimeFirst(nn.Module):
    """Takes time-first [T, B, F] inputs, like the zoo's spiking models."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x)).mean(0)


def _time_first_batches(steps: int, batch: int):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(steps, batch, 4, generator=g), torch.randint(0, 3, (batch,), generator=g))]


def test_fisher_custom_loss_splits_time_first_inputs(caplog):
    model = _TimeFirst()
    batches = _time_first_batches(steps=5, batch=6)
    true, _ = _hand_fisher(model, "fc.weight", batches, batch_dim=1)
    with caplog.at_level("WARNING", logger="hq_ptq.sensitivity"):
        got = fisher_traces(model, {"fc": model.fc}, batches, lambda out, y: F.cross_entropy(out, y))
    assert got["fc"] == pytest.approx(true, rel=1e-4)
    assert not caplog.records


class _TimeFirstMixed(_TimeFirst):
    """Centres its scores over the batch: no sample's loss is its own, so nothing splits it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out - out.mean(0, keepdim=True)


def test_fisher_ambiguous_batch_dimension(caplog):
    model = _TimeFirst()
    batches = _time_first_batches(steps=6, batch=6)  # T == B: which dimension is the batch?
    true, _ = _hand_fisher(model, "fc.weight", batches, batch_dim=1)
    for loss_fn in (None, lambda out, y: F.cross_entropy(out, y)):
        with caplog.at_level("WARNING", logger="hq_ptq.sensitivity"):
            got = fisher_traces(model, {"fc": model.fc}, batches, loss_fn)
        # the inputs are ambiguous but the [B, classes] outputs are not, and the one-pass split checks each
        # row's owner: exact and silent for any loss that is a mean over samples
        assert got["fc"] == pytest.approx(true, rel=1e-4)
        assert not caplog.records
    mixed = _TimeFirstMixed()
    x, y = batches[0]
    batch_grad = torch.autograd.grad(F.cross_entropy(mixed(x), y), mixed.fc.weight)[0]
    with caplog.at_level("WARNING", logger="hq_ptq.sensitivity"):
        custom = fisher_traces(mixed, {"fc": mixed.fc}, batches, lambda out, y: F.cross_entropy(out, y))
    assert custom["fc"] == pytest.approx(float(batch_grad.pow(2).sum()) / batch_grad.numel(), rel=1e-4)
    [record] = caplog.records  # neither split works: the batch-mean fallback, said at WARNING
    assert record.levelname == "WARNING"
    assert "ambiguous" in record.getMessage() and "batch-mean" in record.getMessage()


# ------------------------------------------------------------------------------------------------
# metric "hessian": what is logged


def test_hutchinson_warns_at_the_probe_cap_and_on_negative_traces(caplog):
    model = _mlp()
    layers = {"0": model[0], "2": model[2]}
    with caplog.at_level("WARNING", logger="hq_ptq.sensitivity"):
        hutchinson_traces(model, layers, _mlp_batches(), rel_tol=1e-6, min_samples=2, max_samples=4)
    [record] = [r for r in caplog.records if "probe cap" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert "for 2 layers" in record.getMessage() and "0 0." in record.getMessage()
    caplog.clear()

    def concave(out, y):  # the negated cross-entropy has a negative-definite Hessian in the last layer
        return -F.cross_entropy(out, y)

    with caplog.at_level("WARNING", logger="hq_ptq.sensitivity"):
        traces = hutchinson_traces(model, {"2": model[2]}, _mlp_batches(), concave, max_samples=8)
    assert traces["2"] > 0
    assert any(r.levelname == "WARNING" and "negative" in r.getMessage() for r in caplog.records)
