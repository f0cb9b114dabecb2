"""Float training and evaluation of spiking models (AdamW + cosine schedule, label smoothing)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hq_ptq import progress
from hq_ptq.devices import batch_to, model_device
from hq_ptq.files import atomic_write
from hq_ptq.model_io import OutputFn, call, class_scores, describe
from hq_ptq.snn import reset_states

log = logging.getLogger(__name__)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    lr: float = 2e-3
    weight_decay: float = 0.06
    label_smoothing: float = 0.1
    warmup_epochs: float = 0.5
    grad_clip: float = 1.0
    # random translation of every training sample by up to this many pixels: small event datasets
    # (digits has 1437 training samples) overfit without it
    shift_augment: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"train.epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class TrainResult:
    test_accuracy: float | None
    train_loss: float
    seconds: float
    epochs: int
    resumed_after: int = 0  # epochs a checkpoint had already done (0: trained from scratch)


def content_digest(obj: Any) -> str:
    """sha256 over every tensor's bytes and every value of a nested state, keys in sorted order."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            if t.numel():
                h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for item in x:
                feed(item)
        else:
            h.update(f"V{x!r}".encode())

    feed(obj)
    return h.hexdigest()


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write a training or QAT checkpoint (a dict of tensors and plain data) atomically with ``torch.save``,
    with a sha256 of its content so a damaged file is refused rather than resumed from."""
    doc = {**state, "sha256": content_digest(state)}
    return atomic_write(path, lambda tmp: torch.save(doc, tmp))


def state_shapes(model: nn.Module) -> dict[str, list[int]]:
    """The shape of every state-dict entry: how a checkpoint recognises the model it was written for."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


TRAIN_CHECKPOINT_FORMAT = "hq_ptq.train"
TRAIN_CHECKPOINT_VERSION = 1


def _train_settings(config: TrainConfig, steps_per_epoch: int | None) -> str:
    return json.dumps({**asdict(config), "steps_per_epoch": steps_per_epoch}, sort_keys=True)


def _load_train_state(path: Path, model: nn.Module, settings: str) -> dict[str, Any]:
    """A training checkpoint for this model and these settings, validated, or a one-line ValueError."""
    fix = f"delete {path} to start over"
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle and EOF errors all mean the same to the user
        detail = str(err).strip()[:200]
        raise ValueError(f"training checkpoint {path} is unreadable ({detail}); {fix}") from None
    if not isinstance(doc, dict) or doc.get("format") != TRAIN_CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an hq_ptq training checkpoint; {fix}")
    if doc.get("format_version") != TRAIN_CHECKPOINT_VERSION:
        version = doc.get("format_version")
        raise ValueError(f"training checkpoint {path} has format version {version!r}; {fix}")
    digest = doc.pop("sha256", None)
    if digest != content_digest(doc):
        raise ValueError(f"training checkpoint {path}: checksum mismatch, the file is altered; {fix}")
    missing = {"shapes", "settings", "epoch", "loss", "model", "optimizer", "schedule", "rng"} - set(doc)
    if missing:
        raise ValueError(f"training checkpoint {path} is malformed (no {', '.join(sorted(missing))}); {fix}")
    if doc["shapes"] != state_shapes(model):
        raise ValueError(f"training checkpoint {path} holds another model; {fix}")
    if doc["settings"] != settings:
        raise ValueError(f"training checkpoint {path} was written with other settings ({doc['settings']}); "
                         f"train with the same ones or {fix}")
    return doc


def _shuffle_generators(batches: Any) -> list[torch.Generator]:
    """The generators a DataLoader shuffles with: its own, its sampler's, its batch sampler's sampler's
    (each once). Torch's global generator, used when there is none, is saved anyway."""
    found: list[torch.Generator] = []
    for owner in (batches, getattr(batches, "sampler", None),
                  getattr(getattr(batches, "batch_sampler", None), "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


def _rng_states(gen: torch.Generator, shuffles: list[torch.Generator]) -> dict[str, Any]:
    in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda = torch.cuda.get_rng_state_all() if in_use else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "shift": gen.get_state(),
            "shuffle": [g.get_state() for g in shuffles]}


def _set_rng_states(states: dict[str, Any], gen: torch.Generator, shuffles: list[torch.Generator],
                    path: Path) -> None:
    if len(states["shuffle"]) != len(shuffles):
        raise ValueError(f"training checkpoint {path} holds {len(states['shuffle'])} shuffle generator "
                         f"states, the training data has {len(shuffles)}; delete {path} to start over")
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    gen.set_state(states["shift"])
    for g, state in zip(shuffles, states["shuffle"], strict=True):
        g.set_state(state)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each sample of a time-first batch ``[T, B, C, H, W]`` by a random (dy, dx), zero fill."""
    if max_shift <= 0:
        return x
    t, b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x.reshape(t * b, c, h, w), (max_shift,) * 4).reshape(
        t, b, c, h + 2 * max_shift, w + 2 * max_shift
    )
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator).tolist()
    return torch.stack(
        [padded[:, i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)], dim=1
    )


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Batches,
    *,
    output_fn: OutputFn | None = None,
    description: str = "evaluate",
) -> float:
    """Top-1 accuracy (0..1) of ``model`` over ``batches``; restores the training flag.

    The model is called as :func:`hq_ptq.model_io.call` describes and its outputs are read as ``[B, classes]``
    scores through ``output_fn`` (default: the outputs themselves). Spiking neurons are reset before every
    batch, so no membrane carries over from one batch to the next. Inputs and targets are moved to the
    model's device.

    Raises:
        ValueError: no samples, or outputs that are not ``[B, classes]`` scores and no ``output_fn``.
    """
    was_training = model.training
    model.eval()
    correct = total = 0
    n = len(batches) if hasattr(batches, "__len__") else None
    device = model_device(model)
    try:
        with progress.task(description, total=n) as update:
            for inputs, targets in batches:
                inputs = batch_to(inputs, device, what="evaluation inputs")
                targets = batch_to(targets, device, what="evaluation targets")
                reset_states(model)
                outputs = call(model, inputs)
                scores = class_scores(outputs, output_fn)
                if scores is None:
                    raise ValueError(
                        f"accuracy needs [batch, classes] scores but the model returns {describe(outputs)}; "
                        "pass output_fn (e.g. lambda spk: spk.sum(0) for a [T, B, classes] spike record)"
                    )
                correct += (scores.argmax(-1) == targets).sum().item()
                total += targets.numel()
                update()
    finally:
        reset_states(model)
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate got no samples")
    return correct / total


def train_float(
    model: nn.Module,
    train_batches: Batches,
    test_batches: Batches | None = None,
    config: TrainConfig = TrainConfig(),
    *,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    output_fn: OutputFn | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> TrainResult:
    """Train ``model`` in place with AdamW + cosine; returns test accuracy when test data is given.

    Batches reach the model as :mod:`hq_ptq.model_io` says, spiking neurons are reset before every
    forward, and the loss is ``loss_fn(outputs, targets)`` (default: cross-entropy with the config's label
    smoothing). ``config.shift_augment`` shifts zoo-style ``[T, B, C, H, W]`` frames; leave it 0 for any
    other input. Accuracy is read through ``output_fn`` (see :func:`evaluate`). Batches are moved to the
    model's device (after the shift).

    With ``checkpoint``, the model, optimizer, schedule and every random state (torch's, the shifts', a
    DataLoader's shuffle generators, CUDA's when in use) are written there atomically after each epoch, and a
    run that finds the file continues after its last epoch, bit for bit as if it had not stopped (a file
    from another model or other settings is refused, naming it; the data are not checked). The caller
    removes the file once it has saved the trained model (a finished run's file resumes to the end at once).
    ``seconds`` of the result count this call's training only.
    """
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    # no weight decay on BN/bias vectors, the usual transformer recipe
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=config.lr,
    )
    steps_per_epoch = len(train_batches) if hasattr(train_batches, "__len__") else None
    if steps_per_epoch == 0:
        raise ValueError("the training data holds no batch")
    total = config.epochs * steps_per_epoch if steps_per_epoch else None
    warmup = int(config.warmup_epochs * steps_per_epoch) if steps_per_epoch else 0
    # without a length the schedule is unknown: constant learning rate
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, warmup) if total else 1.0)
    loss_fn = loss_fn or nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    shuffles = _shuffle_generators(train_batches)
    path = Path(checkpoint) if checkpoint is not None else None
    settings = _train_settings(config, steps_per_epoch)
    first_epoch, running = 0, float("nan")
    if path is not None and path.is_file():
        doc = _load_train_state(path, model, settings)
        model.load_state_dict(doc["model"])
        opt.load_state_dict(doc["optimizer"])
        sched.load_state_dict(doc["schedule"])
        _set_rng_states(doc["rng"], gen, shuffles, path)
        first_epoch, running = doc["epoch"], doc["loss"]
        log.info("resumed training after epoch %d of %d from %s", first_epoch, config.epochs, path)
    start = time.perf_counter()
    model.train()
    device = model_device(model)
    try:
        done = first_epoch * steps_per_epoch if steps_per_epoch else 0
        with progress.task("train", total=total, completed=done) as update:
            for epoch in range(first_epoch, config.epochs):
                for inputs, targets in train_batches:
                    if config.shift_augment:
                        inputs = random_shift(inputs, config.shift_augment, gen)
                    inputs = batch_to(inputs, device, what="training inputs")
                    targets = batch_to(targets, device, what="training targets")
                    reset_states(model)
                    loss = loss_fn(call(model, inputs), targets)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.grad_clip:
                        nn.utils.clip_grad_norm_(params, config.grad_clip)
                    opt.step()
                    sched.step()
                    value = loss.item()
                    running = value if math.isnan(running) else 0.9 * running + 0.1 * value
                    update(epoch=epoch + 1, loss=f"{running:.3f}")
                if not math.isfinite(running):
                    raise FloatingPointError(f"training diverged at epoch {epoch + 1} (loss {running})")
                log.info("epoch %d loss %.4f", epoch + 1, running)
                if path is not None:
                    save_state(path, {
                        "format": TRAIN_CHECKPOINT_FORMAT, "format_version": TRAIN_CHECKPOINT_VERSION,
                        "settings": settings, "epoch": epoch + 1, "loss": running,
                        "shapes": state_shapes(model),
                        "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "schedule": sched.state_dict(),
                        "rng": _rng_states(gen, shuffles),
                    })
                if on_epoch is not None:
                    on_epoch(epoch + 1, running)
    finally:
        reset_states(model)  # no membrane of the last batch (with its graph) stays behind
    seconds = time.perf_counter() - start
    acc = evaluate(model, test_batches, output_fn=output_fn) if test_batches is not None else None
    return TrainResult(test_accuracy=acc, train_loss=running, seconds=seconds, epochs=config.epochs,
                       resumed_after=first_epoch)
