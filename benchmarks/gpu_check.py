"""The prepared GPU check of issue [J]: one call on a machine with one NVIDIA GPU, one JSON file back.

On the lent GPU machine (one H200; torch 2.11 there, no brevitas/snntorch), from the repository root:

    S=$(mktemp -d); python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$S" .whl/*.whl && export PYTHONPATH="$S:$PWD" || exit; \
    python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"

with ``.whl`` carried (``run(carry=[".whl"], timeout_s=540)``; 11 MB), filled here beforehand with

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl brevitas==0.13.4 dependencies==2.0.1 unfoldNd==0.2.3 snntorch==1.0.0 \
      scikit-learn==1.9.1 joblib==1.6.0 threadpoolctl==3.8.0 narwhals==2.29.0 cloudpickle==3.1.3

(scikit-learn and what its import pulls in build and split the digits dataset; the GPU machine may not
have them; QONNX export is off, so qonnx/onnxoptimizer are not needed). Copy the JSON that comes back to
benchmarks/results/gpu_check.json. Add
``--cpu-reference FILE`` (a JSON this script wrote with ``--parts digits_cpu``, or an ``hq-ptq run``
result.json) to read the CPU run of part 1 instead of running it there (both digits runs then take the
reference's settings). Both digits runs use ``--qat-steps`` (default 40, or the reference's). Expected
3-5 minutes (an estimate: not yet run on a GPU); the ``--budget-s 420`` time guard skips the parts (and step
measurements) not yet started once 420 s have passed, and says so in the JSON.

It writes ONE JSON file (default benchmarks/results/gpu_check.json; ``--out``), rewritten after every part
so a killed run still leaves what it measured: ``machine`` (date, torch, CUDA, cuDNN, GPU name and memory,
brevitas/snntorch versions, threads), ``command``, ``settings``, ``parts`` (one entry per part: ``status``
ok/error/skipped, ``seconds``, ``result`` or ``error`` + ``traceback``) and ``summary`` (every figure against
its goal). A part that fails is recorded and the next one runs. Parts, in the order they run:

* ``digits_cuda``: ``hq_ptq.pipeline.run_recipe(load_recipe("digits-spikformer", [quant.device=cuda,
  qat.steps=N, ...]), out_dir=tmp, export=False)``: float, PTQ and QAT accuracy, average bits, stage and
  wall seconds, plan;
* ``step``: Spikformer-2-256 (128x128, T=16, batch 16, random events ``[T, B, 2, 128, 128]``): a training
  step (forward, cross-entropy, backward, AdamW step) for each LIF backend (``fused``, ``snntorch``) x
  precision (FP32, bf16 autocast) x model (float; 4-bit uniform Brevitas fake-quant weights from
  ``hq_ptq.swap.swap_layers(model, scheme="uniform", bits=4)``), each the median of ``--repeats`` timed
  steps after ``--warmup``, with ``torch.cuda.synchronize()`` and ``torch.cuda.max_memory_allocated()``
  (reset before each measurement); and one Hutchinson Hessian-vector product (gradient with
  ``create_graph=True``, then one product with a Rademacher probe over every conv/linear weight, eval mode,
  as hq_ptq.sensitivity does per probe) in FP32 with the fused LIF; and the default analysis on that batch
  (``fisher_traces``: per-sample gradients from one batched forward and two backwards, untargeted by a goal).
  Goals: QAT step <= 25 ms, fake-quant step <= 1.1x the float step, HVP <= 3x the float FP32 step;
* ``ddp``: a 1-process NCCL DistributedDataParallel smoke test (``init_method="tcp://127.0.0.1:PORT"``,
  rank 0 of 1): a 4-bit spikformer-tiny on cuda:0 wrapped in DDP, two training steps, group destroyed;
* ``digits_cpu``: the same recipe run as ``digits_cuda`` with ``quant.device=cpu`` and the same overrides
  (or the ``--cpu-reference``); the summary says whether |QAT acc cuda - QAT acc cpu| <= 0.5 points.

``--smoke`` runs every part on the CPU at tiny sizes (spikformer-tiny, 32x32, T=2, batch 2, one warm-up and
one timed step; digits at T=2 on 64/16 samples with 1 QAT step, absmax scale init; DDP over gloo):
tests/test_gpu_check.py runs it. A CPU reference for part 1 made on any machine:
``.venv/bin/python benchmarks/gpu_check.py --parts digits_cpu [--qat-steps N] --out FILE``.
The exit status is 0 whenever the parts ran (whatever they measured), 2 when CUDA is needed and missing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/gpu_check.py` without an installed hq_ptq
    sys.path.insert(0, str(ROOT))

from hq_ptq import progress  # noqa: E402
from hq_ptq.files import atomic_write_text  # noqa: E402
from hq_ptq.models import build_model  # noqa: E402
from hq_ptq.sensitivity import fisher_traces  # noqa: E402
from hq_ptq.snn import MultiStepLeaky, detached_copy, lif_backend, reset_states  # noqa: E402
from hq_ptq.swap import find_layers, swap_layers  # noqa: E402

PARTS = ("digits_cuda", "step", "ddp", "digits_cpu")
RECIPE = "digits-spikformer"
GOALS = {"qat_step_ms": 25.0, "fake_quant_overhead": 1.1, "hvp_over_step": 3.0, "acc_diff_points": 0.5}
DEFAULT_OUT = ROOT / "benchmarks/results/gpu_check.json"
# digits at smoke size: T=2, 64/16 samples in batches of 8, one calibration batch (8 per-sample Fisher
# gradients), one BN re-estimation batch, Brevitas' absmax scale init
SMOKE_DIGITS = (
    "data.T=2",
    "data.batch_size=8",
    "data.train_subset=64",
    "data.test_subset=16",
    "search.calib_batches=1",
    "quant.bn_recalibration_batches=1",
    'quant.scale_init="absmax"',  # no per-candidate MSE threshold search: the search in seconds
)


@dataclass
class Settings:
    smoke: bool
    device: str  # where digits_cuda, step and ddp run ("cuda"; "cpu" in --smoke)
    model: str
    img: int
    T: int
    batch: int
    warmup: int
    repeats: int
    backends: tuple[str, ...]
    precisions: tuple[str, ...]
    qat_steps: int
    digits_overrides: list[str] = field(default_factory=list)  # both digits runs, quant.device aside
    ddp_backend: str = "nccl"
    export: bool = False


class TimeGuard:
    """``--budget-s``: parts (and step measurements) not yet started are skipped once it is spent."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def reason(self) -> str | None:
        """Why the next piece of work is skipped, or None when there is time left."""
        if self.elapsed() <= self.seconds:
            return None
        return f"time guard: {self.elapsed():.0f} s elapsed > --budget-s {self.seconds:g}; not started"


def error_line(err: BaseException, limit: int = 400) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first}"[:limit]


def _is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def _sync(device: str) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize(device)


def _free_memory(device: str) -> None:
    gc.collect()
    if _is_cuda(device):
        torch.cuda.empty_cache()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "brevitas": _version("brevitas"),
        "snntorch": _version("snntorch"),
        "numpy": _version("numpy"),
        "scikit_learn": _version("scikit-learn"),
        "hq_ptq_lif_env": os.environ.get("HQ_PTQ_LIF"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu_count=torch.cuda.device_count(),
            gpu_name=torch.cuda.get_device_name(0),
            gpu_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
        )
    else:
        info["gpu_name"] = None
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except Exception:  # noqa: BLE001 - a copy without .git (the device machine's) or no git at all
        info["git_commit"] = None
    return info


# ------------------------------------------------------------------------------------------------
# part 1: the digits recipe end to end


def shared_overrides(s: Settings) -> list[str]:
    """The recipe overrides both digits runs share (everything but quant.device)."""
    return [f"qat.steps={s.qat_steps}", *s.digits_overrides]


def digits_run(s: Settings, device: str, work_dir: Path) -> dict[str, Any]:
    """``run_recipe`` of the digits recipe on ``device`` with the shared overrides."""
    from hq_ptq.pipeline import run_recipe
    from hq_ptq.recipe import load_recipe

    overrides = [f"quant.device={device}", *shared_overrides(s)]
    recipe = load_recipe(RECIPE, overrides)
    out_dir = Path(tempfile.mkdtemp(prefix=f"digits-{device.replace(':', '')}-", dir=work_dir))
    t0 = time.perf_counter()
    result = run_recipe(recipe, out_dir=out_dir, export=s.export)
    _sync(device)
    wall = time.perf_counter() - t0
    return {
        "device": device,
        "recipe": RECIPE,
        "overrides": overrides,
        "shared_overrides": shared_overrides(s),
        "wall_s": round(wall, 2),
        "stages_s": {k: round(v, 2) for k, v in result.seconds.items()},
        "fp_accuracy": result.fp_accuracy,
        "ptq_accuracy": result.ptq_accuracy,
        "qat_accuracy": result.q_accuracy,
        "avg_bits": result.plan.avg_bits,
        "plan": [[layer.name, layer.scheme, layer.bits] for layer in result.plan.layers],
        "export": s.export,
    }


def read_cpu_reference(path: Path) -> dict[str, Any]:
    """The CPU digits figures of ``path``: a JSON this script wrote (its ``digits_cpu`` part) or an
    ``hq-ptq run`` result.json. ``shared_overrides`` is None when the file does not record them."""
    doc = json.loads(Path(path).read_text())
    if "parts" in doc:
        part = doc["parts"].get("digits_cpu") or {}
        if part.get("status") != "ok":
            raise ValueError(f"{path}: its digits_cpu part is {part.get('status', 'missing')}, not ok")
        ref = dict(part["result"])
        ref.pop("source", None)
        return {**ref, "source": "reference", "reference": str(path)}
    if "q_accuracy" in doc:  # hq-ptq run's result.json
        plan = doc.get("plan") or {}
        qat = ((doc.get("recipe_config") or {}).get("quant") or {}).get("qat") or {}
        return {
            "device": "cpu",
            "source": "reference",
            "reference": str(path),
            "shared_overrides": None,
            "qat_steps": qat.get("steps"),
            "wall_s": None,
            "stages_s": doc.get("seconds"),
            "fp_accuracy": doc.get("fp_accuracy"),
            "ptq_accuracy": doc.get("ptq_accuracy"),
            "qat_accuracy": doc["q_accuracy"],
            "avg_bits": doc.get("avg_bits", plan.get("avg_bits")),
            "plan": [[la["name"], la["scheme"], la["bits"]] for la in plan.get("layers", [])] or None,
        }
    raise ValueError(f"{path}: neither a gpu_check JSON nor an hq-ptq run result.json")


def compare_digits(dev: dict[str, Any], cpu: dict[str, Any], s: Settings) -> dict[str, Any]:
    def diff(key: str) -> float | None:
        a, b = dev.get(key), cpu.get(key)
        return None if a is None or b is None else round(abs(a - b) * 100, 3)

    out: dict[str, Any] = {
        "device": dev["device"],
        "cpu_source": cpu.get("source", "run"),
        "accuracy": {
            which: {"device": dev.get(f"{which}_accuracy"), "cpu": cpu.get(f"{which}_accuracy")}
            for which in ("fp", "ptq", "qat")
        },
        "abs_diff_points": {which: diff(f"{which}_accuracy") for which in ("fp", "ptq", "qat")},
        "avg_bits": {"device": dev.get("avg_bits"), "cpu": cpu.get("avg_bits")},
        "same_plan": None if cpu.get("plan") is None else dev["plan"] == cpu["plan"],
        "wall_s": {"device": dev.get("wall_s"), "cpu": cpu.get("wall_s")},
    }
    qat_diff = out["abs_diff_points"]["qat"]
    out["goal_points"] = GOALS["acc_diff_points"]
    out["qat_within_goal"] = None if qat_diff is None else qat_diff <= GOALS["acc_diff_points"]
    if dev.get("wall_s") and cpu.get("wall_s"):
        out["cpu_over_device_wall"] = round(cpu["wall_s"] / dev["wall_s"], 2)
    ref = cpu.get("shared_overrides")
    if ref is not None:
        out["same_settings"] = ref == dev["shared_overrides"]
    elif cpu.get("qat_steps") is not None:
        out["same_settings"] = cpu["qat_steps"] == s.qat_steps
    else:
        out["same_settings"] = None
    return out


# ------------------------------------------------------------------------------------------------
# part 2: training step, fake-quant overhead, HVP


def calibrated_model(s: Settings) -> torch.nn.Module:
    """The float model on the device, BatchNorm statistics from two random-event batches (so it spikes in
    eval mode, for the HVP), as benchmarks/gpu_step.py builds it."""
    torch.manual_seed(0)
    model = build_model(s.model, img_size=s.img, num_classes=10)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average
    model = model.to(s.device)
    with torch.no_grad(), lif_backend("fused"):
        for _ in range(2):
            model(torch.rand(s.T, s.batch, 2, s.img, s.img, device=s.device).round())
    return model


def quantized_copy(model: torch.nn.Module, device: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A 4-bit uniform fake-quant copy (``swap_layers``), swapped on the device; on the CPU and moved when
    swapping on the device fails (the failure is recorded)."""
    info: dict[str, Any] = {"scheme": "uniform", "bits": 4}
    quant = detached_copy(model)
    try:
        info["layers"] = len(swap_layers(quant, scheme="uniform", bits=4))
        info["swapped_on"] = device
    except Exception as err:  # noqa: BLE001 - fall back, keep the reason
        info["swap_on_device_error"] = error_line(err)
        quant = detached_copy(model).cpu()
        info["layers"] = len(swap_layers(quant, scheme="uniform", bits=4))
        info["swapped_on"] = "cpu"
        quant = quant.to(device)
    return quant, info


def measure(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> dict[str, Any]:
    """Median/min/max milliseconds of ``fn`` over ``repeats`` synchronised calls after ``warmup`` calls; on
    CUDA the peak allocated memory of the warm-up and of the timed calls, each measured from a reset."""
    cuda = _is_cuda(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    warm_peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return {
        "ms": round(1e3 * statistics.median(times), 3),
        "min_ms": round(1e3 * min(times), 3),
        "max_ms": round(1e3 * max(times), 3),
        "warmup": warmup,
        "repeats": repeats,
        "peak_mib": None if peak is None else round(peak, 1),
        "warmup_peak_mib": None if warm_peak is None else round(warm_peak, 1),
    }


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> Callable[[], None]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def hvp_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One Hutchinson probe: v·Hv needs the gradient with its graph, then one more backward."""
    model.eval()
    params = [p for p in model.parameters() if p.dim() > 1 and p.requires_grad]

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        vs = [torch.randint_like(params[i], 2) * 2 - 1 for i in live]
        torch.autograd.grad([grads[i] for i in live], [params[i] for i in live], vs)

    return step


def fisher_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The default analysis on one batch: empirical Fisher traces of every Conv/Linear (per-sample
    gradients from one batched forward and two backwards, hq_ptq/per_sample.py)."""
    layers = {name: model.get_submodule(name) for name in find_layers(model)}

    def step() -> None:
        fisher_traces(model, layers, [(x, y)], reset=reset_states)

    return step


def _resolved_backend(model: torch.nn.Module) -> str | None:
    for m in model.modules():
        if isinstance(m, MultiStepLeaky):
            return m.resolved_backend()
    return None


def step_rows(s: Settings, guard: TimeGuard) -> dict[str, Any]:
    base = calibrated_model(s)
    try:
        quant, quant_info = quantized_copy(base, s.device)
    except Exception as err:  # noqa: BLE001 - the float rows still run; each quant row says why not
        quant, quant_info = None, {"scheme": "uniform", "bits": 4, "error": error_line(err)}
    x = torch.rand(s.T, s.batch, 2, s.img, s.img, device=s.device).round()
    y = torch.randint(0, 10, (s.batch,), device=s.device)
    plan = [("train", b, p, kind) for b in s.backends for p in s.precisions for kind in ("float", "quant")]
    plan.append(("hvp", "fused", "fp32", "float"))
    plan.append(("fisher", "fused", "fp32", "float"))
    rows = []
    for part, backend, precision, kind in plan:
        row: dict[str, Any] = {"part": part, "backend": backend, "precision": precision, "model": kind}
        skip = guard.reason()
        if skip:
            row["skipped"] = skip
        else:
            model = fn = None
            try:
                if kind == "quant" and quant is None:
                    raise RuntimeError(f"no quantized model ({quant_info['error']})")
                model = detached_copy(quant if kind == "quant" else base)
                if part == "hvp":
                    fn = hvp_step(model, x, y)
                elif part == "fisher":
                    fn = fisher_step(model, x, y)
                else:
                    fn = train_step(model, x, y, bf16=precision == "bf16")
                with lif_backend(backend):
                    row["resolved_backend"] = _resolved_backend(model)
                    row.update(measure(fn, s.device, s.warmup, s.repeats))
            except Exception as err:  # noqa: BLE001 - one failing configuration must not stop the others
                row["error"] = error_line(err)
            finally:
                del model, fn
                _free_memory(s.device)
        rows.append(row)
        print("  step " + json.dumps(row), flush=True)
    return {
        "config": {"model": s.model, "img": s.img, "T": s.T, "batch": s.batch, "optimizer": "AdamW",
                   "input": "torch.rand(T, B, 2, img, img).round()"},
        "params": sum(p.numel() for p in base.parameters()),
        "quant": quant_info,
        "rows": rows,
        "goals": step_goals(rows),
    }


def step_goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every timed figure against its goal: QAT step, fake-quant overhead, HVP over a step."""
    ms = {(r["part"], r["backend"], r["precision"], r["model"]): r["ms"] for r in rows if "ms" in r}
    goal = GOALS["qat_step_ms"]
    qat = {
        f"{b}/{p}": {"ms": v, "ratio_to_goal": round(v / goal, 2), "met": v <= goal}
        for (part, b, p, m), v in ms.items()
        if part == "train" and m == "quant"
    }
    best = min(qat.items(), key=lambda kv: kv[1]["ms"]) if qat else None
    overhead = {}
    for (part, b, p, m), v in ms.items():
        fp = ms.get((part, b, p, "float"))
        if part == "train" and m == "quant" and fp:
            ratio = v / fp
            overhead[f"{b}/{p}"] = {
                "ratio": round(ratio, 3),
                "ratio_to_goal": round(ratio / GOALS["fake_quant_overhead"], 2),
                "met": ratio <= GOALS["fake_quant_overhead"],
            }
    out: dict[str, Any] = {
        "qat_step_ms": {"goal_ms": goal, "by_config": qat,
                        "best": None if best is None else {"config": best[0], **best[1]}},
        "fake_quant_overhead": {"goal_ratio": GOALS["fake_quant_overhead"], "by_config": overhead},
    }
    hvp = ms.get(("hvp", "fused", "fp32", "float"))
    step = ms.get(("train", "fused", "fp32", "float"))
    qstep = ms.get(("train", "fused", "fp32", "quant"))
    hvp_goal: dict[str, Any] = {"goal_ratio": GOALS["hvp_over_step"], "hvp_ms": hvp,
                                "float_fp32_fused_step_ms": step}
    if hvp is not None and step:
        ratio = hvp / step
        hvp_goal.update(ratio=round(ratio, 3), ratio_to_goal=round(ratio / GOALS["hvp_over_step"], 2),
                        met=ratio <= GOALS["hvp_over_step"])
    if hvp is not None and qstep:
        hvp_goal["ratio_to_qat_fp32_fused_step"] = round(hvp / qstep, 3)
    out["hvp_over_step"] = hvp_goal
    return out


# ------------------------------------------------------------------------------------------------
# part 3: DistributedDataParallel, one process


def ddp_smoke(s: Settings) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cuda = _is_cuda(s.device)
    device = torch.device("cuda:0") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    port = _free_port()
    dist.init_process_group(
        s.ddp_backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
        timeout=timedelta(seconds=120),
    )
    try:
        torch.manual_seed(0)
        model = build_model("spikformer-tiny", num_classes=10)
        layers = len(swap_layers(model, scheme="uniform", bits=4))
        model = model.to(device)
        net = DistributedDataParallel(model, device_ids=[0] if cuda else None)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        x = torch.rand(2, 4, 2, 32, 32, device=device).round()
        y = torch.randint(0, 10, (4,), device=device)
        before = [p.detach().clone() for p in model.parameters()]
        losses, grads_finite = [], True
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            grads_finite = grads_finite and all(
                torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None
            )
            opt.step()
            losses.append(loss.item())
        _sync(str(device))
        changed = sum(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
        return {
            "ok": bool(grads_finite and changed and all(math.isfinite(v) for v in losses)),
            "backend": dist.get_backend(),
            "world_size": dist.get_world_size(),
            "device": str(device),
            "quant_layers": layers,
            "steps": len(losses),
            "losses": [round(v, 4) for v in losses],
            "grads_finite": grads_finite,
            "params_changed": f"{changed}/{len(before)}",
        }
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON file written")
    p.add_argument("--smoke", action="store_true", help="every part on the CPU at tiny sizes (tests)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list, in order, of {', '.join(PARTS)}")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip parts not started after this")
    p.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    p.add_argument("--cpu-reference", type=Path, default=None,
                   help="read digits_cpu from this JSON instead of running it")
    p.add_argument("--qat-steps", type=int, default=None,
                   help="QAT steps of both digits runs (default: the reference's, else 40; 1 with --smoke)")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE",
                   help="more recipe overrides for both digits runs")
    p.add_argument("--export", action="store_true", help="also export QONNX/onnxruntime in the digits runs")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the digits run folders here")
    p.add_argument("--model", default=None, help="step model (default spikformer-2-256)")
    p.add_argument("--img", type=int, default=None)
    p.add_argument("--T", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--backends", default="fused,snntorch")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--fail-part", default=None, choices=PARTS,
                   help="for tests: make this part raise at its start")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in args.parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    precisions = args.precisions.split(",")
    if not set(precisions) <= {"fp32", "bf16"}:
        p.error(f"--precisions takes fp32 and/or bf16, got {args.precisions}")
    return args


def make_settings(args: argparse.Namespace, reference: dict[str, Any] | None) -> Settings:
    smoke = args.smoke
    device = args.device or ("cpu" if smoke else "cuda")
    shared = reference.get("shared_overrides") if reference else None
    overrides = [*(SMOKE_DIGITS if smoke else ()), *args.overrides]
    qat_steps = args.qat_steps
    steps_items = [o for o in shared or () if o.startswith("qat.steps=")]
    if qat_steps is None and len(steps_items) == 1 and not args.overrides:
        # the reference's settings exactly, so the two runs compare
        qat_steps = int(steps_items[0].split("=", 1)[1])
        overrides = [o for o in shared if o not in steps_items]
    elif qat_steps is None and reference and reference.get("qat_steps") is not None:
        qat_steps = int(reference["qat_steps"])
    if qat_steps is None:
        qat_steps = 1 if smoke else 40

    def pick(value: Any, full: Any, tiny: Any) -> Any:
        return value if value is not None else (tiny if smoke else full)

    return Settings(
        smoke=smoke,
        device=device,
        model=pick(args.model, "spikformer-2-256", "spikformer-tiny"),
        img=pick(args.img, 128, 32),
        T=pick(args.T, 16, 2),
        batch=pick(args.batch, 16, 2),
        warmup=pick(args.warmup, 3, 1),
        repeats=pick(args.repeats, 10, 1),
        backends=tuple(args.backends.split(",")),
        precisions=tuple(args.precisions.split(",")),
        qat_steps=qat_steps,
        digits_overrides=overrides,
        ddp_backend="nccl" if _is_cuda(device) else "gloo",
        export=args.export,
    )


def summarize(report: dict[str, Any], s: Settings) -> dict[str, Any]:
    parts = report["parts"]
    summary: dict[str, Any] = {
        "status": {name: entry["status"] for name, entry in parts.items()},
        "errors": {name: entry["error"] for name, entry in parts.items() if entry["status"] == "error"},
        "skipped": {name: entry["reason"] for name, entry in parts.items() if entry["status"] == "skipped"},
    }
    dev, cpu = parts.get("digits_cuda", {}), parts.get("digits_cpu", {})
    if dev.get("status") == "ok" and cpu.get("status") == "ok":
        summary["digits"] = compare_digits(dev["result"], cpu["result"], s)
    else:
        summary["digits"] = {"missing": "needs digits_cuda and digits_cpu both ok"}
    step = parts.get("step", {})
    if step.get("status") == "ok":
        summary["step"] = step["result"]["goals"]
        failed = {
            f"{r['part']}/{r['backend']}/{r['precision']}/{r['model']}": r.get("error", r.get("skipped"))
            for r in step["result"]["rows"]
            if "ms" not in r
        }
        if failed:
            summary["step_rows_missing"] = failed
    ddp = parts.get("ddp", {})
    summary["ddp_ok"] = None if not ddp else ddp.get("status") == "ok" and bool(ddp["result"].get("ok"))
    return summary


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2, default=str) + "\n")


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\n== gpu_check: {m.get('gpu_name') or 'no GPU'}, torch {m['torch']}, CUDA {m['cuda_version']}, "
          f"{report['elapsed_s']:.0f} s, settings {'smoke' if report['settings']['smoke'] else 'full'}")
    for name, entry in report["parts"].items():
        tail = entry.get("error") or entry.get("reason") or ""
        print(f"{name:12s} {entry['status']:8s} {entry.get('seconds', 0):7.1f} s  {tail}")
    summary = report["summary"]
    d = summary.get("digits", {})
    if "accuracy" in d:
        acc = {k: {w: "-" if v is None else f"{v:.4f}" for w, v in a.items()}
               for k, a in d["accuracy"].items()}
        print(f"digits on {d['device']}: fp {acc['fp']['device']} ptq {acc['ptq']['device']} "
              f"qat {acc['qat']['device']} | cpu ({d['cpu_source']}): fp {acc['fp']['cpu']} "
              f"ptq {acc['ptq']['cpu']} qat {acc['qat']['cpu']} | |qat diff| "
              f"{d['abs_diff_points']['qat']} pt, "
              f"<= 0.5: {d['qat_within_goal']} | same settings {d['same_settings']} | bits {d['avg_bits']} "
              f"| wall s {d['wall_s']}")
    step = report["parts"].get("step", {})
    if step.get("status") == "ok":
        print(f"{'part':6s} {'backend':9s} {'prec':5s} {'model':6s} {'ms':>9s} {'peak MiB':>9s}")
        for r in step["result"]["rows"]:
            if "ms" in r:
                cell = f"{r['ms']:9.2f} {r['peak_mib'] if r['peak_mib'] is not None else '-':>9}"
            else:
                cell = (r.get("error") or r.get("skipped", ""))[:80]
            print(f"{r['part']:6s} {r['backend']:9s} {r['precision']:5s} {r['model']:6s} {cell}")
        g = summary["step"]
        best = g["qat_step_ms"]["best"]
        if best:
            print(f"QAT step best {best['config']} {best['ms']:.2f} ms "
                  f"(goal {g['qat_step_ms']['goal_ms']:g} ms, x{best['ratio_to_goal']})")
        for cfg, v in g["fake_quant_overhead"]["by_config"].items():
            print(f"fake-quant overhead {cfg}: {v['ratio']:.3f}x (goal <= {GOALS['fake_quant_overhead']})")
        h = g["hvp_over_step"]
        if "ratio" in h:
            print(f"HVP {h['hvp_ms']:.2f} ms = {h['ratio']:.2f}x the float FP32 step (goal <= 3)")
    print(f"DDP ok: {summary['ddp_ok']}")
    print(f"wrote {report['out']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    guard = TimeGuard(args.budget_s)
    progress.set_enabled(False)
    reference, reference_error = None, None
    if args.cpu_reference is not None and "digits_cpu" in args.parts:
        try:
            reference = read_cpu_reference(args.cpu_reference)
        except Exception as err:  # noqa: BLE001 - recorded in digits_cpu; the rest still runs
            reference_error = err
    s = make_settings(args, reference)
    out = args.out.resolve()
    report: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(
            [Path(sys.executable).name, "benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "settings": {**asdict(s), "parts": args.parts, "budget_s": args.budget_s,
                     "cpu_reference": str(args.cpu_reference) if args.cpu_reference else None},
        "goals": GOALS,
        "out": str(out),
        "parts": {},
    }
    needs_device = any(p in args.parts for p in ("digits_cuda", "step", "ddp"))
    if needs_device and _is_cuda(s.device) and not torch.cuda.is_available():
        report["error"] = "no CUDA device here: run with --smoke (CPU, tiny), or --parts digits_cpu"
        report["elapsed_s"] = guard.elapsed()
        write(report, out)
        print(f"gpu_check: {report['error']}; wrote {out}")
        return 2
    write(report, out)  # the machine at least, should the first part never return
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)

    def digits_cpu() -> dict[str, Any]:
        if reference_error is not None:
            raise reference_error
        if reference is not None:
            return reference
        return {**digits_run(s, "cpu", work), "source": "run"}

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "digits_cuda": lambda: digits_run(s, s.device, work),
        "step": lambda: step_rows(s, guard),
        "ddp": lambda: ddp_smoke(s),
        "digits_cpu": digits_cpu,
    }
    try:
        for name in args.parts:
            skip = guard.reason()
            t0 = time.perf_counter()
            if skip:
                entry: dict[str, Any] = {"status": "skipped", "reason": skip}
            else:
                print(f"[{guard.elapsed():6.1f} s] {name} ...", flush=True)
                try:
                    if name == args.fail_part:
                        raise RuntimeError(f"forced failure of {name} (--fail-part)")
                    entry = {"status": "ok", "result": runners[name]()}
                except Exception as err:  # noqa: BLE001 - recorded; the next part still runs
                    entry = {"status": "error", "error": error_line(err),
                             "traceback": traceback.format_exc()[-2000:]}
                finally:
                    _free_memory(s.device)
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            report["parts"][name] = entry
            report["elapsed_s"] = round(guard.elapsed(), 2)
            report["summary"] = summarize(report, s)
            write(report, out)
            print(f"[{guard.elapsed():6.1f} s] {name}: {entry['status']} "
                  f"{entry.get('error') or entry.get('reason') or ''}", flush=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    try:
        print_table(report)
    except Exception as err:  # noqa: BLE001 - the JSON is written; a table that fails must not hide it
        print(f"gpu_check: no table ({error_line(err)}); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
