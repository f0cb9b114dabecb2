"""benchmarks/gpu_check.py (issue [J]'s prepared GPU check) in its --smoke mode: every part and step row on
the CPU at tiny sizes, one JSON file; a failing part is recorded and the others still run; the time guard
skips parts that are late or expected to overrun; the JSON keeps the rows measured before a kill; Fisher
fallbacks and the TF32 settings are recorded."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch

from hq_ptq.distributed import default_backend

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


def _smoke_settings(gpu_check, *extra: str):  # noqa: ANN202
    return gpu_check.make_settings(gpu_check.parse_args(["--smoke", *extra]), None)


def test_smoke_json_has_every_part_with_numbers(gpu_check, smoke: dict) -> None:
    m = smoke["machine"]
    for key in ("date_utc", "torch", "cuda_version", "gpu_name", "cpu_count", "brevitas", "snntorch", "tf32"):
        assert key in m, key
    assert m["torch"] == torch.__version__
    assert isinstance(m["tf32"]["tf32_convolutions"], bool) and "cudnn.allow_tf32" in m["tf32"]
    assert "gpu_check.py --smoke" in smoke["command"]
    assert smoke["settings"]["smoke"] and smoke["settings"]["ddp_backend"] == default_backend()
    assert smoke["settings"]["estimates"] == gpu_check.SMOKE_ESTIMATE_S
    assert _number(smoke["prepare"]["digits_data_s"]) and smoke["prepare"]["digits_batches"]["train"] > 0
    parts = smoke["parts"]
    assert list(parts) == ["digits_cuda", "step", "ddp", "digits_cpu"]
    assert {name: p["status"] for name, p in parts.items()} == dict.fromkeys(parts, "ok"), parts
    assert all(_number(p["seconds"]) and _number(p["estimate_s"]) for p in parts.values())

    # part 1: the digits recipe twice, the same settings and split, compared; the Fisher log is recorded
    for name in ("digits_cuda", "digits_cpu"):
        r = parts[name]["result"]
        for key in ("fp_accuracy", "ptq_accuracy", "qat_accuracy", "avg_bits", "wall_s"):
            assert _number(r[key]), (name, key, r[key])
        assert 0 <= r["qat_accuracy"] <= 1 and 2 <= r["avg_bits"] <= 8
        assert "qat.steps=1" in r["overrides"]
        assert r["fisher_log"] == [] and len(r["split_digest"]) == 16
    assert parts["digits_cpu"]["result"]["overrides"][0] == "quant.device=cpu"
    digits = smoke["summary"]["digits"]
    assert all(_number(v) for v in digits["abs_diff_points"].values()), digits
    assert isinstance(digits["qat_within_goal"], bool) and digits["same_settings"] is True
    assert digits["same_split"] is True

    # part 2: every backend x precision x model, the real QAT step, the HVPs, the Fisher analysis
    step = parts["step"]["result"]
    rows = step["rows"]
    keys = [(r["part"], r["backend"], r["precision"], r["model"]) for r in rows]
    train = [("train", b, p, k)
             for b in ("fused", "snntorch") for p in ("fp32", "bf16") for k in ("float", "quant")]
    assert keys == [*train, ("qat", "fused", "fp32", "quant"), ("hvp", "fused", "fp32", "float"),
                    ("hvp", "snntorch", "fp32", "float"), ("hvp", "fused", "bf16", "float"),
                    ("fisher", "fused", "fp32", "float")]
    assert all(_number(r["ms"]) and r["ms"] > 0 and _number(r["seconds"]) for r in rows), rows
    assert all(r["what"] == gpu_check.WHAT[r["part"]] for r in rows)
    assert "no teacher forward" in gpu_check.WHAT["train"] and "hq_ptq.qat.finetune" in gpu_check.WHAT["qat"]
    # on the CPU no TF32: the fp32 rows say plain fp32
    assert {r["label"] for r in rows} == {"fp32", "bf16 autocast"}
    assert {r["resolved_backend"] for r in rows} >= {"fused", "snntorch"}
    qat = rows[8]
    assert qat["repeats"] == 1 and math.isfinite(qat["final_loss"]) and qat["resolved_backend"]
    assert rows[-1]["fisher_log"] == [] and smoke["summary"]["fisher_fallbacks"] == {}
    goals = smoke["summary"]["step"]
    configs = {"fused/fp32", "fused/bf16", "snntorch/fp32", "snntorch/bf16"}
    q = goals["qat_step_ms"]
    assert set(q["train_step_quant"]) == configs and set(q["by_config"]) == {"fused/fp32"}
    assert q["best"]["source"] == "qat" and q["best"]["ms"] == qat["ms"]
    assert _number(q["best"]["ratio_to_goal"])
    assert all(_number(v["ratio"]) for v in goals["fake_quant_overhead"]["by_config"].values())
    hvp = goals["hvp_over_step"]
    assert _number(hvp["ratio"]) and _number(hvp["hvp_ms"]) and _number(hvp["ratio_to_qat_fp32_fused_step"])
    assert set(hvp["by_config"]) == {"fused/fp32", "snntorch/fp32", "fused/bf16"}
    assert set(goals["fused_speedup_over_snntorch"]) == {
        "train/fp32/float", "train/fp32/quant", "train/bf16/float", "train/bf16/quant", "hvp/fp32/float"}
    assert step["quant"]["layers"] > 0 and step["quant"]["bits"] == 4

    # part 3: DDP through the library's backend choice, one process, with the CPU collectives
    ddp = parts["ddp"]["result"]
    assert ddp["ok"] and ddp["default_backend"] == default_backend() and ddp["world_size"] == 1
    assert ddp["cpu_float64_all_reduce_ok"] and ddp["all_gather_object_ok"] and ddp["swapped_on"] == "cpu"
    assert all(_number(v) for v in ddp["losses"]) and ddp["process"] == "child"
    assert smoke["summary"]["ddp_ok"] is True and smoke["summary"]["errors"] == {}


def test_a_failing_part_is_recorded_and_the_others_run(gpu_check, tmp_path: Path) -> None:
    out = tmp_path / "fail.json"
    argv = ["--smoke", "--out", str(out), "--parts", "digits_cuda,step", "--fail-part", "digits_cuda",
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
    assert "not a LIF backend" in rows[("hvp", "nope", "float")]["error"]
    assert all(_number(rows[k]["ms"]) for k in rows if k[1] == "fused"), rows
    assert set(doc["summary"]["step_rows_missing"]) == {
        "train/nope/fp32/float", "train/nope/fp32/quant", "hvp/nope/fp32/float"}


def test_time_guard_skips_parts_not_started(gpu_check, tmp_path: Path) -> None:
    out = tmp_path / "guard.json"
    assert gpu_check.main(["--smoke", "--out", str(out), "--parts", "ddp,step", "--budget-s", "0"]) == 0
    doc = json.loads(out.read_text())
    assert [p["status"] for p in doc["parts"].values()] == ["skipped", "skipped"]
    assert all("--budget-s 0" in reason for reason in doc["summary"]["skipped"].values())


def test_time_guard_skips_a_part_expected_to_overrun(gpu_check, smoke: dict, tmp_path: Path) -> None:
    guard = gpu_check.TimeGuard(100.0)
    assert guard.reason() is None and guard.reason(expected=90.0) is None
    assert "~101 s expected > --budget-s 100" in guard.reason(expected=101.0)
    assert gpu_check.parse_args(["--estimate", "step=5"]).estimate == {"step": 5.0}
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--estimate", "nope=5"])
    # reading a CPU reference (expected 0 s) fits the budget; step, expected to take 1000 s, is not started
    ref = tmp_path / "reference.json"
    ref.write_text(json.dumps(smoke))
    out = tmp_path / "estimate.json"
    argv = ["--smoke", "--out", str(out), "--parts", "digits_cpu,step", "--cpu-reference", str(ref),
            "--budget-s", "300", "--estimate", "step=1000"]
    assert gpu_check.main(argv) == 0
    doc = json.loads(out.read_text())
    cpu = doc["parts"]["digits_cpu"]
    assert cpu["status"] == "ok" and cpu["estimate_s"] == 0 and cpu["result"]["source"] == "reference"
    assert "digits_data_s" not in doc["prepare"]  # no digits run here: no data cache to warm
    step = doc["parts"]["step"]
    assert step["status"] == "skipped" and step["estimate_s"] == 1000.0
    assert "~1000 s expected > --budget-s 300" in step["reason"] and "step" in doc["summary"]["skipped"]
    assert doc["settings"]["estimates"]["step"] == 1000.0 and gpu_check.PART_ESTIMATE_S["step"] == 90.0


def test_a_hanging_ddp_process_is_killed_and_recorded(gpu_check) -> None:
    s = _smoke_settings(gpu_check)
    with pytest.raises(RuntimeError, match=r"the DDP process did not finish within 0.5 s \(killed\)"):
        gpu_check.ddp_isolated(s, timeout_s=0.5)  # far less than importing torch takes


def test_step_rows_are_published_one_by_one_and_guarded_by_the_longest(gpu_check) -> None:
    class FirstRowOnly:  # there is time for work of unknown length only: every row after the first is late
        def reason(self, expected: float = 0.0) -> str | None:
            return f"late (~{expected:.2f} s expected)" if expected > 0 else None

    s = _smoke_settings(gpu_check, "--backends", "fused", "--precisions", "fp32")
    seen: list[list[str]] = []
    result = gpu_check.step_rows(
        s, FirstRowOnly(), on_row=lambda r: seen.append([x["part"] for x in r["rows"]])
    )
    parts = ["train", "train", "qat", "hvp", "fisher"]
    assert seen == [parts[: i + 1] for i in range(len(parts))]  # the rows so far after each row
    rows = result["rows"]
    assert _number(rows[0]["ms"]) and all("ms" not in r for r in rows[1:])
    assert all(r["skipped"] == f"late (~{rows[0]['seconds']:.2f} s expected)" for r in rows[1:])


def test_a_killed_run_keeps_the_step_rows_measured(gpu_check, tmp_path: Path, monkeypatch) -> None:
    measure, calls = gpu_check.measure, []

    def killed_at_the_third(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a timeout's SIGTERM/SIGKILL would end the process here
        return measure(*args, **kwargs)

    monkeypatch.setattr(gpu_check, "measure", killed_at_the_third)
    out = tmp_path / "killed.json"
    argv = ["--smoke", "--out", str(out), "--parts", "step,ddp", "--backends", "fused",
            "--precisions", "fp32"]
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(argv)
    doc = json.loads(out.read_text())
    assert list(doc["parts"]) == ["step"] and doc["parts"]["step"]["status"] == "running"
    assert doc["parts"]["step"]["estimate_s"] == gpu_check.SMOKE_ESTIMATE_S["step"]
    rows = doc["parts"]["step"]["result"]["rows"]
    # the two train rows were measured and written; the QAT row (no measure call) too
    assert [(r["part"], r["model"]) for r in rows] == [
        ("train", "float"), ("train", "quant"), ("qat", "quant")]
    assert all(_number(r["ms"]) for r in rows)
    assert doc["summary"]["status"] == {"step": "running"}
    assert doc["summary"]["step"]["fake_quant_overhead"]["by_config"]["fused/fp32"]["ratio"] > 0


def test_fisher_fallbacks_are_recorded(gpu_check, tmp_path: Path, monkeypatch) -> None:
    import hq_ptq.sensitivity as sensitivity

    # the handler keeps "fisher:" messages only, counted, and leaves the logger as it found it
    logger = logging.getLogger("hq_ptq")
    level = logger.level
    with gpu_check.fisher_log() as log:
        logging.getLogger("hq_ptq.sensitivity").debug("fisher: fell back (%s)", "why")
        logging.getLogger("hq_ptq.sensitivity").debug("fisher: fell back (%s)", "why")
        logging.getLogger("hq_ptq.qat").info("QAT steps 0..1")
    assert log.messages() == [{"level": "DEBUG", "logger": "hq_ptq.sensitivity",
                               "message": "fisher: fell back (why)", "count": 2}]
    assert logger.level == level and log not in logger.handlers

    # a one-pass failure: the runs fall back to the micro-batch split, and the JSON says so
    monkeypatch.setattr(sensitivity, "_one_pass", lambda *a, **k: "forced by the test")
    out = tmp_path / "fallback.json"
    argv = ["--smoke", "--out", str(out), "--parts", "digits_cuda,step", "--backends", "fused",
            "--precisions", "fp32"]
    assert gpu_check.main(argv) == 0
    doc = json.loads(out.read_text())
    assert {p["status"] for p in doc["parts"].values()} == {"ok"}
    fisher_row = doc["parts"]["step"]["result"]["rows"][-1]
    assert fisher_row["part"] == "fisher" and _number(fisher_row["ms"])
    for found in (fisher_row["fisher_log"], doc["parts"]["digits_cuda"]["result"]["fisher_log"]):
        assert any(m["message"].startswith("fisher: no one-pass per-sample gradients (forced by the test)")
                   for m in found), found
    assert set(doc["summary"]["fisher_fallbacks"]) == {"digits_cuda", "step/fisher/fused/fp32"}


def test_tf32_settings_and_labels(gpu_check, monkeypatch) -> None:
    settings = gpu_check.tf32_settings()
    assert settings["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert settings["cudnn.allow_tf32"] in (True, False) or "unreadable" in str(settings["cudnn.allow_tf32"])
    conv = gpu_check.tf32_convolutions
    assert conv({"cudnn.conv.fp32_precision": "tf32", "cudnn.allow_tf32": False}) is True
    assert conv({"cudnn.conv.fp32_precision": "none", "cudnn.fp32_precision": "ieee",
                 "cudnn.allow_tf32": True}) is False
    assert conv({"cudnn.conv.fp32_precision": "none", "fp32_precision": "none", "cudnn.allow_tf32": True})
    assert conv({"cudnn.allow_tf32": False}) is False
    label = gpu_check.precision_label
    assert label("fp32", "cpu") == "fp32" and label("bf16", "cuda") == "bf16 autocast"
    monkeypatch.setattr(gpu_check, "tf32_convolutions", lambda settings=None: True)
    assert label("fp32", "cuda") == "fp32 (TF32 convolutions)" and label("fp32", "cpu") == "fp32"
    monkeypatch.setattr(gpu_check, "tf32_convolutions", lambda settings=None: False)
    assert label("fp32", "cuda:0") == "fp32"


def test_the_docstring_gives_the_device_command(gpu_check) -> None:
    doc = gpu_check.__doc__
    for needed in ("budget_left_s", "L - 150", "T - 120", "PYTHONUNBUFFERED=1", "--budget-s B",
                   "tests/test_device.py tests/test_lif.py -k cuda", "$OUT/cuda_tests.log",
                   "onnxruntime-gpu", "CUDA-provider branch"):
        assert needed in doc, needed
    download = doc.split("-d .whl", 1)[1].split("\n\n", 1)[0]
    assert "brevitas==0.13.4" in download and "snntorch==1.0.0" in download
    for carried_by_the_image in ("scikit-learn", "joblib", "threadpoolctl", "narwhals", "cloudpickle"):
        assert carried_by_the_image not in download


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
    assert cmp["cpu_source"] == "reference" and cmp["same_settings"] is True and cmp["same_split"] is True
    # an explicit --qat-steps that differs is flagged, and so is another split
    args2 = gpu_check.parse_args(["--cpu-reference", str(ref_path), "--qat-steps", "7"])
    s2 = gpu_check.make_settings(args2, ref)
    dev2 = {**smoke["parts"]["digits_cuda"]["result"], "shared_overrides": gpu_check.shared_overrides(s2),
            "split_digest": "0" * 16}
    cmp2 = gpu_check.compare_digits(dev2, ref, s2)
    assert cmp2["same_settings"] is False and cmp2["same_split"] is False
    # an `hq-ptq run` result.json works too
    run = tmp_path / "result.json"
    run.write_text(json.dumps({"q_accuracy": 0.99, "fp_accuracy": 0.99, "ptq_accuracy": 0.98, "avg_bits": 3.5,
                               "plan": {"layers": [{"name": "a", "scheme": "pot", "bits": 3}]},
                               "recipe_config": {"quant": {"qat": {"steps": 150}}}}))
    ref2 = gpu_check.read_cpu_reference(run)
    assert ref2["qat_steps"] == 150 and ref2["plan"] == [["a", "pot", 3]]
    assert gpu_check.make_settings(gpu_check.parse_args([]), ref2).qat_steps == 150
    assert gpu_check.compare_digits(dev2, ref2, s2)["same_split"] is None  # it records no split
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
        ddp = doc["parts"]["ddp"]["result"]
        assert rc == 0 and ddp["ok"] and "nccl" in ddp["backend"] and ddp["swapped_on"] == "cuda:0"
    else:
        assert rc == 2 and "no CUDA device" in doc["error"]
