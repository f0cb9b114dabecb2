"""Graph passes on the qonnx ``ModelWrapper``: constant folding (onnx's reference evaluator for standard
ops, qonnx for its custom ops), shape inference with the quantizers read as identities, the cleanup
after tracing, the QONNX → onnxruntime (QCDQ) conversion and the compaction of single-valued constants
before saving."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

# qonnx custom ops that stay as nodes in the QONNX file (constant folding would bake them away)
_QUANT_OPS = frozenset({"Quant", "IntQuant", "FloatQuant", "BipolarQuant", "Trunc"})
_STANDARD_DOMAINS = frozenset({"", "ai.onnx"})


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
