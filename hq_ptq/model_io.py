"""The contract between hq_ptq and a model it has never seen: how a batch's inputs are passed to the model,
and how its outputs are read as class scores.

Inputs. Every batch is ``(inputs, targets)``. ``inputs`` is whatever the model takes:

* a tensor of any rank and layout (``[T, B, ...]``, ``[B, T, ...]``, a static ``[B, C, H, W]`` image for
  a model that runs its own time loop, a ``[B, L, F]`` sequence): ``model(inputs)``;
* a tuple or list: its items are positional arguments, ``model(*inputs)`` (``(x,)`` is ``model(x)``; a
  model whose single argument is itself a tuple takes ``((a, b),)``);
* a dict: keyword arguments, ``model(**inputs)``.

Outputs. The model may return anything its ``loss_fn(outputs, targets)`` understands: ``[B, classes]``
logits, a ``[T, B, classes]`` spike record, a ``(spikes, membranes)`` tuple, multi-label scores. Where
hq_ptq needs class scores (accuracy, distillation from the float model) it reads them through
``output_fn(outputs) -> [B, classes]``; the default is the outputs themselves when they are a 2-D tensor
(for distillation only with the default cross-entropy loss: with a loss of your own, 2-D outputs need not
be logits). Otherwise the outputs are used by the loss only: distillation is switched off (with a
warning) rather than applied to something that is not a logit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "OutputFn", "call", "class_scores", "describe", "first_tensor", "map_tensors", "rebuild", "tensors",
]

OutputFn = Callable[[Any], torch.Tensor]


def call(model: nn.Module, inputs: Any) -> Any:
    """``model`` applied to one batch's ``inputs``: a tensor as is, a tuple/list as positional arguments, a
    dict as keyword arguments."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside ``value`` (nested tuples, lists and dict values), in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tensors(v)


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor inside ``value`` (``None`` when it holds none)."""
    return next(tensors(value), None)


def rebuild(template: Any, flat: Iterator[torch.Tensor]) -> Any:
    """``template`` with its tensors replaced, in order, by the items of ``flat`` (the inverse of
    :func:`tensors`); everything that is not a tensor is kept."""
    if isinstance(template, torch.Tensor):
        return next(flat)
    if isinstance(template, dict):
        return {k: rebuild(v, flat) for k, v in template.items()}
    if isinstance(template, (tuple, list)):
        return type(template)(rebuild(v, flat) for v in template)
    return template


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor inside it, the structure kept (tuples stay tuples)."""
    return rebuild(value, (fn(t) for t in tensors(value)))


def describe(value: Any) -> str:
    """A short description of a batch element for error messages: shapes of tensors, types of the rest."""
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe(v) for v in value)
        return f"({inner},)" if isinstance(value, tuple) and len(value) == 1 else f"({inner})"
    return type(value).__name__


def class_scores(outputs: Any, output_fn: OutputFn | None) -> torch.Tensor | None:
    """``[B, classes]`` scores read from ``outputs``: ``output_fn(outputs)`` when given, else the outputs
    themselves when they are a 2-D floating tensor, else ``None`` (the caller decides what that means)."""
    scores = output_fn(outputs) if output_fn is not None else outputs
    if isinstance(scores, torch.Tensor) and scores.dim() == 2 and scores.is_floating_point():
        return scores
    if output_fn is not None:
        raise ValueError(
            f"output_fn must return [batch, classes] float scores, got {describe(scores)} from outputs "
            f"{describe(outputs)}"
        )
    return None
