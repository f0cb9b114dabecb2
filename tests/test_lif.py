"""The fused multi-step LIF against snn.Leaky; backend switch; to_multistep/to_stepwise; quantizer calls."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import snntorch as snn
import torch
from conftest import step_leaky
from snntorch import surrogate, utils
from torch import nn

import hq_ptq
from hq_ptq.lif import (
    RESET_NONE,
    RESET_SUBTRACT,
    RESET_ZERO,
    FusedLIF,
    _DecayScan,
    _SurrogateVJP,
    fused_lif,
    heaviside_surrogate,
)
from hq_ptq.models import build_model
from hq_ptq.snn import (
    BACKEND_ENV,
    MultiStepLeaky,
    TimeFolded,
    explicit_membranes,
    get_lif_backend,
    lif_backend,
    set_lif_backend,
    surrogate_disabled,
    to_multistep,
    to_stepwise,
)
from hq_ptq.swap import quant_layers

MODES = {"zero": RESET_ZERO, "subtract": RESET_SUBTRACT, "none": RESET_NONE}
SURROGATES = {"atan": surrogate.atan, "fast_sigmoid": surrogate.fast_sigmoid}


def _currents(
    shape: tuple[int, ...] = (8, 3, 17), seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 1.5).to(dtype)


def _leaky(reset: str, spike_grad: object, learn: bool = True) -> snn.Leaky:
    return snn.Leaky(
        beta=0.7,
        threshold=0.8,
        reset_mechanism=reset,
        spike_grad=spike_grad,
        learn_beta=learn,
        learn_threshold=learn,
    )


@pytest.mark.parametrize("name", list(SURROGATES))
@pytest.mark.parametrize("reset", list(MODES))
def test_fused_equals_snn_leaky_forward_and_backward(reset: str, name: str) -> None:
    spike_grad = SURROGATES[name](**({"alpha": 3.0} if name == "atan" else {"slope": 10.0}))
    lif = _leaky(reset, spike_grad)
    x = _currents().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref_spk, ref_mem = step_leaky(lif, x_ref)

    beta = lif.beta.detach().clone().requires_grad_()
    thr = lif.threshold.detach().clone().requires_grad_()
    spk, mem = fused_lif(x, beta=beta, threshold=thr, mode=MODES[reset], spike_fn=spike_grad)
    assert 0.1 < ref_spk.mean() < 0.5  # a comparison with no or all spikes would prove nothing
    assert torch.equal(spk, ref_spk) and spk.dtype == ref_spk.dtype
    torch.testing.assert_close(mem, ref_mem, rtol=0, atol=1e-6)

    # gradients through spikes and membranes at once, to x, beta and threshold
    w_spk, w_mem = _currents(seed=1), _currents(seed=2)
    ((ref_spk * w_spk).sum() + (ref_mem * w_mem).sum()).backward()
    ((spk * w_spk).sum() + (mem * w_mem).sum()).backward()
    assert x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    # beta/threshold gradients are sums over all T * 51 neurons: float32 summation order alone moves them
    # by a few 1e-6 relative
    for got, want in ((beta.grad, lif.beta.grad), (thr.grad, lif.threshold.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reset", list(MODES))
def test_fused_double_backward_equals_snn_leaky(reset: str) -> None:
    # Hutchinson's Hessian-vector product through a Linear -> LIF -> readout net, as sensitivity.py does
    torch.manual_seed(0)
    x = _currents((6, 4, 5), seed=3)
    weight = (torch.randn(7, 5) * 0.8).requires_grad_()
    readout = torch.randn(3, 7)
    spike_grad = surrogate.atan()
    lif = _leaky(reset, spike_grad)
    params = [weight, lif.beta, lif.threshold]
    vs = [torch.randn_like(p) for p in params]

    def hvp(fused: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cur = x @ weight.T
        if fused:
            spk, mem = fused_lif(
                cur, beta=lif.beta, threshold=lif.threshold, mode=MODES[reset], spike_fn=spike_grad
            )
        else:
            spk, mem = step_leaky(lif, cur)
        loss = ((spk @ readout.T).sum(0) ** 2).sum() + (mem**2).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return [g.detach() for g in grads], list(torch.autograd.grad(grads, params, vs))

    ref_g, ref_hv = hvp(False)
    got_g, got_hv = hvp(True)
    assert ref_hv[0].abs().sum() > 0  # the surrogate has curvature: the HVP is not trivially zero
    for got, want in zip(got_g + got_hv, ref_g + ref_hv, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max().clamp_min(1)))


def test_gradcheck_smooth_spike_function() -> None:
    # A smooth spike function makes every output differentiable, so finite differences check the
    # hand-written backward (and its own backward) for all five tensor inputs. With a reset the
    # detached reset is not what finite differences see, so this uses "none"; the resets are
    # checked through the membrane trace below and against snn.Leaky above.
    def smooth(u: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(3 * u)

    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(4, 2, 3, generator=g, dtype=torch.float64),
        torch.randn(2, 3, generator=g, dtype=torch.float64),
        torch.rand(3, generator=g, dtype=torch.float64),
        torch.tensor(0.6, dtype=torch.float64),
        torch.tensor(1.3, dtype=torch.float64),
    )
    inputs = tuple(t.requires_grad_() for t in inputs)

    def f(*a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return FusedLIF.apply(*a, RESET_NONE, smooth, False)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("reset", list(MODES))
def test_gradcheck_membrane_trace_with_resets(reset: str) -> None:
    g = torch.Generator().manual_seed(1)
    inputs = (
        torch.randn(5, 2, 3, generator=g, dtype=torch.float64) * 1.5,
        torch.zeros(2, 3, dtype=torch.float64),
        torch.rand(2, 3, generator=g, dtype=torch.float64),  # per-neuron beta
        torch.tensor(0.6, dtype=torch.float64),
        torch.tensor(1.0, dtype=torch.float64),
    )
    inputs = tuple(t.requires_grad_() for t in inputs)
    spikes = FusedLIF.apply(*inputs, MODES[reset], surrogate.atan(), True)[0]
    assert spikes.sum() > 0  # resets happen, so the trace's gradient depends on them

    def membranes(*a: torch.Tensor) -> torch.Tensor:
        return FusedLIF.apply(*a, MODES[reset], surrogate.atan(), True)[1]

    assert torch.autograd.gradcheck(membranes, inputs)
    assert torch.autograd.gradgradcheck(membranes, inputs)


@pytest.mark.parametrize("shared", [False, True], ids=["per-step-links", "shared-link"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_decay_scan_is_the_recurrence_and_twice_differentiable(reverse: bool, shared: bool) -> None:
    # the linear recurrence the create_graph backward is built on (Hutchinson differentiates it again)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, 2, 3, generator=g, dtype=torch.float64).requires_grad_()
    links = torch.rand(1 if shared else 4, 1, 3, generator=g, dtype=torch.float64).requires_grad_()
    y = _DecayScan.apply(a, links, reverse)
    want, carry = [None] * 5, None
    for t in (range(4, -1, -1) if reverse else range(5)):
        if carry is None:
            carry = a[t]
        else:  # links[t] joins steps t and t + 1
            carry = a[t] + (links[0] if shared else links[t if reverse else t - 1]) * carry
        want[t] = carry
    torch.testing.assert_close(y, torch.stack(want), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, c: _DecayScan.apply(a, c, reverse), (a, links))
    assert torch.autograd.gradgradcheck(lambda a, c: _DecayScan.apply(a, c, reverse), (a, links))


@pytest.mark.parametrize("name", list(SURROGATES))
def test_surrogate_vjp_second_derivative_is_the_surrogates_own(name: str) -> None:
    # the written-out S'' of the create_graph backward, against finite differences and autograd
    spike_fn = SURROGATES[name](**({"alpha": 3.0} if name == "atan" else {"slope": 10.0}))
    g = torch.Generator().manual_seed(4)
    mems = (torch.randn(4, 2, 3, generator=g, dtype=torch.float64) + 0.05).requires_grad_()
    thr = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 3, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, t, v: _SurrogateVJP.apply(m, t, v, spike_fn), (mems, thr, w))
    u = (mems - thr).detach().requires_grad_()
    (want,) = torch.autograd.grad(spike_fn(u), u, w, create_graph=True)  # snnTorch's S'(u) * w
    torch.testing.assert_close(_SurrogateVJP.apply(mems, thr, w, spike_fn), want)


def test_surrogates_with_a_heaviside_forward_are_recognised() -> None:
    for factory in (surrogate.atan, surrogate.fast_sigmoid, surrogate.sigmoid, surrogate.triangular):
        assert heaviside_surrogate(factory())
    assert not heaviside_surrogate(surrogate.SSO())  # random backward: per-step draws differ
    assert not heaviside_surrogate(lambda u: (u > 0).float())
    assert not heaviside_surrogate(snn.Leaky(0.5).__class__._surrogate_bypass)


@pytest.mark.parametrize(
    "factory", [surrogate.triangular, surrogate.straight_through_estimator, surrogate.SFS]
)
def test_fused_other_surrogates_go_through_their_own_backward(factory: object) -> None:
    spike_grad = factory()
    lif = _leaky("zero", spike_grad, learn=False)
    x = _currents(seed=4).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref_spk, _ = step_leaky(lif, x_ref)
    spk, _ = fused_lif(x, beta=lif.beta, threshold=lif.threshold, mode=RESET_ZERO, spike_fn=spike_grad)
    assert torch.equal(spk, ref_spk)
    w = _currents(seed=5)
    (ref_spk * w).sum().backward()
    (spk * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reset", list(MODES))
def test_backends_agree_in_multistep_leaky(reset: str) -> None:
    x = _currents((6, 2, 4, 9), seed=6)
    outputs = {}
    for backend in ("fused", "unrolled", "snntorch"):
        layer = MultiStepLeaky(0.6, 0.7, reset_mechanism=reset, return_mem=True, backend=backend)
        assert layer.resolved_backend() == backend
        xg = x.clone().requires_grad_()
        spk, mem = layer(xg)
        (spk * x).sum().backward()
        outputs[backend] = (spk, mem, xg.grad)
    ref = outputs["snntorch"]
    for backend in ("fused", "unrolled"):
        spk, mem, grad = outputs[backend]
        assert torch.equal(spk, ref[0])
        torch.testing.assert_close(mem, ref[1], rtol=0, atol=1e-6)
        torch.testing.assert_close(grad, ref[2], rtol=1e-6, atol=1e-6)


def test_fused_learnable_beta_and_threshold_get_gradients() -> None:
    x = _currents(seed=7)
    grads = {}
    for backend in ("fused", "snntorch"):
        torch.manual_seed(0)
        layer = MultiStepLeaky(0.6, 0.7, learn_beta=True, learn_threshold=True, backend=backend)
        (layer(x) * x).sum().backward()
        grads[backend] = (layer.lif.beta.grad, layer.lif.threshold.grad)
    for got, want in zip(grads["fused"], grads["snntorch"], strict=True):
        assert want.abs() > 0
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_fused_bfloat16_matches_snntorch_dtypes() -> None:
    x = _currents(seed=8, dtype=torch.bfloat16)
    out = {b: MultiStepLeaky(0.5, 1.0, return_mem=True, backend=b)(x) for b in ("fused", "snntorch")}
    assert torch.equal(out["fused"][0], out["snntorch"][0])
    assert out["fused"][1].dtype == out["snntorch"][1].dtype  # snnTorch's float32 reset promotes bf16
    torch.testing.assert_close(out["fused"][1], out["snntorch"][1], rtol=0, atol=1e-6)


def test_fused_continues_across_explicit_membranes() -> None:
    x = _currents((5, 2, 6), seed=9)
    net = nn.Sequential(MultiStepLeaky(0.5, 0.6, backend="fused"))
    whole = net(x)
    with explicit_membranes(net) as layers:
        layer = layers[0][1]
        steps = []
        for t in range(x.shape[0]):
            steps.append(net(x[t : t + 1]))
            layer.initial_mem = layer.final_mem
    assert torch.equal(torch.cat(steps), whole)


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = MultiStepLeaky()
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert get_lif_backend() == "fused" and layer.resolved_backend() == "fused"
    monkeypatch.setenv(BACKEND_ENV, "snntorch")
    assert layer.resolved_backend() == "snntorch"
    with lif_backend("unrolled"):
        assert layer.resolved_backend() == "unrolled"
        assert MultiStepLeaky(backend="fused").resolved_backend() == "fused"  # the layer's own wins
    assert get_lif_backend() == "snntorch"
    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="HQ_PTQ_LIF='fast'.*fused"):
        get_lif_backend()
    with pytest.raises(ValueError, match="backend='unroled'.*Did you mean 'unrolled'"):
        MultiStepLeaky(backend="unroled")
    set_lif_backend("unrolled")
    try:
        assert get_lif_backend() == "unrolled"
    finally:
        set_lif_backend(None)
    # surrogates the fused kernel does not know run the plain loop; general neurons call snnTorch
    monkeypatch.delenv(BACKEND_ENV)
    assert MultiStepLeaky(spike_grad=lambda u: (u > 0).float()).resolved_backend() == "unrolled"
    general = MultiStepLeaky()
    general.lif.reset_delay = False
    assert general.resolved_backend() == "snntorch"


def test_tracing_uses_the_plain_loop() -> None:
    # as export does: Heaviside spikes, so any autograd.Function left in the graph would be ours
    layer = MultiStepLeaky(0.5, 0.5, backend="fused")
    x = _currents((3, 2, 4), seed=10)
    with surrogate_disabled(layer), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # int(reset code): a constant, rightly
        traced = torch.jit.trace(layer, (x,))
    kinds = [node.kind() for node in traced.graph.nodes()]
    assert "prim::PythonOp" not in kinds
    assert kinds.count("aten::gt") == x.shape[0] + 1  # the initial pending reset, then one per step
    assert torch.equal(traced(x), layer(x))


def test_zoo_uses_the_fused_kernel_and_backends_agree() -> None:
    torch.manual_seed(0)
    model = build_model("spikformer-tiny", num_classes=4, embed_dim=16, num_heads=2, depth=1, img_size=16)
    x = torch.rand(3, 2, 2, 16, 16).round()
    calls, rates = [], []

    def record(layer: MultiStepLeaky, _inp: object, spikes: torch.Tensor) -> None:
        calls.append(layer.resolved_backend())
        rates.append(float(spikes.detach().mean()))

    lifs = [m for m in model.modules() if isinstance(m, MultiStepLeaky)]
    hooks = [m.register_forward_hook(record) for m in lifs]
    out = {}
    for backend in ("fused", "snntorch"):
        with lif_backend(backend):
            model.zero_grad()
            logits = model(x)
            logits.square().sum().backward()
            out[backend] = (
                logits.detach(),
                [p.grad.clone() for p in model.parameters() if p.grad is not None],
            )
    for h in hooks:
        h.remove()
    assert set(calls) == {"fused", "snntorch"}
    assert sum(r > 0 for r in rates) > len(rates) // 2  # train-mode BN: most layers spike
    torch.testing.assert_close(out["fused"][0], out["snntorch"][0], rtol=1e-5, atol=1e-6)
    for got, want in zip(out["fused"][1], out["snntorch"][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- to_multistep


def _user_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        snn.Leaky(beta=0.8, threshold=0.5, init_hidden=True),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Flatten(), nn.Linear(6 * 4 * 4, 5)),
        snn.Leaky(beta=0.9, init_hidden=True, output=True, reset_mechanism="subtract", learn_beta=True),
    )
    return net.eval()


def _per_step(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    utils.reset(net)
    outs = [net(x[t]) for t in range(x.shape[0])]
    return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])


@pytest.mark.parametrize("backend", ["fused", "snntorch"])
def test_to_multistep_reproduces_the_per_step_model_and_round_trips(backend: str) -> None:
    net = _user_net()
    x = torch.rand(6, 3, 2, 8, 8).round()
    ref_spk, ref_mem = _per_step(net, x)
    assert ref_spk.sum() > 0
    children, keys = list(net), list(net.state_dict())

    assert to_multistep(net, backend=backend) is net
    assert isinstance(net[0], TimeFolded) and isinstance(net[4], TimeFolded)
    assert isinstance(net[2], MultiStepLeaky) and net[2].lif is children[2]
    spk, mem = net(x)  # one call over [T, B, ...]
    assert torch.equal(spk, ref_spk)
    torch.testing.assert_close(mem, ref_mem, rtol=0, atol=1e-6)
    assert torch.equal(net(x)[0], spk)  # no state carried between calls

    assert to_stepwise(net) is net
    assert all(a is b for a, b in zip(net, children, strict=True)) and list(net.state_dict()) == keys
    spk2, mem2 = _per_step(net, x)
    assert torch.equal(spk2, ref_spk) and torch.equal(mem2, ref_mem)


def test_to_multistep_bare_leaky_and_errors() -> None:
    leaky = snn.Leaky(beta=0.5, init_hidden=True)
    layer = to_multistep(leaky)
    assert isinstance(layer, MultiStepLeaky) and layer.lif is leaky
    assert to_stepwise(layer) is leaky
    with pytest.raises(ValueError, match="no snn.Leaky"):
        to_multistep(nn.Sequential(nn.Linear(2, 2)))
    mixed = nn.Sequential(snn.Leaky(0.5, init_hidden=True), snn.Synaptic(0.5, 0.5, init_hidden=True))
    with pytest.raises(ValueError, match=r"1 is an snn.Synaptic"):
        to_multistep(mixed)
    assert isinstance(mixed[0], snn.Leaky)  # checked before anything was swapped
    with pytest.raises(ValueError, match="init_hidden=False"):
        to_multistep(nn.Sequential(snn.Leaky(beta=0.5)))


# ------------------------------------------------------------------------ quantized weights per step


def test_quantized_weights_are_computed_once_per_forward() -> None:
    # Conv/Linear run once on the time-folded [T*B, ...] tensor, so every Brevitas weight quantizer
    # runs once per forward whatever T is (not once per time step).
    torch.manual_seed(0)
    model = build_model("spikformer-tiny", num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the data-free metric warning
        hq_ptq.quantize(model, budget=4)
    layers = quant_layers(model)
    assert len(layers) == 18
    counts = dict.fromkeys(layers, 0)

    def counter(name: str):  # noqa: ANN202
        return lambda *_: counts.__setitem__(name, counts[name] + 1)

    hooks = [layer.weight_quant.register_forward_hook(counter(name)) for name, layer in layers.items()]
    try:
        x = torch.rand(8, 2, 2, 32, 32).round()  # T = 8
        model.train()
        model(x).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    assert set(counts.values()) == {1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_on_cuda_equals_cpu() -> None:
    x = _currents((8, 4, 33), seed=11)
    results = {}
    for device in ("cpu", "cuda"):
        lif = _leaky("zero", surrogate.atan()).to(device)
        xd = x.to(device).requires_grad_()
        spk, mem = fused_lif(xd, beta=lif.beta, threshold=lif.threshold, spike_fn=lif.spike_grad)
        grads = torch.autograd.grad((spk * xd).sum() + mem.sum(), [xd, lif.beta], create_graph=True)
        hv = torch.autograd.grad(grads[0].square().sum(), xd)[0]
        results[device] = [t.detach().cpu() for t in (spk, mem, *grads, hv)]
    assert torch.equal(results["cpu"][0], results["cuda"][0])
    for got, want in zip(results["cuda"][1:], results["cpu"][1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _gpu_step_module():  # noqa: ANN202 - benchmarks/ is not a package
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"
    spec = importlib.util.spec_from_file_location("gpu_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_step_benchmark_logic_on_cpu_tiny_shapes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gpu_step = _gpu_step_module()
    rows = gpu_step.run(
        "spikformer-tiny",
        steps=2,
        batch=2,
        img=16,
        backends=("fused", "snntorch"),
        parts=("fp32", "qat_fp32", "hvp"),
        repeats=1,
        device="cpu",
    )
    assert [(r["backend"], r["part"]) for r in rows] == [
        (b, p) for p in ("fp32", "qat_fp32", "hvp") for b in ("fused", "snntorch")
    ]
    assert all("error" not in r and r["ms"] > 0 for r in rows), rows
    if not torch.cuda.is_available():  # the real run skips cleanly
        monkeypatch.setattr("sys.argv", ["gpu_step.py"])
        assert gpu_step.main() == 0
        assert "no CUDA device" in capsys.readouterr().out
