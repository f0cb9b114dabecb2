"""Search quality on a validation split: which sensitivity metric and which allocator make the best plans.

    .venv/bin/python benchmarks/search_quality.py [--recipe fashion-spikformer] [--seeds 0,1,2]
        [--budgets 2.25,2.5,3.0,3.5] [--metrics loss,fisher,hessian,data_free] [--val 1000] [--threads 2]
        [--set section.key=value ...] [--out benchmarks/results]
    .venv/bin/python benchmarks/search_quality.py --compare A.json B.json METRIC   (two saved runs, paired)

For every seed (which draws the calibration batches and seeds Hutchinson's probes), every metric is analysed
once on the float model; then for every budget and allocator (greedy, MILP) the plan is applied to a fresh
copy, BatchNorm statistics are re-estimated as in a recipe run, and the plan's accuracy is measured on a
validation split held out of the TRAINING data (the dataset's ``val_subset``; the test set is never read).
Per metric it also records the analysis time and the rank correlation of its scores with the ``loss``
metric, the measured loss increase of each layer at each candidate alone (the ground truth).

Verdicts compare two settings seed by seed: the mean difference in validation accuracy with its paired 95%
Student-t interval, "better"/"worse" only when the interval excludes 0, else "tie".
Writes ``search_quality-<recipe>.json`` and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from scipy.stats import spearmanr

from hq_ptq import progress
from hq_ptq.api import analyze, recalibrate_bn, search_plan
from hq_ptq.bench.verdicts import paired_interval
from hq_ptq.pipeline import dataset_loaders, float_model, validation_loader
from hq_ptq.recipe import load_recipe
from hq_ptq.snn import detached_copy
from hq_ptq.state import apply_plan
from hq_ptq.train import evaluate

REPO = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("search_quality")


def _rank_correlations(table: dict, truth: dict) -> dict[str, float]:
    """Spearman of a metric's scores with the ground truth: over every (layer, candidate) entry, and the mean
    over candidates of the correlation across layers (how well it ranks layers for one candidate)."""
    keys = [(n, c) for n in truth for c in truth[n] if c in table.get(n, {})]
    entries = float(spearmanr([table[n][c] for n, c in keys], [truth[n][c] for n, c in keys]).statistic)
    per_cand = []
    for cand in {c for _, c in keys}:
        names = [n for n in truth if cand in truth[n] and cand in table.get(n, {})]
        if len(names) > 2:
            rho = spearmanr([table[n][cand] for n in names], [truth[n][cand] for n in names]).statistic
            if rho == rho:  # NaN when one side is constant
                per_cand.append(float(rho))
    return {"entries": entries, "layers": statistics.mean(per_cand) if per_cand else float("nan")}


def run(args) -> dict:
    recipe = load_recipe(args.recipe, args.set)
    base = recipe.quant
    fp = float_model(recipe)
    val = validation_loader(recipe, args.val)
    fp_acc = evaluate(fp, val, description="evaluate float on val")
    LOG.info("float accuracy on %d validation samples: %.4f", args.val, fp_acc)
    rows, analyses = [], []
    plan_cache: dict[tuple, float] = {}
    for seed in args.seeds:
        train, _ = dataset_loaders(recipe.data, seed)  # the seed draws the calibration batches
        calib = list(itertools.islice(train, base.search.calib_batches))
        bn_batches = list(itertools.islice(train, base.bn_recalibration_batches))
        tables = {}
        for metric in args.metrics:
            config = replace(base, seed=seed, cache_dir=None, search=replace(base.search, metric=metric))
            t0 = time.perf_counter()
            analysis = analyze(detached_copy(fp), calib_data=calib, config=config)
            seconds = time.perf_counter() - t0
            tables[metric] = analysis.table
            analyses.append({"seed": seed, "metric": metric, "seconds": seconds})
            for budget, method in itertools.product(args.budgets, ("greedy", "milp")):
                cfg = replace(config, search=replace(config.search, method=method))
                plan = search_plan(analysis, budget, cfg)
                key = (seed, tuple((c.name, c.scheme, c.bits) for c in plan.layers))
                if key not in plan_cache:  # the same plan on the same BN batches measures the same
                    model = detached_copy(fp)
                    apply_plan(model, plan, scale_init=config.scale_init)
                    if bn_batches:
                        recalibrate_bn(model, bn_batches, len(bn_batches))
                    plan_cache[key] = evaluate(model, val, description=f"{metric} {method} {budget}")
                rows.append({"seed": seed, "metric": metric, "method": method, "budget": budget,
                             "avg_bits": plan.avg_bits, "accuracy": plan_cache[key],
                             "pot_layers": sum(c.scheme == "pot" for c in plan.layers)})
                LOG.info("seed %d %s %s %.2f: %.4f (%.3f bits)", seed, metric, method, budget,
                         plan_cache[key], plan.avg_bits)
        if "loss" in tables:
            for a in analyses:
                if a["seed"] == seed:
                    a["rank_vs_loss"] = _rank_correlations(tables[a["metric"]], tables["loss"])
    return {"recipe": recipe.name, "fp_val_accuracy": fp_acc, "n_val": args.val, "seeds": args.seeds,
            "budgets": args.budgets, "metrics": args.metrics, "rows": rows, "analyses": analyses,
            "verdicts": verdicts(rows, args), "settings": {"calib_batches": base.search.calib_batches,
            "hutchinson_probes": base.search.hutchinson_probes,
            "bn_recalibration_batches": base.bn_recalibration_batches}}


def _accs(rows, **match) -> list[float]:
    hits = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return [r["accuracy"] for r in sorted(hits, key=lambda r: r["seed"])]


def verdicts(rows: list[dict], args) -> list[dict]:
    """Every metric against every other (greedy), and MILP against greedy (each metric), per budget."""
    out = []
    for budget in args.budgets:
        for a, b in itertools.combinations(args.metrics, 2):
            res = paired_interval(_accs(rows, metric=a, method="greedy", budget=budget),
                                  _accs(rows, metric=b, method="greedy", budget=budget))
            out.append({"budget": budget, "a": f"{a} greedy", "b": f"{b} greedy", **res})
        for m in args.metrics:
            res = paired_interval(_accs(rows, metric=m, method="milp", budget=budget),
                                  _accs(rows, metric=m, method="greedy", budget=budget))
            out.append({"budget": budget, "a": f"{m} milp", "b": f"{m} greedy", **res})
    return out


def markdown(res: dict) -> str:
    n = len(res["seeds"])
    lines = [f"Validation accuracy (%, mean over {n} seeds) of each metric's plan, {res['n_val']} held-out "
             f"training samples; float {100 * res['fp_val_accuracy']:.2f}%.", "",
             "| metric | method | " + " | ".join(f"{b:g} bits" for b in res["budgets"]) + " |",
             "|---|---|" + "---:|" * len(res["budgets"])]
    for metric, method in itertools.product(res["metrics"], ("greedy", "milp")):
        cells = []
        for b in res["budgets"]:
            accs = _accs(res["rows"], metric=metric, method=method, budget=b)
            cells.append(f"{100 * statistics.mean(accs):.2f}")
        lines.append(f"| {metric} | {method} | " + " | ".join(cells) + " |")
    lines += ["", "| metric | analysis s (mean) | Spearman vs loss, entries | Spearman vs loss, layers |",
              "|---|---:|---:|---:|"]
    for metric in res["metrics"]:
        a = [x for x in res["analyses"] if x["metric"] == metric]
        rank = [x["rank_vs_loss"] for x in a if "rank_vs_loss" in x]
        ent = f"{statistics.mean(r['entries'] for r in rank):.3f}" if rank else "n/a"
        lay = f"{statistics.mean(r['layers'] for r in rank):.3f}" if rank else "n/a"
        lines.append(f"| {metric} | {statistics.mean(x['seconds'] for x in a):.1f} | {ent} | {lay} |")
    lines += ["", "Paired differences (a − b, points, 95% interval over seeds):", "",
              "| budget | a | b | mean | ± | verdict |", "|---:|---|---|---:|---:|---|"]
    for v in res["verdicts"]:
        lines.append(f"| {v['budget']:g} | {v['a']} | {v['b']} | {100 * v['mean']:+.2f} | "
                     f"{100 * v['half_width']:.2f} | {v['verdict']} |")
    return "\n".join(lines)


def compare_runs(a_path: Path, b_path: Path, metric: str, method: str = "greedy") -> str:
    """Markdown: one metric's plans in two saved runs (e.g. two scale inits) with paired 95% intervals."""
    a, b = json.loads(Path(a_path).read_text()), json.loads(Path(b_path).read_text())
    lines = [f"| budget | {a_path.name} | {b_path.name} | a − b (points, 95%) | verdict |",
             "|---:|---:|---:|---:|---|"]
    for budget in a["budgets"]:
        x = _accs(a["rows"], metric=metric, method=method, budget=budget)
        y = _accs(b["rows"], metric=metric, method=method, budget=budget)
        v = paired_interval(x, y)
        lines.append(f"| {budget:g} | {100 * statistics.mean(x):.2f} | {100 * statistics.mean(y):.2f} | "
                     f"{100 * v['mean']:+.2f} ± {100 * v['half_width']:.2f} | {v['verdict']} |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--compare"]:  # --compare A.json B.json METRIC: two saved runs side by side
        print(compare_runs(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fashion-spikformer")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budgets", default="2.25,2.5,3.0,3.5")
    parser.add_argument("--metrics", default="loss,fisher,hessian,data_free")
    parser.add_argument("--val", type=int, default=1000, help="validation samples held out of training data")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], help="recipe override, e.g. qat.lr=1e-4")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.metrics = args.metrics.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("hq_ptq.swap").setLevel(logging.WARNING)
    progress.set_enabled(False)
    res = run(args)
    res["command"] = ".venv/bin/python benchmarks/search_quality.py " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"search_quality-{res['recipe']}.json"
    path.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(markdown(res))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
