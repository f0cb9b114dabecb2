"""Per-sample squared gradient norms of Linear/Conv weights from one batched forward and two backwards.

The empirical Fisher (:func:`hq_ptq.sensitivity.fisher_traces`) needs ``sum_i ||g_i||^2`` per layer, where
``g_i`` is the weight gradient of sample ``i``'s own loss. Splitting the batch into single-sample
micro-batches gives it exactly but costs one forward and backward per sample. For a Linear or Conv layer the
batch gradient is a sum over the rows of the layer's output (the rows of a Linear, the images of a Conv) of
"output gradient times input", so sample ``i``'s gradient is the same sum over the rows that belong to sample
``i`` (the per-example trick of Goodfellow 2015 and Opacus).

Which rows belong to which sample is not known for a model we have not seen: a time loop may fold ``[T, B]``
into one dimension or call a layer once per step. So it is measured. Backward is linear in its seed, so when
a second backward seeds sample ``i``'s loss with weight ``i + 2``, the output gradient of a row that reaches
only sample ``i``'s loss comes back multiplied by ``i + 2``. (Not ``i + 1``: a backward that is not linear
in its seed but ignores its scale, such as a custom Function returning ``sign(grad)`` or a normalised
gradient, would give every row the ratio 1 and hand all of them to sample 0; with ``i + 2`` the ratio 1
names no sample and the batch is refused.) The whole batch is refused (the caller then uses micro-batches)
when:

* an output tensor has no dimension of size ``len(targets)`` to slice samples from, or the mean of the
  per-sample losses is not the batch loss (for every reading of an ambiguous shape);
* a row's gradient ratio is not one such integer (the row reaches several samples' losses: a layer that mixes
  the batch, such as train-mode BatchNorm, or a random backward);
* a layer's per-sample gradients do not add up to its batch gradient (its weight is used outside its module's
  forward, so the hooks did not see every use).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hq_ptq.errors import first_line
from hq_ptq.model_io import call, describe, map_tensors, tensors

__all__ = ["max_samples", "per_sample_squared_norms"]

# a row's seeded gradient must equal (owner + 2) x its plain gradient to this relative error, and its ratio
# must be that integer to within ROW_ATOL (relative alone would let a row shared by samples 500 and 501 pass)
ROW_RTOL = 1e-3
ROW_ATOL = 0.05
SEED_OFFSET = 2  # sample i is seeded with weight i + 2 (module docstring: 1 would be ambiguous)
# per-sample gradients must add up to the batch gradient to this error, relative to their root-sum-square
SUM_RTOL = 1e-3
# the mean of the per-sample losses must equal the batch loss this closely (as for micro-batches)
LOSS_RTOL = 1e-3

# Per-sample gradients are held as one [n, *weight] tensor per layer until the sums are checked, so a batch
# costs n x (all analysed weights); larger batches are split by the caller (max_samples) so that a paper-size
# model at a large calibration batch does not exhaust memory
PER_SAMPLE_BYTES = 512 * 2**20
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def max_samples(params: list[torch.Tensor]) -> int:
    """How many samples one call of :func:`per_sample_squared_norms` takes within ``PER_SAMPLE_BYTES``."""
    per_sample = sum(p.numel() * p.element_size() for p in params)
    return max(1, PER_SAMPLE_BYTES // max(per_sample, 1))
_CONV_WEIGHT_GRAD = {1: nn.grad.conv1d_weight, 2: nn.grad.conv2d_weight, 3: nn.grad.conv3d_weight}


def _pointwise(module: nn.Module) -> bool:
    """A 1x1 conv without stride, padding, dilation or groups: a Linear applied at every position."""
    conv = module  # type: Any
    return (
        isinstance(module, _CONVS)
        and all(k == 1 for k in conv.kernel_size)
        and all(s == 1 for s in conv.stride)
        and conv.padding in ("valid", tuple(0 for _ in conv.kernel_size))
        and conv.groups == 1
    )


def _rows(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, output gradients)`` with one leading row dimension: the rows of a Linear, the images of a
    Conv or ConvTranspose (an unbatched image is one row; a layer that folds ``[T, N]`` itself, such as a
    SpikingJelly multi-step conv, has ``T * N`` rows)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    image = len(module.kernel_size) + 1  # type: ignore[arg-type]
    return x.reshape(-1, *x.shape[-image:]), grad.reshape(-1, *grad.shape[-image:])


def _rows_grad(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The weight gradient of ``module`` from these rows alone."""
    if isinstance(module, nn.Linear):
        return grad.transpose(0, 1) @ x
    if _pointwise(module):  # sum over rows and positions of grad x input^T
        g = grad.flatten(2).transpose(0, 1).flatten(1) @ x.flatten(2).transpose(1, 2).flatten(0, 1)
        return g.reshape(module.weight.shape)
    conv = module  # type: Any
    weight_grad = _CONV_WEIGHT_GRAD[len(conv.kernel_size)]
    if isinstance(module, _TRANSPOSED):
        # a transposed conv is the input-adjoint of the conv with the same weight, so its weight gradient
        # is that conv's, read from the other side: the output gradient is the conv's input and x its
        # output gradient (output_padding only sizes the output; the conv maps it back onto x's grid)
        return weight_grad(grad, conv.weight.shape, x, conv.stride, conv.padding, conv.dilation, conv.groups)
    if conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        return weight_grad(x, conv.weight.shape, grad, conv.stride, conv.padding, conv.dilation, conv.groups)
    # other padding: the conv's own forward on a detached copy of its weight, differentiated
    with torch.enable_grad():
        w = module.weight.detach().requires_grad_(True)
        out = module._conv_forward(x.detach(), w, None)  # type: ignore[union-attr,operator]
        (g,) = torch.autograd.grad(out, w, grad)
    return g


def _owners(plain: torch.Tensor, seeded: torch.Tensor, n: int) -> torch.Tensor | None:
    """Per row, the sample whose loss it reaches (-1: no gradient at all), or None if some row reaches
    several samples' losses."""
    p = plain.reshape(len(plain), -1)
    s = seeded.reshape(len(seeded), -1)
    pp, ss = p.pow(2).sum(1), s.pow(2).sum(1)
    live = pp > 0
    k = torch.where(live, torch.round((s * p).sum(1) / pp.clamp_min(torch.finfo(pp.dtype).tiny)), 0.0)
    residual = (s - k[:, None] * p).pow(2).sum(1)
    close = (residual <= ROW_RTOL**2 * ss) & (residual <= ROW_ATOL**2 * pp)
    ok = torch.where(live, (k >= SEED_OFFSET) & (k < n + SEED_OFFSET) & close, ss == 0)
    if not bool(ok.all()):
        return None
    return torch.where(live, k - SEED_OFFSET, -1.0).long()


def _batch_dim_choices(outputs: Any, n: int) -> list[list[int]] | str:
    """Ways to read the batch dimension of every output tensor: per tensor, its dimensions of size ``n``
    (first dimension first), combined; at most ``MAX_CHOICES``. An ambiguous shape (``[T, B, classes]`` with
    ``T == B``, ``[B, classes]`` with ``B == classes``) gives several, tried in order: a wrong choice fails
    the loss check or the row check."""
    per_tensor = []
    for t in tensors(outputs):
        found = [d for d, size in enumerate(t.shape) if size == n]
        if not found:
            return f"an output of shape {tuple(t.shape)} has no dimension of size len(targets) = {n}"
        per_tensor.append(found)
    return [list(dims) for dims in itertools.islice(itertools.product(*per_tensor), MAX_CHOICES)]


MAX_CHOICES = 4  # batch-dimension readings tried per batch (each costs two backwards)


def _loss_seeds(
    outputs: Any, dims: list[int], targets: torch.Tensor, loss_fn: Callable[[Any, Any], torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | str:
    """``(output tensors, seed of sum_i loss_i, seed of sum_i (i+2) loss_i)`` on the outputs (the loss part
    of the graph only) with samples sliced along ``dims``, or why the loss does not split into per-sample
    losses."""
    n = len(targets)
    leaves = map_tensors(outputs, lambda t: t.detach().requires_grad_(t.is_floating_point()))
    with torch.enable_grad():
        whole = float(loss_fn(leaves, targets).detach())

        def sample(i: int) -> torch.Tensor:
            dim = iter(dims)
            loss = loss_fn(map_tensors(leaves, lambda t: t.narrow(next(dim), i, 1)), targets.narrow(0, i, 1))
            return loss.reshape(())

        losses = [sample(i) for i in range(n)]
        mean = math.fsum(float(loss.detach()) for loss in losses) / n
        if not abs(mean - whole) <= LOSS_RTOL * abs(whole) + 1e-7:  # a NaN loss fails too
            return f"the per-sample losses average {mean:.6g}, not the batch loss {whole:.6g}"
        outs = [t for t in tensors(outputs) if t.requires_grad]
        if not outs:  # e.g. a forward under torch.no_grad
            return "no output depends on the analysed layers"
        wanted = [leaf for t, leaf in zip(tensors(outputs), tensors(leaves), strict=True) if t.requires_grad]
        plain = torch.autograd.grad(torch.stack(losses).sum(), wanted, retain_graph=True, allow_unused=True)
        weights = torch.arange(SEED_OFFSET, n + SEED_OFFSET, dtype=losses[0].dtype, device=losses[0].device)
        seeded = torch.autograd.grad((torch.stack(losses) * weights).sum(), wanted, allow_unused=True)
    zero = [torch.zeros_like(t) for t in outs]
    return (
        outs,
        [g if g is not None else z for g, z in zip(plain, zero, strict=True)],
        [g if g is not None else z for g, z in zip(seeded, zero, strict=True)],
    )


def per_sample_squared_norms(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    params: list[torch.Tensor],
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
) -> tuple[torch.Tensor, int] | str:
    """``(sum_i ||g_{i,l}||^2 per layer in float64, number of samples)`` for one batch, or why not.

    ``layers`` and ``params`` (their weights) are in the same order; ``inputs``/``targets`` are already on the
    model's device and the model's neuron state is already reset. The model must be in eval mode with
    gradients enabled for ``params`` (the caller's analysis mode).
    """
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
        return f"targets are {describe(targets)}, not a tensor with a leading batch dimension"
    if len(targets) > max_samples(params):
        return (f"{len(targets)} samples' gradients exceed {PER_SAMPLE_BYTES / 2**20:.0f} MiB; "
                f"pass at most {max_samples(params)} at once")
    modules = list(layers.values())
    for module in modules:
        if not isinstance(module, (nn.Linear, *_CONVS, *_TRANSPOSED)):
            return (f"layer type {type(module).__name__} (only Linear, Conv1d/2d/3d and "
                    "ConvTranspose1d/2d/3d are split by rows)")
    calls: list[list[_Call]] = [[] for _ in modules]
    # the second backward hands each call's pair of gradients to this, which turns it into per-sample
    # gradients at once and frees both: the pairs of all layers are never held together
    on_pair: list[Callable[[_Call], None] | None] = [None]

    def hook_for(k: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and out.requires_grad:
                record = _Call(k, x.detach(), [])

                def received(g: torch.Tensor) -> None:
                    record.grads.append(g.detach())
                    if len(record.grads) == 2 and on_pair[0] is not None:
                        on_pair[0](record)

                out.register_hook(received)
                calls[k].append(record)

        return hook

    handles = [m.register_forward_hook(hook_for(k)) for k, m in enumerate(modules)]
    try:
        try:
            outputs = call(model, inputs)
        except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as err:
            return f"the batched forward fails ({first_line(err)})"
    finally:
        for handle in handles:
            handle.remove()
    choices = _batch_dim_choices(outputs, len(targets))
    if isinstance(choices, str):
        return choices
    why = []
    for dims in choices:
        for record in itertools.chain.from_iterable(calls):
            record.grads.clear()
            record.paired = False
        sums = _Sums(layers, len(targets))
        on_pair[0] = sums.add
        try:
            got = _try_split(outputs, dims, targets, loss_fn, params, calls, sums)
        except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as err:
            got = f"the per-sample loss or a backward fails ({first_line(err)})"
        finally:
            on_pair[0] = None
        if not isinstance(got, str):
            return got, len(targets)
        why.append(got if len(choices) == 1 else f"batch dimensions {dims}: {got}")
    return "; ".join(why)


@dataclass
class _Call:
    """One call of analysed layer number ``k``: its input, and its output's gradients from the backwards."""

    k: int
    x: torch.Tensor
    grads: list[torch.Tensor]
    paired: bool = False  # both gradients arrived and were consumed by _Sums.add


class _Sums:
    """Per-sample weight gradients per layer, accumulated call by call as the second backward reaches them."""

    def __init__(self, layers: Mapping[str, nn.Module], n: int) -> None:
        self.names, self.modules, self.n = list(layers), list(layers.values()), n
        self.per_sample: dict[int, torch.Tensor] = {}
        self.why = ""

    def add(self, record: _Call) -> None:
        plain, seeded = record.grads
        record.grads.clear()  # consumed here, so the pairs of all layers are never held together
        record.paired = True
        if self.why:
            return
        module = self.modules[record.k]
        x, plain_rows = _rows(module, record.x, plain)
        owners = _owners(plain_rows, _rows(module, record.x, seeded)[1], self.n)
        if owners is None:
            self.why = f"rows of layer {self.names[record.k]!r} reach the losses of several samples"
            return
        if record.k not in self.per_sample:
            weight = module.weight
            self.per_sample[record.k] = torch.zeros((self.n, *weight.shape), dtype=weight.dtype,
                                                    device=weight.device)
        per_sample = self.per_sample[record.k]
        for i in owners.unique().tolist():
            if i >= 0:
                rows = (owners == i).nonzero().squeeze(1).to(x.device)
                per_sample[i] += _rows_grad(module, x[rows], plain_rows[rows])

    def totals(
        self, calls: list[list[_Call]], batch_grads: tuple[torch.Tensor | None, ...]
    ) -> torch.Tensor | str:
        """``sum_i ||g_{i,l}||^2`` per layer, or why the rows could not be split."""
        if self.why:
            return self.why
        totals = torch.zeros(len(self.names), dtype=torch.float64)
        for k, name in enumerate(self.names):
            if any(record.grads and not record.paired for record in calls[k]):
                return f"an output of layer {name!r} received a gradient in only one of the two backwards"
            batch, per_sample = batch_grads[k], self.per_sample.get(k)
            if per_sample is None:
                if batch is not None and bool(batch.ne(0).any()):
                    return f"layer {name!r} has a gradient but its forward was never seen"
                continue
            squares = per_sample.double().pow(2).sum(dim=tuple(range(1, per_sample.dim())))
            expected = torch.zeros_like(per_sample[0]) if batch is None else batch
            error = float((per_sample.sum(0) - expected).double().pow(2).sum().sqrt())
            if error > SUM_RTOL * math.sqrt(float(squares.sum())) + 1e-12:
                return f"the per-sample gradients of layer {name!r} do not add up to its batch gradient"
            totals[k] = squares.sum().cpu()
        return totals


def _try_split(
    outputs: Any,
    dims: list[int],
    targets: torch.Tensor,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    params: list[torch.Tensor],
    calls: list[list[_Call]],
    sums: _Sums,
) -> torch.Tensor | str:
    """One reading of the outputs' batch dimensions: the two backwards and the per-layer sums, or why not."""
    seeds = _loss_seeds(outputs, dims, targets, loss_fn)
    if isinstance(seeds, str):
        return seeds
    outs, plain, seeded = seeds
    batch_grads = torch.autograd.grad(outs, params, plain, retain_graph=True, allow_unused=True)
    torch.autograd.grad(outs, params, seeded, retain_graph=True, allow_unused=True)
    return sums.totals(calls, batch_grads)
