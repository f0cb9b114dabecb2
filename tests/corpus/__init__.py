"""A corpus of public spiking models written by other people, to check that hq_ptq works on models it has
never seen. Each model's code sits in its own module, copied verbatim from its repository (imports aside;
see the header of each file and README.md). This file is the glue: how to build each model at a tiny size,
synthetic batches it accepts, and its authors' loss.

Usage (the tests directory is on ``sys.path`` under pytest)::

    from corpus import CORPUS, by_name
    entry = by_name("snntorch-tutorial7-csnn")
    model = entry.build()
    (inputs, targets), *_ = entry.batches(4, 0)
    loss = entry.loss(model_io.call(model, inputs), targets)

Inputs follow hq_ptq's contract (hq_ptq/model_io.py): a tensor is passed as ``model(x)``, a tuple as
``model(*x)``, a dict as ``model(**x)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import snntorch.functional as SF
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BATCH_SIZE", "CORPUS", "CorpusModel", "ForwardPass", "by_name", "reset_neurons", "warm_batchnorm"]

BATCH_SIZE = 4

Batch = tuple[Any, torch.Tensor]


@dataclass(frozen=True)
class CorpusModel:
    name: str
    source: str  # "owner/repo@commit path"
    licence: str
    exercises: str  # one line: what pattern this model brings
    build: Callable[[], nn.Module]  # tiny, deterministic (seeds a private RNG state)
    batches: Callable[[int, int], list[Batch]]  # (n_batches, seed) -> [(inputs, targets)], batch size 4
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None  # None: cross-entropy on the outputs
    output_fn: Callable[[Any], torch.Tensor] | None = (
        None  # outputs -> [B, classes]; None: outputs as they are
    )
    classes: int | None = None  # None for a regression model
    # Conv/Linear layers (qualified names) that get no gradient from the loss by construction, e.g. defined
    # in __init__ but never called in forward.
    dead_layers: tuple[str, ...] = ()
    # neurons (qualified names) that may stay silent on the corpus data; every other neuron fires.
    silent_neurons: tuple[str, ...] = ()
    # neurons (snnTorch or SpikingJelly; qualified names) that forward never calls (defined in __init__ only).
    unused_neurons: tuple[str, ...] = ()
    # False: forward never resets its neurons; the caller must (reset_neurons: snntorch.utils.reset or
    # SpikingJelly's functional.reset_net, before or after every batch)
    resets_itself: bool = True
    notes: str = ""

    def loss(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is None:
            return F.cross_entropy(outputs, targets)
        return self.loss_fn(outputs, targets)


WARMUP_SEED = 10_000  # the batches that set BatchNorm running statistics in build(); tests use seeds 0, 1


def _call(model: nn.Module, inputs: Any) -> Any:
    """hq_ptq's calling convention (hq_ptq/model_io.call), repeated so the corpus needs no hq_ptq."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def reset_neurons(model: nn.Module) -> None:
    """What the authors' loops do after every batch: ``spikingjelly...functional.reset_net`` (each
    SpikingJelly ``MemoryModule``'s ``reset()``) and ``snntorch.utils.reset``. Models that reset their own
    neurons are unaffected."""
    from snntorch import utils

    for m in model.modules():
        if isinstance(vars(m).get("_memories"), dict) and callable(getattr(m, "reset", None)):
            m.reset()
    utils.reset(model)


@torch.no_grad()
def warm_batchnorm(model: nn.Module, batches: list[Batch]) -> nn.Module:
    """Set every BatchNorm's running statistics to their average over ``batches`` (train-mode forwards with
    ``momentum=None``), as any trained checkpoint has them. Freshly constructed running statistics (mean 0,
    var 1) make the BatchNorm models here silent in eval mode. Weights and the model's mode are unchanged."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    training, momenta = model.training, [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for inputs, _ in batches:
        _call(model, inputs)
        reset_neurons(model)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(training)
    return model


def _builder(
    make: Callable[[], nn.Module], batches: Callable[[int, int], list[Batch]], seed: int = 0
) -> Callable[[], nn.Module]:
    """``build()``: ``make()`` under ``torch.manual_seed(seed)``, then :func:`warm_batchnorm` on 4 batches,
    all without disturbing the caller's global RNG state."""

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = make()
            return warm_batchnorm(model, batches(4, WARMUP_SEED))

    build.__name__ = f"build_{getattr(make, '__name__', 'model')}"
    return build


def _make_batches(
    make_inputs: Callable[[torch.Generator], Any], classes: int | None
) -> Callable[[int, int], list[Batch]]:
    """``batches(n, seed)``: ``n`` batches of ``make_inputs(gen)`` with uniform class targets, from a private
    generator seeded with ``seed`` (inputs first, then targets, batch by batch)."""

    def batches(n: int, seed: int) -> list[Batch]:
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            inputs = make_inputs(gen)
            targets = torch.randint(0, classes, (BATCH_SIZE,), generator=gen)
            out.append((inputs, targets))
        return out

    return batches


def _events(gen: torch.Generator, shape: tuple[int, ...], rate: float) -> torch.Tensor:
    """Event-camera-like frames: per-pixel event counts, Poisson with mean ``rate``."""
    return torch.poisson(torch.full(shape, rate), generator=gen)


# ------------------------------------------------ 1. snnTorch tutorial 5 (FCN, explicit mem)


def _tutorial5() -> nn.Module:
    from . import snntorch_tutorial5 as m

    return m.Net()


def _tutorial5_loss(outputs, targets):
    # tutorial 5, section 7.4: cross-entropy on the membrane at every step, summed over the steps
    from . import snntorch_tutorial5 as m

    loss = nn.CrossEntropyLoss()
    spk_rec, mem_rec = outputs
    loss_val = torch.zeros((1), dtype=torch.float, device=mem_rec.device)
    for step in range(m.num_steps):
        loss_val += loss(mem_rec[step], targets)
    return loss_val


# ------------------------------------------------ 2. snnTorch tutorial 7 (CSNN)


class ForwardPass(nn.Module):
    """The only code the corpus adds to a model: holds tutorial 7's ``net`` and runs the tutorial's own
    ``forward_pass(net, data)`` loop, since hq_ptq calls ``model(inputs)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        from .snntorch_tutorial7 import forward_pass

        return forward_pass(self.net, data)


def _tutorial7() -> nn.Module:
    from .snntorch_tutorial7 import tutorial_net

    return ForwardPass(tutorial_net())


def _tutorial7_loss(outputs, targets):
    from .snntorch_tutorial7 import loss_fn  # SF.mse_count_loss(correct_rate=0.8, incorrect_rate=0.2)

    return loss_fn(outputs, targets)


# ------------------------------------------------ 3. NeuroBench NeHAR SCNN (Conv1d, [B, L, F])


def _nehar() -> nn.Module:
    from .neurobench_nehar import SCNN

    return SCNN()


def _spike_count_ce(outputs, targets):
    # NeHAR training.py: CrossEntropyLoss on the output spike count
    return F.cross_entropy(outputs.sum(0), targets)


# ------------------------------------------------ 4. snnTorch regression I ([T, B, 1] series)

REGRESSION_STEPS = 8


def _regression1() -> nn.Module:
    from .snntorch_regression1 import Net

    return Net(timesteps=REGRESSION_STEPS, hidden=16)


def _regression1_batches(n: int, seed: int) -> list[Batch]:
    """The tutorial's RegressionDataset, mode "sqrt", batched: feature = linspace(0, end, T) per sample,
    label = sqrt(feature * slope); both [T, B, 1] (time first: the tutorial swaps them before the model)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        end = torch.rand(BATCH_SIZE, generator=gen)
        slope = torch.rand(BATCH_SIZE, generator=gen)
        ramp = torch.linspace(0.0, 1.0, REGRESSION_STEPS).view(REGRESSION_STEPS, 1, 1)
        feature = ramp * end.view(1, BATCH_SIZE, 1)
        label = torch.sqrt(feature * slope.view(1, BATCH_SIZE, 1))
        out.append((feature, label))
    return out


# ------------------------------------------------ 5. snnTorch regression II (RLeaky)


def _regression2() -> nn.Module:
    from .snntorch_regression2 import Net

    return Net(timesteps=4, hidden=32, beta=0.9)


# ------------------------------------------------ 6. official Spikformer, CIFAR10-DVS


def _spikformer_dvs() -> nn.Module:
    from .spikformer_cifar10dvs import Spikformer

    # the authors' `spikformer()` factory, shrunk: embed_dims 256 -> 16, num_heads 16 -> 2, mlp_ratios 4 -> 2,
    # depths 2 -> 1. The SPS stem hard-codes 128x128 inputs (reshapes to 64/32/16): images stay 128x128.
    return Spikformer(
        patch_size=16, embed_dims=16, num_heads=2, mlp_ratios=2,
        in_channels=2, num_classes=10, qkv_bias=False,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), depths=1, sr_ratios=1,
    )  # fmt: skip


def _spikformer_dvs_spikingjelly() -> nn.Module:
    """The same official Spikformer built with the neuron its authors import, SpikingJelly's
    ``clock_driven.neuron.MultiStepLIFNode`` (SpikingJelly 0.0.0.0.14), instead of the shim. Their
    ``backend='cupy'`` needs CUDA, so it runs on SpikingJelly's 'torch' backend, the same equations."""
    from spikingjelly.clock_driven import neuron

    from . import spikformer_cifar10dvs as module

    def multistep_lif(**kwargs):
        return neuron.MultiStepLIFNode(**{**kwargs, "backend": "torch"})

    shim, module.MultiStepLIFNode = module.MultiStepLIFNode, multistep_lif
    try:
        return _spikformer_dvs()
    finally:
        module.MultiStepLIFNode = shim


# ------------------------------------------------ 7. official Spike-driven Transformer


def _sdt() -> nn.Module:
    from .sdt import sdt

    # the arguments train.py passes for conf/cifar10-dvs/2_256_200E_t10_TET.yml, shrunk: img 64 -> 32,
    # dim 256 -> 32, heads 8 -> 2, layer 2 -> 1, time_steps 10 -> 3 (T only matters for static images)
    return sdt(
        T=3, pretrained=False, drop_rate=0.0, drop_path_rate=0.0, num_heads=2, num_classes=10,
        pooling_stat="0011", img_size_h=32, img_size_w=32, embed_dims=32, mlp_ratios=4, in_channels=2,
        qkv_bias=False, depths=1, sr_ratios=1, spike_mode="lif", dvs_mode=True, TET=True,
    )  # fmt: skip


def _sdt_loss(outputs, targets):
    # train.py: output = model(input)[0]; loss = criterion.TET_loss(output, target, CrossEntropyLoss,
    # means=args.TET_means (1.0), lamb=args.TET_lamb (0.0))
    from .sdt import TET_loss

    return TET_loss(outputs[0], targets, nn.CrossEntropyLoss(), means=1.0, lamb=0.0)


# ------------------------------------------------ 8. snnTorch legacy tutorial 3 (Synaptic FCN)


def _tutorial3_synaptic() -> nn.Module:
    from .snntorch_tutorial3_synaptic import Net

    return Net()


def _tutorial3_synaptic_loss(outputs, targets):
    # legacy tutorial 3, section 5 "Training": LogSoftmax on the membrane record, NLLLoss at every step summed
    # over the steps (BPTT), into a [1] tensor
    from . import snntorch_tutorial3_synaptic as m

    log_softmax_fn = nn.LogSoftmax(dim=-1)
    loss_fn = nn.NLLLoss()
    spk_rec, mem_rec = outputs
    log_p_y = log_softmax_fn(mem_rec)
    loss_val = torch.zeros((1), dtype=torch.float, device=mem_rec.device)
    for step in range(m.num_steps):
        loss_val += loss_fn(log_p_y[step], targets)
    return loss_val


# ------------------------------------------------ 9. snnTorch spiking autoencoder (ConvTranspose2d decoder)


def _sae() -> nn.Module:
    from .snntorch_sae import SAE

    return SAE()


def _sae_batches(n: int, seed: int) -> list[Batch]:
    """Images in [0, 1] at the tutorial's 32x32 (MNIST resized, Normalize((0,), (1,))); the target of a
    reconstruction is the image itself."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.rand(BATCH_SIZE, 1, 32, 32, generator=gen)
        out.append((x, x.clone()))
    return out


# ------------------------------------------------ 10. snnTorch population coding (one step, caller resets)

POPULATION_CLASSES = 10


def _pop() -> nn.Module:
    from .snntorch_pop import net_pop

    return net_pop()


def _pop_loss(outputs, targets):
    # the tutorial's loss on the spikes of its num_steps = 1 steps, stacked as snntorch.backprop.BPTT does
    loss_fn = SF.mse_count_loss(correct_rate=1.0, incorrect_rate=0.0, population_code=True,
                                num_classes=POPULATION_CLASSES)
    spk, _ = outputs
    return loss_fn(spk.unsqueeze(0), targets)


def _pop_scores(outputs):
    # SF.accuracy_rate(population_code=True): each class counts the spikes of its contiguous block of neurons
    spk, _ = outputs
    return spk.view(len(spk), POPULATION_CLASSES, -1).sum(-1)


# ------------------------------------------------ 11. SpikingJelly's DVS Gesture net (activation_based)

GESTURE_CLASSES = 11
GESTURE_STEPS = 3


def _dvsgesture_spikingjelly() -> nn.Module:
    """SpikingJelly's ``activation_based.model.parametric_lif_net.DVSGestureNet``, imported from the installed
    SpikingJelly 0.0.0.0.14 and built as its example ``activation_based/examples/classify_dvsg.py`` builds it
    (``spiking_neuron=neuron.LIFNode, surrogate_function=surrogate.ATan(), detach_reset=True``, then
    ``functional.set_step_mode(net, 'm')``); ``-channels`` 128 -> 8, and ``v_threshold`` 1.0 -> 0.3 through
    the net's own ``**kwargs`` (which it hands to every neuron): untrained, its two fully connected LIFs never
    reach 1.0 (the last one's input peaks at 0.04), so the classifier would be silent and its last Linear get
    no gradient. Its layers are SpikingJelly's ``layer.Conv2d``/``layer.Linear`` (subclasses of torch's that
    fold [T, N] in multi-step mode)."""
    from spikingjelly.activation_based import functional, neuron, surrogate
    from spikingjelly.activation_based.model import parametric_lif_net

    net = parametric_lif_net.DVSGestureNet(channels=8, spiking_neuron=neuron.LIFNode,
                                           surrogate_function=surrogate.ATan(), detach_reset=True,
                                           v_threshold=0.3)
    functional.set_step_mode(net, "m")
    return net


def _firing_rate_mse(outputs, targets):
    # classify_dvsg.py: out_fr = net(frame).mean(0); loss = F.mse_loss(out_fr, label_onehot), with
    # label_onehot = F.one_hot(label, 11).float()
    return F.mse_loss(outputs.mean(0), F.one_hot(targets, GESTURE_CLASSES).float())


# ------------------------------------------------ 12. Microsoft SeqSNN's Spikformer (time-series forecasting)

SERIES_VARIABLES, SERIES_WINDOW, SERIES_HORIZON = 4, 16, 3


def _seqsnn_spikformer() -> nn.Module:
    """SeqSNN's ``Spikformer`` network under its ``TS`` runner's regression head, configured as the authors'
    ``exp/forecast/spikformer/spikformer_electricity.yml`` (``pe_type: neuron``, ``pe_mode: add``,
    ``num_pe_neuron: 40``, ``neuron_pe_scale: 10000``, ``num_steps: 4``, ``depths: 2``, ``task: regression``,
    ``aggregate: True``) shrunk: dim 256 -> 16, d_ff 1024 -> 32, heads 8 -> 2, depths 2 -> 1, 321 electricity
    variables -> 4 (``input_size`` and the head's ``out_size``), window 168 -> 16; and ``common_thr`` 1.0 ->
    0.02 (a constructor argument): the authors initialise every Linear with std 0.02, and ``init_lif``, behind
    the input Linear with no BatchNorm, never reaches 1.0 untrained, which silences everything after it."""
    from .seqsnn_spikformer import TS, Spikformer

    net = Spikformer(dim=16, d_ff=32, depths=1, num_steps=4, heads=2, pe_type="neuron", pe_mode="add",
                     num_pe_neuron=40, neuron_pe_scale=10000.0, input_size=SERIES_VARIABLES, common_thr=0.02)
    return TS(net, task="regression", out_size=SERIES_VARIABLES, aggregate=True)


def _series_batches(n: int, seed: int) -> list[Batch]:
    """Multivariate series in [0, 1] as SeqSNN's ``TSMSDataset`` serves them: a ``[B, window, variables]``
    window and, as the target, every variable ``horizon`` steps after the window ends (``[B, variables]``).
    Each variable is a noisy sinusoid with its own period (4-16 steps), phase and level."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.arange(SERIES_WINDOW + SERIES_HORIZON, dtype=torch.float32).view(1, -1, 1)
    shape = (BATCH_SIZE, 1, SERIES_VARIABLES)
    out = []
    for _ in range(n):
        period = 4 + 12 * torch.rand(shape, generator=gen)
        phase = 2 * torch.pi * torch.rand(shape, generator=gen)
        level = 0.3 + 0.4 * torch.rand(shape, generator=gen)
        noise = 0.05 * torch.randn(BATCH_SIZE, len(steps[0]), SERIES_VARIABLES, generator=gen)
        series = (level + 0.25 * torch.sin(2 * torch.pi * steps / period + phase) + noise).clamp(0, 1)
        out.append((series[:, :SERIES_WINDOW], series[:, SERIES_WINDOW + SERIES_HORIZON - 1]))
    return out


def _single_mse(outputs, targets):
    # SeqSNN's runner (runner/base.py): loss = self.loss_fn(label.squeeze(-1), pred.squeeze(-1)), with
    # loss_fn "mse" = common/function.py's single_mse (the mean squared error over the non-NaN labels)
    y_true, y_pred = targets.squeeze(-1), outputs.squeeze(-1)
    mask = ~torch.isnan(y_true)
    return ((torch.masked_select(y_true, mask) - torch.masked_select(y_pred, mask)) ** 2).mean()


# ------------------------------------------------ the registry

_SNNTORCH = "jeshraghian/snntorch@634fc22385ec5581998e62787bbe39b53662140f"

_mnist_flat = _make_batches(lambda g: torch.rand(BATCH_SIZE, 28 * 28, generator=g), 10)
_fmnist_images = _make_batches(lambda g: torch.rand(BATCH_SIZE, 1, 28, 28, generator=g), 10)
_nmnist_frames = _make_batches(lambda g: _events(g, (4, BATCH_SIZE, 2, 34, 34), 1.0), 10)
_wisdm_windows = _make_batches(lambda g: torch.randn(BATCH_SIZE, 40, 6, generator=g), 7)
_dvs128_frames = _make_batches(lambda g: _events(g, (BATCH_SIZE, 3, 2, 128, 128), 0.3), 10)
_dvs32_frames = _make_batches(lambda g: _events(g, (BATCH_SIZE, 3, 2, 32, 32), 0.3), 10)
# classify_dvsg.py transposes its [N, T, C, H, W] frames to [T, N, C, H, W] before the net
_gesture_frames = _make_batches(
    lambda g: _events(g, (GESTURE_STEPS, BATCH_SIZE, 2, 128, 128), 0.3), GESTURE_CLASSES
)

CORPUS: tuple[CorpusModel, ...] = (
    CorpusModel(
        name="snntorch-tutorial5-fcn",
        source=f"{_SNNTORCH} docs/tutorials/tutorial_5.rst",
        licence="MIT",
        exercises="explicit membranes (init_hidden=False, mem = lif.init_leaky(), spk, mem = lif(cur, "
        "mem)), own T loop on a static [B,784] input, (spk_rec, mem_rec) tuple output, per-step loss",
        build=_builder(_tutorial5, _mnist_flat),
        batches=_mnist_flat,
        loss_fn=_tutorial5_loss,
        output_fn=lambda out: out[0].sum(0),
        classes=10,
        notes="module-level sizes shrunk: num_hidden 1000 -> 32, num_steps 25 -> 4; the loss is a [1] "
        "tensor, as in the tutorial",
    ),
    CorpusModel(
        name="snntorch-tutorial7-csnn",
        source=f"{_SNNTORCH} docs/tutorials/tutorial_7.rst",
        licence="MIT",
        exercises="nn.Sequential CSNN (Conv2d/MaxPool2d/Leaky init_hidden, Leaky output=True) driven by "
        "the tutorial's forward_pass loop over [T,B,2,34,34] event frames with utils.reset; [T,B,10] "
        "spike record, SF.mse_count_loss",
        build=_builder(_tutorial7, _nmnist_frames),
        batches=_nmnist_frames,
        loss_fn=_tutorial7_loss,
        output_fn=lambda out: out.sum(0),
        classes=10,
        silent_neurons=("net.8",),
        notes="wrapped in ForwardPass (the only added code); 34x34 is fixed by Linear(32*5*5, 10). At "
        "init the output Leaky (net.8) is silent: Linear(800, 10) on ~2% spikes with beta=0.5 never "
        "reaches threshold; mse_count_loss still trains it through the surrogate gradient",
    ),
    CorpusModel(
        name="neurobench-nehar-scnn",
        source="NeuroBench/neurobench@e521c28f5798cb40bb9423758bf066dad53fe070 examples/nehar/SCNN.py",
        licence="BSD-3-Clause (examples/nehar/LICENSE.rst; the repository is Apache-2.0)",
        exercises="1-D sequence [B,L=40,F=6] (accelerometer/gyro), own loop over L (input[:, step, :]), "
        "Conv1d + MaxPool1d + Flatten, init_hidden + utils.reset(self), tiny thresholds, [T,B,7] spikes",
        build=_builder(_nehar, _wisdm_windows),
        batches=_wisdm_windows,
        loss_fn=_spike_count_ce,
        output_fn=lambda out: out.sum(0),
        classes=7,
        notes="no constructor arguments: 40 steps and 57.6k parameters are the authors' fixed size",
    ),
    CorpusModel(
        name="snntorch-regression1-series",
        source=f"{_SNNTORCH} docs/tutorials/tutorial_regression_1.rst",
        licence="MIT",
        exercises="time series [T,B,1] -> [T,B,1] membrane-trace regression (MSE, float targets, no "
        "classes); per-neuron tensor thresholds, learnable per-neuron beta, reset_mechanism='none' output",
        build=_builder(_regression1, _regression1_batches),
        batches=_regression1_batches,
        loss_fn=nn.MSELoss(),
        classes=None,
        silent_neurons=("li_out",),
        notes="li_out is a leaky integrator (reset_mechanism='none') whose spikes the tutorial ignores; "
        "the output is its membrane",
    ),
    CorpusModel(
        name="snntorch-regression2-rleaky",
        source=f"{_SNNTORCH} docs/tutorials/tutorial_regression_2.rst",
        licence="MIT",
        exercises="snn.RLeaky(linear_features=...): an nn.Linear recurrent layer inside the neuron; own T "
        "loop on a static [B,784] input, explicit spk/mem state, [T,B,10] spike record, mse_count_loss",
        build=_builder(_regression2, _mnist_flat),
        batches=_mnist_flat,
        loss_fn=SF.mse_count_loss(correct_rate=0.8, incorrect_rate=0.2),
        output_fn=lambda out: out.sum(0),
        classes=10,
    ),
    CorpusModel(
        name="spikformer-cifar10dvs-official",
        source="ZK-Zhou/spikformer@621268981827af47aa666c1b5f774de4281d90ad cifar10dvs/model.py",
        licence="MIT",
        exercises="official Spikformer on MultiStepLIFNode (shim on snn.Leaky): [B,T,2,128,128] event "
        "frames permuted to time-first inside, Conv1d q/k/v/MLP on [T*B,C,N], SPS conv stem",
        build=_builder(_spikformer_dvs, _dvs128_frames),
        batches=_dvs128_frames,
        classes=10,
        unused_neurons=("block.0.attn.res_lif.lif",),
        notes="res_lif, attn_drop, pos_embed, norm and Block.norm1/norm2 are defined but unused by forward",
    ),
    CorpusModel(
        name="spikformer-cifar10dvs-spikingjelly",
        source="ZK-Zhou/spikformer@621268981827af47aa666c1b5f774de4281d90ad cifar10dvs/model.py",
        licence="MIT",
        exercises="the official Spikformer on SpikingJelly's own MultiStepLIFNode (0.0.0.0.14, 'torch' "
        "backend): neurons that are not snnTorch's, whose membranes live in SpikingJelly's _memories and "
        "carry from call to call until the caller's functional.reset_net",
        build=_builder(_spikformer_dvs_spikingjelly, _dvs128_frames),
        batches=_dvs128_frames,
        classes=10,
        resets_itself=False,
        unused_neurons=("block.0.attn.res_lif",),
        notes="the authors' training loop calls functional.reset_net(model) after every batch; the model "
        "never resets itself",
    ),
    CorpusModel(
        name="sdt-cifar10dvs-tet-official",
        source="BICLab/Spike-Driven-Transformer@3faa82272eb499e4d56ea77707d4536e7c69a54b "
        "model/spikeformer.py module/ms_conv.py module/sps.py criterion.py",
        licence="Apache-2.0",
        exercises="official Spike-driven Transformer (MultiStepLIFNode shim): [B,T,2,32,32] frames, "
        "dvs_mode (MaxPool3d 'Erode'), membrane shortcuts, SDSA k*v, a talking-heads Conv1d forward never "
        "calls, (output, hook) tuple output, TET per-step [T,B,10] logits and TET_loss",
        build=_builder(_sdt, _dvs32_frames),
        batches=_dvs32_frames,
        loss_fn=_sdt_loss,
        output_fn=lambda out: out[0].mean(0),
        classes=10,
        dead_layers=("block.0.attn.talking_heads",),
        unused_neurons=("block.0.attn.attn_lif.lif", "patch_embed.rpe_lif.lif"),
        notes="talking_heads (Conv1d), attn_lif and MS_SPS.rpe_lif are defined but unused by forward",
    ),
    CorpusModel(
        name="snntorch-tutorial3-synaptic",
        source=f"{_SNNTORCH} docs/tutorials/legacy/tutorial_3_old.rst",
        licence="MIT",
        exercises="snn.Synaptic neurons (second order: synaptic current and membrane, two explicit state "
        "variables, spk, syn, mem = lif(cur, syn, mem) after syn, mem = lif.init_synaptic()), own T loop "
        "on a static [B,784] input, (spk_rec, mem_rec) tuple output, LogSoftmax + NLLLoss summed over steps",
        build=_builder(_tutorial3_synaptic, _mnist_flat),
        batches=_mnist_flat,
        loss_fn=_tutorial3_synaptic_loss,
        output_fn=lambda out: out[0].sum(0),
        classes=10,
        notes="module-level sizes shrunk: num_hidden 1000 -> 32, num_steps 25 -> 6 (a Synaptic neuron "
        "needs a few steps to charge its current: at 4 steps the output layer barely fires); the loss is "
        "a [1] tensor, as in the tutorial",
    ),
    CorpusModel(
        name="snntorch-sae",
        source=f"{_SNNTORCH} docs/tutorials/tutorial_sae.rst",
        licence="MIT",
        exercises="spiking autoencoder: ConvTranspose2d decoder (output channels in the weight's 2nd dim), "
        "Leaky(output=True) returning (spk, mem) through nn.Sequential, two time loops of its own (encode "
        "all steps, then decode), utils.reset inside forward, the last membrane as a [B,1,32,32] image, MSE",
        build=_builder(_sae, _sae_batches),
        batches=_sae_batches,
        loss_fn=F.mse_loss,
        classes=None,
        silent_neurons=("decoder.9",),
        notes="module-level num_steps shrunk 5 -> 3 and thresh 1 -> 0.5 (at 1 the untrained latent Leaky "
        "never fires, so the decoder gets no input); channel widths are fixed by the tutorial (319k "
        "parameters). decoder.9 (threshold 20000) never fires by design: its membrane is the output",
    ),
    CorpusModel(
        name="snntorch-pop-coding",
        source=f"{_SNNTORCH} docs/tutorials/tutorial_pop.rst",
        licence="MIT",
        exercises="population coding: 500 output neurons for 10 classes (scores = spike counts of contiguous "
        "blocks of 50), ONE time step with no time loop, init_hidden neurons the caller resets (the model "
        "never does), (spk, mem) of nn.Sequential, SF.mse_count_loss(population_code=True)",
        build=_builder(_pop, _fmnist_images),
        batches=_fmnist_images,
        loss_fn=_pop_loss,
        output_fn=_pop_scores,
        classes=POPULATION_CLASSES,
        resets_itself=False,
        silent_neurons=("4",),
        notes="module-level num_hidden shrunk 128 -> 32; pop_outputs (500) and num_steps (1) are the "
        "tutorial's. At init the output Leaky (4) is silent: one step of Linear(32, 500) on the hidden "
        "spikes never reaches threshold; the loss still trains it through the fast-sigmoid surrogate",
    ),
    CorpusModel(
        name="spikingjelly-dvsgesture-net",
        source="spikingjelly==0.0.0.0.14 (PyPI) spikingjelly/activation_based/model/parametric_lif_net.py, "
        "built as spikingjelly/activation_based/examples/classify_dvsg.py builds it",
        licence="Apache-2.0 (SpikingJelly's licence; imported from the installed package, not copied)",
        exercises="SpikingJelly's activation_based API: its own layer.Conv2d/layer.Linear (torch subclasses "
        "that fold [T, N] into the batch in step_mode 'm'), layer.BatchNorm2d/MaxPool2d/Flatten, a "
        "MemoryModule Dropout, LIFNode(step_mode='m'), a VotingLayer over 110 outputs for 11 classes, "
        "[T,N,2,128,128] frames, MSE of the firing rate against one-hot labels; the caller resets",
        build=_builder(_dvsgesture_spikingjelly, _gesture_frames),
        batches=_gesture_frames,
        loss_fn=_firing_rate_mse,
        output_fn=lambda out: out.mean(0),
        classes=GESTURE_CLASSES,
        resets_itself=False,
        notes="channels 128 -> 8 (the example's -channels argument), v_threshold 1.0 -> 0.3 (the net's "
        "**kwargs; untrained, its classifier LIFs never reach 1.0), T = 3; 128x128 is fixed by "
        "Linear(channels * 4 * 4, 512) after five 2x2 max-pools. The example calls "
        "functional.reset_net(net) after every batch",
    ),
    CorpusModel(
        name="seqsnn-spikformer-forecast",
        source="microsoft/SeqSNN@903abb481c9b3865f55aa5f4219e7bca50bb2751 SeqSNN/network/snn/spikformer.py, "
        "SeqSNN/module/spike_attention.py, SeqSNN/module/encoding/spikingjelly/encoder.py, "
        "SeqSNN/module/positional_encoding.py, SeqSNN/runner/timeseries.py",
        licence="MIT",
        exercises="time-series FORECASTING: [B,L,C] windows, the time steps made by a Conv2d's output "
        "channels (1 -> T), plain nn.Linear on [T*B, L, D] token sequences with BatchNorm1d on the "
        "transposed tokens, SpikingJelly activation_based LIFNode(step_mode='m'), a binary positional code "
        "buffer added to the input, spike residuals (integer counts into the next layers), "
        "functional.reset_net(self) inside forward, (seq, emb) tuple into the runner's Linear head, MSE",
        build=_builder(_seqsnn_spikformer, _series_batches),
        batches=_series_batches,
        loss_fn=_single_mse,
        classes=None,
        notes="the authors' electricity configuration shrunk through the constructor: dim 256 -> 16, d_ff "
        "1024 -> 32, heads 8 -> 2, depths 2 -> 1, 321 variables -> 4, window 168 -> 16, horizon 3, "
        "common_thr 1.0 -> 0.02 (untrained, the input LIF behind the std-0.02 Linear never reaches 1.0 and "
        "everything after it is silent); NeuronPE prints its buffer's shape when built",
    ),
)


def by_name(name: str) -> CorpusModel:
    for entry in CORPUS:
        if entry.name == name:
            return entry
    raise KeyError(f"no corpus model {name!r}; known: {', '.join(e.name for e in CORPUS)}")
