"""The integer model as a QONNX graph (:mod:`hq_ptq.integer_graph`): onnxruntime and the pure-integer NumPy
runner reproduce the integer model bit for bit (outputs and spikes), every integer tensor carries its QONNX
datatype, and the runner refuses what is not integer arithmetic."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from corpus import by_name
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from test_integer import B, T, _batches, _calibrate_bn, _events, _mixed

import hq_ptq
from hq_ptq.config import QATConfig, QuantConfig, SearchConfig
from hq_ptq.integer import integerize
from hq_ptq.integer_graph import export_integer_qonnx, run_integer_graph
from hq_ptq.model_io import call, tensors
from hq_ptq.models import build_model


def _datatypes(path) -> dict[str, str]:
    proto = onnx.load(str(path))
    wrapped = ModelWrapper(proto)
    return {a.tensor_name: str(wrapped.get_tensor_datatype(a.tensor_name).name)
            for a in proto.graph.quantization_annotation}


def _exported(model, example, tmp_path, name):
    path = export_integer_qonnx(model, example, tmp_path / f"{name}.onnx")  # checks ORT + runner, bit for bit
    meta = dict((p.key, p.value) for p in onnx.load(str(path)).metadata_props)
    assert "hq_ptq.integer_graph/1" in meta["hq_ptq"]
    return path


@pytest.mark.parametrize("name", ["spikformer-tiny", "sdt-tiny"])
def test_zoo_integer_graph_is_bit_exact_and_annotated(name, tmp_path) -> None:
    torch.manual_seed(0)
    model = _mixed(_calibrate_bn(build_model(name, depth=1, num_classes=4), (T, B, 2, 32, 32)))
    integer, report = integerize(model, _batches((T, B, 2, 32, 32), 2), membrane_bits=12)
    x = _events((T, B, 2, 32, 32), 7)
    path = _exported(integer, x, tmp_path, name)
    types = _datatypes(path)
    proto = onnx.load(str(path))
    inits = {i.name for i in proto.graph.initializer}
    # every weight a Conv/MatMul reads from an initializer is integer-typed
    weights = [n.input[1] for n in proto.graph.node
               if n.op_type in ("Conv", "MatMul") and n.input[1] in inits]
    assert weights and all(types[w].startswith("INT") for w in weights)
    # one spike tensor per neuron, a membrane per neuron and step, and every threshold at the neuron width
    assert sum(t == "BINARY" for t in types.values()) == len(report.neurons)
    assert sum(t == "INT12" for t in types.values()) > len(report.neurons) * T
    thresholds = {n.input[1] for n in proto.graph.node if n.op_type == "Greater" and n.input[1] in types}
    assert thresholds and all(types[t] == "INT12" for t in thresholds)
    assert "FLOAT32" not in types.values()
    # the runner on fresh inputs equals the integer model (the export checked its example input)
    fresh = _events((T, B, 2, 32, 32), 8)
    with torch.no_grad():
        want = integer(fresh).double().numpy()
    got = run_integer_graph(path, [fresh.numpy()])
    assert np.array_equal(got[proto.graph.output[0].name], want)


def test_per_step_snntorch_model_exports_through_export_qonnx(tmp_path) -> None:
    entry = by_name("snntorch-tutorial7-csnn")  # snn.Leaky called once per step, the state passed in and out
    model = entry.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hq_ptq.quantize(model, 3.5, config=QuantConfig(search=SearchConfig(metric="data_free"),
                                                       qat=QATConfig(steps=0)))
    (example, _), (fresh, _) = entry.batches(2, 11)
    integer, _ = integerize(model, [(example, None)])
    path = hq_ptq.export_qonnx(integer, example, tmp_path / "t7.onnx", integer=True)
    got = run_integer_graph(path, [fresh.numpy()])
    with torch.no_grad():
        want = [t.double().numpy() for t in tensors(call(integer, fresh))]
    outputs = [o.name for o in onnx.load(str(path)).graph.output]
    assert len(outputs) == len(want)
    for name, w in zip(outputs, want, strict=True):
        assert np.array_equal(got[name], w)


def test_refuses_a_model_that_is_not_integer(tmp_path) -> None:
    with pytest.raises(ValueError, match="call hq_ptq.integerize"):
        export_integer_qonnx(torch.nn.Linear(2, 2), torch.zeros(1, 2), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="unrolled"):
        hq_ptq.export_qonnx(torch.nn.Linear(2, 2), torch.zeros(1, 2), tmp_path / "x.onnx", integer=True,
                            mode="step")


def _graph(node, inputs, init=()):
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "g", inputs, [output], initializer=list(init))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_runner_is_exact_dyadic_arithmetic() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    half = numpy_helper.from_array(np.array([0.25, 4.0, 0.5], np.float32), "d")
    div = _graph(helper.make_node("Div", ["x", "d"], ["y"]), [x], [half])
    got = run_integer_graph(div, [np.array([3.0, -5.0, 0.375], np.float32)])["y"]
    assert np.array_equal(got, np.array([12.0, -1.25, 0.75]))
    floor = _graph(helper.make_node("Floor", ["x"], ["y"]), [x])
    assert np.array_equal(run_integer_graph(floor, [np.array([-1.5, 2.75, -0.25])])["y"], [-2.0, 2.0, -1.0])
    mean = _graph(helper.make_node("ReduceMean", ["x"], ["y"], keepdims=0), [x])
    with pytest.raises(ValueError, match="not a power of two"):
        run_integer_graph(mean, [np.ones(3)])


def test_runner_refuses_what_is_not_integer_arithmetic() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    three = numpy_helper.from_array(np.array([3.0, 3.0], np.float32), "d")
    with pytest.raises(ValueError, match="not a power of two"):
        run_integer_graph(_graph(helper.make_node("Div", ["x", "d"], ["y"]), [x], [three]), [np.ones(2)])
    with pytest.raises(ValueError, match="not a fixed-point number"):
        run_integer_graph(_graph(helper.make_node("Identity", ["x"], ["y"]), [x]), [np.array([0.1, 1.0])])
    with pytest.raises(ValueError, match="op Sigmoid is not supported"):
        run_integer_graph(_graph(helper.make_node("Sigmoid", ["x"], ["y"]), [x]), [np.ones(2)])
