"""The public one-liner and plan helpers: orchestration only, each step lives in its own module.

model ─► swap (Brevitas layers) ─► sensitivity (Hutchinson / Fisher / weight) ─► allocate (greedy / MILP)
      ─► apply plan ─► QAT (KD fine-tune)
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hq_ptq import progress
from hq_ptq.config import QuantConfig, check_energy_budget
from hq_ptq.devices import analysis_autocast, batch_to, model_device, resolve_device
from hq_ptq.distributed import cached_on_main, check_same, current_shard, data_digest
from hq_ptq.energy import (
    LayerActivity,
    candidate_energy,
    estimate_energy,
    input_layout,
    layer_cost,
    measure_activity,
)
from hq_ptq.errors import first_line
from hq_ptq.model_io import OutputFn, call, describe, tensors
from hq_ptq.plan import Plan
from hq_ptq.qat import finetune
from hq_ptq.search import allocate
from hq_ptq.sensitivity import (
    fill_dead_layers,
    fisher_traces,
    hutchinson_traces,
    loss_table,
    sensitivity_table,
    weight_traces,
)
from hq_ptq.sensitivity_cache import cached_table, cached_traces, fingerprint
from hq_ptq.snn import detached_copy, eval_mode, reset_states, stable_surrogates
from hq_ptq.space import Candidate, candidates, protected_layers, settle_protection, yielding_layers
from hq_ptq.state import SEARCH_ATTR, apply_plan
from hq_ptq.swap import (
    QUANT_ATTR,
    find_layers,
    float_layers,
    quant_layers,
    quantizable,
    split_matching_attention,
    swap_layers,
    weight_error,
)

log = logging.getLogger(__name__)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]



MAX_BUDGET = 32.0  # average bits of a float32 model: a larger budget is a typo, not a request


def check_budget(budget: float) -> None:
    """Raise ValueError unless ``budget`` is a number of average weight bits in (0, 32]."""
    if not isinstance(budget, (int, float)) or not 0 < budget <= MAX_BUDGET:
        raise ValueError(
            f"budget must be a number of average weight bits in (0, {MAX_BUDGET:g}], got {budget!r}"
        )


def _take(batches: Batches, n: int, device: torch.device | None = None) -> list[tuple[Any, Any]]:
    """The first ``n`` batches as a list (drawn once, so a one-shot generator serves every later step),
    inputs and targets moved to ``device`` (the model's) when given."""
    taken = list(itertools.islice(iter(batches), n))
    if not taken:
        raise ValueError("calib_data yielded no batches")
    for i, batch in enumerate(taken):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                f"each calib_data batch must be an (inputs, targets) pair, got {describe(batch)}"
            )
        if device is not None:
            batch = taken[i] = (
                batch_to(batch[0], device, what="calibration inputs"),
                batch_to(batch[1], device, what="calibration targets"),
            )
        if not all(torch.isfinite(t).all() for t in tensors(batch[0]) if t.is_floating_point()):
            raise ValueError("calib_data contains NaN or Inf inputs")
    return taken


def _device_error(err: BaseException) -> bool:
    """True when torch's message says tensors sit on different devices (or of a CPU and a CUDA type)."""
    text = str(err).lower()
    return "device" in text or ("cuda" in text and "cpu" in text)


def _mixed_devices(model: nn.Module, device: torch.device, err: BaseException) -> ValueError:
    """The one-line error for a forward on inputs moved to ``device`` (the model's) that failed on tensors
    of different devices, naming them."""
    held = list(dict.fromkeys(t.device for t in itertools.chain(model.parameters(), model.buffers())))
    where = (
        f"the model is on {' and '.join(str(d) for d in held)} but the calibration inputs are on {device}"
        if len(held) > 1
        else f"the model and the calibration inputs are on {device} but its forward mixes devices"
    )
    return ValueError(
        f"{where} ({first_line(err)}); put all of the model on one device (QuantConfig(device=...), "
        "--device) and create no tensor on a fixed device inside it"
    )


def _check_forward(model: nn.Module, batch: tuple[torch.Tensor, Any], loss_fn: LossFn | None) -> None:
    """One forward on the first calibration batch (moved to the model's device), so inputs the model cannot
    take fail naming their shape, and data or a model on other devices naming the devices, instead of deep
    inside the Hessian pass."""
    device = model_device(model)
    inputs = batch_to(batch[0], device, what="calibration inputs")
    targets = batch_to(batch[1], device, what="calibration targets")
    try:
        with eval_mode(model), torch.no_grad():
            reset_states(model)
            try:
                outputs = call(model, inputs)
            except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as err:
                if _device_error(err):
                    raise _mixed_devices(model, device, err) from None
                raise ValueError(
                    f"the model cannot take calibration inputs of shape {describe(inputs)} "
                    f"({first_line(err)}); give it data in the layout it expects"
                ) from None
            try:
                loss = (loss_fn or F.cross_entropy)(outputs, targets)
            except (RuntimeError, ValueError, IndexError, TypeError) as err:
                raise ValueError(
                    f"the loss cannot compare model outputs of shape {describe(outputs)} with targets of "
                    f"shape {describe(targets)} ({first_line(err)}); check num_classes and the "
                    "labels, or pass the model's own loss_fn"
                ) from None
            if isinstance(loss, torch.Tensor) and not torch.isfinite(loss).all():
                raise ValueError(
                    f"the loss on the first calibration batch (inputs {describe(inputs)}) is not finite; "
                    "check the model and the data for NaN/Inf"
                )
    finally:
        reset_states(model)


def measure_traces(
    model: nn.Module,
    layer_names: list[str],
    calib: list[tuple[torch.Tensor, torch.Tensor]] | None,
    loss_fn: LossFn | None,
    config: QuantConfig,
) -> tuple[str, dict[str, float]]:
    """Per-layer mean Hessian (or Fisher) trace on the float model; returns ``(metric, traces)``."""
    metric = config.search.metric if calib is not None else "data_free"
    modules = dict(model.named_modules())
    layers = {n: modules[n] for n in layer_names}
    if metric == "data_free":
        return metric, weight_traces(layers)
    shard = current_shard()
    local = calib if shard is None else shard.take(calib)

    def compute() -> dict[str, float]:
        total = len(calib) if metric == "fisher" else config.search.hutchinson_probes
        # snnTorch's sigmoid surrogate gives NaN gradients far below threshold; its stable twin does not
        # (and the analysis computes in float32 whatever config.precision says: hq_ptq.devices)
        with (
            stable_surrogates(model),
            analysis_autocast(config.precision, metric, model_device(model)),
            progress.task(f"sensitivity ({metric})", total=total) as update,
        ):
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
                rel_tol=config.search.hutchinson_rel_tol,
                max_samples=config.search.hutchinson_probes,
                min_samples=min(8, config.search.hutchinson_probes),
                seed=config.seed,
                reset=reset_states,
                progress=tick,
                shard=shard,
            )

    digest_hex = data_digest(t for x, _ in calib for t in tensors(x))
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
        extra=f"{digest_hex}:{config.search.hutchinson_probes}:{config.search.hutchinson_rel_tol}",
    )
    path = Path(config.cache_dir) / f"traces-{fp}.json"
    # rank 0 alone reads and writes the cache; the others follow its hit or miss
    return metric, cached_on_main(lambda fn: cached_traces(path, fp, fn), compute)


def measure_loss_table(
    model: nn.Module,
    rows: dict[str, list[Candidate]],
    calib: list[tuple[Any, Any]],
    loss_fn: LossFn | None,
    config: QuantConfig,
) -> dict[str, dict[Candidate, float]]:
    """Metric ``"loss"``: the measured calibration-loss increase of each layer alone at each of its
    candidates (:func:`hq_ptq.sensitivity.loss_table`), cached like the traces."""
    shard = current_shard()
    local = calib if shard is None else shard.take(calib)

    def compute() -> dict[str, dict[Candidate, float]]:
        total = 1 + sum(len(row) for row in rows.values())
        with (
            analysis_autocast(config.precision, "loss", model_device(model)),
            progress.task("sensitivity (loss)", total=total) as update,
        ):
            seen = [0]

            def tick(done: int, _total: int) -> None:
                update(advance=done - seen[0])
                seen[0] = done

            return loss_table(model, rows, local, loss_fn, reset=reset_states, progress=tick, shard=shard,
                              scale_init=config.scale_init)

    digest_hex = data_digest(t for x, _ in calib for t in tensors(x))
    if shard is not None:
        check_same(digest_hex, "the calibration data")
    if config.cache_dir is None:
        return compute()
    fp = fingerprint(
        model,
        list(rows),
        metric="loss",
        n_batches=len(calib),
        seed=config.seed,
        extra=f"{digest_hex}:scale_init={config.scale_init}",
        candidates={name: [f"{s}:{b}" for s, b in row] for name, row in rows.items()},
    )
    path = Path(config.cache_dir) / f"table-{fp}.json"
    return cached_on_main(lambda fn: cached_table(path, fp, fn, meta={"metric": "loss"}), compute)


@dataclass(frozen=True)
class Analysis:
    """Per-layer sensitivity of a model: what the allocator needs, reusable across budgets.

    ``traces`` are the values the table was built from, after the dead-layer rule; ``dead`` names the
    layers whose measured trace was exactly zero (:func:`hq_ptq.sensitivity.fill_dead_layers`). With metric
    ``"loss"`` the table is measured directly: ``traces`` then holds each layer's largest loss increase
    (its worst candidate), for reports only, and no layer is dead.
    ``protected`` layers carry their protected candidate in the table besides the searched ones, so
    they can be released into the search (``yielding``) when a budget needs it.
    """

    table: dict[str, dict[Candidate, float]]
    sizes: dict[str, int]
    traces: dict[str, float]
    metric: str
    protected: dict[str, Candidate]
    yielding: tuple[str, ...] = ()
    dead: tuple[str, ...] = ()
    # per-layer activity (kind, ops, ...) of the float model on the calibration batches, for an energy
    # budget (hq_ptq.energy); None when it could not be measured, and activity_note says why
    activity: dict[str, LayerActivity] | None = None
    activity_note: str = ""
    # weight layers hq_ptq does not quantize (hq_ptq.swap.float_layers): name -> (type, weights, why)
    float_layers: dict[str, tuple[str, int, str]] = field(default_factory=dict)


def analyze(
    model: nn.Module,
    *,
    calib_data: Batches | None = None,
    loss_fn: LossFn | None = None,
    config: QuantConfig | None = None,
) -> Analysis:
    """Swap the model's layers to hq_ptq quant layers (in place) and score every (scheme, bits) per layer.
    Each ``nn.MultiheadAttention`` is split into four Linear projections first
    (:func:`hq_ptq.attention.split_attention`), which the plan then names.

    Traces are measured on the float weights before any quantizer is attached. A layer whose trace is
    exactly zero (no gradient reached it on the calibration data, e.g. a block that never fires) is
    not an error: it gets the smallest trace of the live layers, a warning names it, and the plan's
    ``meta["dead_layers"]`` lists it.

    A ``config.device`` other than "auto" moves the model there first; the calibration batches are moved
    to the model's device.
    """
    config = config or QuantConfig()
    _check_weights(model)
    candidates(config)
    split_matching_attention(model, config.include, config.exclude)
    names = find_layers(model, config.include, config.exclude)
    device = resolve_device(config.device, model)
    if config.device != "auto":
        model.to(device)
    calib = _take(calib_data, config.search.calib_batches, device) if calib_data is not None else None
    if calib is not None:
        _check_forward(model, calib[0], loss_fn)
    return _score(model, names, calib, loss_fn, config)


def _score(
    model: nn.Module,
    names: list[str],
    calib: list[tuple[Any, Any]] | None,
    loss_fn: LossFn | None,
    config: QuantConfig,
) -> Analysis:
    """:func:`analyze` after its checks (``quantize`` has made them already): traces, swap, score table."""
    cands = candidates(config)
    protected = protected_layers(names, config)
    unquantized = float_layers(model)
    if unquantized:
        share = sum(w for _, w, _ in unquantized.values())
        # every distinct layer weight: the searched layers', these, and those the globs leave out
        kept = {id(m.weight): m.weight.numel() for n, m in model.named_modules()
                if n and (quantizable(m) or n in names)}
        total = share + sum(kept.values())
        first = ", ".join(f"{n} ({kind}: {why})" for n, (kind, _, why) in list(unquantized.items())[:3])
        warnings.warn(
            f"{len(unquantized)} weight layers stay float32 ({share:,} of {total:,} layer weights, "
            f"{100 * share / total:.1f}%; the average bits cover the quantized layers only): {first}"
            + (" ..." if len(unquantized) > 3 else ""),
            stacklevel=3,
        )
    # before any swap or quantizer: the float model's activity on the calibration batches
    activity, activity_note = _measure_activity(model, names, calib)
    if calib is not None and config.search.metric == "loss":
        # a measured table, not traces x weight error; a protected layer's own candidate is measured too
        own = {n: [c] for n, c in protected.items() if c not in cands}
        rows = {n: [*cands, *own.get(n, [])] for n in names}
        metric, dead = "loss", []
        table = measure_loss_table(model, rows, calib, loss_fn, config)
        traces = {n: max(row.values()) for n, row in table.items()}  # each layer's worst candidate
        swap_layers(model, include=config.include, exclude=config.exclude, scheme="uniform", bits=8)
        layers = quant_layers(model)
    else:
        metric, measured = measure_traces(model, names, calib, loss_fn, config)
        traces, dead = fill_dead_layers(measured)
        if dead:
            warnings.warn(
                f"{metric} traces are zero for layers {dead}: no gradient reached them on the calibration "
                "data (neurons that never fire?); they rank as the least sensitive layers",
                stacklevel=3,
            )
        swap_layers(model, include=config.include, exclude=config.exclude, scheme="uniform", bits=8)
        layers = quant_layers(model)
        error = functools.partial(weight_error, scale_init=config.scale_init)
        table = sensitivity_table({n: layers[n] for n in names}, traces, cands, error)
        for name, cand in protected.items():  # a protected layer keeps its own candidate whatever is searched
            if cand not in table[name]:
                row = sensitivity_table({name: layers[name]}, traces, [cand], error)[name]
                table[name][cand] = row[cand]
    sizes = {n: layers[n].weight.numel() for n in names}
    return Analysis(
        table, sizes, traces, metric, protected, yielding_layers(names, config), tuple(dead),
        activity=activity, activity_note=activity_note, float_layers=unquantized,
    )


def _measure_activity(
    model: nn.Module, names: list[str], calib: list[tuple[Any, Any]] | None
) -> tuple[dict[str, LayerActivity] | None, str]:
    """Each layer's activity on the calibration batches (float model), or ``(None, why not)``.

    Only an energy budget needs it, so a model the energy model does not fit still gets a bits-only plan.
    """
    if calib is None:
        return None, "there is no calibration data (pass calib_data)"
    time_first = input_layout(calib[0])
    if time_first is None:
        return None, (
            f"the energy model needs inputs that are one tensor [B, ...] or [T, B, ...], got "
            f"{describe(calib[0][0])}"
        )
    try:
        activity = measure_activity(model, calib, max_batches=len(calib), time_first=time_first)
    except Exception as err:  # any failure here must leave the bits-only search working; it is reported
        return None, f"measuring the layers' activity failed ({first_line(err)})"
    if not sum(sum(layer_cost(activity[n], None, None)) for n in names) > 0:
        return None, "the quantized layers did no work on the calibration batches"
    return {n: activity[n] for n in names}, ""


def search_plan(
    analysis: Analysis,
    budget: float,
    config: QuantConfig | None = None,
    *,
    energy_budget: float | None = None,
) -> Plan:
    """Allocate (scheme, bits) per layer under ``budget`` (and ``energy_budget``) from an :class:`Analysis`.

    The searched layers choose among ``config.search.schemes``/``bits``; protected layers keep their own
    candidate, and default first/last protection yields when it alone would make a budget unreachable
    (:func:`settle_protection`, and the same rule for the energy budget).

    ``energy_budget`` is the plan's estimated energy per inference as a fraction of the same layers' FP32
    energy (``0.1``: 10%), by :func:`hq_ptq.energy.layer_cost` on the activity measured by :func:`analyze`
    on the calibration batches. When the activity is known, ``plan.meta["energy_fraction"]`` gives the
    plan's fraction whether or not an energy budget was set.
    """
    config = config or QuantConfig()
    check_budget(budget)
    check_energy_budget(energy_budget)
    if energy_budget is not None and analysis.activity is None:
        raise ValueError(
            "energy_budget needs each layer's activity, which could not be measured: "
            f"{analysis.activity_note}"
        )
    protected, released = settle_protection(
        analysis.protected, analysis.yielding, analysis.sizes, budget, config
    )
    if released:
        s = config.search
        warnings.warn(
            f"holding the first/last layers at {s.protect_scheme} {s.protect_bits} bits would make budget "
            f"{budget:g} unreachable; {released} are searched like the other layers "
            "(search.protect_first_last=false says so up front)",
            stacklevel=2,
        )
    allowed = set(candidates(config))
    energy, fp32_pj = None, None
    if analysis.activity is not None:
        costs = candidate_energy(analysis.activity, {n: list(row) for n, row in analysis.table.items()})
        fp32_pj = math.fsum(sum(layer_cost(a, None, None)) for a in analysis.activity.values())
        energy = {n: {c: v / fp32_pj for c, v in row.items()} for n, row in costs.items()}
    if energy_budget is not None:
        s = config.search
        protected, released_e = _release_for_energy(
            protected, analysis.yielding, energy, allowed, energy_budget
        )
        if released_e:
            warnings.warn(
                f"holding the first/last layers at {s.protect_scheme} {s.protect_bits} bits would make "
                f"energy_budget {energy_budget:g} unreachable; {released_e} are searched like the other "
                "layers",
                stacklevel=2,
            )
            released = [*released, *released_e]
    table = {
        name: (row if name in protected else {c: v for c, v in row.items() if c in allowed})
        for name, row in analysis.table.items()
    }
    plan = allocate(
        table,
        analysis.sizes,
        budget,
        method=config.search.method,
        protected=protected,
        energy=energy if energy_budget is not None else None,
        energy_budget=energy_budget,
    )
    if analysis.activity is not None:
        fraction = estimate_energy(analysis.activity, plan).quant_pj / fp32_pj
        found = {"energy_fraction": fraction, "energy_fp32_pj": fp32_pj, "energy_pj": fraction * fp32_pj}
        plan = Plan(plan.layers, plan.budget, plan.method, {**plan.meta, **found})
    meta = {
        **plan.meta,
        "metric": analysis.metric,
        "traces": analysis.traces,
        "protected": sorted(protected),
        "released": released,
        "dead_layers": list(analysis.dead),
        "float_layers": {n: {"type": kind, "weights": w, "why": why}
                         for n, (kind, w, why) in analysis.float_layers.items()},
    }
    return Plan(layers=plan.layers, budget=plan.budget, method=plan.method, meta=meta)


def _release_for_energy(
    protected: dict[str, Candidate],
    yielding: tuple[str, ...],
    energy: dict[str, dict[Candidate, float]],
    allowed: set[Candidate],
    energy_budget: float,
) -> tuple[dict[str, Candidate], list[str]]:
    """:func:`settle_protection`'s rule for the energy budget: while even the cheapest plan (protected
    layers at their candidate, the others at their cheapest allowed one) is over ``energy_budget``,
    release the yielding protected layer whose release saves the most energy."""
    kept = dict(protected)
    released: list[str] = []

    def cheapest(name: str) -> float:
        return min(v for c, v in energy[name].items() if c in allowed)

    def lowest() -> float:
        return math.fsum(energy[n][kept[n]] if n in kept else cheapest(n) for n in energy)

    left = [n for n in yielding if n in kept]
    while left and lowest() > energy_budget * (1 + 1e-9):
        name = max(left, key=lambda n: energy[n][kept[n]] - cheapest(n))
        left.remove(name)
        del kept[name]
        released.append(name)
    return kept, released


def quantize(
    model: nn.Module,
    budget: float = 3.5,
    *,
    energy_budget: float | None = None,
    calib_data: Batches | None = None,
    train_data: Batches | None = None,
    loss_fn: LossFn | None = None,
    output_fn: OutputFn | None = None,
    config: QuantConfig | None = None,
) -> nn.Module:
    """Quantize ``model``'s weights in place under an average-bit ``budget`` and return it.

    Every Linear/Conv1d/Conv2d/ConvTranspose1d/ConvTranspose2d matching ``config.include``/``exclude`` gets a
    uniform or power-of-two Brevitas quantizer; the per-layer (scheme, bits) plan minimises Hessian-weighted
    weight perturbation with the parameter-weighted average bits ≤ ``budget``. With ``train_data``, a short
    QAT (task loss + distillation from the float model) recovers accuracy.

    The call is a transaction: the budget, candidates, data and the model's forward on the first
    calibration batch are checked before any layer is quantized, and if anything fails (or the call
    is interrupted) the model is put back exactly as it was given: module types, state_dict keys and
    values, training flags. Each ``nn.MultiheadAttention`` is split into four Linear projections first
    (:func:`hq_ptq.attention.split_attention`: same outputs, quantizable layers).

    Args:
        model: any nn.Module with Conv/Linear layers. Batches are ``(inputs, targets)`` and the model is
            called as :mod:`hq_ptq.model_io` says (tensor → ``model(x)``, tuple → ``model(*x)``, dict →
            ``model(**x)``). snnTorch neurons are reset (:func:`hq_ptq.snn.reset_states`) before every
            forward hq_ptq runs, so no membrane carries over between batches.
        budget: parameter-weighted average weight bits over the quantized layers.
        energy_budget: also keep the plan's estimated energy per inference (45 nm model, docs/ENERGY.md) at
            most this fraction of the same layers' FP32 energy, e.g. ``0.1`` for 10%; needs ``calib_data``
            (each layer's activity is measured on it) and inputs that are one tensor. None: bits only.
        calib_data: iterable of ``(inputs, targets)`` batches for the sensitivity analysis and, once the plan
            is applied, for re-estimating BatchNorm statistics (``config.bn_recalibration_batches``
            batches); drawn once, so a generator is fine. Without it the data-free metric ("data_free") is
            used and BatchNorm keeps the float model's statistics.
        train_data: iterable of ``(inputs, targets)`` batches for QAT (re-iterated); without it, no QAT.
        loss_fn: ``loss_fn(outputs, targets)`` for the sensitivity analysis and QAT; cross-entropy by default.
        output_fn: ``output_fn(outputs) -> [B, classes]`` class scores, used for distillation. Default: with
            the default cross-entropy, the outputs themselves when they are ``[B, classes]``. For any other
            output, or a ``loss_fn`` of your own without ``output_fn``, distillation is off (with a
            warning) and QAT uses ``loss_fn`` alone.
        config: search and QAT settings. ``config.device`` (default "auto": wherever the model is) moves the
            model to "cpu", "cuda" or "cuda:N" first; every batch hq_ptq uses (analysis, BatchNorm
            re-estimation, QAT for the model and its teacher) is moved to the model's device at the point
            of use, inputs and targets, so loaders may yield CPU tensors.

    Returns:
        The same model, quantized (on ``config.device``); ``hq_ptq.get_plan(model)`` gives the plan.

    Raises:
        ValueError: a budget no allowed candidate can reach (the message gives the reachable range and the
            settings that change it), unknown schemes/bits, no matching layer, empty or non-finite data,
            inputs the model or outputs the loss cannot take, a device that is not there (``"cuda"``
            without CUDA), data that cannot be moved to the model's device or a forward that mixes devices
            (the message names them).

    Under torch.distributed (e.g. torchrun), give every rank the same ``calib_data`` and ``train_data`` in the
    same order: rank ``r`` of ``N`` computes on batches ``r, r+N, ...``, the sensitivity samples are summed
    over ranks (every rank gets the single-process plan) and QAT runs with DistributedDataParallel.

    Example:
        >>> qmodel = hq_ptq.quantize(model, budget=3.5, calib_data=loader, train_data=loader)
    """
    config = config or QuantConfig()
    # every check that can fail runs before the model is touched
    check_budget(budget)
    check_energy_budget(energy_budget)
    if energy_budget is not None and calib_data is None:
        raise ValueError("energy_budget needs calib_data: each layer's activity is measured on it")
    candidates(config)
    _check_weights(model)
    restore = _snapshot(model)
    ran_forward = False
    try:
        # the only change before the checks below, and undone if one fails: it computes the same outputs
        split_matching_attention(model, config.include, config.exclude)
        names = find_layers(model, config.include, config.exclude)
        sizes = {n: m.weight.numel() for n, m in model.named_modules() if n in names}
        protected, yielding = protected_layers(names, config), yielding_layers(names, config)
        settle_protection(protected, yielding, sizes, budget, config)
        ran_forward = True
        _quantize(model, names, calib_data, train_data, loss_fn, output_fn, config, budget, energy_budget)
    except BaseException:
        restore(reset_neurons=ran_forward)  # a call refused before any forward keeps the user's membranes
        raise
    model.eval()
    return model


def _quantize(model: nn.Module, names: list[str], calib_data: Batches | None, train_data: Batches | None,
              loss_fn: LossFn | None, output_fn: OutputFn | None, config: QuantConfig, budget: float,
              energy_budget: float | None) -> None:
    """:func:`quantize` once the model is split and its layers found; a failure is undone by the caller."""
    # "auto": where the model is (the batches follow its first parameter); CUDA asked for must exist
    device = resolve_device(config.device, model)
    # the model moves to config.device now, and back to where it was if anything below fails
    with _on_device(model, None if config.device == "auto" else device):
        calib = None
        if calib_data is not None:
            # drawn once, as many batches as the analysis and the BatchNorm re-estimation need
            bn = config.bn_recalibration_batches if _batchnorms(model) else 0
            calib = _take(calib_data, max(config.search.calib_batches, bn), device)
            _check_forward(model, calib[0], loss_fn)
        else:
            warnings.warn(
                "hq_ptq.quantize without calib_data uses the data-free metric; pass calib_data for "
                "Hessian-aware sensitivity and train_data for QAT recovery",
                stacklevel=3,
            )
        qat = train_data is not None and config.qat.steps > 0
        # one float copy serves as the distillation teacher; candidates never copy the model
        teacher = detached_copy(model).eval() if qat and config.qat.distill_weight > 0 else None

        # the checks analyze() would repeat (weights, candidates, layers, the first forward) are done
        first = calib[: config.search.calib_batches] if calib else None
        analysis = _score(model, names, first, loss_fn, config)
        plan = search_plan(analysis, budget, config, energy_budget=energy_budget)
        apply_plan(model, plan, scale_init=config.scale_init)
        if calib is not None and config.bn_recalibration_batches:
            recalibrate_bn(model, calib, config.bn_recalibration_batches)
        if qat:
            finetune(
                model,
                train_data,
                config.qat,
                teacher=teacher,
                loss_fn=loss_fn,
                output_fn=output_fn,
                seed=config.seed,
                precision=config.precision,
            )


def _tensor_devices(model: nn.Module) -> dict[str, torch.device]:
    return {n: t.device for n, t in itertools.chain(model.named_parameters(), model.named_buffers())}


@contextlib.contextmanager
def _on_device(model: nn.Module, device: torch.device | None):
    """``model`` moved to ``device`` for the block (None: left where it is), and put back on its own
    device(s) when the block fails; after the block succeeds it stays on ``device``."""
    held = _tensor_devices(model)
    moved = device is not None and any(d != device for d in held.values())
    if moved:
        model.to(device)
    try:
        yield
    except BaseException:
        if moved:
            if len(set(held.values())) == 1:
                model.to(next(iter(held.values())))
            else:  # a model spread over devices goes back tensor by tensor
                for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
                    if name in held and t.device != held[name]:
                        t.data = t.data.to(held[name])
                        if isinstance(t, nn.Parameter) and t.grad is not None:
                            t.grad = t.grad.to(held[name])
        raise


# plain attributes hq_ptq sets on modules: a quantized layer's record, Brevitas' submodule cache, and the
# nested-tensor switch split_attention turns off on a TransformerEncoder
_LAYER_ATTRS = (QUANT_ATTR, "_cached_sub_tensor_slice_list_modules", "use_nested_tensor")


def _snapshot(model: nn.Module) -> Callable[[], None]:
    """A function that puts ``model`` back as it is now: module tree (so swapped layers go back to the
    user's own modules), each layer's quantization record (a model quantized before keeps its plan),
    state_dict values, parameters' requires_grad and gradients, training flags and the search report."""
    missing = object()
    modules = list(model.modules())
    children = [(m, dict(m._modules)) for m in modules]
    attrs = [(m, {a: m.__dict__.get(a, missing) for a in _LAYER_ATTRS}) for m in modules]
    training = [(m, m.training) for m in modules]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    report = model.__dict__.get(SEARCH_ATTR, missing)

    def put(obj: object, name: str, value: object) -> None:
        if value is missing:
            obj.__dict__.pop(name, None)
        else:
            obj.__dict__[name] = value

    def restore(reset_neurons: bool = True) -> None:
        for module, kids in children:
            module._modules.clear()
            module._modules.update(kids)
        for module, saved in attrs:
            for name, value in saved.items():
                put(module, name, value)
        with torch.no_grad():
            for key, value in model.state_dict(keep_vars=True).items():
                value.copy_(state[key])
        for p, flag, grad in params:
            p.requires_grad_(flag)
            p.grad = grad
        for module, flag in training:
            module.training = flag
        put(model, SEARCH_ATTR, report)
        if reset_neurons:  # a failed forward leaves half-run state (and its graph) behind
            reset_states(model)

    return restore


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers whose running statistics :func:`recalibrate_bn` re-estimates."""
    return [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def _check_weights(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter {name} has NaN or Inf values; fix the model before quantizing")


def recalibrate_bn(model: nn.Module, data: Batches, batches: int) -> int:
    """Re-estimate every BatchNorm's running statistics on ``model`` as it is now (e.g. quantized).

    The statistics become the plain average over the first ``batches`` batches of ``data`` (momentum
    None), computed without gradients; only the BatchNorm layers run in training mode, so dropout and
    the like stay off. Momentum and training flags are restored. Returns the number of batches used.
    Inputs are moved to the model's device.

    Raises:
        ValueError: ``batches < 1`` or ``data`` yields no batch (the statistics are left untouched).
    """
    if batches < 1:
        raise ValueError(f"recalibrate_bn needs at least one batch, got batches={batches}")
    norms = _batchnorms(model)
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
            device = model_device(model)
            for inputs, _ in itertools.chain([first], it):
                reset_states(model)
                call(model, batch_to(inputs, device, what="BatchNorm inputs"))
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
