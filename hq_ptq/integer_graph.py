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
(it moves the exponent), ``Floor`` is an arithmetic right shift, a mean must be over a power-of-two count.
A constant that is not dyadic, an op outside the small set integer graphs use, or an int64 overflow is
refused with the node's name. The export checks that onnxruntime and this runner give the eager integer
model's outputs bit for bit, and the same spikes.
"""

from __future__ import annotations

import json
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
            float32 Conv of the graph would round), or the check failed.
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


def _ints(x: Any) -> list[int]:
    return [int(v) for v in np.asarray(x.m if isinstance(x, _Dyadic) else x).reshape(-1)]


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
        shaped = _Dyadic(bias.m.reshape([1, -1] + [1] * nd), bias.e)
        (a, b), e = _align(out, shaped)
        out = _Dyadic(a + b, e)
    return out


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _run_node(op: str, ins: list[Any], attrs: dict[str, Any], where: str) -> list[Any]:  # noqa: C901, PLR0911, PLR0912
    """One node on dyadic (or boolean) tensors; returns its outputs."""
    x = ins[0] if ins else None
    if op in ("Add", "Sub"):
        (a, b), e = _align(*ins)
        return [_Dyadic(a + b if op == "Add" else a - b, e)]
    if op == "Mul":
        a, b = ins
        return [_normal(a.m * b.m, a.e + b.e)]
    if op == "Div":
        a, d = ins
        sign, k = _pow2_divisor(d, where)
        top = max(int(k.max()), 0)
        m = a.m * sign * (np.int64(1) << (top - k))  # m / 2^k == m * 2^(top-k) / 2^top
        e = a.e + top
        return [_normal(m, e) if e >= 0 else _Dyadic(_shl(m, -e), 0)]
    if op == "Floor":
        return [_Dyadic(x.m >> x.e, 0)]
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
        to = attrs["to"]
        if isinstance(x, np.ndarray) and x.dtype == np.bool_:
            return [x if to == onnx.TensorProto.BOOL else _Dyadic(x.astype(np.int64), 0)]
        if to == onnx.TensorProto.BOOL:
            return [x.m != 0]
        if to in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            if to == onnx.TensorProto.FLOAT and np.any(np.abs(x.m) >= EXACT_FLOAT32):
                raise ValueError(f"{where}: a float32 cast of a value whose mantissa reaches 2^24")
            return [x]
        if x.e:
            raise ValueError(f"{where}: an integer cast of a fixed-point value")
        return [x]
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
        return [_conv(ins[0], ins[1], ins[2] if len(ins) > 2 else None, attrs)]
    if op == "MatMul":
        a, b = ins
        return [_Dyadic(np.matmul(a.m, b.m), a.e + b.e)]
    if op == "Gemm":
        a, b = ins[0], ins[1]
        am = a.m.T if attrs.get("transA") else a.m
        bm = b.m.T if attrs.get("transB") else b.m
        if attrs.get("alpha", 1.0) != 1.0 or (len(ins) > 2 and attrs.get("beta", 1.0) != 1.0):
            raise ValueError(f"{where}: Gemm with alpha/beta other than 1")
        out = _Dyadic(am @ bm, a.e + b.e)
        if len(ins) > 2:
            (p, q), e = _align(out, ins[2])
            out = _Dyadic(p + q, e)
        return [out]
    if op == "MaxPool":
        return [_Dyadic(_maxpool(x.m, attrs), x.e)]
    if op in ("ReduceMean", "ReduceSum", "ReduceMax"):
        axes = attrs.get("axes")
        if axes is None and len(ins) > 1:
            axes = _ints(ins[1])
        axes = tuple(range(x.m.ndim)) if not axes else tuple(a % x.m.ndim for a in axes)
        keep = bool(attrs.get("keepdims", 1))
        if op == "ReduceMax":
            return [_Dyadic(x.m.max(axis=axes, keepdims=keep), x.e)]
        total = x.m.sum(axis=axes, keepdims=keep)
        if op == "ReduceSum":
            return [_Dyadic(total, x.e)]
        count = int(np.prod([x.m.shape[a] for a in axes]))
        if count & (count - 1):
            raise ValueError(f"{where}: a mean over {count} elements, not a power of two")
        return [_normal(total, x.e + count.bit_length() - 1)]
    if op == "Pow":
        base, expo = ins
        if expo.e or not np.all(base.m == (2 << base.e)):
            raise ValueError(f"{where}: Pow other than 2^integer")
        k = expo.m
        top = max(int(-k.min()), 0)
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
    if op == "Flatten":
        axis = attrs.get("axis", 1) % max(x.m.ndim, 1)
        return [_Dyadic(x.m.reshape(int(np.prod(x.m.shape[:axis])), -1), x.e)]
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
        idx = np.asarray(ins[1].m)
        return [_Dyadic(np.take(x.m, idx, axis=attrs.get("axis", 0)), x.e)]
    if op == "Expand":
        shape = _ints(ins[1])
        return [_Dyadic(x.m * np.ones(shape, dtype=np.int64), x.e)]
    if op == "ConstantOfShape":
        value = attrs.get("value")
        fill = _from_float(numpy_helper.to_array(value), where) if value is not None else _Dyadic(np.zeros(1))
        return [_Dyadic(np.full(_ints(x), fill.m.reshape(-1)[0], dtype=np.int64), fill.e)]
    raise ValueError(f"{where}: op {op} is not supported by the integer runner")


def run_integer_graph(
    model: onnx.ModelProto | str | os.PathLike[str], inputs: list[np.ndarray], *, extra: list[str] = ()
) -> dict[str, np.ndarray]:
    """Run an integer graph from :func:`export_integer_qonnx` with integer arithmetic only.

    ``inputs`` are the graph inputs in order (event counts or fixed-point values; each must be dyadic).
    Returns ``{name: values}`` (float64, exact) for every graph output and every name in ``extra`` (e.g. the
    spike tensors listed in the file's ``hq_ptq`` metadata).
    """
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    graph = proto.graph
    env: dict[str, Any] = {"": None}
    for init in graph.initializer:
        env[init.name] = _from_float(numpy_helper.to_array(init), f"initializer {init.name}")
    names = [i.name for i in graph.input if i.name not in env]
    if len(names) != len(inputs):
        raise ValueError(f"the graph takes {len(names)} inputs ({names}), got {len(inputs)}")
    for name, value in zip(names, inputs, strict=True):
        env[name] = _from_float(value, f"input {name}", MAX_INPUT_FRAC)  # as integerize reads its inputs
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
            except OverflowError as err:
                raise ValueError(f"{where}: {err}") from None
        for name, value in zip(node.output, outs, strict=False):
            env[name] = value
    wanted = [o.name for o in graph.output] + [n for n in extra if n not in {o.name for o in graph.output}]
    result = {}
    for name in wanted:
        value = env[name]
        result[name] = value.astype(np.float64) if isinstance(value, np.ndarray) else value.value()
    return result
