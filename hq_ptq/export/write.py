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

from hq_ptq.export.passes import (
    POT_AS,
    _compact_constants,
    _infer_shapes,
    _int_weights,
    _to_onnxruntime,
    _transform,
)
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
    pot_as: str,
) -> Path:
    from qonnx.transformation.general import GiveUniqueNodeNames, RemoveUnusedTensors

    start = time.perf_counter()
    if pot_as not in POT_AS:  # before tracing: a typo should not cost an export
        raise ValueError(f"unknown pot_as {pot_as!r}; choose one of {', '.join(map(repr, POT_AS))}")
    qmodel, meta = _build_qonnx(model, example_input, mode, dynamo, allow_float, time_dim)
    weights = _int_weights(qmodel, pot_as, scaled=backend == "onnxruntime")
    qmodel = _infer_shapes(_transform(qmodel, RemoveUnusedTensors(), GiveUniqueNodeNames()))
    if backend == "onnxruntime":
        qmodel = _to_onnxruntime(qmodel)
    else:
        meta["weights"] = weights
    meta["pot_as"] = pot_as
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
    pot_as: str = "int",
    integer: bool = False,
) -> Path:
    """Write ``model`` as a QONNX file whose weights are integer codes behind spec-valid ``Quant`` nodes.

    With ``integer=True``, ``model`` is an :func:`hq_ptq.integerize` model and the file is its integer-only
    graph (:func:`hq_ptq.integer_graph.export_integer_qonnx`: integer datatypes annotated on every weight,
    requantization constant, threshold, membrane and spike, checked bit for bit in onnxruntime and in the
    pure-integer NumPy runner); only ``mode="unrolled"`` applies then.

    The model is traced in eval mode with surrogate gradients off and its snnTorch neurons' hidden
    states reset; its training flags and neuron states are restored. Constants are folded except the
    quantizer nodes. Each quantized weight is an integer initializer (the codes) behind a ``Quant``
    node with scale 1 (qonnx infers INTk), then a ``Mul`` by its per-output-channel scale: exactly the
    values PyTorch computes. Uniform b-bit: INTb; power of two: the codes ``0, ±2^j`` in the smallest
    narrow container (2-bit INT2, 3-bit INT4, 4-bit INT8, 5-bit INT16, 6-bit INT32), marked by the
    node's ``metadata_props`` ``hq_ptq.weight_kind`` / ``hq_ptq.pot_exponents`` and listed in the
    file's metadata under ``"weights"``. Check a file with :func:`hq_ptq.export.check_qonnx_spec`.

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
        pot_as: ``"int"`` (power-of-two weights as integer codes behind ``Quant``) or ``"float"``
            (Brevitas' ``FloatQuant`` with 0 mantissa bits: exact, but outside the QONNX spec, which
            needs a positive mantissa width, and not folded by FINN).

    Returns:
        The written path.

    Raises:
        ValueError: unknown mode or pot_as, no quantized layer, an example input that holds no tensor or
            that the model rejects, a model that returns no tensor, or (step) a neuron outside
            MultiStepLeaky, a layer called twice, fewer than 2 time steps, inputs of different lengths
            along ``time_dim`` or a readout that is not a mean, sum, last step or stack over time. Nothing
            is written then.

    Example:
        >>> x, _ = next(iter(loader))  # [T, B, 2, H, W], the batch size the runtime will use
        >>> path = export_qonnx(qmodel, x, "model.qonnx.onnx", mode="step")
        >>> verify_export(qmodel, path, next_batch)["max_abs_output_error"]
    """
    if integer:
        from hq_ptq.integer_graph import export_integer_qonnx  # noqa: PLC0415 - the integer path only

        if mode != "unrolled" or dynamo:
            raise ValueError("export_qonnx(integer=True) writes the unrolled TorchScript trace only; "
                             "drop mode/dynamo")
        return export_integer_qonnx(model, example_input, path)
    return _export(model, example_input, path, mode, "qonnx", dynamo, allow_float, time_dim, pot_as)


def export_onnxruntime(
    model: nn.Module,
    example_input: Any,
    path: str | os.PathLike[str],
    *,
    mode: str = "unrolled",
    dynamo: bool = False,
    allow_float: bool = False,
    time_dim: int = 0,
    pot_as: str = "int",
) -> Path:
    """Write ``model`` as a plain ONNX file for onnxruntime: weights as QCDQ integer codes.

    Arguments, layouts and errors as :func:`export_qonnx`. Weights of up to 8-bit containers (uniform,
    PoT of 2-4 bits) keep their integer codes as QuantizeLinear → Clip → DequantizeLinear with the
    per-channel scale; wider PoT weights (5-6 bits), and every PoT weight with ``pot_as="float"``,
    become float initializers holding exactly the PoT values. There is no activation quantization, so
    onnxruntime's default optimizations reproduce PyTorch (measured); :func:`run_export` still sets
    ``session.disable_quant_qdq = "1"``, because with activation QDQ nodes onnxruntime's QDQ fusions
    re-quantize float weights into integer kernels and move outputs by about 1e-2.

    Raises:
        ValueError: as :func:`export_qonnx`, or a quantizer with no onnxruntime equivalent.
    """
    return _export(model, example_input, path, mode, "onnxruntime", dynamo, allow_float, time_dim, pot_as)


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
