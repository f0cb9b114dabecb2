"""Pareto benchmark: heterogeneous search against every baseline and the seed paper's search, in one run.

    .venv/bin/python benchmarks/pareto.py [--recipe digits-spikformer] [--quick] [--seeds 0,1,2] [--out DIR]
        [--qat-steps N] [--dnas-steps N] [--set section.key=value ...] [--threads N]
    hq-ptq bench RECIPE [--quick] [--seeds 0,1,2] [--out DIR] [--qat-steps N] [--dnas-steps N] [--set ...]

Every row starts from the same float checkpoint, is evaluated on the same test set and, where it is
fine-tuned, gets the same QAT (the recipe's QAT settings with a common step count) with the same seeds; the
seed sets the shuffle order, the random shifts and the QAT RNG. Rows:

* FP32;
* homogeneous uniform 8/4/3/2 and PoT 4/3 bits, post-training and after QAT (uniform 8 post-training only);
* uniform-only mixed precision, HAWQ-V3 style: the same Hessian sensitivity, exact MILP over uniform
  candidates only;
* torchao weight-only int8 / int4 (``IntxWeightOnlyConfig``), post-training only, naming the layers torchao
  refuses;
* differentiable search (Gumbel-softmax over scheme x bits per layer with a budget penalty,
  ``hq_ptq.dnas``), then QAT;
* ours: Hessian-guided greedy at several budgets and the MILP allocator, then QAT.

One sensitivity analysis serves every Hessian row. Every row that searches, and every homogeneous row, keeps
the recipe's protected layers (first and last at uniform 8 bits), so average bits are comparable; the torchao
int4 row keeps them at int8 too. Outputs: results JSON, a Markdown section (written into docs/BENCHMARKS.md
for a full run without --out) and a Pareto PNG (accuracy against average bits).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import torch

from hq_ptq import progress
from hq_ptq.api import analyze, get_plan, search_plan
from hq_ptq.baselines import torchao_weight_only
from hq_ptq.checkpoint import save_float
from hq_ptq.dnas import DNASConfig, dnas_search
from hq_ptq.energy import estimate_energy, measure_activity
from hq_ptq.files import atomic_write, atomic_write_text
from hq_ptq.pack import inspect, save
from hq_ptq.pipeline import float_model, quantize_and_finetune, recipe_loaders
from hq_ptq.plan import Plan
from hq_ptq.recipe import Recipe, load_recipe
from hq_ptq.search import allocate, homogeneous_plan
from hq_ptq.snn import detached_copy
from hq_ptq.train import evaluate, random_shift

log = logging.getLogger("hq_ptq.bench")

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- pareto:begin -->", "<!-- pareto:end -->"

HOMOGENEOUS = (("uniform", 8), ("uniform", 4), ("uniform", 3), ("uniform", 2), ("pot", 4), ("pot", 3))
FAMILIES = {
    "fp32": ("FP32", "*", "black"),
    "uniform": ("homogeneous uniform", "s", "tab:blue"),
    "pot": ("homogeneous PoT", "D", "tab:cyan"),
    "uniform-mp": ("uniform-only MP (HAWQ-V3 style)", "^", "tab:orange"),
    "torchao": ("torchao weight-only", "v", "tab:gray"),
    "dnas": ("DNAS (Gumbel-softmax)", "P", "tab:purple"),
    "ours-greedy": ("ours: Hessian greedy", "o", "tab:red"),
    "ours-milp": ("ours: Hessian MILP", "X", "tab:green"),
    "ours-fisher": ("ours: Fisher greedy", "h", "tab:brown"),
}
HETERO = ("ours-greedy", "ours-milp")
# a homogeneous and a heterogeneous row count as "equal average bits" within this many bits
EQUAL_BITS_TOL = 0.1


@dataclass(frozen=True)
class BenchSettings:
    """What one benchmark run measures.

    Args:
        seeds: QAT seeds; accuracy is reported as mean ± std over them.
        qat_steps: the common QAT step count of every fine-tuned row.
        dnas_steps: differentiable-search steps.
        budgets: budgets of the Hessian-guided greedy rows.
        compare_budget: budget of the MILP, uniform-only MP and DNAS rows.
        homogeneous: (scheme, bits) of the homogeneous rows.
        ptq_only: labels of rows measured after PTQ only (no QAT).
        recipe_overrides: ``section.key=value`` applied before the user's overrides.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    qat_steps: int = 40
    dnas_steps: int = 150
    budgets: tuple[float, ...] = (4.0, 3.5, 3.0, 2.5)
    compare_budget: float = 3.5
    homogeneous: tuple[tuple[str, int], ...] = HOMOGENEOUS
    ptq_only: tuple[str, ...] = ("uniform 8-bit",)
    recipe_overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed, e.g. 0,1,2")
        if self.qat_steps < 0 or self.dnas_steps < 1:
            raise ValueError(
                f"need qat_steps >= 0 and dnas_steps >= 1, got {self.qat_steps}, {self.dnas_steps}"
            )


FULL = BenchSettings()
# a smoke run: one seed, token QAT and search, Hutchinson from 16 probes instead of the recipe's
QUICK = BenchSettings(seeds=(0,), qat_steps=10, dnas_steps=20, recipe_overrides=("search.max_samples=16",))


# ---------------------------------------------------------------------------------------------
# measuring


def _seeded(recipe: Recipe, overrides: list[str], seed: int, qat_steps: int) -> Recipe:
    return load_recipe(
        str(recipe.path), [*overrides, f"train.seed={seed}", f"quant.seed={seed}", f"qat.steps={qat_steps}"]
    )


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _plan_key(plan: Plan) -> tuple:
    return tuple((c.name, c.scheme, c.bits) for c in plan.layers)


def _energy_uj(model: torch.nn.Module, test, plan_or_bits) -> float:
    activity = measure_activity(model, test, max_batches=4)
    return estimate_energy(activity, plan_or_bits).quant_pj / 1e6


def _train_loader(recipe: Recipe):
    # a fresh loader per use: its shuffle order then depends on the seed alone, not on what ran before
    return recipe_loaders(recipe)[0]


def _measure_plan(
    plan: Plan, qat: bool, float_net, seeded: list[tuple[int, Recipe]], test, workdir: Path, slug: str
) -> dict[str, Any]:
    """PTQ accuracy, QAT accuracy per seed, packed size and energy of one plan."""
    # the packed file stores the plan; without the search's free-form meta every row's header is alike
    plan = Plan(plan.layers, budget=plan.budget, method=plan.method)
    ptq_accs, accs, qat_secs, energies = [], [], [], []
    size = None
    for i, (seed, r) in enumerate(seeded if qat else seeded[:1]):
        model = detached_copy(float_net)
        # a row without QAT is the same call with 0 steps (plan applied, BN re-estimated, evaluated)
        run = r if qat else replace(r, quant=replace(r.quant, qat=replace(r.quant.qat, steps=0)))
        ptq, acc, secs = quantize_and_finetune(model, plan, run, _train_loader(r), test, float_net)
        ptq_accs.append(ptq)
        accs.append(acc)
        qat_secs.append(secs)
        energies.append(_energy_uj(model, test, get_plan(model)))
        if i == 0:
            path = save(model, workdir / f"{slug}.hqpt.safetensors")
            size = inspect(path)["bytes"]["file"]
        log.info("%s seed %d: PTQ %.4f, %s %.4f", slug, seed, ptq, "QAT" if qat else "PTQ", acc)
    out = {
        "avg_bits": plan.avg_bits,
        "ptq_accuracy": ptq_accs[0],
        "size_bytes": size,
        "energy_uj": statistics.mean(energies),
        "qat_seconds": statistics.mean(qat_secs) if qat else 0.0,
        "plan": [f"{c.scheme}{c.bits}" for c in plan.layers],
    }
    if len(set(ptq_accs)) > 1:  # PTQ of a fixed plan is deterministic; record it if not
        out["ptq_per_seed"] = ptq_accs
    if qat:
        mean, std = _mean_std(accs)
        out.update(qat_accuracy=accs, qat_mean=mean, qat_std=std, seeds=[s for s, _ in seeded])
    return out


def _torchao_row(float_net, test, bits: int, protected: list[str], recipe: Recipe, fp_pickle: int) -> dict:
    model = detached_copy(float_net)
    q = recipe.quant
    fixed = {n: 8 for n in protected}
    res = torchao_weight_only(model, bits, fixed=fixed, include=q.include, exclude=q.exclude)
    acc = evaluate(model, test, description=f"evaluate torchao int{bits}")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    energy = _energy_uj(model, test, res.bits)
    return {
        "label": f"torchao int{bits}",
        "family": "torchao",
        "budget": None,
        "avg_bits": res.avg_bits,
        "ptq_accuracy": acc,
        "size_bytes": len(buf.getvalue()),
        "compression": fp_pickle / len(buf.getvalue()),
        "size_note": "torch.save state_dict; compression against torch.save of the float state_dict",
        "energy_uj": energy,
        "search_seconds": res.seconds,
        "qat_seconds": 0.0,
        "torchao_layers": res.bits,
        "torchao_refused": res.refused,
    }


def run_pareto(recipe_name: str, settings: BenchSettings = FULL, overrides: list[str] | tuple = ()) -> dict:
    """Measure every row of the benchmark on one recipe; returns the results dict (rows, claims, context).

    Args:
        recipe_name: recipe name or .toml path.
        settings: seeds, QAT and DNAS steps, budgets, rows.
        overrides: ``section.key=value`` recipe overrides applied to every row.
    """
    overrides = [*settings.recipe_overrides, *overrides]
    started, cpu_start = time.perf_counter(), time.process_time()
    load_start = os.getloadavg()
    recipe = load_recipe(recipe_name, overrides)
    base = _seeded(recipe, overrides, settings.seeds[0], settings.qat_steps)
    config = base.quant
    float_net = float_model(recipe)
    _, test = recipe_loaders(recipe)
    n_test = sum(len(y) for _, y in test)
    seeded = [(s, _seeded(recipe, overrides, s, settings.qat_steps)) for s in settings.seeds]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        fp_acc = evaluate(float_net, test, description="evaluate float")
        fp_file = save_float(float_net, workdir / "fp32.safetensors").stat().st_size
        buf = io.BytesIO()
        torch.save(float_net.state_dict(), buf)
        fp_pickle = len(buf.getvalue())
        act = measure_activity(float_net, test, max_batches=4)
        fp_energy = estimate_energy(act, {next(iter(act)): 8}).fp32_pj / 1e6
        rows.append({
            "label": "FP32", "family": "fp32", "budget": None, "avg_bits": 32.0, "ptq_accuracy": fp_acc,
            "size_bytes": fp_file, "energy_uj": fp_energy, "search_seconds": 0.0, "qat_seconds": 0.0,
        })

        t0 = time.perf_counter()
        analysis = analyze(detached_copy(float_net), calib_data=_train_loader(base), config=config)
        analysis_s = time.perf_counter() - t0
        log.info("sensitivity analysis (%s) in %.1fs", analysis.metric, analysis_s)

        # (label, family, plan, search seconds)
        plans: list[tuple[str, str, Plan, float]] = []
        for scheme, bits in settings.homogeneous:
            plan = homogeneous_plan(analysis.table, analysis.sizes, scheme, bits, analysis.protected)
            plans.append((f"{scheme} {bits}-bit", scheme, plan, 0.0))
        cb = settings.compare_budget
        t0 = time.perf_counter()
        hawq = allocate(analysis.table, analysis.sizes, cb, method="milp", protected=analysis.protected,
                        schemes=("uniform",))
        plans.append((f"uniform-only MP @ {cb:g}", "uniform-mp", hawq, analysis_s + time.perf_counter() - t0))
        greedy_cfg = replace(config, search=replace(config.search, method="greedy"))
        for b in settings.budgets:
            t0 = time.perf_counter()
            plan = search_plan(analysis, b, greedy_cfg)
            plans.append((f"ours greedy @ {b:g}", "ours-greedy", plan, analysis_s + time.perf_counter() - t0))
        t0 = time.perf_counter()
        milp = search_plan(analysis, cb, replace(config, search=replace(config.search, method="milp")))
        plans.append((f"ours MILP @ {cb:g}", "ours-milp", milp, analysis_s + time.perf_counter() - t0))

        # the cheap sensitivity (empirical Fisher: one backward per calibration batch, no Hessian-vector
        # products), to see what the Hutchinson analysis buys and what a fast search costs
        t0 = time.perf_counter()
        fisher_cfg = replace(greedy_cfg, search=replace(greedy_cfg.search, metric="fisher"))
        fisher = analyze(detached_copy(float_net), calib_data=_train_loader(base), config=fisher_cfg)
        plans.append((f"ours Fisher greedy @ {cb:g}", "ours-fisher", search_plan(fisher, cb, fisher_cfg),
                      time.perf_counter() - t0))

        gen = torch.Generator().manual_seed(settings.seeds[0])
        shift = recipe.train.shift_augment
        dnas = dnas_search(
            float_net, _train_loader(base), cb, config=config,
            dnas=DNASConfig(steps=settings.dnas_steps, seed=settings.seeds[0], weight_lr=config.qat.lr),
            augment=(lambda x: random_shift(x, shift, gen)) if shift else None,
        )
        plans.append((f"DNAS @ {cb:g}", "dnas", dnas, dnas.meta["seconds"]))

        measured: dict[tuple, tuple[str, dict]] = {}
        for label, family, plan, search_s in plans:
            qat = settings.qat_steps > 0 and label not in settings.ptq_only
            key = (_plan_key(plan), qat)
            if key in measured:  # e.g. MILP returning the greedy plan: same model, same seeds, same numbers
                first, m = measured[key]
                m = {**m, "note": f"same plan as {first}; measured once"}
            else:
                slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
                m = _measure_plan(plan, qat, float_net, seeded, test, workdir, slug)
                measured[key] = (label, m)
            rows.append({"label": label, "family": family, "budget": plan.budget, **m,
                         "compression": fp_file / m["size_bytes"], "search_seconds": search_s})
            if family == "dnas":
                rows[-1]["dnas"] = {k: v for k, v in plan.meta.items() if k != "probs"}
        protected = sorted(analysis.protected)
        for bits in (8, 4):
            rows.append(_torchao_row(float_net, test, bits, protected, recipe, fp_pickle))

    for row in rows:
        row["accuracy"] = row.get("qat_mean", row["ptq_accuracy"])
        row["energy_ratio"] = fp_energy / row["energy_uj"]
    rows[0]["compression"] = 1.0
    results = {
        "recipe": recipe.name,
        "model": recipe.model_name,
        "data": recipe.data,
        "overrides": overrides,
        "settings": asdict(settings),
        # the effective recipe of seed 0 (QAT and search settings included), so the run describes itself
        "recipe_config": base.to_dict(),
        "fp_accuracy": fp_acc,
        "n_test": n_test,
        "protected": protected,
        "analysis_seconds": analysis_s,
        "metric": analysis.metric,
        "rows": rows,
        "context": {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads",
            "date": date.today().isoformat(),
            "load_start": [round(x, 2) for x in load_start],
            "load_end": [round(x, 2) for x in os.getloadavg()],
            "wall_seconds": time.perf_counter() - started,
            # CPU time of this process: close to the wall time the run would take with its cores to itself
            "cpu_seconds": time.process_time() - cpu_start,
        },
    }
    results["claims"] = claims(results)
    return results


# ---------------------------------------------------------------------------------------------
# claims, computed from the rows


def _pts(x: float) -> str:
    return f"{100 * x:.2f}"


def claims(results: dict) -> list[dict[str, Any]]:
    """The issue's three claims, decided from the measured rows (``holds`` is True, False or None)."""
    rows = results["rows"]
    fp = results["fp_accuracy"]
    sample = 1 / results["n_test"]
    hetero = [r for r in rows if r["family"] in HETERO]
    out = []

    def verdict(a: dict, b: dict) -> str:
        # a mean difference inside the seeds' spread, or below one test sample, is not a measured ranking
        d = a["accuracy"] - b["accuracy"]
        spread = math.hypot(a.get("qat_std", 0.0), b.get("qat_std", 0.0))
        noise = max(spread, sample)
        within = "within" if abs(d) <= noise + 1e-12 else "beyond"
        return (f"{'+' if d >= 0 else ''}{_pts(d)} pts ({d / sample:+.0f} test samples), {within} the noise "
                f"(max of the seeds' combined std {_pts(spread)} pts and one test sample)")

    # 1a. heterogeneous vs the best homogeneous row at (about) equal average bits
    levels: dict[float, list[dict]] = {}
    for r in rows:
        if r["family"] in ("uniform", "pot"):
            levels.setdefault(round(r["avg_bits"], 6), []).append(r)
    for level, group in sorted(levels.items(), reverse=True):
        best = max(group, key=lambda r: r["accuracy"])
        near = [h for h in hetero if level - EQUAL_BITS_TOL <= h["avg_bits"] <= level + 1e-9]
        claim = f"at {level:.3f} bits, heterogeneous >= best homogeneous ({best['label']})"
        if not near:
            out.append({"claim": claim, "holds": None,
                        "detail": f"no heterogeneous row within {EQUAL_BITS_TOL} bits below {level:.3f}; "
                                  "not measured at equal bits"})
            continue
        h = max(near, key=lambda r: (r["avg_bits"], r["accuracy"]))
        holds = h["accuracy"] >= best["accuracy"]
        out.append({"claim": claim, "holds": holds,
                    "detail": f"{h['label']} ({h['avg_bits']:.3f} bits) {_pts(h['accuracy'])}% vs "
                              f"{best['label']} {_pts(best['accuracy'])}%: "
                              f"{verdict(h, best)}"})

    # 1b. heterogeneous vs uniform-only mixed precision at the compare budget
    mp = next((r for r in rows if r["family"] == "uniform-mp"), None)
    if mp is not None:
        for h in [r for r in hetero if r["budget"] == mp["budget"]]:
            out.append({"claim": f"{h['label']} >= uniform-only MP at {mp['budget']:g}",
                        "holds": h["accuracy"] >= mp["accuracy"],
                        "detail": f"{_pts(h['accuracy'])}% ({h['avg_bits']:.3f} bits) vs "
                                  f"{_pts(mp['accuracy'])}% ({mp['avg_bits']:.3f} bits): "
                                  f"{verdict(h, mp)}"})

    # 2. search speed against the differentiable search, at equal or better accuracy
    dn = next((r for r in rows if r["family"] == "dnas"), None)
    searched = [r for r in rows if dn and r["family"] in ("ours-greedy", "ours-fisher")
                and r["budget"] == dn["budget"]]
    for ours in searched:
        speed = dn["search_seconds"] / ours["search_seconds"]
        acc_ok = ours["accuracy"] >= dn["accuracy"]
        per_step = dn["dnas"]["seconds"] / dn["dnas"]["steps"]
        out.append({"claim": f"our search ({ours['label']}) >= 10x faster than DNAS at equal or better "
                             "accuracy",
                    "holds": speed >= 10 and acc_ok,
                    "detail": f"ours {ours['search_seconds']:.1f} s vs DNAS {dn['search_seconds']:.1f} s "
                              f"({dn['dnas']['steps']} steps): {speed:.1f}x; accuracy "
                              f"{_pts(ours['accuracy'])}% vs {_pts(dn['accuracy'])}%: {verdict(ours, dn)}; "
                              f"at {per_step:.2f} s/step DNAS would reach 10x our search time after "
                              f"{10 * ours['search_seconds'] / per_step:.0f} steps"})

    # 3. drop against FP at 3.5 and 3.0 bits
    for b in (3.5, 3.0):
        r = next((r for r in rows if r["family"] == "ours-greedy" and r["budget"] == b), None)
        if r is not None:
            out.append({"claim": f"drop against FP at {b:g} bits (ours greedy)", "holds": None,
                        "detail": f"{_pts(fp)}% -> {_pts(r['accuracy'])}% after QAT "
                                  f"(drop {_pts(fp - r['accuracy'])} pts; PTQ alone drop "
                                  f"{_pts(fp - r['ptq_accuracy'])} pts)"})
    return out


# ---------------------------------------------------------------------------------------------
# outputs


def _acc_cell(r: dict) -> str:
    if "qat_mean" not in r:
        return "—"
    return f"{_pts(r['qat_mean'])} ± {_pts(r['qat_std'])} (n={len(r['qat_accuracy'])})"


def _qat_text(results: dict) -> str:
    quant = results.get("recipe_config", {}).get("quant", {})
    qat = quant.get("qat")
    if not qat:
        return ""
    keys = ("lr", "distill_weight", "temperature", "freeze_bn", "ema_decay")
    text = " QAT settings: " + ", ".join(f"{k} {qat[k]}" for k in keys if k in qat) + "."
    # runs from before the option existed re-estimated nothing
    batches = quant.get("recalibrate_bn", 0)
    return text + f" BatchNorm statistics re-estimated after quantization: {batches} batches."


def markdown(results: dict, command: str) -> str:
    """The results as a Markdown section: context, table, claims, notes."""
    ctx, s = results["context"], results["settings"]
    fp = results["fp_accuracy"]
    lines = [
        f"### {results['recipe']} ({results['model']} on {results['data']['name']})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {ctx['machine']}; date {ctx['date']}; load average at start {ctx['load_start']}, "
        f"at end {ctx['load_end']}; wall time {ctx['wall_seconds'] / 60:.1f} min"
        + (f", CPU time of the process {ctx['cpu_seconds'] / 60:.1f} min" if "cpu_seconds" in ctx else "")
        + ".  ",
        f"Settings: QAT {s['qat_steps']} steps for every fine-tuned row, seeds {list(s['seeds'])}; DNAS "
        f"{s['dnas_steps']} search steps; sensitivity metric {results['metric']} "
        f"({results['analysis_seconds']:.1f} s, shared by every Hessian row); protected layers at uniform 8: "
        f"{', '.join(results['protected'])}; {results['n_test']} test samples "
        f"(one sample = {100 / results['n_test']:.2f} pts)." + _qat_text(results),
        "",
        "| row | avg bits | PTQ acc % | QAT acc % (mean ± std) | Δ vs FP (pts) | size (bytes) | compression "
        "| energy (µJ) | energy ratio | search s | QAT s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        note = " ¹" if r.get("note") else ""
        lines.append(
            f"| {r['label']}{note} | {r['avg_bits']:.3f} | {_pts(r['ptq_accuracy'])} | {_acc_cell(r)} "
            f"| {100 * (r['accuracy'] - fp):+.2f} | {r['size_bytes']:,} | {r['compression']:.2f}× "
            f"| {r['energy_uj']:.2f} | {r['energy_ratio']:.2f}× | {r['search_seconds']:.1f} "
            f"| {r['qat_seconds']:.1f} |"
        )
    lines.append("")
    notes = [f"¹ {r['label']}: {r['note']}." for r in results["rows"] if r.get("note")]
    for r in results["rows"]:
        if r["family"] == "torchao" and r.get("torchao_refused"):
            reasons = sorted(set(r["torchao_refused"].values()))
            notes.append(
                f"{r['label']}: torchao quantized {len(r['torchao_layers'])} layers "
                f"({', '.join(sorted(r['torchao_layers']))}) and refused {len(r['torchao_refused'])} "
                f"({', '.join(r['torchao_refused'])}; torchao: \"{'; '.join(reasons)}\"); refused layers "
                f"stay float32 and count 32 bits. {r['size_note']}."
            )
        if r["family"] == "dnas":
            d = r["dnas"]
            notes.append(
                f"{r['label']}: {d['steps']} steps in {d['seconds']:.1f} s "
                f"({d['seconds'] / d['steps']:.2f} s/step), expected bits {d['expected_avg_bits']:.3f}, "
                f"argmax plan {d['argmax_avg_bits']:.3f} bits, "
                f"{d['repair_moves']} repair moves down and {d['fill_moves']} fill moves up to "
                f"{r['avg_bits']:.3f} bits."
            )
    lines += [f"- {n}" for n in notes]
    lines += ["", "Claims, decided by the code from the rows above:", ""]
    for c in results["claims"]:
        mark = {True: "**holds**", False: "**fails**", None: "**measured**"}[c["holds"]]
        lines.append(f"- {c['claim']}: {mark}. {c['detail']}.")
    return "\n".join(lines) + "\n"


def _all_handles(rows: list[dict]) -> tuple[list, list[str]]:
    from matplotlib.lines import Line2D

    present = list(dict.fromkeys(r["family"] for r in rows))
    handles = [Line2D([], [], ls="none", marker=FAMILIES[f][1], color=FAMILIES[f][2]) for f in present]
    return handles, [FAMILIES[f][0] for f in present]


def plot(results: dict, path: Path) -> Path:
    """Accuracy against average bits, one marker per family (filled: after QAT, hollow: PTQ).

    Left: every row on a log-bits axis. Right: the low-bit region around the searched budgets, with the FP32
    accuracy as a dashed line and each family nudged sideways by a few hundredths of a bit so overlapping
    points stay visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fp = 100 * results["fp_accuracy"]
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 1.3]})
    lo_bits, hi_bits = 2.3, 4.3
    in_zoom = [r for r in rows if lo_bits <= r["avg_bits"] <= hi_bits]
    families = list(FAMILIES)
    for ax, zoomed in ((full, False), (zoom, True)):
        seen = set()
        for r in rows:
            if zoomed and r not in in_zoom:
                continue
            name, marker, color = FAMILIES[r["family"]]
            label = name if r["family"] not in seen else None
            seen.add(r["family"])
            x = r["avg_bits"] + (0.02 * (families.index(r["family"]) - 4) if zoomed else 0.0)
            if "qat_mean" in r:
                ax.errorbar(x, 100 * r["qat_mean"], yerr=100 * r["qat_std"], fmt=marker, color=color,
                            label=label, capsize=3, markersize=7)
                ax.plot(x, 100 * r["ptq_accuracy"], marker, mfc="none", color=color, markersize=7)
            else:
                ax.plot(x, 100 * r["ptq_accuracy"], marker, color=color, label=label, markersize=7)
        ax.axhline(fp, color="black", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
        ax.set_xlabel("average weight bits" + ("" if zoomed else " (log scale)"))
    full.set_xscale("log", base=2)
    full.set_xticks([2, 3, 4, 8, 16, 32])
    full.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    full.set_ylim(0, 101)
    full.set_ylabel("test accuracy (%)")
    full.set_title("all rows", fontsize=10)
    full.legend(*_all_handles(rows), fontsize=7, loc="center right")
    accs = [100 * min(r["accuracy"], r["ptq_accuracy"]) for r in in_zoom] or [fp - 5]
    zoom.set_ylim(max(min(accs), fp - 4) - 0.5, fp + 0.8)
    zoom.set_xlim(lo_bits, hi_bits)
    zoom.set_title(f"{lo_bits}-{hi_bits} bits; dashed: FP32", fontsize=10)
    zoom.legend(fontsize=8, loc="lower right")
    s = results["settings"]
    fig.suptitle(f"{results['recipe']}: filled = after QAT ({s['qat_steps']} steps, mean ± std over "
                 f"{len(s['seeds'])} seeds), hollow = PTQ", fontsize=11)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def update_doc(doc: Path, recipe: str, section: str) -> None:
    """Replace (or add) this recipe's block between the pareto markers of ``doc``."""
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{doc} has no {BEGIN} ... {END} section; add the markers first")
    b, e = f"<!-- pareto:{recipe}:begin -->", f"<!-- pareto:{recipe}:end -->"
    block = f"{b}\n{section}{e}"
    if b in text and e in text:
        text = text[: text.index(b)] + block + text[text.index(e) + len(e):]
    else:
        text = text.replace(END, f"{block}\n\n{END}")
    atomic_write_text(doc, text)


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
) -> tuple[dict, dict[str, Path]]:
    """Run the benchmark and write its files; returns ``(results, {kind: path})``.

    Without ``out``, a full run writes ``benchmarks/results/pareto-<recipe>.json``,
    ``docs/pareto-<dataset>.png`` and its section of ``docs/BENCHMARKS.md``; a quick run writes
    ``pareto-<recipe>-quick.{json,md,png}`` under ``benchmarks/results`` and leaves the docs alone. With
    ``out``, every file goes there and the docs are left alone. ``settings`` replaces the full/quick
    defaults; ``seeds``, ``qat_steps`` and ``dnas_steps`` override it.
    """
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
    return results, write_outputs(results, quick=quick, out=out)


def write_outputs(results: dict, *, quick: bool = False, out: Path | None = None) -> dict[str, Path]:
    """JSON, PNG and Markdown of ``results`` (the docs block for a full run without ``out``), as in bench."""
    name, data = results["recipe"], results["data"]["name"]
    text = markdown(results, results["command"])
    suffix = "-quick" if quick else ""
    if out is None and not quick:
        paths = {
            "json": REPO / "benchmarks" / "results" / f"pareto-{name}.json",
            "png": REPO / "docs" / f"pareto-{data}.png",
            "doc": DOC,
        }
    else:
        folder = Path(out) if out is not None else REPO / "benchmarks" / "results"
        paths = {
            "json": folder / f"pareto-{name}{suffix}.json",
            "png": folder / f"pareto-{name}{suffix}.png",
            "md": folder / f"pareto-{name}{suffix}.md",
        }
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths["json"], json.dumps(results, indent=2, default=str))
    text += f"\n![accuracy against average bits]({paths['png'].name})\n" if "doc" in paths else ""
    plot(results, paths["png"])
    if "doc" in paths:
        update_doc(paths["doc"], name, text)
    else:
        atomic_write_text(paths["md"], text)
    return paths


def render(path: Path, out: Path | None = None) -> dict[str, Path]:
    """Re-write every output of a saved results JSON (claims recomputed from its rows); measures nothing."""
    results = json.loads(Path(path).read_text())
    results["claims"] = claims(results)
    quick = Path(path).stem.endswith("-quick")
    return write_outputs(results, quick=quick, out=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="digits-spikformer")
    parser.add_argument("--quick", action="store_true", help="1 seed, 10 QAT steps, 20 DNAS steps")
    parser.add_argument("--seeds", default=None, help="QAT seeds, e.g. 0,1,2")
    parser.add_argument("--qat-steps", type=int, default=None, help="common QAT steps (default 40; quick 10)")
    parser.add_argument("--dnas-steps", type=int, default=None, help="DNAS steps (default 150; quick 20)")
    parser.add_argument("--out", type=Path, default=None, help="folder for every output (docs left alone)")
    parser.add_argument("--set", action="append", default=[], help="recipe override, e.g. qat.lr=1e-4")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--render", type=Path, default=None,
                        help="re-write Markdown/PNG (and the docs block) from a results JSON; runs nothing")
    args = parser.parse_args()
    if args.render is not None:
        paths = render(args.render, out=args.out)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("hq_ptq.swap").setLevel(logging.WARNING)
    progress.set_enabled(False)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    command = ".venv/bin/python benchmarks/pareto.py " + " ".join(sys.argv[1:])
    results, paths = bench(args.recipe, quick=args.quick, seeds=seeds, out=args.out, qat_steps=args.qat_steps,
                           dnas_steps=args.dnas_steps, overrides=args.set, command=command.strip())
    print(markdown(results, command))
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
