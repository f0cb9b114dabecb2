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

Compute depends on the layer's kind and, in the quantized model, on its (scheme, bits):
:func:`layer_cost` is the one cost model, used both by :func:`estimate_energy` (the report) and by the
search's energy budget (:func:`candidate_energy`), so the two never disagree. An accumulate costs a
float32 add in the FP32 model and an integer add at the weight's bit width in the quantized model; a
MAC layer's uniform weight times a float activation stays a float32 MAC, while a power-of-two weight
turns it into an exponent add plus the accumulate. Memory: every weight is read from SRAM once per time
step in which its layer runs, at 32 bits (FP32) or at the plan's bits. The formulas, conventions and
limitations are in ``docs/ENERGY.md``; every constant lives in :data:`HOROWITZ_45NM`.

The picojoules are computed from operation counts (:func:`layer_ops`, a :class:`LayerOps` per layer and
column): accumulates, shift-and-adds and multiply-accumulates, named as NeuroBench's synaptic operations
(``Effective_ACs``, ``Effective_MACs``, ``Dense``). The report carries those counts, the weight memory in
bits and the neuron-state memory (membrane elements counted by :func:`measure_activity`), so an
accelerator designer reads the same numbers the pJ come from (``docs/ENERGY.md`` §8).
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

from hq_ptq.compression import FP_BITS
from hq_ptq.plan import Plan
from hq_ptq.snn import MultiStepLeaky, is_spiking_neuron, is_spikingjelly_neuron, reset_states
from hq_ptq.swap import LAYER_TYPES, find_layers, layer_quant, quant_layers

__all__ = [
    "FP32_EXPONENT_BITS",
    "HOROWITZ_45NM",
    "MEMBRANE_BITS",
    "Activity",
    "EnergyConstants",
    "EnergyReport",
    "LayerActivity",
    "LayerEnergy",
    "LayerOps",
    "candidate_energy",
    "estimate_energy",
    "input_layout",
    "layer_cost",
    "layer_ops",
    "measure_activity",
    "op_energy",
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
        barrel_shift_per_add: a barrel shift as a multiple of an integer add at the same width.
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
    # Horowitz's table has no shifter. A log-depth barrel shifter and a ripple adder of the same width
    # are both ~b·log b gates of similar energy, so we take a shift to cost one add at the same width
    # (an assumption, not a measurement; docs/ENERGY.md §3).
    barrel_shift_per_add: float = 1.0

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

    def shift(self, bits: float) -> float:
        """Barrel shift at ``bits``: ``barrel_shift_per_add · int_add(bits)``."""
        return self.barrel_shift_per_add * self.int_add(bits)

    def weight_read(self, bits: float) -> float:
        """Energy of reading one ``bits``-wide weight from SRAM."""
        _check_bits(bits, "bits")
        return bits * self.sram_read_bit


HOROWITZ_45NM = EnergyConstants()
"""The default 45 nm constants (Horowitz, ISSCC 2014)."""

# A power-of-two weight times a float32 activation adds the weight's exponent to the activation's 8-bit
# exponent field: an integer add at this width.
FP32_EXPONENT_BITS = 8
# Layer kinds (LayerActivity.kind)
KINDS = ("spike", "count", "mac")
# Width of one stored membrane potential: float32 by default; an integer neuron datapath passes its own.
MEMBRANE_BITS = 32


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

    @property
    def neurobench_spiking(self) -> bool:
        """NeuroBench's AC rule: every input is in {-1, 0, 1} (integers whose nonzero values all have
        magnitude 1, i.e. ``mean_abs == rate``); otherwise its synaptic operations are MACs."""
        return self.binary or (self.integer and self.calls > 0 and self.mean_abs == self.rate)

    @property
    def neurobench_effective(self) -> float:
        """NeuroBench's effective synaptic operations: nonzero inputs × fan-out, ``rate · macs``."""
        return self.rate * self.macs

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the derived ``kind``, ``ops`` and ``macs_per_step``."""
        return {**asdict(self), "kind": self.kind, "ops": self.ops, "macs_per_step": self.macs_per_step}


class Activity(dict[str, LayerActivity]):
    """What :func:`measure_activity` returns: layer name → :class:`LayerActivity`, in model order.

    A plain ``dict`` for every existing use, plus ``neurons``: spiking-neuron name → membrane elements
    per sample (the size of one time step's membrane tensor of one sample, i.e. the neuron state a
    streaming implementation keeps), in model order. :func:`estimate_energy` reads it for the
    neuron-state memory; a hand-built ``{name: LayerActivity}`` dict simply has no neuron count.
    """

    def __init__(self, layers: Mapping[str, LayerActivity] = (), neurons: Mapping[str, int] | None = None):
        super().__init__(layers)
        self.neurons: dict[str, int] = dict(neurons or {})


def _neuron_modules(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """``(name, module, time_first)`` of every neuron whose membrane is counted.

    A :class:`~hq_ptq.snn.MultiStepLeaky` (and snnTorch's ``LeakyParallel``) takes ``[T, ...]`` in one
    call; any other snnTorch neuron takes one step per call. The ``snn.Leaky`` inside a MultiStepLeaky is
    its state, not a second neuron, so it is skipped.
    """
    out: list[tuple[str, nn.Module, bool]] = []
    wrappers: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(m, MultiStepLeaky):
            wrappers.append(name)
            out.append((name, m, True))
        elif is_spiking_neuron(m):
            out.append((name, m, type(m).__name__ == "LeakyParallel"))
        elif is_spikingjelly_neuron(m):  # its state: v
            multi = getattr(m, "step_mode", "s") == "m" or type(m).__name__.startswith("MultiStep")
            out.append((name, m, multi))
    return out


# Real-valued state tensors a neuron keeps per element, beside the membrane (snnTorch's state buffers, the
# previous spikes of the recurrent neurons aside: one bit, not a potential). Every other neuron keeps one.
_STATE_VARIABLES = {"Synaptic": 2, "RSynaptic": 2, "Alpha": 3, "SLSTM": 2, "SConv2dLSTM": 2}


def _state_variables(neuron: nn.Module) -> int:
    return _STATE_VARIABLES.get(type(neuron).__name__, 1)


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


def _dense_macs(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # every input element is scattered through one kernel into out_channels/groups outputs
        return x.numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvNd):
        return out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    raise ValueError(f"cannot count MACs of {type(module).__name__}; only {LAYER_TYPES} layers are measured")


def _weight_uses(module: nn.Module, x: torch.Tensor, batch: int, time_steps: int) -> int:
    """How many inputs one call applies the layer's weights to: the dimensions in front of a conv's
    ``[C, *spatial]`` (``T * N`` for a SpikingJelly multi-step conv on ``[T, N, C, H, W]``), and a Linear's
    first dimension, or its first two when they are the model input's ``[T, B]`` or ``[B, T]`` (a
    time-first or batch-first sequence; other leading dimensions, e.g. tokens, are positions, as a conv's
    spatial ones are)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        image = len(module.kernel_size) + 1
        return math.prod(x.shape[:-image]) if x.dim() > image else 1
    if x.dim() >= 3 and tuple(x.shape[:2]) in {(time_steps, batch), (batch, time_steps)}:
        return x.shape[0] * x.shape[1]
    return x.shape[0] if x.dim() > 1 else 1


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
) -> Activity:
    """Spike rates, input kinds and dense MACs of every weight layer, per inference.

    Hooks every hq_ptq-quantized layer and every plain Linear/Conv/ConvTranspose layer (so a float
    model works too), runs up to ``max_batches`` batches in eval mode without gradients, and divides
    the totals by the number of samples seen. The model's training mode is restored afterwards.

    Args:
        model: The model, called as ``model(inputs)``.
        batches: ``(inputs, targets)`` pairs or bare input tensors.
        max_batches: Batches to run (>= 1).
        time_first: Inputs are ``[T, B, ...]`` (the zoo); ``False`` for ``[B, ...]`` (then T = 1).

    Returns:
        Layer name → :class:`LayerActivity`, in model order, as an :class:`Activity` whose ``neurons``
        gives the membrane elements per sample of every snnTorch neuron / ``MultiStepLeaky`` (forward
        hooks: one time step's input size per sample, which is the membrane's size).

    Raises:
        ValueError: No weight layer, no batch, or a malformed batch.
    """
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"max_batches must be an integer >= 1, got {max_batches!r}")
    names = find_layers(model)
    modules = dict(model.named_modules())
    hq = quant_layers(model)
    stats = {n: _Stats() for n in names}
    current: dict[str, Any] = {}
    neuron_mods = _neuron_modules(model)
    # membrane elements per sample: one call's per-step input size (the membrane has the input's shape),
    # summed over the calls of one forward for a multi-step neuron (each call is its own state), the
    # largest call for a step-wise neuron (called once per step on the same state)
    neuron_elems: dict[str, float] = {n: 0.0 for n, _, _ in neuron_mods}
    neuron_batch: dict[str, float] = {}

    def make_neuron_hook(name: str, time_first_neuron: bool, states: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            # the spikes have the state's shape (the input's, except for a neuron with its own layers inside,
            # e.g. SLSTM's hidden size); the input is the fallback for a neuron that returns no tensor
            first = _value(output[0] if isinstance(output, (tuple, list)) and output else output)
            x = first if isinstance(first, torch.Tensor) else (_value(args[0]) if args else None)
            if not isinstance(x, torch.Tensor):
                return
            if time_first_neuron:
                if x.dim() < 2:
                    return
                per_sample = states * x[0].numel() / current["batch"]
                neuron_batch[name] = neuron_batch.get(name, 0.0) + per_sample
            else:
                per_sample = states * x.numel() / current["batch"]
                neuron_batch[name] = max(neuron_batch.get(name, 0.0), per_sample)

        return hook

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not args:
                return
            x = _value(args[0]).detach()
            y = _value(output)
            s = stats[name]
            s.calls += 1
            s.macs += _dense_macs(module, x, y)
            s.items += _weight_uses(module, x, current["batch"], current["time"])
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
    handles += [m.register_forward_hook(make_neuron_hook(n, tf, _state_variables(m)))
                for n, m, tf in neuron_mods]
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
                current["batch"], current["time"] = max(b, 1), t
                reset_states(model)
                neuron_batch.clear()
                model(current["input"])
                for n, elems in neuron_batch.items():
                    neuron_elems[n] = max(neuron_elems[n], elems)
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

    out = Activity(neurons={n: round(e) for n, e in neuron_elems.items()})
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
    log.info("measured activity of %d layers and %d neurons on %d samples (T=%d)", len(out),
             len(out.neurons), samples, time_steps)
    return out


# ---------------------------------------------------------------------------------------------
# Energy
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerOps:
    """Synaptic operations of one layer per inference (one sample, all T steps), by datapath.

    Named as NeuroBench's synaptic operations (``neurobench/metrics/workload/synaptic_operations.py``):
    an operation whose input is a binary spike is an accumulate (``Effective_ACs``), one whose input is
    a real value is a multiply-accumulate (``Effective_MACs``); ``dense_macs`` counts every weight use,
    zero inputs included (NeuroBench's ``Dense``). hq_ptq adds ``shifts``: a power-of-two weight on a
    non-binary input, where the multiply becomes a shift (an exponent add for a float input) followed
    by the accumulate. These are the counts the layer's compute pJ are made of (:func:`layer_ops`,
    ``docs/ENERGY.md`` §8), so ``effective_acs + shifts + effective_macs`` is what the datapath runs:

    * ``spike``: ``rate·macs`` accumulates;
    * ``count``: ``mean|x|·macs`` accumulates (a value k is k spikes), or for power-of-two weights
      ``rate·macs`` shift-and-adds when that is cheaper;
    * ``mac``: ``macs`` multiply-accumulates (dense: a float input is not skipped), or ``macs``
      shift-and-adds for power-of-two weights.

    Args:
        dense_macs: Every weight times every input position, per inference.
        effective_acs: Accumulates.
        effective_macs: Multiply-accumulates (each holds one multiply).
        shifts: Shift-and-adds (each replaces one multiply-accumulate).
    """

    dense_macs: float
    effective_acs: float
    effective_macs: float
    shifts: float

    @property
    def synops(self) -> float:
        """All effective synaptic operations: ``effective_acs + shifts + effective_macs``."""
        return self.effective_acs + self.shifts + self.effective_macs


@dataclass(frozen=True)
class LayerEnergy:
    """Energy of one layer per inference, in pJ, for the FP32 model and the quantized plan.

    ``bits``/``scheme`` are ``None`` for a layer the plan leaves in float (costed as FP32).
    ``fp32_ops``/``quant_ops`` are the operation counts each column's compute pJ are made of
    (:func:`layer_ops`); ``params`` the layer's weights (memory: ``params · 32`` or ``params · bits``).
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
    params: int = 0
    fp32_ops: LayerOps | None = None
    quant_ops: LayerOps | None = None
    # NeuroBench's own classification of this layer (LayerActivity.neurobench_spiking / _effective)
    neurobench_spiking: bool = False
    neurobench_effective: float = 0.0

    @property
    def fp32_weight_bits(self) -> int:
        """Weight memory of the FP32 layer: ``params · 32`` bits."""
        return self.params * FP_BITS

    @property
    def quant_weight_bits(self) -> int:
        """Weight memory at the plan's bits (32 for a layer the plan leaves in float)."""
        return self.params * (FP_BITS if self.bits is None else self.bits)

    @property
    def fp32_pj(self) -> float:
        """FP32 compute + memory."""
        return self.fp32_compute_pj + self.fp32_memory_pj

    @property
    def quant_pj(self) -> float:
        """Quantized compute + memory."""
        return self.quant_compute_pj + self.quant_memory_pj

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the totals and the weight memory."""
        return {**asdict(self), "fp32_pj": self.fp32_pj, "quant_pj": self.quant_pj,
                "fp32_weight_bits": self.fp32_weight_bits, "quant_weight_bits": self.quant_weight_bits}


@dataclass(frozen=True)
class EnergyReport:
    """Per-layer and total energy per inference (pJ), FP32 against the quantized plan."""

    layers: tuple[LayerEnergy, ...]
    constants: EnergyConstants = HOROWITZ_45NM
    time_steps: int = 1
    # spiking-neuron name → membrane elements per sample (Activity.neurons); None when not measured
    neurons: tuple[tuple[str, int], ...] | None = None
    membrane_bits: int = MEMBRANE_BITS

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

    def operations(self) -> dict[str, Any]:
        """Operation counts and memory per inference, in NeuroBench's terms (``docs/ENERGY.md`` §8).

        ``fp32`` / ``quantized``: the effective synaptic operations each column's compute pJ are made of
        (sums of the layers' :class:`LayerOps`), ``Dense`` every weight use. ``neurobench``: the same
        activity classified as NeuroBench does, by input alone (binary or ternary input: AC, any other:
        MAC; zero inputs skipped in both). Memory: weights at 32 bits against the plan's bits, and the
        neuron state (membrane elements × 32 bits for FP32, × ``membrane_bits`` for the quantized
        column), ``None`` when the neurons were not counted.
        """

        def column(attr: str) -> dict[str, float]:
            ops = [getattr(layer, attr) for layer in self.layers if getattr(layer, attr) is not None]
            return {
                "Effective_ACs": math.fsum(o.effective_acs for o in ops),
                "Effective_MACs": math.fsum(o.effective_macs for o in ops),
                "shifts": math.fsum(o.shifts for o in ops),
                "synops": math.fsum(o.synops for o in ops),
            }

        nb_acs = math.fsum(layer.neurobench_effective for layer in self.layers if layer.neurobench_spiking)
        nb_macs = math.fsum(layer.neurobench_effective for layer in self.layers
                          if not layer.neurobench_spiking)
        state = None
        if self.neurons is not None:
            elements = sum(n for _, n in self.neurons)
            state = {
                "elements": elements,
                "fp32_bits": elements * FP_BITS,
                "quant_bits": elements * self.membrane_bits,
                "membrane_bits": self.membrane_bits,
                "neurons": dict(self.neurons),
            }
        return {
            "unit": "operations per inference (one sample, all T steps); memory in bits",
            "Dense": self._sum("macs"),
            "fp32": column("fp32_ops"),
            "quantized": column("quant_ops"),
            "neurobench": {"Effective_ACs": nb_acs, "Effective_MACs": nb_macs},
            "weight_memory_bits": {
                "fp32": sum(layer.fp32_weight_bits for layer in self.layers),
                "quantized": sum(layer.quant_weight_bits for layer in self.layers),
            },
            "neuron_state_memory_bits": state,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: totals, operations, constants, conventions and one entry per layer."""
        return {
            "unit": "pJ per inference",
            "time_steps": self.time_steps,
            "totals": self.totals(),
            "operations": self.operations(),
            "constants": asdict(self.constants),
            "conventions": {
                "accumulate": "spike: rate*MACs, count: mean|x|*MACs; fp32 add (FP32) or int add at b bits",
                "int_add": "linear in bits through (8, int_add_8) and (32, int_add_32)",
                "count_pot": "min(mean|x|*MACs int adds, rate*MACs (shift + int add)) at b bits",
                "mac_layers": "uniform: float32 MAC per dense MAC (activations stay float); "
                "pot: int add at the 8-bit float exponent + fp32 add",
                "weight_reads": "each weight read once per time step its layer runs, at 32 or b bits",
            },
            "layers": [layer.to_dict() for layer in self.layers],
        }


def _shifts(scheme: str | None) -> bool:
    """True when ``scheme`` stores power-of-two weights (a multiply by one is a shift or exponent add)."""
    if scheme is None:
        return False
    from hq_ptq.schemes import SCHEMES

    return SCHEMES[scheme].codes == "pot" if scheme in SCHEMES else scheme == "pot"


def op_energy(kind: str, bits: int | None, constants: EnergyConstants = HOROWITZ_45NM) -> dict[str, float]:
    """pJ of one operation of each type in a ``kind`` layer at ``bits`` (``None``: float32).

    ``"ac"``: an accumulate, ``fp32_add`` (float) or ``int_add(b)``. ``"mac"``: a multiply-accumulate,
    ``fp32_mac`` in both columns (a uniform weight times a float activation stays a float multiply).
    ``"shift"``: a shift-and-add replacing a multiply-accumulate: on a ``mac`` layer (float input) an
    exponent add ``int_add(8)`` plus ``fp32_add``; on a ``count`` layer ``shift(b) + int_add(b)``. A
    float32 layer has no shifts (its entry is still given, for completeness).
    """
    c = constants
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "mac":
        shift = c.int_add(FP32_EXPONENT_BITS) + c.fp32_add
    else:
        b = FP_BITS if bits is None else bits
        shift = c.shift(b) + c.int_add(b)
    return {"ac": c.fp32_add if bits is None else c.int_add(bits), "shift": shift, "mac": c.fp32_mac}


def layer_ops(
    act: LayerActivity,
    scheme: str | None,
    bits: int | None,
    constants: EnergyConstants = HOROWITZ_45NM,
) -> LayerOps:
    """The synaptic operations one layer runs per inference, at ``(scheme, bits)`` (``bits=None``: float32).

    With ``ops`` as in :class:`LayerActivity` (``docs/ENERGY.md`` §2 and §8):

    * ``spike``: ``rate·macs`` accumulates, whatever the scheme.
    * ``count`` (inputs 0..k): ``mean|x|·macs`` accumulates (a value k is k spikes); power-of-two
      weights: ``rate·macs`` shift-and-adds instead when those cost less (the hardware takes the
      cheaper datapath per layer, so ``constants`` matter here).
    * ``mac`` (real inputs): ``macs`` multiply-accumulates (dense, float32 in both columns); power-of-two
      weights: ``macs`` shift-and-adds (exponent add + float accumulate).

    A ``scheme`` of ``None`` with bits is uniform.
    """
    kind = act.kind
    macs, nonzero, accumulates = act.macs, act.rate * act.macs, act.ops
    if kind == "mac":
        if bits is not None and _shifts(scheme):
            return LayerOps(macs, 0.0, 0.0, macs)
        return LayerOps(macs, 0.0, macs, 0.0)
    if kind == "count" and bits is not None and _shifts(scheme):
        # a PoT weight can still be accumulated k times; the cheaper datapath wins (ties: accumulate)
        unit = op_energy(kind, bits, constants)
        if nonzero * unit["shift"] < accumulates * unit["ac"]:
            return LayerOps(macs, 0.0, 0.0, nonzero)
    return LayerOps(macs, accumulates, 0.0, 0.0)


def layer_cost(
    act: LayerActivity,
    scheme: str | None,
    bits: int | None,
    constants: EnergyConstants = HOROWITZ_45NM,
) -> tuple[float, float]:
    """``(compute_pj, memory_pj)`` of one layer per inference: the one cost model of hq_ptq.

    Compute is the operation counts of :func:`layer_ops` times the energy of each operation
    (:func:`op_energy`), so the counts a report gives and the pJ it gives never disagree:

    * ``spike``: ``rate·macs`` accumulates at ``int_add(b)``, whatever the scheme.
    * ``count`` (inputs 0..k): uniform: ``mean|x|·macs`` accumulates (a value k is k spikes);
      power-of-two: the cheaper of that and one shift-and-add per nonzero input,
      ``rate·macs·(shift(b) + int_add(b))`` (the count shifted by the weight's exponent).
    * ``mac`` (real inputs): uniform: ``macs`` float32 MACs (activations stay float); power-of-two: ``macs``
      exponent adds at ``int_add(8)`` (the float32 exponent field) plus a float32 accumulate.

    ``bits=None`` is the float32 layer (``fp32_add`` per accumulate, ``fp32_mac`` per MAC). Memory is
    ``params·steps`` weight reads at ``b`` bits (32 for float), whatever the scheme. A ``scheme`` of
    ``None`` with bits is costed as uniform.
    """
    ops = layer_ops(act, scheme, bits, constants)
    return _compute_pj(ops, act.kind, bits, constants), _memory_pj(act, bits, constants)


def _compute_pj(ops: LayerOps, kind: str, bits: int | None, constants: EnergyConstants) -> float:
    unit = op_energy(kind, bits, constants)
    return math.fsum((ops.effective_acs * unit["ac"], ops.shifts * unit["shift"],
                      ops.effective_macs * unit["mac"]))


def _memory_pj(act: LayerActivity, bits: int | None, constants: EnergyConstants) -> float:
    return act.params * act.steps * constants.weight_read(FP_BITS if bits is None else bits)


def candidate_energy(
    activity: Mapping[str, LayerActivity],
    candidates: Mapping[str, Iterable[tuple[str, int]]],
    constants: EnergyConstants = HOROWITZ_45NM,
) -> dict[str, dict[tuple[str, int], float]]:
    """pJ per inference of every ``(scheme, bits)`` candidate of every layer, by :func:`layer_cost`.

    The energy table the search's energy budget takes (:func:`hq_ptq.search.allocate`).

    Raises:
        ValueError: a layer with no measured activity.
    """
    missing = [n for n in candidates if n not in activity]
    if missing:
        raise ValueError(f"no measured activity for layers {', '.join(missing[:5])}; measure the same model")
    return {
        name: {(s, b): math.fsum(layer_cost(activity[name], s, b, constants)) for s, b in cands}
        for name, cands in candidates.items()
    }


def input_layout(batch: Any) -> bool | None:
    """``time_first`` for :func:`measure_activity` on ``(inputs, targets)`` batches like ``batch``.

    False when the inputs tensor is batch-first (its first dimension is the targets' batch size), True when
    only its second is, None when the inputs are not one tensor (the energy model does not apply).
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        return None
    inputs, targets = batch
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor) or inputs.dim() == 0:
        return None
    b = targets.shape[0] if targets.dim() else 1
    if inputs.shape[0] == b:
        return False
    if inputs.dim() > 1 and inputs.shape[1] == b:
        return True
    return None


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
    *,
    membrane_bits: int = MEMBRANE_BITS,
    neurons: Mapping[str, int] | None = None,
) -> EnergyReport:
    """Energy per inference of the FP32 model and of the quantized plan.

    Per layer (``ops`` and ``weight_reads = params · steps`` from :class:`LayerActivity`):

    * FP32: ``ops · fp32_add`` (spike/count) or ``macs · fp32_mac`` (mac), plus
      ``weight_reads · 32 · sram_read_bit``.
    * quantized at (scheme, b bits): :func:`layer_cost`, the same function the search's energy budget
      uses. A layer without bits is costed as FP32; a ``{layer: bits}`` entry takes the scheme the
      measured layer carries, uniform if none.

    Args:
        activity: From :func:`measure_activity`.
        plan_or_bits: A :class:`~hq_ptq.plan.Plan`, ``{layer: bits}``, or ``None`` to use the bits the
            measured hq_ptq layers carried.
        constants: Energy per operation.
        membrane_bits: Width of one stored membrane potential in the quantized column's neuron-state
            memory (the FP32 column always uses 32); an integer neuron datapath passes e.g. 16.
        neurons: Neuron name → membrane elements per sample; default: ``activity.neurons`` when the
            activity comes from :func:`measure_activity`, else the neuron state is reported as unknown.

    Returns:
        An :class:`EnergyReport`; its per-layer :class:`LayerOps` are the counts the compute pJ are
        made of, and :meth:`EnergyReport.operations` their totals and the memory in bits.

    Raises:
        ValueError: Empty activity, a planned layer that was not measured, or bits outside 1..64.
    """
    if not activity:
        raise ValueError("activity is empty; run measure_activity on the model first")
    _check_bits(membrane_bits, "membrane_bits")
    if neurons is None:
        neurons = getattr(activity, "neurons", None)
    neuron_state = None
    if neurons is not None:
        bad = [n for n, e in neurons.items() if isinstance(e, bool) or not isinstance(e, int) or e < 0]
        if bad:
            raise ValueError(f"neurons: membrane elements must be integers >= 0, got {bad[0]!r}: "
                             f"{neurons[bad[0]]!r}")
        neuron_state = tuple((str(n), int(e)) for n, e in neurons.items())
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

    layers = []
    for name, act in activity.items():
        bits, scheme = bits_map.get(name, (None, None))
        if bits is None:
            scheme = None
        # the counts first; the pJ are those counts times the energy per operation (layer_cost)
        fp_ops = layer_ops(act, None, None, constants)
        q_ops = layer_ops(act, scheme, bits, constants)
        layers.append(LayerEnergy(
            name=name, kind=act.kind, bits=None if bits is None else int(bits), scheme=scheme, macs=act.macs,
            ops=act.ops, weight_reads=act.params * act.steps,
            fp32_compute_pj=_compute_pj(fp_ops, act.kind, None, constants),
            fp32_memory_pj=_memory_pj(act, None, constants),
            quant_compute_pj=_compute_pj(q_ops, act.kind, bits, constants),
            quant_memory_pj=_memory_pj(act, bits, constants),
            params=act.params, fp32_ops=fp_ops, quant_ops=q_ops,
            neurobench_spiking=act.neurobench_spiking, neurobench_effective=act.neurobench_effective,
        ))
    time_steps = max(a.time_steps for a in activity.values())
    return EnergyReport(layers=tuple(layers), constants=constants, time_steps=time_steps,
                        neurons=neuron_state, membrane_bits=int(membrane_bits))
