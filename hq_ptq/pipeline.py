"""End-to-end runs of a recipe: float model (trained or loaded) → quantize → fine-tune → evaluate → files.

The CLI and benchmarks call these; they hold no algorithm of their own.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hq_ptq import progress
from hq_ptq.api import analyze, apply_plan, check_budget, get_plan, recalibrate_bn, search_plan
from hq_ptq.checkpoint import load_float, save_float
from hq_ptq.config import QuantConfig
from hq_ptq.data import make_loaders
from hq_ptq.distributed import is_active, is_main, rank
from hq_ptq.files import atomic_write_text
from hq_ptq.models import build_model
from hq_ptq.plan import Plan
from hq_ptq.qat import finetune
from hq_ptq.recipe import DATA_LOADER_KEYS, Recipe
from hq_ptq.train import TrainResult, evaluate, random_shift, train_float

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    recipe: str
    budget: float
    fp_accuracy: float
    q_accuracy: float
    ptq_accuracy: float | None
    plan: Plan
    seconds: dict[str, float] = field(default_factory=dict)
    out_dir: Path | None = None
    # the QAT step a resumed run continued from (0: QAT ran from the start)
    qat_resumed_from: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["plan"] = self.plan.to_dict()
        d["out_dir"] = str(self.out_dir) if self.out_dir else None
        d["avg_bits"] = self.plan.avg_bits
        return d


def dataset_loaders(data: dict[str, Any], seed: int = 0):
    """(train, test) loaders of a recipe-style ``[data]`` section, batches time-first ``[T, B, ...]``."""
    options = {k: v for k, v in data.items() if k not in DATA_LOADER_KEYS}
    return make_loaders(
        data["name"],
        batch_size=int(data.get("batch_size", 32)),
        test_batch_size=data.get("eval_batch_size"),
        seed=seed,
        **options,
    )


def recipe_loaders(recipe: Recipe):
    """(train, test) loaders of the recipe's dataset, shuffled by the recipe's training seed."""
    return dataset_loaders(recipe.data, recipe.train.seed)


def quantize_checkpoint(
    checkpoint: Path,
    budget: float,
    out: Path | None = None,
    *,
    data: str | None = None,
    config: QuantConfig | None = None,
) -> tuple[Plan, float, float, Path]:
    """Float checkpoint → quantize (+ QAT when config.qat.steps) → packed checkpoint.

    The dataset is the one recorded in the checkpoint unless ``data`` names another.
    Returns ``(plan, float accuracy, quantized accuracy, packed path)``.
    """
    from hq_ptq.api import quantize
    from hq_ptq.pack import save

    config = config or QuantConfig()
    model, meta = load_float(checkpoint)
    dataset = {"name": data} if data is not None else dict(meta.get("dataset") or {})
    if "name" not in dataset:
        raise ValueError(f"{checkpoint} does not record its dataset; pass --data NAME")
    train, test = dataset_loaders(dataset)
    fp_acc = evaluate(model, test, description="evaluate float")
    quantize(model, budget, calib_data=train, train_data=train if config.qat.steps else None, config=config)
    q_acc = evaluate(model, test, description="evaluate quantized")
    out = out or checkpoint.with_name(
        checkpoint.name.replace(".safetensors", "") + f"-w{budget:g}.hqpt.safetensors"
    )
    save(model, out)
    return get_plan(model), fp_acc, q_acc, Path(out)


def train_recipe(recipe: Recipe, out: Path | None = None) -> tuple[nn.Module, TrainResult, Path]:
    """Train the recipe's float model and save it to ``out`` (default: the recipe's fp_checkpoint)."""
    out = out or recipe.fp_checkpoint or Path("runs") / recipe.name / "fp.safetensors"
    train, test = recipe_loaders(recipe)
    model = build_model(recipe.model_name, **recipe.model_overrides())
    result = train_float(model, train, test, recipe.train)
    save_float(
        model,
        out,
        meta={
            "recipe": recipe.name,
            "dataset": recipe.data,
            "train": asdict(recipe.train),
            "test_accuracy": result.test_accuracy,
            "seconds": round(result.seconds, 1),
            "command": f"hq-ptq train {recipe.name}",
        },
    )
    return model, result, Path(out)


def float_model(recipe: Recipe) -> nn.Module:
    """The recipe's float model: loaded from its checkpoint when present, else trained and saved there."""
    if is_active() and not (recipe.fp_checkpoint is not None and recipe.fp_checkpoint.is_file()):
        raise ValueError(
            f"a distributed run needs the recipe's float checkpoint ({recipe.fp_checkpoint}); make it first "
            f"with `hq-ptq train {recipe.name}` (hq-ptq run --nproc does so itself)"
        )
    if recipe.fp_checkpoint is not None and recipe.fp_checkpoint.is_file():
        model, meta = load_float(recipe.fp_checkpoint)
        if model.hq_config["name"] != recipe.model_name:
            raise ValueError(
                f"{recipe.fp_checkpoint} holds {model.hq_config['name']}, recipe asks {recipe.model_name}"
            )
        log.info("loaded float checkpoint %s", recipe.fp_checkpoint)
        return model
    log.info("no float checkpoint at %s: training one", recipe.fp_checkpoint)
    model, _, _ = train_recipe(recipe)
    return model


def ensure_float_checkpoint(recipe: Recipe) -> Recipe:
    """The recipe with a float checkpoint on disk: trained and saved now when missing (before processes that
    must all load the same one are started)."""
    if recipe.fp_checkpoint is not None and recipe.fp_checkpoint.is_file():
        return recipe
    _, _, path = train_recipe(recipe)
    return replace(recipe, fp_checkpoint=Path(path))


def _with_cache(recipe: Recipe, out_dir: Path | None) -> QuantConfig:
    """The recipe's QuantConfig with the sensitivity cache under the output folder (unless set)."""
    if recipe.quant.cache_dir is not None or out_dir is None:
        return recipe.quant
    return replace(recipe.quant, cache_dir=str(Path(out_dir) / "cache"))


def _evaluate(model: nn.Module, test, description: str) -> float:
    # rank 0 alone measures (and reports); the other ranks would only repeat it
    return evaluate(model, test, description=description) if is_main() else float("nan")


def quantize_and_finetune(
    model: nn.Module,
    plan: Plan,
    recipe: Recipe,
    train,
    test,
    teacher: nn.Module,
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
) -> tuple[float, float, float]:
    """Apply ``plan`` to a float ``model``, evaluate, fine-tune, evaluate -> (PTQ acc, QAT acc, QAT s).

    With ``checkpoint`` QAT writes resumable checkpoints there; ``resume`` continues from it when present.
    Under torch.distributed every rank fine-tunes (DDP) and rank 0 alone evaluates (the others get NaN).
    """
    return _quantize_and_finetune(model, plan, recipe, train, test, teacher, checkpoint, resume)[:3]


def _quantize_and_finetune(
    model: nn.Module,
    plan: Plan,
    recipe: Recipe,
    train,
    test,
    teacher: nn.Module,
    checkpoint: Path | None,
    resume: bool,
) -> tuple[float, float, float, int]:
    apply_plan(model, plan)
    if recipe.quant.recalibrate_bn:
        recalibrate_bn(model, train, recipe.quant.recalibrate_bn)
    ptq_acc = _evaluate(model, test, "evaluate PTQ")
    if recipe.quant.qat.steps == 0:
        return ptq_acc, ptq_acc, 0.0, 0
    # each rank shifts its own batches with its own stream; rank 0 (and one process) uses the seed itself
    gen = torch.Generator().manual_seed(recipe.quant.seed + rank())
    shift = recipe.train.shift_augment
    augment = (lambda x: random_shift(x, shift, gen)) if shift else None
    if checkpoint is not None and not resume and is_main():
        checkpoint.unlink(missing_ok=True)  # a fresh run must not leave an older run's state to resume
    result = finetune(
        model,
        train,
        recipe.quant.qat,
        teacher=teacher,
        augment=augment,
        seed=recipe.quant.seed,
        generators=[gen],
        checkpoint=checkpoint,
        resume=resume,
        meta={"plan": [[c.name, c.scheme, c.bits] for c in plan.layers], "budget": plan.budget},
    )
    q_acc = _evaluate(model, test, "evaluate QAT")
    return ptq_acc, q_acc, result.seconds, result.start_step


QAT_CHECKPOINT = "qat-checkpoint.pt"


def run_recipe(
    recipe: Recipe,
    budget: float | None = None,
    out_dir: Path | None = None,
    *,
    resume: bool = False,
    export: bool = True,
) -> RunResult:
    """FP checkpoint → calibrate → search → QAT → evaluate; then pack, energy and report in ``out_dir``.

    With ``out_dir``, sensitivity traces are cached in ``out_dir/cache`` and QAT writes resumable checkpoints
    to ``out_dir/qat-checkpoint.pt``; ``resume`` continues a killed run from them (same plan, metrics and
    weights as an uninterrupted run). ``export=False`` skips the QONNX/onnxruntime files.

    Under torch.distributed (torchrun, or ``hq-ptq run --nproc``) the calibration batches are shared out
    between ranks, QAT runs with DistributedDataParallel, and rank 0 alone evaluates and writes files; the
    plan is the one a single process finds with the same seed.
    """
    budget = recipe.budget if budget is None else budget
    check_budget(budget)  # before minutes of loading and calibration
    config = _with_cache(recipe, out_dir)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    model = float_model(recipe)
    seconds["float_model"] = time.perf_counter() - t0
    train, test = recipe_loaders(recipe)
    fp_acc = _evaluate(model, test, "evaluate float")
    teacher = copy.deepcopy(model).eval()

    t0 = time.perf_counter()
    analysis = analyze(model, calib_data=train, config=config)
    plan = search_plan(analysis, budget, config)
    seconds["search"] = time.perf_counter() - t0
    checkpoint = Path(out_dir) / QAT_CHECKPOINT if out_dir is not None else None
    ptq_acc, q_acc, seconds["qat"], resumed = _quantize_and_finetune(
        model, plan, recipe, train, test, teacher, checkpoint, resume
    )
    plan = get_plan(model)
    result = RunResult(
        recipe=recipe.name,
        budget=budget,
        fp_accuracy=fp_acc,
        q_accuracy=q_acc,
        ptq_accuracy=ptq_acc,
        plan=plan,
        seconds=seconds,
        out_dir=out_dir,
        qat_resumed_from=resumed,
    )
    if out_dir is not None and is_main():
        write_artifacts(model, result, recipe, test, Path(out_dir), export=export)
    return result


def launched_run(
    recipe: Recipe, budget: float | None, out_dir: Path | None, resume: bool, export: bool
) -> RunResult:
    """:func:`run_recipe` as a :func:`hq_ptq.distributed.launch` target (positional, picklable arguments)."""
    return run_recipe(recipe, budget, out_dir, resume=resume, export=export)


def export_artifacts(model: nn.Module, test, out_dir: Path) -> dict[str, Path]:
    """QONNX (Quant/FloatQuant nodes, unrolled over T, batch 1) and onnxruntime files of the quantized model,
    each verified against PyTorch on a test sample it was not traced with."""
    from hq_ptq.export import export_onnxruntime, export_qonnx, verify_export

    inputs, _ = next(iter(test))
    example, fresh = inputs[:, :1], inputs[:, 1:2]  # time-first [T, 1, ...]
    files, checks = {}, {}
    for kind, fn, backend in (("qonnx", export_qonnx, "qonnx"), ("ort", export_onnxruntime, "onnxruntime")):
        with progress.task(f"export {kind}", total=None):
            files[f"{kind}_onnx"] = fn(model, example, out_dir / f"model.{kind}.onnx")
            checks[kind] = verify_export(model, files[f"{kind}_onnx"], fresh, backend=backend)
        log.info("%s export: %s", kind, checks[kind])
        if checks[kind]["max_abs_logit_error"] > 1e-5 or checks[kind]["spike_mismatches"]:
            raise RuntimeError(f"{kind} export does not reproduce the model: {checks[kind]}")
    text = json.dumps(checks, indent=2, default=str)
    files["export_checks"] = atomic_write_text(out_dir / "export_checks.json", text)
    return files


def write_artifacts(
    model: nn.Module,
    result: RunResult,
    recipe: Recipe,
    test,
    out_dir: Path,
    sweep: list[dict[str, Any]] | None = None,
    *,
    export: bool = True,
) -> dict[str, Path]:
    """plan.json, packed checkpoint, QONNX/ORT exports (unless ``export=False``), energy estimate and report
    files of a finished run; every file is written atomically."""
    from hq_ptq.energy import estimate_energy, measure_activity
    from hq_ptq.pack import inspect, save
    from hq_ptq.report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"plan": result.plan.to_json(out_dir / "plan.json")}
    files["packed"] = save(model, out_dir / "model.hqpt.safetensors")
    if export:
        files.update(export_artifacts(model, test, out_dir))
    info = inspect(files["packed"])
    sizes = {
        "packed checkpoint (bytes)": info["bytes"]["file"],
        "FP32 checkpoint (bytes)": info["fp32_bytes"]["checkpoint"],
        "compression, whole checkpoint": round(info["compression"]["checkpoint"], 2),
        "compression, weights (codes + scales vs FP32 weights)": round(info["compression"]["weights"], 2),
    }
    activity = measure_activity(model, test, max_batches=4)
    energy = estimate_energy(activity, result.plan)
    results = {**result.to_dict(), "recipe_config": recipe.to_dict()}
    text = json.dumps(results, indent=2, default=str)
    files["result"] = atomic_write_text(out_dir / "result.json", text)
    files.update(
        write_report(out_dir, plan=result.plan, results=results, sweep=sweep, energy=energy, sizes=sizes)
    )
    return files


# Homogeneous baselines of a sweep: every searched layer on one (scheme, bits); protected layers as in search.
BASELINES = (("uniform", 8), ("uniform", 4), ("uniform", 3), ("pot", 4), ("pot", 3))


def sweep_recipe(
    recipe: Recipe,
    budgets: list[float],
    out_dir: Path | None = None,
    *,
    baselines: tuple[tuple[str, int], ...] = BASELINES,
) -> list[dict[str, Any]]:
    """One sensitivity analysis, then search + QAT at every budget and for each homogeneous baseline.

    Every point starts from the same float weights and gets the same QAT steps and seed. Returns one entry
    per point (``label``, ``kind``, ``avg_bits``, ``ptq_accuracy``, ``accuracy``), written with a report and
    ``pareto.png`` to ``out_dir``.
    """
    from hq_ptq.search import homogeneous_plan

    if not budgets:
        raise ValueError("sweep needs at least one budget, e.g. --budgets 4,3.5,3")
    config = _with_cache(recipe, out_dir)
    float_net = float_model(recipe)
    train, test = recipe_loaders(recipe)
    fp_acc = evaluate(float_net, test, description="evaluate float")
    analysis = analyze(copy.deepcopy(float_net), calib_data=train, config=config)
    points: list[tuple[str, str, Plan]] = [
        (f"search @ {b:g}", "hetero", search_plan(analysis, b, config)) for b in budgets
    ]
    for scheme, bits in baselines:
        if scheme in config.search.schemes and all((scheme, bits) in c for c in analysis.table.values()):
            plan = homogeneous_plan(analysis.table, analysis.sizes, scheme, bits, analysis.protected)
            points.append((f"{scheme} {bits}-bit", scheme, plan))
    entries: list[dict[str, Any]] = []
    # the report shows the searched model at the recipe's budget (else the first budget swept)
    shown = recipe.budget if recipe.budget in budgets else budgets[0]
    shown_model: tuple[nn.Module, RunResult] | None = None
    for label, kind, plan in points:
        model = copy.deepcopy(float_net)
        ptq_acc, q_acc, qat_s = quantize_and_finetune(model, plan, recipe, train, test, float_net)
        entry = {
            "label": label,
            "kind": kind,
            "avg_bits": plan.avg_bits,
            "budget": plan.budget,
            "ptq_accuracy": ptq_acc,
            "accuracy": q_acc,
            "fp_accuracy": fp_acc,
            "qat_seconds": qat_s,
        }
        entries.append(entry)
        log.info("%s: %.3f bits, PTQ %.4f, QAT %.4f", label, plan.avg_bits, ptq_acc, q_acc)
        if kind == "hetero" and plan.budget == shown:
            run = RunResult(recipe.name, shown, fp_acc, q_acc, ptq_acc, get_plan(model), out_dir=out_dir)
            shown_model = (model, run)
    if out_dir is not None and shown_model is not None and is_main():
        out_dir = Path(out_dir)
        text = json.dumps(entries, indent=2)
        atomic_write_text(out_dir / "sweep.json", text)
        write_artifacts(shown_model[0], shown_model[1], recipe, test, out_dir, sweep=entries)
    return entries
