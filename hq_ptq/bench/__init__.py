"""Pareto benchmark: heterogeneous search against every baseline and the seed paper's search, in one run.

    hq-ptq bench RECIPE [--quick] [--seeds 0,1,2] [--out DIR] [--qat-steps N] [--dnas-steps N] [--set ...]
        [--write-docs] [--docs PATH]
    .venv/bin/python benchmarks/pareto.py [--recipe digits-spikformer] ... (same options, plus --threads)

Rows (:mod:`hq_ptq.bench.run`): FP32; homogeneous uniform 8/4/3/2 and PoT 4/3 bits, post-training and after
QAT (uniform 8 post-training only); uniform-only mixed precision, HAWQ-V3 style (the same sensitivity,
exact MILP over uniform candidates only); torchao weight-only int8 / int4 (``IntxWeightOnlyConfig``),
post-training only, naming the layers torchao refuses; differentiable search (Gumbel-softmax over scheme x
bits per layer with a budget penalty, :mod:`hq_ptq.dnas`), then QAT; ours: sensitivity-guided greedy at
several budgets (the recipe's metric), the MILP allocator and a greedy on the other metric (Hessian beside
Fisher, or the reverse), then QAT. Claims are decided by code
(:mod:`hq_ptq.bench.verdicts`); Markdown, plot and the docs block come from :mod:`hq_ptq.bench.render`.

Outputs: ``pareto-<recipe>[-quick].{json,md,png}`` in the output folder. Only with ``write_docs`` (the
``--write-docs`` flag) does a run touch the docs: then the JSON goes to the output folder, the plot to
``docs/pareto-<dataset>.png`` and the Markdown into this recipe's block of ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from hq_ptq.bench.render import (
    BEGIN,
    END,
    check_docs,
    markdown,
    plot,
    render_saved,
    update_doc,
    write_outputs,
)
from hq_ptq.bench.run import FULL, QUICK, BenchSettings, run_pareto
from hq_ptq.bench.verdicts import claims

__all__ = [
    "BEGIN", "DOCS", "END", "FULL", "QUICK", "RESULTS", "BenchSettings", "bench", "check_docs", "claims",
    "markdown", "plot", "render_saved", "run_pareto", "update_doc", "write_outputs",
]

# defaults, relative to the current folder (the root of a source checkout)
RESULTS = Path("benchmarks") / "results"
DOCS = Path("docs") / "BENCHMARKS.md"


def bench(
    recipe: str,
    *,
    quick: bool = False,
    seeds: list[int] | None = None,
    out: Path | None = None,
    qat_steps: int | None = None,
    dnas_steps: int | None = None,
    overrides: list[str] | tuple = (),
    command: str | None = None,
    settings: BenchSettings | None = None,
    write_docs: bool = False,
    docs: Path = DOCS,
) -> tuple[dict, dict[str, Path]]:
    """Run the benchmark and write its files; returns ``(results, {kind: path})``.

    Files go to ``out`` (default ``benchmarks/results``): ``pareto-<recipe>[-quick].{json,md,png}``. With
    ``write_docs``, the JSON still goes to ``out`` but the plot becomes ``pareto-<dataset>.png`` beside
    ``docs`` and the Markdown replaces this recipe's generated block of ``docs`` (full runs only).
    ``settings`` replaces the full/quick defaults; ``seeds``, ``qat_steps`` and ``dnas_steps`` override it.
    """
    if write_docs:  # before measuring anything
        check_docs(docs, quick)
    settings = settings or (QUICK if quick else FULL)
    changes = {}
    if seeds is not None:
        changes["seeds"] = tuple(seeds)
    if qat_steps is not None:
        changes["qat_steps"] = qat_steps
    if dnas_steps is not None:
        changes["dnas_steps"] = dnas_steps
    settings = replace(settings, **changes)
    results = run_pareto(recipe, settings, overrides)
    results["command"] = command or "hq-ptq " + " ".join(sys.argv[1:])
    folder = RESULTS if out is None else Path(out)
    return results, write_outputs(results, folder, quick=quick, docs=docs if write_docs else None)
