"""The integer model as a QONNX graph (:mod:`hq_ptq.integer_graph`): onnxruntime and the pure-integer NumPy
runner reproduce the integer model bit for bit (outputs and spikes), every integer tensor carries its QONNX
datatype, and the runner refuses what is not integer arithmetic."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import pytest
import snntorch as snn
import torch
from corpus import by_name
from onnx import TensorProto, helper, numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from test_integer import B, T, _batches, _calibrate_bn, _events, _mixed
from torch import nn

import hq_ptq
from hq_ptq.config import QATConfig, QuantConfig, SearchConfig
from hq_ptq.integer import IntegerLIF, integerize
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
    _runner_agrees(path, integer, fresh)


def _runner_agrees(path, integer, fresh) -> None:
    """The runner on ``fresh`` gives the integer model's every output (the export checked its example)."""
    got = run_integer_graph(path, [fresh.numpy()])
    with torch.no_grad():
        want = [t.double().numpy() for t in tensors(call(integer, fresh))]
    outputs = [o.name for o in onnx.load(str(path)).graph.output]
    assert len(outputs) == len(want)
    for name, w in zip(outputs, want, strict=True):
        assert np.array_equal(got[name], w)


class _ExplicitMembranes(nn.Module):
    """snnTorch's per-step idiom with explicit membranes (tutorial 5's pattern): ``init_hidden=False``,
    ``mem = lif.init_leaky()``, ``spk, mem = lif(cur, mem)`` in the model's own time loop over ``[T, B, 6]``
    event counts; it returns the output spikes and membranes. ``detach`` hands the hidden membrane back
    detached (truncated BPTT: a new tensor each step); ``record_hidden`` returns the hidden membrane too."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.lif1 = snn.Leaky(beta=0.5)
        self.fc2 = nn.Linear(8, 3)
        self.lif2 = snn.Leaky(beta=0.9)  # a fixed-point leak
        self.detach = self.record_hidden = False

    def forward(self, x):
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        spk_rec, mem_rec, hidden = [], [], []
        for x_t in x:
            spk1, mem1 = self.lif1(self.fc1(x_t), mem1.detach() if self.detach else mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            spk_rec.append(spk2)
            mem_rec.append(mem2)
            hidden.append(mem1)
        out = (torch.stack(spk_rec), torch.stack(mem_rec))
        return (*out, torch.stack(hidden)) if self.record_hidden else out


@pytest.fixture(scope="module")
def explicit() -> nn.Module:
    torch.manual_seed(0)
    model = _ExplicitMembranes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hq_ptq.quantize(model, 4, config=QuantConfig(search=SearchConfig(metric="data_free"),
                                                     qat=QATConfig(steps=0)))
    return model


@pytest.mark.parametrize("detach", [False, True])
def test_explicit_membranes_export_bit_exact(explicit, detach, tmp_path) -> None:
    model = copy.deepcopy(explicit)
    model.detach = detach
    example, fresh = _events((T, 2, 6), 1), _events((T, 2, 6), 2)
    integer, _ = integerize(model, [(example, None)])
    path = _exported(integer, example, tmp_path, "explicit")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    # the membrane handed back as it was stays integer in the graph; a new tensor (detached) comes back
    # through the float units and snnTorch's rounding, which the runner does as torch (half to even)
    assert ("Round" in ops) == detach
    _runner_agrees(path, integer, fresh)


def test_float_unit_membranes_must_be_fixed_point_to_be_exported(explicit, tmp_path) -> None:
    model = copy.deepcopy(explicit)
    model.lif1.threshold.fill_(0.8)  # the membrane's float units, m * 0.8 / 2^k, are not fixed point
    example = _events((T, 2, 6), 1)
    integer, _ = integerize(model, [(example, None)])
    # a membrane only handed back to its neuron never leaves the integers: the graph exports
    _runner_agrees(_exported(integer, example, tmp_path, "hidden"), integer, _events((T, 2, 6), 2))
    for flag in ("record_hidden", "detach"):  # an output, or read back through the float units
        setattr(integer, flag, True)
        with pytest.raises(ValueError, match=r"^lif1: hands its membrane back in float units \(threshold 0.8 "
                                             r"is not a power of two\), which an integer graph cannot carry"):
            export_integer_qonnx(integer, example, tmp_path / f"{flag}.onnx")
        setattr(integer, flag, False)

    class Hidden(nn.Module):  # init_hidden=True with output=True: (spk, mem) every step
        def __init__(self, threshold: float) -> None:
            super().__init__()
            self.lif = IntegerLIF(12, 6, 1, 0, "subtract", None, 1, 0, "net.lif", threshold=threshold,
                                  per_step=True, init_hidden=True, return_mem=True)

        def forward(self, x):
            return torch.stack([torch.stack(self.lif(x_t)) for x_t in x])

    x = torch.randint(0, 40, (3, 2, 5), generator=torch.Generator().manual_seed(0)).float()
    with pytest.raises(ValueError, match=r"^net.lif: hands its membrane back in float units"):
        export_integer_qonnx(Hidden(0.8), x, tmp_path / "h.onnx")
    _exported(Hidden(0.75), x, tmp_path, "h")  # m * 0.75 / 2^6: fixed point


def test_refuses_a_model_that_is_not_integer(tmp_path) -> None:
    with pytest.raises(ValueError, match="call hq_ptq.integerize"):
        export_integer_qonnx(torch.nn.Linear(2, 2), torch.zeros(1, 2), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="unrolled"):
        hq_ptq.export_qonnx(torch.nn.Linear(2, 2), torch.zeros(1, 2), tmp_path / "x.onnx", integer=True,
                            mode="step")


def _graph(nodes, inputs, init=()):
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = nodes if isinstance(nodes, list) else [nodes]
    graph = helper.make_graph(nodes, "g", inputs, [output], initializer=list(init))
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


def test_runner_rounds_half_to_even_as_torch() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [12])
    values = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.25, 0.75, -0.75, 3.0, -7.0, 1.375], np.float32)
    got = run_integer_graph(_graph(helper.make_node("Round", ["x"], ["y"]), [x]), [values])["y"]
    assert np.array_equal(got, torch.round(torch.from_numpy(values)).double().numpy())


def _one(op, shapes, consts=(), *, consts_first=False, **attrs):
    """A graph of one ``op`` on inputs ``a, b, ...`` of ``shapes`` and initializers ``c0, c1, ...`` (after
    the inputs, or before them)."""
    names = [chr(ord("a") + i) for i in range(len(shapes))]
    inputs = [helper.make_tensor_value_info(n, TensorProto.DOUBLE, s)
              for n, s in zip(names, shapes, strict=True)]
    init = [numpy_helper.from_array(np.asarray(c), f"c{i}") for i, c in enumerate(consts)]
    const_names = [f"c{i}" for i in range(len(consts))]
    node = helper.make_node(op, const_names + names if consts_first else names + const_names, ["y"], **attrs)
    return _graph(node, inputs, init)


def _full(shape, power):
    return np.full(shape, 2.0**power)


@pytest.mark.parametrize(("graph", "inputs"), [
    (_one("Mul", [[1], [1]]), [_full(1, 30), _full(1, 40)]),  # int64 would wrap to 0
    (_one("Add", [[1], [1]]), [_full(1, 62), _full(1, 62)]),
    (_one("Sub", [[1], [1]]), [_full(1, 62), -_full(1, 62)]),
    # each product fits, their sum does not
    (_one("MatMul", [[1, 4], [4, 1]]), [_full((1, 4), 31), _full((4, 1), 30)]),
    (_one("Gemm", [[1, 4], [1, 4]], transB=1), [_full((1, 4), 31), _full((1, 4), 30)]),
    (_one("Gemm", [[1, 1], [1, 1]], [_full(1, 62)]), [_full((1, 1), 31), _full((1, 1), 31)]),  # the bias
    (_one("Conv", [[1, 1, 4], [1, 1, 4]]), [_full((1, 1, 4), 31), _full((1, 1, 4), 30)]),
    (_one("ReduceSum", [[4]], keepdims=0), [_full(4, 61)]),
    (_one("ReduceMean", [[4]], keepdims=0), [_full(4, 61)]),
    (_one("Div", [[1]], [np.float32(2.0**-30)]), [_full(1, 40)]),
    (_one("Pow", [[1]], [np.float32(2.0)], consts_first=True), [np.array([63.0])]),  # 2^a
], ids=["Mul", "Add", "Sub", "MatMul", "Gemm", "Gemm-bias", "Conv", "ReduceSum", "ReduceMean", "Div", "Pow"])
def test_runner_refuses_int64_overflow_by_node(graph, inputs) -> None:
    with pytest.raises(ValueError, match=r"^node \w+ \(\w+\): int64 overflow: .* may reach 2\^"):
        run_integer_graph(graph, inputs)


def test_runner_overflow_bounds_are_tight() -> None:
    got = run_integer_graph(_one("Add", [[1], [1]]), [_full(1, 61), _full(1, 61) - 1])["y"]
    assert got[0] == 2.0**62 - 1
    got = run_integer_graph(_one("MatMul", [[1, 2], [2, 1]]), [_full((1, 2), 31), _full((2, 1), 30)])["y"]
    assert got[0, 0] == 2.0**62


def test_runner_checks_the_inputs_against_the_graph() -> None:
    identity = helper.make_node("Identity", ["x"], ["y"])
    fixed = _graph(identity, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])])
    with pytest.raises(ValueError, match=r"^input x: the graph declares shape \[1\], got \[2\]$"):
        run_integer_graph(fixed, [np.ones(2)])
    with pytest.raises(ValueError, match=r"^input x: the graph declares shape \[1\], got \[1, 1\]$"):
        run_integer_graph(fixed, [np.ones((1, 1))])
    with pytest.raises(ValueError, match=r"^the graph takes 1 inputs \(\['x'\]\), got 2$"):
        run_integer_graph(fixed, [np.ones(1), np.ones(1)])
    batch = _graph(identity, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])])
    assert run_integer_graph(batch, [np.ones((5, 3))])["y"].shape == (5, 3)  # a symbolic dimension: any
    with pytest.raises(ValueError, match=r"declares shape \['N', 3\], got \[5, 2\]"):
        run_integer_graph(batch, [np.ones((5, 2))])


def test_runner_structure_ops_follow_onnx() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    for axis, shape in ((2, (6, 1)), (0, (1, 6)), (-1, (2, 3)), (-2, (1, 6))):  # axis in [-r, r]
        flat = _graph(helper.make_node("Flatten", ["x"], ["y"], axis=axis), [x])
        assert run_integer_graph(flat, [np.arange(6.0).reshape(2, 3)])["y"].shape == shape
    image = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 3, 3])
    pool = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    with pytest.raises(ValueError, match=r"MaxPool with ceil_mode=1 is not supported"):
        run_integer_graph(_graph(pool, [image]), [np.ones((1, 1, 3, 3))])
    # a shape operand that is an integer carried with fractional bits (1.5 + 0.5, 2.5 + 0.5) reads as one
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, [2])
    half = numpy_helper.from_array(np.array([0.5, 0.5], np.float32), "h")
    add = helper.make_node("Add", ["s", "h"], ["shape"])
    reshape = helper.make_node("Reshape", ["x", "shape"], ["y"])
    values = np.arange(6.0).reshape(2, 3)
    got = run_integer_graph(_graph([add, reshape], [x, s], [half]), [values, np.array([1.5, 2.5])])["y"]
    assert got.shape == (2, 3)
    shape = helper.make_tensor_value_info("shape", TensorProto.FLOAT, [2])
    with pytest.raises(ValueError, match=r"\(Reshape\): a shape, axis or index operand that is not an int"):
        run_integer_graph(_graph(reshape, [x, shape]), [values, np.array([1.5, 4.0])])


def test_runner_casts_what_the_target_holds_exactly() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])

    def cast(to, values):
        return run_integer_graph(_graph(helper.make_node("Cast", ["x"], ["y"], to=to), [x]), [values])["y"]

    big = np.array([2.0**30, -(2.0**40) * 3])  # mantissas past 2^24, exact in float32
    assert np.array_equal(cast(TensorProto.FLOAT, big), big)
    assert np.array_equal(cast(TensorProto.FLOAT, np.array([0.375, -2.0**-20])), [0.375, -2.0**-20])
    with pytest.raises(ValueError, match=r"a cast to float of a value it does not hold exactly"):
        cast(TensorProto.FLOAT, np.array([2.0**24 + 1, 0.0]))
    with pytest.raises(ValueError, match=r"a cast to float16 of a value it does not hold"):
        cast(TensorProto.FLOAT16, np.array([2049.0, 0.0]))
    assert np.array_equal(cast(TensorProto.INT8, np.array([-128.0, 127.0])), [-128, 127])
    with pytest.raises(ValueError, match=r"a cast to int8 of a value outside its range"):
        cast(TensorProto.INT8, np.array([128.0, 0.0]))
    with pytest.raises(ValueError, match=r"an integer cast of a fixed-point value"):
        cast(TensorProto.INT64, np.array([1.5, 0.0]))
