from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import onnx
import pytest
import snntorch as snn
import torch
from snntorch import utils
from torch import nn

pytest.importorskip("qonnx")
pytest.importorskip("onnxruntime")

from conftest import calibrate_bn  # noqa: E402

from hq_ptq.export import (  # noqa: E402
    check_qonnx_spec,
    export_info,
    export_onnxruntime,
    export_qonnx,
    run_export,
    verify_export,
)
from hq_ptq.export.runtime import _run  # noqa: E402
from hq_ptq.models import build_model  # noqa: E402
from hq_ptq.models.layers import SeqMaxPool, conv2d_bn  # noqa: E402
from hq_ptq.pipeline import export_reproduces  # noqa: E402
from hq_ptq.schemes import weight_codes  # noqa: E402
from hq_ptq.snn import MultiStepLeaky, explicit_membranes  # noqa: E402
from hq_ptq.swap import quant_layers, set_layer_quant, swap_layers  # noqa: E402

T, B = 2, 2
TOL = 1e-5


class TinySNN(nn.Module):
    """Conv-BN-LIF-pool, Linear-LIF, Linear head averaged over time: the zoo's structure in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv2d_bn(2, 8)
        self.lif1 = MultiStepLeaky(0.5, 0.5)
        self.pool = SeqMaxPool()
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.lif2 = MultiStepLeaky(0.5, 0.5)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.pool(self.lif1(self.stem(x)))
        s = self.lif2(self.fc1(s.flatten(2)))
        return self.head(s).mean(0)


def _events(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).round()


def _calibrate_bn(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    return calibrate_bn(model, shape, _events)


def _quantize(model: nn.Module, plan: str) -> nn.Module:
    if plan == "pot":
        swap_layers(model, scheme="pot", bits=3)
    else:
        swap_layers(model, scheme="uniform", bits=4)
    if plan == "mixed":
        for i, layer in enumerate(quant_layers(model).values()):
            if i % 2:
                set_layer_quant(layer, "pot", 4)
    return model


def _tiny(plan: str = "mixed", seed: int = 0) -> TinySNN:
    torch.manual_seed(seed)
    return _quantize(_calibrate_bn(TinySNN(), (T, B, 2, 8, 8)), plan)


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _check_report(report: dict, mode: str) -> None:
    assert report["mode"] == mode
    assert report["max_abs_logit_error"] <= TOL
    assert report["spike_compare"] == "elementwise"
    assert report["spikes_compared"] > 0 and report["spike_count_torch"] > 0  # not zeros vs zeros
    assert report["spike_mismatches"] == 0
    assert report["spike_count_export"] == report["spike_count_torch"]
    if mode == "step":
        assert report["max_rel_state_error"] <= TOL
    if report["backend"] == "qonnx":
        assert report["spec_check"]["passed"] is True, report["spec_check"]


# ---------------------------------------------------------------------------------------------
# MultiStepLeaky step mode


@pytest.mark.parametrize("reset", ["zero", "subtract", "none"])
@pytest.mark.parametrize("general", [False, True], ids=["fast", "general"])
def test_multistep_leaky_continues_exactly_from_a_carried_membrane(reset: str, general: bool) -> None:
    x = torch.randn(6, 3, 5, generator=torch.Generator().manual_seed(0)) * 1.5
    layer = MultiStepLeaky(0.5, 1.0, reset_mechanism=reset, return_mem=True)
    layer.lif.reset_delay = not general
    full_spk, full_mem = layer(x)
    with explicit_membranes(nn.Sequential(layer)) as layers:
        assert layers == [("0", layer)]
        spikes = []
        for x_t in x:
            spk, _ = layer(x_t[None])
            spikes.append(spk[0])
            layer.initial_mem = layer.final_mem
        assert torch.equal(layer.final_mem, full_mem[-1])
    assert torch.equal(torch.stack(spikes), full_spk)
    assert 0 < full_spk.mean() < 1
    assert layer.initial_mem is None and layer.final_mem is None and not layer.record_final_mem


def test_multistep_leaky_defaults_untouched_and_initial_mem_checked() -> None:
    layer = MultiStepLeaky()
    x = torch.randn(4, 2, 3)
    layer(x)
    assert layer.final_mem is None  # nothing recorded outside explicit_membranes
    layer.initial_mem = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="initial_mem has shape"):
        layer(x)


# ---------------------------------------------------------------------------------------------
# round trips on a tiny spiking net: every plan, both modes, both backends


@pytest.mark.parametrize("mode", ["unrolled", "step"])
@pytest.mark.parametrize("plan", ["uniform", "pot", "mixed"])
def test_round_trip_tiny(tmp_path, plan: str, mode: str) -> None:
    model = _tiny(plan)
    fresh = _events((T, B, 2, 8, 8), 1)

    qpath = export_qonnx(model, _events((T, B, 2, 8, 8), 0), tmp_path / "m.onnx", mode=mode)
    ops = _ops(qpath)
    assert "Quant" in ops and "FloatQuant" not in ops  # PoT weights too are integer codes behind Quant
    assert {"Greater", "Conv", "Gemm"} <= ops or {"Greater", "Conv", "MatMul"} <= ops
    _check_report(verify_export(model, qpath, fresh, backend="qonnx"), mode)

    rpath = export_onnxruntime(model, _events((T, B, 2, 8, 8), 0), tmp_path / "m_ort.onnx", mode=mode)
    proto = onnx.load(str(rpath))
    onnx.checker.check_model(proto)
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    assert "QuantizeLinear" in _ops(rpath)  # 3- and 4-bit PoT codes fit INT4 / INT8 QCDQ
    _check_report(verify_export(model, rpath, fresh, backend="onnxruntime"), mode)


@pytest.mark.parametrize("pot_as", ["int", "float"])
def test_pot_weights_in_the_ort_file_are_exact_powers_of_two(tmp_path, pot_as: str) -> None:
    model = _tiny("pot")
    path = export_onnxruntime(model, _events((T, B, 2, 8, 8), 0), tmp_path / "pot.onnx", pot_as=pot_as)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    layer = model.fc1
    w = layer.quant_weight().value.detach().numpy()
    # "int": the QuantizeLinear input of the QCDQ weight; "float": a folded constant (MatMul takes w.T)
    match = [a for a in inits.values() if any(a.shape == v.shape and np.array_equal(a, v) for v in (w, w.T))]
    assert match, "fc1's PoT weight is not stored bit-exactly"
    scale = np.abs(w).max(axis=1, keepdims=True)
    ratio = np.abs(w[w != 0]) / np.broadcast_to(scale, w.shape)[w != 0]
    assert np.array_equal(np.exp2(np.round(np.log2(ratio))), ratio)


def test_step_file_metadata_and_any_number_of_steps(tmp_path) -> None:
    model = _tiny("mixed")
    path = export_qonnx(model, _events((T, B, 2, 8, 8), 0), tmp_path / "step.onnx", mode="step")
    info = export_info(path)
    assert info["mode"] == "step" and info["input"] == "x_t" and info["input_shape"] == [B, 2, 8, 8]
    assert [s["neuron"] for s in info["states"]] == ["lif1", "lif2"]
    assert [s["shape"] for s in info["states"]] == [[B, 8, 8, 8], [B, 32]]
    assert info["quant_layers"] == {"stem.conv": ["uniform", 4], "fc1": ["pot", 4], "head": ["uniform", 4]}
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["x_t", "mem_0", "mem_1"]
    assert [o.name for o in graph.output] == ["logits_t", "mem_0_next", "mem_1_next"]
    # T is not baked into a step file: run 5 steps from an export traced with 2
    _check_report(verify_export(model, path, _events((5, B, 2, 8, 8), 3)), "step")
    # a non-Python runtime finds the state list in the model metadata
    import onnxruntime as ort

    rpath = export_onnxruntime(model, _events((T, B, 2, 8, 8), 0), tmp_path / "step_ort.onnx", mode="step")
    meta = ort.InferenceSession(str(rpath)).get_modelmeta().custom_metadata_map
    assert json.loads(meta["hq_ptq"])["states"] == info["states"]


def test_unrolled_file_bakes_time_and_batch(tmp_path) -> None:
    model = _tiny("uniform")
    path = export_qonnx(model, _events((T, B, 2, 8, 8), 0), tmp_path / "u.onnx")
    assert export_info(path)["input_shape"] == [T, B, 2, 8, 8]
    with pytest.raises(ValueError, match="exported for"):
        run_export(path, _events((T, B + 1, 2, 8, 8), 1))
    step = export_qonnx(model, _events((T, B, 2, 8, 8), 0), tmp_path / "s.onnx", mode="step")
    with pytest.raises(ValueError, match="B is baked in"):
        run_export(step, _events((T, B + 1, 2, 8, 8), 1))


def test_export_leaves_the_model_as_it_was(tmp_path) -> None:
    model = _tiny("mixed")
    model.train()
    spike_grad = model.lif1.lif.spike_grad
    x = _events((T, B, 2, 8, 8), 5)
    with torch.no_grad():
        before = model.eval()(x)
    model.train()
    export_qonnx(model, x, tmp_path / "a.onnx", mode="step")
    export_onnxruntime(model, x, tmp_path / "b.onnx")
    assert all(m.training for m in model.modules())
    assert model.lif1.lif.spike_grad is spike_grad
    assert model.lif1.initial_mem is None and model.lif1.final_mem is None
    with torch.no_grad():
        assert torch.equal(model.eval()(x), before)


@pytest.mark.parametrize("export", [export_qonnx, export_onnxruntime], ids=["qonnx", "onnxruntime"])
def test_re_export_is_byte_identical(tmp_path, export) -> None:
    model = _tiny("mixed")
    x = _events((T, B, 2, 8, 8), 0)
    first = export(model, x, tmp_path / "a.onnx", mode="step").read_bytes()
    assert export(model, x, tmp_path / "b.onnx", mode="step").read_bytes() == first


def test_dynamo_exporter_gives_the_same_numbers(tmp_path) -> None:
    model = _tiny("mixed")
    path = export_qonnx(model, _events((T, B, 2, 8, 8), 0), tmp_path / "d.onnx", mode="step", dynamo=True)
    assert "Quant" in _ops(path) and "FloatQuant" not in _ops(path)
    report = verify_export(model, path, _events((T, B, 2, 8, 8), 1))
    assert report["max_abs_logit_error"] <= TOL and report["max_rel_state_error"] <= TOL
    assert report["spec_check"]["passed"] is True


# ---------------------------------------------------------------------------------------------
# how the qonnx backend runs a file


@pytest.mark.parametrize(("net", "mode"), [("tiny", "unrolled"), ("tiny", "step"), ("spikformer", "step")])
def test_qonnx_fast_path_equals_qonnx_execute_onnx(tmp_path, request, net: str, mode: str) -> None:
    # uniform and PoT layers, both integer codes behind Quant
    model = _tiny("mixed") if net == "tiny" else request.getfixturevalue("spikformer")
    size = 8 if net == "tiny" else 32
    path = export_qonnx(model, _events((T, B, 2, size, size), 0), tmp_path / "m.onnx", mode=mode)
    x = _events((T if mode == "unrolled" else 3, B, 2, size, size), 1)
    fast, fast_executor = _run(path, x, "qonnx", spikes=True)
    slow, slow_executor = _run(path, x, "qonnx", spikes=True, fold=False)
    assert (fast_executor, slow_executor) == ("qonnx-folded+onnxruntime", "qonnx")
    assert np.array_equal(fast["logits"], slow["logits"])
    assert fast["spikes"].keys() == slow["spikes"].keys()
    assert sum(int(s.sum()) for s in slow["spikes"].values()) > 0
    for name, spikes in slow["spikes"].items():
        assert np.array_equal(fast["spikes"][name], spikes), name
    for name, state in slow.get("states", {}).items():
        assert np.array_equal(fast["states"][name], state), name
    assert verify_export(model, path, x)["executor"] == "qonnx-folded+onnxruntime"


def _quantize_graph_input(path, out, scale: float) -> None:
    """A copy of an unrolled file whose input ``x`` passes through an 8-bit Quant node (activation
    quantization: the node's input is not constant, so it cannot be folded)."""
    proto = onnx.load(str(path))
    graph = proto.graph
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == "x":
                node.input[i] = "x_quant"
    graph.initializer.extend(
        onnx.numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)
        for name, value in [("xq_scale", scale), ("xq_zeropt", 0.0), ("xq_bits", 8.0)]
    )
    graph.node.insert(0, onnx.helper.make_node(
        "Quant", ["x", "xq_scale", "xq_zeropt", "xq_bits"], ["x_quant"], domain="qonnx.custom_op.general",
        signed=1, narrow=0, rounding_mode="ROUND",
    ))
    info = onnx.ValueInfoProto()
    info.CopyFrom(graph.input[0])
    info.name = "x_quant"
    graph.value_info.append(info)
    onnx.save(proto, str(out))


def test_qonnx_backend_falls_back_to_execute_onnx_for_activation_quantizers(tmp_path, caplog) -> None:
    model = _tiny("mixed")
    path = export_qonnx(model, _events((T, B, 2, 8, 8), 0), tmp_path / "m.onnx")
    edited = tmp_path / "act.onnx"
    _quantize_graph_input(path, edited, scale=0.75)  # events {0, 1} -> {0, 0.75}
    x = _events((T, B, 2, 8, 8), 1)
    with caplog.at_level(logging.INFO, logger="hq_ptq.export"):
        got, executor = _run(edited, x, "qonnx", spikes=True)
    assert executor == "qonnx"
    assert "non-constant input" in caplog.text
    # the Quant node ran on the live input: the same as the original file fed the quantized events
    ref = run_export(path, 0.75 * x, spikes=True)
    assert np.array_equal(got["logits"], ref["logits"])
    assert all(np.array_equal(got["spikes"][n], s) for n, s in ref["spikes"].items())
    assert not np.allclose(got["logits"], run_export(path, x)["logits"])


# ---------------------------------------------------------------------------------------------
# spec-valid QONNX: every weight integer codes behind a Quant node


class PlainCNN(nn.Module):
    """Any PyTorch Conv/Linear model: one layer per weight form the export writes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(nn.functional.max_pool2d(self.conv2(x), 2))
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


# layer -> (scheme, bits, QONNX container): PoT b bits has n = 2^(b-1)-1 magnitudes, codes ±2^0..±2^(n-1)
_FORMS = {
    "conv1": ("pot", 2, 2), "conv2": ("pot", 3, 4), "fc1": ("pot", 4, 8), "fc2": ("pot", 5, 16),
    "head": ("uniform", 4, 4),
}


def _plain_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = PlainCNN().eval()
    swap_layers(model, scheme="uniform", bits=4)
    for name, layer in quant_layers(model).items():
        set_layer_quant(layer, *_FORMS[name][:2])
    return model


def _weight_quants(path) -> list[tuple[onnx.NodeProto, np.ndarray, np.ndarray, dict[str, str]]]:
    """(Quant node, codes, the scale its output is multiplied by, node metadata) per weight quantizer."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    by_input = {n.input[0]: n for n in graph.node if n.input}
    found = []
    for node in graph.node:
        if node.op_type == "Quant" and node.input[0] in inits:
            mul = by_input[node.output[0]]
            assert mul.op_type == "Mul" and inits[node.input[1]] == 1.0 and inits[node.input[2]] == 0.0
            found.append((node, inits[node.input[0]], inits[mul.input[1]],
                          {p.key: p.value for p in node.metadata_props}))
    return found


def test_weights_are_integer_codes_behind_quant(tmp_path) -> None:
    model = _plain_cnn()
    x, fresh = torch.rand(2, 2, 8, 8), torch.rand(2, 2, 8, 8)
    path = export_qonnx(model, x, tmp_path / "int.onnx")
    assert "FloatQuant" not in _ops(path)
    quants = _weight_quants(path)
    assert len(quants) == len(_FORMS)
    layers = quant_layers(model)
    for node, codes, scale, meta in quants:
        layer_name = node.input[0].removesuffix(".weight")
        scheme, bits, container = _FORMS[layer_name]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"signed": 1, "narrow": 1, "rounding_mode": b"ROUND"}  # the spec's, nothing else
        inits = {i.name: i for i in onnx.load(str(path)).graph.initializer}
        assert onnx.numpy_helper.to_array(inits[node.input[3]]) == container
        assert np.array_equal(codes, np.round(codes)) and np.abs(codes).max() <= 2 ** (container - 1) - 1
        assert meta["hq_ptq.weight_kind"] == scheme and meta["hq_ptq.scheme_bits"] == str(bits)
        # Quant(codes) · scale is the layer's quantized weight, bit for bit
        w = layers[layer_name].quant_weight().value.detach().numpy()
        assert np.array_equal((codes * scale).astype(np.float32), w)
        ref_codes, _ = weight_codes(layers[layer_name])
        ref = ref_codes.numpy().astype(np.float64)
        if scheme == "pot":
            n = 2 ** (bits - 1) - 1
            mags = np.abs(codes[codes != 0])
            assert np.array_equal(np.exp2(np.round(np.log2(mags))), mags)  # one shift per weight
            assert mags.max() <= 2 ** (n - 1) and meta["hq_ptq.pot_exponents"] == ",".join(map(str, range(n)))
            # schemes' PoT code ±(k+1) (level ±s·2^-k) is the integer ±2^(n-1-k)
            assert np.array_equal(codes, np.where(ref != 0, np.sign(ref) * np.exp2(n - np.abs(ref)), 0))
            if bits == 2:
                assert set(np.unique(codes)) <= {-1.0, 0.0, 1.0}  # ternary
        else:
            assert np.array_equal(codes, ref)
    spec = check_qonnx_spec(path)
    expected = {f"{name}.weight": f"INT{container}" for name, (_, _, container) in _FORMS.items()}
    assert spec["qonnx_cleanup"] and spec["weight_datatypes"] == expected  # InferDataTypes after cleanup
    # a graph too long for qonnx's quadratic passes: InferDataTypes on the weight quantizers alone
    assert check_qonnx_spec(path, qonnx_cleanup=False) == {**spec, "qonnx_cleanup": False}
    report = verify_export(model, path, fresh)
    assert report["max_abs_output_error"] <= TOL and report["spec_check"] == spec
    assert export_info(path)["weights"]["fc1.weight"]["container"] == "INT8"
    # the onnxruntime file: QCDQ for containers of up to 8 bits, the INT16 PoT weight folded
    rpath = export_onnxruntime(model, x, tmp_path / "ort.onnx")
    assert sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(rpath)).graph.node) == len(_FORMS) - 1
    assert verify_export(model, rpath, fresh, backend="onnxruntime")["max_abs_output_error"] <= TOL


def test_pot_as_float_keeps_floatquant_and_fails_the_spec_check(tmp_path) -> None:
    model = _plain_cnn()
    x, fresh = torch.rand(2, 2, 8, 8), torch.rand(2, 2, 8, 8)
    path = export_qonnx(model, x, tmp_path / "float.onnx", pot_as="float")
    assert sum(n.op_type == "FloatQuant" for n in onnx.load(str(path)).graph.node) == 4
    with pytest.raises(ValueError, match=r"^node FloatQuant_0 \(FloatQuant\) has mantissa width 0"):
        check_qonnx_spec(path)
    report = verify_export(model, path, fresh)
    assert report["max_abs_output_error"] <= TOL and report["spec_check"]["passed"] is False
    with pytest.raises(ValueError, match="unknown pot_as 'shift'"):
        export_qonnx(model, x, tmp_path / "bad.onnx", pot_as="shift")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("half_codes", r"weight head\.weight is not integer-valued"),
        ("wide_codes", r"weight head\.weight leaves the container range \[-7, 7\]"),
        ("attribute", r"\(Quant\) has attribute\(s\) weight_kind outside the QONNX spec"),
        ("op", r"\(MultiThreshold\) in domain .* is outside the QONNX spec"),
    ],
)
def test_spec_check_names_the_offending_node(tmp_path, edit: str, message: str) -> None:
    path = export_qonnx(_plain_cnn(), torch.rand(2, 2, 8, 8), tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    node = next(n for n in proto.graph.node if n.op_type == "Quant" and n.input[0] == "head.weight")
    init = next(i for i in proto.graph.initializer if i.name == "head.weight")
    codes = onnx.numpy_helper.to_array(init)
    if edit == "half_codes":
        init.CopyFrom(onnx.numpy_helper.from_array(codes + 0.5, "head.weight"))
    elif edit == "wide_codes":
        init.CopyFrom(onnx.numpy_helper.from_array(codes * 4, "head.weight"))
    elif edit == "attribute":
        node.attribute.append(onnx.helper.make_attribute("weight_kind", "uniform"))
    else:
        node.op_type = "MultiThreshold"
    onnx.save(proto, str(path))
    with pytest.raises(ValueError, match=message):
        check_qonnx_spec(path)


# ---------------------------------------------------------------------------------------------
# the zoo model


@pytest.fixture(scope="module")
def spikformer() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("spikformer-tiny", depth=1, num_classes=4)
    return _quantize(_calibrate_bn(model, (T, B, 2, 32, 32)), "mixed")


@pytest.mark.parametrize("mode", ["unrolled", "step"])
def test_round_trip_spikformer(tmp_path, spikformer: nn.Module, mode: str) -> None:
    example, fresh = _events((T, B, 2, 32, 32), 0), _events((T, B, 2, 32, 32), 1)
    qpath = export_qonnx(spikformer, example, tmp_path / "sf.onnx", mode=mode)
    assert {"Quant", "Greater", "MatMul"} <= _ops(qpath) and "FloatQuant" not in _ops(qpath)
    report = verify_export(spikformer, qpath, fresh, backend="qonnx")
    _check_report(report, mode)
    assert report["spec_check"]["passed"] is True, report["spec_check"]
    assert report["spike_count_torch"] > 1000

    rpath = export_onnxruntime(spikformer, example, tmp_path / "sf_ort.onnx", mode=mode)
    _check_report(verify_export(spikformer, rpath, fresh, backend="onnxruntime"), mode)
    # the folded zero membranes of step 0 are stored as ConstantOfShape, not as [B, ...] tensors
    assert rpath.stat().st_size < 1.5 * sum(p.numel() * 4 for p in spikformer.parameters())


# ---------------------------------------------------------------------------------------------
# errors


def test_float_model_needs_allow_float(tmp_path) -> None:
    model = _calibrate_bn(TinySNN(), (T, B, 2, 8, 8))
    x = _events((T, B, 2, 8, 8), 0)
    with pytest.raises(ValueError, match="no hq_ptq-quantized layer"):
        export_qonnx(model, x, tmp_path / "f.onnx")
    path = export_onnxruntime(model, x, tmp_path / "f.onnx", allow_float=True)
    assert not {"Quant", "FloatQuant", "QuantizeLinear"} & _ops(path)
    assert verify_export(model, path, _events((T, B, 2, 8, 8), 1), backend="onnxruntime")[
        "max_abs_logit_error"
    ] <= TOL


def test_bad_inputs_raise_one_line_errors(tmp_path) -> None:
    model = _tiny("uniform")
    x = _events((T, B, 2, 8, 8), 0)
    cases = [
        (x, "loop", "unknown export mode 'loop'"),
        (x[0], "step", r"example_input \(2, 2, 8, 8\) does not run through the model"),
        (x.long(), "unrolled", r"\(2, 2, 2, 8, 8\) \(int64\) does not run through the model"),
        (x[:1], "step", "at least 2 time steps"),
        ([], "unrolled", "holding tensors"),
        (_events((T, B, 3, 8, 8), 0), "unrolled", "does not run through the model"),
    ]
    for example, mode, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            export_qonnx(model, example, tmp_path / "bad.onnx", mode=mode)
        assert "\n" not in str(err.value)
    zoo = build_model("spikformer-tiny", depth=1, num_classes=4)
    swap_layers(zoo, scheme="uniform", bits=4)
    with pytest.raises(ValueError, match="takes 2; pass"):
        export_qonnx(zoo, _events((1, 1, 3, 32, 32), 0), tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_run_and_verify_errors(tmp_path) -> None:
    model = _tiny("uniform")
    x = _events((T, B, 2, 8, 8), 0)
    qpath = export_qonnx(model, x, tmp_path / "q.onnx")
    with pytest.raises(ValueError, match="unknown backend 'tvm'"):
        verify_export(model, qpath, x, backend="tvm")
    with pytest.raises(ValueError, match="onnxruntime cannot load"):
        run_export(qpath, x, backend="onnxruntime")
    with pytest.raises(FileNotFoundError, match="no exported model"):
        export_info(tmp_path / "missing.onnx")
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(plain))
    with pytest.raises(ValueError, match="not written by hq_ptq"):
        run_export(plain, x)


def test_step_mode_rejects_state_it_cannot_expose(tmp_path) -> None:
    class Bare(TinySNN):
        def __init__(self) -> None:
            super().__init__()
            self.extra = snn.Leaky(beta=0.5, init_hidden=True)

    class Twice(TinySNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = self.pool(self.lif1(self.lif1(self.stem(x))))
            return self.head(self.lif2(self.fc1(s.flatten(2)))).mean(0)

    x = _events((T, B, 2, 8, 8), 0)
    for cls, message in [(Bare, "'extra' is a bare snn.Leaky"), (Twice, "'lif1' runs 2 times")]:
        torch.manual_seed(0)
        model = _quantize(cls().eval(), "uniform")
        with pytest.raises(ValueError, match=message):
            export_qonnx(model, x, tmp_path / "s.onnx", mode="step")
        export_qonnx(model, x, tmp_path / "u.onnx", mode="unrolled")  # the unrolled layout still works


# ---------------------------------------------------------------------------------------------
# models as they are called: own time loops, static or sequence inputs, tuple outputs


class StaticLoop(nn.Module):
    """A static image [B, 1, 6, 6] in, the model's own loop over T around snn.Leaky(init_hidden=True)."""

    def __init__(self, reset_inside: bool = True, steps: int = 3) -> None:
        super().__init__()
        self.reset_inside, self.steps = reset_inside, steps
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.lif1 = snn.Leaky(beta=0.8, threshold=0.5, init_hidden=True)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.lif2 = snn.Leaky(beta=0.8, threshold=0.5, init_hidden=True, output=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reset_inside:
            utils.reset(self)
        out = 0
        for _ in range(self.steps):
            spk, mem = self.lif2(self.fc(self.lif1(self.conv(x)).flatten(1)))
            out = out + spk + mem / self.steps
        return out


class ExplicitMem(nn.Module):
    """Time-first [T, B, 6] in, init_hidden=False neurons with the membranes as local variables,
    the snnTorch tutorial's (spk_rec [T, B, 3], mem_rec [T, B, 3]) out."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.lif1 = snn.Leaky(beta=0.9, threshold=0.5)
        self.fc2 = nn.Linear(8, 3)
        self.lif2 = snn.Leaky(beta=0.9, threshold=0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mem1, mem2 = self.lif1.reset_mem(), self.lif2.reset_mem()
        spk_rec, mem_rec = [], []
        for t in range(x.size(0)):
            spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            spk_rec.append(spk2)
            mem_rec.append(mem2)
        return torch.stack(spk_rec), torch.stack(mem_rec)


class Sequence(nn.Module):
    """A batch-first sequence [B, L, 4]: Conv1d over L, then Linear + Leaky per position l."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.lif1 = snn.Leaky(beta=0.7, threshold=0.5, init_hidden=True)
        self.fc = nn.Linear(8, 3)
        self.lif2 = snn.Leaky(beta=0.7, threshold=0.3, init_hidden=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        utils.reset(self)
        cur = self.conv(x.transpose(1, 2))  # [B, 8, L]
        counts = 0
        for step in range(x.size(1)):
            counts = counts + self.lif2(self.fc(self.lif1(cur[:, :, step])))
        return counts  # spike counts [B, 3]


def _built(cls: type[nn.Module], *args: object) -> nn.Module:
    torch.manual_seed(0)
    return _quantize(cls(*args).eval(), "mixed")


def _check_any(model: nn.Module, example: object, fresh: object, tmp_path, **kwargs) -> list[dict]:
    """Export both files, verify both on ``fresh``: every output within TOL, every spike paired."""
    reports = []
    for export, backend in ((export_qonnx, "qonnx"), (export_onnxruntime, "onnxruntime")):
        path = export(model, example, tmp_path / f"{backend}.onnx", **kwargs)
        report = verify_export(model, path, fresh, backend=backend)
        assert report["max_abs_output_error"] <= TOL and report["max_abs_logit_error"] <= TOL, report
        assert report["spike_compare"] == "elementwise" and report["spike_mismatches"] == 0, report
        assert report["spike_count_torch"] > 0 and report["spike_count_export"] == report["spike_count_torch"]
        assert report["spec_check"]["passed"] is (True if backend == "qonnx" else None), report["spec_check"]
        reports.append(report)
    return reports


@pytest.mark.parametrize("reset_inside", [True, False], ids=["utils.reset", "stale-state"])
def test_static_input_model_with_its_own_time_loop(tmp_path, reset_inside: bool) -> None:
    model = _built(StaticLoop, reset_inside)
    example, fresh = torch.rand(2, 1, 6, 6) * 2, torch.rand(2, 1, 6, 6) * 2
    with torch.no_grad():
        for _ in range(3):  # leave membranes behind in the neurons: they must not reach the graph
            model(fresh)
        state = model.lif1.mem.clone()
    reports = _check_any(model, example, fresh, tmp_path)
    assert reports[0]["spikes_compared"] == 3 * 2 * (4 * 6 * 6 + 5)  # T calls of each neuron, paired
    assert torch.equal(model.lif1.mem, state)  # the neurons' states are put back
    info = export_info(tmp_path / "qonnx.onnx")
    assert info["inputs"] == [{"name": "x", "shape": [2, 1, 6, 6], "dtype": "float32"}]
    assert info["outputs"] == [{"name": "logits", "shape": [2, 5], "dtype": "float32"}]
    # the file equals the model on an input it was not traced with, from fresh states
    utils.reset(model)
    with torch.no_grad():
        expected = model(fresh).numpy()
    got = run_export(tmp_path / "onnxruntime.onnx", fresh, backend="onnxruntime")
    assert np.abs(got["logits"] - expected).max() <= TOL


def test_explicit_membranes_and_a_tuple_output(tmp_path) -> None:
    model = _built(ExplicitMem)
    example, fresh = torch.rand(4, 2, 6) * 2, torch.rand(4, 2, 6) * 2
    reports = _check_any(model, example, fresh, tmp_path)
    assert reports[0]["output_errors"].keys() == {"output_0", "output_1"}
    info = export_info(tmp_path / "qonnx.onnx")
    shapes = [(o["name"], o["shape"]) for o in info["outputs"]]
    assert shapes == [("output_0", [4, 2, 3]), ("output_1", [4, 2, 3])]
    assert "logits" not in info and info["output_structure"] == "((4, 2, 3), (4, 2, 3))"
    assert [o.name for o in onnx.load(str(tmp_path / "qonnx.onnx")).graph.output] == ["output_0", "output_1"]
    spk, mem = model(fresh)
    outputs = run_export(tmp_path / "qonnx.onnx", fresh)["outputs"]
    assert np.array_equal(outputs["output_0"], spk.detach().numpy())
    assert np.abs(outputs["output_1"] - mem.detach().numpy()).max() <= TOL


def test_batch_first_sequence_model(tmp_path) -> None:
    model = _built(Sequence)
    example, fresh = torch.rand(2, 5, 4) * 2, torch.rand(2, 5, 4) * 2
    _check_any(model, example, fresh, tmp_path)
    assert {"Conv", "Greater", "Quant"} <= _ops(tmp_path / "qonnx.onnx")
    with pytest.raises(ValueError, match=r"shape \[2, 6, 4\] but .* was exported for \[2, 5, 4\]"):
        run_export(tmp_path / "qonnx.onnx", torch.rand(2, 6, 4))


def test_several_positional_inputs(tmp_path) -> None:
    class TwoInputs(Sequence):
        def forward(self, x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
            return super().forward(x * gain)

    model = _built(TwoInputs)
    example = (torch.rand(2, 5, 4), torch.full((1, 1, 4), 2.0))
    fresh = (torch.rand(2, 5, 4), torch.full((1, 1, 4), 2.5))
    _check_any(model, example, fresh, tmp_path)
    assert [i["name"] for i in export_info(tmp_path / "qonnx.onnx")["inputs"]] == ["x_0", "x_1"]
    with pytest.raises(ValueError, match="inputs hold 1 tensors but .* takes 2"):
        run_export(tmp_path / "qonnx.onnx", fresh[0])


def test_step_mode_refuses_neurons_driven_by_the_models_own_loop(tmp_path) -> None:
    model = _built(StaticLoop)
    with pytest.raises(ValueError, match="needs the time loop inside hq_ptq.snn.MultiStepLeaky") as err:
        export_qonnx(model, torch.rand(2, 1, 6, 6), tmp_path / "s.onnx", mode="step")
    assert "'lif1' is a bare snn.Leaky" in str(err.value) and "mode='unrolled'" in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "s.onnx").exists()


class Readout(TinySNN):
    """TinySNN with another readout over T (time-first) or a batch-first input [B, T, ...]."""

    def __init__(self, readout: str) -> None:
        super().__init__()
        self.readout = readout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.readout == "batch-first":
            x = x.transpose(0, 1)
        s = self.pool(self.lif1(self.stem(x)))
        y = self.head(self.lif2(self.fc1(s.flatten(2))))  # [T, B, 4]
        if self.readout == "sum":
            return y.sum(0)
        if self.readout == "max":
            return y.amax(0)
        if self.readout == "record":
            return y  # [T, B, classes]
        return y.mean(0)


@pytest.mark.parametrize(
    ("readout", "recorded"), [("sum", "sum"), ("record", "stack"), ("batch-first", "mean")]
)
def test_step_mode_reads_out_what_the_model_reads_out(tmp_path, readout: str, recorded: str) -> None:
    torch.manual_seed(0)
    model = _quantize(_calibrate_bn(Readout("mean"), (T, B, 2, 8, 8)), "mixed")
    model.readout = readout
    time_dim = 1 if readout == "batch-first" else 0
    example, fresh = _events((3, B, 2, 8, 8), 0), _events((5, B, 2, 8, 8), 1)
    if time_dim:
        example, fresh = example.transpose(0, 1), fresh.transpose(0, 1)
    path = export_qonnx(model, example, tmp_path / "s.onnx", mode="step", time_dim=time_dim)
    (output,) = export_info(path)["outputs"]
    assert output["readout"] == recorded and output.get("axis", 0) == 0
    _check_report(verify_export(model, path, fresh), "step")  # T=5 from an export traced with 3
    rpath = export_onnxruntime(model, example, tmp_path / "r.onnx", mode="step", time_dim=time_dim)
    report = verify_export(model, rpath, fresh, backend="onnxruntime")
    assert report["max_abs_output_error"] <= TOL and report["spike_mismatches"] == 0


def test_step_mode_refuses_a_readout_that_mixes_time_steps(tmp_path) -> None:
    torch.manual_seed(0)
    model = _quantize(_calibrate_bn(Readout("mean"), (T, B, 2, 8, 8)), "uniform")
    model.readout = "max"
    with pytest.raises(ValueError, match="cannot rebuild output 'logits_t'.*mean .*sum .*last ") as err:
        export_qonnx(model, _events((3, B, 2, 8, 8), 0), tmp_path / "s.onnx", mode="step")
    assert "\n" not in str(err.value) and not (tmp_path / "s.onnx").exists()
    export_qonnx(model, _events((3, B, 2, 8, 8), 0), tmp_path / "u.onnx")  # unrolled keeps the max


def _rename_spikes(path, out, scope: str) -> None:
    """A copy of ``path`` whose Greater outputs in ``scope`` carry no module scope (as dynamo names them)."""
    proto = onnx.load(str(path))
    renames = {}
    for node in proto.graph.node:
        if node.op_type == "Greater" and node.output[0].startswith(f"/{scope}/"):
            renames[node.output[0]] = f"gt_{scope}_{len(renames)}"
    for node in proto.graph.node:
        node.output[:] = [renames.get(n, n) for n in node.output]
        node.input[:] = [renames.get(n, n) for n in node.input]
    for info in proto.graph.value_info:
        info.name = renames.get(info.name, info.name)
    onnx.save(proto, str(out))


def test_verify_never_counts_unpaired_spikes_as_mismatches(tmp_path) -> None:
    model = _tiny("mixed")
    path = export_qonnx(model, _events((T, B, 2, 8, 8), 0), tmp_path / "m.onnx")
    fresh = _events((T, B, 2, 8, 8), 1)
    _rename_spikes(path, tmp_path / "partial.onnx", "lif2")
    report = verify_export(model, tmp_path / "partial.onnx", fresh)
    assert report["spike_compare"] == "partial" and report["spikes_not_compared"] == ["lif2"]
    assert report["spike_mismatches"] == 0 and report["spikes_compared"] == T * B * 8 * 8 * 8
    assert report["max_abs_output_error"] <= TOL
    _rename_spikes(tmp_path / "partial.onnx", tmp_path / "none.onnx", "lif1")
    report = verify_export(model, tmp_path / "none.onnx", fresh)
    assert report["spike_compare"] == "not compared" and report["spike_mismatches"] is None
    assert report["spikes_compared"] == 0 and report["spikes_not_compared"] == ["lif1", "lif2"]
    assert report["max_abs_output_error"] <= TOL


def test_verify_pairs_in_step_resets_and_leaves_unused_spikes_uncompared(tmp_path) -> None:
    class InStepReset(ExplicitMem):  # spikingjelly-style LIF: reset in the same step
        def __init__(self) -> None:
            super().__init__()
            self.lif1.reset_delay = self.lif2.reset_delay = False

    class MemOnly(ExplicitMem):  # lif2's spikes only reach the graph as its next steps' pending resets
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[1]

    x = torch.rand(4, 2, 6) * 2
    report = _check_any(_built(InStepReset), x, x, tmp_path)[0]
    assert report["spikes_compared"] == (2 * 4 - 1) * 2 * (8 + 3)  # spike + pending reset per call
    model = _built(MemOnly)
    report = verify_export(model, export_qonnx(model, x, tmp_path / "m.onnx"), x)
    assert report["max_abs_output_error"] <= TOL
    assert report["spike_compare"] == "partial" and report["spikes_not_compared"] == ["lif2"]
    assert report["spike_mismatches"] == 0 and report["spikes_compared"] == 4 * 2 * 8


@torch.jit.script
def _scripted_if_neurons(x_seq: torch.Tensor) -> torch.Tensor:
    """An integrate-and-fire loop compiled by TorchScript: the exporter writes it as an ONNX Loop whose
    body reads ``x_seq`` from the graph around it, not through the Loop's inputs."""
    v = torch.zeros_like(x_seq[0])
    one = torch.ones_like(v)  # tensors, not Python floats, which TorchScript types as double
    spikes = []
    for t in range(x_seq.shape[0]):
        v = v + x_seq[t]
        s = (v >= one).float()
        v = v * (one - s)
        spikes.append(s)
    return torch.stack(spikes)


class _ScriptedLoopNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, 6]
        return self.fc2(_scripted_if_neurons(self.fc1(x))).sum(0)


def test_a_scripted_time_loop_exports_to_onnxruntime(tmp_path) -> None:
    """A Loop whose explicit inputs are constants is not constant (its body reads the graph around it): it
    was folded, and failed. And qonnx's QCDQ pass re-sorts nodes on their explicit inputs only, which put the
    Loop before the node making its sequence; the file then failed onnx's checker."""
    torch.manual_seed(0)
    model = _ScriptedLoopNet()
    swap_layers(model, scheme="uniform", bits=4)
    x, fresh = 2 * torch.rand(4, 2, 6), 2 * torch.rand(4, 2, 6)
    path = export_onnxruntime(model, x, tmp_path / "loop.onnx")
    assert "Loop" in {n.op_type for n in onnx.load(path).graph.node}
    assert verify_export(model, path, fresh, backend="onnxruntime")["max_abs_output_error"] < 1e-5


def test_sort_nodes_follows_what_subgraphs_read_and_takes_long_chains() -> None:
    from onnx import TensorProto, helper

    from hq_ptq.export.passes import _sort_nodes

    n = 5000  # an unrolled graph is a long chain; the sort must not recurse along it
    chain = [helper.make_node("Identity", [f"x{k}"], [f"x{k + 1}"], name=f"id{k}") for k in range(n)]
    body = helper.make_graph(  # reads x{n} from the enclosing graph, not through the If's inputs
        [helper.make_node("Identity", [f"x{n}"], ["out"])], "body", [],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])])
    branch = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=body, else_branch=body)
    graph = helper.make_graph(
        [branch, *reversed(chain)], "g",
        [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    _sort_nodes(graph)
    assert [node.name for node in graph.node] == [f"id{k}" for k in range(n)] + ["if"]
    onnx.checker.check_graph(graph)
    before = [node.name for node in graph.node]
    _sort_nodes(graph)  # already in order: unchanged
    assert [node.name for node in graph.node] == before


class _OnThreshold(nn.Module):
    """A Linear of weights 0.25 on binary inputs into a LIF with threshold 0.5: every membrane is a sum of
    quarters (exact in float32), so some sit exactly on the threshold and do not fire (a spike is
    mem > thr)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6, bias=False)
        nn.init.constant_(self.fc.weight, 0.25)
        self.lif = MultiStepLeaky(0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lif(self.fc(x)).sum(0)


def _move_threshold(path, out, threshold: float) -> None:
    """A copy of the file whose LIF thresholds (the Sub in front of each Greater) are ``threshold``."""
    proto = onnx.load(str(path))
    makers = {o: n for n in proto.graph.node for o in n.output}
    names = {makers[n.input[0]].input[1] for n in proto.graph.node if n.op_type == "Greater"}
    for init in proto.graph.initializer:
        if init.name in names:
            init.CopyFrom(onnx.numpy_helper.from_array(np.array(threshold, np.float32), init.name))
    onnx.save(proto, str(out))


def test_verify_locates_the_first_flip_and_tells_rounding_from_a_wrong_file(tmp_path, caplog) -> None:
    model = _OnThreshold()
    x = _events((3, 8, 4), 0)
    path = export_onnxruntime(model, x, tmp_path / "m.onnx", allow_float=True)
    report = verify_export(model, path, x, backend="onnxruntime")
    assert report["spike_mismatches"] == 0 and report["first_spike_flip"] is None
    # membranes exactly on the threshold fire once it is 2^-20 lower: a flip the size of float rounding
    _move_threshold(path, tmp_path / "ulp.onnx", 0.5 - 2.0**-20)
    with caplog.at_level(logging.WARNING, logger="hq_ptq.export"):
        report = verify_export(model, tmp_path / "ulp.onnx", x, backend="onnxruntime")
    first = report["first_spike_flip"]
    assert report["spike_mismatches"] > 0 and first["flips"] > 0
    assert first["neuron"] == "lif" and first["tensor"] == "/lif/Greater_output_0"  # step 0 comes first
    assert first["max_margin"] == pytest.approx(2.0**-20) and first["rounding"] is True
    assert "consistent with float rounding near the threshold" in caplog.text
    assert export_reproduces(report)  # hq-ptq run keeps such a file
    # qonnx's semantics, and its node-by-node executor (its shape checks see the margins' shapes)
    assert verify_export(model, tmp_path / "ulp.onnx", x, backend="qonnx")["first_spike_flip"] == first
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slow, executor = _run(tmp_path / "ulp.onnx", x, "qonnx", spikes=True, fold=False, margins=True)
    assert executor == "qonnx"
    np.testing.assert_array_equal(slow["margins"][first["tensor"]] > 0, slow["spikes"][first["tensor"]])
    # a threshold 0.2 lower is another computation, not rounding
    caplog.clear()
    _move_threshold(path, tmp_path / "wrong.onnx", 0.3)
    with caplog.at_level(logging.WARNING, logger="hq_ptq.export"):
        report = verify_export(model, tmp_path / "wrong.onnx", x, backend="onnxruntime")
    first = report["first_spike_flip"]
    assert first["rounding"] is False and first["max_margin"] == pytest.approx(0.2, abs=1e-6)
    assert "computes something else in front of this neuron" in caplog.text
    assert not export_reproduces(report)
    # a step file counts its flips but does not locate them
    step = export_onnxruntime(model, x, tmp_path / "step.onnx", allow_float=True, mode="step")
    _move_threshold(step, tmp_path / "step_ulp.onnx", 0.5 - 2.0**-20)
    report = verify_export(model, tmp_path / "step_ulp.onnx", x, backend="onnxruntime")
    assert report["spike_mismatches"] > 0 and report["first_spike_flip"] is None
    assert not export_reproduces(report)
