"""Integer-only inference (:mod:`hq_ptq.integer`): the integer model against its NumPy int64 reference (bit
for bit), against the fake-quant model (spikes agree more as the membrane widens), and its refusals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import snntorch as snn
import torch
import torch.nn.functional as F
from conftest import calibrate_bn
from corpus import CORPUS, CorpusModel
from torch import nn

import hq_ptq
from hq_ptq.config import QATConfig, QuantConfig, SearchConfig
from hq_ptq.integer import IntegerLIF, IntegerSynapse, _np_accumulate, compare, integerize, reference_mode
from hq_ptq.model_io import call, tensors
from hq_ptq.models import build_model
from hq_ptq.models.layers import SeqConvBN
from hq_ptq.snn import MultiStepLeaky
from hq_ptq.swap import quant_layers, set_layer_quant, swap_layers

T, B = 4, 3


def _events(shape, seed: int) -> torch.Tensor:
    # event counts 0..2 per pixel and step, as a DVS frame holds
    return torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(seed)).float()


def _batches(shape, n: int, seed: int = 0) -> list:
    return [(_events(shape, seed + i), torch.randint(0, 4, (shape[1],))) for i in range(n)]


def _calibrate_bn(model: nn.Module, shape) -> nn.Module:
    return calibrate_bn(model, shape, _events)


def _reference_agrees(integer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The integer model's output on ``x``, after checking its NumPy reference gives the same bits."""
    with torch.no_grad():
        got = integer(x)
        with reference_mode(integer):
            want = integer(x)
    assert torch.equal(got, want)
    return got


def _mixed(model: nn.Module) -> nn.Module:
    """Uniform 4/8 and power-of-two 2/3/4 bits across the layers."""
    swap_layers(model, scheme="uniform", bits=4)
    cycle = [("pot", 3), ("uniform", 8), ("pot", 4), ("uniform", 4), ("pot", 2), ("uniform", 3)]
    for i, layer in enumerate(quant_layers(model).values()):
        set_layer_quant(layer, *cycle[i % len(cycle)])
    return model


@pytest.fixture(scope="module")
def spikformer() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("spikformer-tiny", depth=1, num_classes=4)
    return _mixed(_calibrate_bn(model, (T, B, 2, 32, 32)))


def test_spikformer_integer_matches_its_numpy_reference_bit_for_bit(spikformer) -> None:
    calib = _batches((T, B, 2, 32, 32), 2)
    integer, report = integerize(spikformer, calib, membrane_bits=16)
    # every synapse and neuron was replaced; BatchNorms folded away
    assert not quant_layers(integer)
    assert not any(isinstance(m, (MultiStepLeaky, nn.BatchNorm1d, nn.BatchNorm2d)) for m in integer.modules())
    assert report.synapses["head"]["feeds"] is None and report.synapses["head"]["out_frac"] == 12
    assert report.neurons["blocks.0.attn.attn_lif"]["fed_by"] is None  # spike x spike attention product
    assert report.neurons["patch_embed.lifs.0"]["fed_by"] == "patch_embed.convs.0.conv"
    x = _events((T, B, 2, 32, 32), 7)
    got = _reference_agrees(integer, x)
    # the logits are fixed-point numbers with the head's fractional bits
    assert torch.equal(got * 2**12, torch.round(got * 2**12))
    spikes = [m for m in integer.modules() if isinstance(m, IntegerLIF)]
    assert spikes and all(m.bits == 16 for m in spikes)


def test_sdt_membrane_shortcuts_run_on_fixed_point_residual_streams() -> None:
    torch.manual_seed(0)
    model = _mixed(_calibrate_bn(build_model("sdt-tiny", depth=1, num_classes=4), (T, B, 2, 32, 32)))
    integer, report = integerize(model, _batches((T, B, 2, 32, 32), 2))
    # the residual stream (BN outputs added to the input) is fixed point with out_frac_bits; the neurons
    # that read it take fixed-point inputs, the head LIF one averaged over 64 tokens (12 + 6 bits)
    assert report.synapses["blocks.0.attn.proj.conv"]["out_frac"] == 12
    assert report.neurons["blocks.0.attn.shortcut_lif"]["fed_by"] is None
    assert report.neurons["head_lif"]["in_frac"] == 18
    x = _events((T, B, 2, 32, 32), 9)
    _reference_agrees(integer, x)


def test_wider_membranes_agree_more_with_the_fake_quant_model(spikformer) -> None:
    calib = _batches((T, B, 2, 32, 32), 2)
    data = _batches((T, B, 2, 32, 32), 2, seed=50)
    mismatch = {}
    for bits in (8, 12, 22):
        integer, _ = integerize(spikformer, calib, membrane_bits=bits)
        mismatch[bits] = compare(spikformer, integer, data)["spike_mismatch"]
    assert mismatch[22] < 0.01
    assert mismatch[22] <= mismatch[12] <= mismatch[8]
    assert mismatch[8] > 0  # 8-bit membranes are coarse enough to flip spikes here


class _TwoLayer(nn.Module):
    """Conv2d + BN + LIF (subtract reset, beta 0.6: a fixed-point leak), then strided Conv with bias + LIF
    (zero reset, beta 0.25), then a Linear readout of the spike count."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = SeqConvBN(nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
        self.n1 = MultiStepLeaky(beta=0.6, threshold=0.8, reset_mechanism="subtract")
        self.c2 = nn.Conv2d(6, 5, 3, stride=2, padding=2, dilation=2)
        self.n2 = MultiStepLeaky(beta=0.25, threshold=1.0)
        self.fc = nn.Linear(5 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b = x.shape[:2]
        s = self.n1(self.c1(x))
        cur = self.c2(s.flatten(0, 1))
        s2 = self.n2(cur.reshape(t, b, *cur.shape[1:]))
        return self.fc(s2.sum(0).flatten(1))


def test_fixed_point_leak_subtract_reset_and_strided_dilated_conv_match_the_reference() -> None:
    torch.manual_seed(1)
    model = _mixed(_calibrate_bn(_TwoLayer(), (T, B, 2, 8, 8)))
    with torch.no_grad():
        model.c2.weight.mul_(20)
    integer, report = integerize(model, _batches((T, B, 2, 8, 8), 2), membrane_bits=14)
    assert report.neurons["n1"]["leak"].startswith("mult") and report.neurons["n2"]["leak"] == "shift 2"
    assert report.neurons["n2"]["fed_by"] == "c2"
    x = _events((T, B, 2, 8, 8), 3)
    _reference_agrees(integer, x)
    assert integer.n1(torch.zeros(T, B, 6, 8, 8)).sum() == 0


@pytest.mark.parametrize(("kind", "conv"), [
    ("conv1d", {"stride": (1,), "padding": (0,), "dilation": (1,), "groups": 1}),
    ("conv2d", {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2), "groups": 1}),
    ("linear", {}),
])
def test_numpy_accumulate_equals_torch_on_integers(kind: str, conv: dict) -> None:
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        x, w = torch.randint(-5, 6, (4, 7), generator=g), torch.randint(-8, 9, (3, 7), generator=g)
        want = F.linear(x.double(), w.double())
    elif kind == "conv1d":
        x, w = torch.randint(-5, 6, (2, 4, 9), generator=g), torch.randint(-8, 9, (3, 4, 1), generator=g)
        want = F.conv1d(x.double(), w.double(), None, **conv)
    else:
        x = torch.randint(-5, 6, (2, 3, 9, 8), generator=g)
        w = torch.randint(-8, 9, (4, 3, 3, 3), generator=g)
        want = F.conv2d(x.double(), w.double(), None, **conv)
    got = _np_accumulate(kind, x.numpy().astype(np.int64), w.numpy().astype(np.int64), conv)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want.numpy().astype(np.int64))


def test_refuses_what_the_integer_path_cannot_express(spikformer) -> None:
    calib = _batches((T, B, 2, 32, 32), 1)
    with pytest.raises(ValueError, match="needs a quantized model"):
        integerize(build_model("spikformer-tiny", depth=1, num_classes=4), calib)
    with pytest.raises(ValueError, match="membrane_bits must be >= 4"):
        integerize(spikformer, calib, membrane_bits=3)
    real = [(torch.rand(T, B, 2, 32, 32) * 0.37, torch.zeros(B, dtype=torch.long))]
    with pytest.raises(ValueError, match="patch_embed.convs.0.conv gets inputs that are not fixed-point"):
        integerize(spikformer, real)

    class WithNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.lif = MultiStepLeaky()

        def forward(self, x):
            return self.lif(self.norm(self.fc(x)))

    m = WithNorm()
    swap_layers(m, bits=4)
    with pytest.raises(ValueError, match="norm: LayerNorm holds weight, bias, which the integer path"):
        integerize(m, [(torch.ones(T, 2, 4), None)])

    class PerStep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.lif = snn.Leaky(beta=0.5)

        def forward(self, x):
            mem = self.lif.init_leaky()
            return torch.stack([self.lif(self.fc(x_t), mem)[0] for x_t in x])

    m = PerStep()
    swap_layers(m, bits=4)
    with pytest.raises(ValueError, match="fc gets inputs that are not fixed-point numbers"):
        integerize(m, [(torch.full((T, 2, 4), 0.3), None)])


def test_inputs_must_keep_the_calibrated_fixed_point_format(spikformer) -> None:
    integer, _ = integerize(spikformer, _batches((T, B, 2, 32, 32), 1))
    with pytest.raises(ValueError, match="convs.0.conv gets inputs that are not fixed-point numbers with 0"):
        integer(torch.full((T, B, 2, 32, 32), 0.3))
    assert isinstance(integer.patch_embed.convs[0].conv, IntegerSynapse)


# Every corpus model either runs integer-only, bit for bit with its NumPy reference, or is refused with a
# message that names the module and what it lacks. A change in either direction shows up here.
CORPUS_OUTCOME = {
    "snntorch-tutorial5-fcn": "fc1 gets inputs that are not fixed-point",  # MNIST pixels in [0, 1]
    "snntorch-tutorial7-csnn": None,  # per-step Leaky behind Conv -> MaxPool: integer-only
    "neurobench-nehar-scnn": "conv1 gets inputs that are not fixed-point",  # accelerometer readings
    "snntorch-regression1-series": "lif_in: per-channel beta or threshold",
    "snntorch-regression2-rleaky": "rlif1: RLeaky neurons are not supported",
    "spikformer-cifar10dvs-official": r"the model itself \(Spikformer\) holds pos_embed",  # unused parameter
    "sdt-cifar10dvs-tet-official": "patch_embed.proj_lif.lif: Leaky with state_quant, inhibition or",
    # a second state variable (syn) the integer LIF does not have; its MNIST pixels would be refused next
    "snntorch-tutorial3-synaptic": "lif1: Synaptic neurons are not supported by the integer path",
    # the decoder's transposed convolutions (fake-quant export takes them; the integer path has no synapse)
    "snntorch-sae": "decoder.2: QuantConvTranspose2d has no integer synapse",
    "snntorch-pop-coding": "1 gets inputs that are not fixed-point",  # Fashion-MNIST pixels in [0, 1]
    # the unused parameter first; its SpikingJelly neurons would be named next
    "spikformer-cifar10dvs-spikingjelly": r"the model itself \(Spikformer\) holds pos_embed",
    # its multi-step layers first; its SpikingJelly LIFNode neurons would be named next
    "spikingjelly-dvsgesture-net": "conv_fc.0: StepQuantConv2d in SpikingJelly's step_mode 'm' has no",
    # SpikingJelly's LIFNode first; its real-valued series would be refused next
    "seqsnn-spikformer-forecast": "network.temporal_encoder.lif: LIFNode neurons are not supported by the",
}


@pytest.mark.parametrize("entry", CORPUS, ids=[e.name for e in CORPUS])
def test_corpus_models_run_integer_only_or_are_refused_by_name(entry: CorpusModel) -> None:
    model = entry.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the data-free metric warning, released protection
        hq_ptq.quantize(model, 3.5, config=QuantConfig(search=SearchConfig(metric="data_free"),
                                                       qat=QATConfig(steps=0)))
    (example, _), (fresh, _) = entry.batches(2, 11)
    expected = CORPUS_OUTCOME[entry.name]
    if expected is not None:
        with pytest.raises(ValueError, match=expected):
            integerize(model, [(example, None)])
        return
    integer, report = integerize(model, [(example, None)])
    assert report.synapses and report.neurons
    with torch.no_grad():
        got = [t.clone() for t in tensors(call(integer, fresh))]
        with reference_mode(integer):
            want = list(tensors(call(integer, fresh)))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
