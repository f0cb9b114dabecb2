"""benchmarks/gpu_check.py (issue [J]'s prepared GPU check) in its --smoke mode: every part on the CPU at tiny
sizes, one JSON file; a failing part is recorded and the others still run; the time guard skips parts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _gpu_check():  # noqa: ANN202 - benchmarks/ is not a package
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():  # noqa: ANN201
    return _gpu_check()


@pytest.fixture(scope="module")
def smoke(gpu_check, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "smoke.json"
    assert gpu_check.main(["--smoke", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def test_smoke_json_has_every_part_with_numbers(smoke: dict) -> None:
    m = smoke["machine"]
    for key in ("date_utc", "torch", "cuda_version", "gpu_name", "cpu_count", "brevitas", "snntorch"):
        assert key in m, key
    assert m["torch"] == torch.__version__
    assert "gpu_check.py --smoke" in smoke["command"]
    assert smoke["settings"]["smoke"] and smoke["settings"]["ddp_backend"] == "gloo"
    parts = smoke["parts"]
    assert list(parts) == ["digits_cuda", "step", "ddp", "digits_cpu"]
    assert {name: p["status"] for name, p in parts.items()} == dict.fromkeys(parts, "ok"), parts

    # part 1: the digits recipe twice, the same settings, compared
    for name in ("digits_cuda", "digits_cpu"):
        r = parts[name]["result"]
        for key in ("fp_accuracy", "ptq_accuracy", "qat_accuracy", "avg_bits", "wall_s"):
            assert _number(r[key]), (name, key, r[key])
        assert 0 <= r["qat_accuracy"] <= 1 and 2 <= r["avg_bits"] <= 8
        assert "qat.steps=1" in r["overrides"]
    assert parts["digits_cpu"]["result"]["overrides"][0] == "quant.device=cpu"
    digits = smoke["summary"]["digits"]
    assert all(_number(v) for v in digits["abs_diff_points"].values()), digits
    assert isinstance(digits["qat_within_goal"], bool) and digits["same_settings"] is True

    # part 2: every backend x precision x model, the HVP, and the ratios against the goals
    step = parts["step"]["result"]
    rows = step["rows"]
    assert len(rows) == 2 * 2 * 2 + 2  # train rows, the HVP, the Fisher analysis
    assert all(_number(r["ms"]) and r["ms"] > 0 for r in rows), rows
    assert {r["resolved_backend"] for r in rows} == {"fused", "snntorch"}
    assert [r["part"] for r in rows][-2:] == ["hvp", "fisher"]
    goals = smoke["summary"]["step"]
    configs = {"fused/fp32", "fused/bf16", "snntorch/fp32", "snntorch/bf16"}
    assert set(goals["qat_step_ms"]["by_config"]) == configs
    assert _number(goals["qat_step_ms"]["best"]["ratio_to_goal"])
    assert all(_number(v["ratio"]) for v in goals["fake_quant_overhead"]["by_config"].values())
    assert _number(goals["hvp_over_step"]["ratio"]) and _number(goals["hvp_over_step"]["hvp_ms"])
    assert step["quant"]["layers"] > 0 and step["quant"]["bits"] == 4

    # part 3: DDP over gloo, one process
    ddp = parts["ddp"]["result"]
    assert ddp["ok"] and ddp["backend"] == "gloo" and ddp["world_size"] == 1
    assert all(_number(v) for v in ddp["losses"])
    assert smoke["summary"]["ddp_ok"] is True and smoke["summary"]["errors"] == {}


def test_a_failing_part_is_recorded_and_the_others_run(gpu_check, tmp_path: Path) -> None:
    out = tmp_path / "fail.json"
    argv = ["--smoke", "--out", str(out), "--parts", "digits_cuda,step,ddp", "--fail-part", "digits_cuda",
            "--backends", "fused,nope", "--precisions", "fp32"]
    assert gpu_check.main(argv) == 0
    doc = json.loads(out.read_text())
    parts = doc["parts"]
    assert parts["digits_cuda"]["status"] == "error"
    assert "forced failure" in parts["digits_cuda"]["error"]
    assert "Traceback" in parts["digits_cuda"]["traceback"]
    assert doc["summary"]["errors"] == {"digits_cuda": parts["digits_cuda"]["error"]}
    # a failing configuration inside the step part is one row's error; the other rows are measured
    assert parts["step"]["status"] == "ok"
    rows = {(r["part"], r["backend"], r["model"]): r for r in parts["step"]["result"]["rows"]}
    assert "not a LIF backend" in rows[("train", "nope", "float")]["error"]
    assert all(_number(rows[k]["ms"]) for k in rows if k[1] == "fused"), rows
    assert set(doc["summary"]["step_rows_missing"]) == {"train/nope/fp32/float", "train/nope/fp32/quant"}
    assert parts["ddp"]["status"] == "ok" and doc["summary"]["ddp_ok"] is True


def test_time_guard_skips_parts_not_started(gpu_check, tmp_path: Path) -> None:
    out = tmp_path / "guard.json"
    assert gpu_check.main(["--smoke", "--out", str(out), "--parts", "ddp,step", "--budget-s", "0"]) == 0
    doc = json.loads(out.read_text())
    assert [p["status"] for p in doc["parts"].values()] == ["skipped", "skipped"]
    assert all("--budget-s 0" in reason for reason in doc["summary"]["skipped"].values())


def test_cpu_reference_is_read_and_its_settings_reused(gpu_check, smoke: dict, tmp_path: Path) -> None:
    ref_path = tmp_path / "reference.json"
    ref_path.write_text(json.dumps(smoke))
    ref = gpu_check.read_cpu_reference(ref_path)
    assert ref["source"] == "reference"
    assert ref["qat_accuracy"] == smoke["parts"]["digits_cpu"]["result"]["qat_accuracy"]
    # without --qat-steps/--set the device run takes the reference's settings, so the two compare
    args = gpu_check.parse_args(["--cpu-reference", str(ref_path)])
    s = gpu_check.make_settings(args, ref)
    assert gpu_check.shared_overrides(s) == ref["shared_overrides"] and s.device == "cuda" and s.T == 16
    cmp = gpu_check.compare_digits(smoke["parts"]["digits_cuda"]["result"], ref, s)
    assert cmp["cpu_source"] == "reference" and cmp["same_settings"] is True
    # an explicit --qat-steps that differs is flagged
    args2 = gpu_check.parse_args(["--cpu-reference", str(ref_path), "--qat-steps", "7"])
    s2 = gpu_check.make_settings(args2, ref)
    dev2 = {**smoke["parts"]["digits_cuda"]["result"], "shared_overrides": gpu_check.shared_overrides(s2)}
    assert gpu_check.compare_digits(dev2, ref, s2)["same_settings"] is False
    # an `hq-ptq run` result.json works too
    run = tmp_path / "result.json"
    run.write_text(json.dumps({"q_accuracy": 0.99, "fp_accuracy": 0.99, "ptq_accuracy": 0.98, "avg_bits": 3.5,
                               "plan": {"layers": [{"name": "a", "scheme": "pot", "bits": 3}]},
                               "recipe_config": {"quant": {"qat": {"steps": 150}}}}))
    ref2 = gpu_check.read_cpu_reference(run)
    assert ref2["qat_steps"] == 150 and ref2["plan"] == [["a", "pot", 3]]
    assert gpu_check.make_settings(gpu_check.parse_args([]), ref2).qat_steps == 150
    # a gpu_check JSON whose digits_cpu failed is refused
    bad = {**smoke, "parts": {"digits_cpu": {"status": "error", "error": "x"}}}
    ref_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="digits_cpu part is error"):
        gpu_check.read_cpu_reference(ref_path)


def test_without_cuda_the_full_check_says_so(gpu_check, tmp_path: Path) -> None:
    out = tmp_path / "nocuda.json"
    rc = gpu_check.main(["--out", str(out), "--parts", "ddp"])
    doc = json.loads(out.read_text())
    if torch.cuda.is_available():  # a GPU machine runs the NCCL smoke test itself
        assert rc == 0 and doc["parts"]["ddp"]["result"]["backend"] == "nccl"
    else:
        assert rc == 2 and "no CUDA device" in doc["error"]
