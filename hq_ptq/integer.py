"""Integer-only inference: :func:`integerize` turns a quantized spiking model into one whose every weight,
current, membrane and threshold is an integer, and :func:`reference_mode` runs the same integer model through
a small pure-NumPy (int64) implementation of its layers, the bit-exact reference.

What the integer model computes, layer by layer (found by probe forwards on calibration batches, which
read which layer feeds which neuron from the tensors they pass):

* **Synapse into a neuron** (a quantized Conv/Linear, optionally through a BatchNorm, whose output is the
  input current of a LIF and of nothing else): the weight is its integer codes (uniform ``c``;
  power-of-two ``±2^j``, so the product is a shift). The weight scale, BatchNorm and bias fold into one
  dyadic requantization per output channel, ``current = (acc * M_c + B_c) >> S_c`` (integer multiply,
  add, arithmetic shift), which expresses the current in the neuron's fixed-point unit.
* **LIF neuron** (``MultiStepLeaky``, or ``snn.Leaky`` called once per step, with its state inside or
  passed in and out): the membrane is a signed ``membrane_bits`` integer in units of ``threshold / 2^K``
  (so the threshold is ``2^K``; ``K`` leaves the headroom the calibration batches need, and a width too
  narrow for that saturates instead). The leak is a rounded arithmetic right shift when ``beta = 2^-k``
  (the zoo's 0.5) and a 16-bit fixed-point multiply otherwise; the reset is the float neuron's (to zero,
  or subtract the threshold, from the previous step's spike); the membrane saturates at the width. A
  membrane the neuron hands back to the model is in the float neuron's units. A neuron fed by anything
  else (a spike-by-spike attention product times a constant, a residual sum, a max-pool of a synapse's
  output) takes its input as a fixed-point number ``x * 2^f``, which it checks on every call.
* **Synapse into anything else** (the classifier head, a residual stream, a pooling layer): the same
  dyadic requantization into a fixed-point output with ``out_frac_bits`` fractional bits.
* Everything between layers (residual sums of spikes, spike-by-spike matmuls, max-pooling, means over a
  power-of-two count) runs as the model's own code on these exact integer (or fixed-point) values.

Each layer's input format ``f`` is read on the calibration batches; where the float model's input is not
fixed point but the integer model's will be (a Conv -> MaxPool -> LIF reads the pool of the conv's
fixed-point output), it is read off the integer model in a second probe. Tensors stay torch float32
(integers below 2^24 are exact in float32; that bound is checked); the integer layers compute in float64
and round nowhere but where their shifts say. What the integer path refuses, naming the module: a module
holding parameters or buffers that is not a quantized Conv/Linear, a BatchNorm or a LIF (LayerNorm, an
unused ``pos_embed``, ...); other neuron types (RLeaky, Synaptic, ...); a BatchNorm not directly behind a
quantized layer; per-channel beta or threshold, graded spikes, ``state_quant``/``inhibition``/
``reset_delay=False``; inputs that are not fixed-point numbers (real-valued pixels or sensor readings:
quantize them first).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import snntorch as snn
import torch
import torch.nn.functional as F
from torch import nn

from hq_ptq.attention import SplitMultiheadAttention
from hq_ptq.model_io import call, class_scores
from hq_ptq.schemes import quantized_weight, weight_codes
from hq_ptq.snn import (
    MultiStepLeaky,
    detached_copy,
    is_spiking_neuron,
    is_spikingjelly_neuron,
    is_spikingjelly_stateful,
    reset_states,
)
from hq_ptq.swap import layer_quant, quant_layers

__all__ = ["IntegerLIF", "IntegerReport", "IntegerSynapse", "compare", "integerize", "reference_mode",
           "save_integer"]

log = logging.getLogger(__name__)

EXACT_FLOAT32 = 2**24  # every integer of smaller magnitude is exact in float32
MAX_INPUT_FRAC = 20  # more would pass float32 reals as fixed point: 0.3f is an exact multiple of 2^-24
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _frac_bits(x: torch.Tensor, where: str) -> int:
    """Fewest fractional bits ``f`` with ``x * 2^f`` integral (at most :data:`MAX_INPUT_FRAC`)."""
    x = x.detach().double()
    for f in range(MAX_INPUT_FRAC + 1):
        y = x * 2.0**f
        if torch.equal(y, torch.round(y)):
            return f
    raise ValueError(
        f"{where} gets inputs that are not fixed-point numbers (not integers over 2^{MAX_INPUT_FRAC}); "
        "integer inference needs events, spike counts or fixed-point values there"
    )


def _fixed(x: torch.Tensor, frac: int, where: str) -> torch.Tensor:
    """``x * 2^frac`` as float64 integers; raises unless exact."""
    y = x.detach().double() * 2.0**frac
    if not torch.equal(y, torch.round(y)):
        raise ValueError(
            f"{where} gets inputs that are not fixed-point numbers with {frac} fractional bits; integer "
            "inference needs events, spike counts or fixed-point values there (quantize real-valued inputs)"
        )
    return y


def _dyadic(gain: torch.Tensor, offset: torch.Tensor, mult_bits: int) -> tuple[torch.Tensor, ...]:
    """Per-channel integers ``(M, B, S)`` with ``(acc * M + B) >> S ~= gain * acc + offset`` (rounded to
    nearest): ``M`` has ``mult_bits`` significant bits (sign apart), ``S >= 0``."""
    g = gain.double().abs().clamp_min(1e-30)
    shift = torch.clamp(torch.floor((mult_bits - 1) - torch.log2(g)), min=0, max=62)
    mult = torch.round(gain.double() * 2.0**shift)
    bias = torch.round(offset.double() * 2.0**shift) + torch.where(shift > 0, 2.0 ** (shift - 1), 0.0)
    return mult, bias, shift


def _requantize(acc: torch.Tensor, mult, bias, shift) -> torch.Tensor:
    """``floor((acc * M + B) / 2^S)``: the integer multiply-add-shift, exact in float64 below 2^53."""
    return torch.floor((acc * mult + bias) / 2.0**shift)


def _check_exact(y: torch.Tensor, where: str) -> torch.Tensor:
    if y.numel() and float(y.abs().max()) >= EXACT_FLOAT32:
        raise ValueError(f"{where}: an integer reached 2^24, beyond float32's exact range")
    return y.float()


class _Tag(torch.autograd.Function):
    """Identity in PyTorch; in a graph traced by ``torch.onnx.export`` an ``hq_ptq::Tag`` node, which
    :func:`hq_ptq.integer_graph.export_integer_qonnx` turns into a QONNX datatype annotation of the tagged
    tensor (and removes). ``dtype`` is the QONNX datatype, except for ``kind="float_units"`` (a membrane
    handed back in the float neuron's units, not annotated), where it is the neuron's name."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, kind: str, dtype: str) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def symbolic(g: Any, x: Any, kind: str, dtype: str) -> Any:
        out = g.op("hq_ptq::Tag", x, kind_s=kind, dtype_s=dtype)
        out.setType(x.type())  # an identity: the exporter's shape inference must see x's shape through it
        return out


def _tag(x: torch.Tensor, kind: str, dtype: str) -> torch.Tensor:
    """``x``, tagged with its QONNX datatype when traced for the integer graph."""
    return _Tag.apply(x, kind, dtype) if torch.jit.is_tracing() else x


def _int_type(t: torch.Tensor) -> str:
    """The narrowest QONNX signed integer type (``INTn``, n >= 2) of an integer-valued tensor."""
    top = int(t.detach().abs().max()) if t.numel() else 0
    return f"INT{max(2, top.bit_length() + 1)}"


class IntegerSynapse(nn.Module):
    """A quantized Conv1d/Conv2d/Linear with its BatchNorm folded, on integers.

    ``forward(x)`` takes fixed-point inputs (``in_frac`` fractional bits), accumulates them against the
    integer ``weight`` and requantizes each output channel: ``(acc * mult + bias) >> shift``. The result
    is the next neuron's input current in its own unit (``out_frac = None``) or a fixed-point value
    with ``out_frac`` fractional bits.
    """

    def __init__(self, kind: str, weight: torch.Tensor, conv: dict[str, Any], in_frac: int,
                 mult: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor, out_frac: int | None,
                 name: str) -> None:
        super().__init__()
        self.kind, self.conv, self.in_frac, self.out_frac, self.name = kind, conv, in_frac, out_frac, name
        self.register_buffer("weight", weight.float())  # integer codes; `weight` so model code reading
        self.register_buffer("mult", mult.double())  # layer.weight.dtype still finds float32
        self.register_buffer("bias_int", bias.double())
        self.register_buffer("shift", shift.double())
        self.reference = False
        self.acc_peak = 0.0  # largest |accumulator| of the eager runs (the graph's float32 Conv needs < 2^24)

    def extra_repr(self) -> str:
        return (f"{self.kind}, weight {tuple(self.weight.shape)} in ±{int(self.weight.abs().max())}, "
                f"in_frac={self.in_frac}, out_frac={self.out_frac}")

    def _channels(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        shape = [1] * dim
        shape[1 if self.kind != "linear" else -1] = -1
        return t.view(shape)

    def _accumulate(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, w)
        if self.kind == "conv1d":
            return F.conv1d(x, w, None, **self.conv)
        return F.conv2d(x, w, None, **self.conv)

    def _graph_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The traced form: the accumulation in float32 (onnxruntime's Conv takes nothing else; exact while
        every sum stays below 2^24, which :attr:`acc_peak` checks on the eager runs), the requantization
        in float64; every integer tensor tagged with its datatype."""
        acc = self._accumulate(x * 2.0**self.in_frac, _tag(self.weight, "weight", _int_type(self.weight)))
        acc = _tag(acc, "accumulator", "INT25").double()
        mult = _tag(self.mult, "multiplier", _int_type(self.mult))
        bias = _tag(self.bias_int, "bias", _int_type(self.bias_int))
        shift = _tag(2.0**self.shift, "shift", f"UINT{int(self.shift.max()) + 1}")
        y = torch.floor((acc * self._channels(mult, acc.dim()) + self._channels(bias, acc.dim()))
                        / self._channels(shift, acc.dim()))
        y = _tag(y, "current" if self.out_frac is None else "fixed_point", "INT25").float()
        return y if self.out_frac is None else y / 2.0**self.out_frac

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            return self._graph_forward(x)
        xi = _fixed(x, self.in_frac, self.name)
        if self.reference:
            acc = torch.from_numpy(_np_accumulate(self.kind, xi.numpy().astype(np.int64),
                                                  self.weight.numpy().astype(np.int64), self.conv))
            y = _np_requantize(acc.numpy(), *(self._channels(t, acc.dim()).numpy().astype(np.int64)
                                              for t in (self.mult, self.bias_int, self.shift)))
            y = torch.from_numpy(y.astype(np.float64))
        else:
            acc = self._accumulate(xi, self.weight.double())
            self.acc_peak = max(self.acc_peak, float(acc.abs().max()) if acc.numel() else 0.0)
            params = (self.mult, self.bias_int, self.shift)
            y = _requantize(acc, *(self._channels(t, acc.dim()) for t in params))
        if self.out_frac is not None:
            return _check_exact(y, self.name) / 2.0**self.out_frac
        return _check_exact(y, self.name)


class IntegerLIF(nn.Module):
    """A LIF on integers: multi-step (currents ``[T, ...]`` in, spikes ``[T, ...]`` out, as
    :class:`~hq_ptq.snn.MultiStepLeaky`) or per step (one ``[B, ...]`` step per call, as ``snn.Leaky``:
    ``lif(x)`` with the state inside for ``init_hidden=True``, else ``lif(x, mem) -> (spk, mem)``).

    The membrane is a signed ``bits``-bit integer whose threshold is ``2^k`` (``k = threshold_bits``).
    A fixed-point input (``in_frac`` not None) is first requantized into that unit by
    ``(x * 2^in_frac * in_mult + rounding) >> in_shift``; a current from an :class:`IntegerSynapse` is
    already in it. The leak is ``>> leak_shift`` or, when ``leak_shift`` is None, ``(m * leak_mult) >> 16``.
    A membrane the neuron returns (``return_mem``) or takes back (``mem``) is in the float neuron's units,
    ``m * threshold / 2^k``, so code around the neuron reads the values it always read. Traced for the
    integer graph, a membrane taken back exactly as this neuron handed it out skips the float units (the
    eager round trip gives the same integers back).
    """

    def __init__(self, bits: int, threshold_bits: int, leak_shift: int | None, leak_mult: int, reset: str,
                 in_frac: int | None, in_mult: int, in_shift: int, name: str, *, threshold: float = 1.0,
                 per_step: bool = False, init_hidden: bool = False, return_mem: bool = False) -> None:
        super().__init__()
        self.bits, self.threshold_bits, self.reset, self.name = bits, threshold_bits, reset, name
        self.leak_shift, self.leak_mult = leak_shift, leak_mult
        self.in_frac, self.in_mult, self.in_shift = in_frac, in_mult, in_shift
        self.threshold, self.per_step = threshold, per_step
        self.init_hidden, self.return_mem = init_hidden, return_mem
        self._half = 2.0 ** (leak_shift - 1) if leak_shift else 0.0
        self.reference = False
        self.saturated = 0  # membrane values clamped at the width on the last call
        self.state: torch.Tensor | None = None  # per step with init_hidden: the integer membrane
        # while traced, per step with explicit membranes: (the float-unit membrane handed out, its integers)
        self._handed: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset_integer_state(self) -> None:
        """Forget the membrane a per-step ``init_hidden`` neuron carries (:func:`hq_ptq.snn.reset_states`)."""
        self.state = self._handed = None

    def init_leaky(self) -> torch.Tensor:
        """snnTorch's idiom ``mem = lif.init_leaky()`` before a time loop: an empty membrane (zeros)."""
        self.state = self._handed = None
        return torch.zeros(0)

    def _to_float(self, mem: torch.Tensor) -> torch.Tensor:
        """The membrane in the float neuron's units, ``m * threshold / 2^k``; traced, tagged ``float_units``
        with the neuron's name (the integer graph's export refuses it, by name, where the threshold makes
        it a number that is not fixed point and the graph reads it)."""
        out = (mem * (self.threshold / 2.0**self.threshold_bits)).float()
        return _Tag.apply(out, "float_units", self.name) if torch.jit.is_tracing() else out

    def extra_repr(self) -> str:
        leak = f">> {self.leak_shift}" if self.leak_shift is not None else f"* {self.leak_mult} >> 16"
        return (f"bits={self.bits}, threshold=2^{self.threshold_bits}, leak {leak}, reset={self.reset}, "
                f"in_frac={self.in_frac}")

    def currents(self, x: torch.Tensor) -> torch.Tensor:
        tracing = torch.jit.is_tracing()
        if self.in_frac is None:
            return x.double() if tracing else _fixed(x, 0, self.name)
        xi = x.double() * 2.0**self.in_frac if tracing else _fixed(x, self.in_frac, self.name)
        rounding = 2.0 ** (self.in_shift - 1) if self.in_shift > 0 else 0.0
        return torch.floor((xi * self.in_mult + rounding) / 2.0**self.in_shift)

    def _step(self, mem: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One step from membrane ``mem`` (whose own spike is the pending reset) with current ``c``."""
        theta: Any = 2.0**self.threshold_bits
        if torch.jit.is_tracing():
            theta = _tag(torch.tensor(theta, dtype=torch.float64), "threshold", f"INT{self.bits}")
        spike = (mem > theta).double()
        if self.leak_shift is not None:  # rounded shift: a plain floor would bias the membrane down
            leaked = torch.floor((mem + self._half) / 2.0**self.leak_shift)
        else:
            leaked = torch.floor((mem * self.leak_mult + 2.0**15) / 2.0**16)
        if self.reset == "zero":
            leaked = leaked * (1 - spike)  # (1 - s) m then leak: equal, both are 0 after a spike
        new = leaked + c
        if self.reset == "subtract":
            new = new - spike * theta
        clamped = new.clamp(-(2.0 ** (self.bits - 1)), 2.0 ** (self.bits - 1) - 1)
        if torch.jit.is_tracing():
            return _tag(clamped, "membrane", f"INT{self.bits}"), 0
        return clamped, int((clamped != new).sum())

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None) -> Any:
        cur = self.currents(x)
        if self.per_step:
            return self._forward_step(cur, mem)
        if self.reference:
            mems, self.saturated = _np_lif(cur.numpy().astype(np.int64), self, np.zeros_like(cur[0].numpy(),
                                                                                           dtype=np.int64))
            m = torch.from_numpy(mems.astype(np.float64))
        else:
            m_t, out, self.saturated = torch.zeros_like(cur[0]), [], 0
            for c in cur.unbind(0):
                m_t, sat = self._step(m_t, c)
                self.saturated += sat
                out.append(m_t)
            m = torch.stack(out)
        spikes = _tag((m > 2.0**self.threshold_bits).float(), "spike", "BINARY")
        return (spikes, self._to_float(m)) if self.return_mem else spikes

    def _forward_step(self, cur: torch.Tensor, mem: torch.Tensor | None) -> Any:
        if self.init_hidden:
            prev = self.state
        elif self._handed is not None and mem is self._handed[0] and torch.jit.is_tracing():
            prev = self._handed[1]  # the membrane handed back as it was: the graph skips the float units
        elif mem is not None and mem.numel():  # the float-unit membrane this neuron returned last step
            prev = torch.round(mem.double() * (2.0**self.threshold_bits / self.threshold))
        else:
            prev = None
        if prev is None or prev.shape != cur.shape:
            prev = torch.zeros_like(cur)
        if self.reference:
            mems, self.saturated = _np_lif(cur.numpy().astype(np.int64)[None], self,
                                           prev.numpy().astype(np.int64))
            new = torch.from_numpy(mems[0].astype(np.float64))
        else:
            new, self.saturated = self._step(prev, cur)
        spike = _tag((new > 2.0**self.threshold_bits).float(), "spike", "BINARY")
        if self.init_hidden:
            self.state = new
            return (spike, self._to_float(new)) if self.return_mem else spike
        out = self._to_float(new)
        if torch.jit.is_tracing():
            self._handed = (out, new)
        return spike, out


# ---- the NumPy reference: int64 arithmetic only ---------------------------------------------------------


def _np_windows(x: np.ndarray, kernel, stride, dilation) -> np.ndarray:
    """``[N, C, *out_spatial, *kernel]`` views of an already padded ``[N, C, *spatial]`` array: every
    ``stride``-th window position, every ``dilation``-th tap."""
    nd = len(kernel)
    span = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True))
    win = np.lib.stride_tricks.sliding_window_view(x, span, axis=tuple(range(2, 2 + nd)))
    return win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)
               + tuple(slice(None, None, d) for d in dilation)]


def _np_accumulate(kind: str, x: np.ndarray, w: np.ndarray, conv: dict[str, Any]) -> np.ndarray:
    """Integer Conv1d/Conv2d/Linear (no bias) in int64, by sliding windows and tensordot."""
    if kind == "linear":
        return x @ w.T
    stride, padding, dilation, groups = (conv[k] for k in ("stride", "padding", "dilation", "groups"))
    if groups != 1:
        raise ValueError("the NumPy reference has no grouped convolutions")
    nd = 1 if kind == "conv1d" else 2
    stride, padding, dilation = (tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd
                                 for v in (stride, padding, dilation))
    x = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in padding])
    win = _np_windows(x, w.shape[2:], stride, dilation)
    axes_x = [1] + list(range(2 + nd, 2 + 2 * nd))
    out = np.tensordot(win, w, axes=(axes_x, [1] + list(range(2, 2 + nd))))  # [N, *spatial, C_out]
    return np.moveaxis(out, -1, 1)


def _np_requantize(acc: np.ndarray, mult: np.ndarray, bias: np.ndarray, shift: np.ndarray) -> np.ndarray:
    return (acc * mult + bias) >> shift  # numpy's >> on int64 is an arithmetic (floor) shift


def _np_lif(cur: np.ndarray, lif: IntegerLIF, mem: np.ndarray) -> tuple[np.ndarray, int]:
    """Membranes ``[T, ...]`` (int64) of the integer LIF on currents ``cur`` from membrane ``mem``."""
    lo, hi = -(1 << (lif.bits - 1)), (1 << (lif.bits - 1)) - 1
    theta = 1 << lif.threshold_bits
    out, saturated = [], 0
    for c in cur:
        spike = (mem > theta).astype(np.int64)
        if lif.leak_shift is not None:
            leaked = (mem + int(lif._half)) >> lif.leak_shift
        else:
            leaked = (mem * lif.leak_mult + (1 << 15)) >> 16
        if lif.reset == "zero":
            leaked = leaked * (1 - spike)
        mem = leaked + c
        if lif.reset == "subtract":
            mem = mem - spike * theta
        clamped = np.clip(mem, lo, hi)
        saturated += int((clamped != mem).sum())
        mem = clamped
        out.append(mem)
    return np.stack(out), saturated


@contextmanager
def reference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run every integer layer of ``model`` through the NumPy int64 reference inside the block."""
    layers = [m for m in model.modules() if isinstance(m, (IntegerSynapse, IntegerLIF))]
    for m in layers:
        m.reference = True
    try:
        yield model
    finally:
        for m in layers:
            m.reference = False


# ---- building the integer model --------------------------------------------------------------------------


@dataclass(frozen=True)
class IntegerReport:
    """What :func:`integerize` built: per neuron its threshold bits, per synapse its role."""

    membrane_bits: int
    neurons: dict[str, dict[str, Any]]
    synapses: dict[str, dict[str, Any]]


def _storage(t: Any) -> int | None:
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None


def _probe(model: nn.Module, batch: Any, watched: dict[str, nn.Module]) -> list[dict[str, Any]]:
    """One forward with hooks: per call of a watched module, its name, input and output (kept alive, so
    storages are not reused while the links between calls are read)."""
    calls: list[dict[str, Any]] = []
    handles = []
    for name, module in watched.items():
        def hook(mod, args, out, name=name):
            calls.append({"name": name, "input": args[0] if args else None, "output": out})
        handles.append(module.register_forward_hook(hook))
    try:
        reset_states(model)
        with torch.no_grad():
            call(model, batch)
    finally:
        for h in handles:
            h.remove()
        reset_states(model)
    return calls


def _float_membrane_peak(x: torch.Tensor, beta: float, threshold: float, reset: str) -> float:
    """The 99.9th percentile of |membrane| / threshold the float LIF reaches on currents ``x`` (``[T, ...]``):
    the rare larger values saturate at the width instead of costing every membrane fraction bits."""
    mem = torch.zeros_like(x[0], dtype=torch.float64)
    spike = torch.zeros_like(mem)
    seen = []
    for c in x.double().unbind(0):
        if reset == "zero":
            mem = (1 - spike) * mem
        mem = beta * mem + c - (spike * threshold if reset == "subtract" else 0)
        seen.append(mem.abs().flatten()[:: max(1, mem.numel() // 50_000)] / threshold)
        spike = (mem > threshold).double()
    return float(torch.quantile(torch.cat(seen).float(), 0.999))


def _lif_settings(neuron: nn.Module, name: str) -> tuple[float, float, str]:
    lif = neuron.lif if isinstance(neuron, MultiStepLeaky) else neuron
    if lif.state_quant or lif.inhibition or not lif.reset_delay:
        raise ValueError(f"{name}: Leaky with state_quant, inhibition or reset_delay=False is not supported")
    if lif.beta.numel() != 1 or lif.threshold.numel() != 1:
        raise ValueError(f"{name}: per-channel beta or threshold is not supported by the integer path")
    if float(lif.graded_spikes_factor) != 1.0:
        factor = float(lif.graded_spikes_factor)
        raise ValueError(f"{name}: graded spikes (factor {factor}) are not supported")
    reset = {0: "subtract", 1: "zero", 2: "none"}[int(lif.reset_mechanism_val)]
    return float(lif.beta.clamp(0, 1)), float(lif.threshold), reset


def _leak(beta: float) -> tuple[int | None, int]:
    """``(shift, mult)``: ``beta = 2^-shift`` exactly, else a 16-bit fixed-point multiplier."""
    if beta > 0:
        k = -math.log2(beta)
        if k == int(k):
            return int(k), 0
    return None, int(round(beta * 2**16))


def _fold(layer: nn.Module, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(integer weight, gain, offset)`` per output channel: the layer's output (through ``bn``) is
    ``gain * (weight_int @ x) + offset``."""
    qw = quantized_weight(layer).detach().double()
    _, scale = weight_codes(layer)
    scheme, bits = layer_quant(layer)
    step = scale.double()
    if scheme == "pot":  # levels ±scale·2^-j: the finest one is the integer unit, so the codes are ±2^i
        step = step * 2.0 ** -(2 ** (bits - 1) - 2)
    view = (-1,) + (1,) * (qw.dim() - 1)
    w_int = torch.round(qw / step.view(view))
    if not torch.allclose(w_int * step.view(view), qw, rtol=1e-6, atol=1e-12):
        what = type(layer).__name__
        raise ValueError(f"{what}: quantized weights are not integer multiples of their scale")
    gain = step.clone()
    offset = (layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(gain))
    if bn is not None:
        a = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        offset = a * (offset - bn.running_mean.double()) + bn.bias.detach().double()
        gain = gain * a
    return w_int, gain, offset


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def integerize(
    model: nn.Module,
    calib_data: Any,
    *,
    membrane_bits: int = 16,
    out_frac_bits: int = 12,
    mult_bits: int = 16,
    batches: int = 2,
) -> tuple[nn.Module, IntegerReport]:
    """An integer-only copy of a quantized model (``model`` is left unchanged) and what was built.

    Args:
        model: a model whose Conv/Linear layers hq_ptq quantized (a plan applied), with multi-step LIFs
            (:class:`hq_ptq.snn.MultiStepLeaky`; ``hq_ptq.to_multistep`` converts per-step models).
        calib_data: ``(inputs, targets)`` batches; the first ``batches`` of them show which layer feeds
            which neuron, the fixed-point format of every layer's input and each membrane's range.
        membrane_bits: signed width of every membrane (and of the currents added to it).
        out_frac_bits: fractional bits of a synapse output that does not feed a neuron (e.g. logits).
        mult_bits: significant bits of each per-channel requantization multiplier.
        batches: calibration batches probed.

    Raises:
        ValueError: the model has a module, neuron or input the integer path cannot express (named).
    """
    if membrane_bits < 4:
        raise ValueError(f"membrane_bits must be >= 4, got {membrane_bits}")
    model = detached_copy(model).eval()  # reset neurons; a plain deepcopy fails on a training step's state
    qlayers = quant_layers(model)
    if not qlayers:
        raise ValueError("integerize needs a quantized model (apply a plan first, e.g. hq_ptq.quantize)")
    transposed = [n for n, m in qlayers.items() if isinstance(m, nn.modules.conv._ConvTransposeNd)]
    if transposed:  # fake-quant export (export_qonnx without integer=True) takes them
        raise ValueError(f"{transposed[0]}: {type(qlayers[transposed[0]]).__name__} has no integer synapse "
                         "(the integer path takes quantized Linear/Conv1d/Conv2d)")
    folding = [n for n, m in qlayers.items() if getattr(m, "step_mode", "s") == "m"]
    if folding:  # an integer synapse convolves the tensor it is given; it does not fold [T, N] first
        raise ValueError(f"{folding[0]}: {type(qlayers[folding[0]]).__name__} in SpikingJelly's step_mode "
                         "'m' has no integer synapse (the integer path takes layers that see [T*B, ...] or "
                         "[B, ...])")
    neurons: dict[str, nn.Module] = {}
    for n, m in model.named_modules():
        if isinstance(m, MultiStepLeaky) or (type(m) is snn.Leaky and not any(
                n.startswith(k + ".") for k in neurons)):
            neurons[n] = m
    bns = {n: m for n, m in model.named_modules() if isinstance(m, _BN)}
    for name, m in model.named_modules():
        inside = any(name.startswith(n + ".") for n in (*neurons, *qlayers))  # their own quantizers, LIF
        if name in qlayers or name in neurons or name in bns or inside:
            continue
        if is_spiking_neuron(m) or is_spikingjelly_stateful(m):
            kind = "neurons" if is_spiking_neuron(m) or is_spikingjelly_neuron(m) else "(SpikingJelly state)"
            raise ValueError(f"{name}: {type(m).__name__} {kind} are not supported by the integer path "
                             "(snn.Leaky and MultiStepLeaky are)")
        if isinstance(m, SplitMultiheadAttention):  # its softmax has no integer form here
            raise ValueError(f"{name}: attention (softmax over q·k) is not supported by the integer path; "
                             "the fake-quant exports take it")
        own = [k for k, _ in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]]
        if own:
            what = f"{name}: {type(m).__name__}" if name else f"the model itself ({type(m).__name__})"
            raise ValueError(f"{what} holds {', '.join(own)}, which the integer path cannot express "
                             "(only quantized Conv1d/Conv2d/Linear, BatchNorm and LIF layers)")
    watched = {**qlayers, **bns, **neurons}
    batches_in = [b for _, b in zip(range(batches), calib_data)]
    if not batches_in:
        raise ValueError("integerize needs at least one calibration batch")
    in_frac: dict[str, int] = {}
    deferred: set[str] = set()
    peak: dict[str, float] = {}
    links: dict[str, str | None] = {}  # consumer -> producer (by shared storage of output and input)
    consumers: dict[str, set[str]] = {}
    for inputs, _ in batches_in:
        calls = _probe(model, inputs, watched)
        out_of: dict[int | None, str] = {}
        steps: dict[str, list[torch.Tensor]] = {}  # a per-step neuron's inputs, one per call
        for c in calls:
            name, x = c["name"], c["input"]
            out = c["output"][0] if isinstance(c["output"], tuple) else c["output"]
            producer = out_of.get(_storage(x))
            out_of[_storage(out)] = name
            if name in links and links[name] != producer:
                raise ValueError(f"{name} takes its input from different layers on different calls; the "
                                 "integer path needs one wiring")
            links[name] = producer
            if producer is not None:
                consumers.setdefault(producer, set()).add(name)
            if name in neurons and not isinstance(neurons[name], MultiStepLeaky):
                steps.setdefault(name, []).append(x)
            if name in qlayers or name in neurons:
                # a real-valued input may still become fixed point once the layers before it are integer
                # (e.g. a Conv -> MaxPool -> LIF: the pool reads the conv's fixed-point output); such
                # formats are read off the integer model below
                try:
                    in_frac[name] = max(in_frac.get(name, 0), _frac_bits(x, name))
                except ValueError:
                    deferred.add(name)
            if isinstance(neurons.get(name), MultiStepLeaky):
                beta, thr, reset = _lif_settings(neurons[name], name)
                peak[name] = max(peak.get(name, 0.0), _float_membrane_peak(x, beta, thr, reset))
        for name, xs in steps.items():
            beta, thr, reset = _lif_settings(neurons[name], name)
            if len({tuple(x.shape) for x in xs}) == 1:  # the steps of one sequence, in call order
                peak[name] = max(peak.get(name, 0.0), _float_membrane_peak(torch.stack(xs), beta, thr, reset))
            else:
                peak[name] = max(peak.get(name, 0.0), *(_float_membrane_peak(x[None], beta, thr, reset)
                                                         for x in xs))
    # chains: layer [-> bn] -> neuron, where the neuron is the only module that reads the current
    feeds: dict[str, str] = {}  # quant layer -> neuron whose current it computes
    bn_of: dict[str, str] = {}
    for bname in bns:
        src = links.get(bname)
        if src not in qlayers:
            raise ValueError(f"{bname}: a BatchNorm must follow a quantized layer directly to be folded")
        bn_of[src] = bname
    for nname in neurons:
        src = links.get(nname)
        layer = via_bn = None
        if src in bns:
            via_bn, layer = src, links[src]
        elif src in qlayers:
            layer = src
        if layer is not None and consumers.get(via_bn or layer, set()) == {nname}:
            feeds[layer] = nname
    report_neurons: dict[str, dict[str, Any]] = {}
    report_synapses: dict[str, dict[str, Any]] = {}
    units: dict[str, tuple[int, float]] = {}  # neuron -> (threshold bits K, threshold)
    for nname, neuron in neurons.items():
        if nname not in peak:
            continue  # never called on the calibration batches: left out of the integer model
        headroom = max(1, math.ceil(math.log2(max(peak[nname], 1.0))) + 1)
        k = membrane_bits - 1 - headroom
        if k < 2:  # too narrow for the range: keep 2 bits below the threshold and let the rest saturate
            log.warning("%s: %d-bit membranes keep 2 bits below the threshold and hold +-%.0fx it, less than "
                        "twice what calibration reached (%.1fx): larger membranes saturate",
                        nname, membrane_bits, 2.0 ** (membrane_bits - 3), peak[nname])
            k = 2
        units[nname] = (k, _lif_settings(neuron, nname)[1])

    def build_lif(nname: str, f_in: int | None) -> IntegerLIF:
        neuron = neurons[nname]
        beta, thr, reset = _lif_settings(neuron, nname)
        k = units[nname][0]
        leak_shift, leak_mult = _leak(beta)
        in_mult, in_shift = 1, 0
        if f_in is not None:  # x * 2^f  ->  x / thr * 2^k
            m, _, s = _dyadic(torch.tensor([2.0 ** (k - f_in) / thr]), torch.zeros(1), mult_bits)
            in_mult, in_shift = int(m), int(s)
        if isinstance(neuron, MultiStepLeaky):
            style = {"return_mem": neuron.return_mem}
        else:
            style = {"per_step": True, "init_hidden": bool(neuron.init_hidden),
                     "return_mem": bool(neuron.init_hidden and neuron.output)}
        report_neurons[nname] = {
            "threshold_bits": k, "peak_over_threshold": peak[nname], "in_frac": f_in,
            "fed_by": next((q for q, n in feeds.items() if n == nname), None),
            "leak": f"shift {leak_shift}" if leak_shift is not None else f"mult {leak_mult}",
        }
        return IntegerLIF(membrane_bits, k, leak_shift, leak_mult, reset, f_in, in_mult, in_shift, nname,
                          threshold=thr, **style)

    def build_synapse(qname: str, f: int) -> IntegerSynapse:
        layer = qlayers[qname]
        w_int, gain, offset = _fold(layer, bns[bn_of[qname]] if qname in bn_of else None)
        gain = gain * 2.0**-f  # acc is over x * 2^f
        if qname in feeds:
            k, thr = units[feeds[qname]]
            target, out_frac = 2.0**k / thr, None
        else:
            target, out_frac = 2.0**out_frac_bits, out_frac_bits
        mult, bias, shift = _dyadic(gain * target, offset * target, mult_bits)
        if isinstance(layer, nn.Linear):
            kind, conv = "linear", {}
        else:
            kind = "conv1d" if isinstance(layer, nn.Conv1d) else "conv2d"
            if layer.padding_mode != "zeros":
                raise ValueError(f"{qname}: padding_mode={layer.padding_mode!r} is not supported")
            conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
                    "groups": layer.groups}
        report_synapses[qname] = {"feeds": feeds.get(qname), "batchnorm": bn_of.get(qname), "in_frac": f,
                                  "out_frac": out_frac, "weight_max": int(w_int.abs().max()),
                                  "mult_max": int(mult.abs().max()), "shift_max": int(shift.max())}
        return IntegerSynapse(kind, w_int, conv, f, mult, bias, shift, out_frac, qname)

    fed = set(feeds.values())

    def build(name: str, f: int) -> nn.Module:
        if name in qlayers:
            return build_synapse(name, f)
        return build_lif(name, None if name in fed else f)

    probed = [n for n in (*units, *qlayers) if n in in_frac or n in deferred]
    for name in probed:  # a format not known yet starts at the widest one the layers accept
        _set(model, name, build(name, in_frac.get(name, MAX_INPUT_FRAC)))
    for qname in qlayers:
        if qname in bn_of and qname in probed:
            _set(model, bn_of[qname], nn.Identity())
    late = [n for n in probed if n in deferred and n not in fed]
    if late:  # read the formats off the integer model itself, then rebuild those layers with them
        integer_layers = {n: model.get_submodule(n) for n in late}
        for inputs, _ in batches_in:
            for c in _probe(model, inputs, integer_layers):
                in_frac[c["name"]] = max(in_frac.get(c["name"], 0), _frac_bits(c["input"], c["name"]))
        for name in late:
            _set(model, name, build(name, in_frac[name]))
    return model, IntegerReport(membrane_bits, report_neurons, report_synapses)


def compare(fake: nn.Module, integer: nn.Module, data: Any, max_batches: int | None = None,
            output_fn: Any = None) -> dict[str, Any]:
    """Accuracy of the fake-quant and the integer model on ``data`` (outputs read as scores through
    ``output_fn``, as in :func:`hq_ptq.train.evaluate`) and how often their spikes differ."""
    spikes: dict[str, list[torch.Tensor]] = {}

    def record(model: nn.Module, tag: str) -> list:
        handles = []
        for name, m in model.named_modules():
            if isinstance(m, (MultiStepLeaky, IntegerLIF)):
                handles.append(m.register_forward_hook(
                    lambda mod, a, out, key=(tag, name): spikes.setdefault(key, []).append(
                        (out[0] if isinstance(out, tuple) else out).detach())))
        return handles

    right = {"fake": 0, "integer": 0}
    total = 0
    handles = record(fake, "fake") + record(integer, "integer")
    try:
        with torch.no_grad():
            for i, (inputs, targets) in enumerate(data):
                if max_batches is not None and i >= max_batches:
                    break
                for tag, m in (("fake", fake), ("integer", integer)):
                    was = m.training
                    m.eval()
                    reset_states(m)
                    scores = class_scores(call(m, inputs), output_fn)
                    m.train(was)
                    right[tag] += int((scores.argmax(-1) == targets).sum())
                total += len(targets)
    finally:
        for h in handles:
            h.remove()
    differ = count = 0
    for (tag, name), outs in spikes.items():
        if tag == "fake" and ("integer", name) in spikes:
            for a, b in zip(outs, spikes["integer", name], strict=True):
                differ += int((a != b).sum())
                count += a.numel()
    return {"fake_accuracy": right["fake"] / total, "integer_accuracy": right["integer"] / total,
            "spike_mismatch": differ / max(count, 1), "samples": total}


def _smallest_int(t: torch.Tensor) -> torch.Tensor:
    """``t`` (integer-valued) in the narrowest signed integer dtype that holds it."""
    top = float(t.abs().max()) if t.numel() else 0.0
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        if top <= torch.iinfo(dtype).max:
            return t.to(dtype)
    raise ValueError("an integer parameter exceeds int64")


def save_integer(model: nn.Module, report: IntegerReport, path: str | os.PathLike[str]) -> Path:
    """Write the integer program of an :func:`integerize` model as safetensors: per synapse its integer
    ``weight`` (narrowest signed dtype), per-channel ``mult``/``bias``/``shift``; per neuron, in the JSON
    metadata, its width, threshold bits, leak, reset and input format. Integers only: no float tensor."""
    from safetensors.torch import save_file  # noqa: PLC0415 - only this writer needs it

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, IntegerSynapse):
            for key, t in (("weight", m.weight), ("mult", m.mult), ("bias", m.bias_int), ("shift", m.shift)):
                tensors[f"{name}.{key}"] = _smallest_int(t).contiguous()
            layers[name] = {"type": "synapse", "kind": m.kind, "in_frac": m.in_frac, "out_frac": m.out_frac,
                            "conv": {k: list(v) if isinstance(v, tuple) else v for k, v in m.conv.items()}}
        elif isinstance(m, IntegerLIF):
            layers[name] = {"type": "lif", "bits": m.bits, "threshold_bits": m.threshold_bits,
                            "leak_shift": m.leak_shift, "leak_mult": m.leak_mult, "reset": m.reset,
                            "in_frac": m.in_frac, "in_mult": m.in_mult, "in_shift": m.in_shift}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "hq_ptq.integer/1", "membrane_bits": str(report.membrane_bits),
            "layers": json.dumps(layers)}
    save_file(tensors, str(out), metadata=meta)
    return out
