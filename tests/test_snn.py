from __future__ import annotations

import copy

import pytest
import snntorch as snn
import torch
from conftest import step_leaky
from snntorch._neurons.neurons import SpikingNeuron
from torch import nn

from hq_ptq.snn import MultiStepLeaky, reset_states, spiking_neurons, surrogate_disabled


def _currents(shape: tuple[int, ...] = (8, 3, 17), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 1.5


@pytest.mark.parametrize("reset", ["zero", "subtract", "none"])
@pytest.mark.parametrize("beta,threshold", [(0.5, 1.0), (0.9, 0.5)], ids=["tau2", "b0.9-th0.5"])
def test_multistep_equals_stepping_snn_leaky(reset: str, beta: float, threshold: float) -> None:
    x = _currents().requires_grad_()
    layer = MultiStepLeaky(beta, threshold, reset_mechanism=reset, return_mem=True)
    spk, mem = layer(x)

    x_ref = x.detach().clone().requires_grad_()
    ref_spk, ref_mem = step_leaky(snn.Leaky(beta=beta, threshold=threshold, reset_mechanism=reset), x_ref)
    assert spk.shape == x.shape and mem.shape == x.shape
    assert 0 < spk.mean() < 1  # the comparison is only meaningful with some spikes
    assert torch.equal(spk, ref_spk)
    assert torch.equal(mem, ref_mem)

    weights = torch.linspace(-1, 1, x.shape[-1])
    (spk * weights).sum().backward()
    (ref_spk * weights).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # surrogate gradient flows
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)


def test_general_path_equals_stepping_snn_leaky() -> None:
    # reset_delay=False is not covered by the unrolled loop, so the layer must call the Leaky itself.
    x = _currents(seed=1)
    layer = MultiStepLeaky(0.5, 1.0, return_mem=True)
    layer.lif.reset_delay = False
    spk, mem = layer(x)
    ref_spk, ref_mem = step_leaky(
        snn.Leaky(beta=0.5, threshold=1.0, reset_mechanism="zero", reset_delay=False), x
    )
    assert torch.equal(spk, ref_spk) and torch.equal(mem, ref_mem)
    assert layer.lif.mem.numel() == 0  # the last membrane was not left behind in the buffer


def test_multistep_keeps_no_state_between_calls() -> None:
    layer = MultiStepLeaky()
    x = _currents(seed=2).requires_grad_()
    first = layer(x)
    first.sum().backward()
    second = layer(x)
    assert torch.equal(first, second)
    assert layer.lif.mem.numel() == 0
    copy.deepcopy(layer)  # no non-leaf tensor is stored on the module


def test_multistep_exposes_the_leaky_and_checks_input() -> None:
    layer = MultiStepLeaky(0.5, 0.5)
    assert isinstance(layer.lif, snn.Leaky) and not layer.lif.init_hidden
    assert float(layer.lif.threshold) == 0.5 and layer.lif.reset_mechanism == "zero"
    assert [name for name, _ in spiking_neurons(nn.Sequential(layer))] == ["0.lif"]
    with pytest.raises(ValueError, match="time-first"):
        layer(torch.ones(5))
    with pytest.raises(ValueError, match="reset_mechanism"):
        MultiStepLeaky(reset_mechanism="hard")


def _user_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(6, 10),
        snn.Leaky(beta=0.8, init_hidden=True),
        nn.Linear(10, 4),
        snn.Synaptic(alpha=0.7, beta=0.8, init_hidden=True),
    )


def _run(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([net(x[t]) for t in range(x.shape[0])])


def test_reset_states_per_instance() -> None:
    torch.manual_seed(0)
    net, other = _user_net(), _user_net()
    x = _currents((6, 5, 6), seed=3) * 2
    first = _run(net, x)
    _run(other, x)
    assert net[1].mem.abs().sum() > 0 and net[3].syn.abs().sum() > 0
    other_mem = other[1].mem.clone()

    # Without a reset the second pass starts from the old state and differs.
    assert not torch.equal(_run(net, x), first)
    assert reset_states(net) == 2
    for state in (net[1].mem, net[3].syn, net[3].mem):
        assert state.abs().sum() == 0 and state.grad_fn is None
    assert torch.equal(_run(net, x), first)
    assert torch.equal(other[1].mem, other_mem)  # the other network was left alone


def test_reset_states_leaves_snntorch_registry_alone() -> None:
    before = list(SpikingNeuron.instances)
    reset_states(_user_net())
    assert SpikingNeuron.instances[: len(before)] == before


def test_surrogate_disabled_toggles_and_restores() -> None:
    net = nn.Sequential(nn.Linear(5, 7), MultiStepLeaky(), snn.Leaky(beta=0.5, init_hidden=True))
    neurons = [m for _, m in spiking_neurons(net)]
    assert len(neurons) == 2
    originals = [n.spike_grad for n in neurons]
    x = _currents((4, 3, 5), seed=4) * 3

    def forward(inp: torch.Tensor) -> torch.Tensor:
        reset_states(net)
        h = net[1](net[0](inp))
        return torch.stack([net[2](h[t]) for t in range(h.shape[0])])

    reference = forward(x)
    with surrogate_disabled(net) as same:
        assert same is net
        assert all(n.surrogate_disable and n.spike_grad is not o for n, o in zip(neurons, originals))
        xg = x.clone().requires_grad_()
        out = forward(xg)
        assert torch.equal(out, reference)  # forward values do not change
        assert not out.requires_grad  # the Heaviside bypass carries no gradient
    assert all(not n.surrogate_disable and n.spike_grad is o for n, o in zip(neurons, originals))
    xg = x.clone().requires_grad_()
    forward(xg).sum().backward()
    assert xg.grad.abs().sum() > 0

    with pytest.raises(RuntimeError, match="boom"), surrogate_disabled(net):
        raise RuntimeError("boom")
    assert all(not n.surrogate_disable and n.spike_grad is o for n, o in zip(neurons, originals))


def test_surrogate_disabled_restores_a_module_surrogate() -> None:
    class Surrogate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return snn.surrogate.atan()(x)

    lif = snn.Leaky(beta=0.5, spike_grad=Surrogate())
    original = lif.spike_grad
    with surrogate_disabled(lif):
        assert "spike_grad" not in lif._modules
    assert lif.spike_grad is original and lif._modules["spike_grad"] is original


def test_multistep_leaky_follows_a_reset_mechanism_changed_after_a_forward():
    """The reset code is read once per change of snnTorch's buffer (not on every forward, which would
    synchronise an accelerator): a change by the setter or by load_state_dict still takes effect."""
    x = torch.rand(6, 3, 5, generator=torch.Generator().manual_seed(0)) * 2

    def neuron(reset: str) -> MultiStepLeaky:
        return MultiStepLeaky(beta=0.8, threshold=0.7, reset_mechanism=reset)

    changed = neuron("zero")
    changed(x)
    changed.lif.reset_mechanism = "subtract"
    assert torch.equal(changed(x), neuron("subtract")(x))
    changed.load_state_dict(neuron("none").state_dict())
    assert torch.equal(changed(x), neuron("none")(x))
    assert not torch.equal(neuron("none")(x), neuron("zero")(x))
