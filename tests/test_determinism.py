"""Determinism: one seed fixes the sensitivity samples, the search and QAT, so ``hq-ptq run`` twice gives the
same plan, metrics and weights; another seed gives other samples. (Data generation is seeded separately, by
the dataset's own options: see test_data.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import hq_ptq
from hq_ptq.cli import app

runner = CliRunner()

TIMINGS = ("greedy_seconds", "milp_seconds")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, trained_tiny_recipe) -> Path:
    return trained_tiny_recipe(
        tmp_path_factory.mktemp("determinism") / "tiny.toml",
        train={"shift_augment": 1},
        quant={"budget": 3.5, "seed": 11},
        search={"metric": "hessian", "calib_batches": 2, "hutchinson_probes": 10},
        qat={"steps": 6, "lr": 1e-3},
    )


def _run(recipe: Path, out: Path, *overrides: str) -> dict:
    args = ["run", str(recipe), "--out", str(out), "--no-export"]
    for item in overrides:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "result.json").read_text())
    for key in TIMINGS:
        doc["plan"]["meta"].pop(key, None)
    doc.pop("seconds")
    doc.pop("out_dir")
    return doc


def test_run_twice_gives_identical_plans_metrics_and_weights(recipe, tmp_path):
    first, second = _run(recipe, tmp_path / "a"), _run(recipe, tmp_path / "b")  # no shared cache
    assert first == second  # plan (choices, Ω, traces), accuracies, recipe echo
    ma, mb = (hq_ptq.load(tmp_path / d / "model.hqpt.safetensors") for d in "ab")
    sa, sb = ma.state_dict(), mb.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    other = _run(recipe, tmp_path / "c", "quant.seed=12")
    traces, other_traces = first["plan"]["meta"]["traces"], other["plan"]["meta"]["traces"]
    assert traces.keys() == other_traces.keys() and traces != other_traces  # the seed drives the probes
    sc = hq_ptq.load(tmp_path / "c" / "model.hqpt.safetensors").state_dict()
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)  # and QAT
