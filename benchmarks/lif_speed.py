"""Speed of the LIF backends (snntorch / unrolled / fused) on this CPU, and the digits recipe end to end.

    .venv/bin/python benchmarks/lif_speed.py [--threads 1,2] [--repeats 5] [--e2e]
                                             [--e2e-backends snntorch,fused] [--e2e-threads 2]

Micro part (unless --skip-micro): spikformer-tiny, batch 32, T=8, 2x32x32 inputs (the digits recipe's):
* one LIF layer alone, fwd+bwd, at the model's widest LIF shape [8, 32, 256, 64];
* a training step of the whole model (forward, cross-entropy, backward), float and with 4-bit Brevitas
  fake-quant weights (``hq_ptq.quantize(model, budget=4)``, data-free plan);
* one Hutchinson Hessian-vector product (gradient with create_graph=True, then one HVP, eval mode, all
  conv/linear weights), as hq_ptq.sensitivity does per probe.
Backends run interleaved, round after round, and the minimum over rounds is reported (the median too):
the machine is shared, and the minimum is the least disturbed figure. The load average is recorded too.
The model-level parts also run a ``lif-free`` row: every LIF replaced by ``x * (x > 0.5)`` (two elementwise
ops, no time loop; not a neuron). It is the time of everything else in the step, so snntorch / lif-free is
the ceiling of any speed-up a LIF implementation can bring to that part.

End to end (--e2e): ``HQ_PTQ_LIF=<backend> hq-ptq run digits-spikformer --out /tmp/hq/lif/run-<backend>``
once per backend, in sequence, with the stage seconds from result.json and the whole command's wall time.
The QONNX export and its verification run the plain loop whatever the backend (tracing), so they do not move.

Results go to benchmarks/results/lif_speed.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

import hq_ptq
from hq_ptq.files import atomic_write_text
from hq_ptq.models import build_model
from hq_ptq.snn import BACKENDS, MultiStepLeaky, lif_backend

ROOT = Path(__file__).resolve().parents[1]


def calibrated_model(seed: int = 0, batch: int = 32, steps: int = 8) -> torch.nn.Module:
    """spikformer-tiny with BatchNorm statistics from random events, so it spikes in eval mode too."""
    torch.manual_seed(seed)
    model = build_model("spikformer-tiny", num_classes=10)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(steps, batch, 2, 32, 32).round())
    return model


LIF_FREE = "lif-free"


@contextmanager
def lif_free() -> Iterator[None]:
    """Every MultiStepLeaky computes ``x * (x > 0.5)`` instead of its time loop (a floor, not a neuron)."""

    def forward(self: MultiStepLeaky, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        spk = x * (x > 0.5).float()
        return (spk, x) if self.return_mem else spk

    saved = MultiStepLeaky.forward
    MultiStepLeaky.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        MultiStepLeaky.forward = saved  # type: ignore[method-assign]


def _running(name: str):  # noqa: ANN202 - a context manager
    return lif_free() if name == LIF_FREE else lif_backend(name)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, float]]:
    """Run each backend's ``fn`` once per round (after one warm-up), min and median seconds per backend."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        with _running(name):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            with _running(name):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {n: {"min_s": min(v), "median_s": statistics.median(v)} for n, v in times.items()}


def bench_layer(rounds: int, shape: tuple[int, ...] = (8, 32, 256, 64)) -> dict[str, dict[str, float]]:
    x0 = torch.randn(shape) * 1.5
    w = torch.randn(shape)
    layer = MultiStepLeaky(0.5, 1.0)

    def step() -> None:
        x = x0.clone().requires_grad_()
        (layer(x) * w).sum().backward()

    return interleaved(dict.fromkeys(BACKENDS, step), rounds)


def bench_train_step(model: torch.nn.Module, rounds: int) -> dict[str, dict[str, float]]:
    x = torch.rand(8, 32, 2, 32, 32).round()
    y = torch.randint(0, 10, (32,))
    model.train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    return interleaved(dict.fromkeys((*BACKENDS, LIF_FREE), step), rounds)


def bench_hvp(model: torch.nn.Module, rounds: int) -> dict[str, dict[str, float]]:
    x = torch.rand(8, 32, 2, 32, 32).round()
    y = torch.randint(0, 10, (32,))
    model.eval()
    params = [p for p in model.parameters() if p.dim() > 1]

    def hvp() -> None:
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        vs = [torch.randint_like(p, 2) * 2 - 1 for p in params]
        torch.autograd.grad(grads, params, vs)

    return interleaved(dict.fromkeys((*BACKENDS, LIF_FREE), hvp), rounds)


def quantized_copy(model: torch.nn.Module) -> torch.nn.Module:
    """``hq_ptq.quantize(copy, budget=4)`` with the data-free plan: Brevitas fake-quant weights."""
    qmodel = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "without calib_data uses the data-free weight metric"
        hq_ptq.quantize(qmodel, budget=4)
    return qmodel


def micro_parts(rounds: int) -> list[dict]:
    """The micro measurements at the current thread count."""
    model = calibrated_model()
    qmodel = quantized_copy(model)
    rows = []
    for part, fn in (
        ("lif layer fwd+bwd [8,32,256,64]", lambda: bench_layer(rounds)),
        ("spikformer-tiny train step (b32, T8)", lambda: bench_train_step(model, rounds)),
        ("same, 4-bit fake-quant weights (QAT step)", lambda: bench_train_step(qmodel, rounds)),
        ("spikformer-tiny Hutchinson HVP (b32, T8)", lambda: bench_hvp(model, max(2, rounds // 2))),
    ):
        load = os.getloadavg()[0]
        rows.append({"threads": torch.get_num_threads(), "part": part, "load_before": load, "backends": fn()})
    return rows


def micro(threads: list[int], rounds: int) -> list[dict]:
    # one process per thread count, with OMP_NUM_THREADS set before torch starts its thread pool
    rows = []
    for n in threads:
        env = {**os.environ, "OMP_NUM_THREADS": str(n)}
        cmd = [sys.executable, __file__, "--worker", "--repeats", str(rounds)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        for row in json.loads(out.strip().splitlines()[-1]):
            rows.append(row)
            ref = row["backends"]["snntorch"]["min_s"]
            cells = "  ".join(
                f"{b} {r['min_s'] * 1e3:7.1f} ms ({ref / r['min_s']:.2f}x)"
                for b, r in row["backends"].items()
            )
            print(f"[{n} thr, load {row['load_before']:.1f}] {row['part']:42s} {cells}", flush=True)
    return rows


def end_to_end(backends: list[str], threads: int, out_root: Path) -> list[dict]:
    rows = []
    for backend in backends:
        out = out_root / f"run-{backend}"
        shutil.rmtree(out, ignore_errors=True)
        env = {**os.environ, "HQ_PTQ_LIF": backend, "OMP_NUM_THREADS": str(threads), "HQ_PTQ_PROGRESS": "0"}
        cmd = [str(ROOT / ".venv/bin/hq-ptq"), "run", "digits-spikformer", "--out", str(out)]
        load = os.getloadavg()
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        result = json.loads((out / "result.json").read_text())
        stages = {k: round(v, 1) for k, v in result.get("seconds", {}).items()}
        rows.append(
            {
                "backend": backend,
                "command": f"HQ_PTQ_LIF={backend} OMP_NUM_THREADS={threads} {' '.join(cmd[1:])}",
                "threads": threads,
                "wall_s": round(wall, 1),
                "stages_s": stages,
                "rest_s": round(wall - sum(stages.values()), 1),  # data, evaluation, export, report
                "q_accuracy": result.get("q_accuracy"),
                "avg_bits": result.get("plan", {}).get("avg_bits"),
                "loadavg_before": load,
                "loadavg_after": os.getloadavg(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="torch thread counts for the micro part")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per backend (min is reported)")
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--e2e", action="store_true", help="also time the digits recipe end to end")
    parser.add_argument("--e2e-backends", default="snntorch,fused")
    parser.add_argument("--e2e-threads", type=int, default=2)
    parser.add_argument("--e2e-out", type=Path, default=Path("/tmp/hq/lif"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/lif_speed.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(micro_parts(args.repeats)))
        return

    report: dict = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if args.out.exists():  # keep the part not rerun
        report = {**json.loads(args.out.read_text()), **report}
    if not args.skip_micro:
        report["micro"] = micro([int(t) for t in args.threads.split(",")], args.repeats)
    if args.e2e:
        report["end_to_end"] = end_to_end(args.e2e_backends.split(","), args.e2e_threads, args.e2e_out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
