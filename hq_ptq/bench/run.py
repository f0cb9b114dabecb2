"""Measuring the benchmark's rows: FP32, homogeneous, uniform-only MP, ours (greedy, MILP, the other metric),
DNAS and torchao.

Every row starts from the same float checkpoint, is evaluated on the same test set and, where it is
fine-tuned, gets the same QAT (the recipe's QAT settings with a common step count) with the same seeds; the
seed sets the shuffle order, the random shifts and the QAT RNG. One sensitivity analysis (the recipe's
metric) serves every searched row but the other metric's. Every row that searches, and every homogeneous
row, keeps the recipe's protected layers (first and last at uniform 8 bits), so average bits are
comparable; the torchao int4 row keeps them at int8 too.
"""

from __future__ import annotations

import io
import logging
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import torch

from hq_ptq.api import analyze, search_plan
from hq_ptq.baselines import torchao_weight_only
from hq_ptq.bench.verdicts import claims
from hq_ptq.compression import file_compression, fp32_bytes
from hq_ptq.dnas import DNASConfig, dnas_search
from hq_ptq.energy import estimate_energy, measure_activity
from hq_ptq.pack import inspect, save
from hq_ptq.pipeline import float_model, quantize_and_finetune, recipe_loaders
from hq_ptq.plan import Plan
from hq_ptq.recipe import Recipe, load_recipe
from hq_ptq.search import allocate, homogeneous_plan
from hq_ptq.snn import detached_copy
from hq_ptq.state import get_plan
from hq_ptq.train import evaluate, random_shift

log = logging.getLogger("hq_ptq.bench")

HOMOGENEOUS = (("uniform", 8), ("uniform", 4), ("uniform", 3), ("uniform", 2), ("pot", 4), ("pot", 3))


@dataclass(frozen=True)
class BenchSettings:
    """What one benchmark run measures.

    Args:
        seeds: QAT seeds; accuracy is reported as mean ± std over them.
        qat_steps: the common QAT step count of every fine-tuned row.
        dnas_steps: differentiable-search steps.
        budgets: budgets of the sensitivity-guided greedy rows.
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
QUICK = BenchSettings(
    seeds=(0,), qat_steps=10, dnas_steps=20, recipe_overrides=("search.hutchinson_probes=16",)
)



def _saved_size(state: dict) -> int:
    """Bytes ``torch.save`` writes for ``state``, measured in memory, not on disk."""
    torch.save(state, stream := io.BytesIO())
    return stream.getbuffer().nbytes

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
        tuned = quantize_and_finetune(model, plan, run, _train_loader(r), test, float_net)
        ptq, acc, secs = tuned.ptq_accuracy, tuned.accuracy, tuned.qat_seconds
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


def _torchao_row(float_net, test, bits: int, protected: list[str], recipe: Recipe) -> dict:
    model = detached_copy(float_net)
    q = recipe.quant
    fixed = {n: 8 for n in protected}
    res = torchao_weight_only(model, bits, fixed=fixed, include=q.include, exclude=q.exclude)
    acc = evaluate(model, test, description=f"evaluate torchao int{bits}")
    size = _saved_size(model.state_dict())  # torchao's own format: its tensor subclasses, pickled
    energy = _energy_uj(model, test, {res.modules[n]: b for n, b in res.bits.items()})
    return {
        "label": f"torchao int{bits}",
        "family": "torchao",
        "budget": None,
        "avg_bits": res.avg_bits,
        "ptq_accuracy": acc,
        "size_bytes": size,
        "compression": file_compression(fp32_bytes(float_net.state_dict()), size),
        "size_note": "size: torch.save of the torchao model's state_dict",
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
        fp32 = fp32_bytes(float_net.state_dict())
        act = measure_activity(float_net, test, max_batches=4)
        fp_energy = estimate_energy(act, {next(iter(act)): 8}).fp32_pj / 1e6
        rows.append({
            "label": "FP32", "family": "fp32", "budget": None, "avg_bits": 32.0, "ptq_accuracy": fp_acc,
            "size_bytes": fp32, "energy_uj": fp_energy, "search_seconds": 0.0, "qat_seconds": 0.0,
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

        # the other sensitivity (Hutchinson Hessian beside the default empirical Fisher, or the reverse), to
        # see what one buys over the other and what each costs
        other = "fisher" if analysis.metric == "hessian" else "hessian"
        t0 = time.perf_counter()
        other_cfg = replace(greedy_cfg, search=replace(greedy_cfg.search, metric=other))
        alt = analyze(detached_copy(float_net), calib_data=_train_loader(base), config=other_cfg)
        plans.append((f"ours {other.capitalize()} greedy @ {cb:g}", f"ours-{other}",
                      search_plan(alt, cb, other_cfg), time.perf_counter() - t0))

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
                         "compression": file_compression(fp32, m["size_bytes"]), "search_seconds": search_s})
            if family == "dnas":
                rows[-1]["dnas"] = {k: v for k, v in plan.meta.items() if k != "probs"}
        protected = sorted(analysis.protected)
        for bits in (8, 4):
            rows.append(_torchao_row(float_net, test, bits, protected, recipe))

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
        "fp32_bytes": fp32,  # the FP32 size (hq_ptq.compression), the FP32 row's size
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
