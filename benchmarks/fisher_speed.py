"""The default analysis (empirical Fisher) with one-pass per-sample gradients against single-sample
micro-batches: seconds, and that both give the same traces and the same plans.

    .venv/bin/python benchmarks/fisher_speed.py [--recipe fashion-spikformer] [--seeds 0,1,2]
        [--budgets 2.25,2.5,3.0] [--calib-batches 4] [--threads 1] [--set section.key=value ...]
        [--out benchmarks/results/fisher_speed-fashion-spikformer.json]

Each seed draws its own calibration batches exactly as ``benchmarks/separation.py`` does (same recipe
overrides, ``train.seed``/``quant.seed`` = seed, a fresh training loader), so the seconds here sit beside that
benchmark's DNAS search seconds. "analysis" is ``hq_ptq.analyze`` (traces, the candidates' weight errors at
their MSE scale, activity); "search" adds ``search_plan`` at every budget. No trace cache is used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from hq_ptq import progress, sensitivity
from hq_ptq.api import analyze, search_plan
from hq_ptq.bench.run import _seeded, _train_loader
from hq_ptq.pipeline import float_model
from hq_ptq.recipe import load_recipe
from hq_ptq.snn import detached_copy

REPO = Path(__file__).resolve().parents[1]


def _timed_search(float_net, recipe, budgets):
    config = replace(recipe.quant, cache_dir=None)
    t0 = time.perf_counter()
    analysis = analyze(detached_copy(float_net), calib_data=_train_loader(recipe), config=config)
    analysed = time.perf_counter() - t0
    plans = {b: search_plan(analysis, b, config) for b in budgets}
    return analysis, plans, analysed, time.perf_counter() - t0


def _plan_key(plan):
    return [(c.name, c.scheme, c.bits) for c in plan.layers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="fashion-spikformer")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budgets", default="2.25,2.5,3.0")
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    progress.set_enabled(False)
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    overrides = [*args.set, f"search.calib_batches={args.calib_batches}"]
    recipe = load_recipe(args.recipe, overrides)
    float_net = float_model(recipe)
    rows = []
    for seed in seeds:
        seeded = _seeded(recipe, overrides, seed, 0)
        fast, fast_plans, fast_analysis, fast_search = _timed_search(float_net, seeded, budgets)
        one_pass = sensitivity.per_sample_squared_norms
        sensitivity.per_sample_squared_norms = lambda *a: "switched off for the comparison"
        try:
            slow, slow_plans, slow_analysis, slow_search = _timed_search(float_net, seeded, budgets)
        finally:
            sensitivity.per_sample_squared_norms = one_pass
        worst = max(abs(fast.traces[n] - slow.traces[n]) / abs(slow.traces[n]) for n in slow.traces)
        rows.append({
            "seed": seed,
            "one_pass": {"analysis_s": fast_analysis, "search_s": fast_search},
            "micro_batches": {"analysis_s": slow_analysis, "search_s": slow_search},
            "trace_max_rel_diff": worst,
            "same_plans": {str(b): _plan_key(fast_plans[b]) == _plan_key(slow_plans[b]) for b in budgets},
        })
        print(f"seed {seed}: one-pass {fast_search:.1f} s, micro-batches {slow_search:.1f} s "
              f"(analysis {fast_analysis:.1f} / {slow_analysis:.1f} s), traces differ by <= {worst:.1e}, "
              f"same plans {rows[-1]['same_plans']}", flush=True)
    ratio = [r["micro_batches"]["search_s"] / r["one_pass"]["search_s"] for r in rows]
    out = args.out or REPO / "benchmarks" / "results" / f"fisher_speed-{args.recipe}.json"
    out.write_text(json.dumps({
        "command": ".venv/bin/python benchmarks/fisher_speed.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "date": date.today().isoformat(),
        "recipe": args.recipe, "calib_batches": args.calib_batches, "overrides": args.set, "budgets": budgets,
        "rows": rows,
        "summary": {
            "one_pass_search_s_mean": statistics.mean(r["one_pass"]["search_s"] for r in rows),
            "micro_batches_search_s_mean": statistics.mean(r["micro_batches"]["search_s"] for r in rows),
            "speedup_min": min(ratio), "speedup_max": max(ratio),
            "trace_max_rel_diff": max(r["trace_max_rel_diff"] for r in rows),
            "all_plans_same": all(all(r["same_plans"].values()) for r in rows),
        },
    }, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
