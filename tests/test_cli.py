"""Every CLI command through typer's CliRunner on a tiny recipe, bad input included."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hq_ptq.cli import app

runner = CliRunner()

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_recipe):
    root = tmp_path_factory.mktemp("cli")
    recipe = tiny_recipe(root / "tiny.toml", train={"epochs": 4})
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    return root, recipe


def test_recipes_lists_shipped_recipe():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0
    assert "digits-spikformer" in result.output


def test_run_writes_report_and_artifacts(tiny):
    root, recipe = tiny
    out = root / "run"
    result = runner.invoke(app, ["run", str(recipe), "--out", str(out), "--set", "qat.steps=1",
                                 "--set", "quant.integer_bits=[16, 6]"])
    assert result.exit_code == 0, result.output
    assert "average bits" in result.output
    for name in (
        "plan.json",
        "result.json",
        "report.json",
        "report.md",
        "allocation.png",
        "model.hqpt.safetensors",
        "model.qonnx.onnx",
        "model.ort.onnx",
        "export_checks.json",
    ):
        assert (out / name).is_file(), name
    checks = json.loads((out / "export_checks.json").read_text())
    assert checks["qonnx"]["spike_mismatches"] == 0 and checks["ort"]["max_abs_logit_error"] < 1e-5
    report = json.loads((out / "report.json").read_text())
    assert report["plan"]["avg_bits"] <= 4.0 + 1e-9
    integer = report["results"]["integer"]  # the integer-only twin, next to the fake-quant accuracy
    assert [w["membrane_bits"] for w in integer["widths"]] == [16, 6]
    assert integer["fake_accuracy"] == pytest.approx(report["summary"]["q_accuracy"])
    assert "integer-only, 16-bit membranes" in (out / "report.md").read_text()
    assert (out / "allocation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    inspected = runner.invoke(app, ["inspect", str(out / "model.hqpt.safetensors")])
    assert inspected.exit_code == 0, inspected.output
    assert "compression vs FP32" in inspected.output

    for runtime, mode in (("onnxruntime", "step"), ("qonnx", "unrolled")):
        onnx_path = out / f"model-{mode}.onnx"
        exported = runner.invoke(
            app,
            [
                "export",
                str(out / "model.hqpt.safetensors"),
                "--out",
                str(onnx_path),
                "--runtime",
                runtime,
                "--mode",
                mode,
                "--T",
                "2",
            ],
        )
        assert exported.exit_code == 0, exported.output
        assert onnx_path.is_file() and "spike mismatches 0 of" in " ".join(exported.output.split())
    bad = runner.invoke(app, ["export", str(out / "model.hqpt.safetensors"), "--mode", "sideways"])
    assert bad.exit_code == 2 and "mode" in bad.output

    int_path = out / "model.int.safetensors"
    exported = runner.invoke(app, ["export", str(out / "model.hqpt.safetensors"), "--integer", "--T", "2",
                                   "--membrane-bits", "12"])
    assert exported.exit_code == 0, exported.output
    assert "reproduces every output bit for bit" in " ".join(exported.output.split())
    assert (out / "model.int.onnx").is_file() and "integer QONNX graph" in " ".join(exported.output.split())
    from safetensors import safe_open

    with safe_open(str(int_path), "pt") as f:
        assert json.loads(f.metadata()["layers"]) and f.metadata()["membrane_bits"] == "12"
        assert all(not f.get_tensor(k).is_floating_point() for k in f.keys())  # integers only


def test_quantize_checkpoint(tiny):
    root, _ = tiny
    out = root / "q.hqpt.safetensors"
    result = runner.invoke(
        app,
        [
            "quantize",
            str(root / "fp.safetensors"),
            "--budget",
            "3.5",
            "--out",
            str(out),
            "--qat-steps",
            "0",
            "--metric",
            "data_free",
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.is_file()


def test_sweep_writes_pareto(tiny):
    root, recipe = tiny
    out = root / "sweep"
    result = runner.invoke(
        app, ["sweep", str(recipe), "--budgets", "4,3", "--out", str(out), "--set", "qat.steps=1"]
    )
    assert result.exit_code == 0, result.output
    entries = json.loads((out / "sweep.json").read_text())
    kinds = {e["kind"] for e in entries}
    assert {"hetero", "uniform", "pot"} <= kinds
    assert all(e["avg_bits"] <= e["budget"] + 1e-9 for e in entries if e["kind"] == "hetero")
    assert (out / "pareto.png").is_file()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["run", "no-such-recipe"], "no recipe named"),
        (["run", "digits-spikformer", "--set", "trian.epochs=1"], "did you mean train"),
        (["run", "digits-spikformer", "--set", "search.metric=magic"], "search.metric must be one of"),
        (["inspect", "missing.safetensors"], "error:"),
        (["quantize", "missing.safetensors"], "no checkpoint at"),
        (["sweep", "digits-spikformer", "--budgets", "4,x"], "--budgets must be numbers"),
        (["run", "digits-spikformer", "--model", "nosuch_xyz:build"], "no module named 'nosuch_xyz'"),
        (["run", "digits-spikformer", "--model", "json:dumsp"], "json has no attribute 'dumsp'"),
        (["quantize", "missing.safetensors", "--model", "json:loads"], "needs --data package.module:"),
        (["quantize", "missing.safetensors", "--loss", "json"], "--loss must be 'package.module:function'"),
        (["export", "missing.safetensors", "--data", "digits"], "--data takes package.module:function"),
        (["inspect", "missing.safetensors", "--model", "json:loads"], "error:"),
    ],
)
def test_user_errors_are_one_line(args, fragment):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_unreachable_budget_is_a_user_error(tiny):
    _, recipe = tiny
    result = runner.invoke(app, ["run", str(recipe), "--budget", "1.5", "--out", str(tiny[0] / "bad")])
    assert result.exit_code == 2, result.output
    assert "unreachable" in result.output
