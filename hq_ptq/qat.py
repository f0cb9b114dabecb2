"""Short quantization-aware fine-tuning: cross-entropy plus distillation from the float teacher.

Brevitas layers give straight-through gradients to both the weights and the learnable per-channel scales, so
one optimizer over ``model.parameters()`` trains both.

Runs can be stopped and continued: every ``QATConfig.checkpoint_every`` steps a checkpoint with the model,
optimizer, LR schedule, EMA, every random state (CPU, the caller's generators and, once CUDA is in use, every
CUDA device's) and the step is written atomically; resuming restores it and skips the batches already
consumed, so the continued run is bit-identical to one that was never stopped.
Inside a torch.distributed process group the model is wrapped in DistributedDataParallel and rank ``r`` of
``N`` trains on batches ``r, r+N, ...`` of the (identical) stream every rank is given.

Every batch follows the model: inputs and targets are moved to the student's device at each step, and the
teacher's inputs to the teacher's device (its scores come back to the student's).

``precision="bf16"`` runs the student's and the teacher's forwards and the loss under bfloat16 autocast
(:func:`hq_ptq.devices.autocast_context`); the backward, the optimizer, the EMA and the checkpoints stay in
float32, and a checkpoint resumes only under the precision it was written with.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hq_ptq import progress
from hq_ptq.config import QATConfig, check_precision
from hq_ptq.devices import autocast_context, batch_to, model_device
from hq_ptq.distributed import (
    Shard,
    all_gather_object,
    broadcast_object,
    check_same,
    current_shard,
    data_digest,
)
from hq_ptq.model_io import OutputFn, call, class_scores, describe, tensors
from hq_ptq.snn import reset_states, stable_surrogates
from hq_ptq.train import content_digest, cosine_lr, save_state, state_shapes

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

CHECKPOINT_FORMAT = "hq_ptq.qat"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class QATResult:
    steps: int
    final_loss: float
    seconds: float
    # the step a resumed run continued from (0: started from scratch)
    start_step: int = 0


def _check_learnable_scales(model: nn.Module) -> None:
    """Every quantizer must own a trainable scale before QAT (Brevitas PR #1099: a scale left unset by
    stats collection silently received no gradient)."""
    from hq_ptq.swap import quant_layers

    for name, layer in quant_layers(model).items():
        scales = list(layer.weight_quant.parameters())
        if not scales or not all(p.requires_grad and torch.isfinite(p).all() for p in scales):
            raise RuntimeError(
                f"layer {name}: its quantizer has no trainable finite scale; re-apply the plan"
            )


def cycle_batches(data: Iterable, what: str = "QAT train_data") -> Iterator:
    """Re-iterate ``data`` (a DataLoader reshuffles each pass) instead of caching it like itertools.cycle."""
    while True:
        empty = True
        for item in data:
            empty = False
            yield item
        if empty:
            raise ValueError(f"{what} yielded no batches")


def _batches(data: Iterable, start: int, shard: Shard | None, first_seen: list[str]) -> Iterator:
    """This rank's batches of the cycled stream from global batch ``start`` on; the skipped batches are drawn
    and dropped, so a loader's shuffle and position are exactly those of an uninterrupted run.

    ``first_seen`` receives a digest of global batch ``start`` (every rank sees it) to compare across ranks
    (under torch.distributed only).
    """
    rank, world = (0, 1) if shard is None else (shard.rank, shard.world)
    for index, item in enumerate(cycle_batches(data)):
        if index < start:
            continue
        if index == start and shard is not None:  # compared across ranks only
            first_seen.append(_digest(item))
        if (index - start) % world == rank:
            yield item


def _digest(batch: Any) -> str:
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    return data_digest(tensors(inputs))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: KL(teacher || student) on softened logits, scaled by T² to keep gradient size."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="batchmean"
    ) * (t * t)


# ------------------------------------------------------------------------------------------------
# checkpoints


def _settings(config: QATConfig, seed: int, precision: str = "fp32") -> str:
    """The QAT settings a checkpoint must share with the run that resumes it (how often to save is free).

    The precision is recorded only when it is not "fp32", so checkpoints written before it existed resume."""
    settings = {k: v for k, v in asdict(config).items() if k != "checkpoint_every"}
    extra = {} if precision == "fp32" else {"precision": precision}
    return json.dumps({**settings, "seed": seed, **extra}, sort_keys=True)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write a QAT checkpoint (a dict of tensors and plain data) atomically with ``torch.save``, with a
    sha256 of its content so a damaged file is refused rather than resumed from."""
    return save_state(path, state)


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    config: QATConfig,
    *,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
    world_size: int = 1,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Read and validate a QAT checkpoint for ``model`` (nothing is executed: ``weights_only`` loading).

    Raises:
        ValueError: unreadable, truncated or altered file (content checksum), not a QAT checkpoint, another
            format version, another model (state keys or shapes differ), another plan (``meta``), other QAT
            settings, seed or precision, or another number of processes.
    """
    path = Path(path)
    fix = "delete it or run without --resume"
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle and EOF errors all mean the same to the user
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"QAT checkpoint {path} is unreadable ({detail[:200]}); {fix}") from None
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an hq_ptq QAT checkpoint; {fix}")
    if doc.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"QAT checkpoint {path} has format version {doc.get('format_version')!r}, this hq_ptq reads "
            f"{CHECKPOINT_VERSION}; {fix}"
        )
    try:
        digest = doc.pop("sha256")
        if not isinstance(digest, str) or digest != content_digest(doc):
            raise ValueError(f"QAT checkpoint {path}: checksum mismatch, the file is altered; {fix}")
        want = state_shapes(model)
        if doc["shapes"] != want:
            have = doc["shapes"]
            diff = sorted(set(have) ^ set(want)) or [k for k in want if have.get(k) != want[k]]
            raise ValueError(f"QAT checkpoint {path} holds another model (differs at {diff[:3]}); {fix}")
        if doc["meta"] != json.dumps(meta or {}, sort_keys=True):
            raise ValueError(f"QAT checkpoint {path} was written for another plan; {fix}")
        if doc["settings"] != _settings(config, seed, precision):
            raise ValueError(
                f"QAT checkpoint {path} was written with other QAT settings ({doc['settings']}); "
                f"resume with the same ones or {fix}"
            )
        if doc["world_size"] != world_size:
            raise ValueError(
                f"QAT checkpoint {path} was written by {doc['world_size']} process(es); resume with "
                f"--nproc {doc['world_size']} or {fix}"
            )
        step = doc["step"]
        if not isinstance(step, int) or not 0 < step <= config.steps or len(doc["rng"]) != world_size:
            raise ValueError(f"QAT checkpoint {path} is malformed (step {step!r}); {fix}")
        return doc
    except (KeyError, TypeError, AttributeError) as err:
        what = f"no field {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
        raise ValueError(f"QAT checkpoint {path} is malformed ({what}); {fix}") from None


def _cuda_rng_states() -> list[torch.Tensor] | None:
    """Every CUDA device's random state once CUDA is in use (dropout and the like draw from it), else None."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(torch.cuda.get_rng_state_all())
    return None


def _set_cuda_rng(states: Sequence[torch.Tensor] | None, checkpoint: Any) -> None:
    """Restore the CUDA random states a checkpoint holds (one per device it saw), where CUDA is here."""
    if not states:
        return
    if not torch.cuda.is_available():
        log.warning("QAT checkpoint %s holds CUDA random states but there is no CUDA here: not restored",
                    checkpoint)
        return
    count = torch.cuda.device_count()
    if len(states) != count:
        log.warning("QAT checkpoint %s holds the random states of %d CUDA device(s), this machine has %d: "
                    "restoring the first %d", checkpoint, len(states), count, min(len(states), count))
    for index, state in enumerate(states[:count]):
        torch.cuda.set_rng_state(state, index)


# ------------------------------------------------------------------------------------------------
# fine-tuning


def finetune(
    model: nn.Module,
    train_data: Iterable[tuple[torch.Tensor, torch.Tensor]],
    config: QATConfig = QATConfig(),
    *,
    teacher: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    output_fn: OutputFn | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    generators: Sequence[torch.Generator] = (),
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    meta: dict[str, Any] | None = None,
    precision: str = "fp32",
) -> QATResult:
    """Fine-tune the quantized ``model`` in place for ``config.steps`` batches (cycling ``train_data``).

    Args:
        model: a model with hq_ptq quant layers, on the device it trains on.
        train_data: ``(inputs, targets)`` batches, re-iterated as often as needed; moved to the model's
            device at each step (after ``augment``).
        config: QAT settings.
        teacher: float model to distil from (KL on softened class scores). Distillation needs class scores:
            ``output_fn(outputs)`` when given, else, with the default cross-entropy loss, outputs that are
            ``[B, classes]``. Otherwise (a spike record, a tuple, or a loss of your own without
            ``output_fn``: a ``[B, 1]`` regression output is no logit) it is switched off with a warning
            and the task loss alone trains.
        loss_fn: task loss ``loss_fn(outputs, targets)``, cross-entropy by default.
        output_fn: ``outputs -> [B, classes]`` scores for distillation (see :mod:`hq_ptq.model_io`).
        augment: ``augment(inputs)`` applied to every training batch.
        seed: seeds torch's global RNG at the start.
        generators: random generators ``augment`` (or anything else per step) draws from; checkpoints save
            and restore their states.
        checkpoint: file to write every ``config.checkpoint_every`` steps and after the last (rank 0 only).
        resume: continue from ``checkpoint`` when it exists (from scratch when it does not).
        meta: plain data identifying the run (e.g. the plan); a checkpoint with other meta is refused.
        precision: ``"fp32"``, or ``"bf16"``: the student's and the teacher's forwards and the loss run under
            bfloat16 autocast (:func:`hq_ptq.devices.autocast_context`); the backward, the parameters,
            gradients, optimizer state, EMA and checkpoints stay float32 (``QuantConfig.precision``).

    Returns:
        steps, smoothed final loss (averaged over ranks), seconds of this call, and the start step.
    """
    precision = check_precision(precision, "precision")
    if config.steps == 0:
        return QATResult(steps=0, final_loss=float("nan"), seconds=0.0)
    # cross-entropy (the default) says the outputs are logits; with another loss only output_fn says so
    outputs_are_logits = loss_fn is None or output_fn is not None
    loss_fn = loss_fn or F.cross_entropy
    shard = current_shard()
    world = 1 if shard is None else shard.world
    doc = None
    # rank 0 decides, so no rank trains from scratch while the others resume
    if resume and checkpoint is not None and broadcast_object(Path(checkpoint).is_file()):
        doc = load_checkpoint(
            checkpoint, model, config, seed=seed, meta=meta, world_size=world, precision=precision
        )
        # before the optimizer exists: loading a Brevitas quantizer's state re-creates its scale Parameters
        model.load_state_dict(doc["model"])
    elif resume:
        log.info("no QAT checkpoint at %s: fine-tuning from the start", checkpoint)
    _check_learnable_scales(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("QAT found no trainable parameters in the model")
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, config.steps, warmup))
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and config.ema_decay}
    running = float("nan")
    start = 0
    meta_json = json.dumps(meta or {}, sort_keys=True)
    if doc is not None:
        opt.load_state_dict(doc["optimizer"])
        sched.load_state_dict(doc["scheduler"])
        devices = {n: p.device for n, p in model.named_parameters()}
        ema = {n: t.to(devices.get(n, t.device), copy=True) for n, t in doc["ema"].items()}
        running, start = float(doc["running"]), int(doc["step"])
        rng = doc["rng"][0 if shard is None else shard.rank]
        if len(rng["generators"]) != len(generators):
            raise ValueError(
                f"QAT checkpoint {checkpoint} holds {len(rng['generators'])} generator states, this run has "
                f"{len(generators)}; delete it or run without --resume"
            )
        torch.set_rng_state(rng["torch"])
        _set_cuda_rng(rng.get("cuda"), checkpoint)  # absent from checkpoints written without CUDA in use
        for g, state in zip(generators, rng["generators"], strict=True):
            g.set_state(state)
        log.info("QAT resumed from %s at step %d of %d", checkpoint, start, config.steps)

    def save(step: int) -> None:
        states = {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in generators]}
        cuda = _cuda_rng_states()
        if cuda is not None:
            states["cuda"] = cuda
        rngs = all_gather_object(states)  # every rank's random state, so each rank resumes its own stream
        if shard is not None and shard.rank != 0:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "step": step,
            "settings": _settings(config, seed, precision),
            "meta": meta_json,
            "world_size": world,
            "shapes": state_shapes(model),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "ema": ema,
            "running": running,
            "rng": rngs,
        }
        save_checkpoint(checkpoint, state)
        log.info("QAT checkpoint at step %d: %s", step, checkpoint)

    if teacher is not None:
        teacher.eval()
    model.train()
    if config.keep_bn_statistics:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    net: nn.Module = model
    if shard is not None:
        from torch.nn.parallel import DistributedDataParallel

        # every parameter, Brevitas scales included, is used in each forward: no unused-parameter search.
        # Buffers (BN statistics) follow rank 0 at every forward.
        net = DistributedDataParallel(model)
    first_seen: list[str] = []
    batches = _batches(train_data, start * world, shard, first_seen)
    device = model_device(model)
    teacher_device = model_device(teacher) if teacher is not None else device
    # "bf16": the forwards and the loss under autocast (the student's device, and the teacher's when it sits
    # elsewhere); checked here, so a GPU without bfloat16 fails before the first step
    autocast = autocast_context(precision, device, what="precision")
    teacher_autocast = autocast_context(precision, teacher_device, what="precision")
    began = time.perf_counter()
    # snnTorch's sigmoid surrogate gives NaN gradients far below threshold; its stable twin does not
    with stable_surrogates(model), progress.task("qat", total=config.steps) as update:
        update(advance=start)
        for step in range(start, config.steps):
            inputs, targets = next(batches)
            if step == start and shard is not None:
                check_same(first_seen[0], "the QAT training data")
            if augment is not None:
                # the data distribution the float model was trained on (e.g. its random shifts)
                inputs = augment(inputs)
            given = inputs
            inputs = batch_to(given, device, what="QAT inputs")
            targets = batch_to(targets, device, what="QAT targets")
            # every forward starts from fresh neuron state (the student's and the teacher's)
            reset_states(model)
            with autocast:
                outputs = call(net, inputs)
                loss = loss_fn(outputs, targets)
            if teacher is not None and config.distill_weight > 0:
                scores = class_scores(outputs, output_fn) if outputs_are_logits else None
                if scores is None:
                    why = (
                        f"the model returns {describe(outputs)}, not [batch, classes] logits"
                        if outputs_are_logits or class_scores(outputs, None) is None
                        else f"with your own loss_fn, outputs {describe(outputs)} need not be logits"
                    )
                    warnings.warn(
                        f"QAT distillation is off: {why}; pass output_fn to distil from the float model",
                        stacklevel=2,
                    )
                    teacher = None
                else:
                    with torch.no_grad(), teacher_autocast:
                        reset_states(teacher)
                        taught = inputs if teacher_device == device else batch_to(given, teacher_device)
                        teacher_scores = class_scores(call(teacher, taught), output_fn).to(device)
                    # softened in float32 (bf16 logits are exact in it): the KL of two close
                    # distributions is a difference bfloat16 would round away
                    kd = distillation_loss(scores.float(), teacher_scores.float(), config.temperature)
                    loss = (1 - config.distill_weight) * loss + config.distill_weight * kd
            # a loss_fn of the user's may return bfloat16 under autocast: the backward starts from float32
            loss = loss.float()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if ema:  # off by default: no per-step walk over the parameters then
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if n in ema:
                            ema[n].lerp_(p, 1 - config.ema_decay)
            value = loss.detach().double()
            value = float(value if shard is None else shard.reduce(value) / world)
            if not math.isfinite(value):
                raise FloatingPointError(f"QAT diverged at step {step + 1} (loss {value}); lower qat.lr")
            running = value if math.isnan(running) else 0.9 * running + 0.1 * value
            update(loss=f"{running:.3f}")
            done = step + 1
            every = config.checkpoint_every
            if checkpoint is not None and every and (done % every == 0 or done == config.steps):
                save(done)
    del net  # drops DDP's gradient hooks
    reset_states(model)  # no membrane of the last batch (with its graph) stays behind
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in ema:
                p.copy_(ema[n])
    model.eval()
    seconds = time.perf_counter() - began
    log.info("QAT steps %d..%d in %.1fs, loss %.4f", start, config.steps, seconds, running)
    return QATResult(steps=config.steps, final_loss=running, seconds=seconds, start_step=start)
