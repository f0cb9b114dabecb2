"""Models hq_ptq has never seen: neuron state, dead layers, budgets the defaults make hard, failed calls that
must leave the model untouched, outputs that are not logits, and models to_multistep must refuse.

Each test names the problem of issue [G] it pins down; every one of them failed before the fix.
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings

import onnx
import pytest
import snntorch as snn
import torch
import torch.nn.functional as F
from snntorch import functional as SF
from snntorch import utils
from torch import nn

import hq_ptq
from hq_ptq import api, state
from hq_ptq.config import QATConfig, QuantConfig, SearchConfig
from hq_ptq.plan import LayerChoice, Plan
from hq_ptq.snn import detached_copy, reset_states, to_multistep
from hq_ptq.state import SEARCH_ATTR
from hq_ptq.swap import quant_layers, swap_layers

T = 3


class OwnLoopNet(nn.Module):
    """Static image in, its own time loop over init_hidden neurons reset with ``utils.reset``, [B, C] out."""

    def __init__(self, classes: int = 4, dead: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.lif1 = snn.Leaky(beta=0.7, init_hidden=True)
        self.hidden = nn.Linear(6 * 16, 12)
        # a block whose neurons never fire on this data: no gradient reaches `hidden`
        self.lif2 = snn.Leaky(beta=0.7, threshold=1e6 if dead else 1.0, init_hidden=True)
        self.skip = nn.Linear(6 * 16, classes)
        self.fc = nn.Linear(12, classes)
        self.lif3 = snn.Leaky(beta=0.7, init_hidden=True, output=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        utils.reset(self)  # snnTorch's class-level reset: misses deep copies
        counts = 0
        for _ in range(T):
            s = self.lif1(F.avg_pool2d(self.conv(x), 2)).flatten(1)
            spk, mem = self.lif3(self.fc(self.lif2(self.hidden(s))) + self.skip(s))
            counts = counts + mem
        return counts / T


class StatefulNet(nn.Module):
    """init_hidden neurons that the model never resets itself: state would carry across batches."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.lif = snn.Leaky(beta=0.9, init_hidden=True)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.lif(self.fc2(self.lif(self.fc1(x)) * 1.0)))


def _images(n: int = 4, seed: int = 0, classes: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(6, 1, 8, 8, generator=g) * 3, torch.randint(0, classes, (6,), generator=g))
            for _ in range(n)]


def _vectors(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 8, generator=g) * 2, torch.randint(0, 4, (5,), generator=g)) for _ in range(n)]


def _config(**qat) -> QuantConfig:
    return QuantConfig(search=SearchConfig(metric="fisher", calib_batches=2), qat=QATConfig(**qat),
                       bn_recalibration_batches=2)


def _state(model: nn.Module) -> tuple[list, dict, list]:
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()])


def _assert_untouched(model: nn.Module, before: tuple[list, dict, list]) -> None:
    types, state, flags = _state(model)
    assert types == before[0]
    assert list(state) == list(before[1])
    assert all(torch.equal(state[k], before[1][k]) for k in state)
    assert flags == before[2]
    assert not hasattr(model, SEARCH_ATTR)


# ------------------------------------------------------------------------------------------ 1. state


def test_copy_right_after_a_training_step():
    model = StatefulNet()
    x, y = _vectors(1)[0]
    F.cross_entropy(model(x), y).backward()  # the neuron now holds a membrane with its graph
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)
    clone = detached_copy(model)
    assert clone.lif.mem.grad_fn is None and not clone.lif.mem.any()
    assert model.lif.mem.grad_fn is not None  # the original is not touched
    # and the one-liner with QAT (which copies the model as its teacher) runs on it
    hq_ptq.quantize(model, 4.0, calib_data=_vectors(), train_data=_vectors(seed=1), config=_config(steps=2))


def test_spikingjelly_neurons_are_reset_and_copied_like_snntorch_ones():
    """SpikingJelly keeps a neuron's membrane in ``_memories`` (not a buffer or attribute) and its users reset
    it with functional.reset_net after each batch; hq_ptq's state rule must reach it, or QAT backpropagates
    through the previous batch's freed graph."""
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import neuron

    model = nn.Sequential(nn.Linear(6, 8), neuron.LIFNode(tau=2.0, step_mode="m"), nn.Linear(8, 3))
    x = 3 * torch.rand(4, 2, 6)  # [T, B, features]
    model(x).sum().backward()  # the neuron now holds v with its graph
    lif = model[1]
    assert lif.v.grad_fn is not None
    clone = detached_copy(model)
    assert clone[1].v == 0.0 and lif.v.grad_fn is not None  # reset to v_reset; the original untouched
    assert reset_states(model) == 1 and lif.v == 0.0
    model(x).sum().backward()  # a second step would fail if the state still held the first graph
    # the integer path models snnTorch LIFs only: it names this neuron instead of leaving it float inside
    swap_layers(model, scheme="uniform", bits=8)
    with pytest.raises(ValueError, match="^1: LIFNode neurons are not supported by the integer path"):
        hq_ptq.integerize(model, [(torch.poisson(torch.full((4, 2, 6), 1.0)), torch.tensor([0, 1]))])


class _SpikingJellyNet(nn.Module):
    def __init__(self, make_neuron) -> None:
        super().__init__()
        self.fc1, self.lif1, self.fc2 = nn.Linear(6, 16), make_neuron(), nn.Linear(16, 16)
        self.lif2, self.fc3 = make_neuron(), nn.Linear(16, 3)

    def forward(self, x):  # [T, B, 6] -> [B, 3]
        return self.fc3(self.lif2(self.fc2(self.lif1(self.fc1(x))))).mean(0)


def test_spikingjelly_neurons_pass_gradients_in_the_analysis_and_count_in_the_energy_report():
    """In eval mode SpikingJelly 0.0.0.0.14's activation_based LIFNode fires through a plain step with no
    surrogate: analysed in eval, every layer before it had a zero trace and was called dead. Its traces must
    equal those of clock_driven's MultiStepLIFNode, the same neuron, which has no eval-only path."""
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import neuron as activation_based
    from spikingjelly.clock_driven import neuron as clock_driven

    from hq_ptq.energy import measure_activity

    gen = torch.Generator().manual_seed(0)
    data = [(6 * torch.rand(4, 8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(2)]
    config = QuantConfig(search=SearchConfig(metric="fisher", protect_first_last=False))
    traces = []
    for make in (lambda: activation_based.LIFNode(tau=2.0, step_mode="m"),
                 lambda: clock_driven.MultiStepLIFNode(tau=2.0, backend="torch")):
        torch.manual_seed(0)
        model = _SpikingJellyNet(make)
        with torch.no_grad():
            model.fc2.weight.mul_(3)  # so that lif2 fires too
        analysis = hq_ptq.analyze(model, calib_data=data, config=config)
        assert analysis.dead == ()
        traces.append(analysis.traces)
        assert measure_activity(model, data).neurons == {"lif1": 16, "lif2": 16}  # membranes per sample
    assert traces[0] == pytest.approx(traces[1], rel=1e-6)
    with pytest.raises(ValueError, match="^1 is SpikingJelly's LIFNode; to_multistep converts snn.Leaky"):
        to_multistep(nn.Sequential(nn.Linear(6, 16), activation_based.LIFNode(tau=2.0)))


def test_spikingjelly_step_layers_are_quantized_and_keep_their_step_mode():
    """SpikingJelly's activation_based ``layer.Conv2d``/``layer.Linear`` subclass torch's to fold [T, N] into
    the batch in step mode 'm'. hq_ptq swapped exact torch types only, so a model written with SpikingJelly's
    layers (its own model zoo is) had no layer to quantize: "no Linear, Conv1d/Conv2d ... layer matches"."""
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron

    from hq_ptq.schemes import quantized_weight

    torch.manual_seed(0)
    model = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1), layer.BatchNorm2d(4), neuron.LIFNode(tau=2.0),
                          layer.Flatten(), layer.Linear(4 * 6 * 6, 3)).eval()
    functional.set_step_mode(model, "m")
    x = torch.poisson(torch.full((3, 2, 2, 6, 6), 1.0), generator=torch.Generator().manual_seed(1))
    float_model = copy.deepcopy(model)
    assert swap_layers(model, scheme="pot", bits=4) == ["0", "4"]
    assert [type(m).__name__ for m in quant_layers(model).values()] == ["StepQuantConv2d", "StepQuantLinear"]
    assert model[0].step_mode == model[4].step_mode == "m"
    with torch.no_grad():  # exactly SpikingJelly's forward with the quantized weights
        for i in (0, 4):
            float_model[i].weight.copy_(quantized_weight(model[i]))
        want = float_model(x)
        got = model(x)
    assert torch.equal(got, want)
    functional.reset_net(model)
    functional.set_step_mode(model, "s")  # reaches hq_ptq's layers as it reaches SpikingJelly's
    assert model[0].step_mode == model[4].step_mode == "s"
    with torch.no_grad():
        steps = torch.stack([model(x[t]) for t in range(len(x))])
    assert torch.equal(steps, got)
    functional.reset_net(model)
    functional.set_step_mode(model, "m")
    with pytest.raises(ValueError, match=r"\[T, N, C, \.\.\.\] \(5 dimensions\) in step_mode 'm'"):
        model(x[0])


def test_spikingjelly_activation_based_neurons_export_unrolled_and_a_failure_names_them(tmp_path):
    """In eval, SpikingJelly 0.0.0.0.14's activation_based LIF runs a TorchScript-scripted loop, which the
    exporter wrote as an ONNX Loop whose body reads the graph around it: constant folding then failed ("Unable
    to find input"). The export runs it step by step instead, so the file is unrolled and exact."""
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import neuron

    model = _SpikingJellyNet(lambda: neuron.LIFNode(tau=2.0, step_mode="m"))
    swap_layers(model, scheme="uniform", bits=8)
    x, fresh = 3 * torch.rand(4, 2, 6), 3 * torch.rand(4, 2, 6)
    for export in (hq_ptq.export_onnxruntime, hq_ptq.export_qonnx):
        path = export(model, x, tmp_path / f"{export.__name__}.onnx")
        assert "Loop" not in {n.op_type for n in onnx.load(path).graph.node}
        report = hq_ptq.verify_export(model, path, fresh)
        assert report["max_abs_output_error"] == 0.0
        assert report["spikes_not_compared"] == ["lif1", "lif2"]  # named, not silently skipped
    assert "multi_step_forward" not in vars(model.lif1)  # the neurons are SpikingJelly's own again
    with pytest.raises(ValueError, match="'lif1' is SpikingJelly's LIFNode; use mode='unrolled'"):
        hq_ptq.export_onnxruntime(model, x, tmp_path / "m.onnx", mode="step")

    class OddLIF(neuron.LIFNode):  # a neuron of the user's with an operator that has no ONNX form
        def multi_step_forward(self, x_seq):
            return super().multi_step_forward(torch.special.erfcx(x_seq))

    odd = _SpikingJellyNet(lambda: OddLIF(tau=2.0, step_mode="m"))
    swap_layers(odd, scheme="uniform", bits=8)
    with pytest.raises(ValueError, match=r"failed in a model with SpikingJelly neurons \(lif1, lif2\)"):
        hq_ptq.export_onnxruntime(odd, x, tmp_path / "odd.onnx")


def test_spikingjelly_models_export_with_every_neuron_and_count_their_steps(tmp_path):
    """ParametricLIFNode fires through its surrogate's autograd.Function even in eval: its export failed
    ("Couldn't export Python operator sigmoid"). A class that overrides only its single step keeps its own
    multi-step forward (what its eval computes), also inside a nested block. The energy report counted a
    layer's weight uses per sample as x.shape[0] / B: T / N for [T, N, ...] inputs, so it shrank with N."""
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron

    from hq_ptq.energy import measure_activity
    from hq_ptq.snn import spikingjelly_for_export

    model = _SpikingJellyNet(lambda: neuron.ParametricLIFNode(step_mode="m"))
    swap_layers(model, scheme="uniform", bits=8)
    x = 3 * torch.rand(4, 2, 6)
    path = hq_ptq.export_qonnx(model, x, tmp_path / "plif.onnx")
    assert hq_ptq.verify_export(model, path, 3 * torch.rand(4, 2, 6))["max_abs_output_error"] < 1e-6
    assert type(model.lif1.surrogate_function).__name__ == "Sigmoid"  # its own surrogate is back
    assert "multi_step_forward" not in vars(model.lif1)

    class TripledLIF(neuron.LIFNode):  # eval's scripted multi-step loop never calls this
        def single_step_forward(self, x):
            return super().single_step_forward(3 * x)

    odd = _SpikingJellyNet(lambda: TripledLIF(step_mode="m"))
    lif = _SpikingJellyNet(lambda: neuron.LIFNode(step_mode="m"))
    with spikingjelly_for_export(lif), spikingjelly_for_export(lif), spikingjelly_for_export(odd):
        assert "multi_step_forward" in vars(lif.lif1) and "multi_step_forward" not in vars(odd.lif1)
    assert "multi_step_forward" not in vars(lif.lif1)  # the nested block did not break the outer one

    net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1), neuron.LIFNode(), layer.Flatten(),
                        layer.Linear(4 * 6 * 6, 3), neuron.LIFNode())
    functional.set_step_mode(net, "m")
    for n in (1, 4):
        data = [(torch.rand(3, n, 2, 6, 6), torch.zeros(n, dtype=torch.long))]
        assert [a.steps for a in measure_activity(net, data).values()] == [3.0, 3.0]  # T, whatever N
    swap_layers(net, scheme="uniform", bits=8)
    with pytest.raises(ValueError, match="^0: StepQuantConv2d in SpikingJelly's step_mode 'm' has no"):
        hq_ptq.integerize(net, [(torch.poisson(torch.full((3, 2, 2, 6, 6), 1.0)), None)])


def test_reset_states_reaches_deep_copies():
    model = OwnLoopNet()
    clone = copy.deepcopy(model)  # not in snnTorch's class-level instance list
    a, b = _images(2)
    with torch.no_grad():
        clone(a[0])  # leaves membranes behind that utils.reset(self) inside forward cannot reach
        carried = clone(b[0])
        reset_states(clone)
        fresh = clone(b[0])
        want = model(b[0])
    assert not torch.allclose(carried, want)
    torch.testing.assert_close(fresh, want, rtol=0, atol=0)


def test_qat_starts_every_forward_from_reset_neurons():
    model = StatefulNet()
    teacher_calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    stale: list[float] = []

    def check_student(module, _inputs):
        stale.append(float(module.lif.mem.abs().sum()))

    real_copy = detached_copy

    def recording_copy(m):
        teacher = real_copy(m)
        teacher.register_forward_hook(lambda _m, i, o: teacher_calls.append((i[0], o.detach().clone())))
        recording_copy.teacher = teacher
        return teacher

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "detached_copy", recording_copy)
        model.register_forward_pre_hook(check_student)
        hq_ptq.quantize(model, 4.0, calib_data=_vectors(), train_data=_vectors(seed=1),
                        config=_config(steps=6))
    assert stale and max(stale) == 0.0  # every student forward found zero membranes
    teacher = recording_copy.teacher
    assert len(teacher_calls) == 6
    for inputs, outputs in list(teacher_calls):  # the teacher's answers are those of a fresh float model
        reset_states(teacher)
        with torch.no_grad():
            torch.testing.assert_close(teacher(inputs), outputs, rtol=0, atol=0)


def test_snntorch_sigmoid_surrogate_does_not_turn_the_analysis_into_nan():
    # snnTorch's sigmoid surrogate divides two overflowing exponentials 3.5 below threshold (slope 25)
    from snntorch import surrogate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), snn.Leaky(0.9, spike_grad=surrogate.sigmoid(), init_hidden=True),
                          nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    data = [(x * 20, y) for x, y in _vectors()]  # membranes far below threshold
    reset_states(model)
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()
    assert not torch.isfinite(model[0].weight.grad).all()  # the snnTorch bug, as it is
    original = model[1].spike_grad
    hq_ptq.quantize(model, 4.0, calib_data=data, train_data=data, config=_config(steps=2))
    plan = hq_ptq.get_plan(model)
    assert all(math.isfinite(t) and t > 0 for t in plan.meta["traces"].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model[1].spike_grad is original  # the user's surrogate is back


# ------------------------------------------------------------------------------------------ 2. dead layers


@pytest.mark.parametrize("metric", ["hessian", "fisher"])
def test_a_layer_that_never_fires_does_not_abort_the_run(metric):
    torch.manual_seed(0)
    model = OwnLoopNet(dead=True)
    config = QuantConfig(search=SearchConfig(metric=metric, calib_batches=2, hutchinson_probes=8))
    # `fc` sees only zero spikes; `hidden` gets a surrogate gradient of ~1e-13 through the silent neurons
    with pytest.warns(UserWarning, match=r"zero for layers \['hidden', 'fc'\]"):
        hq_ptq.quantize(model, 4.0, calib_data=_images(), config=config)
    plan = hq_ptq.get_plan(model)
    assert plan.meta["dead_layers"] == ["hidden", "fc"]
    traces = plan.meta["traces"]
    assert traces["hidden"] == traces["fc"] == min(traces["conv"], traces["skip"]) > 0  # the documented rule
    assert plan.avg_bits <= 4.0


# ------------------------------------------------------------------------------------------ 3. budgets


class HeavyHead(nn.Module):
    """The tutorial CSNN's shape of problem: the last Linear holds most of the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 16)
        self.head = nn.Linear(16, 64)
        self.lif = snn.Leaky(beta=0.9, init_hidden=True)

    def forward(self, x):
        return self.head(self.lif(self.fc3(self.fc2(self.fc1(x)))))


def test_protection_yields_when_it_alone_makes_the_budget_unreachable():
    model = HeavyHead()
    sizes = [m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)]
    assert model.head.weight.numel() / sum(sizes) > 0.4
    with pytest.warns(UserWarning, match=r"\['head'\] are searched like the other layers"):
        hq_ptq.quantize(model, 3.5, calib_data=_vectors())
    plan = hq_ptq.get_plan(model)
    assert plan.avg_bits <= 3.5
    assert plan.meta["released"] == ["head"] and plan.meta["protected"] == ["fc1"]
    assert (plan["fc1"].scheme, plan["fc1"].bits) == ("uniform", 8)


def test_a_budget_error_names_the_knobs_and_the_range():
    model = HeavyHead()
    config = QuantConfig(search=SearchConfig(protect=("head",)))  # asked for: never yields
    with pytest.raises(ValueError) as info:
        hq_ptq.quantize(model, 3.0, config=config)
    msg = str(info.value)
    assert "\n" not in msg
    for knob in ("search.bits", "search.schemes", "search.protect", "protect_first_last", "protect_bits"):
        assert knob in msg
    assert re.search(r"reach \[[0-9.]+, 8\] average bits", msg)


@pytest.mark.parametrize("search", [{"schemes": ("pot",)}, {"bits": (2, 3, 4)}])
def test_scheme_and_bit_restrictions_apply_to_searched_layers_only(search):
    model = OwnLoopNet()
    hq_ptq.quantize(model, 3.5, calib_data=_images(), config=QuantConfig(search=SearchConfig(**search)))
    plan = hq_ptq.get_plan(model)
    for c in plan.layers:
        if c.name in plan.meta["protected"]:
            assert (c.scheme, c.bits) == ("uniform", 8)
        elif "schemes" in search:
            assert c.scheme == "pot"
        else:
            assert c.bits in (2, 3, 4)
    assert plan.avg_bits <= 3.5


def _boom(*_a, **_k):
    raise RuntimeError("boom")


@pytest.mark.parametrize(
    "stage",
    ["budget", "data", "analyze", "search", "apply", "recalibrate", "qat", "interrupt"],
)
def test_a_failed_quantize_leaves_the_model_exactly_as_given(stage, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), snn.Leaky(0.9, init_hidden=True),
                          nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    model.train()
    before = _state(model)
    budget, data, error = 4.0, _vectors(), RuntimeError
    if stage == "budget":
        budget, error = 1.0, ValueError
    elif stage == "data":
        data, error = [(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))], ValueError
    elif stage == "analyze":
        monkeypatch.setattr(api, "sensitivity_table", _boom)
    elif stage == "search":
        monkeypatch.setattr(api, "allocate", _boom)
    elif stage == "apply":
        monkeypatch.setattr(state, "set_layer_quant", _boom)
    elif stage == "recalibrate":
        monkeypatch.setattr(api, "recalibrate_bn", _boom)
    elif stage == "qat":
        def nan_in_training(out, y):  # QAT trains in train mode; the analysis runs in eval mode
            return F.cross_entropy(out, y) * (math.nan if model.training else 1.0)
        error = FloatingPointError
    train = _vectors(seed=1)
    if stage == "interrupt":
        def interrupted(first=train[0]):
            yield first
            raise KeyboardInterrupt
        train, error = interrupted(), KeyboardInterrupt
    loss = nan_in_training if stage == "qat" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error):
            hq_ptq.quantize(model, budget, calib_data=data, train_data=train, loss_fn=loss,
                            config=_config(steps=4))
    _assert_untouched(model, before)
    # the user's float checkpoint still loads into it
    model.load_state_dict(before[1])


# ------------------------------------------------------------------------------------------ 4. outputs


class SpikeRecordNet(nn.Module):
    """The snnTorch tutorial's output: a [T, B, classes] spike record, trained with a count loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), snn.Leaky(0.9, init_hidden=True), nn.Linear(16, 16),
                                 snn.Leaky(0.9, init_hidden=True), nn.Linear(16, 4),
                                 snn.Leaky(0.9, init_hidden=True, output=True))

    def forward(self, x):
        utils.reset(self.net)
        return torch.stack([self.net(x * (t + 1) / T)[0] for t in range(T)])


def test_distillation_is_off_for_outputs_that_are_not_logits():
    loss = SF.mse_count_loss(correct_rate=0.8, incorrect_rate=0.2)
    model = SpikeRecordNet()
    with pytest.warns(UserWarning, match=r"distillation is off: the model returns \(3, 5, 4\)"):
        hq_ptq.quantize(model, 4.0, calib_data=_vectors(), train_data=_vectors(seed=1), loss_fn=loss,
                        config=_config(steps=3))
    model = SpikeRecordNet()
    with warnings.catch_warnings(record=True) as caught:  # with output_fn: distilled, no such warning
        warnings.simplefilter("always")
        hq_ptq.quantize(model, 4.0, calib_data=_vectors(), train_data=_vectors(seed=1), loss_fn=loss,
                        output_fn=lambda spk: spk.sum(0), config=_config(steps=3))
    assert not [w for w in caught if "distillation" in str(w.message)]


def test_evaluate_reads_scores_through_output_fn():
    from hq_ptq.train import evaluate

    model = SpikeRecordNet()
    with pytest.raises(ValueError, match="pass output_fn"):
        evaluate(model, _vectors())
    acc = evaluate(model, _vectors(), output_fn=lambda spk: spk.sum(0))
    assert 0.0 <= acc <= 1.0


# ------------------------------------------------------------------------------------------ 6. to_multistep


def test_to_multistep_refuses_a_model_with_its_own_time_loop():
    model = OwnLoopNet()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="lif1 is an snn.Leaky inside a module with its own forward"):
        to_multistep(model)
    with pytest.raises(ValueError, match="runs its own time loop"):
        to_multistep(model, example_input=torch.rand(T, 2, 1, 8, 8))
    assert list(model.state_dict()) == keys and isinstance(model.lif1, snn.Leaky)


def test_to_multistep_checks_a_custom_forward_on_the_probe():
    class Flipped(nn.Module):  # fine per step (flips the batch), wrong over [T, B, ...] (flips time)
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.lif = snn.Leaky(0.9, init_hidden=True)

        def forward(self, x):
            return self.lif(self.fc(x).flip(0))

    good = nn.Sequential(nn.Linear(4, 3), snn.Leaky(0.9, init_hidden=True))
    x = torch.rand(4, 2, 4) * 3
    wrapped = nn.Sequential(good)
    assert to_multistep(wrapped, example_input=x) is wrapped
    bad = Flipped()
    with pytest.raises(ValueError, match="outputs differ from the step-wise model's"):
        to_multistep(bad, example_input=x)
    assert isinstance(bad.lif, snn.Leaky)  # conversion undone


# ------------------------------------------------------------------------------------------ 7. smaller


def test_one_shot_generator_serves_analysis_and_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    batches = _vectors(4)
    hq_ptq.quantize(model, 4.0, calib_data=(b for b in batches), config=_config())
    assert model[1].num_batches_tracked.item() == 2  # re-estimated on the batches drawn once


def test_get_plan_of_a_hand_made_plan_is_valid_json():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    hq_ptq.apply_plan(model, Plan((LayerChoice("0", "pot", 4, 128), LayerChoice("2", "uniform", 3, 64))))
    model.__dict__.pop(SEARCH_ATTR)
    text = json.dumps(hq_ptq.get_plan(model).to_dict(), allow_nan=False)
    assert json.loads(text)["layers"][0]["sensitivity"] is None
    assert len(quant_layers(model)) == 2


# ------------------------------------------------------------------------------------------ review findings


def test_a_failed_requantize_keeps_the_first_plan_and_its_quantizers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    hq_ptq.quantize(model, 8.0, config=QuantConfig(search=SearchConfig(protect_first_last=False)))
    first = hq_ptq.get_plan(model)
    bits = {n: float(layer.quant_weight().bit_width) for n, layer in quant_layers(model).items()}
    x = _vectors(1)[0][0]
    with torch.no_grad():
        before = model(x)

    def interrupted(first_batch=_vectors(seed=1)[0]):
        yield first_batch
        raise KeyboardInterrupt

    config = QuantConfig(search=SearchConfig(schemes=("pot",), protect_first_last=False),
                         qat=QATConfig(steps=3))
    with warnings.catch_warnings(), pytest.raises(KeyboardInterrupt):
        warnings.simplefilter("ignore")
        hq_ptq.quantize(model, 3.0, train_data=interrupted(), config=config)
    assert hq_ptq.get_plan(model).layers == first.layers  # the record agrees with the quantizer again
    assert {n: float(layer.quant_weight().bit_width) for n, layer in quant_layers(model).items()} == bits
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_a_failed_quantize_restores_gradients():
    model = StatefulNet()
    x, y = _vectors(1)[0]
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    reset_states(model)
    with warnings.catch_warnings(), pytest.raises(FloatingPointError):
        warnings.simplefilter("ignore")
        hq_ptq.quantize(model, 4.0, calib_data=_vectors(), train_data=_vectors(seed=1),
                        loss_fn=lambda out, t: F.cross_entropy(out, t) * (math.nan if model.training else 1),
                        config=_config(steps=2))
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())


def test_apply_plan_checks_everything_before_changing_a_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    not_a_layer = Plan((LayerChoice("0", "uniform", 4, 16), LayerChoice("1", "uniform", 4, 4)))
    bad_bits = Plan((LayerChoice("0", "uniform", 4, 16), LayerChoice("2", "uniform", 99, 8)))
    odd = r"not Linear, Conv1d/Conv2d or ConvTranspose1d/2d \(groups=1 if transposed\): 1 \(BatchNorm1d"
    with pytest.raises(ValueError, match=odd):
        hq_ptq.apply_plan(model, not_a_layer)
    with pytest.raises(ValueError, match="does not support bits=99"):
        hq_ptq.apply_plan(model, bad_bits)
    assert [type(m) for m in model] == [nn.Linear, nn.BatchNorm1d, nn.Linear]


def test_no_distillation_on_2d_outputs_of_a_custom_loss_without_output_fn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    data = [(x, x.sum(1, keepdim=True)) for x, _ in _vectors()]  # a regression: [B, 1] is no logit
    with pytest.warns(UserWarning, match=r"with your own loss_fn, outputs \(5, 1\) need not be logits"):
        hq_ptq.quantize(model, 4.0, calib_data=data, train_data=data, loss_fn=F.mse_loss,
                        config=_config(steps=2))


def test_probe_count_and_calibration_draw():
    with pytest.raises(ValueError, match="hutchinson_probes must be >= 2, got 1"):
        SearchConfig(hutchinson_probes=1)
    drawn = []

    def counting():
        for batch in _vectors(12):
            drawn.append(batch)
            yield batch

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # no BatchNorm: no BN batches
    config = QuantConfig(search=SearchConfig(metric="fisher"))
    hq_ptq.quantize(model, 4.0, calib_data=counting(), config=config)
    assert len(drawn) == SearchConfig().calib_batches
