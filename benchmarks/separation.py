"""The benchmark that separates search methods: every method at every budget, PTQ and after QAT, over seeds,
on the full test set, with paired 95% intervals. Resumable: each measured cell is appended to a JSONL file at
once, and a rerun measures only the cells that are missing.

    .venv/bin/python benchmarks/separation.py [--recipe fashion-spikformer] [--seeds 0,1,2]
        [--budgets 2.25,2.0,3.0,2.5,2.75,3.5] [--rows ROW,...] [--shard I/N] [--threads 1]
        [--set section.key=value ...] [--out benchmarks/results/separation-fashion]
    .venv/bin/python benchmarks/separation.py --report [--out ...]     (summary of the cells measured so far)

A cell is (row, budget, seed). The seed draws the calibration batches (so each seed has its own analysis and
plans), the QAT shuffle, shifts and RNG, and the DNAS search. Rows:

- ``fisher greedy`` (the default search), ``fisher milp``, ``hessian greedy``, ``hessian milp``;
- ``uniform-only MP``: the default metric, exact MILP over uniform candidates only (HAWQ-V3 style);
- ``energy-aware``: the default search with ``energy_budget`` = 0.8 x the energy fraction of the same seed's
  default plan (same bit budget): is 20% less energy reachable, and what does it cost in accuracy;
- ``DNAS``: differentiable search (:mod:`hq_ptq.dnas`) at the same budget;
- ``uniform B``, ``pot B``: homogeneous, at integer budgets only;
- ``torchao int8``, ``torchao int4``: weight-only, post-training, seed-independent (measured with seed 0).

Every searched and homogeneous row keeps the recipe's protected layers, so average bits are comparable. Cells
are measured in the order given by ``--budgets`` then ``--rows`` (most informative first), seeds innermost, so
a run cut short leaves complete (row, budget) groups. ``--shard I/N`` takes every N-th cell starting at I, for
N processes on N cores (each appends to its own ``cells-I.jsonl``, or ``cells-TAG.jsonl`` with ``--tag``:
processes given disjoint ``--rows``/``--budgets`` need no sharding). ``--report`` writes
``separation-<recipe>.json`` (means, paired verdicts against the default) and prints Markdown.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from hq_ptq import progress
from hq_ptq.api import analyze, search_plan
from hq_ptq.bench.run import _measure_plan, _seeded, _torchao_row, _train_loader
from hq_ptq.bench.verdicts import paired_interval
from hq_ptq.dnas import DNASConfig, dnas_search
from hq_ptq.pipeline import float_model, recipe_loaders
from hq_ptq.recipe import load_recipe
from hq_ptq.search import homogeneous_plan
from hq_ptq.snn import detached_copy
from hq_ptq.train import evaluate, random_shift

REPO = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("separation")
DEFAULT_ROW = "fisher greedy"
ROWS = ("FP32", "fisher greedy", "uniform-only MP", "uniform B", "pot B", "DNAS", "energy-aware",
        "fisher milp", "hessian greedy", "hessian milp", "torchao")
ENERGY_FACTOR = 0.8  # the goal: >= 20% less estimated energy than the bits-only plan at equal accuracy


def _cells(budgets, rows, seeds) -> list[tuple[str, float, int]]:
    """(row, budget, seed) in measuring order; homogeneous rows at integer budgets, torchao once."""
    out = [("FP32", 0.0, seeds[0])]
    for budget, row in itertools.product(budgets, rows):
        if row in ("uniform B", "pot B"):
            if budget != int(budget):
                continue
            row = row.replace("B", str(int(budget)))
        if row in ("FP32", "torchao"):
            continue
        out += [(row, budget, s) for s in seeds]
    if "torchao" in rows:
        out += [("torchao int8", 0.0, seeds[0]), ("torchao int4", 0.0, seeds[0])]
    return out


def _key(row: str, budget: float, seed: int) -> str:
    return f"{row}|{budget:g}|{seed}"


def _load_cells(out: Path) -> dict[str, dict]:
    cells = {}
    for path in sorted(out.glob("cells-*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                cells[_key(rec["row"], rec["budget"], rec["seed"])] = rec
    return cells


class Context:
    """The float model, test set and per-seed analyses, built once per process and reused by every cell."""

    def __init__(self, args):
        self.args = args
        self.overrides = [*args.set, f"search.calib_batches={args.calib_batches}"]
        self.recipe = load_recipe(args.recipe, self.overrides)
        self.float_net = float_model(self.recipe)
        self.test = recipe_loaders(self.recipe)[1]
        self.analyses: dict[tuple[int, str], tuple] = {}
        self.cache = args.out / "cache"

    def seeded(self, seed: int):
        return _seeded(self.recipe, self.overrides, seed, self.args.qat_steps)

    def analysis(self, seed: int, metric: str):
        """(Analysis, seconds) of ``metric`` on seed ``seed``'s calibration draw; the traces are cached on
        disk, so the seconds recorded are those of the first computation (kept in ``analyses.json``)."""
        if (seed, metric) not in self.analyses:
            r = self.seeded(seed)
            search = replace(r.quant.search, metric=metric)
            config = replace(r.quant, cache_dir=str(self.cache), search=search)
            t0 = time.perf_counter()
            a = analyze(detached_copy(self.float_net), calib_data=_train_loader(r), config=config)
            seconds = time.perf_counter() - t0
            times_path = self.args.out / "analyses.json"
            times = json.loads(times_path.read_text()) if times_path.exists() else {}
            seconds = times.setdefault(f"{metric}|{seed}", seconds)
            times_path.write_text(json.dumps(times, indent=1) + "\n")
            self.analyses[seed, metric] = (a, config, seconds)
        return self.analyses[seed, metric]


def _plan(ctx: Context, row: str, budget: float, seed: int):
    """(plan, search seconds, notes) of one cell."""
    if row.startswith(("uniform ", "pot ")) and row != "uniform-only MP":
        scheme, bits = row.split()
        a, _, _ = ctx.analysis(seed, "fisher")
        return homogeneous_plan(a.table, a.sizes, scheme, int(bits), a.protected), 0.0, {}
    if row == "DNAS":
        r = ctx.seeded(seed)
        gen = torch.Generator().manual_seed(seed)
        shift = r.train.shift_augment
        plan = dnas_search(
            ctx.float_net, _train_loader(r), budget, config=r.quant,
            dnas=DNASConfig(steps=ctx.args.dnas_steps, seed=seed, weight_lr=r.quant.qat.lr),
            augment=(lambda x: random_shift(x, shift, gen)) if shift else None,
        )
        return plan, plan.meta["seconds"], {"dnas_expected_bits": plan.meta.get("expected_bits")}
    metric = "hessian" if row.startswith("hessian") else "fisher"
    a, config, analysis_s = ctx.analysis(seed, metric)
    method = "milp" if row.endswith("milp") or row == "uniform-only MP" else "greedy"
    search = replace(config.search, method=method)
    if row == "uniform-only MP":
        search = replace(search, schemes=("uniform",))
    config = replace(config, search=search)
    energy_budget, notes = None, {}
    if row == "energy-aware":
        reference = search_plan(a, budget, config).meta["energy_fraction"]
        energy_budget = ENERGY_FACTOR * reference
        notes = {"reference_energy_fraction": reference, "energy_budget": energy_budget}
    t0 = time.perf_counter()
    plan = search_plan(a, budget, config, energy_budget=energy_budget)
    return plan, analysis_s + time.perf_counter() - t0, notes


def measure(args) -> None:
    ctx = Context(args)
    done = _load_cells(args.out)
    todo = [c for c in _cells(args.budgets, args.rows, args.seeds) if _key(*c) not in done]
    index, count = args.shard
    todo = todo[index::count]
    LOG.info("%d cells to measure in this shard (%d done already)", len(todo), len(done))
    sink = args.out / f"cells-{args.tag or index}.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        for row, budget, seed in todo:
            t0 = time.perf_counter()
            rec: dict = {"row": row, "budget": budget, "seed": seed}
            if row == "FP32":
                rec.update(avg_bits=32.0, ptq_accuracy=evaluate(ctx.float_net, ctx.test),
                           n_test=sum(len(y) for _, y in ctx.test))
            elif row.startswith("torchao"):
                r = ctx.seeded(seed)
                a, _, _ = ctx.analysis(seed, "fisher")
                m = _torchao_row(ctx.float_net, ctx.test, int(row[-1]), sorted(a.protected), r)
                rec.update({k: m[k] for k in ("avg_bits", "ptq_accuracy", "energy_uj", "torchao_refused")})
            else:
                try:
                    plan, search_s, notes = _plan(ctx, row, budget, seed)
                except ValueError as exc:  # e.g. an energy budget no plan meets: a result, not a crash
                    rec.update(error=str(exc).splitlines()[0])
                else:
                    m = _measure_plan(plan, True, ctx.float_net, [(seed, ctx.seeded(seed))], ctx.test,
                                      Path(tmp), "cell")
                    rec.update(notes, search_seconds=search_s, avg_bits=m["avg_bits"],
                               ptq_accuracy=m["ptq_accuracy"], qat_accuracy=m["qat_accuracy"][0],
                               energy_uj=m["energy_uj"], size_bytes=m["size_bytes"], plan=m["plan"],
                               energy_fraction=plan.meta.get("energy_fraction"))
            rec["seconds"] = time.perf_counter() - t0
            with sink.open("a") as f:  # one line per cell, at once: a crash loses at most the cell running
                f.write(json.dumps(rec) + "\n")
            LOG.info("%s @ %g seed %d: %s", row, budget, seed,
                     rec.get("error") or f"PTQ {rec['ptq_accuracy']:.4f} QAT {rec.get('qat_accuracy', '-')}")


def _group(cells: dict, row: str, budget: float, seeds, field: str) -> list[float] | None:
    vals = []
    for s in seeds:
        rec = cells.get(_key(row, budget, s))
        if rec is None or field not in rec:
            return None
        vals.append(rec[field])
    return vals


def summarize(args) -> dict:
    """Means per (row, budget) over the seeds measured in full, and every row against the default, paired."""
    cells = _load_cells(args.out)
    seeds = args.seeds
    rows_seen = sorted({c["row"] for c in cells.values()}, key=lambda r: (ROWS.index(r) if r in ROWS else
                       ROWS.index(r.split()[0] + " B") if r.split()[0] in ("uniform", "pot") else 99, r))
    budgets = sorted({c["budget"] for c in cells.values() if c["budget"]})
    table, verdicts = [], []
    for row, budget in itertools.product(rows_seen, budgets + [0.0]):
        recs = [cells[k] for s in seeds if (k := _key(row, budget, s)) in cells]
        if not recs:
            continue
        entry = {"row": row, "budget": budget, "n": len(recs)}
        if any("error" in r for r in recs):
            entry["errors"] = sorted({r["error"] for r in recs if "error" in r})
        for field in ("avg_bits", "ptq_accuracy", "qat_accuracy", "energy_uj", "search_seconds"):
            vals = [r[field] for r in recs if r.get(field) is not None]
            if vals:
                entry[field] = statistics.mean(vals)
                if field.endswith("accuracy") and len(vals) > 1:
                    entry[field + "_std"] = statistics.stdev(vals)
        table.append(entry)
        if row == DEFAULT_ROW or not budget:  # FP32 and torchao have no budget
            continue
        # a homogeneous row spends its own average bits (protected layers kept): where the default search was
        # also measured at exactly that budget, that is the equal-bits comparison
        pairs = [budget]
        if row.split()[0] in ("uniform", "pot") and row != "uniform-only MP":
            equal = round(statistics.mean(r["avg_bits"] for r in recs), 4)
            if equal != budget and equal in budgets:
                pairs.append(equal)
        for ours_budget, field in itertools.product(pairs, ("qat_accuracy", "ptq_accuracy")):
            ours = _group(cells, DEFAULT_ROW, ours_budget, seeds, field)
            other = _group(cells, row, budget, seeds, field)
            if ours and other and len(seeds) > 1:
                verdicts.append({"budget": budget, "default_budget": ours_budget, "a": DEFAULT_ROW, "b": row,
                                 "field": field, **paired_interval(ours, other)})
    n_test = next((c.get("n_test") for c in cells.values() if c.get("n_test")), None)
    times_path = args.out / "analyses.json"
    return {"recipe": args.recipe, "seeds": seeds, "cells": len(cells), "n_test": n_test,
            "table": table, "verdicts": verdicts,
            "analysis_seconds": json.loads(times_path.read_text()) if times_path.exists() else {},
            "context": json.loads((args.out / "context.json").read_text())
            if (args.out / "context.json").exists() else {}}


def markdown(res: dict) -> str:
    lines = [f"Cells measured: {res['cells']}; seeds {res['seeds']}. Accuracy in % on the test set "
             f"(mean over the seeds measured, n = how many).", "",
             "| row | budget | n | avg bits | PTQ % | QAT % (mean ± std) | energy µJ | search s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in res["table"]:
        if "errors" in e and "qat_accuracy" not in e:
            lines.append(f"| {e['row']} | {e['budget']:g} | {e['n']} | — | — | {e['errors'][0]} | | |")
            continue
        qat = (f"{100 * e['qat_accuracy']:.2f} ± {100 * e.get('qat_accuracy_std', 0):.2f}"
               if "qat_accuracy" in e else "—")
        lines.append(f"| {e['row']} | {e['budget']:g} | {e['n']} | {e['avg_bits']:.3f} | "
                     f"{100 * e['ptq_accuracy']:.2f} | {qat} | {e.get('energy_uj', math.nan):.2f} | "
                     f"{e.get('search_seconds', 0):.1f} |")
    lines += ["", f"Paired differences, {DEFAULT_ROW} minus each row (points, 95% interval over seeds):", "",
              "| budget | row | after | mean | ± | verdict |", "|---:|---|---|---:|---:|---|"]
    for v in res["verdicts"]:
        at = v.get("default_budget", v["budget"])
        budget = f"{v['budget']:g}" if at == v["budget"] else f"{v['budget']:g} (default at {at:g})"
        lines.append(f"| {budget} | {v['b']} | {v['field'].split('_')[0].upper()} | "
                     f"{100 * v['mean']:+.2f} | {100 * v['half_width']:.2f} | {v['verdict']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fashion-spikformer")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budgets", default="2.25,2.0,3.0,2.5,2.75,3.5")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--qat-steps", type=int, default=40)
    parser.add_argument("--dnas-steps", type=int, default=150)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--shard", default="0/1", help="I/N: every N-th missing cell from the I-th")
    parser.add_argument("--tag", default="", help="name of this process's cells file (default: shard index)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], help="recipe override, e.g. qat.lr=1e-4")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "separation-fashion")
    parser.add_argument("--report", action="store_true", help="summarize the cells measured so far")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.rows = [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    i, n = (int(x) for x in args.shard.split("/"))
    args.shard = (i, n)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        res = summarize(args)
        path = args.out.parent / f"{args.out.name}.json"
        path.write_text(json.dumps(res, indent=1) + "\n")
        print(markdown(res))
        print(f"wrote {path}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("hq_ptq.swap", "hq_ptq.sensitivity"):
        logging.getLogger(name).setLevel(logging.WARNING)
    progress.set_enabled(False)
    context = args.out / "context.json"
    if not context.exists():
        context.write_text(json.dumps({
            "command": ".venv/bin/python benchmarks/separation.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "date": date.today().isoformat(), "qat_steps": args.qat_steps, "dnas_steps": args.dnas_steps,
            "calib_batches": args.calib_batches, "overrides": args.set,
        }, indent=1) + "\n")
    measure(args)


if __name__ == "__main__":
    main()
