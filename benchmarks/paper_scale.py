"""Paper-scale models on CPU: what the analysis (each metric), QAT steps, a packed save + load and a QONNX
export with its verification cost for Spikformer-2-256 and SDT-2-256 at 128x128 and T = 16, on digits
upsampled through the DVS emulator (issue [J], item 4); with ``--models all``, the same table across the zoo.

    .venv/bin/python benchmarks/paper_scale.py [--models spikformer-2-256,sdt-2-256 | all] [--batch 2]
        [--calib-batches 1] [--metrics fisher,data_free,hessian,loss] [--hessian-probes 4]
        [--loss-batches 1] [--qat-steps 1] [--export] [--threads 2] [--out benchmarks/results]

Each model is measured in a child process of its own, so its peak resident memory (``ru_maxrss``, which only
grows) is its own and not the previous model's. Per model: the float forward on one batch, each metric's
analysis on ``--calib-batches`` calibration batches of ``--batch`` samples (the loss metric on
``--loss-batches`` of them: it runs one forward per layer and candidate and batch), the greedy search at
3.5 bits, QAT steps on those batches with the float model as teacher, a packed save + load, and
(``--export``) ``export_qonnx`` of the quantized model at batch 1 and ``verify_export`` on another
sample. Every stage records its seconds and the peak memory after it. Models run at their own
``img_size`` (the zoo's tiny models at 32 px) with T = 16; the digits images are upsampled to 3/4 of the
sensor and moved through the emulator. The models are untrained (random init; BatchNorm running statistics
set to their average over the calibration batches, as a trained checkpoint has them, so that the LIFs fire
and gradients reach every layer): the figures are costs, not accuracies.
``paper_scale.json`` is rewritten after every model, so a stopped run keeps the finished ones.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import resource
import subprocess
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
from hq_ptq.export import export_qonnx, verify_export
from hq_ptq.files import atomic_write_text
from hq_ptq.models import build_model, list_models
from hq_ptq.pack import load, save
from hq_ptq.qat import finetune
from hq_ptq.snn import detached_copy, reset_states
from hq_ptq.state import apply_plan

REPO = Path(__file__).resolve().parents[1]
T = 16


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _Warnings(logging.Handler):
    """Keeps the hq_ptq warnings of one stage (e.g. Hutchinson layers short of their tolerance)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _timed(out: dict, key: str, fn):
    """Run ``fn()``; record its seconds, the peak memory after it and hq_ptq's warnings under ``out[key]``."""
    handler = _Warnings()
    logging.getLogger("hq_ptq").addHandler(handler)
    t0 = time.perf_counter()
    try:
        result = fn()
    finally:
        logging.getLogger("hq_ptq").removeHandler(handler)
    out[key] = {"seconds": time.perf_counter() - t0, "peak_gb": _peak_gb()}
    if handler.messages:
        out[key]["warnings"] = handler.messages
    logging.info("%s %.1fs, peak %.2f GB", key, out[key]["seconds"], out[key]["peak_gb"])
    return result


def measure(name: str, args) -> dict:
    out: dict = {"model": name}
    model = build_model(name, num_classes=10)
    size = model.config.img_size
    out["parameters"] = sum(p.numel() for p in model.parameters())
    out["img_size"] = size
    n_batches = max(args.calib_batches, 2) + 1  # the last one, at batch 1, checks the export
    train, _ = make_loaders("digits", batch_size=args.batch, T=T, size=size, image_size=size * 3 // 4,
                            train_subset=max(10, n_batches * args.batch), test_subset=10)
    batches = list(itertools.islice(train, n_batches))
    calib, held_out = batches[:-1], batches[-1]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:  # the average over the batches (momentum None): initial statistics leave the LIFs silent
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x, _ in calib:
            reset_states(model)
            model(x)
    for m in norms:
        m.momentum = 0.1
    model.eval()

    def forward():
        with torch.no_grad():
            reset_states(model)
            model(calib[0][0])

    _timed(out, "forward", forward)
    out["analysis"] = {}
    analyses = {}
    for metric in args.metrics:
        n = args.loss_batches if metric == "loss" else args.calib_batches
        config = QuantConfig(search=SearchConfig(metric=metric, calib_batches=n,
                                                 hutchinson_probes=args.hessian_probes))
        analyses[metric] = _timed(out["analysis"], metric,
                                  lambda n=n, config=config: analyze(detached_copy(model),
                                                                     calib_data=calib[:n], config=config))
        out["analysis"][metric]["calib_samples"] = n * args.batch
    # the plan of the default metric when it was measured (the cost of the plan does not depend on it)
    chosen = analyses.get("fisher", analyses[args.metrics[-1]])
    plan = _timed(out, "search", lambda: search_plan(chosen, 3.5, QuantConfig()))
    out["avg_bits"] = plan.avg_bits
    q = detached_copy(model)
    apply_plan(q, plan)
    if args.qat_steps:
        _timed(out, "qat", lambda: finetune(q, calib, teacher=model, config=QATConfig(steps=args.qat_steps)))
        out["qat"]["steps"] = args.qat_steps
        out["qat"]["seconds_per_step"] = out["qat"]["seconds"] / args.qat_steps
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.hqpt.safetensors"

        def save_load():
            save(q, path)
            load(path)

        _timed(out, "save_load", save_load)
        out["save_load"]["packed_bytes"] = path.stat().st_size
        if args.export:
            onnx = Path(tmp) / "m.onnx"
            x1 = held_out[0][:, :1]
            _timed(out, "export", lambda: export_qonnx(q, x1, onnx))
            out["export"]["bytes"] = onnx.stat().st_size
            report = _timed(out, "verify", lambda: verify_export(q, onnx, held_out[0][:, 1:2]))
            out["verify"].update({k: report[k] for k in ("executor", "max_abs_output_error", "spike_compare",
                                                         "spike_mismatches", "spikes_compared",
                                                         "first_spike_flip")})
            out["verify"]["spec_passed"] = report.get("spec_check", {}).get("passed")
    out["peak_gb"] = _peak_gb()
    return out


def table(path: Path) -> str:
    """The markdown table of one ``paper_scale.json``: per model, each stage's seconds, the peak memory."""
    res = json.loads(path.read_text())
    rows = res["rows"]
    metrics = [m for m in ("fisher", "data_free", "hessian", "loss")
               if any(m in r.get("analysis", {}) for r in rows)]

    def secs(stage: dict | None, key: str = "seconds") -> str:
        return "—" if stage is None else f"{stage[key]:.1f}"

    head = ["model", "parameters", "img", "forward s", *[f"{m} s" for m in metrics], "QAT s/step",
            "save+load s", "packed bytes", "export s", "verify s (max error)", "peak GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | " + " | ".join([r["error"]] + [""] * (len(head) - 2)) + " |")
            continue
        verify = r.get("verify")
        cells = [r["model"], f"{r['parameters']:,}", f"{r['img_size']}²", secs(r["forward"]),
                 *[secs(r["analysis"].get(m)) for m in metrics], secs(r.get("qat"), "seconds_per_step"),
                 secs(r["save_load"]), f"{r['save_load']['packed_bytes']:,}", secs(r.get("export")),
                 "—" if verify is None else f"{verify['seconds']:.1f} ({verify['max_abs_output_error']:.1g})",
                 f"{r['peak_gb']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="spikformer-2-256,sdt-2-256", help="comma-separated, or 'all'")
    parser.add_argument("--metrics", default="fisher,data_free")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--calib-batches", type=int, default=1)
    parser.add_argument("--loss-batches", type=int, default=1)
    parser.add_argument("--hessian-probes", type=int, default=4)
    parser.add_argument("--qat-steps", type=int, default=1)
    parser.add_argument("--export", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # measure this one model, print its row as JSON
    parser.add_argument("--report", type=Path, help="print the markdown table of this paper_scale.json")
    args = parser.parse_args()
    if args.report:
        print(table(args.report))
        return
    args.metrics = args.metrics.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    progress.set_enabled(False)
    if args.child:
        print("ROW " + json.dumps(measure(args.child, args)), flush=True)
        return
    names = list_models() if args.models == "all" else args.models.split(",")
    res = {"rows": [], "batch": args.batch, "calib_batches": args.calib_batches, "T": T,
           "context": {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} torch threads", "date": date.today().isoformat(),
                       "command": ".venv/bin/python benchmarks/paper_scale.py " + " ".join(sys.argv[1:])}}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "paper_scale.json"
    for name in names:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", name],
                               stdout=subprocess.PIPE, text=True)
        rows = [line[4:] for line in child.stdout.splitlines() if line.startswith("ROW ")]
        if child.returncode or not rows:
            res["rows"].append({"model": name, "error": f"child exited with {child.returncode}"})
        else:
            res["rows"].append(json.loads(rows[-1]))
        atomic_write_text(path, json.dumps(res, indent=1) + "\n")
        logging.info("%s", res["rows"][-1])
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
