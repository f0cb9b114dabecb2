"""Energy per inference of a spiking model, float32 against a quantized plan (45 nm constants).

Two steps. :func:`measure_activity` runs a few batches with forward hooks on every weight layer and
records, per layer, the dense MACs, the fraction of nonzero inputs and what kind of values the inputs
are. :func:`estimate_energy` turns that activity and a per-layer bit plan into picojoules:

* **spike** layer (inputs all in {0, 1}): each nonzero input drives one accumulate per fan-out,
  ``ops = rate · dense MACs``.
* **count** layer (hidden inputs that are small integers, e.g. the SEW residual ``x + attn(x)`` in
  Spikformer, values 0..k): a value k is k spikes arriving together, ``ops = mean|x| · dense MACs``
  accumulates.
* **mac** layer (real-valued inputs, such as a head on time-averaged features, or the model's own input
  when it is not binary, such as DVS event counts): every dense MAC is a float32 multiply-accumulate.

Compute: an accumulate costs a float32 add in the FP32 model and an integer add at the layer's weight
bit width in the quantized model; MAC layers stay float32 MACs in both (hq_ptq quantizes weights,
not activations). Memory: every weight is read from SRAM once per time step in which its layer runs,
at 32 bits (FP32) or at the plan's bits. The formulas, conventions and limitations are in
``docs/ENERGY.md``; every constant lives in :data:`HOROWITZ_45NM`.
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from hq_ptq.plan import Plan
from hq_ptq.snn import reset_states
from hq_ptq.swap import find_layers, layer_quant, quant_layers

__all__ = [
    "HOROWITZ_45NM",
    "EnergyConstants",
    "EnergyReport",
    "LayerActivity",
    "LayerEnergy",
    "estimate_energy",
    "measure_activity",
]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class EnergyConstants:
    """Energy per operation in picojoules; see ``docs/ENERGY.md`` for the sources.

    Args:
        int_add_8: 8-bit integer add.
        int_add_32: 32-bit integer add.
        fp32_add: float32 add, the accumulate of a float spiking layer.
        fp32_mac: float32 multiply-accumulate (mult 3.7 + add 0.9).
        sram_read_32: one 32-bit word read from an 8 KB SRAM array.
    """

    # Horowitz, "Computing's energy problem", ISSCC 2014, 45 nm table; the same values appear in
    # PMC8934428 table 3 (int32 add 0.1, fp32 add 0.9, fp32 mult 3.7) and in the SNN energy convention
    # E_AC = 0.9, E_MAC = 4.6 (e.g. PMC10242054 table 3).
    int_add_8: float = 0.03
    int_add_32: float = 0.1
    fp32_add: float = 0.9
    fp32_mac: float = 4.6
    # Horowitz: an 8 KB SRAM 64-bit access is ~10 pJ; the 32-bit load used in SNN papers is half, 5 pJ
    # (PMC8934428 table 3, "E_mem"). Read cost is taken as proportional to the bits read.
    sram_read_32: float = 5.0

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"energy constant {key} must be a positive finite pJ value, got {value!r}")
        if self.int_add_32 <= self.int_add_8:
            raise ValueError(
                f"int_add_32 ({self.int_add_32}) must exceed int_add_8 ({self.int_add_8}): adder energy "
                "grows with width"
            )

    def int_add(self, bits: float) -> float:
        """Integer add at ``bits``: the straight line through (8, int_add_8) and (32, int_add_32).

        ``E(b) = int_add_8 + (b - 8) · (int_add_32 - int_add_8) / 24``; with the Horowitz numbers
        ``E(b) = 0.00667 + 0.00292 · b`` pJ, so 4 bits cost 0.0183 pJ and 2 bits 0.0125 pJ.
        """
        _check_bits(bits, "bits")
        return self.int_add_8 + (bits - 8) * (self.int_add_32 - self.int_add_8) / 24

    @property
    def sram_read_bit(self) -> float:
        """SRAM read energy per weight bit (5 pJ / 32 = 0.156 pJ)."""
        return self.sram_read_32 / 32

    def weight_read(self, bits: float) -> float:
        """Energy of reading one ``bits``-wide weight from SRAM."""
        _check_bits(bits, "bits")
        return bits * self.sram_read_bit


HOROWITZ_45NM = EnergyConstants()
"""The default 45 nm constants (Horowitz, ISSCC 2014)."""

FP_BITS = 32


def _check_bits(bits: Any, what: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 1 <= bits <= 64:
        raise ValueError(f"{what} must be a number of bits in 1..64, got {bits!r}")


# ---------------------------------------------------------------------------------------------
# Activity
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerActivity:
    """What one weight layer did per inference (one sample, all time steps), averaged over the batches.

    Args:
        name: Qualified module name.
        layer_type: Module class name.
        params: Weight parameters.
        macs: Dense MACs per inference (all calls, all time steps).
        steps: Weight uses per inference: leading-dim items per sample (T for a time-folded
            ``[T*B, ...]`` layer, 1 for a head that runs once on the time average).
        time_steps: T of the model input.
        rate: Fraction of nonzero inputs.
        mean_abs: Mean absolute input value (equals ``rate`` for binary spikes).
        binary: Every input value was 0 or 1.
        integer: Every input value was an integer.
        model_input: The layer read the model's input tensor directly.
        scheme: The layer's hq_ptq scheme, ``None`` for a float layer.
        bits: The layer's hq_ptq weight bits, ``None`` for a float layer.
        calls: Forward calls seen.
        samples: Samples seen.
    """

    name: str
    layer_type: str
    params: int
    macs: float
    steps: float
    time_steps: int
    rate: float
    mean_abs: float
    binary: bool
    integer: bool
    model_input: bool
    scheme: str | None = None
    bits: int | None = None
    calls: int = 0
    samples: int = 0

    @property
    def kind(self) -> str:
        """``"spike"``, ``"count"`` or ``"mac"`` (see the module docstring)."""
        if self.binary:
            return "spike"
        # The network's own non-binary input (event counts, pixels) is the conventional MAC layer.
        if self.model_input or not self.integer:
            return "mac"
        return "count"

    @property
    def macs_per_step(self) -> float:
        """Dense MACs per sample per time step."""
        return self.macs / max(self.time_steps, 1)

    @property
    def ops(self) -> float:
        """Operations per inference: accumulates for spike/count layers, dense MACs for MAC layers."""
        kind = self.kind
        if kind == "spike":
            return self.rate * self.macs
        if kind == "count":
            return self.mean_abs * self.macs
        return self.macs

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the derived ``kind``, ``ops`` and ``macs_per_step``."""
        return {**asdict(self), "kind": self.kind, "ops": self.ops, "macs_per_step": self.macs_per_step}


class _Stats:
    __slots__ = ("calls", "macs", "items", "nonzero", "abs_sum", "numel", "binary", "integer", "model_input")

    def __init__(self) -> None:
        self.calls = 0
        self.macs = 0
        self.items = 0
        self.nonzero = 0
        self.abs_sum = 0.0
        self.numel = 0
        self.binary = True
        self.integer = True
        self.model_input = False


def _value(t: Any) -> torch.Tensor:
    # Brevitas may hand back a QuantTensor; its dequantized value is what the layer computed with.
    return t.value if hasattr(t, "value") and not isinstance(t, torch.Tensor) else t


def _dense_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    raise ValueError(f"cannot count MACs of {type(module).__name__}; only Conv1d/Conv2d/Linear are measured")


def _split_batch(batch: Any, time_first: bool) -> tuple[torch.Tensor, int, int]:
    """(inputs, B, T) of one batch: ``(inputs, targets)`` or a bare tensor."""
    if isinstance(batch, torch.Tensor):
        inputs, n = batch, None
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        inputs = batch[0]
        n = len(batch[1]) if len(batch) > 1 and hasattr(batch[1], "__len__") else None
    else:
        raise ValueError(f"a batch must be a tensor or (inputs, targets), got {type(batch).__name__}")
    if time_first:
        if inputs.dim() < 2:
            raise ValueError(f"time-first inputs must be [T, B, ...], got shape {tuple(inputs.shape)}")
        t, b = inputs.shape[0], inputs.shape[1]
        if n is not None and n != b:
            raise ValueError(
                f"inputs {tuple(inputs.shape)} are not time-first [T, B={n}, ...]; pass time_first=False "
                "for a model that takes [B, ...]"
            )
        return inputs, b, t
    b = inputs.shape[0] if inputs.dim() else 1
    if n is not None and n != b:
        raise ValueError(f"inputs {tuple(inputs.shape)} hold {b} samples but targets {n}")
    return inputs, b, 1


def measure_activity(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    max_batches: int = 4,
    time_first: bool = True,
) -> dict[str, LayerActivity]:
    """Spike rates, input kinds and dense MACs of every weight layer, per inference.

    Hooks every hq_ptq-quantized layer and every plain ``Conv1d``/``Conv2d``/``Linear`` (so a float
    model works too), runs up to ``max_batches`` batches in eval mode without gradients, and divides
    the totals by the number of samples seen. The model's training mode is restored afterwards.

    Args:
        model: The model, called as ``model(inputs)``.
        batches: ``(inputs, targets)`` pairs or bare input tensors.
        max_batches: Batches to run (>= 1).
        time_first: Inputs are ``[T, B, ...]`` (the zoo); ``False`` for ``[B, ...]`` (then T = 1).

    Returns:
        Layer name → :class:`LayerActivity`, in model order.

    Raises:
        ValueError: No weight layer, no batch, or a malformed batch.
    """
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"max_batches must be an integer >= 1, got {max_batches!r}")
    names = find_layers(model)
    modules = dict(model.named_modules())
    hq = quant_layers(model)
    stats = {n: _Stats() for n in names}
    current: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not args:
                return
            x = _value(args[0]).detach()
            y = _value(output)
            s = stats[name]
            s.calls += 1
            s.macs += _dense_macs(module, y)
            s.items += x.shape[0] if x.dim() > 1 else 1
            s.numel += x.numel()
            s.nonzero += int(torch.count_nonzero(x))
            s.abs_sum += float(x.abs().sum(dtype=torch.float64))
            if s.binary:
                s.binary = bool(((x == 0) | (x == 1)).all())
            if s.integer:
                s.integer = bool(torch.isfinite(x).all() and (x == x.round()).all())
            src = current.get("input")
            if src is not None and x.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
                s.model_input = True

        return hook

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    handles = [modules[n].register_forward_hook(make_hook(n)) for n in names]
    # per module, so a model with some submodules deliberately frozen in eval comes back as it was
    modes = [(m, m.training) for m in model.modules()]
    samples, time_steps, seen = 0, None, 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in itertools.islice(iter(batches), max_batches):
                inputs, b, t = _split_batch(batch, time_first)
                if time_steps is not None and t != time_steps:
                    raise ValueError(f"batches have different time steps ({time_steps} and {t}); use one T")
                time_steps = t
                current["input"] = inputs.to(device)
                reset_states(model)
                model(current["input"])
                samples += b
                seen += 1
    finally:
        for h in handles:
            h.remove()
        current.clear()
        for module, mode in modes:
            module.training = mode
    if seen == 0:
        raise ValueError("batches yielded nothing; pass at least one (inputs, targets) batch")

    out: dict[str, LayerActivity] = {}
    for name in names:
        s, module = stats[name], modules[name]
        if s.calls == 0:
            log.warning("layer %s never ran on the given batches; it counts as zero energy", name)
        scheme, bits = layer_quant(module) if name in hq else (None, None)
        out[name] = LayerActivity(
            name=name,
            layer_type=type(module).__name__,
            params=module.weight.numel(),
            macs=s.macs / samples,
            steps=s.items / samples,
            time_steps=int(time_steps),
            rate=s.nonzero / s.numel if s.numel else 0.0,
            mean_abs=s.abs_sum / s.numel if s.numel else 0.0,
            binary=s.binary and s.calls > 0,
            integer=s.integer and s.calls > 0,
            model_input=s.model_input,
            scheme=scheme,
            bits=bits,
            calls=s.calls,
            samples=samples,
        )
    log.info("measured activity of %d layers on %d samples (T=%d)", len(out), samples, time_steps)
    return out


# ---------------------------------------------------------------------------------------------
# Energy
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerEnergy:
    """Energy of one layer per inference, in pJ, for the FP32 model and the quantized plan.

    ``bits``/``scheme`` are ``None`` for a layer the plan leaves in float (costed as FP32).
    """

    name: str
    kind: str
    bits: int | None
    scheme: str | None
    macs: float
    ops: float
    weight_reads: float
    fp32_compute_pj: float
    fp32_memory_pj: float
    quant_compute_pj: float
    quant_memory_pj: float

    @property
    def fp32_pj(self) -> float:
        """FP32 compute + memory."""
        return self.fp32_compute_pj + self.fp32_memory_pj

    @property
    def quant_pj(self) -> float:
        """Quantized compute + memory."""
        return self.quant_compute_pj + self.quant_memory_pj

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the totals."""
        return {**asdict(self), "fp32_pj": self.fp32_pj, "quant_pj": self.quant_pj}


@dataclass(frozen=True)
class EnergyReport:
    """Per-layer and total energy per inference (pJ), FP32 against the quantized plan."""

    layers: tuple[LayerEnergy, ...]
    constants: EnergyConstants = HOROWITZ_45NM
    time_steps: int = 1

    def _sum(self, attr: str) -> float:
        return math.fsum(getattr(layer, attr) for layer in self.layers)

    @property
    def fp32_pj(self) -> float:
        """Total FP32 energy per inference."""
        return self._sum("fp32_pj")

    @property
    def quant_pj(self) -> float:
        """Total quantized energy per inference."""
        return self._sum("quant_pj")

    @property
    def ratio(self) -> float:
        """FP32 / quantized energy (``inf`` if the quantized model costs nothing)."""
        q = self.quant_pj
        return self.fp32_pj / q if q > 0 else math.inf

    def totals(self) -> dict[str, float]:
        """Compute/memory/total pJ for both models and the ratio."""
        return {
            "fp32_compute_pj": self._sum("fp32_compute_pj"),
            "fp32_memory_pj": self._sum("fp32_memory_pj"),
            "fp32_pj": self.fp32_pj,
            "quant_compute_pj": self._sum("quant_compute_pj"),
            "quant_memory_pj": self._sum("quant_memory_pj"),
            "quant_pj": self.quant_pj,
            "ratio": self.ratio,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: totals, constants, conventions and one entry per layer."""
        return {
            "unit": "pJ per inference",
            "time_steps": self.time_steps,
            "totals": self.totals(),
            "constants": asdict(self.constants),
            "conventions": {
                "accumulate": "spike: rate*MACs, count: mean|x|*MACs; fp32 add (FP32) or int add at b bits",
                "int_add": "linear in bits through (8, int_add_8) and (32, int_add_32)",
                "mac_layers": "float32 MAC per dense MAC in both models (activations stay float)",
                "weight_reads": "each weight read once per time step its layer runs, at 32 or b bits",
            },
            "layers": [layer.to_dict() for layer in self.layers],
        }


def _bits_map(plan_or_bits: Plan | Mapping[str, int] | None, activity: Mapping[str, LayerActivity]):
    if isinstance(plan_or_bits, Plan):
        return {c.name: (c.bits, c.scheme) for c in plan_or_bits.layers}
    if plan_or_bits is None:
        found = {n: (a.bits, a.scheme) for n, a in activity.items() if a.bits is not None}
        if not found:
            raise ValueError(
                "no bit widths: the measured model has no hq_ptq layers; pass a Plan or {layer: bits}"
            )
        return found
    if not isinstance(plan_or_bits, Mapping):
        raise ValueError(f"plan_or_bits must be a Plan, a {{layer: bits}} dict or None, got "
                         f"{type(plan_or_bits).__name__}")
    return {n: (b, activity[n].scheme if n in activity else None) for n, b in plan_or_bits.items()}


def estimate_energy(
    activity: Mapping[str, LayerActivity],
    plan_or_bits: Plan | Mapping[str, int] | None = None,
    constants: EnergyConstants = HOROWITZ_45NM,
) -> EnergyReport:
    """Energy per inference of the FP32 model and of the quantized plan.

    Per layer (``ops`` and ``weight_reads = params · steps`` from :class:`LayerActivity`):

    * FP32: ``ops · fp32_add`` (spike/count) or ``macs · fp32_mac`` (mac), plus
      ``weight_reads · 32 · sram_read_bit``.
    * quantized at b bits: ``ops · int_add(b)`` (spike/count) or ``macs · fp32_mac`` (mac), plus
      ``weight_reads · b · sram_read_bit``. A layer without bits is costed as FP32.

    Args:
        activity: From :func:`measure_activity`.
        plan_or_bits: A :class:`~hq_ptq.plan.Plan`, ``{layer: bits}``, or ``None`` to use the bits the
            measured hq_ptq layers carried.
        constants: Energy per operation.

    Returns:
        An :class:`EnergyReport`.

    Raises:
        ValueError: Empty activity, a planned layer that was not measured, or bits outside 1..64.
    """
    if not activity:
        raise ValueError("activity is empty; run measure_activity on the model first")
    bits_map = _bits_map(plan_or_bits, activity)
    unknown = [n for n in bits_map if n not in activity]
    if unknown:
        raise ValueError(f"plan names layers with no measured activity: {', '.join(unknown[:5])}; "
                         "measure the same model the plan was made for")
    for name, (bits, scheme) in list(bits_map.items()):
        try:
            ok = not isinstance(bits, bool) and 1 <= operator.index(bits) <= 64
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"layer {name!r}: bits must be an integer in 1..64, got {bits!r}")
        bits_map[name] = (operator.index(bits), scheme)
    floats = [n for n in activity if n not in bits_map]
    if floats:
        log.info("%d layers have no bits in the plan and are costed as FP32: %s", len(floats),
                 ", ".join(floats[:5]))

    c = constants
    layers = []
    for name, act in activity.items():
        kind = act.kind
        reads = act.params * act.steps
        fp_compute = act.macs * c.fp32_mac if kind == "mac" else act.ops * c.fp32_add
        fp_memory = reads * c.weight_read(FP_BITS)
        bits, scheme = bits_map.get(name, (None, None))
        if bits is None:
            q_compute, q_memory = fp_compute, fp_memory
        else:
            # MAC layers keep float activations, so their multiply stays float; only the weight read shrinks.
            q_compute = act.macs * c.fp32_mac if kind == "mac" else act.ops * c.int_add(bits)
            q_memory = reads * c.weight_read(bits)
        layers.append(LayerEnergy(
            name=name, kind=kind, bits=None if bits is None else int(bits), scheme=scheme, macs=act.macs,
            ops=act.ops, weight_reads=reads, fp32_compute_pj=fp_compute, fp32_memory_pj=fp_memory,
            quant_compute_pj=q_compute, quant_memory_pj=q_memory,
        ))
    time_steps = max(a.time_steps for a in activity.values())
    return EnergyReport(layers=tuple(layers), constants=constants, time_steps=time_steps)
