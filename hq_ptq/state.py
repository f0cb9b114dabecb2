"""A quantized model's state, written and read in one place: :func:`apply_plan` and :func:`get_plan`.

Each quantized layer carries its own record, ``layer.hq_quant`` (:class:`hq_ptq.plan.LayerQuant`: scheme,
bits, the search score that chose them), which :mod:`hq_ptq.swap` writes together with the Brevitas
quantizer it attaches, so the two cannot disagree. The model carries the search report of the plan that
was applied (budget, method, meta) as ``model.hq_search``. A :class:`~hq_ptq.plan.Plan` is never stored:
:func:`get_plan` reads it back from the layers. The one-liner (``hq_ptq.api``) and the packed checkpoints
(``hq_ptq.pack``) both go through this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from hq_ptq.attention import split_attention
from hq_ptq.plan import LayerChoice, Plan
from hq_ptq.schemes import weight_quant
from hq_ptq.swap import LAYER_TYPES, layer_state, quant_layers, quantizable, set_layer_quant, swap_layers

__all__ = ["SEARCH_ATTR", "SearchReport", "apply_plan", "get_plan"]

SEARCH_ATTR = "hq_search"


@dataclass(frozen=True)
class SearchReport:
    """What a plan says beyond its layers: the budget it was searched for, how, and the search's report."""

    budget: float | None = None
    method: str = "manual"
    meta: dict[str, Any] = field(default_factory=dict, hash=False)


def apply_plan(model: nn.Module, plan: Plan, *, scale_init: str = "mse") -> nn.Module:
    """Give every layer of ``plan`` its (scheme, bits), swapping float layers first; returns the model.

    Each layer's quantizer is new, its scale starting at ``scale_init`` (``"mse"`` or ``"absmax"``,
    :func:`hq_ptq.swap.set_layer_quant`); ``hq_ptq.load`` then restores saved scales over it.

    An ``nn.MultiheadAttention`` whose projections the plan names is split first
    (:func:`hq_ptq.attention.split_attention`), as it was when the plan was made, so ``<attn>.q_proj`` ...
    ``<attn>.out_proj`` exist in a fresh float model; one the plan does not name is left as it is.

    Raises:
        ValueError: the plan names a layer the model does not have or one that is not a Conv/Linear, or
            a scheme/bits that does not exist; checked before any layer is swapped.
    """
    split_attention(model, {c.name for c in plan.layers}.__contains__)
    # every check before the first layer is swapped, so a refused plan leaves every layer as it was
    modules = dict(model.named_modules())
    missing = [c.name for c in plan.layers if c.name not in modules]
    if missing:
        raise ValueError(f"plan names layers the model does not have: {', '.join(missing[:5])}")
    layers = quant_layers(model)
    odd = [c.name for c in plan.layers if c.name not in layers and not quantizable(modules[c.name])]
    if odd:
        kinds = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in odd[:5])
        raise ValueError(f"plan names layers that are not {LAYER_TYPES} (groups=1 if transposed): {kinds}")
    for choice in plan.layers:
        weight_quant(choice.scheme, choice.bits)  # raises on an unknown scheme or bits
    to_swap = [c.name for c in plan.layers if c.name not in layers]
    if to_swap:
        swap_layers(model, include=tuple(to_swap), scheme="uniform", bits=8)
        layers = quant_layers(model)
    for choice in plan.layers:
        set_layer_quant(
            layers[choice.name], choice.scheme, choice.bits, choice.sensitivity, scale_init=scale_init
        )
    setattr(model, SEARCH_ATTR, SearchReport(plan.budget, plan.method, dict(plan.meta)))
    return model


def get_plan(model: nn.Module) -> Plan:
    """The plan of a quantized model, read from its layers' records and its search report.

    Layers quantized without a plan (e.g. ``hq_ptq.swap.swap_layers``) have no score (``None``) and the
    plan's method is ``"manual"``.

    Raises:
        ValueError: the model has no hq_ptq-quantized layer.
    """
    layers = quant_layers(model)
    if not layers:
        raise ValueError("model has no hq_ptq-quantized layers; call hq_ptq.quantize or apply_plan first")
    choices = []
    for name, layer in layers.items():
        state = layer_state(layer)
        choices.append(LayerChoice(name, state.scheme, state.bits, layer.weight.numel(), state.sensitivity))
    report = getattr(model, SEARCH_ATTR, None) or SearchReport()
    return Plan(layers=tuple(choices), budget=report.budget, method=report.method, meta=dict(report.meta))
