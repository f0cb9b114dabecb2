"""Frozen configuration dataclasses for quantization: search, QAT, and the top-level ``QuantConfig``.

Plain data only (no torch): each has ``to_dict``/``from_dict`` so recipes, reports and caches share one form.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

METRICS = ("hessian", "fisher", "data_free", "loss")
METHODS = ("greedy", "milp")
# how a new quantizer's per-channel scale starts: the error-minimising threshold, or the channel absmax
SCALE_INITS = ("mse", "absmax")
# where a run computes: "auto" (hq_ptq.quantize: the model's own device; recipes and the CLI: cuda when
# available, else cpu), "cpu", "cuda" (the current CUDA device) or "cuda:N"
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
# what QAT's forwards and losses compute in: "fp32", or "bf16" (torch.autocast to bfloat16; weights, optimizer
# state, EMA and checkpoints stay float32). The sensitivity analysis always runs in float32
# (hq_ptq.devices.analysis_autocast says why).
PRECISIONS = ("fp32", "bf16")

# old key -> new key, for the one-line error that names the new key (recipes, --set, from_dict, keyword args)
RENAMED = {
    "search.max_samples": "search.hutchinson_probes",
    "search.rel_tol": "search.hutchinson_rel_tol",
    "quant.recalibrate_bn": "quant.bn_recalibration_batches",
    "qat.freeze_bn": "qat.keep_bn_statistics",
}


def check_renamed(section: str, keys: Any) -> None:
    """A one-line ValueError when one of ``keys`` is an old name of a ``section`` key."""
    for key in keys:
        new = RENAMED.get(f"{section}.{key}")
        if new is not None:
            raise ValueError(f"{section}.{key} was renamed {new}")


def _renamed_kwargs(section: str):
    """Class decorator: an old keyword argument to the dataclass's ``__init__`` names the new one."""

    def wrap(cls: type) -> type:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            check_renamed(section, kwargs)
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls

    return wrap


def check_device(device: Any, what: str = "quant.device") -> str:
    """``device`` when it reads "auto", "cpu", "cuda" or "cuda:N", else a one-line ValueError naming ``what``.

    Only the spelling is checked here (no torch); :func:`hq_ptq.devices.resolve_device` checks that CUDA is
    there."""
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device.strip()):
        raise ValueError(f"{what} must be 'auto', 'cpu', 'cuda' or 'cuda:N' (N a GPU index), got {device!r}")
    return device.strip()


def check_precision(precision: Any, what: str = "quant.precision") -> str:
    """``precision`` when it is one of :data:`PRECISIONS`, else a one-line ValueError naming ``what``."""
    if not isinstance(precision, str) or precision.strip() not in PRECISIONS:
        raise ValueError(f"{what} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision.strip()


def _check_keys(cls: type, data: dict[str, Any], section: str) -> None:
    names = [f.name for f in fields(cls)]
    check_renamed(section, data)
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {section}.{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ValueError(f"unknown key {section}.{key}{hint}")


def _tuple(value: Any) -> tuple:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (int, float)):  # `--set search.bits=4` means (4,)
        return (value,)
    return tuple(value)


@_renamed_kwargs("search")
@dataclass(frozen=True)
class SearchConfig:
    """How sensitivities are measured and bits allocated.

    ``bits=()`` means every bit width a scheme supports. ``protect`` lists name globs kept at
    ``protect_scheme``/``protect_bits`` (counted in the budget); ``protect_first_last`` adds the first and
    last quantized layer.
    """

    # fisher by default: on fashion's validation split its plans tie with hessian's and the measured-loss
    # ground truth's at every budget (paired 95% intervals over 3 seeds), it ranks layers closer to that
    # ground truth and costs about half the Hessian's time (benchmarks/results/search_quality-*.json)
    metric: str = "fisher"
    method: str = "greedy"
    schemes: tuple[str, ...] = ("uniform", "pot")
    bits: tuple[int, ...] = ()
    protect: tuple[str, ...] = ()
    protect_first_last: bool = True
    protect_scheme: str = "uniform"
    protect_bits: int = 8
    calib_batches: int = 4
    # Hutchinson trace estimation (metric "hessian"): at most this many probes, stopping earlier once every
    # layer's relative standard error is at most hutchinson_rel_tol
    hutchinson_probes: int = 64
    hutchinson_rel_tol: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "schemes", _tuple(self.schemes))
        object.__setattr__(self, "bits", tuple(int(b) for b in _tuple(self.bits)))
        object.__setattr__(self, "protect", _tuple(self.protect))
        if self.metric == "weight":  # the old name of the data-free metric (Hessian taken as identity)
            raise ValueError("search.metric 'weight' was renamed 'data_free'")
        if self.metric not in METRICS:
            raise ValueError(f"search.metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.method not in METHODS:
            raise ValueError(f"search.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not self.schemes:
            raise ValueError("search.schemes is empty: allow at least one of 'uniform', 'pot'")
        if self.calib_batches < 1:
            raise ValueError(f"search.calib_batches must be >= 1, got {self.calib_batches}")
        if self.hutchinson_probes < 2:  # a standard error needs two probes
            raise ValueError(f"search.hutchinson_probes must be >= 2, got {self.hutchinson_probes}")
        if not 0 < self.hutchinson_rel_tol < 1:
            raise ValueError(f"search.hutchinson_rel_tol must be in (0, 1), got {self.hutchinson_rel_tol}")


@_renamed_kwargs("qat")
@dataclass(frozen=True)
class QATConfig:
    """Short quantization-aware fine-tuning: CE + distillation from the float teacher, cosine LR."""

    steps: int = 150
    lr: float = 2e-4
    weight_decay: float = 0.0
    distill_weight: float = 0.5
    temperature: float = 2.0
    # Polyak average of weights and scales, loaded at the end; 0 turns it off. Averages out the last
    # steps' noise, which on small data decides the outcome more than the loss does.
    ema_decay: float = 0.0
    # Keep BatchNorm running statistics fixed during QAT (BN in eval mode), the usual QAT practice: at the
    # values re-estimated after the plan is applied (quant.bn_recalibration_batches), or the float model's
    # when that is 0. Updating them from a few small batches of a half-trained quantized model adds noise.
    # With it, the digits quality bar's mean drop at 3.5 bits over 5 QAT seeds is 0.00 points
    # (benchmarks/results/digits.json, benchmarks/digits.py; docs/BENCHMARKS.md).
    keep_bn_statistics: bool = True
    # write a resumable checkpoint every this many steps (and after the last) when a run has an output
    # folder; 0 turns it off
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"qat.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.steps < 0:
            raise ValueError(f"qat.steps must be >= 0, got {self.steps}")
        if self.checkpoint_every < 0:
            raise ValueError(f"qat.checkpoint_every must be >= 0 (0: off), got {self.checkpoint_every}")
        if not self.lr > 0:
            raise ValueError(f"qat.lr must be > 0, got {self.lr}")
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(f"qat.distill_weight must be in [0, 1], got {self.distill_weight}")
        if not self.temperature > 0:
            raise ValueError(f"qat.temperature must be > 0, got {self.temperature}")


@_renamed_kwargs("quant")
@dataclass(frozen=True)
class QuantConfig:
    """Everything ``hq_ptq.quantize`` needs besides the model, the budget and the data."""

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    search: SearchConfig = field(default_factory=SearchConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    seed: int = 0
    cache_dir: str | None = None
    # After the plan is applied, re-estimate every BatchNorm's running statistics on this many calibration
    # batches of the quantized model (0: keep the float model's). Quantized weights shift each BN's input
    # statistics; on the fashion Pareto benchmark it took the PTQ accuracy of uniform 3-bit from 80.65% to
    # 83.75% and of power-of-two 3-bit from 83.00% to 83.45%
    # (benchmarks/results/pareto-fashion-spikformer.json against the same file at commit 7507073, without
    # it; docs/BENCHMARKS.md). QAT then starts from, and keeps, these values.
    # (hq_ptq.recalibrate_bn does the re-estimation.)
    bn_recalibration_batches: int = 8
    # Where each quantizer's learnable per-channel scale starts (scoring candidates and applying the plan
    # alike): "mse", the threshold that minimises the layer's weight error, or "absmax", the channel's
    # largest weight (Brevitas' own init); QAT refines it from there.
    scale_init: str = "mse"
    # Where quantization computes: "auto" (hq_ptq.quantize: wherever the model already is; recipes and the
    # CLI: cuda when available, else cpu), "cpu", "cuda" or "cuda:N". The model is moved there and every
    # batch (inputs and targets) follows it at the point of use (hq_ptq.devices).
    device: str = "auto"
    # What QAT computes in: "fp32" or "bf16" (student and teacher forwards and the loss under
    # torch.autocast to bfloat16; weights, optimizer state, EMA and checkpoints stay float32). On the
    # digits recipe at 3.5 bits (20 QAT steps, 3 seeds) bf16 QAT's mean test accuracy was 0.09 points from
    # fp32's, at 6.8x the seconds per step on a CPU without native bfloat16. The sensitivity analysis runs
    # in float32 either way: in bfloat16 the Fisher traces moved by 11% (median over layers) and its
    # one-pass per-sample gradients fell back to 39x slower micro-batches
    # (benchmarks/results/bf16-digits.json; hq_ptq.devices.analysis_autocast).
    precision: str = "fp32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", _tuple(self.include))
        object.__setattr__(self, "device", check_device(self.device))
        object.__setattr__(self, "precision", check_precision(self.precision))
        if self.scale_init not in SCALE_INITS:
            raise ValueError(
                f"quant.scale_init must be one of {', '.join(SCALE_INITS)}, got {self.scale_init!r}"
            )
        object.__setattr__(self, "exclude", _tuple(self.exclude))
        if self.bn_recalibration_batches < 0:
            raise ValueError(
                "quant.bn_recalibration_batches must be >= 0 batches (0: off), "
                f"got {self.bn_recalibration_batches}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        data = dict(data)
        _check_keys(cls, data, "quant")
        search = dict(data.pop("search", {}) or {})
        qat = dict(data.pop("qat", {}) or {})
        _check_keys(SearchConfig, search, "search")
        _check_keys(QATConfig, qat, "qat")
        return cls(search=SearchConfig(**search), qat=QATConfig(**qat), **data)


def check_energy_budget(energy_budget: float | None) -> None:
    """Raise ValueError unless ``energy_budget`` is None or a fraction of the FP32 energy in (0, 1]."""
    if energy_budget is None:
        return
    number = not isinstance(energy_budget, bool) and isinstance(energy_budget, (int, float))
    if not (number and 0 < energy_budget <= 1):
        raise ValueError(
            "energy_budget must be a fraction of the FP32 model's estimated energy in (0, 1], e.g. 0.1 for "
            f"10%, got {energy_budget!r}"
        )


def section_from_dict(cls: type, data: dict[str, Any], section: str) -> Any:
    """Build a flat config dataclass from a recipe section, naming a misspelled key."""
    _check_keys(cls, data, section)
    return cls(**data)
