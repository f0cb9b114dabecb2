"""Pareto benchmark from a source checkout: a command-line front end of :mod:`hq_ptq.bench`.

    .venv/bin/python benchmarks/pareto.py [--recipe digits-spikformer] [--quick] [--seeds 0,1,2] [--out DIR]
        [--qat-steps N] [--dnas-steps N] [--set section.key=value ...] [--threads N] [--write-docs]
    .venv/bin/python benchmarks/pareto.py --render benchmarks/results/pareto-RECIPE.json [--write-docs]

Every output goes to --out (default benchmarks/results of this checkout): pareto-<recipe>[-quick].json, .md
and .png. docs/BENCHMARKS.md and docs/pareto-<dataset>.png are rewritten only with --write-docs (full runs);
then the JSON goes to --out and the Markdown into the recipe's generated block. The rows, settings and
claims are described in hq_ptq/bench/__init__.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from hq_ptq import progress
from hq_ptq.bench import bench, markdown, render_saved

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOCS = REPO / "docs" / "BENCHMARKS.md"


def _say_where(paths: dict[str, Path]) -> None:
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if "doc" not in paths:
        print(f"{DOCS} left alone (pass --write-docs to rewrite its generated block and plot)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="digits-spikformer")
    parser.add_argument("--quick", action="store_true", help="1 seed, 10 QAT steps, 20 DNAS steps")
    parser.add_argument("--seeds", default=None, help="QAT seeds, e.g. 0,1,2")
    parser.add_argument("--qat-steps", type=int, default=None, help="common QAT steps (default 40; quick 10)")
    parser.add_argument("--dnas-steps", type=int, default=None, help="DNAS steps (default 150; quick 20)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for every output (default {RESULTS.relative_to(REPO)})")
    parser.add_argument("--set", action="append", default=[], help="recipe override, e.g. qat.lr=1e-4")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--write-docs", action="store_true",
                        help="rewrite the recipe's block of docs/BENCHMARKS.md and docs/pareto-<dataset>.png")
    parser.add_argument("--render", type=Path, default=None,
                        help="re-write JSON/Markdown/PNG (the docs with --write-docs) from a results JSON; "
                             "runs nothing")
    args = parser.parse_args()
    docs = DOCS if args.write_docs else None
    if args.render is not None:
        _say_where(render_saved(args.render, out=args.out, docs=docs))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("hq_ptq.swap").setLevel(logging.WARNING)
    progress.set_enabled(False)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    command = ".venv/bin/python benchmarks/pareto.py " + " ".join(sys.argv[1:])
    results, paths = bench(args.recipe, quick=args.quick, seeds=seeds, out=args.out or RESULTS,
                           qat_steps=args.qat_steps, dnas_steps=args.dnas_steps, overrides=args.set,
                           command=command.strip(), write_docs=args.write_docs, docs=DOCS)
    print(markdown(results, command))
    _say_where(paths)


if __name__ == "__main__":
    main()
