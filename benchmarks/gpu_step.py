"""Training step, QAT step and Hessian-vector product on a GPU, LIF backends side by side (issues [D], [E]).

    .venv/bin/python benchmarks/gpu_step.py [--model spikformer-2-256] [--T 16] [--batch 16] [--img 128]
                                            [--backends snntorch,unrolled,fused] [--repeats 10]

Per backend (snntorch: snn.Leaky per step; unrolled; fused: hq_ptq.lif.FusedLIF), on random DVS-like events
[T, B, 2, img, img]:
* ``fp32``: a training step (forward, cross-entropy, backward, AdamW step);
* ``bf16``: the same under ``torch.autocast(dtype=torch.bfloat16)``;
* ``qat_fp32`` / ``qat_bf16``: the same on ``hq_ptq.quantize(model, budget=4)`` (data-free plan, Brevitas
  fake-quant weights, computed once per forward on the time-folded tensor);
* ``hvp``: one Hutchinson Hessian-vector product (gradient with create_graph=True, one HVP, eval mode,
  every conv/linear weight), as hq_ptq.sensitivity does per probe.
Each is the median over ``--repeats`` after 3 warm-up runs, with ``torch.cuda.synchronize()``, and the peak
memory of that measurement (``torch.cuda.max_memory_allocated``). A configuration that fails is recorded with
its error and the others go on. Without CUDA the script says so and exits 0; ``--device cpu`` runs the same
code on the CPU (use tiny shapes: ``--model spikformer-tiny --T 2 --batch 2 --img 32``).

Results go to benchmarks/results/gpu_step.json (with the GPU's name).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import hq_ptq
from hq_ptq.models import build_model
from hq_ptq.snn import BACKENDS, lif_backend

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("fp32", "bf16", "qat_fp32", "qat_bf16", "hvp")


def make_models(
    name: str, img: int, steps: int, batch: int, device: str, quantized: bool = True, seed: int = 0
) -> dict:
    """Float and quantized (4-bit budget, data-free plan) copies, BN statistics set from random events."""
    torch.manual_seed(seed)
    model = build_model(name, img_size=img, num_classes=10)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: a few batches give usable eval statistics
    model = model.to(device)
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(steps, batch, 2, img, img, device=device).round())
    if not quantized:
        return {"float": model}
    quant = copy.deepcopy(model).cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "without calib_data uses the data-free weight metric"
        hq_ptq.quantize(quant, budget=4)
    return {"float": model, "quant": quant.to(device)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], device: str, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of ``fn`` and (on CUDA) its peak memory in MiB."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan")
    return {"ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "peak_mib": peak}


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> Callable[[], None]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    autocast = (
        torch.autocast(device_type=x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def hvp_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    model.eval()
    params = [p for p in model.parameters() if p.dim() > 1]

    def step() -> None:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        vs = [torch.randint_like(p, 2) * 2 - 1 for p in params]
        torch.autograd.grad(grads, params, vs)

    return step


def run(
    name: str = "spikformer-2-256",
    steps: int = 16,
    batch: int = 16,
    img: int = 128,
    backends: tuple[str, ...] = BACKENDS,
    parts: tuple[str, ...] = PARTS,
    repeats: int = 10,
    device: str = "cuda",
) -> list[dict]:
    """One row per (backend, part): ``{"backend", "part", "ms", "min_ms", "peak_mib"}`` or ``{"error"}``."""
    models = make_models(name, img, steps, batch, device, quantized=any(p.startswith("qat") for p in parts))
    x = torch.rand(steps, batch, 2, img, img, device=device).round()
    y = torch.randint(0, 10, (batch,), device=device)
    rows = []
    for part in parts:
        for backend in backends:
            # a fresh copy per measurement: optimizer steps must not move the next backend's weights
            model = copy.deepcopy(models["quant" if part.startswith("qat") else "float"])
            if part == "hvp":
                fn = hvp_step(model, x, y)
            else:
                fn = train_step(model, x, y, bf16=part.endswith("bf16"))
            row = {"backend": backend, "part": part}
            try:
                with lif_backend(backend):
                    row.update(measure(fn, device, repeats))
            except Exception as err:  # noqa: BLE001 - one failing configuration must not stop the others
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model, fn
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="spikformer-2-256")
    parser.add_argument("--T", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img", type=int, default=128)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu_step.json")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_step: no CUDA device here; nothing measured (pass --device cpu for a CPU smoke run)")
        return 0
    rows = run(
        args.model,
        args.T,
        args.batch,
        args.img,
        tuple(args.backends.split(",")),
        tuple(args.parts.split(",")),
        args.repeats,
        args.device,
    )
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report = {
        "device": gpu,
        "torch": torch.__version__,
        "config": {"model": args.model, "T": args.T, "batch": args.batch, "img": args.img},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
