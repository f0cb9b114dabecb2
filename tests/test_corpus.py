"""Every public model of the corpus (tests/corpus, written by other people) through the whole path, with the
same settings for all: data-free and calibrated + QAT ``quantize`` → ``save``/``load`` → ``export_qonnx`` /
``export_onnxruntime`` → ``verify_export``.

No per-model flag beyond the model's own loss and its example input. The settings shared by every model
only keep the suite fast: 16 Hutchinson probes instead of 64 and 3 QAT steps instead of 150.
"""

from __future__ import annotations

import warnings

import pytest
import snntorch as snn
import torch
from corpus import CORPUS, CorpusModel, by_name

import hq_ptq
from hq_ptq.config import QATConfig, QuantConfig, SearchConfig
from hq_ptq.model_io import call, tensors
from hq_ptq.schemes import channel_axis, quantized_weight
from hq_ptq.snn import reset_states, to_multistep
from hq_ptq.swap import layer_quant, quant_layers

FAST = QuantConfig(search=SearchConfig(metric="fisher"), qat=QATConfig(steps=3))


def _outputs(model: torch.nn.Module, inputs) -> list[torch.Tensor]:
    model.eval()
    reset_states(model)
    with torch.no_grad():
        return [t.clone() for t in tensors(call(model, inputs))]


def _check_plan(model: torch.nn.Module, budget: float) -> hq_ptq.Plan:
    plan = hq_ptq.get_plan(model)
    assert plan.avg_bits <= budget + 1e-9
    for name, layer in quant_layers(model).items():
        scheme, bits = layer_quant(layer)
        if scheme == "pot":  # every weight is 0 or ±s·2^-k of its channel's scale
            with torch.no_grad():
                w = quantized_weight(layer).movedim(channel_axis(layer), 0).flatten(1)
            scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
            ratio = w.abs() / scale
            k = torch.log2(ratio[ratio > 0])
            assert torch.allclose(k, k.round(), atol=1e-5), name
    return plan


def _round_trip(model: torch.nn.Module, entry: CorpusModel, tmp_path, tag: str) -> torch.nn.Module:
    path = hq_ptq.save(model, tmp_path / f"{tag}.hqpt.safetensors")
    loaded = hq_ptq.load(path, model=entry.build())
    (x, _), = entry.batches(1, 7)
    for a, b in zip(_outputs(model, x), _outputs(loaded, x), strict=True):
        assert torch.equal(a, b)  # bit-identical
    assert hq_ptq.get_plan(loaded).layers == hq_ptq.get_plan(model).layers
    return loaded


def _export_and_verify(model: torch.nn.Module, entry: CorpusModel, tmp_path, backend: str) -> dict:
    (example, _), (fresh, _) = entry.batches(2, 11)
    fn = hq_ptq.export_qonnx if backend == "qonnx" else hq_ptq.export_onnxruntime
    path = fn(model, example, tmp_path / f"model.{backend}.onnx")
    report = hq_ptq.verify_export(model, path, fresh, backend=backend)
    assert report["max_abs_output_error"] < 1e-4, report
    # spikes are compared where they pair with a neuron; never reported as mismatches otherwise
    assert report["spike_mismatches"] in (0, None), report
    if backend == "qonnx":  # integer weight codes behind spec Quant nodes, on other people's models too
        assert report["spec_check"]["passed"], report["spec_check"]
    return report


@pytest.mark.parametrize("entry", CORPUS, ids=[e.name for e in CORPUS])
def test_data_free_quantize_save_load_export(entry: CorpusModel, tmp_path):
    model = entry.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the data-free metric warning, released protection
        hq_ptq.quantize(model, 3.5, config=FAST)
    _check_plan(model, 3.5)
    loaded = _round_trip(model, entry, tmp_path, "data-free")
    _export_and_verify(loaded, entry, tmp_path, "onnxruntime")


@pytest.mark.parametrize("entry", CORPUS, ids=[e.name for e in CORPUS])
def test_calibrated_qat_quantize_save_load_export(entry: CorpusModel, tmp_path):
    model = entry.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dead layers, distillation off for non-logit outputs
        hq_ptq.quantize(model, 3.5, calib_data=entry.batches(4, 0), train_data=entry.batches(4, 1),
                        loss_fn=entry.loss_fn, config=FAST)
    plan = _check_plan(model, 3.5)
    assert plan.meta["metric"] == "fisher"
    loaded = _round_trip(model, entry, tmp_path, "qat")
    _export_and_verify(loaded, entry, tmp_path, "qonnx")


def test_to_multistep_names_the_synaptic_neuron_it_cannot_convert():
    """A model whose only neurons are snn.Synaptic (no snn.Leaky at all) is told which module to_multistep
    cannot convert, not "found no snn.Leaky ... nothing to convert"; nothing is changed."""
    model = by_name("snntorch-tutorial3-synaptic").build()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"^lif1 is an snn.Synaptic; to_multistep converts snn.Leaky only"):
        to_multistep(model)
    assert [type(m) for m in model.modules()] == before
    with pytest.raises(ValueError, match=r"^the model is an snn.Synaptic; to_multistep converts snn.Leaky"):
        to_multistep(snn.Synaptic(alpha=0.7, beta=0.8, init_hidden=True))


def test_state_the_caller_left_behind_does_not_reach_the_analysis():
    """The population-coding tutorial's model never resets its neurons; its caller does. A user who ran it
    (on a batch of the calibration batches' size, so snnTorch keeps the membranes) and then analyzes it must
    get the traces of a freshly built model: hq_ptq resets every neuron before each forward it runs."""
    entry = by_name("snntorch-pop-coding")
    traces = []
    for used_before in (False, True):
        model = entry.build()
        if used_before:
            with torch.no_grad():
                model(3 * torch.rand(4, 1, 28, 28))  # membranes left in the neurons
        analysis = hq_ptq.analyze(model, calib_data=entry.batches(4, 0), loss_fn=entry.loss_fn, config=FAST)
        traces.append(analysis.traces)
    assert traces[0] == traces[1]
