"""Nothing lost: a run killed (SIGKILL) during QAT resumes from its checkpoint and sensitivity cache to the
very result of an uninterrupted run; every artifact is written atomically."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import hq_ptq
from hq_ptq.cli import app
from hq_ptq.files import atomic_write, atomic_write_text
from hq_ptq.pipeline import QAT_CHECKPOINT

runner = CliRunner()

STEPS, EVERY = 16, 4
@pytest.fixture(scope="module")
def recipe(tmp_path_factory, trained_tiny_recipe) -> Path:
    return trained_tiny_recipe(
        tmp_path_factory.mktemp("resume") / "tiny.toml",
        train={"shift_augment": 1},
        quant={"seed": 3},
        search={"metric": "hessian", "calib_batches": 2, "hutchinson_probes": 8},
        qat={"steps": STEPS, "checkpoint_every": EVERY, "lr": 1e-3, "ema_decay": 0.5},
    )


def _cache_files(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "cache").iterdir()}


def _kill_during_qat(recipe: Path, out: Path) -> int:
    """Start ``python -m hq_ptq run``, SIGKILL it once its first QAT checkpoint exists; the step saved."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HQ_PTQ_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "hq_ptq", "run", str(recipe), "--out", str(out), "--no-export"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = out / QAT_CHECKPOINT
    deadline = time.monotonic() + 300
    try:
        while not checkpoint.exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode()
                raise AssertionError(f"the run ended before its first checkpoint: {err}")
            if time.monotonic() > deadline:
                raise AssertionError("no QAT checkpoint within 300 s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return int(torch.load(checkpoint, weights_only=True)["step"])


def test_killed_run_resumes_to_the_uninterrupted_result(recipe, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    # --resume without a checkpoint simply runs from the start: this is the uninterrupted reference
    done = runner.invoke(app, ["run", str(recipe), "--out", str(ref), "--no-export", "--resume"])
    assert done.exit_code == 0, done.output
    assert "resumed" not in done.output

    step = _kill_during_qat(recipe, out)
    assert 0 < step < STEPS and step % EVERY == 0
    assert not (out / "result.json").exists()  # killed inside QAT, before any result
    cache = _cache_files(out)
    assert len(cache) == 1  # the sensitivity cache survived the kill

    resumed = runner.invoke(app, ["run", str(recipe), "--out", str(out), "--no-export", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"QAT continued from step {step}" in resumed.output
    assert _cache_files(out) == cache  # reused, not recomputed

    a, b = (json.loads((d / "result.json").read_text()) for d in (ref, out))
    assert b["qat_resumed_from"] == step and a["qat_resumed_from"] == 0
    for key in ("fp_accuracy", "ptq_accuracy", "q_accuracy"):
        assert a[key] == b[key], key
    strip = ("greedy_seconds", "milp_seconds")
    plan_a, plan_b = ({**r["plan"], "meta": {k: v for k, v in r["plan"]["meta"].items() if k not in strip}}
                      for r in (a, b))
    assert plan_a == plan_b
    # bit-identical weights, scales and BN statistics: data order, augmentation and RNG all resumed
    ma, mb = (hq_ptq.load(d / "model.hqpt.safetensors") for d in (ref, out))
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:5]


def test_a_fresh_run_discards_an_old_checkpoint(recipe, tmp_path):
    out = tmp_path / "fresh"
    out.mkdir()
    (out / QAT_CHECKPOINT).write_bytes(b"an older run's checkpoint")
    done = runner.invoke(app, ["run", str(recipe), "--out", str(out), "--no-export", "--set", "qat.steps=2"])
    assert done.exit_code == 0, done.output
    assert torch.load(out / QAT_CHECKPOINT, weights_only=True)["step"] == 2  # rewritten by this run
    bad = runner.invoke(app, ["run", str(recipe), "--out", str(out), "--no-export", "--resume"])
    assert bad.exit_code == 2 and "other QAT settings" in bad.output  # 16 steps now, not 2


# ------------------------------------------------------------------------------------------------
# atomic writes


def test_a_writer_that_dies_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "plan.json", "old")

    def dies(tmp: str) -> None:
        Path(tmp).write_text("half of the new cont")
        raise KeyboardInterrupt  # a kill between write and rename

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


WRITERS = {"write_text", "write_bytes", "savefig", "save_file", "savez", "savez_compressed"}


def _is_write(call: ast.Call) -> bool:
    f = call.func
    if isinstance(f, ast.Attribute):
        if f.attr in WRITERS:
            return True
        saves = f.attr == "save" and isinstance(f.value, ast.Name) and f.value.id in ("torch", "onnx", "np")
        # into memory, not a file: torch.save(obj, io.BytesIO()) (to measure a size)
        dest = call.args[1] if len(call.args) > 1 else None
        dest = dest.value if isinstance(dest, ast.NamedExpr) else dest
        in_memory = dest is not None and ast.unparse(dest).startswith("io.BytesIO(")
        return saves and not in_memory
    if isinstance(f, ast.Name) and f.id == "open":
        modes = [k.value for k in call.keywords if k.arg == "mode"] + call.args[1:2]
        target = ast.unparse(call.args[0]) if call.args else ""
        writes = any(isinstance(m, ast.Constant) and set(str(m.value)) & set("wax") for m in modes)
        return writes and "devnull" not in target
    return False


def _unsafe_writes(text: str) -> list[int]:
    """Lines of file writes outside a callback of atomic_write (a function taking the temporary path tmp)."""
    lines: list[int] = []

    def visit(node: ast.AST, in_callback: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_callback = in_callback or "tmp" in [a.arg for a in node.args.args]
        if isinstance(node, ast.Call) and _is_write(node) and not in_callback:
            lines.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, in_callback)

    visit(ast.parse(text), False)
    return lines


def test_every_artifact_writer_goes_through_atomic_write():
    assert _unsafe_writes("Path(p).write_text('x')\ntorch.save(s, p)\nopen(p, mode='wb')") == [1, 2, 3]
    assert _unsafe_writes("atomic_write(p, lambda tmp: torch.save(s, tmp))\nopen(os.devnull, 'w')") == []
    in_memory = "torch.save(s, io.BytesIO())\ntorch.save(s, b := io.BytesIO())\ntorch.save(s, b)"
    assert _unsafe_writes(in_memory) == [3]
    package = Path(hq_ptq.__file__).parent
    offenders = {
        str(source.relative_to(package)): _unsafe_writes(source.read_text())
        for source in sorted(package.rglob("*.py"))
        if source.name != "files.py"  # the helper itself
    }
    assert not {k: v for k, v in offenders.items() if v}
