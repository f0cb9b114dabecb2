"""Checking an export file against the PyTorch model: the torch reference (outputs, every neuron call's
spikes, step files' final membranes), the pairing of the graph's spike tensors with neuron calls by
module scope, :func:`check_qonnx_spec` (the file against the QONNX spec and qonnx's own cleanup and
datatype inference) and :func:`verify_export`."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from hq_ptq.devices import full_fp32, model_device
from hq_ptq.export.passes import _STANDARD_DOMAINS, QONNX_DOMAIN
from hq_ptq.export.runtime import _check_backend, _io_info, _run, resolve_providers
from hq_ptq.export.trace import (
    _check_example,
    _drive_steps,
    _export_state,
    _flat_outputs,
    _one_line,
    _StepGraph,
)
from hq_ptq.export.write import export_info
from hq_ptq.model_io import call
from hq_ptq.snn import MultiStepLeaky, explicit_membranes, is_spiking_neuron, is_spikingjelly_neuron

log = logging.getLogger("hq_ptq.export")  # the package's one logger, as before the split


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

    # float32 as onnxruntime computes it (its CUDA provider runs without TF32: runtime.CUDA_OPTIONS)
    with full_fp32(model_device(model)), _export_state(model), explicit_membranes(model) as layers:
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
) -> tuple[dict[str, tuple[int, int, int, int]], list[str], dict[str, tuple[str, np.ndarray]]]:
    """Pair the graph's spike tensors with the neurons' calls by module scope and call order.

    Returns ``{neuron: (mismatches, compared, spikes in the graph, spikes in PyTorch)}`` for every neuron
    whose calls could be paired, the names of the others, and ``{graph tensor: (neuron, where it differs
    from PyTorch)}`` for every paired tensor of an unrolled graph that differs. Unrolled graphs: a
    neuron's Greater nodes, sorted by (call suffixes of its scope, index in the scope), are its per-step
    spikes in call order (T per MultiStepLeaky call, one per call of a per-step neuron). A per-step
    snnTorch neuron whose pending reset does not merge with its previous spike (``reset_delay=False``:
    the reset is taken after the in-step reset) has a reset node per call too, before the spike (the
    first call's folds away): both are checked. Step graphs: one or two per layer and step (the pending
    reset recomputed from the carried-in membrane, which is the previous step's spike, then this step's
    spike); both are checked.
    """
    ref: dict[str, list[np.ndarray]] = {}
    resets: dict[str, list[np.ndarray | None]] = {}
    for name, spk, reset in calls:
        ref.setdefault(name, []).append(spk)
        resets.setdefault(name, []).append(reset)
    kinds = {name: isinstance(m, MultiStepLeaky) for name, m in _recorded_neurons(model)}
    modules = dict(model.named_modules())
    groups: dict[str, list[tuple[tuple[int, ...], str, np.ndarray]]] = {name: [] for name in ref}
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
            groups[owner].append(((*key, int(m["k"] or 0)), tensor, value))
    paired: dict[str, tuple[int, int, int, int]] = {}
    flips: dict[str, tuple[str, np.ndarray]] = {}
    for name, spikes in ref.items():
        ordered = sorted(groups[name], key=lambda kv: kv[0])
        graph = [v for _, _, v in ordered]
        if mode == "unrolled":
            compared = _compare_unrolled(spikes, resets[name], graph, kinds.get(name, False))
            result, masks = compared if compared is not None else (None, [])
            flips.update({t: (name, mask) for (_, t, _), mask in zip(ordered, masks) if mask.any()})
        else:
            result = _compare_step(spikes, graph)
        if result is not None:
            paired[name] = result
    return paired, [name for name in ref if name not in paired], flips


def _compare_unrolled(
    spikes: list[np.ndarray], resets: list[np.ndarray | None], graph: list[np.ndarray], multistep: bool
) -> tuple[tuple[int, int, int, int], list[np.ndarray]] | None:
    """``((mismatches, compared, graph spikes, PyTorch spikes), where each graph tensor differs)``, or None
    when the graph's tensors cannot be paired with the calls."""
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
    masks = [g.astype(bool) != e for g, (e, _) in pairs]
    mismatches = sum(int(mask.sum()) for mask in masks)
    count_graph = sum(int(g.astype(bool).sum()) for g, (_, spike) in pairs if spike)
    counts = (mismatches, sum(e.size for e, _ in expected), count_graph, sum(int(s.sum()) for s in steps))
    return counts, masks


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


# A flipped spike whose membrane in the file lies within this fraction of the tensor's typical distance
# from the threshold (its 99th percentile, so that a few far-off membranes do not set the scale) is
# consistent with float rounding: two float32 sums of the same terms in another order differ by a few ulps
# of their terms, so a membrane that close to the threshold may fire in one and not in the other
ROUNDING_MARGIN = 1e-4


def _first_flip(
    order: list[str], flips: Mapping[str, tuple[str, np.ndarray]], margins: Mapping[str, np.ndarray]
) -> dict[str, Any] | None:
    """The first spike tensor in the graph's node order that differs from PyTorch, and how far from firing
    the file's membranes were where it differs. Node order is topological, so no spike compared before it
    differs: its flips come from the arithmetic in front of it, not from a compared flip upstream (a
    neuron whose spikes are not compared, e.g. SpikingJelly's, could still have flipped before it). The
    file's distance is a lower bound on how far it is from PyTorch's membrane, which lies on the other
    side of the threshold."""
    for tensor in order:
        if tensor not in flips:
            continue
        neuron, mask = flips[tensor]
        first: dict[str, Any] = {"neuron": neuron, "tensor": tensor, "flips": int(mask.sum())}
        if tensor in margins:
            distance = np.abs(margins[tensor][0].astype(np.float64))
            worst, typical = float(distance[mask].max()), float(np.percentile(distance, 99))
            relative = worst / typical if typical > 0 else float("inf")
            first.update(max_margin=worst, relative_margin=relative, rounding=relative <= ROUNDING_MARGIN)
        return first
    return None


def _log_flips(mismatches: int, compared: int, first: dict[str, Any] | None, unpaired: list[str]) -> None:
    head = f"{mismatches} of {compared} compared spikes differ from PyTorch"
    tail = (f"; neurons {', '.join(unpaired)} are not compared, and a flip there would show here too"
            if unpaired else "")
    if first is None or "rounding" not in first:
        where = "" if first is None else f"; the first neuron that differs is {first['neuron']}"
        log.warning("%s%s%s", head, where, tail)
    elif first["rounding"]:
        log.warning(
            "%s; the first neuron that differs, %s, flips %d spikes whose membranes in the file lie within "
            "%.2g of the threshold (%.1g of the typical distance): consistent with float rounding near the "
            "threshold (the file sums in another order than PyTorch); later flips may follow from it and "
            "are not judged%s", head, first["neuron"], first["flips"], first["max_margin"],
            first["relative_margin"], tail)
    else:
        log.warning(
            "%s; the first neuron that differs, %s, flips %d spikes whose membranes in the file lie up to "
            "%.3g from the threshold (%.2g of the typical distance): more than float rounding, so the file "
            "computes something else in front of this neuron%s", head, first["neuron"], first["flips"],
            first["max_margin"], first["relative_margin"], tail)


# the QONNX operator spec (qonnx 1.0.0 docs/qonnx-custom-ops): the ops a QONNX consumer must accept;
# qonnx's other custom ops (MultiThreshold, Im2Col, ...) are FINN-internal, not part of the format
_QONNX_SPEC_OPS = frozenset({"Quant", "IntQuant", "BipolarQuant", "Trunc", "FloatQuant"})
_QONNX_DOMAINS = frozenset({QONNX_DOMAIN, "onnx.brevitas"})  # qonnx aliases the domain Brevitas writes


def _check_node(node: onnx.NodeProto, inits: Mapping[str, np.ndarray]) -> None:
    """Raise a one-line ValueError for a node outside the QONNX spec or a non-integer Quant weight."""
    from qonnx.custom_op.general.intquant import max_int, min_int
    from qonnx.custom_op.registry import getCustomOp

    what = f"node {node.name or '(unnamed)'} ({node.op_type})"
    if node.domain in _STANDARD_DOMAINS:
        if not onnx.defs.has(node.op_type):
            raise ValueError(f"{what} is not a standard ONNX op nor a QONNX op")
        return
    if node.domain not in _QONNX_DOMAINS or node.op_type not in _QONNX_SPEC_OPS:
        raise ValueError(f"{what} in domain {node.domain!r} is outside the QONNX spec")
    allowed = set(getCustomOp(node).get_nodeattr_types())
    extra = sorted(a.name for a in node.attribute if a.name not in allowed)
    if extra:
        raise ValueError(f"{what} has attribute(s) {', '.join(extra)} outside the QONNX spec")
    if node.op_type == "FloatQuant":
        mantissa = inits.get(node.input[3]) if len(node.input) > 3 else None
        if mantissa is None or np.any(mantissa < 1) or np.any(mantissa != np.round(mantissa)):
            raise ValueError(
                f"{what} has mantissa width {None if mantissa is None else mantissa.tolist()}, the spec "
                "needs a positive integer; export power-of-two weights with pot_as='int'"
            )
    if node.op_type in ("Quant", "IntQuant") and node.input[0] in inits:
        weight = inits[node.input[0]]
        bits = inits.get(node.input[3])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if np.any(weight != np.round(weight)):
            raise ValueError(
                f"{what}: its weight {node.input[0]} is not integer-valued (codes behind Quant expected)"
            )
        if bits is not None and weight.size:
            signed, narrow, k = bool(attrs.get("signed", 1)), bool(attrs.get("narrow", 0)), int(bits)
            low, high = min_int(signed, narrow, k), max_int(signed, narrow, k)
            if weight.min() < low or weight.max() > high:
                raise ValueError(
                    f"{what}: its weight {node.input[0]} leaves the container range [{low}, {high}]"
                )


def _expand_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with the exporter's ``ConstantOfShape`` compaction undone (constants back as initializers).

    qonnx's FoldConstants would fold each of them with a full shape inference and model copy (about
    2 s apiece on spikformer-tiny unrolled); the graph it then cleans is the same.
    """
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    shapes = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.domain in _STANDARD_DOMAINS and node.input[0] in shapes:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            value = attrs.get("value")  # ONNX's default is a float 0
            fill = np.zeros(1, np.float32) if value is None else onnx.numpy_helper.to_array(value).reshape(-1)
            graph.initializer.append(onnx.numpy_helper.from_array(
                np.full(shapes[node.input[0]], fill[0], dtype=fill.dtype), node.output[0]
            ))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return proto


# qonnx's passes are quadratic in the graph size (model copies, tensor look-ups by linear search):
# ~5 s on spikformer-tiny unrolled (332 nodes), ~3 min on a 1559-node unrolled SCNN
QONNX_CLEANUP_MAX_NODES = 600


def _weights_only(proto: onnx.ModelProto, quants: list[onnx.NodeProto]) -> onnx.ModelProto:
    """A model of just the weight ``Quant`` nodes and their initializers (for qonnx's InferDataTypes)."""
    names = {i for n in quants for i in n.input}
    graph = onnx.helper.make_graph(
        [onnx.NodeProto.FromString(n.SerializeToString()) for n in quants], "weights", [],
        [onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in quants],
        [i for i in proto.graph.initializer if i.name in names],
    )
    return onnx.helper.make_model(graph, opset_imports=list(proto.opset_import))


def check_qonnx_spec(path: str | os.PathLike[str], *, qonnx_cleanup: bool | None = None) -> dict[str, Any]:
    """Check a QONNX file against the QONNX spec with qonnx's own tools.

    Every node must be a standard ONNX op or a QONNX spec op (``Quant``/``IntQuant``, ``BipolarQuant``,
    ``Trunc``, ``FloatQuant`` with a positive mantissa width) with only the attributes qonnx defines for
    it; every weight a ``Quant`` node reads from an initializer must be integer codes inside the node's
    container. Then qonnx's ``cleanup_model`` and ``InferDataTypes`` run on the whole graph, and each
    weight ``Quant`` must keep its node and be inferred an integer datatype (unit scale: INTk).

    Args:
        path: a file from :func:`export_qonnx`.
        qonnx_cleanup: run qonnx's cleanup on the whole graph; by default only for graphs of at most
            ``QONNX_CLEANUP_MAX_NODES`` nodes (qonnx's passes are quadratic: minutes for a long unrolled
            graph); otherwise ``InferDataTypes`` runs on the weight quantizers alone.

    Returns:
        ``{"passed": True, "nodes": count, "qonnx_cleanup": bool, "weight_datatypes": {codes
        initializer: "INT4", ...}}``.

    Raises:
        ValueError: one line naming the first offending node, or the qonnx step that failed.
    """
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.util.cleanup import cleanup_model

    proto = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        _check_node(node, inits)
    quants = [n for n in proto.graph.node if n.op_type in ("Quant", "IntQuant") and n.input[0] in inits]
    if qonnx_cleanup is None:
        qonnx_cleanup = len(proto.graph.node) <= QONNX_CLEANUP_MAX_NODES
    try:
        if qonnx_cleanup:
            model = cleanup_model(ModelWrapper(_expand_constants(proto)))
        else:
            model = ModelWrapper(_weights_only(proto, quants))
        model = model.transform(InferDataTypes())
    except Exception as err:  # qonnx raises assorted types (AssertionError, KeyError, onnx errors)
        raise ValueError(f"qonnx cleanup/InferDataTypes fails on {path}: {_one_line(err)}") from None
    cleaned = [n for n in model.graph.node if n.op_type in ("Quant", "IntQuant")
               and model.get_initializer(n.input[0]) is not None]
    if len(cleaned) != len(quants):  # cleanup folds weight quantizers it does not preserve
        raise ValueError(f"qonnx cleanup kept {len(cleaned)} of {len(quants)} weight Quant nodes in {path}")
    datatypes: dict[str, str] = {}
    for original, node in zip(quants, cleaned, strict=True):
        dtype = model.get_tensor_datatype(node.output[0])
        if not dtype.is_integer():
            raise ValueError(
                f"qonnx infers {dtype.name} for the weight of node {original.name} (Quant); a unit-scale "
                "Quant over integer codes is inferred INTk"
            )
        datatypes[original.input[0]] = dtype.name
    return {"passed": True, "nodes": len(proto.graph.node), "qonnx_cleanup": qonnx_cleanup,
            "weight_datatypes": datatypes}


def verify_export(
    model: nn.Module,
    path: str | os.PathLike[str],
    inputs: Any,
    *,
    backend: str = "qonnx",
    provider: str | Sequence[str] = "auto",
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
        provider: the onnxruntime execution provider(s) that run the file
            (:func:`hq_ptq.export.runtime.resolve_providers`): ``"auto"`` (the default) is
            ``CUDAExecutionProvider`` when the model is on CUDA and onnxruntime has it, else the CPU;
            ``"cpu"``, ``"cuda"`` or onnxruntime provider names ask for those (a provider onnxruntime does not
            have here is a one-line ValueError naming the ones it has).

    Returns:
        ``{"backend", "executor", "mode", "output_errors" ({output name: max abs error}),
        "max_abs_output_error" (over all outputs), "max_abs_logit_error" (the same number, the name
        kept for format-1 callers), "spike_compare" ("elementwise": every neuron paired, "partial", or
        "not compared"), "spike_mismatches" (over the paired neurons; None when none was paired),
        "spikes_compared", "spikes_not_compared" (neuron names), "spike_count_torch",
        "spike_count_export" (spikes of the paired neurons; when none was paired, the model's total
        and the total of the file's Greater outputs, which are not comparable), "first_spike_flip",
        "seconds"}``. ``first_spike_flip`` is None when no compared spike differs, and for a step file
        (its flips are counted, not located); otherwise the first differing spike tensor in the graph's
        (topological) order: ``{"neuron", "tensor", "flips"}``, and where the spike's ``Greater`` compares a
        float tensor the graph computes, ``"max_margin"`` (the largest distance from the threshold, in the
        file, of a flipped membrane: a lower bound on its distance from PyTorch's), ``"relative_margin"``
        (that over the 99th percentile of the tensor's distances) and ``"rounding"`` (relative_margin <=
        1e-4: consistent with float rounding near the threshold; the flips after it are not judged).
        Any mismatch is logged at WARNING with that reading.
        ``executor`` says what ran the file: ``"onnxruntime"``, ``"qonnx-folded+onnxruntime"`` (qonnx
        backend, quantizer nodes evaluated once by qonnx, the rest one onnxruntime session without
        optimizations) or ``"qonnx"`` (qonnx's ``execute_onnx``, for graphs that cannot be folded, e.g.
        activation quantizers). ``spec_check``: :func:`check_qonnx_spec`'s result for a QONNX file, or
        ``{"passed": False, "error": message}`` (the outputs are compared all the same), or
        ``{"passed": None, "why": ...}`` for an onnxruntime file. ``providers``: the execution providers
        the onnxruntime session got, in order. Step files add ``"max_abs_state_error"``
        and ``"max_rel_state_error"``: final membranes against the model driven step by step in PyTorch.

    Raises:
        ValueError / FileNotFoundError: as :func:`run_export`, or a model whose outputs do not match the
        file's in number or shape.
    """
    _check_backend(backend)
    providers = resolve_providers(provider, on_cuda=model_device(model).type == "cuda")
    info = _io_info(export_info(path))
    x = _check_example(model, inputs, "inputs")
    start = time.perf_counter()
    # margins locate flips in unrolled files only (a step file's flips are counted, not located)
    got, executor = _run(path, x, backend, spikes=True, providers=providers,
                         margins=info["mode"] == "unrolled")
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
    paired, unpaired, flips = _match_spikes(model, calls, got["spikes"], info["mode"], info["scope_prefix"])
    # SpikingJelly's neurons are not recorded (their spikes in the graph are not paired with their calls)
    foreign = [n for n, m in model.named_modules() if is_spikingjelly_neuron(m)]
    if paired:
        how = "elementwise" if not (unpaired or foreign) else "partial"
        mismatches: int | None = sum(p[0] for p in paired.values())
        compared = sum(p[1] for p in paired.values())
        count_export = sum(p[2] for p in paired.values())
        count_torch = sum(p[3] for p in paired.values())
    else:
        how, mismatches, compared = "not compared", None, 0
        count_torch = int(sum(spk.sum() for _, spk, _ in calls))
        count_export = int(sum(s.astype(bool).sum() for s in got["spikes"].values()))
    first = _first_flip(list(got["spikes"]), flips, got.pop("margins", {}))
    del flips  # a mask per differing tensor, as large as the spikes: not kept through the spec check
    if mismatches:
        _log_flips(mismatches, compared, first, [*unpaired, *foreign])
    if unpaired:
        log.warning("cannot pair the graph's spike tensors with neuron(s) %s; their spikes are not compared "
                    "(the outputs are)", ", ".join(unpaired))
    if foreign:
        log.info("SpikingJelly neurons %s: their spikes are compared through the outputs only",
                 ", ".join(foreign))
    unpaired = [*unpaired, *foreign]
    if info.get("backend") == "onnxruntime":
        spec: dict[str, Any] = {"passed": None, "why": "an onnxruntime file is plain ONNX, not QONNX"}
    else:
        try:
            spec = check_qonnx_spec(path)
        except ValueError as err:
            spec = {"passed": False, "error": str(err)}
            log.warning("%s is outside the QONNX spec: %s", path, err)
    report: dict[str, Any] = {
        "backend": backend,
        "executor": executor,
        "providers": got["providers"],
        "mode": info["mode"],
        "output_errors": errors,
        "max_abs_output_error": max(errors.values()),
        "max_abs_logit_error": max(errors.values()),
        "spike_compare": how,
        "spike_mismatches": mismatches,
        "first_spike_flip": first,
        "spikes_compared": compared,
        "spikes_not_compared": unpaired,
        "spike_count_torch": count_torch,
        "spike_count_export": count_export,
        "seconds": seconds,
        "spec_check": spec,
    }
    if info["mode"] == "step":
        errs = {name: np.abs(got["states"][name] - ref).max() for name, ref in ref_mems.items()}
        report["max_abs_state_error"] = float(max(errs.values()))
        report["max_rel_state_error"] = float(
            max(err / max(float(np.abs(ref_mems[name]).max()), 1e-12) for name, err in errs.items())
        )
    log.info("verify %s (%s): %s", path, backend, report)
    return report
