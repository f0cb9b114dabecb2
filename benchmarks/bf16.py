"""bfloat16 autocast against float32: QAT accuracy and seconds per step, and the sensitivity traces.

    .venv/bin/python benchmarks/bf16.py [--recipe digits-spikformer] [--seeds 0,1,2] [--budget 3.5]
        [--threads 1] [--set qat.steps=N ...] [--hessian-probes 0]
        [--out benchmarks/results/bf16-digits.json]

The default pipeline (``hq-ptq run``): one sensitivity analysis (the recipe's metric, fisher) and plan at
``--budget``, then for each seed s (``train.seed`` = ``quant.seed`` = s: shuffle, random shifts, QAT RNG) QAT
from the same float model in ``quant.precision`` fp32 and bf16, evaluated on the whole test set in float32.
The analysis runs in float32 in both (``hq_ptq.devices.analysis_autocast``); to decide that, the script also
computes the Fisher traces (and, with ``--hessian-probes N``, N Hutchinson probes) of the float model on the
same calibration batches under bfloat16 autocast, and records their rank agreement (Spearman) with the float32
ones, their relative differences, the seconds, and the plan the bf16 traces would give.

Accuracy tolerance, fixed before measuring: bf16 QAT is within tolerance when its mean test accuracy over the
seeds is within ``TOLERANCE_POINTS`` of fp32's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
from scipy.stats import spearmanr

from hq_ptq import progress
from hq_ptq.api import analyze, search_plan
from hq_ptq.files import atomic_write_text
from hq_ptq.pipeline import float_model, quantize_and_finetune, recipe_loaders
from hq_ptq.recipe import load_recipe
from hq_ptq.sensitivity import fill_dead_layers, fisher_traces, hutchinson_traces
from hq_ptq.snn import detached_copy, reset_states, stable_surrogates
from hq_ptq.swap import find_layers
from hq_ptq.train import evaluate

REPO = Path(__file__).resolve().parents[1]
TOLERANCE_POINTS = 1.0  # |mean bf16 accuracy - mean fp32 accuracy| in percentage points
PRECISIONS = ("fp32", "bf16")


class _Count(logging.Handler):
    """Counts the analysis' fallbacks from one-pass per-sample gradients to micro-batches, with the reason."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "no one-pass per-sample gradients" in message:
            self.reasons.append(message.split("(", 1)[1].rsplit(")", 1)[0])


def _traces(float_net, recipe, calib, metric: str, precision: str, probes: int) -> tuple[dict, float, list]:
    """``metric``'s traces of the float model on ``calib`` with the forwards (and backwards) under
    ``precision`` autocast, as hq_ptq.api.measure_traces calls them; seconds; micro-batch fallbacks."""
    model = detached_copy(float_net)
    names = find_layers(model, recipe.quant.include, recipe.quant.exclude)
    modules = dict(model.named_modules())
    layers = {n: modules[n] for n in names}
    counter = _Count()
    logger = logging.getLogger("hq_ptq.sensitivity")
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # counted, not printed
    logger.addHandler(counter)
    t0 = time.perf_counter()
    try:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        with stable_surrogates(model), autocast:
            if metric == "fisher":
                traces = fisher_traces(model, layers, calib, reset=reset_states)
            else:
                traces = hutchinson_traces(model, layers, calib, reset=reset_states, max_samples=probes,
                                           min_samples=probes, seed=recipe.quant.seed)
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)
        logger.propagate = propagate
    return traces, time.perf_counter() - t0, counter.reasons


def _compare(fp32: dict, bf16: dict) -> dict:
    names = list(fp32)
    rel = sorted(abs(bf16[n] - fp32[n]) / abs(fp32[n]) for n in names if fp32[n])
    return {
        "spearman": float(spearmanr([fp32[n] for n in names], [bf16[n] for n in names]).correlation),
        "rel_diff_median": statistics.median(rel),
        "rel_diff_max": rel[-1],
        "layers": len(names),
    }


def _plan_key(plan) -> list:
    return [(c.name, c.scheme, c.bits) for c in plan.layers]


def _bf16_plan(analysis, bf16: dict, budget: float, config):
    """The plan the analysis would give with ``bf16`` traces instead of its own (table = trace x error)."""
    scale = {n: bf16[n] / analysis.traces[n] for n in analysis.traces}
    table = {n: {c: v * scale[n] for c, v in row.items()} for n, row in analysis.table.items()}
    return search_plan(replace(analysis, table=table, traces=dict(bf16)), budget, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="digits-spikformer")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget", type=float, default=3.5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    parser.add_argument("--set", action="append", default=[], help="recipe override, e.g. qat.steps=40")
    parser.add_argument("--hessian-probes", type=int, default=0,
                        help="also compare this many Hutchinson probes in fp32 and bf16 (0: skip)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    progress.set_enabled(False)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    seeds = [int(s) for s in args.seeds.split(",")]
    recipe = load_recipe(args.recipe, args.set)
    began = time.perf_counter()
    float_net = float_model(recipe)
    train, test = recipe_loaders(recipe)
    fp_acc = evaluate(float_net, test)

    # the default pipeline's analysis and plan (float32 whatever the precision: hq_ptq.devices), on the
    # batches it draws from a fresh training loader: its first calib_batches, kept for the bf16 comparison
    calib = list(itertools.islice(iter(train), recipe.quant.search.calib_batches))
    t0 = time.perf_counter()
    analysis = analyze(detached_copy(float_net), calib_data=calib, config=recipe.quant)
    plan = search_plan(analysis, args.budget, recipe.quant)
    analysis_s = time.perf_counter() - t0
    print(f"analysis ({analysis.metric}) and plan in {analysis_s:.1f} s: {plan.avg_bits:.3f} bits",
          flush=True)

    # the traces under bf16 autocast, on the calibration batches of the analysis
    metrics = {}
    runs_of = [("fisher", 0)] + ([("hessian", args.hessian_probes)] if args.hessian_probes else [])
    for metric, probes in runs_of:
        got = {p: _traces(float_net, recipe, calib, metric, p, probes) for p in PRECISIONS}
        row = {
            **_compare(got["fp32"][0], got["bf16"][0]),
            "seconds": {p: got[p][1] for p in PRECISIONS},
            "micro_batch_fallbacks": {p: len(got[p][2]) for p in PRECISIONS} if metric == "fisher" else None,
            "fallback_reason_bf16": got["bf16"][2][0] if got["bf16"][2] else None,
            "traces": {p: got[p][0] for p in PRECISIONS},
        }
        if metric == "hessian":
            row["probes"] = probes
        if metric == analysis.metric:
            # the same batches as the analysis': its float32 traces are these, bit for bit
            same = fill_dead_layers(got["fp32"][0])[0] == analysis.traces
            row["fp32_traces_are_the_analysis_traces"] = same
            bf16_plan = _bf16_plan(analysis, fill_dead_layers(got["bf16"][0])[0], args.budget, recipe.quant)
            row["plan_layers_changed_by_bf16_traces"] = sum(
                x != y for x, y in zip(_plan_key(plan), _plan_key(bf16_plan), strict=True)
            )
            row["bf16_plan_avg_bits"] = bf16_plan.avg_bits
        metrics[metric] = row
        print(f"{metric} traces bf16 vs fp32: Spearman {row['spearman']:.4f}, relative difference median "
              f"{row['rel_diff_median']:.3f} max {row['rel_diff_max']:.3f}; seconds fp32 "
              f"{row['seconds']['fp32']:.1f}, bf16 {row['seconds']['bf16']:.1f}", flush=True)

    runs = []
    for seed in seeds:
        for precision in PRECISIONS:
            r = load_recipe(recipe.name, [*args.set, f"train.seed={seed}", f"quant.seed={seed}",
                                          f"quant.precision={precision}"])
            seeded_train, _ = recipe_loaders(r)
            tuned = quantize_and_finetune(detached_copy(float_net), plan, r, seeded_train, test, float_net)
            steps = r.quant.qat.steps
            runs.append({
                "seed": seed, "precision": precision, "ptq_accuracy": tuned.ptq_accuracy,
                "accuracy": tuned.accuracy, "qat_seconds": tuned.qat_seconds,
                "qat_seconds_per_step": tuned.qat_seconds / steps if steps else None,
            })
            print(f"seed {seed} {precision}: PTQ {100 * tuned.ptq_accuracy:.2f}%, QAT "
                  f"{100 * tuned.accuracy:.2f}% in {tuned.qat_seconds:.1f} s ({steps} steps)", flush=True)

    def of(precision: str, key: str) -> list[float]:
        return [x[key] for x in runs if x["precision"] == precision]

    summary = {}
    for precision in PRECISIONS:
        accs = of(precision, "accuracy")
        summary[precision] = {
            "accuracy_mean": statistics.mean(accs),
            "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "qat_seconds_per_step_mean": statistics.mean(of(precision, "qat_seconds_per_step")),
        }
    paired = [100 * (b - a) for a, b in zip(of("fp32", "accuracy"), of("bf16", "accuracy"), strict=True)]
    diff = 100 * (summary["bf16"]["accuracy_mean"] - summary["fp32"]["accuracy_mean"])
    summary["bf16_minus_fp32_points"] = diff
    summary["bf16_minus_fp32_points_per_seed"] = paired
    summary["bf16_over_fp32_seconds_per_step"] = (
        summary["bf16"]["qat_seconds_per_step_mean"] / summary["fp32"]["qat_seconds_per_step_mean"]
    )
    summary["tolerance_points"] = TOLERANCE_POINTS
    summary["qat_within_tolerance"] = abs(diff) <= TOLERANCE_POINTS
    summary["analysis_precision"] = "fp32"
    out = args.out or REPO / "benchmarks" / "results" / f"bf16-{args.recipe.split('-')[0]}.json"
    doc = {
        "command": ".venv/bin/python benchmarks/bf16.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, bf16 autocast on cpu",
        "date": date.today().isoformat(),
        "recipe": recipe.name,
        "overrides": args.set,
        "seeds": seeds,
        "budget": args.budget,
        "qat_steps": recipe.quant.qat.steps,
        "fp_accuracy": fp_acc,
        "plan_avg_bits": plan.avg_bits,
        "analysis_metric": analysis.metric,
        "analysis_seconds": analysis_s,
        "traces_bf16_vs_fp32": metrics,
        "runs": runs,
        "summary": summary,
        "total_seconds": time.perf_counter() - began,
    }
    atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
