"""Export quantized spiking models to QONNX and to onnxruntime-runnable ONNX, and check the files.

The QONNX file keeps the weight quantizers as nodes: uniform layers as ``Quant`` (integer, per-channel
scale, narrow range) and power-of-two layers as ``FloatQuant`` with 0 mantissa bits, which is PoT
exactly. Spiking neurons become plain ONNX ops (the Heaviside spike is ``Greater`` + ``Cast``, the reset
``Sub``/``Mul``); surrogates are switched off while tracing. The onnxruntime file is the same graph with
``Quant`` rewritten to QuantizeLinear → Clip → DequantizeLinear (QCDQ) and the PoT weights folded to
float constants holding the PoT values (onnxruntime has no ``FloatQuant``).

The model is exported as it is called (see :mod:`hq_ptq.model_io`): ``example_input`` is whatever the
model takes, a tensor of any rank and layout (``[T, B, C, H, W]``, a static ``[B, C, H, W]`` image for a
model that loops over time itself, a ``[B, L, F]`` sequence), a tuple/list of positional arguments or a
dict of keyword arguments; each tensor in it becomes a graph input (other values are baked into the
graph as constants). The outputs may be one tensor of any rank or any nesting of tuples/lists/dicts of
tensors (a snnTorch ``(spk_rec, mem_rec)`` pair): each tensor becomes a graph output, in order.

snnTorch neurons built with ``init_hidden=True`` keep their membranes between calls: every forward the
exporter runs (probe, trace, reference) starts from states reset with
:func:`hq_ptq.snn.reset_states`, the graph starts from zero membranes, and the neurons' states are put
back as they were afterwards.

Two graph layouts (``mode``):

* ``"unrolled"``: the whole forward in one graph, every input and output shape baked in (the initial
  membranes are zeros of the traced batch shape), so export with the shapes you will run. Works for
  any model, including ones that loop over time themselves around plain ``snn.Leaky`` neurons.
* ``"step"``: one time step per call, ``x_t, mem_0 … mem_{k-1} -> out_t, mem_0_next …`` with every
  neuron's membrane as an explicit input/output. Needs the time loop inside
  :class:`hq_ptq.snn.MultiStepLeaky` layers (the zoo, models converted with
  :func:`hq_ptq.snn.to_multistep`); ``time_dim`` names the input axis that is time (each input tensor
  is cut along it and the model is called on one-step slices). A model whose neurons are plain
  ``snn.Leaky`` driven by its own loop is refused before anything is written: its state lives in the
  loop, which one graph call cannot run a step of. How the per-step outputs make the model's outputs
  (its readout) is measured on the example before export, by driving the model step by step in PyTorch,
  and recorded per output: ``"mean"`` over steps (the zoo's ``head(s).mean(0)``), ``"sum"``, ``"last"``
  (the last step's output) or ``"stack"`` (per-step outputs concatenated along a time axis, e.g. a
  ``[T, B, C]`` spike record). Any other readout (a max over time, a softmax of the mean, ops that mix
  time steps) is refused with the measured error. B is baked in; T is free.

Every file carries ``metadata_props["hq_ptq"]``, a JSON object (read it with :func:`export_info`):
mode, input/output names, shapes and dtypes, the state list (``name``, ``output``, ``shape``,
``neuron``) and per-output readouts. :func:`run_export` drives either layout with qonnx or onnxruntime, and
:func:`verify_export` compares a file against the PyTorch model on fresh inputs: every output, and the
spikes of every neuron whose graph nodes it can pair with the neuron's calls. The qonnx backend keeps
qonnx's semantics (its custom ops computed by qonnx, standard ops by onnxruntime, op by op) but, for
weight-only quantizer nodes like these files hold, computes the quantized weights once and runs the rest
as one onnxruntime session; other graphs go through qonnx's node-by-node ``execute_onnx``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from hq_ptq.files import atomic_write
from hq_ptq.model_io import call, describe, rebuild, tensors
from hq_ptq.snn import (
    MultiStepLeaky,
    explicit_membranes,
    is_spiking_neuron,
    reset_states,
    spiking_neurons,
    surrogate_disabled,
)
from hq_ptq.swap import quant_layers

__all__ = [
    "BACKENDS",
    "MODES",
    "READOUTS",
    "export_info",
    "export_onnxruntime",
    "export_qonnx",
    "run_export",
    "verify_export",
]

log = logging.getLogger(__name__)

MODES = ("unrolled", "step")
BACKENDS = ("qonnx", "onnxruntime")
READOUTS = ("mean", "sum", "last", "stack")  # how a step file's per-step outputs make the model's outputs
META_KEY = "hq_ptq"
FORMAT_VERSION = 2

# qonnx custom ops that stay as nodes in the QONNX file (constant folding would bake them away)
_QUANT_OPS = frozenset({"Quant", "IntQuant", "FloatQuant", "BipolarQuant", "Trunc"})
_STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
_MODEL_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError, AssertionError)


# ---------------------------------------------------------------------------------------------
# checks


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown export mode {mode!r}; choose one of {', '.join(map(repr, MODES))}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))}")


def _check_quantized(model: nn.Module, allow_float: bool) -> None:
    if not allow_float and not quant_layers(model):
        raise ValueError(
            "model has no hq_ptq-quantized layer; quantize it first (hq_ptq.quantize or hq_ptq.apply_plan) "
            "or pass allow_float=True to export it in float"
        )


def _prepare(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor detached and on ``device``, floats as float32; the structure kept."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to(device)
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _prepare(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_prepare(v, device) for v in value)
    return value


def _check_example(model: nn.Module, x: object, what: str = "example_input") -> Any:
    """``x`` ready to be passed through :func:`hq_ptq.model_io.call`: at least one non-empty tensor."""
    found = list(tensors(x))
    if not found:
        raise ValueError(
            f"{what} must be a tensor, or a tuple/list/dict holding tensors, that the model is called "
            f"with; got {describe(x)}"
        )
    empty = [t for t in found if 0 in t.shape]
    if empty:
        raise ValueError(f"{what} {describe(x)} holds an empty tensor {tuple(empty[0].shape)}")
    return _prepare(x, _device(model))


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _reset_hook(module: nn.Module, _args: object) -> None:
    reset_states(module)


@contextmanager
def _export_state(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm running statistics), no autograd, Heaviside spikes, and every call of
    ``model`` starting from reset neuron states; restores all of it, the neurons' states included."""
    training = {m: m.training for m in model.modules()}
    # init_hidden=True neurons keep their membranes in buffers between calls: a trace would bake a
    # previous call's membranes in as constants, and a reference forward would continue from them
    saved = [(m, dict(m._buffers)) for _, m in spiking_neurons(model)]
    hook = model.register_forward_pre_hook(_reset_hook, prepend=True)
    model.eval()
    try:
        with torch.no_grad(), surrogate_disabled(model):
            yield
    finally:
        hook.remove()
        for m, buffers in saved:
            m._buffers.update(buffers)
        for m, flag in training.items():
            m.train(flag)


# ---------------------------------------------------------------------------------------------
# the structures of inputs and outputs


def _input_names(x: Any, suffix: str = "") -> list[str]:
    """Graph input names: ``x`` for one tensor, else ``x_<i>`` (``x_<key>`` for dict entries)."""
    if isinstance(x, torch.Tensor):
        return ["x" + suffix]
    names: list[str] = []

    def walk(value: Any, label: str) -> None:
        if isinstance(value, torch.Tensor):
            names.append(label)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{label}_{re.sub(r'[^0-9A-Za-z_]', '_', str(k))}")
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                walk(v, f"{label}_{i}")

    walk(x, "x")
    if len(set(names)) != len(names):
        names = [f"x_{i}" for i in range(len(names))]
    return [n + suffix for n in names]


def _output_names(outputs: Sequence[torch.Tensor], suffix: str = "") -> list[str]:
    """``logits`` for one ``[B, classes]`` float tensor, ``output`` for another single tensor, else
    ``output_<i>``."""
    if len(outputs) == 1:
        one = outputs[0]
        return [("logits" if one.dim() == 2 and one.is_floating_point() else "output") + suffix]
    return [f"output_{i}{suffix}" for i in range(len(outputs))]


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    found = list(tensors(out))
    if not found:
        raise ValueError(f"the model returns no tensor ({describe(out)}); there is nothing to export")
    return found


def _tensor_info(name: str, t: torch.Tensor | np.ndarray) -> dict[str, Any]:
    dtype = str(t.dtype).removeprefix("torch.")
    return {"name": name, "shape": list(t.shape), "dtype": dtype}


# ---------------------------------------------------------------------------------------------
# the modules that are traced


class _Flat(nn.Module):
    """``(*tensors) -> tuple of output tensors`` around a model called with any input structure."""

    def __init__(self, model: nn.Module, template: Any) -> None:
        super().__init__()
        self.model = model
        self._template = template

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_flat_outputs(call(self.model, rebuild(self._template, iter(flat)))))


class _StepGraph(nn.Module):
    """``(x_t…, mem_0 … mem_{k-1}) -> (out_t…, mem_0' … mem_{k-1}')`` around a model whose time loop
    runs in MultiStepLeaky layers.

    Calls the model on one-step slices (each input tensor unsqueezed at ``time_dim``) with each layer's
    ``initial_mem`` taken from the inputs; must run inside :func:`hq_ptq.snn.explicit_membranes` so
    ``final_mem`` is recorded.
    """

    def __init__(
        self, model: nn.Module, template: Any, time_dim: int, layers: Sequence[MultiStepLeaky]
    ) -> None:
        super().__init__()
        self.model = model
        self._template = template
        self._time_dim = time_dim
        self._layers = list(layers)  # a plain list: the layers are already registered under `model`
        self._inputs = len(list(tensors(template)))

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        xs, mems = args[: self._inputs], args[self._inputs:]
        for layer, mem in zip(self._layers, mems, strict=True):
            layer.initial_mem = mem
        steps = iter([x_t.unsqueeze(self._time_dim) for x_t in xs])
        out = _flat_outputs(call(self.model, rebuild(self._template, steps)))
        return (*out, *[layer.final_mem for layer in self._layers])


def _rejected(model: nn.Module, x: Any, err: BaseException) -> ValueError:
    channels = getattr(getattr(model, "config", None), "in_channels", None)
    if isinstance(channels, int) and isinstance(x, torch.Tensor) and x.dim() == 5 and x.shape[2] != channels:
        # a zoo model (time-first [T, B, C, H, W]): name the channel count it takes
        return ValueError(
            f"example_input has {x.shape[2]} channels (shape {tuple(x.shape)}) but the model takes "
            f"{channels}; pass [T, B, {channels}, H, W]"
        )
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors(x) if not t.is_floating_point()})
    kind = f" ({', '.join(dtypes)})" if dtypes else ""
    return ValueError(
        f"example_input {describe(x)}{kind} does not run through the model ({_one_line(err)}); pass what "
        "the model is called with (a tensor, or a tuple of its positional arguments)"
    )


def _probe(model: nn.Module, x: Any) -> tuple[Any, list[torch.Tensor]]:
    """The model's outputs on ``x`` and the tensors in them, with a one-line error when the model rejects
    ``x``."""
    try:
        out = call(model, x)
    except _MODEL_ERRORS as err:
        raise _rejected(model, x, err) from None
    return out, _flat_outputs(out)


# ---------------------------------------------------------------------------------------------
# step mode: the stateful layers, the time axis and the readout


def _time_steps(x: Any, time_dim: int) -> int:
    lengths = set()
    for t in tensors(x):
        if not -t.dim() <= time_dim < t.dim():
            raise ValueError(
                f"time_dim={time_dim} is not an axis of the input tensor {tuple(t.shape)}; give the axis "
                "that is time (mode='step' cuts every input tensor along it)"
            )
        lengths.add(int(t.shape[time_dim]))
    if len(lengths) != 1:
        raise ValueError(
            f"mode='step' cuts every input tensor along time_dim={time_dim}, but {describe(x)} has "
            f"lengths {sorted(lengths)} there; every input must have the same number of time steps"
        )
    return lengths.pop()


def _bare_neuron_error(model: nn.Module) -> ValueError | None:
    """Why ``model`` cannot be step-exported: an snnTorch neuron outside every MultiStepLeaky."""
    wrapped = {id(m.lif) for m in model.modules() if isinstance(m, MultiStepLeaky)}
    for name, neuron in spiking_neurons(model):
        if id(neuron) not in wrapped:
            return ValueError(
                f"mode='step' needs the time loop inside hq_ptq.snn.MultiStepLeaky layers, but {name!r} is a "
                f"bare snn.{type(neuron).__name__} (driven by the model's own loop, its state would stay "
                "hidden); use mode='unrolled', or hq_ptq.to_multistep for nn.Sequential models"
            )
    return None


def _step_layers(
    model: nn.Module, x: Any, time_dim: int
) -> list[tuple[str, MultiStepLeaky, tuple[int, ...]]]:
    """The stateful layers of a step export, with their membrane shapes, in call order."""
    bare = _bare_neuron_error(model)
    if bare is not None:
        raise bare
    with explicit_membranes(model) as layers:
        order: list[str] = []
        hooks = [
            layer.register_forward_hook(lambda *_, n=name: order.append(n)) for name, layer in layers
        ]
        try:
            first = rebuild(x, iter([t.narrow(time_dim, 0, 1) for t in tensors(x)]))
            _probe(model, first)
        finally:
            for h in hooks:
                h.remove()
        by_name = dict(layers)
        twice = sorted({n for n in order if order.count(n) > 1})
        if twice:
            raise ValueError(
                f"mode='step' needs each MultiStepLeaky called once per forward, but {twice[0]!r} runs "
                f"{order.count(twice[0])} times; give each call its own layer or use mode='unrolled'"
            )
        out = [(n, by_name[n], tuple(by_name[n].final_mem.shape)) for n in order]
    if not out:
        raise ValueError(
            "mode='step' found no MultiStepLeaky in the model (no state to expose); use mode='unrolled'"
        )
    return out


def _drive_steps(
    step: _StepGraph, x: Any, time_dim: int, shapes: Sequence[Sequence[int]]
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """``step`` driven over every time step of ``x`` from zero membranes, in PyTorch:
    per output the list of per-step tensors, and the final membranes."""
    device = next(tensors(x)).device
    mems = [torch.zeros(tuple(s), device=device) for s in shapes]
    flat = list(tensors(x))
    per_output: list[list[torch.Tensor]] = []
    for t in range(flat[0].shape[time_dim]):
        out = step(*[v.select(time_dim, t) for v in flat], *mems)
        outs, mems = out[: len(out) - len(mems)], list(out[len(out) - len(mems):])
        if not per_output:
            per_output = [[] for _ in outs]
        for acc, o in zip(per_output, outs, strict=True):
            acc.append(o)
    return per_output, mems


def _readout_candidates(
    full: torch.Tensor, steps: list[torch.Tensor]
) -> dict[str, tuple[torch.Tensor, int | None]]:
    """What the per-step outputs give under each readout that fits their shapes (``stack``: with its axis)."""
    step_shape, n = tuple(steps[0].shape), len(steps)
    if tuple(full.shape) == step_shape:
        stacked = torch.stack([s.double() for s in steps])
        return {"mean": (stacked.mean(0), None), "sum": (stacked.sum(0), None), "last": (stacked[-1], None)}
    if full.dim() == len(step_shape):
        axes = [d for d in range(full.dim()) if full.shape[d] != step_shape[d]]
        if len(axes) == 1 and step_shape[axes[0]] == 1 and full.shape[axes[0]] == n:
            return {"stack": (torch.cat([s.double() for s in steps], axes[0]), axes[0])}
    return {}


def _readouts(
    names: Sequence[str], full: Sequence[torch.Tensor], per_step: Sequence[list[torch.Tensor]]
) -> list[dict[str, Any]]:
    """Per output, the readout that rebuilds the model's output from its per-step outputs, or raise."""
    out = []
    for name, ref, steps in zip(names, full, per_step, strict=True):
        found = _readout_candidates(ref, steps)
        if not ref.is_floating_point() and "mean" in found:
            del found["mean"]
        ref64 = ref.double()
        tol = 1e-5 + 1e-4 * float(ref64.abs().max())
        errors = {kind: float((value - ref64).abs().max()) for kind, (value, _) in found.items()}
        fits = [kind for kind in READOUTS if kind in errors and errors[kind] <= tol]
        if not fits:
            tried = ", ".join(f"{k} {e:.3g}" for k, e in errors.items()) or (
                f"per-step shape {tuple(steps[0].shape)} vs {tuple(ref.shape)} over {len(steps)} steps"
            )
            raise ValueError(
                f"mode='step' cannot rebuild output {name!r} {tuple(ref.shape)} from its per-step outputs: "
                f"it is not their {', '.join(READOUTS)} over time ({tried}); the readout mixes time steps "
                "(e.g. a max or a softmax over T): use mode='unrolled'"
            )
        if len(fits) > 1:
            log.warning("output %r: readouts %s all fit the example; recording %r (check with verify_export "
                        "on inputs with more activity)", name, fits, fits[0])
        entry: dict[str, Any] = {"readout": fits[0]}
        if fits[0] == "stack":
            entry["axis"] = found["stack"][1]
        out.append(entry)
    return out
# ---------------------------------------------------------------------------------------------
# graph building


def _fold_constants(model: Any, keep: frozenset[str], *, custom_only: bool = False) -> int:
    """Replace every node whose inputs are all constant by initializers, in one topological pass.

    qonnx's FoldConstants re-infers shapes after each single node (about 40 s on spikformer-tiny);
    this pass evaluates standard ops with onnx's reference evaluator and qonnx custom ops with qonnx
    (at the opset version the model imports for their domain, as qonnx's executor does), and never
    touches op types in ``keep`` or nodes that produce graph outputs. ``custom_only`` folds only the
    nodes qonnx's executor would run itself (``is_custom_op``) and leaves every standard node. Returns
    the number of folded nodes (``Shape`` nodes fold once shape inference knows their input).
    """
    from onnx.reference import ReferenceEvaluator
    from qonnx.custom_op.registry import getCustomOp, is_custom_op
    from qonnx.util.basic import get_preferred_qonnx_opset

    graph = model.graph
    opsets = {o.domain: o.version for o in model.model.opset_import}
    values: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    folded = []
    for node in graph.node:
        if node.op_type in keep or any(o in graph_outputs for o in node.output):
            continue
        if custom_only and not is_custom_op(node.domain, node.op_type):
            continue
        if node.op_type == "Shape" and node.domain in _STANDARD_DOMAINS:
            shape = model.get_tensor_shape(node.input[0])
            if not shape or any(d <= 0 for d in shape):
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            start, end = attrs.get("start", 0), attrs.get("end", len(shape))
            values[node.output[0]] = np.asarray(shape[start:end], dtype=np.int64)
        elif all(i == "" or i in values for i in node.input):
            if node.domain in _STANDARD_DOMAINS:
                feeds = {i: values[i] for i in node.input if i}
                for name, arr in zip(node.output, ReferenceEvaluator(node).run(None, feeds), strict=True):
                    values[name] = np.asarray(arr)
            else:
                ctx = {i: values[i] for i in node.input if i}
                version = opsets.get(node.domain, get_preferred_qonnx_opset())
                getCustomOp(node, onnx_opset_version=version).execute_node(ctx, graph)
                for name in node.output:
                    values[name] = np.asarray(ctx[name])
        else:
            continue
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
        for name in node.output:
            model.set_initializer(name, values[name])
    return len(folded)


def _infer_shapes(model: Any) -> Any:
    """ONNX shape inference with the qonnx quantizers read as identities (they keep their input's shape).

    Does what qonnx's InferShapes does, without re-wrapping the model: each ModelWrapper checks every
    tensor's shape against a list of all ValueInfos, quadratic in the graph size (3 s per call on
    spikformer-tiny at T=4).
    """
    graph = model.model.graph
    hidden: dict[int, onnx.NodeProto] = {}
    for i, node in enumerate(graph.node):
        if node.op_type in _QUANT_OPS and node.domain not in _STANDARD_DOMAINS:
            hidden[i] = onnx.NodeProto.FromString(node.SerializeToString())
            node.CopyFrom(helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name))
    try:
        del graph.value_info[:]
        inferred = onnx.shape_inference.infer_shapes(model.model)
        graph.value_info.extend(inferred.graph.value_info)
    finally:
        for i, node in hidden.items():
            graph.node[i].CopyFrom(node)
    return model


def _transform(model: Any, *transforms: Any) -> Any:
    # qonnx's default deep copy + cleanup after every transform doubles the export time
    for tr in transforms:
        model = model.transform(tr, make_deepcopy=False, cleanup=False)
    return model


def _fold_all(model: Any, keep: frozenset[str]) -> Any:
    from qonnx.transformation.general import RemoveUnusedTensors

    _infer_shapes(model)
    for _ in range(8):  # folding a shape chain lets inference resolve the next Shape; 2-3 rounds suffice
        if not _fold_constants(model, keep):
            break
        _infer_shapes(_transform(model, RemoveUnusedTensors()))
    return model


def _clean(model: Any, keep: frozenset[str]) -> Any:
    from qonnx.transformation.general import GiveUniqueNodeNames, RemoveStaticGraphInputs, RemoveUnusedTensors

    # no GiveUniqueParameterTensors: it names the copies at random, and byte-identical re-exports help
    model = _transform(model, RemoveStaticGraphInputs())
    model = _fold_all(model, keep)
    return _infer_shapes(_transform(model, RemoveUnusedTensors(), GiveUniqueNodeNames()))


def _build_qonnx(
    model: nn.Module, example_input: Any, mode: str, dynamo: bool, allow_float: bool, time_dim: int
) -> tuple[Any, dict[str, Any]]:
    """Trace ``model`` to a cleaned qonnx ``ModelWrapper`` plus the metadata dict."""
    _check_mode(mode)
    _check_quantized(model, allow_float)
    if mode == "step" and (bare := _bare_neuron_error(model)) is not None:
        raise bare  # before running anything: the model's own loop may not even take a one-step slice
    x = _check_example(model, example_input)
    meta: dict[str, Any] = {"format": "hq_ptq-export", "format_version": FORMAT_VERSION, "mode": mode}
    config = getattr(model, "hq_config", None)
    if isinstance(config, dict):
        meta["model"] = config
    meta["quant_layers"] = {
        name: [layer.hq_scheme, layer.hq_bits] for name, layer in quant_layers(model).items()
    }
    flat_in = list(tensors(x))
    with _export_state(model):
        out, ref = _probe(model, x)
        meta["input_structure"], meta["output_structure"] = describe(x), describe(out)
        if mode == "unrolled":
            in_names, out_names = _input_names(x), _output_names(ref)
            simple = isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)
            module: nn.Module = model if simple else _Flat(model, x)
            meta.update(
                inputs=[_tensor_info(n, t) for n, t in zip(in_names, flat_in, strict=True)],
                outputs=[_tensor_info(n, t) for n, t in zip(out_names, ref, strict=True)],
                scope_prefix="" if simple else "model",
                readout="the graph outputs are the model's outputs",
            )
            _legacy_keys(meta, ref)
            return _trace(module, tuple(flat_in), in_names, out_names, dynamo, meta)
        steps = _time_steps(x, time_dim)
        if steps < 2:
            raise ValueError(
                f"mode='step' needs an example_input with at least 2 time steps along time_dim={time_dim} "
                f"(got {describe(x)}) to tell the model's readout over time apart"
            )
        layers = _step_layers(model, x, time_dim)
        in_names = _input_names(x, "_t")
        with explicit_membranes(model):
            module = _StepGraph(model, x, time_dim, [layer for _, layer, _ in layers])
            per_step, _ = _drive_steps(module, x, time_dim, [shape for _, _, shape in layers])
            out_names = _output_names(ref, "_t")
            readouts = _readouts(out_names, ref, per_step)
            mems = tuple(torch.zeros(shape, device=flat_in[0].device) for _, _, shape in layers)
            args = (*[t.select(time_dim, 0) for t in flat_in], *mems)
            states = [
                {"name": f"mem_{i}", "output": f"mem_{i}_next", "shape": list(shape), "neuron": name}
                for i, (name, _, shape) in enumerate(layers)
            ]
            meta.update(
                inputs=[_tensor_info(n, t) for n, t in zip(in_names, args, strict=False)],
                outputs=[
                    {**_tensor_info(n, s[0]), **r}
                    for n, s, r in zip(out_names, per_step, readouts, strict=True)
                ],
                time_dim=time_dim,
                states=states,
                scope_prefix="model",
                readout="; ".join(
                    f"{n}: {r['readout']}" + (f" along axis {r['axis']}" if "axis" in r else "")
                    for n, r in zip(out_names, readouts, strict=True)
                ) + " over time steps; states start at zero",
            )
            _legacy_keys(meta, ref)
            return _trace(
                module, args, in_names + [s["name"] for s in states],
                out_names + [s["output"] for s in states], dynamo, meta,
            )


def _legacy_keys(meta: dict[str, Any], ref: Sequence[torch.Tensor]) -> None:
    # format 1 keys, for runtimes written against them: the first input, and the logits when the model
    # returns one [B, classes] tensor
    meta["input"], meta["input_shape"] = meta["inputs"][0]["name"], meta["inputs"][0]["shape"]
    if len(ref) == 1 and ref[0].dim() == 2 and ref[0].is_floating_point():
        meta["logits"], meta["num_classes"] = meta["outputs"][0]["name"], int(ref[0].shape[1])


def _trace(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    inputs: list[str],
    outputs: list[str],
    dynamo: bool,
    meta: dict[str, Any],
) -> tuple[Any, dict[str, Any]]:
    from brevitas.export import export_qonnx as brevitas_export_qonnx
    from qonnx.core.modelwrapper import ModelWrapper

    with tempfile.TemporaryDirectory(prefix="hq_ptq_export_") as tmp:
        raw = Path(tmp) / "raw.onnx"
        start = time.perf_counter()
        brevitas_export_qonnx(
            module, args, export_path=str(raw), dynamo=dynamo, input_names=inputs, output_names=outputs
        )
        log.info("traced %s graph in %.2fs (dynamo=%s)", meta["mode"], time.perf_counter() - start, dynamo)
        # no initializer ValueInfo fix-up (quadratic, ~3 s per trace): _clean re-infers every ValueInfo
        qmodel = ModelWrapper(str(raw), fix_missing_initializer_valueinfo=False)
    names = [i.name for i in qmodel.graph.input]
    missing = [n for n in inputs if n not in names]
    if missing:  # the exporter drops an input the outputs do not depend on
        raise ValueError(
            f"the model's outputs do not depend on input {missing[0]!r} (the exporter dropped it); leave it "
            "out of example_input, or bake it into the model"
        )
    return _clean(qmodel, _QUANT_OPS), meta
def _to_onnxruntime(qmodel: Any) -> Any:
    """QONNX → plain ONNX: uniform ``Quant`` to QCDQ, constant ``FloatQuant`` (PoT weights) folded."""
    from qonnx.transformation.qonnx_to_qcdq import QuantToQCDQ

    qmodel = _fold_all(qmodel, _QUANT_OPS - {"FloatQuant"})
    del qmodel.graph.value_info[:]  # QuantToQCDQ re-wraps the model, whose shape check is quadratic
    before = {i.name for i in qmodel.graph.initializer}
    qmodel = _transform(qmodel, QuantToQCDQ())
    _rename_new_initializers(qmodel.model.graph, before)
    left = sorted({n.op_type for n in qmodel.graph.node if n.domain not in _STANDARD_DOMAINS})
    if left:
        raise ValueError(
            f"nodes {', '.join(left)} have no onnxruntime equivalent (only weight Quant with 2-8 bits and "
            "constant FloatQuant convert); use export_qonnx for this model"
        )
    keep = [op for op in qmodel.model.opset_import if op.domain in _STANDARD_DOMAINS]
    del qmodel.model.opset_import[:]
    qmodel.model.opset_import.extend(keep)
    return _infer_shapes(qmodel)


def _rename_new_initializers(graph: onnx.GraphProto, before: set[str]) -> None:
    """Deterministic names for initializers a qonnx pass added (GiveUniqueParameterTensors is random)."""
    renames: dict[str, str] = {}
    for init in graph.initializer:
        if init.name not in before:
            new = f"param_{len(renames)}"
            while new in before:
                new += "_"
            renames[init.name] = init.name = new
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for annotation in graph.quantization_annotation:
        annotation.tensor_name = renames.get(annotation.tensor_name, annotation.tensor_name)
    for info in graph.value_info:
        info.name = renames.get(info.name, info.name)


def _compact_constants(proto: onnx.ModelProto, min_size: int = 256) -> None:
    """Store large single-valued initializers as ``ConstantOfShape`` nodes.

    Folding the first time step of an unrolled graph turns the zero initial membranes (and products
    with them) into full ``[B, ...]`` constants, which would double the file; a quantizer's weight input
    stays an initializer whatever its values, as QONNX consumers expect.
    """
    graph = proto.graph
    quant_inputs = {i for n in graph.node if n.op_type in _QUANT_OPS for i in n.input}
    graph_inputs = {i.name for i in graph.input}
    compact, nodes = [], []
    for init in graph.initializer:
        if init.name in quant_inputs or init.name in graph_inputs:
            continue
        arr = numpy_helper.to_array(init)
        if arr.size < min_size or arr.ndim == 0 or not np.all(arr == arr.flat[0]):
            continue
        shape_name = f"{init.name}__shape"
        graph.initializer.append(numpy_helper.from_array(np.asarray(arr.shape, dtype=np.int64), shape_name))
        value = numpy_helper.from_array(arr.reshape(-1)[:1].copy(), "value")
        nodes.append(helper.make_node("ConstantOfShape", [shape_name], [init.name], value=value,
                                      name=f"{init.name}__const"))
        compact.append(init)
    for init in compact:
        graph.initializer.remove(init)
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)


def _save(qmodel: Any, meta: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    proto = qmodel.model
    _compact_constants(proto)
    _infer_shapes(qmodel)  # the ConstantOfShape outputs need ValueInfos (qonnx's executor asks for all)
    proto.producer_name = "hq_ptq"
    del proto.metadata_props[:]
    helper.set_model_props(proto, {META_KEY: json.dumps(meta, sort_keys=True)})
    if meta["backend"] == "onnxruntime":
        onnx.checker.check_model(proto)
    path = Path(path)
    if path.suffix != ".onnx":
        log.warning("writing %s: ONNX files usually end in .onnx", path)
    return atomic_write(path, lambda tmp: onnx.save(proto, tmp))


def _export(
    model: nn.Module,
    example_input: Any,
    path: str | os.PathLike[str],
    mode: str,
    backend: str,
    dynamo: bool,
    allow_float: bool,
    time_dim: int,
) -> Path:
    start = time.perf_counter()
    qmodel, meta = _build_qonnx(model, example_input, mode, dynamo, allow_float, time_dim)
    if backend == "onnxruntime":
        qmodel = _to_onnxruntime(qmodel)
    meta["backend"] = backend
    meta["ops"] = sorted({n.op_type for n in qmodel.graph.node})
    out = _save(qmodel, meta, path)
    log.info("exported %s (%s, %s) in %.2fs, %d bytes", out, backend, mode, time.perf_counter() - start,
             out.stat().st_size)
    return out


def export_qonnx(
    model: nn.Module,
    example_input: Any,
    path: str | os.PathLike[str],
    *,
    mode: str = "unrolled",
    dynamo: bool = False,
    allow_float: bool = False,
    time_dim: int = 0,
) -> Path:
    """Write ``model`` as a QONNX file with its weight quantizers as ``Quant``/``FloatQuant`` nodes.

    The model is traced in eval mode with surrogate gradients off and its snnTorch neurons' hidden
    states reset; its training flags and neuron states are restored. Constants are folded except the
    quantizer nodes, and the weights stay float initializers that the quantizer nodes turn into the
    quantized values (exactly those PyTorch computes).

    Args:
        model: a model with hq_ptq-quantized layers, called as :func:`hq_ptq.model_io.call` does
            (``model(x)``, ``model(*x)`` for a tuple/list, ``model(**x)`` for a dict); its outputs may be
            one tensor of any rank or tuples/lists/dicts of tensors (each becomes a graph output).
        example_input: what the model takes, e.g. ``[T, B, C, H, W]`` events, a static ``[B, C, H, W]``
            image for a model with its own time loop, a ``[B, L, F]`` sequence, or a tuple of those.
            ``"unrolled"`` bakes every shape into the graph, so export with the shapes you will run;
            ``"step"`` traces one time step and bakes the rest of each shape (B).
        path: output file (``.onnx``); parent folders are created, the write is atomic.
        mode: ``"unrolled"`` (the whole forward in the graph) or ``"step"`` (one time step, membranes
            as I/O; needs the time loop inside ``MultiStepLeaky`` layers).
        dynamo: trace with torch's dynamo exporter instead of TorchScript: same numbers, but about
            twice the export time, a larger file and node names that :func:`verify_export` cannot
            pair with layers (it then compares outputs only).
        allow_float: export a model without quantized layers instead of raising.
        time_dim: (``"step"``) the axis of every input tensor that is time; 0 for time-first inputs,
            1 for batch-first ``[B, T, ...]`` ones (the model is then called on ``[B, 1, ...]`` slices).

    Returns:
        The written path.

    Raises:
        ValueError: unknown mode, no quantized layer, an example input that holds no tensor or that the
            model rejects, a model that returns no tensor, or (step) a neuron outside MultiStepLeaky, a
            layer called twice, fewer than 2 time steps, inputs of different lengths along ``time_dim``
            or a readout that is not a mean, sum, last step or stack over time. Nothing is written then.

    Example:
        >>> x, _ = next(iter(loader))  # [T, B, 2, H, W], the batch size the runtime will use
        >>> path = export_qonnx(qmodel, x, "model.qonnx.onnx", mode="step")
        >>> verify_export(qmodel, path, next_batch)["max_abs_output_error"]
    """
    return _export(model, example_input, path, mode, "qonnx", dynamo, allow_float, time_dim)


def export_onnxruntime(
    model: nn.Module,
    example_input: Any,
    path: str | os.PathLike[str],
    *,
    mode: str = "unrolled",
    dynamo: bool = False,
    allow_float: bool = False,
    time_dim: int = 0,
) -> Path:
    """Write ``model`` as a plain ONNX file for onnxruntime: QCDQ uniform weights, PoT weights folded.

    Arguments, layouts and errors as :func:`export_qonnx`. Uniform layers keep their integer codes
    (QuantizeLinear → Clip → DequantizeLinear on the float weight); PoT layers become float
    initializers holding exactly the PoT values. There is no activation quantization, so onnxruntime's
    default optimizations reproduce PyTorch (measured); :func:`run_export` still sets
    ``session.disable_quant_qdq = "1"``, because with activation QDQ nodes onnxruntime's QDQ fusions
    re-quantize float weights into integer kernels and move outputs by about 1e-2.

    Raises:
        ValueError: as :func:`export_qonnx`, or a quantizer with no onnxruntime equivalent.
    """
    return _export(model, example_input, path, mode, "onnxruntime", dynamo, allow_float, time_dim)


# ---------------------------------------------------------------------------------------------
# running and checking


def export_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``hq_ptq`` metadata of an exported file (mode, names, shapes, states, quantized layers).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file was not written by hq_ptq's exporter.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {path}; write one with hq_ptq.export_qonnx")
    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise ValueError(f"{path} has no {META_KEY!r} metadata; it was not written by hq_ptq.export")
    return json.loads(props[META_KEY])


def _with_spike_outputs(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``proto`` that also outputs every ``Greater`` result (the Heaviside spikes)."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    infos = {v.name: v for v in proto.graph.value_info}
    names = [n.output[0] for n in proto.graph.node if n.op_type == "Greater" and n.output[0] in infos]
    proto.graph.output.extend(infos[n] for n in names)
    keep = [v for v in proto.graph.value_info if v.name not in set(names)]  # one ValueInfo per tensor
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(keep)
    return proto, names


def _ort_session(proto: onnx.ModelProto, optimize: bool) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if optimize:
        # ORT's QDQ fusions would re-quantize float tensors into integer kernels and move outputs by
        # ~1e-2 on graphs with activation QDQ; the other (default) optimizations stay on
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    else:
        # the kernels qonnx's executor gets from its one-node sessions: no fusion or layout rewrite, and
        # no weight prepacking (there every weight is a fed input, never a constant)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _fold_custom_nodes(proto: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str]:
    """``proto`` with every qonnx custom node evaluated by qonnx into an initializer, or None and why not.

    Possible when each custom node has constant inputs (weight-only quantization, as hq_ptq exports)
    and no tensor carries an integer quantization annotation (qonnx's executor would round those).
    """
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import is_custom_op

    for annotation in proto.graph.quantization_annotation:
        for entry in annotation.quant_parameter_tensor_names:
            if entry.key == "finn_datatype" and DataType[entry.value].is_integer():
                return None, f"tensor {annotation.tensor_name!r} has an integer datatype annotation"
    # no initializer ValueInfo fix-up: it is quadratic in the graph size and onnxruntime needs none
    model = ModelWrapper(onnx.ModelProto.FromString(proto.SerializeToString()),
                         fix_missing_initializer_valueinfo=False)
    count = _fold_constants(model, frozenset(), custom_only=True)
    graph = model.graph
    left = [n for n in graph.node if is_custom_op(n.domain, n.op_type)]
    if left:
        return None, f"{left[0].op_type} node {left[0].name!r} has a non-constant input"
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unused = [i for i in graph.initializer if i.name not in used]  # the float weights behind the folds
    for init in unused:
        graph.initializer.remove(init)
    domains = {n.domain for n in graph.node}
    opsets = [o for o in model.model.opset_import if o.domain in _STANDARD_DOMAINS or o.domain in domains]
    del model.model.opset_import[:]
    model.model.opset_import.extend(opsets)
    return model.model, f"{count} qonnx nodes folded"


class _Runner:
    """One loaded graph and how it runs; ``executor`` names the path taken.

    ``backend="onnxruntime"``: one optimized onnxruntime session (``executor="onnxruntime"``).

    ``backend="qonnx"`` gives qonnx's semantics (custom ops by qonnx's ``execute_node``, standard ops by
    onnxruntime) without its executor's per-call cost, which is quadratic in the graph size (about a
    minute for spikformer-tiny unrolled over T=8): when every qonnx custom node has constant inputs,
    they are evaluated once by qonnx into initializers and the rest, all standard ops, runs in one
    onnxruntime session with optimizations and prepacking off, the kernels qonnx's one-node sessions
    use (``executor="qonnx-folded+onnxruntime"``). Otherwise qonnx's ``execute_onnx`` runs the graph
    node by node (``executor="qonnx"``).
    """

    def __init__(self, proto: onnx.ModelProto, backend: str, fold: bool = True) -> None:
        self.executor = backend
        self.model: Any = None
        self.session: Any = None
        if backend == "onnxruntime":
            try:
                self.session = _ort_session(proto, optimize=True)
            except Exception as err:  # onnxruntime raises its own exception types
                raise ValueError(
                    f"onnxruntime cannot load this graph ({_one_line(err)}); a QONNX file needs "
                    "backend='qonnx' or a file from export_onnxruntime"
                ) from None
            return
        folded, why = _fold_custom_nodes(proto) if fold else (None, "folding switched off")
        if folded is not None:
            try:
                self.session = _ort_session(folded, optimize=False)
                self.executor = "qonnx-folded+onnxruntime"
            except Exception as err:  # qonnx's one-node sessions may still run what one session rejects
                why = f"onnxruntime rejects the folded graph: {_one_line(err)}"
        if self.session is None:
            from qonnx.core.modelwrapper import ModelWrapper

            self.model = ModelWrapper(proto)
        log.info("qonnx backend runs with executor %r (%s)", self.executor, why)

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.model is not None:
            from qonnx.core.onnx_exec import execute_onnx

            return execute_onnx(self.model, dict(feeds))
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, dict(feeds)), strict=True))


def _io_info(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` with the format-2 keys (``inputs``, ``outputs``, ``time_dim``, ``scope_prefix``) filled in
    for files written by format 1 (one float input, one logits output, step files read out by the mean)."""
    if "inputs" in info:
        return info
    info = dict(info)
    info["inputs"] = [{"name": info["input"], "shape": info["input_shape"], "dtype": "float32"}]
    output: dict[str, Any] = {"name": info["logits"], "shape": None, "dtype": "float32"}
    if info["mode"] == "step":
        output["readout"] = "mean"
    info["outputs"] = [output]
    info.setdefault("time_dim", 0)
    info.setdefault("scope_prefix", "model" if info["mode"] == "step" else "")
    return info


def _arrays(value: Any) -> list[np.ndarray]:
    """Every tensor or array inside ``value`` (nested tuples, lists and dict values) as numpy, in order."""
    if isinstance(value, torch.Tensor):
        return [value.detach().cpu().numpy()]
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _arrays(v)]
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _arrays(v)]
    return []


def _feeds(info: dict[str, Any], inputs: Any, path: str | os.PathLike[str]) -> list[np.ndarray]:
    """The input arrays of a run, cast to the file's dtypes and checked against its shapes."""
    specs = info["inputs"]
    arrays = _arrays(inputs)
    if len(arrays) != len(specs):
        raise ValueError(
            f"inputs hold {len(arrays)} tensors but {path} takes {len(specs)} "
            f"({', '.join(s['name'] for s in specs)}); pass the structure it was exported with"
        )
    arrays = [np.asarray(a).astype(s["dtype"], copy=False) for a, s in zip(arrays, specs, strict=True)]
    if info["mode"] == "unrolled":
        for a, s in zip(arrays, specs, strict=True):
            if list(a.shape) != s["shape"]:
                shape = f"inputs have shape {list(a.shape)}" if len(specs) == 1 else (
                    f"input {s['name']!r} has shape {list(a.shape)}"
                )
                raise ValueError(
                    f"{shape} but {path} was exported for {s['shape']}; re-export with an example of the "
                    "shape you run (every shape, T and B included, is baked in)"
                )
        return arrays
    axis = info["time_dim"]
    lengths = set()
    for a, s in zip(arrays, specs, strict=True):
        if a.ndim != len(s["shape"]) + 1 or list(np.delete(np.asarray(a.shape), axis)) != s["shape"]:
            raise ValueError(
                f"inputs have shape {list(a.shape)} but {path} takes {s['shape']} per time step, with time "
                f"on axis {axis} (B is baked in: re-export with the batch size you run)"
            )
        lengths.add(a.shape[axis])
    if len(lengths) != 1:
        raise ValueError(f"the inputs have different numbers of time steps {sorted(lengths)} on axis {axis}")
    return arrays


def _read_out(spec: dict[str, Any], steps: list[np.ndarray]) -> np.ndarray:
    kind = spec["readout"]
    if kind == "last":
        return steps[-1]
    if kind == "stack":
        return np.concatenate(steps, axis=spec["axis"])
    total = np.sum([s.astype(np.float64) for s in steps], axis=0)
    return (total / len(steps) if kind == "mean" else total).astype(steps[0].dtype)


def run_export(
    path: str | os.PathLike[str],
    inputs: Any,
    *,
    backend: str = "qonnx",
    spikes: bool = False,
) -> dict[str, Any]:
    """Run an exported file on ``inputs``; step files are driven over time from zero state.

    Args:
        path: a file from :func:`export_qonnx` or :func:`export_onnxruntime`.
        inputs: the structure the model was exported with (a tensor or array, a tuple/list or a dict
            of them); every tensor of the exported shape (step files: with any number of steps along
            the exported ``time_dim``, and the exported B).
        backend: ``"qonnx"`` (runs QONNX and plain files with qonnx's semantics: qonnx custom ops by
            qonnx, standard ops by onnxruntime without graph optimizations; weight-only quantizer nodes
            are evaluated once and the rest runs as one onnxruntime session, any other graph goes
            through qonnx's ``execute_onnx`` node by node) or ``"onnxruntime"`` (plain files only,
            one optimized session).
        spikes: also return every spike tensor (the output of each ``Greater`` node).

    Returns:
        ``{"outputs": {graph output name: array}}``, in the model's output order; step files apply each
        output's recorded readout over the steps (mean, sum, last step or stack along its time axis).
        ``"logits"`` repeats the output when the model returns one ``[B, classes]`` tensor. Step files
        add ``"states"`` (name → final membrane); ``spikes=True`` adds ``"spikes"``: graph tensor name →
        bool array ``[calls, ...]`` (calls = T for step files, one per step; 1 for unrolled files).

    Raises:
        FileNotFoundError / ValueError: no file, not an hq_ptq export, unknown backend, inputs of the
            wrong structure or shape, or a QONNX file given to onnxruntime.
    """
    return _run(path, inputs, backend, spikes)[0]


def _run(
    path: str | os.PathLike[str],
    inputs: Any,
    backend: str,
    spikes: bool,
    fold: bool = True,
) -> tuple[dict[str, Any], str]:
    """:func:`run_export` plus the executor that ran; ``fold=False`` forces qonnx's ``execute_onnx``."""
    _check_backend(backend)
    info = _io_info(export_info(path))
    arrays = _feeds(info, inputs, path)
    names = [s["name"] for s in info["inputs"]]
    proto = onnx.load(str(path))
    spike_names: list[str] = []
    if spikes:
        proto, spike_names = _with_spike_outputs(proto)
    runner = _Runner(proto, backend, fold)
    result: dict[str, Any] = {}
    if info["mode"] == "unrolled":
        out = runner(dict(zip(names, arrays, strict=True)))
        result["outputs"] = {o["name"]: out[o["name"]] for o in info["outputs"]}
        if spikes:
            result["spikes"] = {n: out[n][None] for n in spike_names}
    else:
        axis = info["time_dim"]
        states = {s["name"]: np.zeros(s["shape"], dtype=np.float32) for s in info["states"]}
        per_output: dict[str, list[np.ndarray]] = {o["name"]: [] for o in info["outputs"]}
        per_step: dict[str, list[np.ndarray]] = {n: [] for n in spike_names}
        for t in range(arrays[0].shape[axis]):
            feeds = {n: np.take(a, t, axis=axis) for n, a in zip(names, arrays, strict=True)}
            out = runner({**feeds, **states})
            states = {s["name"]: out[s["output"]] for s in info["states"]}
            for name, acc in per_output.items():
                acc.append(out[name])
            for n in spike_names:
                per_step[n].append(out[n])
        result["outputs"] = {o["name"]: _read_out(o, per_output[o["name"]]) for o in info["outputs"]}
        result["states"] = states
        if spikes:
            result["spikes"] = {n: np.stack(v) for n, v in per_step.items()}
    if "logits" in info:
        result["logits"] = result["outputs"][info["logits"]]
    return result, runner.executor


def _recorded_neurons(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The neurons whose calls verification records: every MultiStepLeaky and every snnTorch neuron
    outside one (plain ``snn.Leaky`` driven by the model's own loop)."""
    wrapped = {id(m.lif) for m in model.modules() if isinstance(m, MultiStepLeaky)}
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, MultiStepLeaky) or (is_spiking_neuron(m) and id(m) not in wrapped)
    ]


def _torch_reference(
    model: nn.Module, x: Any, states: list[dict[str, Any]] | None, time_dim: int
) -> tuple[list[np.ndarray], list[tuple[str, np.ndarray, np.ndarray | None]], dict[str, np.ndarray]]:
    """PyTorch outputs; ``(neuron name, spikes, reset)`` per neuron call in call order (MultiStepLeaky:
    spikes ``[T, ...]``; a per-step snnTorch neuron: spikes ``[B, ...]`` and the pending reset it computed
    from the membrane it started from, its ``reset`` attribute, when it has one); and for step files the
    final membranes of the model driven step by step."""
    calls: list[tuple[str, np.ndarray, np.ndarray | None]] = []

    def recorder(name: str) -> Any:
        def record(module: nn.Module, _inp: object, out: object) -> None:
            spk = out[0] if isinstance(out, tuple) else out
            reset = getattr(module, "reset", None)
            if isinstance(module, MultiStepLeaky) or not isinstance(reset, torch.Tensor):
                reset = None
            elif reset.shape != spk.shape:
                reset = None
            calls.append((
                name,
                (spk != 0).cpu().numpy(),
                None if reset is None else (reset != 0).cpu().numpy(),
            ))

        return record

    with _export_state(model), explicit_membranes(model) as layers:
        hooks = [m.register_forward_hook(recorder(name)) for name, m in _recorded_neurons(model)]
        try:
            outputs = _flat_outputs(call(model, x))
        finally:
            for h in hooks:
                h.remove()
        mems: dict[str, np.ndarray] = {}
        if states:  # the step graph's reference: the same model driven one step at a time in PyTorch
            by_name = dict(layers)
            step = _StepGraph(model, x, time_dim, [by_name[s["neuron"]] for s in states])
            _, final = _drive_steps(step, x, time_dim, [s["shape"] for s in states])
            mems = {s["name"]: m.cpu().numpy() for s, m in zip(states, final, strict=True)}
    return [o.cpu().numpy() for o in outputs], calls, mems


# TorchScript names a node's output after the module scopes it ran in, the k-th call of a module
# getting the suffix _k on its scope: /blocks.0/attn/q_lif/Greater_1_output_0, /lif1_2/Greater_output_0
_SPIKE_NAME = re.compile(r"^/(?P<scope>.+)/Greater(?:_(?P<k>\d+))?_output_0$")
_CALL_SUFFIX = re.compile(r"^(?P<base>.+)_(?P<k>\d+)$")


def _resolve_scope(parts: list[str], modules: Mapping[str, nn.Module]) -> tuple[str, tuple[int, ...]] | None:
    """The qualified name of the module a TorchScript scope path names, and the call index of each part.

    A part is the module's name relative to an enclosing scope (``seq.1`` inside ``blocks.0/seq``), with
    ``_k`` appended for the k-th call of that module.
    """
    current, calls = "", []
    for part in parts:
        options = [(part, 0)]
        m = _CALL_SUFFIX.match(part)
        if m:
            options.append((m["base"], int(m["k"])))
        found = None
        for name, k in options:
            prefix = current
            while found is None:
                candidate = f"{prefix}.{name}" if prefix else name
                if candidate in modules and (not current or candidate.startswith(current + ".")):
                    found = (candidate, k)
                if not prefix:
                    break
                prefix = prefix.rpartition(".")[0]
            if found is not None:
                break
        if found is None:
            return None
        current = found[0]
        calls.append(found[1])
    return current, tuple(calls)


def _match_spikes(
    model: nn.Module,
    calls: list[tuple[str, np.ndarray, np.ndarray | None]],
    got: Mapping[str, np.ndarray],
    mode: str,
    scope_prefix: str,
) -> tuple[dict[str, tuple[int, int, int, int]], list[str]]:
    """Pair the graph's spike tensors with the neurons' calls by module scope and call order.

    Returns ``{neuron: (mismatches, compared, spikes in the graph, spikes in PyTorch)}`` for every neuron
    whose calls could be paired, and the names of the others. Unrolled graphs: a neuron's Greater nodes,
    sorted by (call suffixes of its scope, index in the scope), are its per-step spikes in call order (T
    per MultiStepLeaky call, one per call of a per-step neuron). A per-step snnTorch neuron whose pending
    reset does not merge with its previous spike (``reset_delay=False``: the reset is taken after the
    in-step reset) has a reset node per call too, before the spike (the first call's folds away): both
    are checked. Step graphs: one or two per layer and step (the pending reset recomputed from the
    carried-in membrane, which is the previous step's spike, then this step's spike); both are checked.
    """
    ref: dict[str, list[np.ndarray]] = {}
    resets: dict[str, list[np.ndarray | None]] = {}
    for name, spk, reset in calls:
        ref.setdefault(name, []).append(spk)
        resets.setdefault(name, []).append(reset)
    kinds = {name: isinstance(m, MultiStepLeaky) for name, m in _recorded_neurons(model)}
    modules = dict(model.named_modules())
    groups: dict[str, list[tuple[tuple[int, ...], np.ndarray]]] = {name: [] for name in ref}
    for tensor, value in got.items():
        m = _SPIKE_NAME.match(tensor)
        if m is None:
            continue
        parts = m["scope"].split("/")
        if scope_prefix:
            if parts[0] != scope_prefix:
                continue
            parts = parts[1:]
        resolved = _resolve_scope(parts, modules) if parts else None
        if resolved is None:
            continue
        owner, key = resolved
        while owner and owner not in ref:
            owner = owner.rpartition(".")[0]
        if owner in ref:
            groups[owner].append(((*key, int(m["k"] or 0)), value))
    paired: dict[str, tuple[int, int, int, int]] = {}
    for name, spikes in ref.items():
        graph = [v for _, v in sorted(groups[name], key=lambda kv: kv[0])]
        result = (
            _compare_unrolled(spikes, resets[name], graph, kinds.get(name, False)) if mode == "unrolled"
            else _compare_step(spikes, graph)
        )
        if result is not None:
            paired[name] = result
    return paired, [name for name in ref if name not in paired]


def _compare_unrolled(
    spikes: list[np.ndarray], resets: list[np.ndarray | None], graph: list[np.ndarray], multistep: bool
) -> tuple[int, int, int, int] | None:
    steps = [s for call_spikes in spikes for s in call_spikes] if multistep else list(spikes)
    graph = [g[0] for g in graph]  # run_export's [calls=1, ...]
    expected: list[tuple[np.ndarray, bool]] = [(s, True) for s in steps]  # (value, is a spike)
    if not multistep and len(graph) in (2 * len(steps) - 1, 2 * len(steps)) and len(graph) > len(steps):
        if any(r is None for r in resets):
            return None
        expected = [e for r, s in zip(resets, steps, strict=True) for e in ((r, False), (s, True))]
        expected = expected[len(expected) - len(graph):]  # the first call's reset is a folded constant
    if len(graph) != len(expected):
        return None
    pairs = list(zip(graph, expected, strict=True))
    if any(g.shape != e.shape for g, (e, _) in pairs):
        return None
    mismatches = sum(int((g.astype(bool) != e).sum()) for g, (e, _) in pairs)
    count_graph = sum(int(g.astype(bool).sum()) for g, (_, spike) in pairs if spike)
    return mismatches, sum(e.size for e, _ in expected), count_graph, sum(int(s.sum()) for s in steps)


def _compare_step(spikes: list[np.ndarray], graph: list[np.ndarray]) -> tuple[int, int, int, int] | None:
    if len(spikes) != 1 or len(graph) not in (1, 2):
        return None
    spk = spikes[0]
    if any(g.shape != spk.shape for g in graph):
        return None
    mismatches = compared = 0
    if len(graph) == 2:
        shifted = np.concatenate([np.zeros_like(spk[:1]), spk[:-1]])
        mismatches += int((graph[0].astype(bool) != shifted).sum())
        compared += spk.size
    mismatches += int((graph[-1].astype(bool) != spk).sum())
    compared += spk.size
    return mismatches, compared, int(graph[-1].astype(bool).sum()), int(spk.sum())


def verify_export(
    model: nn.Module,
    path: str | os.PathLike[str],
    inputs: Any,
    *,
    backend: str = "qonnx",
) -> dict[str, Any]:
    """Compare an exported file with the PyTorch model on ``inputs`` (use inputs unseen at export).

    Every output tensor is compared with the model's (called on the same inputs, from reset neuron
    states). Spikes are compared element by element wherever the graph's ``Greater`` outputs can be
    paired with a neuron's calls through their module scopes: the t-th step of a ``MultiStepLeaky``,
    the k-th call of a per-step ``snn.Leaky`` inside the model's own loop. Neurons that cannot be paired
    (dynamo-traced names, a neuron whose graph holds another number of spike nodes than it has calls)
    are listed as not compared; they never count as mismatches. A step graph holds two spike tensors per
    layer and step (the pending reset recomputed from the carried-in membrane, and the new spike), so it
    compares twice as many spikes; both must match.

    Args:
        model: the model that was exported (same weights and quantizers).
        path: the exported file.
        inputs: the structure and shapes the file was exported for (step files: any number of steps).
        backend: ``"qonnx"`` or ``"onnxruntime"``.

    Returns:
        ``{"backend", "executor", "mode", "output_errors" ({output name: max abs error}),
        "max_abs_output_error" (over all outputs), "max_abs_logit_error" (the same number, the name
        kept for format-1 callers), "spike_compare" ("elementwise": every neuron paired, "partial", or
        "not compared"), "spike_mismatches" (over the paired neurons; None when none was paired),
        "spikes_compared", "spikes_not_compared" (neuron names), "spike_count_torch",
        "spike_count_export" (spikes of the paired neurons; when none was paired, the model's total
        and the total of the file's Greater outputs, which are not comparable), "seconds"}``.
        ``executor`` says what ran the file: ``"onnxruntime"``, ``"qonnx-folded+onnxruntime"`` (qonnx
        backend, quantizer nodes evaluated once by qonnx, the rest one onnxruntime session without
        optimizations) or ``"qonnx"`` (qonnx's ``execute_onnx``, for graphs that cannot be folded, e.g.
        activation quantizers). Step files add ``"max_abs_state_error"`` and ``"max_rel_state_error"``:
        final membranes against the model driven step by step in PyTorch.

    Raises:
        ValueError / FileNotFoundError: as :func:`run_export`, or a model whose outputs do not match the
        file's in number or shape.
    """
    _check_backend(backend)
    info = _io_info(export_info(path))
    x = _check_example(model, inputs, "inputs")
    start = time.perf_counter()
    got, executor = _run(path, x, backend, spikes=True)
    seconds = time.perf_counter() - start
    ref_outputs, calls, ref_mems = _torch_reference(model, x, info.get("states"), info.get("time_dim", 0))
    names = [o["name"] for o in info["outputs"]]
    if len(ref_outputs) != len(names):
        raise ValueError(
            f"the model returns {len(ref_outputs)} tensors but {path} has {len(names)} outputs "
            f"({', '.join(names)}); verify with the model that was exported"
        )
    errors: dict[str, float] = {}
    for name, ref in zip(names, ref_outputs, strict=True):
        out = got["outputs"][name]
        if out.shape != ref.shape:
            raise ValueError(
                f"output {name!r} has shape {list(out.shape)} in {path} but {list(ref.shape)} from the model"
            )
        diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
        errors[name] = float(diff.max()) if diff.size else 0.0
    paired, unpaired = _match_spikes(model, calls, got["spikes"], info["mode"], info["scope_prefix"])
    if paired:
        how = "elementwise" if not unpaired else "partial"
        mismatches: int | None = sum(p[0] for p in paired.values())
        compared = sum(p[1] for p in paired.values())
        count_export = sum(p[2] for p in paired.values())
        count_torch = sum(p[3] for p in paired.values())
    else:
        how, mismatches, compared = "not compared", None, 0
        count_torch = int(sum(spk.sum() for _, spk, _ in calls))
        count_export = int(sum(s.astype(bool).sum() for s in got["spikes"].values()))
    if unpaired:
        log.warning("cannot pair the graph's spike tensors with neuron(s) %s; their spikes are not compared "
                    "(the outputs are)", ", ".join(unpaired))
    report: dict[str, Any] = {
        "backend": backend,
        "executor": executor,
        "mode": info["mode"],
        "output_errors": errors,
        "max_abs_output_error": max(errors.values()),
        "max_abs_logit_error": max(errors.values()),
        "spike_compare": how,
        "spike_mismatches": mismatches,
        "spikes_compared": compared,
        "spikes_not_compared": unpaired,
        "spike_count_torch": count_torch,
        "spike_count_export": count_export,
        "seconds": seconds,
    }
    if info["mode"] == "step":
        errs = {name: np.abs(got["states"][name] - ref).max() for name, ref in ref_mems.items()}
        report["max_abs_state_error"] = float(max(errs.values()))
        report["max_rel_state_error"] = float(
            max(err / max(float(np.abs(ref_mems[name]).max()), 1e-12) for name, err in errs.items())
        )
    log.info("verify %s (%s): %s", path, backend, report)
    return report
