"""Paper-scale models on CPU: what one analysis, one QAT step and a save/load cost for Spikformer-2-256 and
SDT-2-256 at 128x128 and T = 16, on digits upsampled through the DVS emulator (issue [J], item 4).

    .venv/bin/python benchmarks/paper_scale.py [--models spikformer-2-256,sdt-2-256] [--batch 2]
        [--metrics fisher,data_free] [--qat-steps 1] [--threads 2] [--out benchmarks/results]

Per model: float forward seconds on one batch, each metric's analysis seconds on one calibration batch
(``search.calib_batches=1``), the search, QAT steps, and a packed save + load, with the process's peak
resident memory after each stage (``ru_maxrss``, so it only grows). The models are untrained (random init,
BatchNorm statistics from two batches): the figures are costs, not accuracies. Writes
``paper_scale.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from hq_ptq import progress
from hq_ptq.api import analyze, search_plan
from hq_ptq.config import QATConfig, QuantConfig, SearchConfig
from hq_ptq.data import make_loaders
from hq_ptq.models import build_model
from hq_ptq.pack import load, save
from hq_ptq.qat import finetune
from hq_ptq.snn import detached_copy, reset_states
from hq_ptq.state import apply_plan

REPO = Path(__file__).resolve().parents[1]


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(name: str, args, batches: list) -> dict:
    out: dict = {"model": name}
    model = build_model(name, num_classes=10)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    model.train()
    with torch.no_grad():  # BatchNorm statistics of real inputs, so the LIFs fire
        for x, _ in batches[:2]:
            reset_states(model)
            model(x)
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        reset_states(model)
        model(batches[0][0])
    out["forward_s"] = time.perf_counter() - t0
    out["peak_gb_after_forward"] = _peak_gb()
    out["analysis"] = {}
    analysis = None
    for metric in args.metrics:
        config = QuantConfig(search=SearchConfig(metric=metric, calib_batches=1, hutchinson_probes=4))
        t0 = time.perf_counter()
        analysis = analyze(detached_copy(model), calib_data=batches[:1], config=config)
        out["analysis"][metric] = {"seconds": time.perf_counter() - t0, "peak_gb": _peak_gb()}
        logging.info("%s %s analysis %.1fs", name, metric, out["analysis"][metric]["seconds"])
    t0 = time.perf_counter()
    plan = search_plan(analysis, 3.5, QuantConfig())
    out["search_s"] = time.perf_counter() - t0
    out["avg_bits"] = plan.avg_bits
    q = detached_copy(model)
    apply_plan(q, plan)
    t0 = time.perf_counter()
    finetune(q, batches, teacher=model, config=QATConfig(steps=args.qat_steps))
    out["qat_s_per_step"] = (time.perf_counter() - t0) / args.qat_steps
    out["peak_gb_after_qat"] = _peak_gb()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = save(q, Path(tmp) / "m.hqpt.safetensors")
        load(path)
        out["save_load_s"] = time.perf_counter() - t0
        out["packed_bytes"] = path.stat().st_size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="spikformer-2-256,sdt-2-256")
    parser.add_argument("--metrics", default="fisher,data_free")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--qat-steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.metrics = args.metrics.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    progress.set_enabled(False)
    train, _ = make_loaders("digits", batch_size=args.batch, T=16, size=128, image_size=96,
                            train_subset=max(10, 4 * args.batch), test_subset=10)
    batches = list(itertools.islice(train, 3))
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name, args, batches))
        logging.info("%s", rows[-1])
    res = {"rows": rows, "batch": args.batch, "T": 16, "size": 128,
           "context": {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} torch threads", "date": date.today().isoformat(),
                       "command": ".venv/bin/python benchmarks/paper_scale.py " + " ".join(sys.argv[1:])}}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "paper_scale.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
