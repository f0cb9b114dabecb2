"""The corpus of third-party spiking models (tests/corpus/) is sound: every entry builds deterministically at
its tiny size, accepts its synthetic batches, gives a finite loss whose gradient reaches every Conv/Linear it
uses, contains snnTorch neurons that fire, and resets its own state between calls (or carries it, where the
caller must reset). hq_ptq itself is not run
here; these are the preconditions for running it on the corpus."""

from __future__ import annotations

import re

import pytest
import torch
from corpus import BATCH_SIZE, CORPUS, CorpusModel, reset_neurons
from corpus._shims import MultiStepLIFNode, MultiStepParametricLIFNode
from snntorch._neurons.neurons import SpikingNeuron
from torch import nn

from hq_ptq import model_io

ENTRIES = {entry.name: entry for entry in CORPUS}
NAMES = list(ENTRIES)
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)


def _first_batch(entry: CorpusModel):
    (inputs, targets), *_ = entry.batches(1, 0)
    return inputs, targets


def _run(entry: CorpusModel, model: nn.Module, inputs, targets, seed: int = 0):
    torch.manual_seed(seed)  # any dropout in a model draws from here
    outputs = model_io.call(model, inputs)
    return outputs, entry.loss(outputs, targets)


def test_registry_is_well_formed():
    assert len(CORPUS) >= 6
    assert len(NAMES) == len(set(NAMES))
    for entry in CORPUS:
        # pinned: a repository at a commit, or a released package at its version (a model a library ships)
        pinned = r"([\w.-]+/[\w.-]+@[0-9a-f]{40}|[\w.-]+==[\w.]+ \(PyPI\)) \S.*"
        assert re.fullmatch(pinned, entry.source), entry.source
        assert entry.exercises and entry.licence
        assert entry.classes is None or entry.classes >= 2


@pytest.mark.parametrize("name", NAMES)
def test_build_is_deterministic(name):
    entry = ENTRIES[name]
    rng = torch.get_rng_state()
    a, b = entry.build(), entry.build()
    assert torch.equal(torch.get_rng_state(), rng), "build() must not consume the global RNG"
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert any(p.requires_grad for p in a.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_batches_are_deterministic_and_valid(name):
    entry = ENTRIES[name]
    first, again, other = entry.batches(2, 0), entry.batches(2, 0), entry.batches(2, 1)
    assert len(first) == 2
    for (x0, y0), (x1, y1) in zip(first, again):
        for t0, t1 in zip(model_io.tensors(x0), model_io.tensors(x1)):
            assert torch.equal(t0, t1)
        assert torch.equal(y0, y1)
    assert not torch.equal(model_io.first_tensor(first[0][0]), model_io.first_tensor(other[0][0]))
    for inputs, targets in first:
        tensors = list(model_io.tensors(inputs))
        assert tensors and all(torch.isfinite(t).all() for t in tensors)
        if entry.classes is None:
            assert targets.is_floating_point()
        else:
            assert targets.shape == (BATCH_SIZE,) and targets.dtype == torch.long
            assert 0 <= int(targets.min()) and int(targets.max()) < entry.classes


def _is_neuron(module: nn.Module) -> bool:
    """An snnTorch neuron, or a SpikingJelly one (a MemoryModule with a threshold)."""
    spikingjelly = isinstance(vars(module).get("_memories"), dict) and hasattr(module, "v_threshold")
    return isinstance(module, SpikingNeuron) or spikingjelly


@pytest.mark.parametrize("name", NAMES)
def test_has_spiking_neurons(name):
    model = ENTRIES[name].build()
    assert any(_is_neuron(m) for m in model.modules())
    assert any(isinstance(m, WEIGHTED) for m in model.modules())


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_reaches_every_used_layer(name):
    entry = ENTRIES[name]
    model = entry.build()
    inputs, targets = _first_batch(entry)
    outputs, loss = _run(entry, model, inputs, targets)
    assert loss.numel() == 1 and torch.isfinite(loss).all(), loss
    if entry.output_fn is not None or entry.classes is not None:
        scores = entry.output_fn(outputs) if entry.output_fn else outputs
        assert scores.shape == (BATCH_SIZE, entry.classes)
    loss.backward()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, WEIGHTED)}
    no_grad = sorted(
        n for n, m in layers.items() if m.weight.grad is None or not m.weight.grad.abs().sum() > 0
    )
    assert no_grad == sorted(entry.dead_layers), "layers without gradient"
    assert set(entry.dead_layers) <= set(layers)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_neurons_fire(name, mode):
    """Every snnTorch neuron that forward calls fires on the first batch, in train and in eval mode (the
    BatchNorm running statistics are set by build()), except the entry's ``silent_neurons``; the ones it
    never calls are exactly the entry's ``unused_neurons``."""
    entry = ENTRIES[name]
    model = entry.build().train(mode == "train")
    neurons = {n: m for n, m in model.named_modules() if _is_neuron(m)}
    assert set(entry.silent_neurons) <= set(neurons)
    calls = dict.fromkeys(neurons, 0)
    spikes = dict.fromkeys(neurons, 0.0)

    def hook(name):
        def record(module, args, output):
            spk = output[0] if isinstance(output, tuple) else output
            calls[name] += 1
            spikes[name] += float(spk.detach().sum())

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in neurons.items()]
    with torch.no_grad():
        _run(entry, model, *_first_batch(entry))
    for h in handles:
        h.remove()
    unused = sorted(n for n, c in calls.items() if c == 0)
    assert unused == sorted(entry.unused_neurons), f"neurons forward never calls: {unused}"
    silent = sorted(n for n, s in spikes.items() if s == 0 and calls[n] and n not in entry.silent_neurons)
    assert not silent, f"neurons that never fire: {silent}"


@pytest.mark.parametrize("name", NAMES)
def test_state_is_reset_between_calls(name):
    """Calling the model twice on the same batch gives the same outputs: it resets its own membranes, or,
    for an entry whose caller must reset them (``resets_itself=False``), it carries its state from one
    call to the next unless the caller resets it (``snntorch.utils.reset``, SpikingJelly's ``reset_net``), as
    its authors' loops do."""
    entry = ENTRIES[name]
    model = entry.build()
    inputs, targets = _first_batch(entry)
    with torch.no_grad():
        reset_neurons(model)
        first, _ = _run(entry, model, inputs, targets)
        second, _ = _run(entry, model, inputs, targets)
        if not entry.resets_itself:
            assert not all(map(torch.equal, model_io.tensors(first), model_io.tensors(second)))
            reset_neurons(model)
            second, _ = _run(entry, model, inputs, targets)
    a, b = list(model_io.tensors(first)), list(model_io.tensors(second))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _spikingjelly_lif(x_seq, tau=2.0, v_threshold=1.0):
    """spikingjelly's multi-step LIF (decay_input=True, v_reset=0, hard reset), written out."""
    v = torch.zeros_like(x_seq[0])
    out = []
    for x in x_seq:
        h = v + (x - v) / tau
        s = (h >= v_threshold).to(x.dtype)
        v = h * (1 - s)
        out.append(s)
    return torch.stack(out)


@pytest.mark.parametrize("v_threshold", [1.0, 0.5])
def test_multistep_lif_shim_matches_spikingjelly(v_threshold):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 40, generator=gen) * 2 + 1
    node = MultiStepLIFNode(tau=2.0, v_threshold=v_threshold, detach_reset=True, backend="cupy")
    expected = _spikingjelly_lif(x, v_threshold=v_threshold)
    assert 0.1 < float(expected.mean()) < 0.9
    assert torch.equal(node(x), expected)
    assert torch.equal(node(x), expected)  # no state carried over between calls
    plif = MultiStepParametricLIFNode(
        init_tau=2.0, v_threshold=v_threshold, detach_reset=True, backend="cupy"
    )
    assert torch.equal(plif(x), expected)
    assert [n for n, _ in plif.named_parameters()] == ["lif.beta"]
    x.requires_grad_(True)
    node(x).sum().backward()
    assert x.grad.abs().sum() > 0
