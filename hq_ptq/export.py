"""Export quantized spiking models to QONNX and to onnxruntime-runnable ONNX, and check the files.

The QONNX file keeps the weight quantizers as nodes: uniform layers as ``Quant`` (integer, per-channel
scale, narrow range) and power-of-two layers as ``FloatQuant`` with 0 mantissa bits, which is PoT
exactly. Spiking neurons become plain ONNX ops (the Heaviside spike is ``Greater`` + ``Cast``, the reset
``Sub``/``Mul``); surrogates are switched off while tracing. The onnxruntime file is the same graph with
``Quant`` rewritten to QuantizeLinear → Clip → DequantizeLinear (QCDQ) and the PoT weights folded to
float constants holding the PoT values (onnxruntime has no ``FloatQuant``).

Two graph layouts (``mode``):

* ``"unrolled"``: the whole time loop in one graph, ``x [T, B, C, H, W] -> logits [B, classes]``. T and
  B are baked in (the initial membranes are zeros of the traced batch shape), so export with the
  batch size and number of time steps you will run.
* ``"step"``: one time step per call, ``x_t [B, C, H, W], mem_0 … mem_{k-1} -> logits_t, mem_0_next …``
  with every neuron's membrane as an explicit input/output. A runtime starts from zero membranes,
  feeds each ``mem_i_next`` back as ``mem_i`` and averages ``logits_t`` over time, which equals the
  model's logits whenever its readout is affine per time step followed by a mean over T (true for the
  whole zoo). B is baked in; T is free.

Every file carries ``metadata_props["hq_ptq"]``, a JSON object (read it with :func:`export_info`):
mode, input/output names and shapes, the state list (``name``, ``output``, ``shape``, ``neuron``)
and the readout rule. :func:`run_export` drives either layout with qonnx or onnxruntime, and
:func:`verify_export` compares a file against the PyTorch model on fresh inputs. The qonnx backend keeps
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
from hq_ptq.snn import MultiStepLeaky, explicit_membranes, spiking_neurons, surrogate_disabled
from hq_ptq.swap import quant_layers

__all__ = [
    "BACKENDS",
    "MODES",
    "export_info",
    "export_onnxruntime",
    "export_qonnx",
    "run_export",
    "verify_export",
]

log = logging.getLogger(__name__)

MODES = ("unrolled", "step")
BACKENDS = ("qonnx", "onnxruntime")
META_KEY = "hq_ptq"
FORMAT_VERSION = 1

# qonnx custom ops that stay as nodes in the QONNX file (constant folding would bake them away)
_QUANT_OPS = frozenset({"Quant", "IntQuant", "FloatQuant", "BipolarQuant", "Trunc"})
_STANDARD_DOMAINS = frozenset({"", "ai.onnx"})


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


def _check_example(model: nn.Module, x: object, what: str = "example_input") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(
            f"{what} must be a float torch.Tensor [T, B, C, H, W], got {type(x).__name__}"
            + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else "")
        )
    if x.dim() != 5 or 0 in x.shape:
        raise ValueError(
            f"{what} must be a time-first [T, B, C, H, W] tensor, got shape {tuple(x.shape)}; "
            "batch-first data [B, T, ...] becomes time-first with x.transpose(0, 1)"
        )
    channels = getattr(getattr(model, "config", None), "in_channels", None)
    if isinstance(channels, int) and x.shape[2] != channels:
        raise ValueError(
            f"{what} has {x.shape[2]} channels (shape {tuple(x.shape)}) but the model takes "
            f"{channels}; pass [T, B, {channels}, H, W]"
        )
    return x.detach().to(_device(model), torch.float32)


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


@contextmanager
def _export_state(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm running statistics), no autograd, Heaviside spikes; restores all of it."""
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), surrogate_disabled(model):
            yield
    finally:
        for m, flag in training.items():
            m.train(flag)


# ---------------------------------------------------------------------------------------------
# the module that is traced


class _StepGraph(nn.Module):
    """``(x_t, mem_0 … mem_{k-1}) -> (logits_t, mem_0' … mem_{k-1}')`` around a time-first model.

    Runs the model on a one-step sequence ``x_t[None]`` with each layer's ``initial_mem`` taken from
    the inputs; must run inside :func:`hq_ptq.snn.explicit_membranes` so ``final_mem`` is recorded.
    """

    def __init__(self, model: nn.Module, layers: Sequence[MultiStepLeaky]) -> None:
        super().__init__()
        self.model = model
        self._layers = list(layers)  # a plain list: the layers are already registered under `model`

    def forward(self, x_t: torch.Tensor, *mems: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for layer, mem in zip(self._layers, mems, strict=True):
            layer.initial_mem = mem
        logits = self.model(x_t.unsqueeze(0))
        return (logits, *[layer.final_mem for layer in self._layers])


def _probe(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with a one-line error when the input does not fit; checks the logits' rank."""
    try:
        out = model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise ValueError(
            f"example_input of shape {tuple(x.shape)} does not run through the model "
            f"({_one_line(err)}); pass the [T, B, C, H, W] tensor the model takes"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return logits [B, classes] to be exported, got {shape}")
    return out


def _step_layers(model: nn.Module, x: torch.Tensor) -> list[tuple[str, MultiStepLeaky, tuple[int, ...]]]:
    """The stateful layers of a step export, with their membrane shapes, in call order."""
    wrapped = {f"{name}.lif" if name else "lif" for name, m in model.named_modules()
               if isinstance(m, MultiStepLeaky)}
    bare = [name for name, _ in spiking_neurons(model) if name not in wrapped]
    if bare:
        raise ValueError(
            f"mode='step' needs every snnTorch neuron inside hq_ptq.snn.MultiStepLeaky, but {bare[0]!r} is "
            "bare (its state would stay hidden); wrap it or use mode='unrolled'"
        )
    with explicit_membranes(model) as layers:
        order: list[str] = []
        hooks = [
            layer.register_forward_hook(lambda *_, n=name: order.append(n)) for name, layer in layers
        ]
        try:
            _probe(model, x[:1])
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
    model: nn.Module, example_input: torch.Tensor, mode: str, dynamo: bool, allow_float: bool
) -> tuple[Any, dict[str, Any]]:
    """Trace ``model`` to a cleaned qonnx ``ModelWrapper`` plus the metadata dict."""
    _check_mode(mode)
    _check_quantized(model, allow_float)
    x = _check_example(model, example_input)
    meta: dict[str, Any] = {"format": "hq_ptq-export", "format_version": FORMAT_VERSION, "mode": mode}
    config = getattr(model, "hq_config", None)
    if isinstance(config, dict):
        meta["model"] = config
    meta["quant_layers"] = {
        name: [layer.hq_scheme, layer.hq_bits] for name, layer in quant_layers(model).items()
    }
    with _export_state(model):
        ref = _probe(model, x)
        meta["num_classes"] = int(ref.shape[1])
        if mode == "unrolled":
            module: nn.Module = model
            args: tuple[torch.Tensor, ...] = (x,)
            inputs, outputs = ["x"], ["logits"]
            meta.update(input="x", input_shape=list(x.shape), logits="logits", time_steps=int(x.shape[0]),
                        readout="logits")
            return _trace(module, args, inputs, outputs, dynamo, meta)
        layers = _step_layers(model, x)
        with explicit_membranes(model):
            module = _StepGraph(model, [layer for _, layer, _ in layers])
            mems = tuple(torch.zeros(shape, device=x.device) for _, _, shape in layers)
            args = (x[0], *mems)
            states = [
                {"name": f"mem_{i}", "output": f"mem_{i}_next", "shape": list(shape), "neuron": name}
                for i, (name, _, shape) in enumerate(layers)
            ]
            inputs = ["x_t"] + [s["name"] for s in states]
            outputs = ["logits_t"] + [s["output"] for s in states]
            meta.update(input="x_t", input_shape=list(x.shape[1:]), logits="logits_t", states=states,
                        readout="mean of logits_t over time steps; states start at zero")
            return _trace(module, args, inputs, outputs, dynamo, meta)


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
    names = [i.name for i in qmodel.graph.input][: len(inputs)]
    if names != inputs:  # the exporter may drop an input it proves unused
        raise RuntimeError(f"exported graph inputs {names} differ from the expected {inputs}")
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
    example_input: torch.Tensor,
    path: str | os.PathLike[str],
    mode: str,
    backend: str,
    dynamo: bool,
    allow_float: bool,
) -> Path:
    start = time.perf_counter()
    qmodel, meta = _build_qonnx(model, example_input, mode, dynamo, allow_float)
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
    example_input: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    mode: str = "unrolled",
    dynamo: bool = False,
    allow_float: bool = False,
) -> Path:
    """Write ``model`` as a QONNX file with its weight quantizers as ``Quant``/``FloatQuant`` nodes.

    The model is traced in eval mode with surrogate gradients off; its training flags are restored.
    Constants are folded except the quantizer nodes, and the weights stay float initializers that the
    quantizer nodes turn into the quantized values (exactly those PyTorch computes).

    Args:
        model: a model with hq_ptq-quantized layers, called as ``model(x)`` on ``[T, B, C, H, W]``
            and returning logits ``[B, classes]``.
        example_input: a ``[T, B, C, H, W]`` float tensor. ``"unrolled"`` bakes T and B into the
            graph, so export with the shape you will run; ``"step"`` traces its first time step and
            bakes only B.
        path: output file (``.onnx``); parent folders are created, the write is atomic.
        mode: ``"unrolled"`` (time loop in the graph) or ``"step"`` (one step, membranes as I/O).
        dynamo: trace with torch's dynamo exporter instead of TorchScript: same numbers, but about
            twice the export time, a larger file and node names that :func:`verify_export` cannot
            pair with layers (it then compares total spike counts only).
        allow_float: export a model without quantized layers instead of raising.

    Returns:
        The written path.

    Raises:
        ValueError: unknown mode, no quantized layer, an example input of the wrong rank/channels or
            that the model rejects, or (step) a neuron the step layout cannot expose.

    Example:
        >>> x, _ = next(iter(loader))  # [T, B, 2, H, W], the batch size the runtime will use
        >>> path = export_qonnx(qmodel, x, "model.qonnx.onnx", mode="step")
        >>> verify_export(qmodel, path, next_batch)["max_abs_logit_error"]
    """
    return _export(model, example_input, path, mode, "qonnx", dynamo, allow_float)


def export_onnxruntime(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    mode: str = "unrolled",
    dynamo: bool = False,
    allow_float: bool = False,
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
    return _export(model, example_input, path, mode, "onnxruntime", dynamo, allow_float)


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


def _as_numpy(inputs: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    return arr.astype(np.float32, copy=False)


def run_export(
    path: str | os.PathLike[str],
    inputs: torch.Tensor | np.ndarray,
    *,
    backend: str = "qonnx",
    spikes: bool = False,
) -> dict[str, Any]:
    """Run an exported file on ``inputs [T, B, C, H, W]``; step files are driven over T from zero state.

    Args:
        path: a file from :func:`export_qonnx` or :func:`export_onnxruntime`.
        inputs: time-first input of the exported shape (step files: any T, the exported B).
        backend: ``"qonnx"`` (runs QONNX and plain files with qonnx's semantics: qonnx custom ops by
            qonnx, standard ops by onnxruntime without graph optimizations; weight-only quantizer nodes
            are evaluated once and the rest runs as one onnxruntime session, any other graph goes
            through qonnx's ``execute_onnx`` node by node) or ``"onnxruntime"`` (plain files only,
            one optimized session).
        spikes: also return every spike tensor (the output of each ``Greater`` node).

    Returns:
        ``{"logits": [B, classes]}`` (step files: mean over time), plus ``"states"`` (name → final
        membrane) for step files and, when asked, ``"spikes"``: graph tensor name → bool array
        ``[calls, ...]`` (calls = T for step files, one per step; 1 for unrolled files).

    Raises:
        FileNotFoundError / ValueError: no file, not an hq_ptq export, unknown backend, wrong input
        shape, or a QONNX file given to onnxruntime.
    """
    return _run(path, inputs, backend, spikes)[0]


def _run(
    path: str | os.PathLike[str],
    inputs: torch.Tensor | np.ndarray,
    backend: str,
    spikes: bool,
    fold: bool = True,
) -> tuple[dict[str, Any], str]:
    """:func:`run_export` plus the executor that ran; ``fold=False`` forces qonnx's ``execute_onnx``."""
    _check_backend(backend)
    info = export_info(path)
    x = _as_numpy(inputs)
    want = list(info["input_shape"])
    if info["mode"] == "unrolled" and list(x.shape) != want:
        raise ValueError(
            f"inputs have shape {list(x.shape)} but {path} was exported for {want}; "
            "re-export with an example of the shape you run (T and B are baked in)"
        )
    if info["mode"] == "step" and (x.ndim != len(want) + 1 or list(x.shape[1:]) != want):
        raise ValueError(
            f"inputs have shape {list(x.shape)} but {path} takes [T, {', '.join(map(str, want))}] "
            "(B is baked in: re-export with the batch size you run)"
        )
    proto = onnx.load(str(path))
    spike_names: list[str] = []
    if spikes:
        proto, spike_names = _with_spike_outputs(proto)
    runner = _Runner(proto, backend, fold)
    if info["mode"] == "unrolled":
        out = runner({info["input"]: x})
        result: dict[str, Any] = {"logits": out[info["logits"]]}
        if spikes:
            result["spikes"] = {n: out[n][None] for n in spike_names}
        return result, runner.executor
    states = {s["name"]: np.zeros(s["shape"], dtype=np.float32) for s in info["states"]}
    logits_sum: np.ndarray | None = None
    per_step: dict[str, list[np.ndarray]] = {n: [] for n in spike_names}
    for x_t in x:
        out = runner({info["input"]: x_t, **states})
        logits_t = out[info["logits"]].astype(np.float64)
        logits_sum = logits_t if logits_sum is None else logits_sum + logits_t
        states = {s["name"]: out[s["output"]] for s in info["states"]}
        for n in spike_names:
            per_step[n].append(out[n])
    result = {"logits": (logits_sum / len(x)).astype(np.float32), "states": states}
    if spikes:
        result["spikes"] = {n: np.stack(v) for n, v in per_step.items()}
    return result, runner.executor


def _torch_reference(
    model: nn.Module, x: torch.Tensor, states: list[dict[str, Any]] | None
) -> tuple[np.ndarray, list[tuple[str, np.ndarray]], dict[str, np.ndarray]]:
    """PyTorch logits, ``(layer name, spikes [T, ...])`` per MultiStepLeaky call, and for step files
    the final membranes of the model driven step by step."""
    calls: list[tuple[str, np.ndarray]] = []

    def recorder(name: str) -> Any:
        def record(_m: nn.Module, _inp: object, out: object) -> None:
            calls.append((name, ((out[0] if isinstance(out, tuple) else out) != 0).cpu().numpy()))

        return record

    with _export_state(model), explicit_membranes(model) as layers:
        hooks = [layer.register_forward_hook(recorder(name)) for name, layer in layers]
        try:
            logits = model(x)
        finally:
            for h in hooks:
                h.remove()
        mems: dict[str, np.ndarray] = {}
        if states:  # the step graph's reference: the same model driven one step at a time in PyTorch
            by_name = dict(layers)
            step = _StepGraph(model, [by_name[s["neuron"]] for s in states])
            current = [torch.zeros(s["shape"], device=x.device) for s in states]
            for x_t in x:
                current = list(step(x_t, *current)[1:])
            mems = {s["name"]: m.cpu().numpy() for s, m in zip(states, current, strict=True)}
    return logits.cpu().numpy(), calls, mems


# TorchScript names a node's output after the module scope it ran in: /blocks.0/attn/q_lif/Greater_1_output_0
_SPIKE_NAME = re.compile(r"^/(?P<scope>.+)/Greater(?:_(?P<k>\d+))?_output_0$")


def _match_spikes(
    calls: list[tuple[str, np.ndarray]], got: Mapping[str, np.ndarray], mode: str
) -> tuple[int, int, int] | None:
    """``(mismatches, compared, graph spike count)`` pairing spikes by module scope, or None."""
    ref = dict(calls)
    if len(ref) != len(calls):  # a layer called twice: its scopes are ambiguous
        return None
    paired: dict[tuple[str, int], np.ndarray] = {}
    for tensor, value in got.items():
        m = _SPIKE_NAME.match(tensor)
        if m is None:
            return None
        scope = m["scope"].replace("/", ".")
        if mode == "step":
            scope = scope.removeprefix("model.")  # the _StepGraph wrapper's attribute
        if scope not in ref and scope.removesuffix(".lif") in ref:  # the general path runs snn.Leaky
            scope = scope.removesuffix(".lif")
        paired[(scope, int(m["k"] or 0))] = value
    mismatches = compared = count = 0
    for name, spk in ref.items():
        if mode == "unrolled":  # the t-th Greater of a layer's scope is its step t
            steps = [paired.pop((name, t), None) for t in range(spk.shape[0])]
            if any(s is None for s in steps):
                return None
            graph = np.concatenate(steps)
        else:
            # per step a layer has two Greater nodes: the pending reset recomputed from the carried-in
            # membrane (= the previous step's spike) and this step's spike; check both
            prev, graph = paired.pop((name, 0), None), paired.pop((name, 1), None)
            if prev is None or graph is None or prev.shape != spk.shape:
                return None
            shifted = np.concatenate([np.zeros_like(spk[:1]), spk[:-1]])
            mismatches += int((prev.astype(bool) != shifted).sum())
            compared += spk.size
        if graph.shape != spk.shape:
            return None
        mismatches += int((graph.astype(bool) != spk).sum())
        compared += spk.size
        count += int(graph.astype(bool).sum())
    return None if paired else (mismatches, compared, count)


def verify_export(
    model: nn.Module,
    path: str | os.PathLike[str],
    inputs: torch.Tensor,
    *,
    backend: str = "qonnx",
) -> dict[str, Any]:
    """Compare an exported file with the PyTorch model on ``inputs`` (use inputs unseen at export).

    Spikes are compared element by element: every ``Greater`` output of the graph is paired with the
    time step of the ``MultiStepLeaky`` whose module scope it carries. When that pairing is impossible
    (dynamo-traced names, a layer called twice, other ``Greater`` ops) only total counts are compared.
    A step graph holds two spike tensors per layer and step (the pending reset recomputed from the
    carried-in membrane, and the new spike), so it compares twice as many spikes; both must match.

    Args:
        model: the model that was exported (same weights and quantizers).
        path: the exported file.
        inputs: ``[T, B, C, H, W]`` of the exported shape.
        backend: ``"qonnx"`` or ``"onnxruntime"``.

    Returns:
        ``{"backend", "executor", "mode", "max_abs_logit_error", "spike_mismatches", "spikes_compared",
        "spike_compare" ("elementwise", "total" or "unavailable", where the mismatch count is None),
        "spike_count_torch", "spike_count_export", "seconds"}``. ``executor`` says what ran the file:
        ``"onnxruntime"``, ``"qonnx-folded+onnxruntime"`` (qonnx backend, quantizer nodes evaluated once
        by qonnx, the rest one onnxruntime session without optimizations) or ``"qonnx"`` (qonnx's
        ``execute_onnx``, for graphs that cannot be folded, e.g. activation quantizers). Logits are
        compared with ``model(inputs)`` over all T. Step files add ``"max_abs_state_error"`` and
        ``"max_rel_state_error"``: final membranes against the model driven step by step in PyTorch.

    Raises:
        ValueError / FileNotFoundError: as :func:`run_export`.
    """
    _check_backend(backend)
    info = export_info(path)
    x = _check_example(model, inputs, "inputs")
    start = time.perf_counter()
    got, executor = _run(path, x, backend, spikes=True)
    seconds = time.perf_counter() - start
    ref_logits, calls, ref_mems = _torch_reference(model, x, info.get("states"))
    count_torch = int(sum(spk.sum() for _, spk in calls))
    count_export: int | None = int(sum(s.astype(bool).sum() for s in got["spikes"].values()))
    matched = _match_spikes(calls, got["spikes"], info["mode"])
    mismatches: int | None
    if matched is not None:
        mismatches, compared, count_export = matched
        how = "elementwise"
    elif info["mode"] == "unrolled":
        log.warning("cannot pair the graph's %d spike tensors with the model's layers; comparing totals",
                    len(got["spikes"]))
        mismatches, compared, how = abs(count_torch - count_export), 0, "total"
    else:  # step graphs also recompute the previous spike per layer, so totals say nothing
        log.warning("cannot pair the step graph's %d spike tensors with the model's layers",
                    len(got["spikes"]))
        mismatches, compared, how, count_export = None, 0, "unavailable", None
    report: dict[str, Any] = {
        "backend": backend,
        "executor": executor,
        "mode": info["mode"],
        "max_abs_logit_error": float(np.abs(got["logits"] - ref_logits).max()),
        "spike_mismatches": mismatches,
        "spikes_compared": compared,
        "spike_compare": how,
        "spike_count_torch": count_torch,
        "spike_count_export": count_export,
        "seconds": seconds,
    }
    if info["mode"] == "step":
        errors = {name: np.abs(got["states"][name] - ref).max() for name, ref in ref_mems.items()}
        report["max_abs_state_error"] = float(max(errors.values()))
        report["max_rel_state_error"] = float(
            max(err / max(float(np.abs(ref_mems[name]).max()), 1e-12) for name, err in errors.items())
        )
    log.info("verify %s (%s): %s", path, backend, report)
    return report
