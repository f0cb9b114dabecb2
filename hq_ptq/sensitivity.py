"""Per-layer sensitivity for mixed-precision allocation (HAWQ-V2/V3 style).

The sensitivity of layer ``l`` to candidate ``c = (scheme, bits)`` is

    Omega_l(c) = (Tr(H_l) / n_l) * ||Q_c(W_l) - W_l||^2

where ``H_l`` is the diagonal block of the loss Hessian for the layer's weight and ``n_l``
its number of elements. Three trace metrics are provided: Hutchinson (``"hessian"``), the
empirical Fisher trace (``"fisher"``: the mean over samples of the per-sample squared gradient) and a
data-free constant (``"data_free"``: the Hessian taken as identity). A fourth metric measures the table
directly instead of estimating it (``"loss"``, :func:`loss_table`): Omega_l(c) is the calibration-loss
increase when layer ``l`` alone takes candidate ``c``, the ground truth the trace metrics approximate to
second order. Traces (and the loss table) are cached in JSON keyed by a fingerprint of the model weights
and the analysis options, because these passes are the expensive part (:mod:`hq_ptq.sensitivity_cache`).

Spiking nets: snnTorch surrogates are differentiable twice, but the "Hessian" is then the
Jacobian of a pseudo-gradient. It is not symmetric and its trace can be negative. Hutchinson is
still unbiased for that trace; :func:`hutchinson_traces` returns its magnitude and logs a WARNING naming
the layers whose trace was negative, as it does for layers whose estimate stopped at the probe cap
above the relative-error target.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hq_ptq.distributed import Shard
from hq_ptq.errors import first_line
from hq_ptq.model_io import call, describe, map_tensors, tensors
from hq_ptq.per_sample import max_samples, per_sample_squared_norms
from hq_ptq.snn import detached_copy, train_spikingjelly_neurons
from hq_ptq.swap import set_layer_quant, swap_layers

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
                f"layers {seen[id(w)]!r} and {name!r} share one weight (tied); hq_ptq quantizes a weight "
                f"once: exclude one of them, e.g. QuantConfig(exclude=({name!r},))"
            )
        seen[id(w)] = name
        weights[name] = w
    return weights


@contextlib.contextmanager
def _analysis_mode(model: nn.Module, weights: Iterable[torch.Tensor]) -> Iterator[None]:
    """Eval mode (deterministic BN/dropout) and grads only for ``weights``; restores both after.

    SpikingJelly neurons stay in train mode (:func:`hq_ptq.snn.train_spikingjelly_neurons`): in eval some
    fire through a plain step with no surrogate, so no gradient would reach any layer before them."""
    training = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    wanted = {id(w) for w in weights}
    flags = [(p, p.requires_grad) for p in params]
    extra = [w for w in weights if id(w) not in {id(p) for p in params}]
    extra_flags = [(w, w.requires_grad) for w in extra]
    try:
        model.eval()
        train_spikingjelly_neurons(model)
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


def _split_batch(batch: Batch) -> Batch:
    try:
        inputs, targets = batch
    except (TypeError, ValueError):
        raise ValueError(
            f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}"
        ) from None
    return inputs, targets


def _scalar_loss(
    model: nn.Module, batch: Batch, loss_fn: LossFn, reset: ResetFn | None, device: torch.device
) -> torch.Tensor:
    """``loss_fn`` on one batch from a fresh neuron state, checked to be a scalar (grad or not)."""
    inputs, targets = _split_batch(batch)
    if reset is not None:
        reset(model)
    outputs = call(model, _to_device(inputs, device))
    loss = loss_fn(outputs, _to_device(targets, device))
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor; reduce it (e.g. mean) over the batch")
    return loss


def _batch_loss(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    reset: ResetFn | None,
    device: torch.device,
    names: list[str],
) -> torch.Tensor:
    loss = _scalar_loss(model, batch, loss_fn, reset, device)
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
        logger.warning(
            "negative pseudo-Hessian trace for %s (surrogate gradients); using its magnitude",
            negative,
        )
    noisy = sorted(
        ((n, e.rel_stderr) for n, e in est.items() if n not in zero and e.rel_stderr > rel_tol),
        key=lambda item: -item[1],
    )
    if noisy:
        worst = ", ".join(f"{n} {r:.3g}" for n, r in noisy[:NOISY_SHOWN])
        more = f" and {len(noisy) - NOISY_SHOWN} more" if len(noisy) > NOISY_SHOWN else ""
        logger.warning(
            "hutchinson stopped at the %d-probe cap above rel_tol=%.3g for %d layers "
            "(relative stderr: %s%s); "
            "raise search.hutchinson_probes for tighter traces",
            max_samples,
            rel_tol,
            len(noisy),
            worst,
            more,
        )
    return {n: abs(t) for n, t in traces.items()}


NOISY_SHOWN = 5  # layers named, worst first, when Hutchinson stops at its probe cap


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
    """Empirical Fisher trace per element, Tr(F_l)/n_l = mean_i ||g_{i,l}||^2 / n_l.

    ``g_{i,l}`` is the gradient w.r.t. layer ``l``'s weight of sample ``i``'s own loss (the loss of a
    batch holding that sample alone), and the mean runs over every sample of every batch. It is an
    estimate of Tr(H_l)/n_l near a minimum (F = H for a well-fitted likelihood loss), with the
    per-sample squares instead of the square of the batch mean, so it does not shrink with batch size.

    How the per-sample gradients are found:

    * first, from one batched forward and two backwards (:mod:`hq_ptq.per_sample`): each Linear/Conv
      layer's per-sample gradient is the sum of "output gradient x input" over the rows of its output that
      reach that sample's loss, and which rows those are is measured by a second backward that weights
      sample ``i``'s loss by ``i + 1``. It needs outputs with one dimension of size ``len(targets)``, a loss
      that is the mean of per-sample losses, and layers that do not mix samples; otherwise:
    * each batch is split into single-sample micro-batches along the batch dimension of its inputs,
      found in every input tensor as the one dimension whose size is ``len(targets)``; each micro-batch
      gets one forward and backward. The split is accepted when the mean of the micro-batch losses
      equals the batch loss (relative tolerance ``MICRO_BATCH_RTOL``; the loss must average over samples);
    * with the default cross-entropy, when the split is ambiguous (e.g. time-first ``[T, B, ...]`` inputs
      with ``T == B``) or not accepted: per-sample losses (``reduction="none"`` on the ``[B, classes]``
      scores) are backpropagated one by one through the one batch graph (exact too, but each backward
      costs a whole batch's);
    * otherwise (a ``loss_fn`` of your own that cannot be split): a WARNING names why and the whole
      computation falls back to the batch-mean estimator ``mean over batches of ||mean_i g_{i,l}||^2 / n_l``
      (one backward per batch; it shrinks with batch size, its ratios across layers are what allocation
      uses). It is kept only as that fallback.

    Same model handling as :func:`hutchinson_traces`. With ``shard``, ``batches`` are this rank's global
    batches ``rank, rank+world, ...``; per-batch sums are summed over ranks and added in batch order, so
    every rank returns the single-process result (and all ranks fall back together).

    Raises:
        ValueError: a layer's value is non-finite (a layer no gradient reached gets exactly 0).
    """
    default = loss_fn is None
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    weights = _layer_weights(layers)
    names = list(weights)
    params = [weights[n] for n in names]
    data, n_batches, _ = _sharded_batches(batches, shard)
    device = params[0].device
    rows = torch.zeros(n_batches, len(names), dtype=torch.float64)
    counts = torch.zeros(n_batches, dtype=torch.float64)
    sizes = torch.tensor([p.numel() for p in params], dtype=torch.float64)
    rank, world = (0, 1) if shard is None else (shard.rank, shard.world)
    why = ""
    with _analysis_mode(model, params):
        try:
            for k, batch in enumerate(data):
                got = _sample_squared_grads(
                    model, layers, batch, loss_fn, default, reset, device, params, names
                )
                if isinstance(got, str):
                    why = got
                    break
                rows[rank + k * world], counts[rank + k * world] = got
                if progress is not None:
                    progress(k + 1, len(data))
        finally:
            if reset is not None:
                reset(model)
    failed = torch.tensor([1.0 if why else 0.0], dtype=torch.float64)
    if shard is not None:
        # one collective: each row is computed on one rank (zero on the others), and any rank's failure counts
        packed = shard.reduce(torch.cat([rows.flatten(), counts, failed]))
        rows = packed[: rows.numel()].reshape(rows.shape)
        counts, failed = packed[rows.numel() : -1], packed[-1:]
    if failed.item() > 0:
        logger.warning(
            "fisher: no per-sample gradients (%s); using the batch-mean estimator, whose values shrink with "
            "batch size; pass inputs with one batch dimension of size len(targets) for the true Fisher",
            why or "another rank could not split its batches",
        )
        return _batch_mean_fisher(model, names, params, data, n_batches, loss_fn, reset, shard)
    total = torch.zeros(len(names), dtype=torch.float64)
    for row in rows:  # in batch order, so the sum is the same for any number of ranks
        total += row
    traces = {n: float(total[i] / sizes[i]) / float(counts.sum()) for i, n in enumerate(names)}
    _check_traces(traces, "fisher")
    return traces


# the mean of single-sample losses must match the batch loss this closely for a split to be accepted
MICRO_BATCH_RTOL = 1e-3


def _squared_norms(grads: Iterable[torch.Tensor | None]) -> torch.Tensor:
    zero = torch.zeros((), dtype=torch.float64)
    return torch.stack([g.detach().double().pow(2).sum().cpu() if g is not None else zero for g in grads])


def _micro_batches(batch: Batch, size: int = 1) -> list[Batch] | str:
    """``batch`` split into ``(inputs, targets)`` pairs of ``size`` samples (the last may hold fewer), or why
    it cannot be.

    The batch dimension of each input tensor is its one dimension of size ``len(targets)``; targets are
    split along their first dimension.
    """
    inputs, targets = _split_batch(batch)
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
        return f"targets are {describe(targets)}, not a tensor with a leading batch dimension"
    n = targets.shape[0]
    dims: list[int] = []
    for t in tensors(inputs):
        found = [d for d, size in enumerate(t.shape) if size == n]
        if len(found) != 1:
            return (
                f"an input of shape {tuple(t.shape)} has {len(found)} dimensions of the batch size "
                f"len(targets) = {n}, so its batch dimension is ambiguous"
            )
        dims.append(found[0])
    if not dims:
        return "the inputs hold no tensor to split"
    if n <= size:
        return [(inputs, targets)]

    def chunk(i: int) -> Batch:
        k = min(size, n - i)
        dim = iter(dims)
        return map_tensors(inputs, lambda t: t.narrow(next(dim), i, k)), targets.narrow(0, i, k)

    return [chunk(i) for i in range(0, n, size)]


def _one_pass(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batch: Batch,
    loss_fn: LossFn,
    reset: ResetFn | None,
    device: torch.device,
    params: list[torch.Tensor],
) -> tuple[torch.Tensor, int] | str:
    """:func:`per_sample_squared_norms` on ``batch``, in chunks of samples whose per-sample gradients fit in
    memory (squared norms add up over samples, so the chunks' sums are the batch's)."""
    split = _micro_batches(batch, max_samples(params))  # [batch] itself when it fits
    chunks = [batch] if isinstance(split, str) else split  # unsplittable: per_sample says why, or takes it
    total, count = torch.zeros(len(params), dtype=torch.float64), 0
    for inputs, targets in (_split_batch(c) for c in chunks):
        if reset is not None:
            reset(model)
        got = per_sample_squared_norms(
            model, layers, params, _to_device(inputs, device), _to_device(targets, device), loss_fn
        )
        if isinstance(got, str):
            return got
        total += got[0]
        count += got[1]
    return total, count


def _sample_squared_grads(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batch: Batch,
    loss_fn: LossFn,
    default: bool,
    reset: ResetFn | None,
    device: torch.device,
    params: list[torch.Tensor],
    names: list[str],
) -> tuple[torch.Tensor, int] | str:
    """``(sum_i ||g_{i,l}||^2 per layer, number of samples)`` for one batch, or why it cannot be had
    (see :func:`fisher_traces` for the order of the ways tried)."""
    fast = _one_pass(model, layers, batch, loss_fn, reset, device, params)
    if not isinstance(fast, str):
        return fast
    logger.debug("fisher: no one-pass per-sample gradients (%s); splitting into micro-batches", fast)
    whole = float(_batch_loss(model, batch, loss_fn, reset, device, names).detach())
    split = _micro_batches(batch)
    why = split if isinstance(split, str) else ""
    if not why:
        total = torch.zeros(len(params), dtype=torch.float64)
        losses: list[float] = []
        try:
            for sample in split:
                loss = _batch_loss(model, sample, loss_fn, reset, device, names)
                total += _squared_norms(torch.autograd.grad(loss, params, allow_unused=True))
                losses.append(float(loss.detach()))
        except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as err:
            why = f"the model or loss fails on a single-sample batch ({first_line(err)})"
        else:
            mean = math.fsum(losses) / len(losses)
            if abs(mean - whole) <= MICRO_BATCH_RTOL * abs(whole) + 1e-7:
                return total, len(split)
            why = f"the single-sample losses average {mean:.6g}, not the batch loss {whole:.6g}"
    if not default:
        return why
    # cross-entropy on class scores: each sample's own loss, backpropagated through the one batch graph
    inputs, targets = _split_batch(batch)
    if reset is not None:
        reset(model)
    outputs = call(model, _to_device(inputs, device))
    targets = _to_device(targets, device)
    if not isinstance(outputs, torch.Tensor) or outputs.dim() < 2 or outputs.shape[0] != len(targets):
        return f"{why}; and the outputs {describe(outputs)} are not [batch, classes] scores"
    per_sample = F.cross_entropy(outputs, targets, reduction="none").reshape(len(targets), -1).mean(dim=1)
    total = torch.zeros(len(params), dtype=torch.float64)
    for i in range(len(per_sample)):
        grads = torch.autograd.grad(per_sample[i], params, retain_graph=True, allow_unused=True)
        total += _squared_norms(grads)
    return total, len(per_sample)


def _batch_mean_fisher(
    model: nn.Module,
    names: list[str],
    params: list[torch.Tensor],
    data: list[Batch],
    n_batches: int,
    loss_fn: LossFn,
    reset: ResetFn | None,
    shard: Shard | None,
) -> dict[str, float]:
    """The fallback of :func:`fisher_traces`: mean over batches of ||batch-mean gradient||^2 / n_l."""
    device = params[0].device
    rows = torch.zeros(n_batches, len(names), dtype=torch.float64)
    sizes = torch.tensor([p.numel() for p in params], dtype=torch.float64)
    rank, world = (0, 1) if shard is None else (shard.rank, shard.world)
    with _analysis_mode(model, params):
        try:
            for k, batch in enumerate(data):
                loss = _batch_loss(model, batch, loss_fn, reset, device, names)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                rows[rank + k * world] = _squared_norms(grads) / sizes
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


def loss_table(
    model: nn.Module,
    rows: Mapping[str, Iterable[Candidate]],
    batches: Iterable[Batch],
    loss_fn: LossFn | None = None,
    *,
    reset: ResetFn | None = None,
    progress: ProgressFn | None = None,
    shard: Shard | None = None,
    scale_init: str = "mse",
) -> Table:
    """The measured score table: Omega_l(c) = max(0, L(model, layer l alone at c) - L(float model)).

    ``L`` is the mean of ``loss_fn`` over ``batches`` (each batch's loss weighs the same), in eval mode,
    without gradients and from a fresh neuron state per forward. For each layer, one copy of the model
    (:func:`hq_ptq.snn.detached_copy`) has that layer alone swapped to an hq_ptq quant layer and takes each
    of the layer's candidates in turn (:func:`hq_ptq.swap.set_layer_quant`, i.e. the quantizer a plan
    gives it); every other layer stays as it is in ``model``, which is never changed.

    Negative increases (quantization noise that happens to lower the calibration loss) are clamped at 0:
    on the calibration data the candidate is free, as it would be under any metric that is >= 0.

    Args:
        model: called as :mod:`hq_ptq.model_io` says; its Conv/Linear layers named in ``rows`` are float.
        rows: ``{layer name: its (scheme, bits) candidates}``.
        batches: ``(inputs, targets)`` pairs; materialised into a list.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; default cross-entropy.
        reset: ``reset(model)`` before every forward (spiking neuron state).
        progress: ``progress(done, total)`` after the float loss and after each (layer, candidate).
        shard: data-parallel rank; ``batches`` are then this rank's global batches ``rank, rank+world, ...``
            and the per-batch losses are summed over ranks, so every rank returns the single-process table.
        scale_init: where each candidate's scale starts (:func:`hq_ptq.swap.set_layer_quant`).

    Returns:
        ``{layer_name: {(scheme, bits): omega}}``, every value finite and >= 0.

    Raises:
        ValueError: empty rows or candidates, a name that is not a layer of ``model``, a non-finite loss.
    """
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    cands = {name: [(str(s), int(b)) for s, b in row] for name, row in rows.items()}
    if not cands:
        raise ValueError("rows is empty; pass {layer name: [(scheme, bits), ...]}")
    empty = [n for n, row in cands.items() if not row]
    if empty:
        raise ValueError(
            f"no candidates for layers {empty}; pass (scheme, bits) pairs such as ('uniform', 4)"
        )
    modules = dict(model.named_modules())
    unknown = [n for n in cands if n not in modules]
    if unknown:
        raise ValueError(f"layers {unknown} are not submodules of the model; check the layer names")
    data, n_batches, _ = _sharded_batches(batches, shard)
    entries = [("", ("", 0))] + [(name, c) for name, row in cands.items() for c in row]  # first: float
    losses = torch.zeros(n_batches, len(entries), dtype=torch.float64)
    rank, world = (0, 1) if shard is None else (shard.rank, shard.world)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    done = 0

    def measure(net: nn.Module, column: int) -> None:
        nonlocal done
        for k, batch in enumerate(data):
            losses[rank + k * world, column] = float(_scalar_loss(net, batch, loss_fn, reset, device))
        done += 1
        if progress is not None:
            progress(done, len(entries))

    with _analysis_mode(model, []), torch.no_grad():
        try:
            measure(model, 0)
            column = 1
            for name, row in cands.items():
                copy = detached_copy(model)  # in eval mode with no grads, as the model is here
                swap_layers(copy, include=(glob.escape(name),), exclude=())
                layer = copy.get_submodule(name)
                for scheme, bits in row:
                    set_layer_quant(layer, scheme, bits, scale_init=scale_init)
                    measure(copy, column)
                    column += 1
                del copy, layer
        finally:
            if reset is not None:
                reset(model)
    if shard is not None:
        losses = shard.reduce(losses)  # each row is computed on one rank, zero on the others
    total = torch.zeros(len(entries), dtype=torch.float64)
    for row_losses in losses:  # in batch order, so the sum is the same for any number of ranks
        total += row_losses
    mean = total / n_batches
    bad = [
        f"{n or 'float model'} {c if n else ''}".strip()
        for (n, c), v in zip(entries, mean.tolist())
        if not math.isfinite(v)
    ]
    if bad:
        raise ValueError(
            f"the calibration loss is non-finite for {bad}; check the loss and inputs for NaN/inf"
        )
    base = float(mean[0])
    table: Table = {name: {} for name in cands}
    for (name, cand), value in zip(entries[1:], mean[1:].tolist(), strict=True):
        table[name][cand] = max(0.0, value - base)
    return table


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
