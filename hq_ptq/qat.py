"""Short quantization-aware fine-tuning: cross-entropy plus distillation from the float teacher.

Brevitas layers give straight-through gradients to both the weights and the learnable per-channel scales, so
one optimizer over ``model.parameters()`` trains both.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hq_ptq import progress
from hq_ptq.config import QATConfig
from hq_ptq.train import cosine_lr

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class QATResult:
    steps: int
    final_loss: float
    seconds: float


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


def _cycle(data: Iterable) -> Iterator:
    """Re-iterate ``data`` (a DataLoader reshuffles each pass) instead of caching it like itertools.cycle."""
    while True:
        empty = True
        for item in data:
            empty = False
            yield item
        if empty:
            raise ValueError("QAT train_data yielded no batches")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: KL(teacher || student) on softened logits, scaled by T² to keep gradient size."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="batchmean"
    ) * (t * t)


def finetune(
    model: nn.Module,
    train_data: Iterable[tuple[torch.Tensor, torch.Tensor]],
    config: QATConfig = QATConfig(),
    *,
    teacher: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
) -> QATResult:
    """Fine-tune the quantized ``model`` in place for ``config.steps`` batches (cycling ``train_data``)."""
    if config.steps == 0:
        return QATResult(steps=0, final_loss=float("nan"), seconds=0.0)
    loss_fn = loss_fn or F.cross_entropy
    _check_learnable_scales(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("QAT found no trainable parameters in the model")
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, config.steps, warmup))
    if teacher is not None:
        teacher.eval()
    model.train()
    if config.freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and config.ema_decay}
    start = time.perf_counter()
    running = float("nan")
    batches = _cycle(train_data)
    with progress.task("qat", total=config.steps) as update:
        for step in range(config.steps):
            inputs, targets = next(batches)
            if augment is not None:
                # the data distribution the float model was trained on (e.g. its random shifts)
                inputs = augment(inputs)
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
            if teacher is not None and config.distill_weight > 0:
                with torch.no_grad():
                    teacher_out = teacher(inputs)
                kd = distillation_loss(outputs, teacher_out, config.temperature)
                loss = (1 - config.distill_weight) * loss + config.distill_weight * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in ema:
                        ema[n].lerp_(p, 1 - config.ema_decay)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"QAT diverged at step {step + 1} (loss {value}); lower qat.lr")
            running = value if math.isnan(running) else 0.9 * running + 0.1 * value
            update(loss=f"{running:.3f}")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in ema:
                p.copy_(ema[n])
    model.eval()
    seconds = time.perf_counter() - start
    log.info("QAT %d steps in %.1fs, loss %.4f", config.steps, seconds, running)
    return QATResult(steps=config.steps, final_loss=running, seconds=seconds)
