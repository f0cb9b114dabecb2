"""Per-layer sensitivity for mixed-precision allocation (HAWQ-V2/V3 style).

The sensitivity of layer ``l`` to candidate ``c = (scheme, bits)`` is

    Omega_l(c) = (Tr(H_l) / n_l) * ||Q_c(W_l) - W_l||^2

where ``H_l`` is the diagonal block of the loss Hessian for the layer's weight and ``n_l``
its number of elements. Three trace metrics are provided: Hutchinson (``"hessian"``), the
empirical Fisher diagonal (``"fisher"``) and a data-free constant (``"data_free"``: the Hessian
taken as identity). Traces are cached in JSON keyed by a fingerprint of the model weights and the
analysis options, because the Hessian pass is the expensive part (:mod:`hq_ptq.sensitivity_cache`).

Spiking nets: snnTorch surrogates are differentiable twice, but the "Hessian" is then the
Jacobian of a pseudo-gradient. It is not symmetric and its trace can be negative. Hutchinson is
still unbiased for that trace; :func:`hutchinson_traces` reports its magnitude (see there).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hq_ptq.distributed import Shard
from hq_ptq.model_io import call, map_tensors

logger = logging.getLogger(__name__)

Batch = tuple[Any, Any]
LossFn = Callable[[Any, Any], torch.Tensor]
ResetFn = Callable[[nn.Module], object]  # return value ignored (reset_states returns a count)
ProgressFn = Callable[[int, int], None]
Candidate = tuple[str, int]
Table = dict[str, dict[Candidate, float]]



@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of one layer's mean Hessian trace Tr(H_l)/n_l.

    ``mean`` is signed (pseudo-Hessians of spiking nets can give negative values); ``stderr`` is the
    standard error of the mean over ``n_samples`` Rademacher probes; ``n_zero`` counts probes that
    were exactly zero.
    """

    mean: float
    stderr: float
    n_samples: int
    n_zero: int

    @property
    def rel_stderr(self) -> float:
        """Standard error relative to |mean| (inf when the mean is zero and the error is not)."""
        if self.mean == 0.0:
            return 0.0 if self.stderr == 0.0 else math.inf
        return self.stderr / abs(self.mean)


# ------------------------------------------------------------------------------------------------
# helpers


def _layer_weights(layers: Mapping[str, nn.Module]) -> dict[str, nn.Parameter]:
    if not layers:
        raise ValueError("layers is empty; pass a mapping {name: module} of the layers to analyse")
    weights: dict[str, nn.Parameter] = {}
    seen: dict[int, str] = {}
    for name, layer in layers.items():
        w = getattr(layer, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise ValueError(
                f"layer {name!r} ({type(layer).__name__}) has no tensor .weight; "
                "pass only Linear/Conv-like layers"
            )
        if not w.is_floating_point():
            raise ValueError(f"layer {name!r} has a non-float weight ({w.dtype}); pass float layers")
        if id(w) in seen:
            # A shared weight would be counted twice in the joint Hessian-vector product.
            raise ValueError(
                f"layers {seen[id(w)]!r} and {name!r} share one weight; list a shared weight once"
            )
        seen[id(w)] = name
        weights[name] = w
    return weights


@contextlib.contextmanager
def _analysis_mode(model: nn.Module, weights: Iterable[torch.Tensor]) -> Iterator[None]:
    """Eval mode (deterministic BN/dropout) and grads only for ``weights``; restores both after."""
    training = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    wanted = {id(w) for w in weights}
    flags = [(p, p.requires_grad) for p in params]
    extra = [w for w in weights if id(w) not in {id(p) for p in params}]
    extra_flags = [(w, w.requires_grad) for w in extra]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(id(p) in wanted)
        for w in extra:
            w.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags + extra_flags:
            p.requires_grad_(flag)
        for m, flag in training.items():
            m.training = flag


def _to_device(x: Any, device: torch.device) -> Any:
    return map_tensors(x, lambda t: t if t.device == device else t.to(device))


def _batch_loss(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    reset: ResetFn | None,
    device: torch.device,
    names: list[str],
) -> torch.Tensor:
    try:
        inputs, targets = batch
    except (TypeError, ValueError):
        raise ValueError(
            f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}"
        ) from None
    if reset is not None:
        reset(model)
    outputs = call(model, _to_device(inputs, device))
    loss = loss_fn(outputs, _to_device(targets, device))
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor; reduce it (e.g. mean) over the batch")
    if not loss.requires_grad:
        raise ValueError(
            f"the loss does not depend on any of the layers {names}; check that they belong to "
            "`model` and that the forward is not under torch.no_grad()"
        )
    return loss.reshape(())


def _check_traces(traces: Mapping[str, float], metric: str) -> None:
    bad_nan = [n for n, t in traces.items() if not math.isfinite(t)]
    if bad_nan:
        raise ValueError(
            f"{metric} traces are non-finite for layers {bad_nan}; check the loss and inputs for NaN/inf"
        )


def _batches_list(batches: Iterable[Batch]) -> list[Batch]:
    out = list(batches)
    if not out:
        raise ValueError("batches is empty; pass at least one (inputs, targets) batch")
    return out


def _sharded_batches(
    batches: Iterable[Batch], shard: Shard | None
) -> tuple[list[Batch], int, Callable[[int], bool]]:
    """``(this rank's batches, global batch count, owns(global index))``; one process owns every batch."""
    if shard is None:
        data = _batches_list(batches)
        return data, len(data), lambda index: True
    data = list(batches)
    counts = torch.zeros(shard.world, dtype=torch.float64)
    counts[shard.rank] = len(data)
    counts = shard.reduce(counts)  # every rank sees every count, so all raise together or none does
    total = int(counts.sum())
    if total == 0:
        raise ValueError("batches is empty on every rank; pass at least one (inputs, targets) batch")
    expected = [len(range(r, total, shard.world)) for r in range(shard.world)]
    if [int(c) for c in counts] != expected:
        raise ValueError(
            f"ranks hold {[int(c) for c in counts]} batches; rank r must hold global batches r, r+world, ... "
            f"(batches[rank::world]), i.e. {expected}"
        )
    return data, total, shard.owns


# ------------------------------------------------------------------------------------------------
# trace metrics


def hutchinson_estimates(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Batch],
    loss_fn: LossFn | None = None,
    *,
    rel_tol: float = 0.05,
    min_samples: int = 8,
    max_samples: int = 64,
    hvps_per_batch: int | None = None,
    seed: int = 0,
    reset: ResetFn | None = None,
    progress: ProgressFn | None = None,
    shard: Shard | None = None,
) -> dict[str, TraceEstimate]:
    """Signed Hutchinson estimates of Tr(H_l)/n_l with their standard errors.

    Same arguments as :func:`hutchinson_traces`, which applies the sign/zero policy on top.
    ``hvps_per_batch`` is the number of probes per visit of a batch; the default
    ``ceil(min_samples / n_batches)`` makes the first convergence check come after every batch
    was visited once. The standard error treats probes as independent; probes that share a
    batch are correlated through it, so with few batches it underestimates the error with
    respect to the data distribution.

    With ``shard`` (data-parallel ranks), ``batches`` are this rank's global batches ``rank, rank+world,
    ...``. Probe ``n`` is still the HVP of the same Rademacher vector on the same global batch as in one
    process: every rank draws every vector from the same generator, the batch's owner computes the sample,
    the samples are summed over ranks after each round of ``world`` batch visits, and the stopping rule is
    replayed visit by visit, so every rank returns what one process would (at most ``world - 1`` visits
    are computed past the stopping point).
    """
    if not 0.0 < rel_tol:
        raise ValueError(f"rel_tol={rel_tol} must be > 0")
    if not 2 <= min_samples <= max_samples:
        raise ValueError(
            f"need 2 <= min_samples <= max_samples, got min_samples={min_samples}, max_samples={max_samples}"
        )
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    weights = _layer_weights(layers)
    names = list(weights)
    params = [weights[n] for n in names]
    data, n_batches, owner = _sharded_batches(batches, shard)
    if hvps_per_batch is not None and hvps_per_batch < 1:
        raise ValueError(f"hvps_per_batch={hvps_per_batch} must be >= 1 (or None for the default)")
    per_visit = hvps_per_batch or max(1, math.ceil(min_samples / n_batches))
    # one process checks convergence after every visit; ranks do a round of `world` visits between sums
    world = 1 if shard is None else shard.world
    device = params[0].device
    gens: dict[torch.device, torch.Generator] = {}

    def rademacher(w: torch.Tensor) -> torch.Tensor:
        # One local generator per device so the global RNG stays untouched.
        if w.device not in gens:
            gens[w.device] = torch.Generator(device=w.device).manual_seed(seed)
        bits = torch.randint(0, 2, w.shape, generator=gens[w.device], device=w.device)
        return bits.to(w.dtype).mul_(2).sub_(1)

    samples = torch.zeros(max_samples, len(names), dtype=torch.float64)
    sizes = torch.tensor([p.numel() for p in params], dtype=torch.float64)
    n = 0
    visit = 0
    with _analysis_mode(model, params):
        try:
            graph_index = -1
            grads: list[torch.Tensor | None] = []
            done = False
            while not done:
                first, ends = n, []
                for _ in range(world):
                    if n >= max_samples:
                        break
                    index = visit % n_batches
                    visit += 1
                    mine = owner(index)
                    if mine and index != graph_index:
                        grads = []  # free the previous graph before building the next one
                        batch = data[index // world]  # this rank holds global batches rank, rank+world, ...
                        loss = _batch_loss(model, batch, loss_fn, reset, device, names)
                        grads = list(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True))
                        del loss  # the graph stays alive through grads only
                        graph_index = index
                    # Layers whose gradient is constant in every weight contribute exact zeros.
                    live = [i for i, g in enumerate(grads) if mine and g is not None and g.requires_grad]
                    for _ in range(min(per_visit, max_samples - n)):
                        vs = [rademacher(p) for p in params]  # drawn on every rank: same stream
                        if live:
                            hvs = torch.autograd.grad(
                                [grads[i] for i in live],
                                params,
                                grad_outputs=[vs[i] for i in live],
                                retain_graph=True,
                                allow_unused=True,
                            )
                            vhv = [
                                (v * hv).sum() if hv is not None else v.new_zeros(())
                                for v, hv in zip(vs, hvs, strict=True)
                            ]
                            samples[n] = torch.stack(vhv).detach().double().cpu() / sizes
                        n += 1
                        if progress is not None:
                            progress(n, max_samples)
                    ends.append(n)
                if shard is not None:
                    # rows of other ranks' visits are zero here: the sum gives every rank every sample
                    samples[first:n] = shard.reduce(samples[first:n])
                for end in ends:
                    if end >= min_samples and _converged(samples[:end], rel_tol):
                        n, done = end, True
                        break
                done = done or n >= max_samples
        finally:
            grads = []
            if reset is not None:
                reset(model)  # drop hidden states that still reference the autograd graph
    used = samples[:n]
    mean = used.mean(dim=0)
    stderr = used.std(dim=0, unbiased=True) / math.sqrt(n)
    zeros = (used == 0).sum(dim=0)
    out = {
        name: TraceEstimate(float(mean[i]), float(stderr[i]), n, int(zeros[i]))
        for i, name in enumerate(names)
    }
    logger.info(
        "hutchinson: %d probes over %d batch visits; worst relative stderr %.3f",
        n,
        visit,
        max(e.rel_stderr for e in out.values()),
    )
    return out


def _converged(samples: torch.Tensor, rel_tol: float) -> bool:
    # Non-finite samples cannot converge; stop early, the caller reports them.
    if not torch.isfinite(samples).all():
        return True
    mean = samples.mean(dim=0).abs()
    stderr = samples.std(dim=0, unbiased=True) / math.sqrt(samples.shape[0])
    return bool((stderr <= rel_tol * mean).all())


def hutchinson_traces(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Batch],
    loss_fn: LossFn | None = None,
    *,
    rel_tol: float = 0.05,
    min_samples: int = 8,
    max_samples: int = 64,
    hvps_per_batch: int | None = None,
    seed: int = 0,
    reset: ResetFn | None = None,
    progress: ProgressFn | None = None,
    shard: Shard | None = None,
) -> dict[str, float]:
    """Per-layer mean Hessian trace Tr(H_l)/n_l of the loss w.r.t. each layer's ``.weight``.

    Hutchinson with Rademacher probes: each probe draws one vector per layer weight and one
    double-backward over all weights serves every layer. The gradient graph is built once per batch
    visit and reused by several probes. Sampling stops once every layer's relative standard error is
    at most ``rel_tol`` (after ``min_samples``), or at ``max_samples``; batches are cycled.

    The model runs in eval mode (BatchNorm uses running stats, so the function is
    deterministic) and only the analysed weights require grad; both are restored afterwards.
    The global RNG is untouched.

    Sign policy: with surrogate gradients the pseudo-Hessian can have a negative trace. Its
    magnitude is returned (``abs(mean)``) and a warning names those layers: curvature of either
    sign is a sensitivity, whereas a negative Omega would make a layer look like it gains from
    quantization.

    Args:
        model: called as ``model(inputs)``.
        layers: ``{name: module}``, each with a float ``.weight``.
        batches: iterable of ``(inputs, targets)``; materialised into a list.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; default cross-entropy.
        rel_tol: target relative standard error per layer.
        min_samples: probes before the first convergence check.
        max_samples: probe cap.
        hvps_per_batch: probes per batch visit (see :func:`hutchinson_estimates`).
        seed: seed of the local generator for the probes.
        reset: ``reset(model)`` before every forward (spiking neuron state).
        progress: ``progress(done, total)`` after each probe.
        shard: data-parallel rank; ``batches`` are then this rank's share (see :func:`hutchinson_estimates`).

    Returns:
        ``{name: trace}``, all finite and >= 0; exactly 0 where no gradient reached a layer (see
        :func:`fill_dead_layers` for how hq_ptq treats those).

    Raises:
        ValueError: a layer's estimate is non-finite.
    """
    est = hutchinson_estimates(
        model,
        layers,
        batches,
        loss_fn,
        rel_tol=rel_tol,
        min_samples=min_samples,
        max_samples=max_samples,
        hvps_per_batch=hvps_per_batch,
        seed=seed,
        reset=reset,
        progress=progress,
        shard=shard,
    )
    zero = [n for n, e in est.items() if e.n_zero == e.n_samples]
    traces = {n: (0.0 if n in zero else e.mean) for n, e in est.items()}
    _check_traces(traces, "hessian")
    negative = [n for n, t in traces.items() if t < 0]
    if negative:
        logger.info(
            "negative pseudo-Hessian trace for %s (surrogate gradients); using its magnitude",
            negative,
        )
    noisy = [n for n, e in est.items() if e.rel_stderr > rel_tol]
    if noisy:
        logger.info(
            "hutchinson did not reach rel_tol=%.3g in %d probes for %s; raise search.hutchinson_probes for "
            "tighter traces",
            rel_tol,
            max_samples,
            noisy,
        )
    return {n: abs(t) for n, t in traces.items()}


def fisher_traces(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Batch],
    loss_fn: LossFn | None = None,
    *,
    reset: ResetFn | None = None,
    progress: ProgressFn | None = None,
    shard: Shard | None = None,
) -> dict[str, float]:
    """Empirical-Fisher proxy of Tr(H_l)/n_l: mean over batches of sum(g_l^2)/n_l.

    ``g_l`` is the batch-mean gradient of the loss (one backward per batch, no per-sample
    gradients), so the values shrink with batch size; only their ratios across layers matter for
    allocation. Same model handling as :func:`hutchinson_traces`. With ``shard``, ``batches`` are this
    rank's global batches ``rank, rank+world, ...``; the per-batch values are summed over ranks and
    added in batch order, so every rank returns the single-process result.

    Raises:
        ValueError: a layer's value is non-finite (a layer no gradient reached gets exactly 0).
    """
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    weights = _layer_weights(layers)
    names = list(weights)
    params = [weights[n] for n in names]
    data, n_batches, _ = _sharded_batches(batches, shard)
    device = params[0].device
    rows = torch.zeros(n_batches, len(names), dtype=torch.float64)
    sizes = torch.tensor([p.numel() for p in params], dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    rank, world = (0, 1) if shard is None else (shard.rank, shard.world)
    with _analysis_mode(model, params):
        try:
            for k, batch in enumerate(data):
                loss = _batch_loss(model, batch, loss_fn, reset, device, names)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                sq = [g.detach().double().pow(2).sum().cpu() if g is not None else zero for g in grads]
                rows[rank + k * world] = torch.stack(sq) / sizes
                if progress is not None:
                    progress(k + 1, len(data))
        finally:
            if reset is not None:
                reset(model)
    if shard is not None:
        rows = shard.reduce(rows)  # each row is computed on one rank, zero on the others
    total = torch.zeros(len(names), dtype=torch.float64)
    for row in rows:  # in batch order, so the sum is the same for any number of ranks
        total += row
    traces = {n: float(total[i]) / n_batches for i, n in enumerate(names)}
    _check_traces(traces, "fisher")
    return traces


# A trace this far below the largest one is a zero up to round-off: e.g. a surrogate gradient of 1e-13
# reaching a layer behind neurons that sit 1e6 below threshold, or second-order noise of a zero input.
DEAD_RELATIVE = 1e-9


def fill_dead_layers(traces: Mapping[str, float]) -> tuple[dict[str, float], list[str]]:
    """The rule for dead layers, whose trace is zero (or below ``DEAD_RELATIVE`` × the largest trace):
    returns ``(traces, dead)``.

    A zero trace means no gradient reached the layer on the calibration data, which in spiking models
    is common: a block whose neurons never fire passes no input to the next layer and (almost) no
    surrogate gradient to the previous one. That is a measurement (the layer did not matter on this
    data), not an error, but a zero would make every candidate of the layer free and send it to the
    fewest bits, although it may fire on other inputs. So a dead layer gets the smallest trace measured
    on a live layer: it ranks as the least sensitive layer, and its candidates are still ordered by
    their weight error. When no layer is live, every trace becomes 1.0, the data-free metric.
    """
    top = max(traces.values(), default=0.0)
    dead = [n for n, t in traces.items() if t <= DEAD_RELATIVE * top]
    if not dead:
        return dict(traces), dead
    live = [t for n, t in traces.items() if n not in dead]
    floor = min(live) if live else 1.0
    return {n: (floor if n in dead else t) for n, t in traces.items()}, dead


def weight_traces(layers: Mapping[str, nn.Module]) -> dict[str, float]:
    """Data-free metric: 1.0 per layer, so Omega_l(c) = ||Q_c(W_l) - W_l||^2.

    This is the HAWQ formula under H = I (mean trace 1). It is not divided by n_l: a big layer
    perturbs the output more than a small one at the same per-element error.
    """
    _layer_weights(layers)
    return {name: 1.0 for name in layers}


# ------------------------------------------------------------------------------------------------
# sensitivity table


def sensitivity_table(
    layers: Mapping[str, nn.Module],
    traces: Mapping[str, float],
    candidates: Iterable[Candidate],
    weight_error: Callable[[nn.Module, str, int], float],
) -> Table:
    """Omega_l(c) = traces[l] * weight_error(layer, scheme, bits) for every layer and candidate.

    Returns:
        ``{layer_name: {(scheme, bits): omega}}``.
    """
    cands = [(str(s), int(b)) for s, b in candidates]
    if not cands:
        raise ValueError("candidates is empty; pass (scheme, bits) pairs such as ('uniform', 4)")
    missing = [n for n in layers if n not in traces]
    if missing:
        raise KeyError(f"no trace for layers {missing}; compute traces for the same layers")
    table: Table = {}
    for name, layer in layers.items():
        row: dict[Candidate, float] = {}
        for scheme, bits in cands:
            err = float(weight_error(layer, scheme, bits))
            if not math.isfinite(err) or err < 0:
                raise ValueError(
                    f"weight_error({name!r}, {scheme!r}, {bits}) = {err}; it must be finite and >= 0"
                )
            row[(scheme, bits)] = float(traces[name]) * err
        table[name] = row
    return table
