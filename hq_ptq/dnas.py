"""Differentiable search over per-layer (scheme, bits): the seed paper's kind of search, as a baseline.

SpikeHQ (arXiv 2412.05505) searches layer-wise schemes with a Gumbel-softmax relaxation. This module is our
own implementation of that family (DNAS, Wu et al. 2018; FBNet), written to be measured against the
Hessian-guided allocator on the same model, data and QAT:

* every searched Conv/Linear becomes a :class:`MixedQuantLayer`: one logit ``alpha_k`` per candidate
  ``(scheme, bits)``, and the weight it computes with is ``Σ_k p_k · Q_k(W)``, where ``Q_k`` is hq_ptq's own
  Brevitas quantizer for candidate ``k`` (learnable scale, straight-through gradients) and ``p`` is a
  Gumbel-softmax sample of ``alpha`` at temperature ``tau`` (annealed from ``tau_start`` to ``tau_end``);
* the loss is ``task loss + penalty · max(0, E[avg bits] − budget)``, the expectation taken with
  ``softmax(alpha)`` over the parameter-weighted bits (protected layers count at their fixed bits);
* weights, scales and BN train jointly with the logits (single-level, one batch per step) for a fixed
  number of steps on a copy of the model;
* the plan is ``argmax alpha`` per layer, repaired greedily (cheapest drop in log-probability per bit saved)
  until the average is within the budget, and any slack then spent on upgrades the same way
  (:func:`decode_plan`).

The caller's model is not modified: the plan is applied to the float weights and fine-tuned like any other
plan.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from hq_ptq import progress
from hq_ptq.config import QuantConfig
from hq_ptq.devices import batch_to, model_device
from hq_ptq.plan import LayerChoice, Plan
from hq_ptq.qat import cycle_batches
from hq_ptq.schemes import quantized_weight
from hq_ptq.snn import detached_copy, reset_states
from hq_ptq.space import candidates as allowed_candidates
from hq_ptq.space import protected_layers
from hq_ptq.swap import (
    LAYER_TYPES,
    find_layers,
    quantizable,
    split_matching_attention,
    swap_layers,
)

__all__ = ["DNASConfig", "MixedQuantLayer", "decode_plan", "dnas_search", "relax"]

log = logging.getLogger(__name__)

Candidate = tuple[str, int]
LossFn = Callable[[Tensor, Tensor], Tensor]

# Same slack as the allocator: the integer capacity floor((budget + tol) · Σn) absorbs float round-off.
_BUDGET_TOL = 1e-9


@dataclass(frozen=True)
class DNASConfig:
    """Settings of the differentiable search.

    Args:
        steps: search steps (one training batch each).
        arch_lr: Adam learning rate of the candidate logits.
        weight_lr: AdamW learning rate of weights, scales and BN during the search (0 freezes them).
        penalty: weight of the hinge ``max(0, E[avg bits] − budget)`` in the loss, per bit.
        tau_start: Gumbel-softmax temperature at the first step.
        tau_end: temperature at the last step (geometric schedule in between).
        seed: seeds the Gumbel noise and the optimizers.
        fill: spend slack under the budget after the argmax (see :func:`decode_plan`).
    """

    steps: int = 150
    arch_lr: float = 0.05
    weight_lr: float = 2e-4
    penalty: float = 1.0
    tau_start: float = 5.0
    tau_end: float = 0.5
    seed: int = 0
    fill: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"dnas steps must be >= 1, got {self.steps}")
        if not (self.arch_lr > 0 and self.weight_lr >= 0 and self.penalty >= 0):
            raise ValueError(
                f"dnas needs arch_lr > 0, weight_lr >= 0 and penalty >= 0, got {self.arch_lr}, "
                f"{self.weight_lr}, {self.penalty}"
            )
        if not 0 < self.tau_end <= self.tau_start:
            raise ValueError(f"dnas needs 0 < tau_end <= tau_start, got {self.tau_end}, {self.tau_start}")

    def tau(self, step: int) -> float:
        """Temperature at ``step`` (0-based): geometric from ``tau_start`` to ``tau_end``."""
        frac = step / max(self.steps - 1, 1)
        return self.tau_start * (self.tau_end / self.tau_start) ** frac


class MixedQuantLayer(nn.Module):
    """A Linear/Conv/ConvTranspose layer whose weight is ``Σ_k p_k · Q_k(W)`` over candidate quantizers.

    Every candidate is an hq_ptq Brevitas quant layer sharing the float layer's ``weight`` Parameter, so
    ``Q_k`` is exactly the quantizer the final plan would use. With one candidate the layer is fixed
    (a protected layer) and its logit does not train.
    """

    def __init__(self, layer: nn.Module, candidates: Sequence[Candidate]) -> None:
        super().__init__()
        if not quantizable(layer):
            raise ValueError(f"MixedQuantLayer takes a {LAYER_TYPES} layer (groups=1 if transposed), got "
                             f"{type(layer).__name__}")
        if not candidates:
            raise ValueError("MixedQuantLayer needs at least one (scheme, bits) candidate")
        self.layer = layer
        self.candidates = tuple((str(s), int(b)) for s, b in candidates)
        quants = []
        for scheme, bits in self.candidates:
            # swap_layers replaces the holder's child, leaving `layer` itself a float layer; the new quant
            # layer reuses the same weight Parameter, so every candidate quantizes the one shared weight
            holder = nn.Module()
            holder.add_module("w", layer)
            swap_layers(holder, scheme=scheme, bits=bits)
            quants.append(holder.w)
        self.quants = nn.ModuleList(quants)
        # on the weight's device, and moved with the module: alpha a Parameter, bits a buffer (not saved)
        device = layer.weight.device
        self.alpha = nn.Parameter(
            torch.zeros(len(self.candidates), device=device), requires_grad=len(self.candidates) > 1
        )
        self.register_buffer(
            "bits", torch.tensor([float(b) for _, b in self.candidates], device=device), persistent=False
        )
        self.tau: float | None = None  # set by the search; None means plain softmax (no Gumbel noise)

    @property
    def weight(self) -> Tensor:
        """The shared float weight (models may read e.g. its dtype)."""
        return self.layer.weight

    @property
    def params(self) -> int:
        return self.layer.weight.numel()

    def probs(self) -> Tensor:
        """``softmax(alpha)``: the candidate probabilities, without noise."""
        return F.softmax(self.alpha, dim=0)

    def expected_bits(self) -> Tensor:
        """``Σ_k p_k · b_k`` under :meth:`probs` (differentiable in ``alpha``)."""
        return (self.probs() * self.bits).sum()

    def mixed_weight(self) -> Tensor:
        """The relaxed weight ``Σ_k p_k · Q_k(W)``; ``p`` is a Gumbel-softmax sample while training."""
        if len(self.quants) == 1:
            return quantized_weight(self.quants[0])
        if self.training and self.tau is not None:
            p = F.gumbel_softmax(self.alpha, tau=self.tau, hard=False)
        else:
            p = self.probs()
        return sum(p[k] * quantized_weight(q) for k, q in enumerate(self.quants))

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        # the float layer's own forward with the relaxed weight: Linear, Conv and ConvTranspose (its
        # output_size argument included) alike
        return functional_call(self.layer, {"weight": self.mixed_weight()}, args, kwargs)


def relax(
    model: nn.Module,
    candidates: Sequence[Candidate],
    protected: Mapping[str, Candidate] | None = None,
    *,
    include: str | Iterable[str] = ("*",),
    exclude: str | Iterable[str] = (),
) -> dict[str, MixedQuantLayer]:
    """Replace every matching float Conv/Linear of ``model`` in place by a :class:`MixedQuantLayer`.

    Protected layers get their one fixed candidate. Returns layer name → mixed layer, in model order.

    Raises:
        ValueError: no candidate, or no matching layer.
    """
    if not candidates:
        raise ValueError("relax needs at least one (scheme, bits) candidate")
    protected = dict(protected or {})
    names = find_layers(model, include, exclude)
    out: dict[str, MixedQuantLayer] = {}
    for name in names:
        layer = model.get_submodule(name)
        if not quantizable(layer):
            raise ValueError(f"layer {name} is already quantized; relax a float model")
        mixed = MixedQuantLayer(layer, [protected[name]] if name in protected else candidates)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, mixed)
        out[name] = mixed
    return out


def _expected_avg_bits(layers: Mapping[str, MixedQuantLayer]) -> Tensor:
    total = sum(m.params for m in layers.values())
    return sum(m.params * m.expected_bits() for m in layers.values()) / total


def decode_plan(
    logits: Mapping[str, Sequence[float]],
    candidates: Mapping[str, Sequence[Candidate]],
    sizes: Mapping[str, int],
    budget: float,
    *,
    fill: bool = True,
    meta: Mapping | None = None,
) -> Plan:
    """``argmax`` of each layer's logits as a plan with ``avg_bits <= budget``.

    While over budget, the move with the smallest drop in log-probability per parameter-bit saved (one layer
    to one of its candidates with fewer bits) is applied. With ``fill``, slack left under the budget is then
    spent the same way in reverse: the upgrade with the best log-probability change per parameter-bit
    added, while one fits. The softmax relaxation tends to put its argmax on the cheapest candidate while
    the expected bits sit at the budget (the probability mass stays spread), so without ``fill`` the plan
    could land far below the budget and not be comparable at equal bits. A layer with one candidate
    never moves. ``LayerChoice.sensitivity`` is ``-log p`` of the chosen candidate under ``softmax(logits)``.

    Raises:
        ValueError: the budget is below the fewest bits the candidates allow.
    """
    names = list(logits)
    logp = {n: torch.log_softmax(torch.as_tensor(logits[n], dtype=torch.float64), 0).tolist() for n in names}
    pick = {n: max(range(len(logp[n])), key=logp[n].__getitem__) for n in names}
    total = sum(sizes[n] for n in names)
    cap = math.floor((budget + _BUDGET_TOL) * total)
    lowest = sum(sizes[n] * min(b for _, b in candidates[n]) for n in names)
    if lowest > cap:
        raise ValueError(
            f"budget {budget:g} is unreachable: these candidates allow at least {lowest / total:.4g} "
            "average bits; raise the budget"
        )

    def used() -> int:
        return sum(sizes[n] * candidates[n][pick[n]][1] for n in names)

    def best_move(down: bool, room: int) -> tuple[str, int] | None:
        best = None
        for n in names:
            cur = candidates[n][pick[n]][1]
            for k, (_, b) in enumerate(candidates[n]):
                delta = sizes[n] * (cur - b if down else b - cur)
                if delta <= 0 or (not down and delta > room):
                    continue
                # down: log-prob lost per bit saved (smaller is better); up: log-prob lost per bit added
                score = (logp[n][pick[n]] - logp[n][k]) / delta
                if best is None or score < best[0]:
                    best = (score, n, k)
        return None if best is None else best[1:]

    argmax_bits = used() / total
    down = up = 0
    while used() > cap:
        n, k = best_move(True, 0)  # lowest <= cap guarantees a move exists
        pick[n] = k
        down += 1
    while fill and (move := best_move(False, cap - used())) is not None:
        pick[move[0]] = move[1]
        up += 1
    layers = tuple(
        LayerChoice(n, candidates[n][pick[n]][0], candidates[n][pick[n]][1], sizes[n], -logp[n][pick[n]])
        for n in names
    )
    info = {**(meta or {}), "argmax_avg_bits": argmax_bits, "repair_moves": down, "fill_moves": up}
    return Plan(layers, budget=budget, method="dnas", meta=info)


def dnas_search(
    model: nn.Module,
    train_data: Iterable[tuple[Tensor, Tensor]],
    budget: float,
    *,
    config: QuantConfig | None = None,
    dnas: DNASConfig | None = None,
    loss_fn: LossFn | None = None,
    augment: Callable[[Tensor], Tensor] | None = None,
) -> Plan:
    """Differentiable search of a per-layer (scheme, bits) plan under an average-bit ``budget``.

    Candidates, protected layers and the layer globs come from ``config`` exactly as for
    :func:`hq_ptq.api.analyze`, so the plan is comparable with the Hessian-guided one. The search runs on a
    copy; ``model`` (float) is left unchanged.

    Args:
        model: float model, called as ``model(inputs)``.
        train_data: ``(inputs, targets)`` batches, cycled for ``dnas.steps`` steps; moved to the model's
            device (the search runs where ``model`` is).
        budget: parameter-weighted average-bit budget, protected layers included.
        config: candidates (``search.schemes``/``bits``), protection, include/exclude.
        dnas: search settings.
        loss_fn: task loss, cross-entropy by default.
        augment: applied to each batch's inputs (e.g. the float training's random shifts).

    Returns:
        A :class:`Plan` (``method="dnas"``, ``avg_bits <= budget``); ``meta`` holds the search seconds,
        steps, the final expected bits and the settings.

    Example:
        >>> plan = dnas_search(float_model, train_loader, 3.5, dnas=DNASConfig(steps=150))
    """
    config = config or QuantConfig()
    dnas = dnas or DNASConfig()
    loss_fn = loss_fn or F.cross_entropy
    if not budget > 0:
        raise ValueError(f"budget must be a positive number of bits, got {budget}")
    start = time.perf_counter()
    cands = allowed_candidates(config)
    net = detached_copy(model)
    split_matching_attention(net, config.include, config.exclude)  # the layers analyze would find
    names = find_layers(net, config.include, config.exclude)
    protected = protected_layers(names, config)
    sizes = {n: net.get_submodule(n).weight.numel() for n in names}
    per_layer = {n: [protected[n]] if n in protected else cands for n in names}
    # fail before spending the search on an unreachable budget
    decode_plan({n: [0.0] * len(c) for n, c in per_layer.items()}, per_layer, sizes, budget)

    torch.manual_seed(dnas.seed)
    layers = relax(net, cands, protected, include=config.include, exclude=config.exclude)
    alphas = [m.alpha for m in layers.values() if m.alpha.requires_grad]
    arch_opt = torch.optim.Adam(alphas, lr=dnas.arch_lr)
    arch_ids = {id(m.alpha) for m in layers.values()}
    weights = [p for p in net.parameters() if id(p) not in arch_ids and p.requires_grad]
    weight_opt = torch.optim.AdamW(weights, lr=dnas.weight_lr) if dnas.weight_lr > 0 else None
    if weight_opt is None:
        for p in weights:
            p.requires_grad_(False)

    net.train()
    device = model_device(net)
    batches = cycle_batches(train_data, "dnas train_data")
    task = penalty = expected = float("nan")
    with progress.task("dnas search", total=dnas.steps) as update:
        for step in range(dnas.steps):
            tau = dnas.tau(step)
            for m in layers.values():
                m.tau = tau
            inputs, targets = next(batches)
            if augment is not None:
                inputs = augment(inputs)
            inputs = batch_to(inputs, device, what="dnas inputs")
            targets = batch_to(targets, device, what="dnas targets")
            reset_states(net)
            loss_task = loss_fn(net(inputs), targets)
            avg = _expected_avg_bits(layers)
            loss_bits = dnas.penalty * F.relu(avg - budget)
            loss = loss_task + loss_bits
            arch_opt.zero_grad(set_to_none=True)
            if weight_opt is not None:
                weight_opt.zero_grad(set_to_none=True)
            loss.backward()
            if weight_opt is not None:
                nn.utils.clip_grad_norm_(weights, 1.0)
                weight_opt.step()
            arch_opt.step()
            task, penalty, expected = loss_task.item(), loss_bits.item(), avg.item()
            if not math.isfinite(task):
                raise FloatingPointError(f"dnas search diverged at step {step + 1}; lower weight_lr")
            update(info=f"E[bits] {expected:.2f} tau {tau:.2f}")
            if (step + 1) % 25 == 0 or step + 1 == dnas.steps:
                log.info("dnas step %d: task %.4f, E[bits] %.3f, tau %.2f", step + 1, task, expected, tau)

    with torch.no_grad():
        logits = {n: m.alpha.detach().tolist() for n, m in layers.items()}
        expected = _expected_avg_bits(layers).item()
    seconds = time.perf_counter() - start
    meta = {
        "seconds": seconds,
        "steps": dnas.steps,
        "expected_avg_bits": expected,
        "final_task_loss": task,
        "final_penalty": penalty,
        "dnas": asdict(dnas),
        "protected": sorted(protected),
        "sensitivity": "-log p of the chosen candidate",
        "probs": {n: dict(zip([f"{s}{b}" for s, b in per_layer[n]], F.softmax(torch.tensor(v), 0).tolist()))
                  for n, v in logits.items() if len(v) > 1},
    }
    plan = decode_plan(logits, per_layer, sizes, budget, fill=dnas.fill, meta=meta)
    log.info("dnas: %d steps in %.1fs, E[bits] %.3f, argmax %.3f -> plan %.3f bits (%d down, %d up moves)",
             dnas.steps, seconds, expected, plan.meta["argmax_avg_bits"], plan.avg_bits,
             plan.meta["repair_moves"], plan.meta["fill_moves"])
    return plan

