"""The hardware-aware objective: one cost model per (kind, scheme, bits), the energy budget in the search
(greedy and MILP), and the energy budget through quantize, recipes, the CLI and the report."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import pytest
import torch
from conftest import small_cnn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

import hq_ptq
from hq_ptq.cli import app
from hq_ptq.config import QuantConfig, SearchConfig
from hq_ptq.energy import HOROWITZ_45NM, LayerActivity, candidate_energy, estimate_energy, layer_cost
from hq_ptq.plan import LayerChoice, Plan
from hq_ptq.recipe import load_recipe
from hq_ptq.report import pot_saving_layers, write_report
from hq_ptq.search import allocate

C = HOROWITZ_45NM
E_BIT = 5.0 / 32  # SRAM read per weight bit


def _act(
    name: str,
    kind: str,
    *,
    rate: float = 0.5,
    mean_abs: float = 0.5,
    macs: float = 1000.0,
    params: int = 10,
    steps: float = 4.0,
) -> LayerActivity:
    return LayerActivity(
        name=name,
        layer_type="Linear",
        params=params,
        macs=macs,
        steps=steps,
        time_steps=4,
        rate=rate,
        mean_abs=mean_abs,
        binary=kind == "spike",
        integer=kind in ("spike", "count"),
        model_input=False,
    )


def _add(bits: int) -> float:  # Horowitz line through (8, 0.03) and (32, 0.1), by hand
    return 0.03 + (bits - 8) * 0.07 / 24


# ---------------------------------------------------------------------------------------------
# The cost model, against hand computations from the constants
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cost_model_per_kind_and_scheme(bits):
    memory = 10 * 4 * bits * E_BIT
    spike = _act("s", "spike", rate=0.2, mean_abs=0.2)
    assert layer_cost(spike, "uniform", bits) == pytest.approx((200 * _add(bits), memory))
    assert layer_cost(spike, "pot", bits) == layer_cost(spike, "uniform", bits)  # scheme-independent

    # counts 0..k with mean count 1.2 over the nonzero inputs: k accumulates beat one shift-and-add
    few = _act("c", "count", rate=0.5, mean_abs=0.6)
    assert layer_cost(few, "uniform", bits) == pytest.approx((600 * _add(bits), memory))
    assert layer_cost(few, "pot", bits) == pytest.approx((600 * _add(bits), memory))
    # mean count 3: the shift-and-add per nonzero input (shift = one add at the same width) is cheaper
    many = _act("c", "count", rate=0.5, mean_abs=1.5)
    assert layer_cost(many, "uniform", bits) == pytest.approx((1500 * _add(bits), memory))
    assert layer_cost(many, "pot", bits) == pytest.approx((500 * (_add(bits) + _add(bits)), memory))

    # real-valued inputs: uniform stays a float32 MAC, PoT is an 8-bit exponent add plus an fp32 add
    mac = _act("m", "mac")
    assert layer_cost(mac, "uniform", bits) == pytest.approx((1000 * 4.6, memory))
    assert layer_cost(mac, "pot", bits) == pytest.approx((1000 * (0.03 + 0.9), memory))


def test_cost_model_fp32_and_shift_constant():
    fp_memory = 10 * 4 * 32 * E_BIT
    assert layer_cost(_act("s", "spike", rate=0.2), None, None) == pytest.approx((200 * 0.9, fp_memory))
    assert layer_cost(_act("c", "count", mean_abs=0.6), None, None) == pytest.approx((600 * 0.9, fp_memory))
    assert layer_cost(_act("m", "mac"), None, None) == pytest.approx((1000 * 4.6, fp_memory))
    assert C.shift(4) == pytest.approx(_add(4))
    dear_shift = type(C)(barrel_shift_per_add=3.0)
    many = _act("c", "count", rate=0.5, mean_abs=1.5)
    # a shift three times an add: 500 · 4 adds > 1500 adds, so the PoT weight is accumulated instead
    assert layer_cost(many, "pot", 4, dear_shift)[0] == pytest.approx(1500 * _add(4))
    with pytest.raises(ValueError, match="barrel_shift_per_add"):
        type(C)(barrel_shift_per_add=0.0)


def test_estimate_energy_reports_scheme_and_uses_the_cost_model():
    act = {"m": _act("m", "mac"), "s": _act("s", "spike", rate=0.2)}
    plan = Plan((LayerChoice("m", "pot", 4, 10, 0.0), LayerChoice("s", "uniform", 4, 10, 0.0)))
    rep = estimate_energy(act, plan)
    by_name = {e.name: e for e in rep.layers}
    assert by_name["m"].scheme == "pot" and by_name["s"].scheme == "uniform"
    for name, scheme in (("m", "pot"), ("s", "uniform")):
        assert (by_name[name].quant_compute_pj, by_name[name].quant_memory_pj) == layer_cost(
            act[name], scheme, 4
        )
    assert pot_saving_layers(rep) == ["m"]


# ---------------------------------------------------------------------------------------------
# allocate under an energy budget
# ---------------------------------------------------------------------------------------------
def _mac_tie():
    """Layer "m" reads real values: PoT and uniform tie in Ω at each width; "s" is a spike layer."""
    act = {"m": _act("m", "mac", params=100), "s": _act("s", "spike", rate=0.2, params=100)}
    cands = [(s, b) for s in ("uniform", "pot") for b in (2, 4)]
    omega = {2: 1.0, 4: 0.1}
    table = {
        "m": {c: omega[c[1]] for c in cands},
        "s": {c: omega[c[1]] + (c[0] == "pot") * 0.05 for c in cands},
    }
    return act, table, {"m": 100, "s": 100}


@pytest.mark.parametrize("method", ["greedy", "milp"])
def test_tight_energy_budget_picks_pot_on_the_mac_layer(method):
    act, table, sizes = _mac_tie()
    energy = candidate_energy(act, table)
    # Without an energy budget uniform may win the tie: make it a hair better so it does.
    table_u = {**table, "m": {c: v - 1e-3 * (c[0] == "uniform") for c, v in table["m"].items()}}
    free = allocate(table_u, sizes, 4.0, method=method)
    assert (free["m"].scheme, free["m"].bits) == ("uniform", 4)
    uniform_energy = sum(energy[c.name][(c.scheme, c.bits)] for c in free)
    plan = allocate(table_u, sizes, 4.0, method=method, energy=energy, energy_budget=0.5 * uniform_energy)
    assert (plan["m"].scheme, plan["m"].bits) == ("pot", 4)
    assert (plan["s"].scheme, plan["s"].bits) == ("uniform", 4)  # the cheap layer keeps its best Ω
    assert plan.meta["energy_total"] <= 0.5 * uniform_energy
    # and the estimate of the report is the search's cost of that plan, to the last digit
    assert estimate_energy(act, plan).quant_pj == pytest.approx(plan.meta["energy_total"], rel=1e-12)


def test_unreachable_energy_budget_names_the_range():
    act, table, sizes = _mac_tie()
    energy = candidate_energy(act, table)
    lo = min(energy["m"].values()) + min(energy["s"].values())
    hi = max(energy["m"].values()) + max(energy["s"].values())
    with pytest.raises(
        ValueError, match=r"energy_budget .* is unreachable: these candidates reach \["
    ) as err:
        allocate(table, sizes, 4.0, energy=energy, energy_budget=0.5 * lo)
    msg = str(err.value)
    assert "\n" not in msg and f"{lo:.6g}" in msg and f"{hi:.6g}" in msg
    for bad in (0, -1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="energy_budget"):
            allocate(table, sizes, 4.0, energy=energy, energy_budget=bad)
    with pytest.raises(ValueError, match="together"):
        allocate(table, sizes, 4.0, energy=energy)
    with pytest.raises(ValueError, match=r"energy\['m'\]"):
        allocate(table, sizes, 4.0, energy={"m": {}, "s": energy["s"]}, energy_budget=hi)


def test_energy_budget_unreachable_only_together_with_the_bit_budget():
    # the low-energy candidate needs many bits: either budget alone is reachable, both together are not
    table = {"a": {("uniform", 2): 1.0, ("uniform", 8): 0.0}}
    energy = {"a": {("uniform", 2): 5.0, ("uniform", 8): 1.0}}
    assert allocate(table, {"a": 1}, 2.0)["a"].bits == 2
    assert allocate(table, {"a": 1}, None, energy=energy, energy_budget=1.0)["a"].bits == 8
    for method in ("greedy", "milp"):
        with pytest.raises(
            ValueError,
            match=r"together with budget 2 average bits: .*lowest within 2 "
            r"average bits is 5",
        ) as err:
            allocate(table, {"a": 1}, 2.0, method=method, energy=energy, energy_budget=2.0)
        assert "\n" not in str(err.value)


@st.composite
def _problems(draw):
    n_layers = draw(st.integers(1, 4))
    cands = [("uniform", 2), ("uniform", 4), ("pot", 2), ("pot", 4), ("uniform", 8)]
    table, energy, sizes = {}, {}, {}
    for i in range(n_layers):
        chosen = draw(st.lists(st.sampled_from(cands), min_size=1, max_size=4, unique=True))
        table[f"l{i}"] = {c: draw(st.floats(0, 10)) for c in chosen}
        energy[f"l{i}"] = {c: draw(st.floats(0, 10)) for c in chosen}
        sizes[f"l{i}"] = draw(st.integers(1, 50))
    return table, energy, sizes, draw(st.floats(2, 8)), draw(st.floats(0.05, 1.0))


@settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(_problems())
def test_both_budgets_hold_and_milp_is_exact(problem):
    """Against brute force: every plan meets both budgets, MILP is optimal, greedy never beats it, and an
    error is raised exactly when no plan fits."""
    table, energy, sizes, budget, share = problem
    names = list(table)
    mono = hq_ptq.search.monotone_table(table)
    e_lo = sum(min(energy[n].values()) for n in names)
    e_hi = sum(max(energy[n].values()) for n in names)
    e_budget = e_lo + share * (e_hi - e_lo) + 1e-9
    total = sum(sizes.values())
    best = math.inf
    for combo in itertools.product(*(list(table[n]) for n in names)):
        bits_ok = sum(sizes[n] * c[1] for n, c in zip(names, combo)) <= math.floor((budget + 1e-9) * total)
        if bits_ok and sum(energy[n][c] for n, c in zip(names, combo)) <= e_budget * (1 + 1e-9):
            best = min(best, sum(mono[n][c] for n, c in zip(names, combo)))
    plans = {}
    for method in ("greedy", "milp"):
        try:
            plans[method] = allocate(
                table, sizes, budget, method=method, energy=energy, energy_budget=e_budget, check_milp=False
            )
        except ValueError as err:
            assert best == math.inf, err
            assert "unreachable" in str(err) and "\n" not in str(err)
            continue
        plan = plans[method]
        assert plan.avg_bits <= budget + 1e-9
        assert sum(energy[c.name][(c.scheme, c.bits)] for c in plan) <= e_budget * (1 + 1e-9)
    if best < math.inf:
        assert set(plans) == {"greedy", "milp"}
        assert plans["milp"].meta["omega_total"] == pytest.approx(best, abs=1e-6)
        assert plans["milp"].meta["omega_total"] <= plans["greedy"].meta["omega_total"] + 1e-9


# ---------------------------------------------------------------------------------------------
# quantize / search_plan
# ---------------------------------------------------------------------------------------------


def _batches(n=2, b=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, 1, 8, 8, generator=g), torch.randint(0, 4, (b,), generator=g)) for _ in range(n)]


CONFIG = QuantConfig(search=SearchConfig(metric="fisher", calib_batches=2), bn_recalibration_batches=0)


def test_search_plan_energy_budget_on_real_valued_layers():
    analysis = hq_ptq.analyze(small_cnn(), calib_data=_batches(), config=CONFIG)
    assert {a.kind for a in analysis.activity.values()} == {"mac"}  # a CNN's inputs are real
    bits_only = hq_ptq.search_plan(analysis, 4.0, CONFIG)
    assert 0 < bits_only.meta["energy_fraction"] <= 1
    target = 0.5 * bits_only.meta["energy_fraction"]
    plan = hq_ptq.search_plan(analysis, 4.0, CONFIG, energy_budget=target)
    assert plan.meta["energy_fraction"] <= target * (1 + 1e-9)
    assert plan.meta["energy_total"] == pytest.approx(plan.meta["energy_fraction"], rel=1e-9)
    assert plan.avg_bits <= 4.0 + 1e-9
    assert any(c.scheme == "pot" for c in plan)  # multiply → exponent add is what saves energy here
    with pytest.raises(ValueError, match=r"energy_budget 0.01 is unreachable: .*reach \["):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protection yields first, then the range is named
            hq_ptq.search_plan(analysis, 4.0, CONFIG, energy_budget=0.01)
    with pytest.raises(ValueError, match=r"fraction of the FP32 model's estimated energy in \(0, 1\]"):
        hq_ptq.search_plan(analysis, 4.0, CONFIG, energy_budget=20.0)


def test_quantize_energy_budget_end_to_end_and_errors():
    model = small_cnn()
    hq_ptq.quantize(model, 4.0, energy_budget=0.3, calib_data=_batches(), config=CONFIG)
    plan = hq_ptq.get_plan(model)
    assert plan.meta["energy_fraction"] <= 0.3 and plan.meta["energy_budget"] == 0.3
    model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="energy_budget needs calib_data"):
        hq_ptq.quantize(small_cnn(), 4.0, energy_budget=0.3, config=CONFIG)
    with pytest.raises(ValueError, match="energy_budget must be a fraction"):
        hq_ptq.quantize(small_cnn(), 4.0, energy_budget=0.0, calib_data=_batches(), config=CONFIG)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(16, 3)

    def forward(self, x, y):
        return self.head(torch.cat([self.a(x), self.b(y)], dim=-1))


def test_unmeasurable_model_keeps_bits_only_search_and_names_why():
    g = torch.Generator().manual_seed(0)
    data = [((torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)), torch.randint(0, 3, (6,)))]
    cfg = QuantConfig(search=SearchConfig(metric="fisher", calib_batches=1), bn_recalibration_batches=0)
    analysis = hq_ptq.analyze(_TwoInputs(), calib_data=data, config=cfg)
    assert analysis.activity is None and "one tensor" in analysis.activity_note
    assert "energy_fraction" not in hq_ptq.search_plan(analysis, 6.0, cfg).meta
    with pytest.raises(ValueError, match="could not be measured: the energy model needs inputs that are one"):
        hq_ptq.search_plan(analysis, 6.0, cfg, energy_budget=0.5)


# ---------------------------------------------------------------------------------------------
# Recipe, CLI and report
# ---------------------------------------------------------------------------------------------
def test_recipe_energy_budget_key(tmp_path, tiny_recipe):
    r = load_recipe(str(tiny_recipe(tmp_path / "e.toml", quant={"energy_budget": 0.25})))
    assert r.energy_budget == 0.25 and r.to_dict()["energy_budget"] == 0.25
    assert load_recipe(str(tiny_recipe(tmp_path / "n.toml"))).energy_budget is None
    with pytest.raises(ValueError, match=r"quant\.energy_budget must be a fraction"):
        load_recipe(str(tiny_recipe(tmp_path / "bad.toml", quant={"energy_budget": 2})))


runner = CliRunner()


def test_cli_run_and_quantize_with_energy_budget(tmp_path, trained_tiny_recipe):
    recipe = trained_tiny_recipe(tmp_path / "tiny.toml", train={"epochs": 1}, qat={"steps": 0})
    out = tmp_path / "run"
    # the tiny Spikformer's energy sits in its first (real-valued input) layer, protected at uniform 8:
    # a budget of 60% of FP32 makes protection yield it, and it goes power-of-two
    result = runner.invoke(
        app, ["run", str(recipe), "--out", str(out), "--no-export", "--energy-budget", "0.6"]
    )
    assert result.exit_code == 0, result.output
    assert "energy budget 60%" in result.output
    report = json.loads((out / "report.json").read_text())
    meta = report["plan"]["meta"]
    assert meta["energy_fraction"] <= 0.6 * (1 + 1e-9) and meta["energy_budget"] == 0.6
    assert "search's energy estimate" in (out / "report.md").read_text()

    bad = runner.invoke(app, ["run", str(recipe), "--out", str(out), "--energy-budget", "1.5"])
    assert bad.exit_code == 2 and "energy_budget must be a fraction" in bad.output

    # hq-ptq quantize takes the same flag into hq_ptq.quantize (covered above); a bad value fails first
    bad = runner.invoke(app, ["quantize", str(tmp_path / "fp.safetensors"), "--energy-budget", "0"])
    assert bad.exit_code == 2 and "energy_budget must be a fraction" in bad.output


def test_report_shows_energy_points_and_pot_layers(tmp_path):
    layers = (LayerChoice("stem", "pot", 4, 100, 0.1), LayerChoice("fc", "uniform", 4, 100, 0.1))
    plan = Plan(layers, budget=4.0, meta={"energy_fraction": 0.2, "energy_budget": 0.25})
    act = {"stem": _act("stem", "mac", params=100), "fc": _act("fc", "spike", params=100)}
    sweep = [
        {"label": "search @ 4", "kind": "hetero", "avg_bits": 4.0, "accuracy": 0.9, "energy_fraction": 0.2},
        {"label": "uniform 4-bit", "kind": "uniform", "avg_bits": 4.0, "accuracy": 0.8},
    ]
    write_report(
        tmp_path,
        plan=plan,
        results={"fp_accuracy": 0.95, "q_accuracy": 0.9},
        sweep=sweep,
        energy=estimate_energy(act, plan),
    )
    md = (tmp_path / "report.md").read_text()
    assert "energy (% of FP32)" in md and "| 20.00% |" in md and "| n/a |" in md
    assert (
        "power-of-two where it saves energy" in md and "`stem`" in md.split("saves energy")[1].split("\n")[0]
    )
    assert "energy budget 25%" in md
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"]["pot_saving_layers"] == ["stem"]
