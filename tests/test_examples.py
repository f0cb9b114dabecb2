"""The example scripts run end to end at tiny size and write what they say they write."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from hq_ptq.plan import Plan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_numbers(result: dict, budget: float) -> None:
    for key in ("float_accuracy", "quantized_accuracy"):
        assert 0.0 <= result[key] <= 1.0, (key, result[key])
    assert math.isfinite(result["avg_bits"]) and 2.0 <= result["avg_bits"] <= budget + 1e-9


def test_quantize_cnn_example_tiny(tmp_path, capsys):
    result = _load("quantize_cnn").main(tmp_path / "out", tiny=True)
    assert result["path"] == tmp_path / "out" / "cnn.hqpt.safetensors"
    assert result["path"].is_file() and result["path"].stat().st_size > 0
    _check_numbers(result, budget=3.0)
    printed = capsys.readouterr().out
    assert f"output folder: {tmp_path / 'out'}" in printed and f"saved {result['path']}" in printed


def test_quantize_snntorch_example_tiny(tmp_path, capsys):
    result = _load("quantize_snntorch_model").main(tmp_path, tiny=True)
    model_path, plan_path = result["paths"]
    assert (model_path, plan_path) == (tmp_path / "snn.hqpt.safetensors", tmp_path / "plan.json")
    assert model_path.is_file() and model_path.stat().st_size > 0
    plan = Plan.from_dict(json.loads(plan_path.read_text()))
    assert plan.avg_bits == pytest.approx(result["avg_bits"])
    _check_numbers(result, budget=3.5)
    assert f"output folder: {tmp_path}" in capsys.readouterr().out


def test_examples_default_to_a_fresh_temporary_folder(monkeypatch, tmp_path):
    # without an output folder the examples write under tempfile.mkdtemp, never a hard-coded path
    made = []

    def fake_mkdtemp(prefix=""):
        made.append(prefix)
        raise RuntimeError("stop after choosing the folder")

    for name in ("quantize_cnn", "quantize_snntorch_model"):
        module = _load(name)
        monkeypatch.setattr(module.tempfile, "mkdtemp", fake_mkdtemp)
        with pytest.raises(RuntimeError, match="stop after choosing"):
            module.main()
    assert len(made) == 2
    source = "".join((EXAMPLES / f"{n}.py").read_text() for n in ("quantize_cnn", "quantize_snntorch_model"))
    assert "/tmp/" not in source
