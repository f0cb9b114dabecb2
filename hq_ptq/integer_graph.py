"""The integer model of :func:`hq_ptq.integerize` as a QONNX graph, and a pure-integer NumPy runner for it.

:func:`export_integer_qonnx` traces the integer model (the whole forward unrolled, as ``export_qonnx``'s
``"unrolled"`` mode) into standard ONNX ops that onnxruntime runs, with every integer tensor annotated with
its QONNX datatype (``quantization_annotation``, ``finn_datatype``):

* weights: the integer codes, ``INTn`` (n the narrowest signed width that holds them; a power-of-two layer's
  codes ``±2^j`` need ``j + 2`` bits); per-channel requantization multipliers, biases (``INTn``) and shift
  divisors ``2^S`` (``UINT``);
* accumulators and neuron input currents (``INT25``: a float32 container holds integers below 2^24 exactly,
  which the export checks on the model's eager runs);
* membrane potentials, the state, at the neuron's width (``INT16`` for ``membrane_bits=16``), and each
  neuron's threshold ``2^K`` at the same width;
* spikes, ``BINARY``.

Tensors that carry fixed-point values between layers (a residual stream, the logits ``y / 2^f``) are not
annotated: they are dyadic numbers, not integers. Containers are float32 (float64 for the requantization,
where products pass 2^24), so the file runs in onnxruntime as it is; a compiler reads the annotations.

:func:`run_integer_graph` is the reference for that file: it executes the graph node by node in NumPy with
integer arithmetic only, every tensor an int64 mantissa ``m`` and a power-of-two exponent ``e`` (value
``m / 2^e``). Sums align exponents by shifting, products add them, a division must be by a power of two
(it moves the exponent), ``Floor`` is an arithmetic right shift, ``Round`` rounds half to even (as torch and
onnxruntime), a mean must be over a power-of-two count, a cast must be exact in its target type. A constant
that is not dyadic, an op outside the small set integer graphs use, or an op whose result may pass int64
(bounded before it runs: ``max|a| * max|b| * K`` for a K-term dot product, ``max|a| + max|b|`` for a sum)
is refused with the node's name; so is an input whose shape is not the declared one. The export checks that
onnxruntime and this runner give the eager integer model's outputs bit for bit, and the same spikes.

A membrane a per-step neuron hands back to the model is in the float neuron's units, ``m * threshold / 2^k``.
Handed back to the neuron unchanged (``spk, mem = lif(cur, mem)``) it stays an integer in the graph; where
the graph reads it otherwise (an output, a detached copy) it must be a fixed-point number, so a threshold
such as 0.8 is refused up front, naming the neuron.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from hq_ptq.files import atomic_write
from hq_ptq.integer import MAX_INPUT_FRAC, IntegerLIF, IntegerSynapse, _np_accumulate, _np_windows
from hq_ptq.model_io import tensors
from hq_ptq.snn import reset_states

__all__ = ["export_integer_qonnx", "run_integer_graph"]

OPSET = 17
MAX_EXPONENT = 32  # fractional bits a graph constant may have (the graph's own are a few: 2^-f, 0.125 ...)
EXACT_FLOAT32 = 2**24


# ---- export ------------------------------------------------------------------------------------------------


def _is_integer_model(model: nn.Module) -> bool:
    return any(isinstance(m, (IntegerSynapse, IntegerLIF)) for m in model.modules())


def _as_args(example_input: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_input):
        return tuple(example_input)
    raise ValueError(
        "the integer graph takes a tensor or a tuple/list of tensors as example_input "
        f"(got {type(example_input).__name__})"
    )


def _eager(model: nn.Module, args: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    reset_states(model)
    with torch.no_grad():
        out = model(*args)
    reset_states(model)
    return [t.detach().double().numpy() for t in tensors(out)]


def _strip_tags(proto: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """Remove the ``hq_ptq::Tag`` nodes (rewiring their consumers to the tagged tensor); returns
    ``{tensor: (kind, datatype)}``."""
    graph = proto.graph
    tags: dict[str, tuple[str, str]] = {}
    rename: dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.domain == "hq_ptq" and node.op_type == "Tag":
            attrs = {a.name: a.s.decode() for a in node.attribute}
            source = rename.get(node.input[0], node.input[0])
            rename[node.output[0]] = source
            tags[source] = (attrs["kind"], attrs["dtype"])
        else:
            kept.append(node)
    outputs = {o.name for o in graph.output}
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    identities = []
    for out in outputs & set(rename):  # a tagged graph output keeps its name through an Identity
        identities.append(onnx.helper.make_node("Identity", [rename[out]], [out], name=f"tag_{out}"))
    del graph.node[:]
    graph.node.extend(kept + identities)
    keep = [o for o in proto.opset_import if o.domain != "hq_ptq"]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    return tags


def export_integer_qonnx(
    model: nn.Module, example_input: Any, path: str | os.PathLike[str], *, check: bool = True
) -> Path:
    """Write an :func:`hq_ptq.integerize` model as an integer QONNX graph (see the module docstring).

    Args:
        model: the integer model (its ``IntegerSynapse``/``IntegerLIF`` layers), called as ``model(x)`` or
            ``model(*x)``; every output tensor becomes a graph output, in order.
        example_input: a tensor or a tuple/list of tensors, with the shapes the graph will run (the whole
            forward is unrolled, as ``export_qonnx``'s ``"unrolled"`` mode).
        path: the ``.onnx`` file; parent folders are created, the write is atomic.
        check: run the file in onnxruntime and in :func:`run_integer_graph` on ``example_input`` and raise
            unless both give the eager model's outputs bit for bit and the same spikes.

    Raises:
        ValueError: ``model`` is not an integer model, an accumulator reached 2^24 on the eager run (the
            float32 Conv of the graph would round), the graph reads a membrane in float units that are not
            fixed point (a threshold that is not a power of two; the neuron named), or the check failed.
    """
    if not _is_integer_model(model):
        raise ValueError(
            "export_integer_qonnx needs an integer model: call hq_ptq.integerize(model, calib) first"
        )
    args = _as_args(example_input)
    training = model.training
    model.eval()
    try:
        synapses = [m for m in model.modules() if isinstance(m, IntegerSynapse)]
        for m in synapses:
            m.acc_peak = 0.0
        want = _eager(model, args)
        over = [m.name for m in synapses if m.acc_peak >= EXACT_FLOAT32]
        if over:
            raise ValueError(f"accumulators of {over} reach 2^24 on example_input; the graph's float32 Conv "
                             "would round them (use narrower weights or inputs)")
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings about Python values baked in
            raw = Path(tmp) / "integer.onnx"
            reset_states(model)
            torch.onnx.export(model, args, str(raw), opset_version=OPSET, dynamo=False,
                              do_constant_folding=True,
                              input_names=[f"input_{i}" for i in range(len(args))],
                              output_names=[f"output_{i}" for i in range(len(want))])
            reset_states(model)
            proto = onnx.load(str(raw))
    finally:
        model.train(training)
    tags = _strip_tags(proto)
    _prune(proto)
    _refuse_float_units(proto, tags, model)
    tags = {name: tag for name, tag in tags.items() if tag[0] != "float_units"}
    proto = _annotate(proto, tags)
    info = {
        "format": "hq_ptq.integer_graph/1",
        "inputs": [i.name for i in proto.graph.input], "outputs": [o.name for o in proto.graph.output],
        "membrane_bits": sorted({m.bits for m in model.modules() if isinstance(m, IntegerLIF)}),
        "spikes": [name for name, (kind, _) in tags.items() if kind == "spike"],
    }
    entry = proto.metadata_props.add()
    entry.key, entry.value = "hq_ptq", json.dumps(info)
    onnx.checker.check_model(proto)
    if check:
        _check(proto, args, want, info["spikes"])
    return atomic_write(path, lambda tmp: onnx.save(proto, tmp))


def _prune(proto: onnx.ModelProto) -> None:
    """Drop the nodes no graph output needs (e.g. a float-unit membrane the model never reads)."""
    graph = proto.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))


def _float_units_fixed(lif: IntegerLIF) -> bool:
    """Whether ``m * threshold / 2^k`` is, for every membrane ``m`` of the width, a fixed-point number the
    graph carries: a constant with at most :data:`MAX_EXPONENT` fractional bits, a product exact in float32
    (the container the membrane is handed back in). Always so for a power-of-two threshold."""
    num, den = (lif.threshold / 2.0**lif.threshold_bits).as_integer_ratio()
    mag = abs(num)
    odd = mag // (mag & -mag) if mag else 0  # trailing zero bits dropped
    return odd <= 1 or (den <= 2**MAX_EXPONENT and odd << (lif.bits - 1) < EXACT_FLOAT32)


def _refuse_float_units(proto: onnx.ModelProto, tags: dict[str, tuple[str, str]], model: nn.Module) -> None:
    """Refuse, naming the neuron, a membrane the graph reads in the float neuron's units when the threshold
    makes them numbers that are not fixed point (``m * 0.8 / 2^k``): the integer graph cannot carry those."""
    read = {o.name for o in proto.graph.output} | {i for node in proto.graph.node for i in node.input}
    lifs = {m.name: m for m in model.modules() if isinstance(m, IntegerLIF)}
    for tensor, (kind, owner) in tags.items():
        if kind != "float_units" or tensor not in read:
            continue
        lif = lifs[owner]
        if not _float_units_fixed(lif):
            raise ValueError(
                f"{owner}: hands its membrane back in float units (threshold {lif.threshold:g} is not a "
                "power of two), which an integer graph cannot carry; export the spikes only (leave the "
                "membrane out of the outputs), or use a power-of-two threshold"
            )


def _annotate(proto: onnx.ModelProto, tags: dict[str, tuple[str, str]]) -> onnx.ModelProto:
    from qonnx.core.datatype import DataType  # noqa: PLC0415 - qonnx is slow to import
    from qonnx.core.modelwrapper import ModelWrapper  # noqa: PLC0415

    wrapped = ModelWrapper(proto)
    for name, (_, dtype) in tags.items():
        wrapped.set_tensor_datatype(name, DataType[dtype])
    return wrapped.model


def _check(proto: onnx.ModelProto, args: tuple[torch.Tensor, ...], want: list[np.ndarray],
           spikes: list[str]) -> None:
    import onnxruntime as ort  # noqa: PLC0415 - only the check needs it

    feeds = {i.name: a.detach().numpy() for i, a in zip(proto.graph.input, args, strict=True)}
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    outputs = [o.name for o in proto.graph.output]
    present = {o.name for o in probe.graph.output}
    for name in spikes:
        if name not in present:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in probe.graph.output]
    got_ort = dict(zip(names, session.run(None, feeds), strict=True))
    got_ref = run_integer_graph(proto, [feeds[i.name] for i in proto.graph.input], extra=spikes)
    for k, name in enumerate(outputs):
        if not np.array_equal(got_ort[name].astype(np.float64), want[k]):
            raise ValueError(f"onnxruntime's {name} differs from the integer model's")
        if not np.array_equal(got_ref[name], want[k]):
            raise ValueError(f"the NumPy integer runner's {name} differs from the integer model's")
    for name in spikes:
        if not np.array_equal(got_ort[name].astype(np.float64), got_ref[name]):
            raise ValueError(f"spikes {name} differ between onnxruntime and the NumPy integer runner")


# ---- the pure-integer runner -----------------------------------------------------------------------------


class _Dyadic:
    """``m / 2^e`` elementwise: ``m`` an int64 array, ``e >= 0`` one exponent for the whole tensor."""

    __slots__ = ("e", "m")

    def __init__(self, m: np.ndarray, e: int = 0) -> None:
        self.m, self.e = np.asarray(m, dtype=np.int64), int(e)

    def at(self, e: int) -> np.ndarray:
        """The mantissas at exponent ``e >= self.e``."""
        return _shl(self.m, e - self.e)

    def value(self) -> np.ndarray:
        return self.m.astype(np.float64) / 2.0**self.e  # exact: every value printed is < 2^53


class _Refused(Exception):
    """A refusal from deep in the runner; :func:`run_integer_graph` prefixes it with the node's name."""


def _peak(m: np.ndarray) -> int:
    """``max |m|`` as a Python int (exact, int64's minimum included)."""
    return max(int(m.max()), -int(m.min())) if m.size else 0


def _fits(bound: int, what: str) -> None:
    """Refuse an op whose result may pass int64: ``bound`` bounds its magnitude (Python int, exact)."""
    if bound >= 2**63:
        raise OverflowError(f"int64 overflow: {what} may reach 2^{bound.bit_length() - 1}")


def _sum(a: _Dyadic, b: _Dyadic, sign: int = 1) -> _Dyadic:
    """``a + sign * b``, exponents aligned, refused where it may pass int64."""
    (p, q), e = _align(a, b)
    _fits(_peak(p) + _peak(q), "a sum")
    return _Dyadic(p + q if sign > 0 else p - q, e)


def _shl(m: np.ndarray, k: int) -> np.ndarray:
    if k == 0:
        return m
    out = m << k
    if np.any((out >> k) != m):
        raise OverflowError("int64 overflow aligning fixed-point exponents")
    return out


def _normal(m: np.ndarray, e: int) -> _Dyadic:
    """The same numbers with the smallest exponent (trailing zero bits of every mantissa dropped)."""
    if e == 0 or m.size == 0:
        return _Dyadic(m, 0 if m.size == 0 else e)
    nonzero = m[m != 0]
    if nonzero.size == 0:
        return _Dyadic(np.zeros_like(m), 0)
    low = np.bitwise_and(nonzero, -nonzero)  # lowest set bit of each mantissa
    drop = min(e, int(np.log2(low.min())))
    return _Dyadic(m >> drop, e - drop)


def _from_float(a: np.ndarray, where: str, max_exponent: int = MAX_EXPONENT) -> _Dyadic:
    """A float/int array as an exact dyadic tensor (at most ``max_exponent`` fractional bits), or a one-line
    refusal."""
    a = np.asarray(a)
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        return _Dyadic(a.astype(np.int64), 0)
    x = a.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{where}: a non-finite value is not an integer or fixed-point number")
    for e in range(max_exponent + 1):
        y = x * 2.0**e
        if np.all(y == np.round(y)):
            if np.any(np.abs(y) >= 2.0**63):
                raise OverflowError(f"{where}: a value does not fit int64 at exponent {e}")
            return _Dyadic(np.round(y).astype(np.int64), e)
    raise ValueError(
        f"{where}: a value that is not a fixed-point number (more than {max_exponent} fractional bits)"
    )


def _align(*xs: _Dyadic) -> tuple[list[np.ndarray], int]:
    e = max(x.e for x in xs)
    return [x.at(e) for x in xs], e


def _pow2_divisor(d: _Dyadic, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(sign, k)`` per element of a divisor whose every element is ``±2^k`` (k may be negative)."""
    m = d.m
    mag = np.abs(m)
    if np.any(mag == 0) or np.any(np.bitwise_and(mag, mag - 1) != 0):
        raise ValueError(f"{where}: division by a value that is not a power of two")
    return np.sign(m), np.log2(mag).astype(np.int64) - d.e


def _int_array(x: Any) -> np.ndarray:
    """The integers of a shape, axis or index operand (refused unless each is an integer)."""
    if not isinstance(x, _Dyadic):
        return np.asarray(x, dtype=np.int64)
    d = _normal(x.m, x.e)
    if d.e:
        raise _Refused("a shape, axis or index operand that is not an integer")
    return d.m


def _ints(x: Any) -> list[int]:
    return [int(v) for v in _int_array(x).reshape(-1)]


def _significant_bits(m: np.ndarray) -> int:
    """The most significant bits any mantissa has once its trailing zero bits are dropped (its odd part)."""
    if not m.size:
        return 0
    if int(m.min()) == np.iinfo(np.int64).min:
        return 1  # -2^63, a power of two
    mag = np.abs(m)
    low = np.bitwise_and(mag, -mag)  # lowest set bit (0 for 0)
    return _peak(mag // np.maximum(low, 1)).bit_length()


_FLOATS = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
           onnx.TensorProto.FLOAT16: np.float16}


def _cast(x: Any, to: int, where: str) -> Any:
    """ONNX ``Cast``, refused wherever it would round, wrap or truncate."""
    if isinstance(x, np.ndarray) and x.dtype == np.bool_:
        return x if to == onnx.TensorProto.BOOL else _Dyadic(x.astype(np.int64), 0)
    if to == onnx.TensorProto.BOOL:
        return x.m != 0
    name = onnx.TensorProto.DataType.Name(to).lower()
    if to in _FLOATS:
        # exact in the container iff every value survives the round trip; the values (below 2^53 once
        # trailing zero bits are dropped) are exact in float64 first
        v = x.value() if _significant_bits(x.m) <= 53 else None
        if v is None or not np.array_equal(v.astype(_FLOATS[to]).astype(np.float64), v):
            raise ValueError(f"{where}: a cast to {name} of a value it does not hold exactly")
        return x
    x = _normal(x.m, x.e)
    if x.e:
        raise ValueError(f"{where}: an integer cast of a fixed-point value (not an integer)")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(to)
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{where}: a cast to {name} is not supported by the integer runner")
    info = np.iinfo(dtype)
    if x.m.size and (int(x.m.min()) < info.min or int(x.m.max()) > info.max):
        raise ValueError(f"{where}: a cast to {name} of a value outside its range")
    return x


def _no_auto_pad(attrs: dict[str, Any], where: str) -> None:
    pad = attrs.get("auto_pad", b"NOTSET")
    if (pad.decode() if isinstance(pad, bytes) else pad) != "NOTSET":
        raise ValueError(f"{where}: auto_pad is not supported by the integer runner (explicit pads are)")


def _maxpool(m: np.ndarray, attrs: dict[str, Any]) -> np.ndarray:
    kernel = attrs["kernel_shape"]
    nd = len(kernel)
    strides = attrs.get("strides", [1] * nd)
    pads = attrs.get("pads", [0] * (2 * nd))
    dilations = attrs.get("dilations", [1] * nd)
    low = np.iinfo(np.int64).min
    padded = np.pad(m, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)], constant_values=low)
    win = _np_windows(padded, kernel, strides, dilations)
    return win.max(axis=tuple(range(2 + nd, 2 + 2 * nd)))


def _conv(x: _Dyadic, w: _Dyadic, bias: _Dyadic | None, attrs: dict[str, Any]) -> _Dyadic:
    nd = w.m.ndim - 2
    _fits(_peak(x.m) * _peak(w.m) * int(np.prod(w.m.shape[1:])), "a Conv accumulation")
    pads = attrs.get("pads", [0] * (2 * nd))
    if list(pads[:nd]) != list(pads[nd:]):
        raise ValueError("asymmetric Conv padding is not supported by the integer runner")
    if attrs.get("group", 1) != 1:
        raise ValueError("grouped Conv is not supported by the integer runner")
    conv = {"stride": tuple(attrs.get("strides", [1] * nd)), "padding": tuple(pads[:nd]),
            "dilation": tuple(attrs.get("dilations", [1] * nd)), "groups": 1}
    acc = _np_accumulate("conv1d" if nd == 1 else "conv2d", x.m, w.m, conv)
    out = _Dyadic(acc, x.e + w.e)
    if bias is not None:
        out = _sum(out, _Dyadic(bias.m.reshape([1, -1] + [1] * nd), bias.e))
    return out


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _run_node(op: str, ins: list[Any], attrs: dict[str, Any], where: str) -> list[Any]:  # noqa: C901, PLR0911, PLR0912
    """One node on dyadic (or boolean) tensors; returns its outputs."""
    x = ins[0] if ins else None
    if op in ("Add", "Sub"):
        return [_sum(*ins, sign=1 if op == "Add" else -1)]
    if op == "Mul":
        a, b = ins
        _fits(_peak(a.m) * _peak(b.m), "a product")
        return [_normal(a.m * b.m, a.e + b.e)]
    if op == "Div":
        a, d = ins
        sign, k = _pow2_divisor(d, where)
        top = max(int(k.max()), 0)
        _fits(_peak(a.m) << (top - int(k.min())), "a quotient at a common exponent")
        m = a.m * sign * (np.int64(1) << (top - k))  # m / 2^k == m * 2^(top-k) / 2^top
        e = a.e + top
        return [_normal(m, e) if e >= 0 else _Dyadic(_shl(m, -e), 0)]
    if op == "Floor":
        return [_Dyadic(x.m >> x.e, 0)]
    if op == "Round":  # half to even, as torch.round and onnxruntime
        if x.e == 0:
            return [x]
        q = x.m >> x.e
        r = x.m - (q << x.e)  # 0 <= r < 2^e
        half = np.int64(1) << (x.e - 1)
        return [_Dyadic(q + ((r > half) | ((r == half) & ((q & 1) == 1))), 0)]
    if op == "Neg":
        return [_Dyadic(-x.m, x.e)]
    if op == "Relu":
        return [_Dyadic(np.maximum(x.m, 0), x.e)]
    if op in ("Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual"):
        (a, b), _ = _align(*ins)
        fn: Callable[..., np.ndarray] = {"Greater": np.greater, "Less": np.less, "Equal": np.equal,
                                         "GreaterOrEqual": np.greater_equal, "LessOrEqual": np.less_equal}[op]
        return [fn(a, b)]
    if op == "Not":
        return [np.logical_not(x)]
    if op == "Where":
        cond, a, b = ins
        (ma, mb), e = _align(a, b)
        return [_Dyadic(np.where(cond, ma, mb), e)]
    if op == "Cast":
        return [_cast(x, attrs["to"], where)]
    if op == "Clip":
        lo, hi = (ins + [None, None])[1:3]
        parts = [x] + [t for t in (lo, hi) if t is not None]
        ms, e = _align(*parts)
        m = ms[0]
        if lo is not None:
            m = np.maximum(m, ms[1])
        if hi is not None:
            m = np.minimum(m, ms[-1])
        return [_Dyadic(m, e)]
    if op == "Conv":
        _no_auto_pad(attrs, where)
        return [_conv(ins[0], ins[1], ins[2] if len(ins) > 2 else None, attrs)]
    if op == "MatMul":
        a, b = ins
        _fits(_peak(a.m) * _peak(b.m) * a.m.shape[-1], "a MatMul accumulation")
        return [_Dyadic(np.matmul(a.m, b.m), a.e + b.e)]
    if op == "Gemm":
        a, b = ins[0], ins[1]
        am = a.m.T if attrs.get("transA") else a.m
        bm = b.m.T if attrs.get("transB") else b.m
        if attrs.get("alpha", 1.0) != 1.0 or (len(ins) > 2 and attrs.get("beta", 1.0) != 1.0):
            raise ValueError(f"{where}: Gemm with alpha/beta other than 1")
        _fits(_peak(am) * _peak(bm) * am.shape[-1], "a Gemm accumulation")
        out = _Dyadic(am @ bm, a.e + b.e)
        return [_sum(out, ins[2]) if len(ins) > 2 else out]
    if op == "MaxPool":
        _no_auto_pad(attrs, where)
        if attrs.get("ceil_mode", 0):
            raise ValueError(f"{where}: MaxPool with ceil_mode=1 is not supported by the integer runner")
        return [_Dyadic(_maxpool(x.m, attrs), x.e)]
    if op in ("ReduceMean", "ReduceSum", "ReduceMax"):
        axes = attrs.get("axes")
        if axes is None and len(ins) > 1:
            axes = _ints(ins[1])
        axes = tuple(range(x.m.ndim)) if not axes else tuple(a % x.m.ndim for a in axes)
        keep = bool(attrs.get("keepdims", 1))
        if op == "ReduceMax":
            return [_Dyadic(x.m.max(axis=axes, keepdims=keep), x.e)]
        count = int(np.prod([x.m.shape[a] for a in axes]))
        _fits(_peak(x.m) * count, "a sum over the reduced axes")
        total = x.m.sum(axis=axes, keepdims=keep)
        if op == "ReduceSum":
            return [_Dyadic(total, x.e)]
        if count & (count - 1):
            raise ValueError(f"{where}: a mean over {count} elements, not a power of two")
        return [_normal(total, x.e + count.bit_length() - 1)]
    if op == "Pow":
        base, expo = ins
        if expo.e or not np.all(base.m == (2 << base.e)):
            raise ValueError(f"{where}: Pow other than 2^integer")
        k = expo.m
        top = max(int(-k.min()), 0)
        _fits(1 << (int(k.max()) + top), "a power of two at a common exponent")
        return [_normal(np.int64(1) << (k + top), top)]
    # structure: the mantissas move, the exponent stays
    if op == "Shape":
        return [_Dyadic(np.array(x.m.shape, dtype=np.int64))]
    if op == "Identity":
        return [x]
    if op == "Reshape":
        shape = _ints(ins[1])
        shape = [x.m.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return [_Dyadic(x.m.reshape(shape), x.e)]
    if op == "Flatten":  # axis in [-r, r]
        axis = attrs.get("axis", 1)
        axis = axis + x.m.ndim if axis < 0 else axis
        shape = x.m.shape
        return [_Dyadic(x.m.reshape(math.prod(shape[:axis]), math.prod(shape[axis:])), x.e)]
    if op == "Transpose":
        return [_Dyadic(np.transpose(x.m, attrs.get("perm")), x.e)]
    if op in ("Squeeze", "Unsqueeze"):
        axes = attrs.get("axes") or (_ints(ins[1]) if len(ins) > 1 else None)
        if op == "Squeeze":
            m = np.squeeze(x.m) if axes is None else np.squeeze(x.m, axis=tuple(a % x.m.ndim for a in axes))
        else:
            m = x.m
            for a in sorted(a % (m.ndim + len(axes)) for a in axes):
                m = np.expand_dims(m, a)
        return [_Dyadic(m, x.e)]
    if op == "Concat":
        ms, e = _align(*ins)
        return [_Dyadic(np.concatenate(ms, axis=attrs["axis"]), e)]
    if op == "Split":
        axis = attrs.get("axis", 0)
        sizes = _ints(ins[1]) if len(ins) > 1 else attrs.get("split")
        cuts = np.cumsum(sizes)[:-1] if sizes else attrs["num_outputs"]
        return [_Dyadic(p, x.e) for p in np.split(x.m, cuts, axis=axis)]
    if op == "Slice":
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
        index = [slice(None)] * x.m.ndim
        for s, t, a, st in zip(starts, ends, axes, steps, strict=True):
            index[a % x.m.ndim] = slice(s, t, st)
        return [_Dyadic(x.m[tuple(index)], x.e)]
    if op == "Gather":
        idx = _int_array(ins[1])
        return [_Dyadic(np.take(x.m, idx, axis=attrs.get("axis", 0)), x.e)]
    if op == "Expand":
        shape = _ints(ins[1])
        return [_Dyadic(x.m * np.ones(shape, dtype=np.int64), x.e)]
    if op == "ConstantOfShape":
        value = attrs.get("value")
        fill = _from_float(numpy_helper.to_array(value), where) if value is not None else _Dyadic(np.zeros(1))
        return [_Dyadic(np.full(_ints(x), fill.m.reshape(-1)[0], dtype=np.int64), fill.e)]
    raise ValueError(f"{where}: op {op} is not supported by the integer runner")


def _check_shape(info: onnx.ValueInfoProto, shape: tuple[int, ...]) -> None:
    """Refuse an input whose shape differs from the graph's declared one (in rank or a static dimension)."""
    kind = info.type.tensor_type
    if not kind.HasField("shape"):
        return
    dims = [d.dim_value if d.HasField("dim_value") else None for d in kind.shape.dim]
    if len(dims) != len(shape) or any(d is not None and d != s for d, s in zip(dims, shape, strict=False)):
        wanted = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in kind.shape.dim]
        raise ValueError(f"input {info.name}: the graph declares shape {wanted}, got {list(shape)}")


def run_integer_graph(
    model: onnx.ModelProto | str | os.PathLike[str], inputs: list[np.ndarray], *, extra: list[str] = ()
) -> dict[str, np.ndarray]:
    """Run an integer graph from :func:`export_integer_qonnx` with integer arithmetic only.

    ``inputs`` are the graph inputs in order (event counts or fixed-point values; each must be dyadic), each
    of the shape the graph declares (its static dimensions). Returns ``{name: values}`` (float64, exact) for
    every graph output and every name in ``extra`` (e.g. the spike tensors listed in the file's ``hq_ptq``
    metadata).
    """
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    graph = proto.graph
    env: dict[str, Any] = {"": None}
    for init in graph.initializer:
        env[init.name] = _from_float(numpy_helper.to_array(init), f"initializer {init.name}")
    declared = [i for i in graph.input if i.name not in env]
    names = [i.name for i in declared]
    if len(names) != len(inputs):
        raise ValueError(f"the graph takes {len(names)} inputs ({names}), got {len(inputs)}")
    for info, value in zip(declared, inputs, strict=True):
        _check_shape(info, np.shape(value))
        env[info.name] = _from_float(value, f"input {info.name}", MAX_INPUT_FRAC)  # as integerize reads them
    for node in graph.node:
        where = f"node {node.name or node.op_type} ({node.op_type})"
        attrs = _attrs(node)
        if node.op_type == "Split":
            attrs.setdefault("num_outputs", len(node.output))  # opset < 18: equal parts, one per output
        if node.op_type == "Constant":
            outs = [_from_float(numpy_helper.to_array(attrs["value"]), where)]
        else:
            try:
                outs = _run_node(node.op_type, [env[i] for i in node.input], attrs, where)
            except (OverflowError, _Refused) as err:
                raise ValueError(f"{where}: {err}") from None
        for name, value in zip(node.output, outs, strict=False):
            env[name] = value
    wanted = [o.name for o in graph.output] + [n for n in extra if n not in {o.name for o in graph.output}]
    result = {}
    for name in wanted:
        value = env[name]
        result[name] = value.astype(np.float64) if isinstance(value, np.ndarray) else value.value()
    return result
