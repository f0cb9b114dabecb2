"""The prepared GPU check of issue [J]: one call on a machine with one NVIDIA GPU, one JSON file back.

On the lent GPU machine (one H200; torch 2.11 there, no brevitas/snntorch). First read the device tool's
``status``: machine start-up and transfers count against device time, so with ``L = status.budget_left_s``
call ``run(carry=[".whl"], timeout_s=T)`` with ``T`` about ``min(600, L - 150)`` and give the script
``--budget-s B`` with ``B`` about ``T - 120`` (the rest: the wheel install, the CUDA tests below, and the last
part's overrun). From the repository root:

    S=$(mktemp -d); python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$S" .whl/*.whl && export PYTHONPATH="$S:$PWD" PYTHONUNBUFFERED=1 || exit; \
    python3 benchmarks/gpu_check.py --budget-s B --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log";\
    timeout 90 python3 -m pytest -q -p no:warnings tests/test_device.py tests/test_lif.py -k cuda 2>&1 \
      | tee "$OUT/cuda_tests.log"

(the CUDA-only tests, about 30 s, run after the check so a slow test cannot eat its time; their output is
kept in $OUT). ``.whl`` (1.2 MB) is filled here beforehand with

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl brevitas==0.13.4 dependencies==2.0.1 unfoldNd==0.2.3 snntorch==1.0.0

The GPU image already has scikit-learn, joblib, threadpoolctl, narwhals and cloudpickle (the device notes'
KINDS.md package list of the 'cuda' image); hq_ptq needs only scikit-learn's ``load_digits`` and
``train_test_split``, present in every version, so they are not carried: the JSON records scikit-learn's
version and a digest of the digits train/test split (``split_digest``), so a split that differed from the
CPU reference's would show (``summary.digits.same_split``). QONNX export is off, so qonnx/onnxoptimizer are
not needed; ``onnxruntime-gpu`` is not carried either (the image has the CPU onnxruntime), so the
CUDA-provider branch of export verification is NOT exercised there, even with ``--export``.
Copy the JSON that comes back to benchmarks/results/gpu_check.json. Add ``--cpu-reference FILE`` (a JSON this
script wrote with ``--parts digits_cpu``, or an ``hq-ptq run`` result.json) to read the CPU run of part 1
instead of running it there (both digits runs then take the reference's settings). Both digits runs use
``--qat-steps`` (default 40, or the reference's).

Time guard (``--budget-s``, default 420): a part (or a step row) is not started once the budget is spent, nor
when its expected duration would overrun it: ``PART_ESTIMATE_S`` (digits_cuda ~60 s, step ~90 s, ddp ~20 s,
digits_cpu ~70 s on 16 cores; ``--estimate PART=S`` overrides) for a part, the longest row so far for a step
row. Skips are recorded with the reason. Expected 4-5 minutes in all (an estimate: not yet run on a GPU).

It writes ONE JSON file (default benchmarks/results/gpu_check.json; ``--out``), rewritten when a part starts
(``status`` "running"), after every step row (the rows so far) and after every part, so a killed run keeps
every finished row: ``machine`` (date, torch, CUDA, cuDNN, GPU name and memory, brevitas/snntorch/sklearn
versions, threads, ``tf32``: the TF32 settings in effect), ``command``, ``settings``, ``prepare`` (the CUDA
start-up and the digits data cache, timed apart from the parts), ``parts`` (one entry per part: ``status``
running/ok/error/skipped, ``seconds``, ``estimate_s``, ``result`` or ``error`` + ``traceback`` or ``reason``)
and ``summary`` (every figure against its goal). A part that fails is recorded and the next one runs.
While the Fisher analysis runs (the digits runs, the ``fisher`` row) a handler on the ``hq_ptq`` logger
(DEBUG) keeps every message starting with "fisher:" (the one-pass per-sample path falling back to
micro-batches or the batch-mean estimator) in ``fisher_log``; ``summary.fisher_fallbacks`` lists them.
Parts, in the order they run:

* ``digits_cuda``: ``hq_ptq.pipeline.run_recipe(load_recipe("digits-spikformer", [quant.device=cuda,
  qat.steps=N, ...]), out_dir=tmp, export=False)``: float, PTQ and QAT accuracy, average bits, stage and
  wall seconds (the data cache and CUDA already warm), plan, the global TF32 settings (torch's defaults:
  TF32 convolutions on; hq_ptq's analysis turns them off inside its own block, hq_ptq.devices);
* ``step``: Spikformer-2-256 (128x128, T=16, batch 16, random events ``[T, B, 2, 128, 128]``), each row the
  median of ``--repeats`` timed calls after ``--warmup``, with ``torch.cuda.synchronize()`` and
  ``torch.cuda.max_memory_allocated()`` (reset before each measurement), each with a ``what`` field:
  ``train`` rows, a plain training step (forward, cross-entropy, backward, AdamW step; NO teacher forward and
  NO distillation loss, which hq_ptq's QAT adds) for each LIF backend (``fused``, ``snntorch``) x precision
  (FP32, bf16 autocast) x model (float; 4-bit uniform Brevitas fake-quant weights from
  ``hq_ptq.swap.swap_layers(model, scheme="uniform", bits=4)`` on the device); one ``qat`` row, a real step of
  ``hq_ptq.qat.finetune`` (fused, FP32, 4-bit; the float model as teacher: student and teacher forwards,
  cross-entropy + distillation, backward, clipping, AdamW + schedule), timed per step inside one call;
  ``hvp`` rows, one Hutchinson Hessian-vector product (gradient with ``create_graph=True``, then one product
  with a Rademacher probe over every conv/linear weight, eval mode, as hq_ptq.sensitivity does per probe) for
  each backend in FP32 and the fused LIF in bf16 (forward and loss under ``torch.autocast(dtype=bfloat16)``);
  and ``fisher``, the default analysis on that batch (``fisher_traces``). FP32 rows are labelled
  "fp32 (TF32 convolutions)" when cuDNN's TF32 is on (torch's default, left as users train with it).
  Goals: QAT step <= 25 ms (the ``qat`` row; the 4-bit ``train`` rows beside it as a lower bound),
  fake-quant step <= 1.1x the float step, HVP <= 3x the float step;
* ``ddp``: a 1-process DistributedDataParallel smoke test through the library's path, in a child process
  killed after 4x its estimate (a group that hangs, e.g. in its teardown, costs that, not the run): the
  group on ``hq_ptq.distributed.default_backend()`` ("cpu:gloo,cuda:nccl" with CUDA;
  ``init_method=tcp://127.0.0.1:PORT``, rank 0 of 1, ``NCCL_DEBUG=WARN``), one CPU float64 ``all_reduce``
  and one ``all_gather_object`` (the library's shard reduce and object gathers), a spikformer-tiny moved to
  cuda:0 and then swapped to 4 bits (as the pipeline does), wrapped in DDP, two training steps, the group
  destroyed in ``finally``;
* ``digits_cpu``: the same recipe run as ``digits_cuda`` with ``quant.device=cpu`` and the same overrides
  (or the ``--cpu-reference``); the summary says whether |QAT acc cuda - QAT acc cpu| <= 0.5 points.

``--smoke`` runs every part and row on the CPU at tiny sizes (spikformer-tiny, 32x32, T=2, batch 2, one
warm-up and one timed step; digits at T=2 on 64/16 samples with 1 QAT step, absmax scale init; DDP over gloo):
tests/test_gpu_check.py runs it; by hand: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu_check.py --smoke
--out /tmp/smoke.json``. A CPU reference for part 1 made on any machine:
``.venv/bin/python benchmarks/gpu_check.py --parts digits_cpu [--qat-steps N] --out FILE``.
The exit status is 0 whenever the parts ran (whatever they measured), 2 when CUDA is needed and missing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
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
import warnings
from collections.abc import Callable, Iterator
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
# expected seconds of each part at full size on the H200 machine, for the time guard: digits_cuda ~60 s
# (40 QAT steps of spikformer-tiny, the analysis and three evaluations, data cache warm); step ~90 s
# (../shared/notes/gpu.md: snnTorch's loop 181 ms per FP32 step, 423 ms per HVP, so 3 + 10 calls of 16 rows,
# the model builds and the Fisher analysis); ddp ~20 s (~15 s of NCCL and CUDA start-up, and its own process
# importing torch, brevitas and hq_ptq); digits_cpu ~70 s on 16 cores
PART_ESTIMATE_S = {"digits_cuda": 60.0, "step": 90.0, "ddp": 20.0, "digits_cpu": 70.0}
SMOKE_ESTIMATE_S = {"digits_cuda": 20.0, "step": 20.0, "ddp": 15.0, "digits_cpu": 20.0}  # 2 busy CPU cores
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
# what each kind of step row times (the ``what`` field of every row)
WHAT = {
    "train": "plain train step: forward, cross-entropy, backward, AdamW step; no teacher forward and no "
    "distillation loss (hq_ptq's QAT adds both: see the qat row)",
    "qat": "one step of hq_ptq.qat.finetune (the library's QAT loop): student forward, teacher forward (no "
    "grad), cross-entropy + distillation loss, backward, grad-norm clipping, AdamW and LR-schedule step, the "
    "loss read back; timed between the loop's batch draws inside one call",
    "hvp": "one Hutchinson probe: forward and loss (under bf16 autocast for bf16), the gradient with "
    "create_graph=True, then one more backward against a Rademacher probe over every conv/linear weight; "
    "eval mode",
    "fisher": "hq_ptq.sensitivity.fisher_traces on the batch (per-sample gradients from one batched forward "
    "and two backwards, or its fallbacks: see fisher_log)",
}


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
    ddp_backend: str = "gloo"  # hq_ptq.distributed.default_backend()
    export: bool = False
    estimates: dict[str, float] = field(default_factory=dict)  # expected seconds per part (the time guard)


class TimeGuard:
    """``--budget-s``: work (a part, a step row) is not started once the budget is spent, nor when its
    expected duration would overrun it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def reason(self, expected: float = 0.0) -> str | None:
        """Why the next piece of work, expected to take ``expected`` seconds, is skipped, or None when there
        is time for it."""
        elapsed = self.elapsed()
        if elapsed > self.seconds:
            return f"time guard: {elapsed:.0f} s elapsed > --budget-s {self.seconds:g}; not started"
        if elapsed + expected > self.seconds:
            return (f"time guard: {elapsed:.0f} s elapsed + ~{expected:.0f} s expected > --budget-s "
                    f"{self.seconds:g}; not started")
        return None


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


# ------------------------------------------------------------------------------------------------
# TF32 and the Fisher fallback log


def _read(path: str) -> Any:
    """``torch.backends.<path>``, or why it cannot be read (absent here; or torch refusing to mix the legacy
    ``allow_tf32`` flags with the newer ``fp32_precision`` API)."""
    obj: Any = torch.backends
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in path.split("."):
                obj = getattr(obj, name)
    except AttributeError:
        return None
    except RuntimeError as err:
        return f"unreadable: {error_line(err, 160)}"
    return obj


def tf32_settings() -> dict[str, Any]:
    """The TF32 settings in effect: the legacy flags and, where this torch has them (2.9+), the
    ``fp32_precision`` attributes ("none" inherits from the level above; "tf32" or "ieee")."""
    out: dict[str, Any] = {
        "cudnn.allow_tf32": _read("cudnn.allow_tf32"),
        "cuda.matmul.allow_tf32": _read("cuda.matmul.allow_tf32"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    for path in ("fp32_precision", "cuda.matmul.fp32_precision", "cudnn.fp32_precision",
                 "cudnn.conv.fp32_precision", "cudnn.rnn.fp32_precision"):
        value = _read(path)
        if value is not None:
            out[path] = value
    out["tf32_convolutions"] = tf32_convolutions(out)
    matmul = ("cuda.matmul.fp32_precision", "fp32_precision")
    out["tf32_matmul"] = _tf32(out, matmul, "cuda.matmul.allow_tf32")
    return out


def _tf32(settings: dict[str, Any], chain: tuple[str, ...], legacy: str) -> bool:
    for path in chain:  # the first level that does not inherit decides
        value = settings.get(path)
        if value == "tf32":
            return True
        if value == "ieee":
            return False
    return settings.get(legacy) is True


def tf32_convolutions(settings: dict[str, Any] | None = None) -> bool:
    """Whether cuDNN runs float32 convolutions as TF32 (torch's default on CUDA)."""
    if settings is None:
        settings = tf32_settings()
    chain = ("cudnn.conv.fp32_precision", "cudnn.fp32_precision", "fp32_precision")
    return _tf32(settings, chain, "cudnn.allow_tf32")


def precision_label(precision: str, device: str) -> str:
    """The row's precision as run: bf16 autocast, or fp32 with TF32 convolutions on CUDA when cuDNN's TF32 is
    on (the global settings are left as they are: users train with torch's default)."""
    if precision == "bf16":
        return "bf16 autocast"
    if _is_cuda(device) and tf32_convolutions():
        return "fp32 (TF32 convolutions)"
    return "fp32"


class FisherLog(logging.Handler):
    """Keeps every ``hq_ptq`` log message that starts with "fisher:" (a per-sample path falling back), once
    per distinct message with a count."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.found: dict[tuple[str, str, str], int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record of someone else's is no fallback
            return
        if message.startswith("fisher:"):
            key = (record.levelname, record.name, message[:600])
            self.found[key] = self.found.get(key, 0) + 1

    def messages(self) -> list[dict[str, Any]]:
        return [{"level": level, "logger": name, "message": message, "count": count}
                for (level, name, message), count in self.found.items()]


@contextlib.contextmanager
def fisher_log() -> Iterator[FisherLog]:
    """A :class:`FisherLog` on the ``hq_ptq`` logger, set to DEBUG, for the block; both restored after."""
    logger = logging.getLogger("hq_ptq")
    handler = FisherLog()
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


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
        "tf32": tf32_settings(),
        "brevitas": _version("brevitas"),
        "snntorch": _version("snntorch"),
        "numpy": _version("numpy"),
        "scikit_learn": _version("scikit-learn"),
        "onnxruntime": _version("onnxruntime"),
        "onnxruntime_gpu": _version("onnxruntime-gpu"),
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


def split_digest() -> str:
    """A digest of the digits train/test split (scikit-learn's stratified split of its 1797 digits), so two
    machines' runs can be checked to hold out the same samples."""
    from sklearn.datasets import load_digits

    from hq_ptq.data.digits import digits_split_indices

    train, test = digits_split_indices(load_digits().target)
    return hashlib.sha256(train.tobytes() + b"|" + test.tobytes()).hexdigest()[:16]


def prepare(s: Settings, parts: list[str], digits_runs: bool) -> dict[str, Any]:
    """Work timed apart from the parts: the CUDA context, cuDNN and cuBLAS (a tiny conv and matmul) when a
    part runs on CUDA, and the digits data cache (both loaders built once) when a digits run follows, so
    neither digits run's wall time holds them. Failures are recorded; the parts still run."""
    out: dict[str, Any] = {}
    if _is_cuda(s.device) and any(p in parts for p in ("digits_cuda", "step", "ddp")):
        t0 = time.perf_counter()
        try:
            x = torch.ones(1, 1, 4, 4, device=s.device)
            F.conv2d(x, torch.ones(1, 1, 3, 3, device=s.device))
            x.flatten(1) @ torch.ones(16, 4, device=s.device)
            _sync(s.device)
        except Exception as err:  # noqa: BLE001 - the parts will say it again, with their own context
            out["cuda_init_error"] = error_line(err)
        out["cuda_init_s"] = round(time.perf_counter() - t0, 2)
    if digits_runs:
        from hq_ptq.pipeline import recipe_loaders
        from hq_ptq.recipe import load_recipe

        t0 = time.perf_counter()
        try:
            train, test = recipe_loaders(load_recipe(RECIPE, ["quant.device=cpu", *shared_overrides(s)]))
            out["digits_batches"] = {"train": len(train), "test": len(test)}
        except Exception as err:  # noqa: BLE001 - the digits parts will fail with their own traceback
            out["digits_data_error"] = error_line(err)
        out["digits_data_s"] = round(time.perf_counter() - t0, 2)
    return out


def digits_run(s: Settings, device: str, work_dir: Path) -> dict[str, Any]:
    """``run_recipe`` of the digits recipe on ``device`` with the shared overrides."""
    from hq_ptq.pipeline import run_recipe
    from hq_ptq.recipe import load_recipe

    overrides = [f"quant.device={device}", *shared_overrides(s)]
    recipe = load_recipe(RECIPE, overrides)
    out_dir = Path(tempfile.mkdtemp(prefix=f"digits-{device.replace(':', '')}-", dir=work_dir))
    tf32 = tf32_settings()
    with fisher_log() as fisher:
        t0 = time.perf_counter()
        result = run_recipe(recipe, out_dir=out_dir, export=s.export)
        _sync(device)
        wall = time.perf_counter() - t0
    try:
        digest = split_digest()
    except Exception as err:  # noqa: BLE001 - a figure for the comparison, not a reason to lose the run
        digest = f"unavailable: {error_line(err, 160)}"
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
        "tf32": tf32 if _is_cuda(device) else None,
        "scikit_learn": _version("scikit-learn"),
        "split_digest": digest,
        "fisher_log": fisher.messages(),
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
    a, b = dev.get("split_digest"), cpu.get("split_digest")
    out["same_split"] = None if a is None or b is None else a == b
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
# part 2: training step, QAT step, fake-quant overhead, HVP, Fisher


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


def _timing(times: list[float], warmup: int, peak: float | None, warm_peak: float | None) -> dict[str, Any]:
    return {
        "ms": round(1e3 * statistics.median(times), 3),
        "min_ms": round(1e3 * min(times), 3),
        "max_ms": round(1e3 * max(times), 3),
        "warmup": warmup,
        "repeats": len(times),
        "peak_mib": None if peak is None else round(peak, 1),
        "warmup_peak_mib": None if warm_peak is None else round(warm_peak, 1),
    }


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
    return _timing(times, warmup, peak, warm_peak)


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> Callable[[], None]:
    """A plain training step (no teacher, no distillation: ``WHAT["train"]``)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(x.device, bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def hvp_step(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool = False
) -> Callable[[], None]:
    """One Hutchinson probe: v·Hv needs the gradient with its graph, then one more backward. With ``bf16``
    the forward and the loss run under bfloat16 autocast; both backwards as in FP32 (outside autocast)."""
    model.eval()
    params = [p for p in model.parameters() if p.dim() > 1 and p.requires_grad]

    def step() -> None:
        with _autocast(x.device, bf16):
            loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        vs = [torch.randint_like(params[i], 2) * 2 - 1 for i in live]
        torch.autograd.grad([grads[i] for i in live], [params[i] for i in live], vs)

    return step


class _StepClock:
    """The batches of a QAT run, each handed out after a synchronise and a time stamp, so the per-step
    times are read off one ``finetune`` call (its set-up, before the first draw, is not timed); the peak
    memory is reset at the first timed step's draw."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module, warmup: int) -> None:
        self.x, self.y, self.model, self.warmup = x, y, model, warmup
        self.device = str(x.device)
        self.marks: list[float] = []
        self.warm_peak: float | None = None
        self.resolved_backend: str | None = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        cuda = _is_cuda(self.device)
        while True:
            _sync(self.device)
            if not self.marks:
                self.resolved_backend = _resolved_backend(self.model)  # inside finetune's surrogate swap
                if cuda:
                    torch.cuda.reset_peak_memory_stats(self.device)
            if len(self.marks) == self.warmup and cuda:
                self.warm_peak = torch.cuda.max_memory_allocated(self.device) / 2**20
                torch.cuda.reset_peak_memory_stats(self.device)
            self.marks.append(time.perf_counter())
            yield self.x, self.y


def qat_measure(
    quant: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str,
    warmup: int, repeats: int,
) -> dict[str, Any]:
    """``WHAT["qat"]``: one ``hq_ptq.qat.finetune`` call of ``warmup + repeats`` steps (no checkpoint, the
    float model as teacher); the median of the last ``repeats`` step times."""
    from hq_ptq.config import QATConfig
    from hq_ptq.qat import finetune

    clock = _StepClock(x, y, quant, warmup)
    config = QATConfig(steps=warmup + repeats, checkpoint_every=0)
    result = finetune(quant, clock, config, teacher=teacher, precision=precision)
    _sync(clock.device)
    marks = [*clock.marks, time.perf_counter()]
    times = [b - a for a, b in zip(marks, marks[1:])][warmup:]
    cuda = _is_cuda(clock.device)
    peak = torch.cuda.max_memory_allocated(clock.device) / 2**20 if cuda else None
    out = _timing(times, warmup, peak, clock.warm_peak)
    out.update(resolved_backend=clock.resolved_backend, final_loss=round(result.final_loss, 4),
               qat_config={"lr": config.lr, "distill_weight": config.distill_weight,
                           "keep_bn_statistics": config.keep_bn_statistics})
    return out


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


def step_plan(s: Settings) -> list[tuple[str, str, str, str]]:
    """The step rows in order: ``(part, backend, precision, model)``."""
    plan = [("train", b, p, kind) for b in s.backends for p in s.precisions for kind in ("float", "quant")]
    qat_backend = "fused" if "fused" in s.backends else s.backends[0]
    qat_precision = "fp32" if "fp32" in s.precisions else s.precisions[0]
    plan.append(("qat", qat_backend, qat_precision, "quant"))
    if "fp32" in s.precisions:
        plan += [("hvp", b, "fp32", "float") for b in s.backends]
    if "bf16" in s.precisions and "fused" in s.backends:
        plan.append(("hvp", "fused", "bf16", "float"))
    plan.append(("fisher", "fused", "fp32", "float"))
    return plan


def step_rows(
    s: Settings, guard: TimeGuard, on_row: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Every row of :func:`step_plan`; ``on_row(result so far)`` after each row (the JSON is rewritten)."""
    base = calibrated_model(s)
    try:
        quant, quant_info = quantized_copy(base, s.device)
    except Exception as err:  # noqa: BLE001 - the float rows still run; each quant row says why not
        quant, quant_info = None, {"scheme": "uniform", "bits": 4, "error": error_line(err)}
    x = torch.rand(s.T, s.batch, 2, s.img, s.img, device=s.device).round()
    y = torch.randint(0, 10, (s.batch,), device=s.device)
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "config": {"model": s.model, "img": s.img, "T": s.T, "batch": s.batch, "optimizer": "AdamW",
                   "input": "torch.rand(T, B, 2, img, img).round()"},
        "params": sum(p.numel() for p in base.parameters()),
        "quant": quant_info,
        "tf32": tf32_settings() if _is_cuda(s.device) else None,
        "what": WHAT,
        "rows": rows,
    }
    longest = 0.0  # the longest row so far: the time guard's guess for the next one
    for part, backend, precision, kind in step_plan(s):
        row: dict[str, Any] = {"part": part, "backend": backend, "precision": precision, "model": kind,
                               "label": precision_label(precision, s.device), "what": WHAT[part]}
        skip = guard.reason(expected=longest)
        if skip:
            row["skipped"] = skip
        else:
            t0 = time.perf_counter()
            model = fn = teacher = None
            try:
                if kind == "quant" and quant is None:
                    raise RuntimeError(f"no quantized model ({quant_info['error']})")
                model = detached_copy(quant if kind == "quant" else base)
                with lif_backend(backend):
                    if part == "qat":
                        teacher = detached_copy(base).eval()
                        row.update(qat_measure(model, teacher, x, y, precision, s.warmup, s.repeats))
                    elif part == "fisher":
                        with fisher_log() as log:
                            row["resolved_backend"] = _resolved_backend(model)
                            row.update(measure(fisher_step(model, x, y), s.device, s.warmup, s.repeats))
                        row["fisher_log"] = log.messages()
                    else:
                        bf16 = precision == "bf16"
                        fn = hvp_step(model, x, y, bf16) if part == "hvp" else train_step(model, x, y, bf16)
                        row["resolved_backend"] = _resolved_backend(model)
                        row.update(measure(fn, s.device, s.warmup, s.repeats))
            except Exception as err:  # noqa: BLE001 - one failing configuration must not stop the others
                row["error"] = error_line(err)
            finally:
                del model, fn, teacher
                _free_memory(s.device)
            row["seconds"] = round(time.perf_counter() - t0, 2)
            longest = max(longest, row["seconds"])
        rows.append(row)
        print("  step " + json.dumps({k: v for k, v in row.items() if k != "what"}), flush=True)
        result["goals"] = step_goals(rows)
        if on_row is not None:
            on_row(result)
    result["goals"] = step_goals(rows)
    return result


def step_goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every timed figure against its goal: QAT step, fake-quant overhead, HVP over a step; and the fused
    LIF's speed-up over snnTorch's loop for each row measured with both."""
    ms = {(r["part"], r["backend"], r["precision"], r["model"]): r["ms"] for r in rows if "ms" in r}
    goal = GOALS["qat_step_ms"]

    def against(v: float) -> dict[str, Any]:
        return {"ms": v, "ratio_to_goal": round(v / goal, 2), "met": v <= goal}

    finetune = {f"{b}/{p}": against(v) for (part, b, p, m), v in ms.items() if part == "qat"}
    train_quant = {
        f"{b}/{p}": against(v) for (part, b, p, m), v in ms.items() if part == "train" and m == "quant"
    }
    source, pool = ("qat", finetune) if finetune else ("train", train_quant)
    best = min(pool.items(), key=lambda kv: kv[1]["ms"]) if pool else None
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
        "qat_step_ms": {
            "goal_ms": goal,
            "what": "by_config: real hq_ptq.qat.finetune steps (teacher forward + distillation); "
            "train_step_quant: plain 4-bit fake-quant train steps without the teacher (a lower bound); best: "
            "from by_config when measured, else from train_step_quant (its source says which)",
            "by_config": finetune,
            "train_step_quant": train_quant,
            "best": None if best is None else {"config": best[0], "source": source, **best[1]},
        },
        "fake_quant_overhead": {"goal_ratio": GOALS["fake_quant_overhead"], "by_config": overhead},
    }
    by_config = {}
    for (part, b, p, _), v in ms.items():
        step = ms.get(("train", b, p, "float"))
        if part == "hvp" and step:
            ratio = v / step
            by_config[f"{b}/{p}"] = {"hvp_ms": v, "float_step_ms": step, "ratio": round(ratio, 3),
                                     "met": ratio <= GOALS["hvp_over_step"]}
    hvp = ms.get(("hvp", "fused", "fp32", "float"))
    step = ms.get(("train", "fused", "fp32", "float"))
    qstep = ms.get(("qat", "fused", "fp32", "quant"))
    hvp_goal: dict[str, Any] = {"goal_ratio": GOALS["hvp_over_step"], "hvp_ms": hvp,
                                "float_fp32_fused_step_ms": step, "by_config": by_config}
    if hvp is not None and step:
        ratio = hvp / step
        hvp_goal.update(ratio=round(ratio, 3), ratio_to_goal=round(ratio / GOALS["hvp_over_step"], 2),
                        met=ratio <= GOALS["hvp_over_step"])
    if hvp is not None and qstep:
        hvp_goal["ratio_to_qat_fp32_fused_step"] = round(hvp / qstep, 3)
    out["hvp_over_step"] = hvp_goal
    out["fused_speedup_over_snntorch"] = {
        f"{part}/{p}/{m}": round(ms[(part, "snntorch", p, m)] / v, 2)
        for (part, b, p, m), v in ms.items()
        if b == "fused" and (part, "snntorch", p, m) in ms and v > 0
    }
    return out


# ------------------------------------------------------------------------------------------------
# part 3: DistributedDataParallel, one process, through the library's path


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ddp_steps(device: torch.device, cuda: bool) -> dict[str, Any]:
    """A spikformer-tiny moved to ``device`` and then swapped to 4 bits (as the pipeline does), wrapped in
    DDP, two training steps. The model and DDP (whose Reducer holds the group) are freed on return."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = build_model("spikformer-tiny", num_classes=10).to(device)
    layers = len(swap_layers(model, scheme="uniform", bits=4))  # on the device, as apply_plan does
    on_device = all(p.device == device for p in model.parameters())
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
        "swapped_on": str(device) if on_device else "mixed",
        "quant_layers": layers,
        "steps": len(losses),
        "losses": [round(v, 4) for v in losses],
        "grads_finite": grads_finite,
        "params_changed": f"{changed}/{len(before)}",
        "train_ok": bool(grads_finite and changed and on_device and all(math.isfinite(v) for v in losses)),
    }


def ddp_smoke(s: Settings, on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The process group on ``hq_ptq.distributed.default_backend()`` (rank 0 of 1, NCCL_DEBUG=WARN), one CPU
    float64 all_reduce and one all_gather_object, then :func:`_ddp_steps`; the group destroyed in
    ``finally``. ``on_result(result)`` is called before the group is torn down."""
    import torch.distributed as dist

    from hq_ptq.distributed import default_backend

    cuda = _is_cuda(s.device)
    device = torch.device("cuda:0") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = default_backend()
    with _env(NCCL_DEBUG="WARN"):
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
            timeout=timedelta(seconds=120),
        )
        try:
            # hq_ptq's shard reduce: a CPU float64 tensor summed over ranks (distributed._sum); its object
            # gathers (QAT random states, check_same): all_gather_object
            summed = torch.arange(4, dtype=torch.float64)
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
            reduce_ok = torch.equal(summed, torch.arange(4, dtype=torch.float64))
            gathered: list[Any] = [None]
            dist.all_gather_object(gathered, {"rank": 0, "digest": "abc"})
            gather_ok = gathered == [{"rank": 0, "digest": "abc"}]
            trained = _ddp_steps(device, cuda)
            result = {
                "ok": bool(trained.pop("train_ok") and reduce_ok and gather_ok),
                "backend": str(dist.get_backend()),
                "default_backend": backend,
                "world_size": dist.get_world_size(),
                "device": str(device),
                **trained,
                "cpu_float64_all_reduce_ok": reduce_ok,
                "all_gather_object_ok": gather_ok,
                "nccl_debug": "WARN",
            }
            if on_result is not None:
                on_result(result)
            return result
        finally:
            # gloo frees a finished work item on its own thread, which takes the GIL when the item's tensors
            # have Python objects (all_gather_object's do); the group's destructor joins those threads with
            # the GIL held, so tearing it down while one is still freeing deadlocks (seen here once). DDP is
            # gone (gc for any cycle); the sleep gives up the GIL until gloo's threads are idle
            gc.collect()
            time.sleep(0.2)
            dist.destroy_process_group()


def ddp_child(s: Settings, out: Path) -> int:
    """``--ddp-child``: :func:`ddp_smoke` in this process, its result written to ``out`` before the group is
    torn down (``teardown`` "pending") and again after it ("ok"); an error as ``error`` + ``traceback``."""
    def save(doc: dict[str, Any]) -> None:
        atomic_write_text(out, json.dumps(doc, default=str))

    try:
        result = ddp_smoke(s, on_result=lambda r: save({"result": r, "teardown": "pending"}))
    except Exception as err:  # noqa: BLE001 - the parent records it
        save({"error": error_line(err), "traceback": traceback.format_exc()[-2000:]})
        return 1
    save({"result": result, "teardown": "ok"})
    return 0


def _text(value: str | bytes | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value or ""


def ddp_isolated(s: Settings, timeout_s: float) -> dict[str, Any]:
    """:func:`ddp_smoke` in a child process (``--ddp-child``) killed after ``timeout_s``: a process group
    that hangs (in its set-up, a collective or its teardown) costs that, not the rest of the run. Its
    output's tail (NCCL warnings) is kept in ``log_tail``."""
    with tempfile.TemporaryDirectory(prefix="gpu_check-ddp-") as tmp:
        out = Path(tmp) / "ddp.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--ddp-child", "--device", s.device,
               "--out", str(out), *(["--smoke"] if s.smoke else [])]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
                                  env={**os.environ, "NCCL_DEBUG": "WARN"})
            log, hung = _text(proc.stdout) + _text(proc.stderr), None
        except subprocess.TimeoutExpired as err:
            log = _text(err.stdout) + _text(err.stderr)
            hung = f"did not finish within {timeout_s:g} s (killed)"
        seconds = round(time.perf_counter() - t0, 2)
        doc = json.loads(out.read_text()) if out.is_file() else {}
    if "error" in doc:
        raise RuntimeError(f"DDP process: {doc['error']}")
    if "result" not in doc:
        why = hung or f"exited {proc.returncode} without a result"
        raise RuntimeError(f"the DDP process {why}; its output ends: {log[-300:]!r}")
    if hung:  # the steps and collectives passed; destroy_process_group did not return
        raise RuntimeError(f"the DDP process passed its steps but {hung} in destroy_process_group: "
                           f"{json.dumps(doc['result'])[:300]}")
    return {**doc["result"], "process": "child", "process_seconds": seconds, "log_tail": log[-1500:]}


# ------------------------------------------------------------------------------------------------
# the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON file written")
    p.add_argument("--smoke", action="store_true", help="every part on the CPU at tiny sizes (tests)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list, in order, of {', '.join(PARTS)}")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip parts (and step rows) not started by then or expected to overrun it")
    p.add_argument("--estimate", action="append", default=[], metavar="PART=SECONDS",
                   help="expected seconds of a part for the time guard (default PART_ESTIMATE_S)")
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
    p.add_argument("--ddp-child", action="store_true", help=argparse.SUPPRESS)  # the ddp part's process
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in args.parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    precisions = args.precisions.split(",")
    if not set(precisions) <= {"fp32", "bf16"}:
        p.error(f"--precisions takes fp32 and/or bf16, got {args.precisions}")
    estimates = {}
    for item in args.estimate:
        name, _, value = item.partition("=")
        try:
            estimates[name.strip()] = float(value)
        except ValueError:
            p.error(f"--estimate takes PART=SECONDS, got {item!r}")
        if name.strip() not in PARTS:
            p.error(f"--estimate: unknown part {name.strip()!r}; choose from {', '.join(PARTS)}")
    args.estimate = estimates
    return args


def make_settings(args: argparse.Namespace, reference: dict[str, Any] | None) -> Settings:
    from hq_ptq.distributed import default_backend

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
        ddp_backend=default_backend(),
        export=args.export,
        estimates={**(SMOKE_ESTIMATE_S if smoke else PART_ESTIMATE_S), **getattr(args, "estimate", {})},
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
    if step.get("status") in ("ok", "running") and "result" in step:
        summary["step"] = step["result"]["goals"]
        failed = {
            f"{r['part']}/{r['backend']}/{r['precision']}/{r['model']}": r.get("error", r.get("skipped"))
            for r in step["result"]["rows"]
            if "ms" not in r
        }
        if failed:
            summary["step_rows_missing"] = failed
    fallbacks: dict[str, Any] = {}
    for name in ("digits_cuda", "digits_cpu"):
        found = (parts.get(name, {}).get("result") or {}).get("fisher_log")
        if found:
            fallbacks[name] = found
    for r in (step.get("result") or {}).get("rows", []):
        if r.get("fisher_log"):
            fallbacks[f"step/{r['part']}/{r['backend']}/{r['precision']}"] = r["fisher_log"]
    summary["fisher_fallbacks"] = fallbacks
    ddp = parts.get("ddp", {})
    summary["ddp_ok"] = (
        None if not ddp or ddp.get("status") == "running"
        else ddp.get("status") == "ok" and bool(ddp["result"].get("ok"))
    )
    return summary


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2, default=str) + "\n")


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\n== gpu_check: {m.get('gpu_name') or 'no GPU'}, torch {m['torch']}, CUDA {m['cuda_version']}, "
          f"{report['elapsed_s']:.0f} s, settings {'smoke' if report['settings']['smoke'] else 'full'}, "
          f"TF32 convolutions on CUDA {m['tf32'].get('tf32_convolutions')}")
    if report.get("prepare"):
        print(f"prepare: {report['prepare']}")
    for name, entry in report["parts"].items():
        tail = entry.get("error") or entry.get("reason") or ""
        print(f"{name:12s} {entry['status']:8s} {entry.get('seconds', 0):7.1f} s "
              f"(~{entry.get('estimate_s', 0):.0f} s expected)  {tail}")
    summary = report["summary"]
    d = summary.get("digits", {})
    if "accuracy" in d:
        acc = {k: {w: "-" if v is None else f"{v:.4f}" for w, v in a.items()}
               for k, a in d["accuracy"].items()}
        print(f"digits on {d['device']}: fp {acc['fp']['device']} ptq {acc['ptq']['device']} "
              f"qat {acc['qat']['device']} | cpu ({d['cpu_source']}): fp {acc['fp']['cpu']} "
              f"ptq {acc['ptq']['cpu']} qat {acc['qat']['cpu']} | |qat diff| "
              f"{d['abs_diff_points']['qat']} pt, "
              f"<= 0.5: {d['qat_within_goal']} | same settings {d['same_settings']} | same split "
              f"{d['same_split']} | bits {d['avg_bits']} | wall s {d['wall_s']}")
    step = report["parts"].get("step", {})
    if step.get("status") == "ok":
        print(f"{'part':6s} {'backend':9s} {'precision':24s} {'model':6s} {'ms':>9s} {'peak MiB':>9s}")
        for r in step["result"]["rows"]:
            if "ms" in r:
                cell = f"{r['ms']:9.2f} {r['peak_mib'] if r['peak_mib'] is not None else '-':>9}"
            else:
                cell = (r.get("error") or r.get("skipped", ""))[:80]
            print(f"{r['part']:6s} {r['backend']:9s} {r['label']:24s} {r['model']:6s} {cell}")
        g = summary["step"]
        best = g["qat_step_ms"]["best"]
        if best:
            print(f"QAT step best ({best['source']} rows) {best['config']} {best['ms']:.2f} ms "
                  f"(goal {g['qat_step_ms']['goal_ms']:g} ms, x{best['ratio_to_goal']})")
        for cfg, v in g["fake_quant_overhead"]["by_config"].items():
            print(f"fake-quant overhead {cfg}: {v['ratio']:.3f}x (goal <= {GOALS['fake_quant_overhead']})")
        for cfg, v in g["hvp_over_step"]["by_config"].items():
            print(f"HVP {cfg} {v['hvp_ms']:.2f} ms = {v['ratio']:.2f}x the float step (goal <= 3)")
        if g["fused_speedup_over_snntorch"]:
            print(f"fused over snnTorch: {g['fused_speedup_over_snntorch']}")
    if summary.get("fisher_fallbacks"):
        print(f"Fisher fallbacks: {json.dumps(summary['fisher_fallbacks'])[:400]}")
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
    if args.ddp_child:
        return ddp_child(s, out)
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

    def publish() -> None:
        report["elapsed_s"] = round(guard.elapsed(), 2)
        report["summary"] = summarize(report, s)
        write(report, out)

    needs_device = any(p in args.parts for p in ("digits_cuda", "step", "ddp"))
    if needs_device and _is_cuda(s.device) and not torch.cuda.is_available():
        report["error"] = "no CUDA device here: run with --smoke (CPU, tiny), or --parts digits_cpu"
        report["elapsed_s"] = guard.elapsed()
        write(report, out)
        print(f"gpu_check: {report['error']}; wrote {out}")
        return 2
    write(report, out)  # the machine at least, should the first part never return
    reads_reference = reference is not None or reference_error is not None
    digits_runs = "digits_cuda" in args.parts or ("digits_cpu" in args.parts and not reads_reference)
    print(f"[{guard.elapsed():6.1f} s] prepare ...", flush=True)
    report["prepare"] = prepare(s, args.parts, digits_runs)
    publish()
    print(f"[{guard.elapsed():6.1f} s] prepare: {report['prepare']}", flush=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)

    def digits_cpu() -> dict[str, Any]:
        if reference_error is not None:
            raise reference_error
        if reference is not None:
            return reference
        return {**digits_run(s, "cpu", work), "source": "run"}

    started = {"t0": 0.0}

    def step_progress(result: dict[str, Any]) -> None:  # the rows so far, should the run be killed
        entry = report["parts"]["step"]
        entry.update(result=result, seconds=round(time.perf_counter() - started["t0"], 2))
        publish()

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "digits_cuda": lambda: digits_run(s, s.device, work),
        "step": lambda: step_rows(s, guard, on_row=step_progress),
        "ddp": lambda: ddp_isolated(s, timeout_s=max(30.0, 4 * s.estimates.get("ddp", 15.0))),
        "digits_cpu": digits_cpu,
    }
    try:
        for name in args.parts:
            expected = 0.0 if name == "digits_cpu" and reads_reference else s.estimates.get(name, 0.0)
            skip = guard.reason(expected=expected)
            t0 = started["t0"] = time.perf_counter()
            if skip:
                entry: dict[str, Any] = {"status": "skipped", "reason": skip}
            else:
                print(f"[{guard.elapsed():6.1f} s] {name} (~{expected:.0f} s expected) ...", flush=True)
                report["parts"][name] = {"status": "running", "estimate_s": expected,
                                         "started_at_s": round(guard.elapsed(), 2)}
                publish()
                try:
                    if name == args.fail_part:
                        raise RuntimeError(f"forced failure of {name} (--fail-part)")
                    entry = {"status": "ok", "result": runners[name]()}
                except Exception as err:  # noqa: BLE001 - recorded; the next part still runs
                    entry = {"status": "error", "error": error_line(err),
                             "traceback": traceback.format_exc()[-2000:]}
                    partial = report["parts"][name].get("result")
                    if partial is not None:  # the step rows measured before the failure
                        entry["result"] = partial
                finally:
                    _free_memory(s.device)
            entry["estimate_s"] = expected
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            report["parts"][name] = entry
            publish()
            print(f"[{guard.elapsed():6.1f} s] {name}: {entry['status']} {entry['seconds']:.1f} s "
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
