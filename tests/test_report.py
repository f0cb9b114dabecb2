"""Run report: files written atomically, strict JSON with plan and bottlenecks, real PNG plots."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from hq_ptq.energy import LayerActivity, estimate_energy
from hq_ptq.plan import LayerChoice, Plan
from hq_ptq.report import bottleneck_layers, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

LAYERS = (
    LayerChoice("stem.conv", "uniform", 8, 432, 2e-5),
    LayerChoice("blocks.0.attn.q", "pot", 3, 4096, 0.12),
    LayerChoice("blocks.0.attn.v", "uniform", 6, 4096, 0.031),
    LayerChoice("blocks.0.mlp.fc1", "pot", 2, 16384, 0.8),
    LayerChoice("blocks.0.mlp.fc2", "uniform", 3, 16384, 0.4),
    LayerChoice("head", "uniform", 8, 640, 1e-6),
)
PLAN = Plan(LAYERS, budget=3.5, method="greedy", meta={"omega_total": 1.35})
RESULTS = {"recipe": "digits-spikformer", "fp_accuracy": 0.95, "q_accuracy": 0.94, "ptq_accuracy": 0.9}
SWEEP = [
    {"label": "hetero@3", "kind": "hetero", "avg_bits": 3.0, "accuracy": 0.93},
    {"label": "hetero@3.5", "kind": "hetero", "avg_bits": 3.5, "accuracy": 0.94},
    {"label": "uniform 3", "kind": "uniform", "avg_bits": 3.0, "accuracy": 0.85},
    {"label": "uniform 4", "kind": "uniform", "avg_bits": 4.0, "accuracy": 0.92},
    {"label": "pot 3", "kind": "pot", "avg_bits": 3.0, "accuracy": 0.87},
]


def _energy():
    act = {
        c.name: LayerActivity(
            name=c.name, layer_type="Conv1d", params=c.params, macs=64.0 * c.params, steps=4.0, time_steps=4,
            rate=0.2, mean_abs=0.2, binary=c.name != "head", integer=c.name != "head", model_input=False,
        )
        for c in LAYERS
    }
    return estimate_energy(act, PLAN)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _strict_json(path: Path) -> dict:
    def no_nan(token: str):
        raise AssertionError(f"report.json holds {token}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_nan)


def test_full_report(tmp_path: Path):
    energy = _energy()
    sizes = {"fp32_bytes": 167_000, "packed_bytes": 21_000}
    paths = write_report(tmp_path / "run", plan=PLAN, results=RESULTS, sweep=SWEEP, energy=energy,
                         sizes=sizes)
    assert set(paths) == {"json", "md", "allocation", "pareto"}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "allocation.png", "pareto.png", "report.json", "report.md"]  # no temp files left behind

    for key in ("allocation", "pareto"):
        width, height = _png_size(paths[key])
        assert width > 300 and height > 200 and paths[key].stat().st_size > 10_000

    doc = _strict_json(paths["json"])
    assert Plan.from_dict(doc["plan"]).layers == PLAN.layers
    assert doc["bottlenecks"] == ["stem.conv", "blocks.0.attn.v", "head"] == bottleneck_layers(PLAN)
    s = doc["summary"]
    assert s["avg_bits"] == pytest.approx(PLAN.avg_bits)
    assert s["compression"] == pytest.approx(32 / PLAN.avg_bits)
    assert s["accuracy_drop"] == pytest.approx(0.01)
    assert s["layers_per_scheme"] == {"uniform": 4, "pot": 2}
    assert s["energy_ratio"] == pytest.approx(energy.ratio)
    assert doc["energy"]["totals"]["quant_pj"] == pytest.approx(energy.quant_pj)
    assert doc["results"] == RESULTS and doc["sizes"] == sizes and len(doc["sweep"]) == len(SWEEP)

    md = paths["md"].read_text(encoding="utf-8")
    assert "95.00%" in md and "94.00%" in md and f"{32 / PLAN.avg_bits:.2f}×" in md
    bottleneck_part = md.split("## Bottleneck layers")[1].split("##")[0]
    assert "`stem.conv`" in bottleneck_part and "`blocks.0.attn.v`" in bottleneck_part
    assert "fc1" not in bottleneck_part
    assert "![bit allocation](allocation.png)" in md and "pareto.png" in md
    assert md.count("| `") == len(LAYERS)  # one plan row per layer


def test_report_gives_operations_and_memory(tmp_path: Path):
    act = {
        c.name: LayerActivity(
            name=c.name, layer_type="Conv1d", params=c.params, macs=64.0 * c.params, steps=4.0, time_steps=4,
            rate=0.2, mean_abs=0.2, binary=c.name != "head", integer=c.name != "head", model_input=False,
        )
        for c in LAYERS
    }
    energy = estimate_energy(act, PLAN, neurons={"lif": 1000}, membrane_bits=16)
    paths = write_report(tmp_path, plan=PLAN, results=RESULTS, energy=energy)
    doc = _strict_json(paths["json"])
    ops = doc["energy"]["operations"]
    spikes = 0.2 * 64 * sum(c.params for c in LAYERS if c.name != "head")
    assert ops["fp32"]["Effective_ACs"] == pytest.approx(spikes)
    # the real-valued head is uniform: a float MAC in both columns, no shifts
    assert ops["quantized"]["Effective_MACs"] == ops["fp32"]["Effective_MACs"] == 64 * 640
    assert ops["quantized"]["shifts"] == 0
    assert ops["weight_memory_bits"] == {"fp32": 32 * PLAN.total_params, "quantized": PLAN.size_bits}
    assert ops["neuron_state_memory_bits"]["quant_bits"] == 16_000
    md = paths["md"].read_text(encoding="utf-8")
    table = md.split("## Operations and memory per inference")[1].split("##")[0]
    kbit = (32 * PLAN.total_params / 1e3, PLAN.size_bits / 1e3)
    assert f"| weight memory (kbit) | {kbit[0]:.4g} | {kbit[1]:.4g} |" in table
    assert "| neuron-state memory (kbit) | 32 | 16 |" in table
    assert f"| accumulates (Effective_ACs) | {spikes:.4g} | {spikes:.4g} |" in table
    assert f"| multiply-accumulates (Effective_MACs) | {64 * 640:.4g} | {64 * 640:.4g} |" in table
    assert "| shift-and-adds (power-of-two weights) | 0 | 0 |" in table
    # without a neuron count the row says so
    md = write_report(tmp_path / "b", plan=PLAN, results=RESULTS, energy=_energy())["md"].read_text("utf-8")
    assert "| neuron-state memory (kbit) | n/a | n/a |" in md


def test_minimal_report_with_unknown_scores(tmp_path: Path):
    # unknown sensitivities (NaN normalised to None, as get_plan gives them): still strict JSON and a plot
    plan = Plan(tuple(LayerChoice(c.name, c.scheme, 4, c.params, float("nan")) for c in LAYERS),
                method="manual")
    paths = write_report(tmp_path, plan=plan, results={})
    assert set(paths) == {"json", "md", "allocation"} and not (tmp_path / "pareto.png").exists()
    doc = _strict_json(paths["json"])
    assert doc["bottlenecks"] == [] and doc["energy"] is None and doc["sweep"] == []
    assert all(layer["sensitivity"] is None for layer in doc["plan"]["layers"])
    assert doc["summary"]["fp_accuracy"] is None
    assert _png_size(paths["allocation"])[0] > 300
    assert "None: the search put every layer below 6 bits" in paths["md"].read_text(encoding="utf-8")


def test_report_lists_dead_and_released_layers(tmp_path: Path):
    left = {"attn": {"type": "MultiheadAttention", "weights": 3072, "why": "..."}}
    plan = Plan(LAYERS, budget=3.5, meta={"dead_layers": ["fc1"], "released": ["head"], "float_layers": left})
    md = write_report(tmp_path, plan=plan, results={})["md"].read_text(encoding="utf-8")
    assert "- dead layers (trace zero on the calibration data, ranked least sensitive): `fc1`" in md
    assert ("- left float32 (a layer type hq_ptq does not quantize; not in the average bits): "
            "`attn` (MultiheadAttention, 3,072 weights)") in md
    assert "- protection released to reach the budget (searched like the other layers): `head`" in md
    plain = write_report(tmp_path / "b", plan=PLAN, results={})["md"].read_text(encoding="utf-8")
    assert "dead layers" not in plain and "released" not in plain and "left float32" not in plain


def test_rewriting_replaces_files(tmp_path: Path):
    write_report(tmp_path, plan=PLAN, results=RESULTS, sweep=SWEEP)
    other = dict(RESULTS, q_accuracy=0.5)
    paths = write_report(tmp_path, plan=PLAN, results=other)
    assert _strict_json(paths["json"])["summary"]["q_accuracy"] == 0.5
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="lacks key 'accuracy'"):
        bad = [{"label": "x", "kind": "pot", "avg_bits": 3}]
        write_report(tmp_path, plan=PLAN, results=RESULTS, sweep=bad)
    with pytest.raises(ValueError, match="fp_accuracy must be an accuracy fraction"):
        write_report(tmp_path, plan=PLAN, results={"fp_accuracy": 95.0})
    with pytest.raises(ValueError, match="Plan"):
        write_report(tmp_path, plan=PLAN.to_dict(), results=RESULTS)
    assert not list(tmp_path.iterdir())  # nothing half-written
