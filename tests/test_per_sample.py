"""One-pass per-sample gradients (hq_ptq/per_sample.py): the same empirical Fisher as single-sample
micro-batches, for every conv configuration, layers called once per time step, the zoo and the corpus; and a
refusal (so the caller splits the batch) wherever rows cannot be attributed to one sample."""

from __future__ import annotations

import pytest
import snntorch as snn
import torch
import torch.nn.functional as F
from corpus import CORPUS, warm_batchnorm
from torch import nn

from hq_ptq import sensitivity
from hq_ptq.models import build_model
from hq_ptq.per_sample import _owners, per_sample_squared_norms
from hq_ptq.snn import reset_states
from hq_ptq.swap import find_layers


def _one_pass(model, layers, batch, loss_fn=F.cross_entropy):
    """per_sample_squared_norms on one batch, as fisher_traces calls it (eval, grads on the weights)."""
    params = [layer.weight for layer in layers.values()]
    with sensitivity._analysis_mode(model, params):
        reset_states(model)
        return per_sample_squared_norms(model, layers, params, batch[0], batch[1], loss_fn)


def _fisher_both_ways(model, layers, batches, loss_fn=None, monkeypatch=None):
    """(fisher_traces as it runs, fisher_traces with the one-pass path switched off: micro-batches)."""
    fast = sensitivity.fisher_traces(model, layers, batches, loss_fn, reset=reset_states)
    monkeypatch.setattr(sensitivity, "per_sample_squared_norms", lambda *args: "switched off")
    slow = sensitivity.fisher_traces(model, layers, batches, loss_fn, reset=reset_states)
    monkeypatch.undo()
    return fast, slow


def _assert_same(fast, slow):
    assert fast.keys() == slow.keys()
    for name in slow:
        assert slow[name] > 0, name
        assert fast[name] == pytest.approx(slow[name], rel=1e-5), name


class _Convs(nn.Module):
    """Every conv configuration the row split must handle: strides, padding (zeros, 'same', reflect),
    dilation, groups, 1x1 (the matmul path), Conv1d/2d/3d, and a Linear on [B, tokens, features]."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding="same", groups=2, dilation=2)
        self.c3 = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
        self.p = nn.Conv1d(6, 6, 1)
        self.t = nn.Conv1d(6, 6, 3, padding=1, bias=False)
        self.v = nn.Conv3d(1, 2, (2, 3, 3), padding=(0, 1, 1))
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c3(torch.tanh(self.c2(torch.tanh(self.c1(x))))))  # [B, 6, 4, 4]
        v = torch.tanh(self.v(x.unsqueeze(1)))  # [B, 2, 1, 8, 8]
        tokens = h.flatten(2) + v.flatten(2)[:, :1, :16]
        tokens = torch.tanh(self.t(torch.tanh(self.p(tokens))))  # [B, 6, 16]
        return self.fc(tokens.transpose(1, 2)).mean(1)


def _conv_batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(5, 2, 8, 8, generator=g), torch.randint(0, 5, (5,), generator=g)) for _ in range(2)]


def test_every_conv_configuration_matches_micro_batches(monkeypatch):
    torch.manual_seed(0)
    model = _Convs()
    layers = {n: model.get_submodule(n) for n in ["c1", "c2", "c3", "p", "t", "v", "fc"]}
    assert not isinstance(_one_pass(model, layers, _conv_batches()[0]), str)
    _assert_same(*_fisher_both_ways(model, layers, _conv_batches(), monkeypatch=monkeypatch))


class _PerStep(nn.Module):
    """snnTorch's per-step style: the same Linear/Conv called once per time step on time-first input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.lif1 = snn.Leaky(beta=0.8)
        self.fc = nn.Linear(4 * 6, 3)
        self.lif2 = snn.Leaky(beta=0.8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, B, 2, 6]
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        out = []
        for step in x:
            spk1, mem1 = self.lif1(self.conv(step), mem1)
            _, mem2 = self.lif2(self.fc(spk1.flatten(1)), mem2)
            out.append(mem2)
        return torch.stack(out).mean(0)


def test_layers_called_once_per_step_match_micro_batches(monkeypatch):
    torch.manual_seed(1)
    model = _PerStep()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(7, 5, 2, 6, generator=g) * 3, torch.randint(0, 3, (5,), generator=g))]
    layers = {"conv": model.conv, "fc": model.fc}
    assert not isinstance(_one_pass(model, layers, batches[0]), str)
    _assert_same(*_fisher_both_ways(model, layers, batches, monkeypatch=monkeypatch))


@pytest.mark.parametrize("name", ["spikformer-tiny", "sdt-tiny"])
def test_zoo_matches_micro_batches(name, monkeypatch):
    torch.manual_seed(0)
    model = build_model(name, num_classes=4, img_size=16)
    g = torch.Generator().manual_seed(0)
    batches = [((torch.rand(2, 3, 2, 16, 16, generator=g) < 0.3).float(), torch.tensor([0, 1, 3]))]
    warm_batchnorm(model, batches)  # fresh running statistics leave an untrained model silent
    layers = {n: model.get_submodule(n) for n in find_layers(model)}
    assert not isinstance(_one_pass(model, layers, batches[0]), str)
    _assert_same(*_fisher_both_ways(model, layers, batches, monkeypatch=monkeypatch))


def _hand_squares(model, layers, batch, loss_fn, batch_dim):
    """sum_i ||g_i||^2 per layer by hand: one forward/backward per sample, sliced along ``batch_dim``."""
    inputs, targets = batch
    weights = [layer.weight for layer in layers.values()]
    total = torch.zeros(len(weights), dtype=torch.float64)
    with sensitivity._analysis_mode(model, weights):
        for i in range(len(targets)):
            reset_states(model)
            x = inputs.narrow(batch_dim, i, 1)
            loss = loss_fn(model(x), targets.narrow(0, i, 1))
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            zero = torch.zeros((), dtype=torch.float64)
            total += torch.stack([g.double().pow(2).sum() if g is not None else zero for g in grads])
    return total


# what the one-pass split does on each public model of the corpus: None (split, and checked against a hand
# computation that slices the inputs along the given dimension) or the reason it refuses. At these tiny sizes
# T == B == 4 makes the snnTorch tutorials' [T, B, classes] outputs ambiguous: the first reading (time) fails
# the loss or row check and the second (batch) is taken. regression1's targets are [T, B, 1]: len(targets) is
# T, so its "samples" would be time steps, and the row check refuses them.
CORPUS_OUTCOME = {
    "snntorch-tutorial5-fcn": (None, 0),
    "snntorch-tutorial7-csnn": (None, 1),
    "neurobench-nehar-scnn": (None, 0),
    "snntorch-regression1-series": ("rows of layer 'fc_out' reach the losses of several samples", None),
    "snntorch-regression2-rleaky": (None, 0),
    "spikformer-cifar10dvs-official": (None, 0),
    "sdt-cifar10dvs-tet-official": (None, 0),
    "snntorch-tutorial3-synaptic": (None, 0),  # T = 6 != B: the [T, B, 10] outputs are unambiguous
    "snntorch-sae": (None, 0),  # ConvTranspose2d rows: the transposed weight gradient
    "snntorch-pop-coding": (None, 0),
    "spikformer-cifar10dvs-spikingjelly": (None, 0),
    # [T, N, 11] outputs; its multi-step convs fold [T, N] themselves, so their rows are T * N images
    "spikingjelly-dvsgesture-net": (None, 1),
    # Linear layers on [T * B, L, D] token sequences: each of the T * B * L rows reaches one sample's loss
    "seqsnn-spikformer-forecast": (None, 0),
}


@pytest.mark.parametrize("entry", CORPUS, ids=lambda e: e.name)
def test_corpus(entry):
    assert set(CORPUS_OUTCOME) == {e.name for e in CORPUS}, "pin the outcome of every corpus model"
    model = entry.build()
    layers = {n: model.get_submodule(n) for n in find_layers(model) if n not in entry.dead_layers}
    (batch,) = entry.batches(1, 0)
    got = _one_pass(model, layers, batch, entry.loss)
    reason, batch_dim = CORPUS_OUTCOME[entry.name]
    if reason is not None:
        assert isinstance(got, str) and reason in got
        return
    assert not isinstance(got, str), got
    squares, n = got
    assert n == len(batch[1])
    hand = _hand_squares(model, layers, batch, entry.loss, batch_dim)
    torch.testing.assert_close(squares, hand, rtol=1e-5, atol=0)
    assert bool((squares > 0).all())


class _Mixer(nn.Module):
    """Subtracts the batch mean after its first layer: every row reaches every sample's loss."""

    def __init__(self, reuse_weight: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)
        self.reuse_weight = reuse_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reuse_weight:  # the weight used outside its module's forward: hooks see only one use
            return self.b(torch.tanh(self.a(x)) + F.linear(x, self.a.weight))
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0, keepdim=True))


def _mlp_batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)


def test_refuses_a_model_that_mixes_samples():
    torch.manual_seed(0)
    model = _Mixer()
    got = _one_pass(model, {"a": model.a, "b": model.b}, _mlp_batch())
    assert isinstance(got, str) and "rows of layer 'a' reach the losses of several samples" in got


def test_refuses_a_weight_used_outside_its_module():
    torch.manual_seed(0)
    model = _Mixer(reuse_weight=True)
    got = _one_pass(model, {"a": model.a, "b": model.b}, _mlp_batch())
    assert isinstance(got, str) and "per-sample gradients of layer 'a' do not add up" in got


def test_refuses_a_loss_that_is_not_a_mean_over_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    summed = lambda out, y: F.cross_entropy(out, y, reduction="sum")  # noqa: E731
    got = _one_pass(model, {"0": model[0]}, _mlp_batch(), summed)
    assert isinstance(got, str) and "per-sample losses average" in got


def test_a_row_shared_by_two_samples_is_refused_at_any_batch_size():
    # equal shares of samples 500 and 501 give the ratio 501.5: within 0.1% of an integer, not within 0.05
    plain = torch.ones(1, 4)
    seeded = plain * 501.5
    assert _owners(plain, seeded, 1000) is None
    assert _owners(plain, plain * 502, 1000).tolist() == [500]  # sample i is seeded with weight i + 2


class _SignGrad(torch.autograd.Function):
    """Identity forward, sign of the output gradient backward: not linear in the seed, blind to its scale."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.sign()


def test_refuses_a_backward_that_ignores_the_scale_of_its_seed():
    # with seeds i + 1 every row's ratio would be 1, all rows would go to sample 0 and the sums would still
    # match: wrong per-sample norms, accepted. With i + 2 the ratio 1 names no sample.
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin)
    model.forward = lambda x: _SignGrad.apply(lin(x))  # the sign sits between the layer and the loss
    got = _one_pass(model, {"0": lin}, _mlp_batch())
    assert isinstance(got, str) and "rows of layer '0' reach the losses of several samples" in got


def test_a_batch_whose_gradients_exceed_the_memory_budget_is_split_into_chunks(monkeypatch):
    """Per-sample gradients cost n x the analysed weights: beyond PER_SAMPLE_BYTES the batch is refused by
    per_sample_squared_norms and fisher_traces feeds it in chunks that fit, with the same traces."""
    from hq_ptq import per_sample

    torch.manual_seed(0)
    model = _Convs()
    layers = {n: model.get_submodule(n) for n in ["c1", "c2", "c3", "p", "t", "v", "fc"]}
    whole = sensitivity.fisher_traces(model, layers, _conv_batches(), None, reset=reset_states)
    weight_bytes = sum(layer.weight.numel() * 4 for layer in layers.values())
    monkeypatch.setattr(per_sample, "PER_SAMPLE_BYTES", 2 * weight_bytes)  # 2 samples at once; batches of 5
    refused = _one_pass(model, layers, _conv_batches()[0])
    assert isinstance(refused, str) and "pass at most 2 at once" in refused
    calls = []
    original = sensitivity.per_sample_squared_norms
    monkeypatch.setattr(sensitivity, "per_sample_squared_norms",
                        lambda *args: calls.append(len(args[4])) or original(*args))
    chunked = sensitivity.fisher_traces(model, layers, _conv_batches(), None, reset=reset_states)
    assert calls == [2, 2, 1, 2, 2, 1]  # every chunk went through the one-pass path, none fell back
    for name in whole:
        assert chunked[name] == pytest.approx(whole[name], rel=1e-6), name


def test_a_forward_without_gradients_or_a_nan_loss_is_refused_with_the_reason():
    torch.manual_seed(0)
    model = _Convs()
    layers = {n: model.get_submodule(n) for n in ["c1", "fc"]}
    inputs, targets = _conv_batches()[0]
    params = [layer.weight for layer in layers.values()]
    with sensitivity._analysis_mode(model, params), torch.no_grad():
        got = per_sample_squared_norms(model, layers, params, inputs, targets, F.cross_entropy)
    # outputs [5, 5]: both readings of the batch dimension are tried; the right one names the reason
    assert isinstance(got, str) and "batch dimensions [0]: no output depends on the analysed layers" in got

    def nan_loss(outputs, targets):
        return F.cross_entropy(outputs, targets) * float("nan")

    got = _one_pass(model, layers, (inputs, targets), nan_loss)
    assert isinstance(got, str) and "not the batch loss nan" in got
