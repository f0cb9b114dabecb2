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
