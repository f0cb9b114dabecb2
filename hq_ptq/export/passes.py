"""Graph passes on the qonnx ``ModelWrapper``: constant folding (onnx's reference evaluator for standard
ops, qonnx for its custom ops), shape inference with the quantizers read as identities, the cleanup
after tracing, weight quantizers rewritten as ``Quant`` over integer codes (:func:`_int_weights`), the
QONNX → onnxruntime (QCDQ) conversion and the compaction of single-valued constants before saving."""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

# qonnx custom ops that stay as nodes in the QONNX file (constant folding would bake them away)
_QUANT_OPS = frozenset({"Quant", "IntQuant", "FloatQuant", "BipolarQuant", "Trunc"})
_STANDARD_DOMAINS = frozenset({"", "ai.onnx"})


# ops whose output is an ONNX sequence (a scripted loop's list of per-step tensors); never folded
_SEQUENCE_OPS = frozenset({"SequenceEmpty", "SequenceConstruct", "SequenceInsert", "SequenceErase",
                           "SplitToSequence"})


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
        if _subgraphs(node):
            # a Loop/If/Scan body may read values of the enclosing graph that are not among the node's
            # inputs (a TorchScript-scripted time loop, e.g. SpikingJelly's multi-step LIF, reads its input
            # sequence that way), so constant inputs do not make it constant
            continue
        if node.op_type in _SEQUENCE_OPS:  # a folded sequence would become a (float64) tensor initializer
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
    _sort_nodes(qmodel.model.graph)
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


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node holds as attributes: a Loop's or Scan's body, an If's branches."""
    out: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out


def _reads(node: onnx.NodeProto) -> set[str]:
    """What a node reads from its graph: its inputs and what its subgraphs read from around them."""
    read = {i for i in node.input if i}
    for sub in _subgraphs(node):
        defined = {i.name for i in sub.input} | {i.name for i in sub.initializer}
        inner: set[str] = set()
        for n in sub.node:
            inner |= _reads(n)
            defined.update(n.output)
        read |= inner - defined
    return read


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Order the nodes so that each comes after every node whose output it reads, counting what a node's
    subgraphs read from this graph (qonnx's passes sort on explicit inputs only, and so put a scripted time
    loop whose explicit inputs are constants before the node that makes its input sequence). Stable: nodes
    already in order stay where they are."""
    nodes = list(graph.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    needs = [{producer[r] for r in _reads(node) if r in producer} for node in nodes]
    # Kahn's algorithm, always taking the earliest ready node: iterative (an unrolled graph is a chain of
    # thousands of nodes) and stable
    users: list[list[int]] = [[] for _ in nodes]
    waiting = [len(d) for d in needs]
    for k, deps in enumerate(needs):
        for d in deps:
            users[d].append(k)
    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    placed: list[int] = []
    while ready:
        k = heapq.heappop(ready)
        placed.append(k)
        for u in users[k]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(placed) < len(nodes):
        stuck = nodes[next(k for k, w in enumerate(waiting) if w)]
        raise ValueError(f"the exported graph has a cycle through {stuck.name or stuck.op_type}")
    if placed != list(range(len(nodes))):
        del graph.node[:]
        graph.node.extend(nodes[k] for k in placed)


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


# ---------------------------------------------------------------------------------------------
# weights as integer codes behind spec-valid Quant nodes

POT_AS = ("int", "float")  # how export_qonnx writes power-of-two weights
QONNX_DOMAIN = "qonnx.custom_op.general"
# keys of the metadata_props entries on each weight Quant node (standard NodeProto field, so the
# Quant node itself keeps only the attributes the QONNX spec defines)
WEIGHT_KIND_KEY = "hq_ptq.weight_kind"
POT_EXPONENTS_KEY = "hq_ptq.pot_exponents"
SCHEME_BITS_KEY = "hq_ptq.scheme_bits"


def _narrow_int_bits(largest: int) -> int:
    """The fewest bits of a signed narrow-range integer (``±(2^(k-1)-1)``) that hold ``±largest``."""
    bits = 2
    while 2 ** (bits - 1) - 1 < largest:
        bits += 1
    return bits


def _constant_inputs(model: Any, node: onnx.NodeProto) -> list[np.ndarray] | None:
    values = [model.get_initializer(name) if name else None for name in node.input]
    return None if any(v is None for v in values) else values


def _weight_codes(model: Any, node: onnx.NodeProto) -> dict[str, Any] | None:
    """Integer codes, scale and container of a weight quantizer node, or None for any other node.

    A uniform ``Quant(W, s, 0, b)`` gives ``codes = round(Quant(W)/s)`` in INTb (the node's signed and
    narrow kept; hq_ptq's uniform scheme is signed narrow). A power-of-two
    ``FloatQuant(W, s_f, E, 0, bias, ·)`` has the levels ``{0, ±s_f·2^e, e = 1-bias … 2^E-1-bias}``: with
    the smallest level ``s = s_f·2^(1-bias)`` as scale, the codes are ``0, ±2^j, j = 0 … 2^E-2``, in the
    smallest narrow signed container. Raises when ``codes·scale`` is not the node's output bit for bit
    (the conversion must not move a single weight).
    """
    from qonnx.custom_op.general.intquant import max_int, min_int
    from qonnx.custom_op.registry import getCustomOp

    if node.domain in _STANDARD_DOMAINS or node.op_type not in ("Quant", "IntQuant", "FloatQuant"):
        return None
    inputs = _constant_inputs(model, node)
    if inputs is None:
        return None  # an activation quantizer: its input is not a weight
    ctx = dict(zip(node.input, inputs, strict=True))
    getCustomOp(node).execute_node(ctx, model.graph)
    value = np.asarray(ctx[node.output[0]], dtype=np.float32)
    if node.op_type == "FloatQuant":
        exp_bits, mant_bits, bias = (float(np.asarray(inputs[i]).reshape(-1)[0]) for i in (2, 3, 4))
        if mant_bits != 0:
            return None  # a real minifloat: spec-valid as it is
        levels = 2 ** int(exp_bits) - 1  # nonzero magnitudes
        scale = (np.asarray(inputs[1], dtype=np.float32) * np.float32(2.0 ** (1 - bias))).astype(np.float32)
        bits, kind, scheme_bits = _narrow_int_bits(2 ** (levels - 1)), "pot", int(exp_bits) + 1
        signed, narrow = 1, 1
    else:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if np.any(inputs[2] != 0):
            return None  # asymmetric: codes alone would not say the zero point; leave it as it is
        signed, narrow = int(attrs.get("signed", 1)), int(attrs.get("narrow", 0))
        scale = np.asarray(inputs[1], dtype=np.float32)
        bits, kind = int(np.asarray(inputs[3]).reshape(-1)[0]), "uniform"
        scheme_bits = bits
    codes = np.round(value.astype(np.float64) / scale.astype(np.float64))
    low, high = min_int(signed, narrow, bits), max_int(signed, narrow, bits)
    exact = np.array_equal((codes.astype(np.float32) * scale).astype(np.float32), value)
    if not exact or codes.min(initial=0) < low or codes.max(initial=0) > high:
        # never expected: the node's own output is an integer grid times its scale
        raise ValueError(
            f"weight quantizer {node.name} ({node.op_type}) is not integer codes in [{low}, {high}] times "
            "its scale; export it with pot_as='float' or report the model"
        )
    return {"codes": codes.astype(np.float32), "scale": scale, "value": value, "bits": bits, "kind": kind,
            "signed": signed, "narrow": narrow, "scheme_bits": scheme_bits,
            "levels": levels if kind == "pot" else None}


def _int_weights(model: Any, pot_as: str, scaled: bool) -> dict[str, dict[str, Any]]:
    """Rewrite every weight quantizer as a spec-valid ``Quant`` node over integer codes, in place.

    ``scaled=False`` (QONNX files): ``Quant(codes, 1, 0, k) → Mul(scale)``: the quantizer's input is
    the integer code tensor, qonnx infers INTk for its output, and the per-channel scale is a separate
    constant ``Mul`` (Quant with a scale s would compute s·round(codes/s), not codes·s).
    ``scaled=True`` (the onnxruntime file, for QuantToQCDQ): ``Quant(codes·scale, scale, 0, k)``, the
    same values with the scale inside, so QCDQ carries a per-channel DequantizeLinear scale; weights
    wider than 8 bits (PoT of 5+ bits), which QCDQ cannot hold, become float initializers.
    ``pot_as="float"`` leaves power-of-two ``FloatQuant`` nodes as Brevitas wrote them.

    Returns ``{codes tensor name: {kind, bits, container, scale, pot_exponents}}`` for the metadata.
    """
    if pot_as not in POT_AS:
        raise ValueError(f"unknown pot_as {pot_as!r}; choose one of {', '.join(map(repr, POT_AS))}")
    graph = model.graph
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    graph_outputs = {o.name for o in graph.output}
    summary: dict[str, dict[str, Any]] = {}
    new_nodes: list[onnx.NodeProto] = []
    # a layer called once per time step is traced as one quantizer per call, all on the same weight:
    # the first call's Quant → Mul serves the others (identical codes and scale)
    converted: dict[str, tuple[dict[str, Any], str]] = {}
    renames: dict[str, str] = {}
    for node in list(graph.node):
        if node.op_type == "FloatQuant" and pot_as == "float":
            new_nodes.append(node)
            continue
        found = _weight_codes(model, node)
        if found is None:
            new_nodes.append(node)
            continue
        weight, out = node.input[0], node.output[0]
        # the codes take the weight's name (fc1.weight) unless the float weight is shared
        codes_name = weight if consumers.get(weight, 0) == 1 else f"{weight}_codes"
        if weight in converted:
            first, first_out = converted[weight]
            same = first["bits"] == found["bits"] and all(
                np.array_equal(first[k], found[k]) for k in ("codes", "scale")
            )
            if same and not scaled and out not in graph_outputs:
                renames[out] = first_out
                continue
            if not same:  # another quantizer on the same weight: tensors of its own
                codes_name = f"{weight}_codes_{node.name}"
        bits, scale = found["bits"], found["scale"]
        if scaled and bits > 8:
            model.set_initializer(out, found["value"])
            continue
        model.set_initializer(f"{codes_name}_bitwidth", np.asarray(bits, dtype=np.float32))
        model.set_initializer(f"{codes_name}_zero_point", np.asarray(0.0, dtype=np.float32))
        model.set_initializer(f"{codes_name}_scale", scale)
        if scaled:
            model.set_initializer(codes_name, found["value"])
            quant_in, quant_out = [codes_name, f"{codes_name}_scale"], out
        else:
            model.set_initializer(codes_name, found["codes"])
            model.set_initializer(f"{codes_name}_unit_scale", np.asarray(1.0, dtype=np.float32))
            quant_in, quant_out = [codes_name, f"{codes_name}_unit_scale"], f"{codes_name}_int"
        quant = helper.make_node(
            "Quant", [*quant_in, f"{codes_name}_zero_point", f"{codes_name}_bitwidth"], [quant_out],
            domain=QONNX_DOMAIN, name=node.name, signed=found["signed"], narrow=found["narrow"],
            rounding_mode="ROUND",
        )
        container = f"{'' if found['signed'] else 'U'}INT{bits}"
        entry: dict[str, Any] = {"kind": found["kind"], "scheme_bits": found["scheme_bits"],
                                 "container": container, "scale": f"{codes_name}_scale"}
        if found["kind"] == "pot":
            entry["pot_exponents"] = list(range(found["levels"]))  # |code| = 2^j: one shift per weight
        props = {WEIGHT_KIND_KEY: entry["kind"], SCHEME_BITS_KEY: str(entry["scheme_bits"])}
        if "pot_exponents" in entry:
            props[POT_EXPONENTS_KEY] = ",".join(map(str, entry["pot_exponents"]))
        helper.set_metadata_props(quant, props)
        new_nodes.append(quant)
        if not scaled:
            new_nodes.append(helper.make_node(
                "Mul", [quant_out, f"{codes_name}_scale"], [out], name=f"{node.name}_scale"
            ))
        converted.setdefault(weight, (found, out))
        summary[codes_name] = entry
    for node in new_nodes:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return summary
