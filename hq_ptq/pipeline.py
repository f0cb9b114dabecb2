"""End-to-end runs of a recipe: float model (trained or loaded) → quantize → fine-tune → evaluate → files.

The CLI and benchmarks call these; they hold no algorithm of their own.

A recipe's model is a zoo model (``[model] name``: time-first ``[T, B, 2, H, W]`` event frames, logits,
cross-entropy, random-shift augmentation) or the user's own (``[model] factory``): then nothing about its
inputs or outputs is assumed. Batches go to the model as :mod:`hq_ptq.model_io` says, its ``loss`` and
``output_fn`` (when the recipe names them) reach every library call, nothing is augmented, and the export
traces one test batch exactly as the model takes it.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from inspect import signature
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from hq_ptq import progress
from hq_ptq.api import analyze, check_budget, recalibrate_bn, search_plan
from hq_ptq.checkpoint import load_float, save_float
from hq_ptq.config import QuantConfig, check_energy_budget
from hq_ptq.data import collate_time_first, get_dataset, make_loaders
from hq_ptq.devices import resolve_device
from hq_ptq.distributed import is_active, is_main, rank
from hq_ptq.errors import first_line
from hq_ptq.files import atomic_write_text
from hq_ptq.model_io import OutputFn, describe
from hq_ptq.models import build_model
from hq_ptq.plan import Plan
from hq_ptq.qat import finetune
from hq_ptq.recipe import DATA_LOADER_KEYS, Recipe, resolve
from hq_ptq.snn import detached_copy
from hq_ptq.state import apply_plan, get_plan
from hq_ptq.train import TrainResult, evaluate, random_shift, train_float

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], torch.Tensor]


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


def validation_loader(recipe: Recipe, n_val: int, batch_size: int = 256) -> DataLoader:
    """A time-first loader of ``n_val`` training samples the recipe's ``train`` split never contains (the
    dataset's ``val`` split, :func:`hq_ptq.data.registry.split_subset`), for choosing settings without the
    test set. Zoo datasets only."""
    if recipe.data_factory is not None:
        raise ValueError("a validation split needs a zoo dataset; hold out part of your own training data")
    options = {k: v for k, v in recipe.data.items() if k not in DATA_LOADER_KEYS}
    options.pop("val_subset", None)
    val = get_dataset(recipe.data["name"], "val", val_subset=int(n_val), **options)
    return DataLoader(val, batch_size=batch_size, shuffle=False, collate_fn=collate_time_first)


def call_factory(reference: str, kwargs: dict[str, Any], what: str) -> Any:
    """``reference(**kwargs)``, the ``"package.module:function"`` imported by :func:`hq_ptq.recipe.resolve`;
    keyword arguments the function does not take are a one-line ValueError naming ``what``."""
    fn = resolve(reference, what)
    try:
        signature(fn).bind(**kwargs)
    except TypeError as err:
        wanted = sorted(kwargs) or "no arguments"
        raise ValueError(f"{what} {reference!r} cannot take {wanted}: {err}") from None
    except ValueError:  # no signature to check (a builtin): let the call say
        pass
    return fn(**kwargs)


def user_loaders(reference: str, options: dict[str, Any] | None = None, what: str = "[data] factory"):
    """``(train, test)`` from the user's data factory, checked: two re-iterable collections of batches."""
    out = call_factory(reference, dict(options or {}), what)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError(
            f"{what} {reference!r} must return (train, test) iterables of (inputs, targets) batches, "
            f"got {type(out).__name__}"
        )
    for which, loader in zip(("train", "test"), out):
        if not isinstance(loader, Iterable) or isinstance(loader, Iterator):
            raise ValueError(
                f"{what} {reference!r}: its {which} data must be re-iterable (a DataLoader or a list of "
                f"batches), got a {type(loader).__name__}"
            )
    return tuple(out)


def recipe_loaders(recipe: Recipe):
    """(train, test) loaders of the recipe's dataset (shuffled by the recipe's training seed), or of its data
    factory."""
    if recipe.data_factory is not None:
        return user_loaders(recipe.data_factory, recipe.data_options())
    return dataset_loaders(recipe.data, recipe.train.seed)


def user_model(
    reference: str, kwargs: dict[str, Any] | None = None, what: str = "[model] factory"
) -> nn.Module:
    """The model the user's factory builds, checked to be an ``nn.Module``."""
    model = call_factory(reference, dict(kwargs or {}), what)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{what} {reference!r} must return a torch.nn.Module, got {type(model).__name__}")
    return model


def build_recipe_model(recipe: Recipe) -> nn.Module:
    """A new model of the recipe: the zoo model (untrained) or what the recipe's factory returns."""
    if recipe.model_factory is not None:
        return user_model(recipe.model_factory, recipe.model_overrides())
    return build_model(recipe.model_name, **recipe.model_overrides())


def recipe_functions(recipe: Recipe) -> tuple[LossFn | None, OutputFn | None]:
    """The recipe's ``[model] loss`` and ``output_fn``, imported (None where the recipe names none)."""
    loss = recipe.model.get("loss")
    output = recipe.model.get("output_fn")
    return (
        resolve(loss, "[model] loss") if loss else None,
        resolve(output, "[model] output_fn") if output else None,
    )


def check_references(recipe: Recipe) -> None:
    """Import every ``"package.module:function"`` the recipe names: a typo fails now, not after training."""
    if recipe.model_factory is not None:
        resolve(recipe.model_factory, "[model] factory")
    if recipe.data_factory is not None:
        resolve(recipe.data_factory, "[data] factory")
    recipe_functions(recipe)


def is_user_recipe(recipe: Recipe) -> bool:
    """True when the recipe's model or data is the user's own: no zoo assumption applies then."""
    return recipe.model_factory is not None or recipe.data_factory is not None


def _shift(recipe: Recipe) -> int:
    """Random-shift pixels for training and QAT: the recipe's ``train.shift_augment`` for zoo models on
    built-in data, none for the user's own model or data (its layout is unknown)."""
    shift = recipe.train.shift_augment
    if shift and is_user_recipe(recipe):
        log.warning(
            "train.shift_augment=%s is ignored: it shifts the built-in datasets' event frames for zoo "
            "models; augment in your data factory instead",
            shift,
        )
        return 0
    return shift


def is_reference(value: str | None) -> bool:
    """True when ``value`` reads as ``"package.module:function"`` rather than a name."""
    return value is not None and ":" in value


def quantize_checkpoint(
    checkpoint: Path,
    budget: float,
    out: Path | None = None,
    *,
    data: str | None = None,
    config: QuantConfig | None = None,
    model: str | None = None,
    loss: str | None = None,
    output_fn: str | None = None,
    energy_budget: float | None = None,
) -> tuple[Plan, float, float, Path]:
    """Float checkpoint → quantize (+ QAT when config.qat.steps) → packed checkpoint.

    A zoo checkpoint (``hq-ptq train``) rebuilds its model, and its dataset is the one recorded in it unless
    ``data`` names another. With ``model`` (``"package.module:function"``) the checkpoint's weights (a
    safetensors file or a ``torch.save`` state_dict) load into the model that function builds, and ``data``
    must be the ``"package.module:function"`` returning its ``(train, test)`` batches; ``loss`` and
    ``output_fn`` name the model's loss and class-score functions the same way. ``energy_budget`` is
    :func:`hq_ptq.quantize`'s (a fraction of the FP32 model's estimated energy).
    ``config.device`` ("auto": cuda when available, else cpu) is where the model is loaded, quantized and
    evaluated. Returns ``(plan, float accuracy, quantized accuracy, packed path)``.
    """
    from hq_ptq.api import quantize
    from hq_ptq.pack import save

    config = config or QuantConfig()
    check_energy_budget(energy_budget)
    device = run_device(config)  # a device that is not there fails before anything is loaded
    loss_fn = resolve(loss, "--loss") if loss else None
    scores_fn = resolve(output_fn, "--output-fn") if output_fn else None
    if model is not None:
        if not is_reference(data):
            raise ValueError(
                "quantizing your own model needs --data package.module:function returning its "
                "(train, test) batches"
            )
        resolve(data, "--data")  # a typo fails before the model is built
        net, _ = load_float(checkpoint, model=user_model(model, what="--model"), map_location=device)
        train, test = user_loaders(data, what="--data")
    else:
        net, meta = load_float(checkpoint, map_location=device)
        if is_reference(data):
            train, test = user_loaders(data, what="--data")
        else:
            dataset = {"name": data} if data is not None else dict(meta.get("dataset") or {})
            if "name" not in dataset:
                raise ValueError(f"{checkpoint} does not record its dataset; pass --data NAME")
            train, test = dataset_loaders(dataset)
    fp_acc = evaluate(net, test, output_fn=scores_fn, description="evaluate float")
    quantize(
        net,
        budget,
        energy_budget=energy_budget,
        calib_data=train,
        train_data=train if config.qat.steps else None,
        loss_fn=loss_fn,
        output_fn=scores_fn,
        config=config,
    )
    q_acc = evaluate(net, test, output_fn=scores_fn, description="evaluate quantized")
    if out is None:
        stem = checkpoint.name
        for suffix in (".safetensors", ".pth", ".pt"):
            stem = stem.removesuffix(suffix)
        out = checkpoint.with_name(f"{stem}-w{budget:g}.hqpt.safetensors")
    save(net, out)
    return get_plan(net), fp_acc, q_acc, Path(out)


def train_state_path(out: str | os.PathLike) -> Path:
    """Where ``hq-ptq train`` keeps its per-epoch checkpoint for the float model it writes to ``out``."""
    out = Path(out)
    return out.with_name(out.name + ".train.pt")


def train_recipe(recipe: Recipe, out: Path | None = None) -> tuple[nn.Module, TrainResult, Path]:
    """Train the recipe's float model and save it to ``out`` (default: the recipe's fp_checkpoint).

    After every epoch the run is checkpointed beside ``out`` (``<out>.train.pt``, :func:`train_state_path`):
    a run stopped on the way continues from its last epoch when the same command is run again.

    A factory model is trained with the recipe's ``[model] loss`` (default cross-entropy) and
    ``output_fn``, without augmentation; its file records the factory (never imported on load) and loads
    back with ``load_float(path, model=factory(...))``.
    """
    out = out or recipe.fp_checkpoint or Path("runs") / recipe.name / "fp.safetensors"
    check_references(recipe)
    train, test = recipe_loaders(recipe)
    model = build_recipe_model(recipe)
    state = train_state_path(out)
    if is_user_recipe(recipe):
        loss_fn, output_fn = recipe_functions(recipe)
        config = replace(recipe.train, shift_augment=_shift(recipe))
        result = train_float(model, train, test, config, loss_fn=loss_fn, output_fn=output_fn,
                             checkpoint=state)
    else:
        result = train_float(model, train, test, recipe.train, checkpoint=state)
    meta = {
        "recipe": recipe.name,
        "model": recipe.model,
        "dataset": recipe.data,
        "train": asdict(recipe.train),
        "test_accuracy": result.test_accuracy,
        "seconds": round(result.seconds, 1),  # of the last call: a resumed run's own part
        "resumed_after_epoch": result.resumed_after,
        "command": f"hq-ptq train {recipe.name}",
    }
    save_float(model, out, meta=meta, factory=recipe.model_factory)
    state.unlink(missing_ok=True)  # only now: a crash before the float file exists keeps the run
    return model, result, Path(out)


def float_model(recipe: Recipe) -> nn.Module:
    """The recipe's float model: loaded from its checkpoint when present, else trained and saved there.

    A factory model with no ``fp_checkpoint`` is the factory's model as it comes (trained by the factory);
    with one, the factory builds the model and the checkpoint's weights load into it.
    """
    factory_as_is = recipe.model_factory is not None and recipe.fp_checkpoint is None
    have_file = recipe.fp_checkpoint is not None and recipe.fp_checkpoint.is_file()
    if is_active() and not (have_file or factory_as_is):
        raise ValueError(
            f"a distributed run needs the recipe's float checkpoint ({recipe.fp_checkpoint}); make it first "
            f"with `hq-ptq train {recipe.name}` (hq-ptq run --nproc does so itself)"
        )
    if recipe.model_factory is not None:
        if factory_as_is:
            log.info("float model: as %s returned it (the recipe has no fp_checkpoint)", recipe.model_factory)
            return build_recipe_model(recipe)
        if have_file:
            model, _ = load_float(recipe.fp_checkpoint, model=build_recipe_model(recipe))
            log.info("loaded float checkpoint %s into %s", recipe.fp_checkpoint, recipe.model_factory)
            return model
        log.info("no float checkpoint at %s: training one", recipe.fp_checkpoint)
        model, _, _ = train_recipe(recipe)
        return model
    if have_file:
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
    if recipe.model_factory is not None and recipe.fp_checkpoint is None:
        return recipe  # the factory returns the trained model, in every process alike
    _, _, path = train_recipe(recipe)
    return replace(recipe, fp_checkpoint=Path(path))


def run_device(config: QuantConfig) -> torch.device:
    """Where a recipe or CLI run computes: ``config.device``, "auto" being cuda when available, else cpu
    (under torchrun: this rank's GPU). A CUDA device that is not there is a one-line ValueError."""
    return resolve_device(config.device, what="quant.device")


def _with_cache(recipe: Recipe, out_dir: Path | None) -> QuantConfig:
    """The recipe's QuantConfig with the sensitivity cache under the output folder (unless set)."""
    if recipe.quant.cache_dir is not None or out_dir is None:
        return recipe.quant
    return replace(recipe.quant, cache_dir=str(Path(out_dir) / "cache"))


def _evaluate(model: nn.Module, test, description: str, output_fn: OutputFn | None = None) -> float:
    # rank 0 alone measures (and reports); the other ranks would only repeat it
    return evaluate(model, test, output_fn=output_fn, description=description) if is_main() else float("nan")


@dataclass(frozen=True)
class Finetuned:
    """What :func:`quantize_and_finetune` measured."""

    ptq_accuracy: float
    accuracy: float  # after QAT (the PTQ accuracy when QAT has 0 steps)
    qat_seconds: float
    resumed_step: int  # the QAT step a resumed run started from; 0 for a fresh run


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
    loss_fn: LossFn | None = None,
    output_fn: OutputFn | None = None,
) -> Finetuned:
    """Apply ``plan`` to a float ``model``, evaluate, fine-tune, evaluate.

    With ``checkpoint`` QAT writes resumable checkpoints there; ``resume`` continues from it when present.
    Under torch.distributed every rank fine-tunes (DDP) and rank 0 alone evaluates (the others get NaN).
    """
    apply_plan(model, plan, scale_init=recipe.quant.scale_init)
    if recipe.quant.bn_recalibration_batches:
        recalibrate_bn(model, train, recipe.quant.bn_recalibration_batches)
    ptq_acc = _evaluate(model, test, "evaluate PTQ", output_fn)
    if recipe.quant.qat.steps == 0:
        return Finetuned(ptq_acc, ptq_acc, 0.0, 0)
    # each rank shifts its own batches with its own stream; rank 0 (and one process) uses the seed itself
    gen = torch.Generator().manual_seed(recipe.quant.seed + rank())
    shift = _shift(recipe)  # zoo models on built-in data only
    augment = (lambda x: random_shift(x, shift, gen)) if shift else None
    if checkpoint is not None and not resume and is_main():
        checkpoint.unlink(missing_ok=True)  # a fresh run must not leave an older run's state to resume
    result = finetune(
        model,
        train,
        recipe.quant.qat,
        teacher=teacher,
        loss_fn=loss_fn,
        output_fn=output_fn,
        augment=augment,
        seed=recipe.quant.seed,
        generators=[gen],
        checkpoint=checkpoint,
        resume=resume,
        meta={"plan": [[c.name, c.scheme, c.bits] for c in plan.layers], "budget": plan.budget},
        precision=recipe.quant.precision,
    )
    q_acc = _evaluate(model, test, "evaluate QAT", output_fn)
    return Finetuned(ptq_acc, q_acc, result.seconds, result.start_step)


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

    The float model is moved to the recipe's ``[quant] device`` ("auto": cuda when available, else cpu)
    and calibrated, searched, fine-tuned and evaluated there, the batches following it; it is moved back to
    the CPU to write the files.

    Under torch.distributed (torchrun, or ``hq-ptq run --nproc``) the calibration batches are shared out
    between ranks, QAT runs with DistributedDataParallel, and rank 0 alone evaluates and writes files; the
    plan is the one a single process finds with the same seed.
    """
    budget = recipe.budget if budget is None else budget
    check_budget(budget)  # before minutes of loading and calibration
    check_energy_budget(recipe.energy_budget)
    check_references(recipe)  # and a misspelled factory fails now
    device = run_device(recipe.quant)  # and a device that is not there
    loss_fn, output_fn = recipe_functions(recipe)
    config = _with_cache(recipe, out_dir)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    model = float_model(recipe).to(device)
    seconds["float_model"] = time.perf_counter() - t0
    train, test = recipe_loaders(recipe)
    fp_acc = _evaluate(model, test, "evaluate float", output_fn)
    # deepcopy would refuse an snnTorch membrane still holding its graph
    teacher = detached_copy(model).eval()

    t0 = time.perf_counter()
    analysis = analyze(model, calib_data=train, loss_fn=loss_fn, config=config)
    plan = search_plan(analysis, budget, config, energy_budget=recipe.energy_budget)
    seconds["search"] = time.perf_counter() - t0
    checkpoint = Path(out_dir) / QAT_CHECKPOINT if out_dir is not None else None
    tuned = quantize_and_finetune(
        model, plan, recipe, train, test, teacher, checkpoint=checkpoint, resume=resume, loss_fn=loss_fn,
        output_fn=output_fn,
    )
    seconds["qat"] = tuned.qat_seconds
    plan = get_plan(model)
    result = RunResult(
        recipe=recipe.name,
        budget=budget,
        fp_accuracy=fp_acc,
        q_accuracy=tuned.accuracy,
        ptq_accuracy=tuned.ptq_accuracy,
        plan=plan,
        seconds=seconds,
        out_dir=out_dir,
        qat_resumed_from=tuned.resumed_step,
    )
    if out_dir is not None and is_main():
        # files are written from the CPU: the export traces and verifies there
        write_artifacts(model.cpu(), result, recipe, test, Path(out_dir), export=export)
    return result


def launched_run(
    recipe: Recipe, budget: float | None, out_dir: Path | None, resume: bool, export: bool
) -> RunResult:
    """:func:`run_recipe` as a :func:`hq_ptq.distributed.launch` target (positional, picklable arguments)."""
    return run_recipe(recipe, budget, out_dir, resume=resume, export=export)


def _layout(value: Any) -> Any:
    """A batch's inputs with every tensor replaced by its (shape, dtype): equal layouts trace alike."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if isinstance(value, dict):
        return ("dict", tuple((k, _layout(v)) for k, v in value.items()))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_layout(v) for v in value))
    return (type(value).__name__, repr(value))


def export_batches(test: Iterable) -> tuple[Any, Any, str]:
    """``(example, fresh, how)`` for the export of a user's model: the first test batch's inputs as the model
    takes them (any structure), and the inputs of the next test batch with the same structure and shapes
    to verify on; when the test data holds no other such batch, the first batch again (``how`` says so)."""
    it = iter(test)
    first = next(it, None)
    if first is None:
        raise ValueError("the test data yielded no batch to export the model with")
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise ValueError(f"test batches must be (inputs, targets), got {describe(first)}")
    example = first[0]
    layout = _layout(example)
    for batch in it:
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and _layout(batch[0]) == layout:
            return example, batch[0], "another test batch (not the one traced)"
    log.warning("the test data has no second batch shaped like the first: verifying the export on the batch "
                "it was traced with")
    return example, example, "the traced batch itself (the test data holds no other batch of its shape)"


def export_reproduces(check: dict[str, Any], tol: float = 1e-5) -> bool:
    """Whether a :func:`hq_ptq.export.verify_export` report accepts the file: outputs within ``tol`` and no
    spike differs, or the first differing spikes are consistent with float rounding near the threshold
    (``first_spike_flip["rounding"]``; the outputs then differ through the flips). SDT at 128x128 is such a
    case: real-valued membranes feed convolutions whose float32 sums differ from PyTorch's by rounding, and
    a run of hours is not thrown away for that (the report and verify_export's warning say so)."""
    error = check.get("max_abs_output_error", check.get("max_abs_logit_error"))
    if check["spike_mismatches"]:
        first = check.get("first_spike_flip") or {}
        if first.get("rounding"):
            log.warning("export kept: its spikes differ from PyTorch's first at %s, consistent with float "
                        "rounding near the threshold (export_checks.json)", first["neuron"])
            return True
        return False
    return error <= tol


def export_artifacts(model: nn.Module, test, out_dir: Path, *, user: bool = False) -> dict[str, Path]:
    """QONNX (integer weight codes behind Quant nodes) and onnxruntime files of the quantized model, each
    verified against PyTorch on test inputs it was not traced with.

    A zoo model is traced unrolled over T at batch 1 on a time-first test sample ``[T, 1, ...]``. A user's
    model (``user=True``) is traced on one whole test batch as the model takes it and verified on another of
    the same structure and shapes (the same one when there is none; ``verified_on`` in the checks says which).
    A file that :func:`export_reproduces` does not accept is an error.
    """
    from hq_ptq.export import export_onnxruntime, export_qonnx, verify_export

    if user:
        example, fresh, verified_on = export_batches(test)
    else:
        inputs, _ = next(iter(test))
        example, fresh = inputs[:, :1], inputs[:, 1:2]  # time-first [T, 1, ...]
        verified_on = None
    files, checks = {}, {}
    for kind, fn, backend in (("qonnx", export_qonnx, "qonnx"), ("ort", export_onnxruntime, "onnxruntime")):
        with progress.task(f"export {kind}", total=None):
            files[f"{kind}_onnx"] = fn(model, example, out_dir / f"model.{kind}.onnx")
            checks[kind] = verify_export(model, files[f"{kind}_onnx"], fresh, backend=backend)
        if verified_on is not None:
            checks[kind]["verified_on"] = verified_on
        log.info("%s export: %s", kind, checks[kind])
        if not export_reproduces(checks[kind]):
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
    from hq_ptq.energy import estimate_energy, input_layout, measure_activity
    from hq_ptq.pack import inspect, save
    from hq_ptq.report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"plan": result.plan.to_json(out_dir / "plan.json")}
    files["packed"] = save(model, out_dir / "model.hqpt.safetensors")
    user = is_user_recipe(recipe)
    if export:
        files.update(export_artifacts(model, test, out_dir, user=user))
    info = inspect(files["packed"])
    sizes = {
        "packed checkpoint (bytes)": info["bytes"]["file"],
        "FP32 size (bytes)": info["fp32_bytes"],
        "file compression (FP32 size / packed checkpoint)": round(info["compression"]["file"], 2),
    }
    energy = None
    if not user:
        energy = estimate_energy(measure_activity(model, test, max_batches=4), result.plan)
    else:
        layout = input_layout(next(iter(test)))
        if layout is None:
            log.warning("no energy estimate: it needs a model that takes one tensor [B, ...] or [T, B, ...]")
        else:
            try:
                activity = measure_activity(model, test, max_batches=4, time_first=layout)
                energy = estimate_energy(activity, result.plan)
            except ValueError as err:
                log.warning("no energy estimate for this model: %s", str(err).splitlines()[0])
    results = {**result.to_dict(), "recipe_config": recipe.to_dict()}
    if recipe.integer_bits:
        results["integer"] = integer_check(model, recipe, test)
    text = json.dumps(results, indent=2, default=str)
    files["result"] = atomic_write_text(out_dir / "result.json", text)
    files.update(
        write_report(out_dir, plan=result.plan, results=results, sweep=sweep, energy=energy, sizes=sizes)
    )
    return files


def integer_check(model: nn.Module, recipe: Recipe, test) -> dict[str, Any]:
    """The integer-only twin of ``model`` (:func:`hq_ptq.integerize`, calibrated on two training batches) at
    each of the recipe's ``integer_bits`` membrane widths: test accuracy next to the fake-quant model's, the
    spike mismatch rate, and the smallest width within 0.1 point. A model the integer path cannot express
    gets the reason instead (the run itself does not fail)."""
    from hq_ptq.integer import compare, integerize

    calib = list(itertools.islice(recipe_loaders(recipe)[0], 2))
    rows: list[dict[str, Any]] = []
    for bits in recipe.integer_bits:
        try:
            integer, _ = integerize(model, calib, membrane_bits=bits)
        except ValueError as err:
            log.warning("no integer-only model: %s", first_line(err))
            return {"refused": first_line(err)}
        with progress.task(f"evaluate integer ({bits}-bit membranes)", total=None):
            rows.append({"membrane_bits": bits,
                         **compare(model, integer, test, output_fn=recipe_functions(recipe)[1])})
    fake = rows[0]["fake_accuracy"]
    within = [r["membrane_bits"] for r in rows if abs(r["integer_accuracy"] - fake) <= 0.001 + 1e-12]
    return {"fake_accuracy": fake, "widths": rows, "smallest_width_within_0.1pt": min(within, default=None)}


def _energy_fraction(analysis, plan: Plan) -> float | None:
    """``plan``'s estimated energy as a fraction of the FP32 layers', on the analysis's calibration activity
    (the figure the search's energy budget uses), or None when the activity is unknown."""
    from hq_ptq.energy import estimate_energy

    if analysis.activity is None:
        return None
    report = estimate_energy(analysis.activity, plan)
    return report.quant_pj / report.fp32_pj if report.fp32_pj > 0 else None


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
    ``pareto.png`` to ``out_dir``. Every point runs on the recipe's ``[quant] device`` (as
    :func:`run_recipe`).
    """
    from hq_ptq.search import homogeneous_plan

    if not budgets:
        raise ValueError("sweep needs at least one budget, e.g. --budgets 4,3.5,3")
    config = _with_cache(recipe, out_dir)
    check_references(recipe)
    device = run_device(recipe.quant)
    loss_fn, output_fn = recipe_functions(recipe)
    float_net = float_model(recipe).to(device)
    train, test = recipe_loaders(recipe)
    fp_acc = evaluate(float_net, test, output_fn=output_fn, description="evaluate float")
    analysis = analyze(detached_copy(float_net), calib_data=train, loss_fn=loss_fn, config=config)
    points: list[tuple[str, str, Plan]] = [
        (f"search @ {b:g}", "hetero", search_plan(analysis, b, config, energy_budget=recipe.energy_budget))
        for b in budgets
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
        model = detached_copy(float_net)
        tuned = quantize_and_finetune(
            model, plan, recipe, train, test, float_net, loss_fn=loss_fn, output_fn=output_fn
        )
        ptq_acc, q_acc, qat_s = tuned.ptq_accuracy, tuned.accuracy, tuned.qat_seconds
        entry = {
            "label": label,
            "kind": kind,
            "avg_bits": plan.avg_bits,
            "budget": plan.budget,
            "ptq_accuracy": ptq_acc,
            "accuracy": q_acc,
            "fp_accuracy": fp_acc,
            "qat_seconds": qat_s,
            # the search's estimate (calibration activity, docs/ENERGY.md); None when it is unknown
            "energy_fraction": _energy_fraction(analysis, plan),
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
        write_artifacts(shown_model[0].cpu(), shown_model[1], recipe, test, out_dir, sweep=entries)
    return entries
