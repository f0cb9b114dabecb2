"""The public one-liner and plan helpers: orchestration only, each step lives in its own module.

model ─► swap (Brevitas layers) ─► sensitivity (Hutchinson / Fisher / weight) ─► allocate (greedy / MILP)
      ─► apply plan ─► QAT (KD fine-tune)
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hq_ptq import progress
from hq_ptq.config import QuantConfig
from hq_ptq.distributed import cached_on_main, check_same, current_shard, data_digest
from hq_ptq.plan import LayerChoice, Plan
from hq_ptq.qat import finetune
from hq_ptq.schemes import SCHEMES
from hq_ptq.search import allocate
from hq_ptq.sensitivity import (
    cached_traces,
    fingerprint,
    fisher_traces,
    hutchinson_traces,
    sensitivity_table,
    weight_traces,
)
from hq_ptq.snn import reset_states
from hq_ptq.swap import (
    find_layers,
    layer_quant,
    quant_layers,
    set_layer_quant,
    swap_layers,
    weight_error,
)

log = logging.getLogger(__name__)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PLAN_ATTR = "hq_plan"


def candidates(config: QuantConfig) -> list[tuple[str, int]]:
    """Every (scheme, bits) the search may choose, from the allowed schemes and bit widths."""
    out = []
    for name in config.search.schemes:
        if name not in SCHEMES:
            raise ValueError(f"unknown scheme {name!r}; known: {', '.join(SCHEMES)}")
        for b in SCHEMES[name].bits:
            if not config.search.bits or b in config.search.bits:
                out.append((name, b))
    supported = sorted({b for name in config.search.schemes for b in SCHEMES[name].bits})
    unknown = [b for b in config.search.bits if b not in supported]
    if unknown:
        raise ValueError(
            f"search.bits {unknown} not supported by schemes {list(config.search.schemes)}; "
            f"choose from {supported}"
        )
    if not out:
        raise ValueError(
            f"no candidate left: schemes {config.search.schemes} allow none of bits {config.search.bits}"
        )
    return out


def protected_layers(names: list[str], config: QuantConfig) -> dict[str, tuple[str, int]]:
    """Layers held at ``protect_scheme``/``protect_bits``: the globs in ``protect`` plus first and last."""
    s = config.search
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in s.protect)]
    if s.protect_first_last and len(names) > 2:
        chosen += [names[0], names[-1]]
    return {n: (s.protect_scheme, s.protect_bits) for n in dict.fromkeys(chosen)}


MAX_BUDGET = 32.0  # average bits of a float32 model: a larger budget is a typo, not a request


def check_budget(budget: float) -> None:
    """Raise ValueError unless ``budget`` is a number of average weight bits in (0, 32]."""
    if not isinstance(budget, (int, float)) or not 0 < budget <= MAX_BUDGET:
        raise ValueError(
            f"budget must be a number of average weight bits in (0, {MAX_BUDGET:g}], got {budget!r}"
        )


def _take(batches: Batches, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    taken = list(itertools.islice(iter(batches), n))
    if not taken:
        raise ValueError("calib_data yielded no batches")
    for inputs, _ in taken:
        if not torch.isfinite(inputs).all():
            raise ValueError("calib_data contains NaN or Inf inputs")
    return taken


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_forward(model: nn.Module, batch: tuple[torch.Tensor, Any], loss_fn: LossFn | None) -> None:
    """One forward on the first calibration batch, so inputs the model cannot take fail naming their shape
    instead of deep inside the Hessian pass."""
    inputs, targets = batch
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            reset_states(model)
            try:
                outputs = model(inputs)
            except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as err:
                raise ValueError(
                    f"the model cannot take calibration inputs of shape {_shape(inputs)} "
                    f"({_first_line(err)}); give it data in the layout it expects"
                ) from None
            try:
                loss = (loss_fn or F.cross_entropy)(outputs, targets)
            except (RuntimeError, ValueError, IndexError, TypeError) as err:
                raise ValueError(
                    f"the loss cannot compare model outputs of shape {_shape(outputs)} with targets of shape "
                    f"{_shape(targets)} ({_first_line(err)}); check num_classes and the labels"
                ) from None
            if isinstance(loss, torch.Tensor) and not torch.isfinite(loss).all():
                raise ValueError(
                    f"the loss on the first calibration batch (inputs {_shape(inputs)}) is not finite; "
                    "check the model and the data for NaN/Inf"
                )
    finally:
        reset_states(model)
        for m, flag in modes.items():
            m.training = flag


def measure_traces(
    model: nn.Module,
    layer_names: list[str],
    calib: list[tuple[torch.Tensor, torch.Tensor]] | None,
    loss_fn: LossFn | None,
    config: QuantConfig,
) -> tuple[str, dict[str, float]]:
    """Per-layer mean Hessian (or Fisher) trace on the float model; returns ``(metric, traces)``."""
    metric = config.search.metric if calib is not None else "weight"
    modules = dict(model.named_modules())
    layers = {n: modules[n] for n in layer_names}
    if metric == "weight":
        return metric, weight_traces(layers)
    shard = current_shard()
    local = calib if shard is None else shard.take(calib)

    def compute() -> dict[str, float]:
        total = len(calib) if metric == "fisher" else config.search.max_samples
        with progress.task(f"sensitivity ({metric})", total=total) as update:
            seen = [0]

            def tick(done: int, _total: int) -> None:
                update(advance=done - seen[0])
                seen[0] = done

            if metric == "fisher":
                return fisher_traces(
                    model, layers, local, loss_fn, reset=reset_states, progress=tick, shard=shard
                )
            return hutchinson_traces(
                model,
                layers,
                local,
                loss_fn,
                rel_tol=config.search.rel_tol,
                max_samples=config.search.max_samples,
                min_samples=min(8, config.search.max_samples),
                seed=config.seed,
                reset=reset_states,
                progress=tick,
                shard=shard,
            )

    digest_hex = data_digest(x for x, _ in calib)
    if shard is not None:
        check_same(digest_hex, "the calibration data")
    if config.cache_dir is None:
        return metric, compute()
    fp = fingerprint(
        model,
        layer_names,
        metric=metric,
        n_batches=len(calib),
        seed=config.seed,
        extra=f"{digest_hex}:{config.search.max_samples}:{config.search.rel_tol}",
    )
    path = Path(config.cache_dir) / f"traces-{fp}.json"
    # rank 0 alone reads and writes the cache; the others follow its hit or miss
    return metric, cached_on_main(lambda fn: cached_traces(path, fp, fn), compute)


@dataclass(frozen=True)
class Analysis:
    """Per-layer sensitivity of a model: what the allocator needs, reusable across budgets."""

    table: dict[str, dict[tuple[str, int], float]]
    sizes: dict[str, int]
    traces: dict[str, float]
    metric: str
    protected: dict[str, tuple[str, int]]


def analyze(
    model: nn.Module,
    *,
    calib_data: Batches | None = None,
    loss_fn: LossFn | None = None,
    config: QuantConfig | None = None,
) -> Analysis:
    """Swap the model's layers to hq_ptq quant layers (in place) and score every (scheme, bits) per layer.

    Traces are measured on the float weights before any quantizer is attached.
    """
    config = config or QuantConfig()
    _check_weights(model)
    cands = candidates(config)
    names = find_layers(model, config.include, config.exclude)
    calib = _take(calib_data, config.search.calib_batches) if calib_data is not None else None
    if calib is not None:
        _check_forward(model, calib[0], loss_fn)
    metric, traces = measure_traces(model, names, calib, loss_fn, config)
    swap_layers(model, include=config.include, exclude=config.exclude, scheme="uniform", bits=8)
    layers = quant_layers(model)
    table = sensitivity_table({n: layers[n] for n in names}, traces, cands, weight_error)
    sizes = {n: layers[n].weight.numel() for n in names}
    return Analysis(table, sizes, traces, metric, protected_layers(names, config))


def search_plan(analysis: Analysis, budget: float, config: QuantConfig | None = None) -> Plan:
    """Allocate (scheme, bits) per layer under ``budget`` from an :class:`Analysis`."""
    config = config or QuantConfig()
    check_budget(budget)
    plan = allocate(
        analysis.table, analysis.sizes, budget, method=config.search.method, protected=analysis.protected
    )
    meta = {
        **plan.meta,
        "metric": analysis.metric,
        "traces": analysis.traces,
        "protected": sorted(analysis.protected),
    }
    return Plan(layers=plan.layers, budget=plan.budget, method=plan.method, meta=meta)


def quantize(
    model: nn.Module,
    budget: float = 3.5,
    *,
    calib_data: Batches | None = None,
    train_data: Batches | None = None,
    loss_fn: LossFn | None = None,
    config: QuantConfig | None = None,
) -> nn.Module:
    """Quantize ``model``'s weights in place under an average-bit ``budget`` and return it.

    Every Conv1d/Conv2d/Linear matching ``config.include``/``exclude`` gets a uniform or power-of-two Brevitas
    quantizer; the per-layer (scheme, bits) plan minimises Hessian-weighted weight perturbation with the
    parameter-weighted average bits ≤ ``budget``. With ``train_data``, a short QAT (CE + distillation from the
    float model) recovers accuracy.

    Args:
        model: any nn.Module with Conv/Linear layers, called as ``model(inputs)``.
        budget: parameter-weighted average weight bits over the quantized layers.
        calib_data: iterable of ``(inputs, targets)`` batches for the sensitivity analysis and, once the plan
            is applied, for re-estimating BatchNorm statistics (``config.recalibrate_bn`` batches); without
            it the data-free weight metric is used and BatchNorm keeps the float model's statistics.
        train_data: iterable of ``(inputs, targets)`` batches for QAT; without it no fine-tuning.
        loss_fn: ``loss_fn(outputs, targets)``, cross-entropy by default.
        config: search and QAT settings.

    Returns:
        The same model, quantized; ``hq_ptq.get_plan(model)`` gives the plan.

    Under torch.distributed (e.g. torchrun), give every rank the same ``calib_data`` and ``train_data`` in the
    same order: rank ``r`` of ``N`` computes on batches ``r, r+N, ...``, the sensitivity samples are summed
    over ranks (every rank gets the single-process plan) and QAT runs with DistributedDataParallel.

    Example:
        >>> qmodel = hq_ptq.quantize(model, budget=3.5, calib_data=loader, train_data=loader)
    """
    config = config or QuantConfig()
    check_budget(budget)
    if calib_data is None:
        warnings.warn(
            "hq_ptq.quantize without calib_data uses the data-free weight metric; pass calib_data for "
            "Hessian-aware sensitivity and train_data for QAT recovery",
            stacklevel=2,
        )
    teacher = None
    if train_data is not None and config.qat.steps > 0 and config.qat.distill_weight > 0:
        # one float copy serves as the distillation teacher; candidates never copy the model
        teacher = copy.deepcopy(model).eval()
    analysis = analyze(model, calib_data=calib_data, loss_fn=loss_fn, config=config)
    plan = search_plan(analysis, budget, config)
    apply_plan(model, plan)
    if calib_data is not None and config.recalibrate_bn:
        recalibrate_bn(model, calib_data, config.recalibrate_bn)

    if train_data is not None and config.qat.steps > 0:
        finetune(model, train_data, config.qat, teacher=teacher, loss_fn=loss_fn, seed=config.seed)
    model.eval()
    return model


def _check_weights(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter {name} has NaN or Inf values; fix the model before quantizing")


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Give every layer of ``plan`` its (scheme, bits), swapping float layers first; returns the model."""
    missing = [c.name for c in plan.layers if c.name not in dict(model.named_modules())]
    if missing:
        raise ValueError(f"plan names layers the model does not have: {', '.join(missing[:5])}")
    layers = quant_layers(model)
    to_swap = [c.name for c in plan.layers if c.name not in layers]
    if to_swap:
        swap_layers(model, include=tuple(to_swap), scheme="uniform", bits=8)
        layers = quant_layers(model)
    for choice in plan.layers:
        set_layer_quant(layers[choice.name], choice.scheme, choice.bits)
    setattr(model, PLAN_ATTR, plan)
    return model


def recalibrate_bn(model: nn.Module, data: Batches, batches: int) -> int:
    """Re-estimate every BatchNorm's running statistics on ``model`` as it is now (e.g. quantized).

    The statistics become the plain average over the first ``batches`` batches of ``data`` (momentum
    None), computed without gradients; only the BatchNorm layers run in training mode, so dropout and
    the like stay off. Momentum and training flags are restored. Returns the number of batches used.

    Raises:
        ValueError: ``batches < 1`` or ``data`` yields no batch (the statistics are left untouched).
    """
    if batches < 1:
        raise ValueError(f"recalibrate_bn needs at least one batch, got batches={batches}")
    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        return 0
    it = iter(data)
    first = next(it, None)
    if first is None:
        raise ValueError("recalibrate_bn got no batches; pass the calibration data")
    flags = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    used = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches seen
            m.train()
        with torch.no_grad(), progress.task("recalibrate BN", total=batches) as update:
            for inputs, _ in itertools.chain([first], it):
                reset_states(model)
                model(inputs)
                used += 1
                update()
                if used == batches:
                    break
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for m, training in flags.items():
            m.train(training)
    log.info("re-estimated %d BatchNorm layers' statistics on %d batches", len(norms), used)
    return used


def get_plan(model: nn.Module) -> Plan:
    """The plan a quantized model carries, read back from its layers (scores from the search when known)."""
    layers = quant_layers(model)
    if not layers:
        raise ValueError("model has no hq_ptq-quantized layers; call hq_ptq.quantize or apply_plan first")
    stored: Plan | None = getattr(model, PLAN_ATTR, None)
    known = {c.name: c for c in stored.layers} if stored is not None else {}
    choices = []
    for name, layer in layers.items():
        scheme, bits = layer_quant(layer)
        sens = known[name].sensitivity if name in known else float("nan")
        choices.append(
            LayerChoice(name=name, scheme=scheme, bits=bits, params=layer.weight.numel(), sensitivity=sens)
        )
    if stored is None:
        return Plan(layers=tuple(choices), method="manual")
    return Plan(layers=tuple(choices), budget=stored.budget, method=stored.method, meta=stored.meta)
