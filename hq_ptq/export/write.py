"""Writing export files (:func:`export_qonnx`, :func:`export_onnxruntime`: trace, convert, compact, save
with the ``hq_ptq`` metadata) and reading the metadata back (:func:`export_info`)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import onnx
from onnx import helper
from torch import nn

from hq_ptq.export.passes import _compact_constants, _infer_shapes, _to_onnxruntime
from hq_ptq.export.trace import _build_qonnx
from hq_ptq.files import atomic_write

log = logging.getLogger("hq_ptq.export")  # the package's one logger, as before the split

META_KEY = "hq_ptq"


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
