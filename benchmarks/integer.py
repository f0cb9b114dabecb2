"""Integer-only inference against fake quantization: accuracy, spike mismatch and the NumPy reference check,
over membrane widths.

    .venv/bin/python benchmarks/integer.py [--recipe digits-spikformer] [--bits 16,14,12,10,8] [--threads 1]
        [--set section.key=value ...] [--out benchmarks/results]

The recipe's float model gets the recipe's default plan (its budget, metric and allocator, on its
calibration batches), BatchNorm re-estimated as in a recipe run, no QAT: that is the fake-quant model.
:func:`hq_ptq.integerize` then builds its integer twin at each membrane width from two calibration
batches, and both are evaluated on the recipe's test set. The NumPy int64 reference is run on one test
batch at every width and must reproduce the integer model's outputs bit for bit. Writes
``integer-<recipe>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from hq_ptq import progress
from hq_ptq.api import quantize, recalibrate_bn
from hq_ptq.integer import compare, integerize, reference_mode
from hq_ptq.pipeline import float_model, recipe_loaders
from hq_ptq.recipe import load_recipe
from hq_ptq.state import get_plan

REPO = Path(__file__).resolve().parents[1]


def run(args) -> dict:
    recipe = load_recipe(args.recipe, args.set)
    fp = float_model(recipe)
    train, test = recipe_loaders(recipe)
    q = recipe.quant
    calib = list(itertools.islice(train, q.search.calib_batches))
    t0 = time.perf_counter()
    fake = quantize(fp, budget=recipe.budget, calib_data=calib, config=q)
    if q.bn_recalibration_batches:
        recalibrate_bn(fake, list(itertools.islice(train, q.bn_recalibration_batches)),
                       q.bn_recalibration_batches)
    plan = get_plan(fake)
    logging.info("plan %.3f bits in %.1fs", plan.avg_bits, time.perf_counter() - t0)
    probe = calib[:2]
    first_test = next(iter(test))[0]
    rows = []
    fake_acc = None
    for bits in args.bits:
        t0 = time.perf_counter()
        integer, report = integerize(fake, probe, membrane_bits=bits)
        res = compare(fake, integer, test)
        fake_acc = res["fake_accuracy"]
        with torch.no_grad():
            got = integer(first_test)
            with reference_mode(integer):
                want = integer(first_test)
        rows.append({"membrane_bits": bits, **res, "reference_bit_exact": bool(torch.equal(got, want)),
                     "threshold_bits": {n: v["threshold_bits"] for n, v in report.neurons.items()},
                     "mult_max": max(v["mult_max"] for v in report.synapses.values()),
                     "seconds": time.perf_counter() - t0})
        logging.info("%d-bit membranes: integer %.4f fake %.4f mismatch %.4f", bits, res["integer_accuracy"],
                     fake_acc, res["spike_mismatch"])
    within = [r["membrane_bits"] for r in rows if abs(r["integer_accuracy"] - fake_acc) <= 0.001 + 1e-12]
    return {
        "recipe": recipe.name, "overrides": args.set, "avg_bits": plan.avg_bits,
        "n_test": rows[0]["samples"], "fake_accuracy": fake_acc, "rows": rows,
        "smallest_width_within_0.1pt": min(within) if within else None,
        "context": {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                    f"{torch.get_num_threads()} torch threads", "date": date.today().isoformat(),
                    "command": ".venv/bin/python benchmarks/integer.py " + " ".join(sys.argv[1:])},
    }


def markdown(res: dict) -> str:
    lines = [f"{res['recipe']}: default plan {res['avg_bits']:.3f} bits, {res['n_test']} test samples, "
             f"fake-quant {100 * res['fake_accuracy']:.2f}%.", "",
             "| membrane bits | integer % | Δ vs fake-quant (pts) | spike mismatch | NumPy reference |",
             "|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['membrane_bits']} | {100 * r['integer_accuracy']:.2f} | "
                     f"{100 * (r['integer_accuracy'] - r['fake_accuracy']):+.2f} | "
                     f"{100 * r['spike_mismatch']:.2f}% | "
                     f"{'bit-exact' if r['reference_bit_exact'] else 'DIFFERS'} |")
    lines.append(f"\nSmallest width within 0.1 point: {res['smallest_width_within_0.1pt']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="digits-spikformer")
    parser.add_argument("--bits", default="16,14,12,10,8")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", action="append", default=[],
                        help="recipe override, e.g. data.test_subset=2000")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.bits = [int(b) for b in args.bits.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("hq_ptq.swap", "hq_ptq.sensitivity", "hq_ptq.api"):
        logging.getLogger(name).setLevel(logging.WARNING)
    progress.set_enabled(False)
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"integer-{res['recipe']}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(markdown(res))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
