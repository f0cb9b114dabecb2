"""snnTorch adapters: a multi-step LIF layer, per-instance state reset, neuron discovery, surrogate switch,
and a converter between per-step snnTorch models and multi-step ones.

State rule of the whole project: neuron state lives per call (``MultiStepLeaky``) or per instance
(``reset_states``). Nothing here reads or writes snnTorch's class-level ``SpikingNeuron.instances``
list, which spans every network ever built in the process (snnTorch issues #438/#449).
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import snntorch as snn
import torch
from snntorch._neurons.neurons import SpikingNeuron
from torch import nn

from hq_ptq.errors import first_line
from hq_ptq.lif import FusedLIF, heaviside_surrogate

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "detached_copy",
    "eval_mode",
    "BACKEND_ENV",
    "MultiStepLeaky",
    "TimeFolded",
    "explicit_membranes",
    "get_lif_backend",
    "is_spiking_neuron",
    "is_spikingjelly_neuron",
    "is_spikingjelly_stateful",
    "lif_backend",
    "reset_states",
    "set_lif_backend",
    "spiking_neurons",
    "spikingjelly_for_export",
    "stable_surrogates",
    "surrogate_disabled",
    "train_spikingjelly_neurons",
    "to_multistep",
    "to_stepwise",
]

_RESET_SUBTRACT, _RESET_ZERO, _RESET_NONE = 0, 1, 2  # snnTorch's SpikingNeuron.reset_dict codes

# How MultiStepLeaky runs its time loop. All three give the same spikes and (within float rounding)
# the same membranes and gradients; they differ in speed and memory:
#   "fused":    hq_ptq.lif.FusedLIF, one autograd node for all T steps, saves only the membrane trace;
#   "unrolled": a plain Python loop of the same arithmetic, ~10 autograd nodes per step;
#   "snntorch": snn.Leaky called once per step (the reference; also the general path).
BACKENDS = ("fused", "unrolled", "snntorch")
BACKEND_ENV = "HQ_PTQ_LIF"
_default_backend: str | None = None  # set_lif_backend(); None defers to $HQ_PTQ_LIF, then "fused"


def _check_backend(name: str, where: str) -> str:
    if name not in BACKENDS:
        close = difflib.get_close_matches(str(name), BACKENDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{where}{name!r} is not a LIF backend.{hint} Choose from: {', '.join(BACKENDS)}")
    return name


def get_lif_backend() -> str:
    """The backend a ``MultiStepLeaky(backend=None)`` uses now.

    :func:`set_lif_backend` wins, then the environment variable ``HQ_PTQ_LIF``
    (``snntorch``, ``unrolled`` or ``fused``), then ``"fused"``. The variable is read at every call, so
    ``HQ_PTQ_LIF=snntorch hq-ptq run ...`` times a whole recipe with snnTorch's own loop.

    Raises:
        ValueError: ``HQ_PTQ_LIF`` names no backend.
    """
    if _default_backend is not None:
        return _default_backend
    env = os.environ.get(BACKEND_ENV, "").strip()
    return _check_backend(env, f"{BACKEND_ENV}=") if env else "fused"


def set_lif_backend(name: str | None) -> None:
    """Make ``name`` the process-wide default backend (``None`` goes back to ``$HQ_PTQ_LIF``/"fused")."""
    global _default_backend
    _default_backend = None if name is None else _check_backend(name, "backend=")


@contextmanager
def lif_backend(name: str | None) -> Iterator[str]:
    """Within the block, layers without their own ``backend`` run ``name``; restored on exit.

    Example:
        >>> with lif_backend("snntorch"):
        ...     reference = model(x)
    """
    global _default_backend
    saved = _default_backend
    set_lif_backend(name)
    try:
        yield get_lif_backend()
    finally:
        _default_backend = saved


def _tracing() -> bool:
    # exporters and compilers must see the plain loop: an autograd.Function with a Python loop and a
    # nested autograd.grad in backward neither traces to ONNX nor compiles
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


class MultiStepLeaky(nn.Module):
    """One ``snntorch.Leaky`` applied over a time-first tensor ``[T, ...]`` in a single call.

    The membrane is a local variable of ``forward``: every call starts from zero, so no state survives
    between batches and two models never share state. Conv/BN layers around it run once on the
    time-folded ``[T*B, ...]`` tensor; only this layer loops over T.

    The snnTorch neuron stays reachable as ``.lif`` so converters (export, quantization) can find it,
    and its ``beta``, ``threshold``, ``graded_spikes_factor`` and ``spike_grad`` are read at call time,
    so ``surrogate_disabled`` and learnable beta/threshold act on this layer too.

    The time loop runs on one of :data:`BACKENDS` (see :func:`get_lif_backend`): ``"fused"`` (default)
    is one autograd node for the whole loop (:class:`hq_ptq.lif.FusedLIF`), ``"unrolled"`` the same
    arithmetic as a Python loop, ``"snntorch"`` calls the neuron per step. Spikes are identical on all
    three. ``"fused"`` quietly runs ``"unrolled"`` while tracing, exporting to ONNX or compiling, and
    for surrogates it does not know (custom or stochastic ones); gradients reach learnable beta and
    threshold on every backend. Neurons the unrolled arithmetic does not cover (``state_quant``,
    ``inhibition``, ``reset_delay=False``, Leaky subclasses) always run ``"snntorch"``.

    Step-wise execution (export, streaming runtimes) uses two plain attributes, both off by default:
    ``initial_mem`` (a ``[B, ...]`` tensor the next call starts from instead of zeros) and
    ``record_final_mem`` (the call stores its last membrane in ``final_mem``). Set them only through
    :func:`explicit_membranes`, which clears them again, so no state outlives the block.

    Args:
        beta: membrane decay per step; 0.5 is spikingjelly's ``tau=2``.
        threshold: firing threshold.
        reset_mechanism: snnTorch reset, ``"zero"`` (default), ``"subtract"`` or ``"none"``.
        spike_grad: snnTorch surrogate; ``None`` gives snnTorch's default ``atan``.
        return_mem: also return the membrane trace (pre-reset, as ``snntorch.Leaky`` returns it).
        learn_beta: make ``beta`` a parameter.
        learn_threshold: make ``threshold`` a parameter.
        backend: ``"fused"``, ``"unrolled"`` or ``"snntorch"``; ``None`` follows :func:`get_lif_backend`.
    """

    def __init__(
        self,
        beta: float = 0.5,
        threshold: float = 1.0,
        *,
        # The published models use spikingjelly's MultiStepLIFNode(v_reset=0, detach_reset=True): after a
        # spike the membrane goes back to 0 and the reset carries no gradient. snnTorch's "zero" is that
        # exact rule: it multiplies the membrane by (1 - spike) with the spike detached (mem_reset()),
        # applied at the start of the next step, which gives the same trajectory. One difference is
        # left on purpose: spikingjelly charges v += (x - v) / tau (input scaled by 1/tau) while snnTorch
        # charges v = beta * v + x, so the threshold is effectively tau times lower here; every LIF in
        # the zoo sits behind a BatchNorm whose affine absorbs that scale when training.
        reset_mechanism: str = "zero",
        spike_grad: Callable[[torch.Tensor], torch.Tensor] | None = None,
        return_mem: bool = False,
        learn_beta: bool = False,
        learn_threshold: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if reset_mechanism not in ("zero", "subtract", "none"):
            raise ValueError(f"reset_mechanism={reset_mechanism!r} is not one of 'zero', 'subtract', 'none'")
        neuron = snn.Leaky(
            beta=beta,
            threshold=threshold,
            spike_grad=spike_grad,
            init_hidden=False,
            reset_mechanism=reset_mechanism,
            learn_beta=learn_beta,
            learn_threshold=learn_threshold,
        )
        self._setup(neuron, return_mem, backend)

    def _setup(self, neuron: snn.Leaky, return_mem: bool, backend: str | None) -> None:
        self.backend = None if backend is None else _check_backend(backend, "backend=")
        self.lif = neuron
        self.return_mem = return_mem
        self.initial_mem: torch.Tensor | None = None
        self.record_final_mem = False
        self.final_mem: torch.Tensor | None = None

    @classmethod
    def from_leaky(cls, leaky: snn.Leaky, *, backend: str | None = None) -> MultiStepLeaky:
        """Wrap an existing ``snn.Leaky`` (the same object, so its parameters are shared, not copied).

        ``return_mem`` follows the neuron's ``output`` flag, so a Leaky that returned ``(spk, mem)``
        per step returns ``(spikes, membranes)`` over T. Used by :func:`to_multistep`.
        """
        if not isinstance(leaky, snn.Leaky):
            raise ValueError(f"from_leaky wraps an snn.Leaky, got {type(leaky).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(leaky, bool(getattr(leaky, "output", False)), backend)
        return layer

    def extra_repr(self) -> str:
        def fmt(t: torch.Tensor) -> str:
            return f"{t.item():g}" if t.numel() == 1 else f"<{tuple(t.shape)}>"

        return (
            f"beta={fmt(self.lif.beta)}, threshold={fmt(self.lif.threshold)}, "
            f"reset={self.lif.reset_mechanism}, return_mem={self.return_mem}"
            + (f", backend={self.backend}" if self.backend else "")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Spikes ``[T, ...]`` for input currents ``x`` of shape ``[T, ...]`` (plus the membrane trace)."""
        if x.dim() < 2:
            raise ValueError(
                f"MultiStepLeaky expects a time-first tensor [T, ...] with >= 2 dims, got {tuple(x.shape)}"
            )
        backend = self.resolved_backend()
        if backend == "fused":
            spk, mem = self._fused(x)
        elif backend == "unrolled":
            spk, mem = self._unrolled(x)
        else:
            spk, mem = self._stepped(x)
        return (spk, mem) if self.return_mem else spk

    def resolved_backend(self) -> str:
        """The backend the next call runs, after the fallbacks described in the class docstring."""
        backend = self.backend or get_lif_backend()
        if backend == "snntorch" or not self._fast_path_ok():
            return "snntorch"
        if backend == "fused" and (_tracing() or not heaviside_surrogate(self.lif.spike_grad)):
            return "unrolled"
        return backend

    def _start_mem(self, x: torch.Tensor) -> torch.Tensor:
        if self.initial_mem is None:
            return torch.zeros_like(x[0])
        if self.initial_mem.shape != x.shape[1:]:
            raise ValueError(
                f"initial_mem has shape {tuple(self.initial_mem.shape)} but one time step of the input is "
                f"{tuple(x.shape[1:])}; give a membrane of the input's per-step shape"
            )
        return self.initial_mem

    def _fast_path_ok(self) -> bool:
        lif = self.lif
        return type(lif) is snn.Leaky and not lif.state_quant and not lif.inhibition and lif.reset_delay

    def _reset_mode(self) -> int:
        """snnTorch's reset code (its ``reset_mechanism_val`` buffer, the value its forward reads), read once
        per change: reading an accelerator buffer on every forward would synchronise the device each time.
        The cache key is the buffer and its version counter, which every in-place write (``load_state_dict``,
        snnTorch's ``reset_mechanism`` setter) bumps."""
        val = self.lif.reset_mechanism_val
        key = (id(val), val._version)
        if getattr(self, "_reset_key", None) != key:
            self._reset_key, self._reset_code = key, int(val)
        return self._reset_code

    def _fused(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        lif = self.lif
        spk, mem = FusedLIF.apply(
            x,
            self._start_mem(x),
            lif.beta.clamp(0, 1),
            lif.threshold,
            lif.graded_spikes_factor,
            self._reset_mode(),
            lif.spike_grad,
            True,
        )
        if self.record_final_mem:
            self.final_mem = mem[-1]
        return spk, (mem if self.return_mem else None)

    def _unrolled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Same arithmetic, in the same order, as snntorch.Leaky.forward (bit-identical, tested), minus
        # its per-step bookkeeping: the detached reset is the previous step's spike instead of a second
        # surrogate call. About 20% off a spikformer-tiny fwd+bwd on CPU.
        lif = self.lif
        spike_fn = lif.spike_grad
        beta = lif.beta.clamp(0, 1)
        thr = lif.threshold
        gain = lif.graded_spikes_factor
        mode = self._reset_mode()
        mem = self._start_mem(x)
        # the pending reset of a carried-in membrane is its own spike, so (mem) alone is the full state
        reset = spike_fn(mem - thr).detach()
        spikes, mems = [], []
        # unbind, not x[t]: each x[t] backward would write a zero-filled [T, ...] gradient (O(T^2) traffic)
        for x_t in x.unbind(0):
            if mode == _RESET_ZERO:
                mem = (1 - reset) * mem
                mem = beta * mem + x_t
            elif mode == _RESET_SUBTRACT:
                mem = beta * mem + x_t - reset * thr
            else:
                mem = beta * mem + x_t
            s = spike_fn(mem - thr)
            reset = s.detach()
            spikes.append(s * gain)
            if self.return_mem:
                mems.append(mem)
        if self.record_final_mem:
            self.final_mem = mem
        spk = torch.stack(spikes)
        return spk, (torch.stack(mems) if self.return_mem else None)

    def _stepped(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # General path (state_quant, inhibition, reset_delay=False, Leaky subclasses): call the neuron.
        mem = self._start_mem(x)  # explicit zeros: with mem=None snnTorch would reuse lif.mem
        spikes, mems = [], []
        if self.lif.init_hidden:  # a converted per-step neuron (to_multistep) keeps its state inside
            self.lif.mem = mem
        for x_t in x.unbind(0):
            if self.lif.init_hidden:
                out = self.lif(x_t)
                s, mem = out if isinstance(out, tuple) else (out, self.lif.mem)
            else:
                s, mem = self.lif(x_t, mem)
            spikes.append(s)
            mems.append(mem)
        if self.record_final_mem:
            self.final_mem = mem
        # Leaky.forward stores the last membrane (with its autograd graph) in the `mem` buffer; drop it
        # so nothing carries over and deepcopy/state handling never meet a non-leaf tensor.
        self.lif.mem = torch.zeros(0, device=x.device)
        return torch.stack(spikes), torch.stack(mems)


@contextmanager
def explicit_membranes(model: nn.Module) -> Iterator[list[tuple[str, MultiStepLeaky]]]:
    """Within the block every ``MultiStepLeaky`` of ``model`` exposes its membrane state.

    Yields the layers as ``(qualified name, layer)`` in ``named_modules`` order. Each call of a layer
    starts from ``layer.initial_mem`` when it is set (zeros otherwise) and stores its last membrane
    (pre-reset, as snnTorch returns it) in ``layer.final_mem``. Feeding ``final_mem`` back as
    ``initial_mem`` continues the time loop exactly: for the same input currents, T calls of one step
    give bit-identical spikes and membranes to one call over T (the pending reset is recomputed from
    the membrane). On exit all three attributes are reset, even after an exception.

    Example:
        >>> with explicit_membranes(model) as layers:
        ...     model(x[:1]); mems = [layer.final_mem for _, layer in layers]
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MultiStepLeaky)]
    try:
        for _, layer in layers:
            layer.record_final_mem = True
        yield layers
    finally:
        for _, layer in layers:
            layer.initial_mem = None
            layer.record_final_mem = False
            layer.final_mem = None


def is_spiking_neuron(module: nn.Module) -> bool:
    """True for snnTorch neurons (every ``SpikingNeuron`` plus ``LeakyParallel``)."""
    return isinstance(module, (SpikingNeuron, snn.LeakyParallel))


def spiking_neurons(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All snnTorch neurons of ``model`` as ``(qualified name, module)``, in ``named_modules`` order."""
    return [(name, m) for name, m in model.named_modules() if is_spiking_neuron(m)]


def _memories(module: nn.Module) -> dict | None:
    """A SpikingJelly stateful module's state (its neurons' ``v``, ...): the ``_memories`` dict that its
    ``reset()`` restores, or None for any other module. Duck-typed, so SpikingJelly need not be installed."""
    own = vars(module)
    memories = own.get("_memories")
    # _memories_rv (the reset values) too, so a user's module that merely has a _memories dict and a reset()
    # of its own (e.g. re-initialising weights) is never called
    spikingjelly = isinstance(memories, dict) and isinstance(own.get("_memories_rv"), dict)
    return memories if spikingjelly and callable(getattr(module, "reset", None)) else None


def is_spikingjelly_stateful(module: nn.Module) -> bool:
    """A SpikingJelly stateful module (``MemoryModule``: its neurons, ...), which hq_ptq resets, counts in
    the energy report's neuron memory (the neurons), and whose dynamics the integer path and
    ``to_multistep`` refuse."""
    return _memories(module) is not None


def is_spikingjelly_neuron(module: nn.Module) -> bool:
    """A SpikingJelly neuron (a stateful module with a firing threshold, e.g. ``LIFNode``,
    ``MultiStepLIFNode``), as opposed to its other stateful modules (``layer.Dropout``'s mask)."""
    return is_spikingjelly_stateful(module) and hasattr(module, "v_threshold")


def train_spikingjelly_neurons(model: nn.Module) -> None:
    """Put the SpikingJelly neurons of ``model`` in train mode and leave every other module's mode alone
    (the caller restores them), for the sensitivity analysis. In eval, SpikingJelly 0.0.0.0.14's
    ``activation_based`` LIF/IF fire through a TorchScript-scripted loop with a plain step, so no gradient
    reaches the layers before them; their train forward computes the same spikes through the surrogate."""
    for m in model.modules():
        if is_spikingjelly_stateful(m) and hasattr(m, "surrogate_function"):
            m.train()


class _Heaviside(nn.Module):
    """SpikingJelly's spike, ``x >= 0``, without its surrogate's ``autograd.Function`` (no ONNX form)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x >= 0).to(x)


@contextmanager
def spikingjelly_for_export(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, SpikingJelly's neurons compute their spikes as the ONNX exporter can follow them,
    with the same values; restored on exit, even after an exception:

    * their ``surrogate_function`` is a plain Heaviside step (its ``autograd.Function`` has no ONNX form:
      ``ParametricLIFNode`` fires through it even in eval);
    * an ``activation_based`` neuron whose class defines both its multi-step and single-step forward (LIF,
      IF) runs the first as a Python loop over the second (``neuron.BaseNode.multi_step_forward``). In eval
      it runs a TorchScript-scripted loop of the same equations instead, which the exporter writes as an ONNX
      ``Loop`` that qonnx cannot run. A class that overrides only the single step (e.g. ``LIAFNode``) keeps
      its own multi-step forward, since that is what its eval computes.
    """
    neuron = sys.modules.get("spikingjelly.activation_based.neuron")
    swapped: list[tuple[nn.Module, nn.Module]] = []
    patched: list[nn.Module] = []

    def defines(cls: type, name: str) -> type:
        return next(c for c in cls.__mro__ if name in vars(c))

    try:
        for m in model.modules():
            if not is_spikingjelly_neuron(m):
                continue
            surrogate = m._modules.get("surrogate_function")
            if surrogate is not None and not isinstance(surrogate, _Heaviside):
                swapped.append((m, surrogate))
                m.surrogate_function = _Heaviside()
            if neuron is None or not isinstance(m, neuron.BaseNode) or "multi_step_forward" in vars(m):
                continue  # not activation_based, or patched already (a nested block) or by its user
            owner = defines(type(m), "multi_step_forward")
            if owner is not neuron.BaseNode and owner is defines(type(m), "single_step_forward"):
                m.multi_step_forward = types.MethodType(neuron.BaseNode.multi_step_forward, m)
                patched.append(m)
        yield model
    finally:
        for m in patched:
            vars(m).pop("multi_step_forward", None)
        for m, surrogate in swapped:
            m.surrogate_function = surrogate


def _graph_tensors(model: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """Tensors held by ``model``'s modules (buffers, plain attributes, e.g. snnTorch's ``Leaky.reset``, and
    SpikingJelly's memories) that still carry an autograd graph: state left behind by the last forward."""
    for module in model.modules():
        held = [*module._buffers.items(), *vars(module).items(), *(_memories(module) or {}).items()]
        for key, value in held:
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                yield module, key, value


def _graph_tensors_in_sequences(model: nn.Module) -> Iterator[tuple[nn.Module, str, list | tuple]]:
    """Plain list/tuple attributes (and SpikingJelly memories) holding tensors with an autograd graph, e.g.
    a neuron's recorded state sequence."""
    for module in model.modules():
        for key, value in [*vars(module).items(), *(_memories(module) or {}).items()]:
            if isinstance(value, (list, tuple)) and any(
                isinstance(v, torch.Tensor) and v.grad_fn is not None for v in value
            ):
                yield module, key, value


def _detached(seq: list | tuple) -> list | tuple:
    return type(seq)(v.detach() if isinstance(v, torch.Tensor) else v for v in seq)


def reset_states(model: nn.Module) -> int:
    """Zero and detach the hidden state of every snnTorch (or SpikingJelly) neuron inside ``model``.

    The one state rule of hq_ptq: every forward it runs (calibration, sensitivity, BatchNorm
    re-estimation, QAT student and teacher, evaluation, export) starts from here. It reaches every
    neuron found through ``model.modules()``, whether built with ``init_hidden=True`` or driven with
    explicit membranes, registered in snnTorch's class-level ``instances`` list or not (a deep copy is
    not: ``snntorch.utils.reset`` misses it). Each neuron's own ``reset_mem()`` replaces its state
    (``mem``, ``syn``, ``spk``, ...) with fresh zeros; any other tensor a module still holds with an
    autograd graph (e.g. ``Leaky.reset``, or a membrane an ``init_hidden=False`` forward left in the
    ``mem`` buffer) is detached, so the previous batch's graph is freed and the model can be deep-copied.
    A SpikingJelly stateful module (``MemoryModule``: its neurons, e.g. ``LIFNode``) is reset with its own
    ``reset()``, as ``spikingjelly...functional.reset_net`` does, which a SpikingJelly training loop calls
    after every batch and hq_ptq's loops would otherwise not.

    Args:
        model: any module tree; other networks are never touched.

    Returns:
        The number of neurons reset.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, SpikingNeuron) and callable(getattr(module, "reset_mem", None)):
            module.reset_mem()
            count += 1
        elif callable(getattr(module, "reset_integer_state", None)):  # hq_ptq.integer's per-step LIF
            module.reset_integer_state()
            count += 1
        elif _memories(module) is not None:  # SpikingJelly: v (and any other memory) back to its reset value
            module.reset()
            count += 1
    with torch.no_grad():
        for module, key, value in _graph_tensors(model):
            setattr(module, key, value.detach())
        for module, key, seq in _graph_tensors_in_sequences(model):
            setattr(module, key, _detached(seq))
    return count


def detached_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every neuron's state reset, safe right after a training step.

    ``copy.deepcopy`` refuses a tensor that carries an autograd graph ("Only Tensors created explicitly by
    the user support the deepcopy protocol"), which an snnTorch neuron holds after a forward with grad.
    Those tensors are copied detached, and the copy's neurons are reset (:func:`reset_states`); the
    original model is not changed at all.
    """
    memo = {id(t): t.detach().clone() for _, _, t in _graph_tensors(model)}
    for _, _, seq in _graph_tensors_in_sequences(model):
        memo.update({id(t): t.detach().clone() for t in seq if isinstance(t, torch.Tensor)})
    clone = copy.deepcopy(model, memo)
    reset_states(clone)
    return clone


@contextmanager
def surrogate_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every snnTorch neuron in ``model`` fires with a plain Heaviside step.

    snnTorch reads ``surrogate_disable`` only in ``__init__`` (it then installs ``_surrogate_bypass``
    as ``spike_grad``), so setting the flag alone changes nothing; this swaps ``spike_grad`` too, and
    restores both on exit, even after an exception. Forward values are unchanged; gradients through
    spikes become zero. Meant for export, where autograd.Function surrogates do not trace.

    Example:
        >>> with surrogate_disabled(model):
        ...     torch.onnx.export(model, x, "m.onnx")
    """
    saved: list[tuple[nn.Module, bool, object]] = []
    try:
        for _, neuron in spiking_neurons(model):
            if not hasattr(neuron, "spike_grad"):
                continue
            saved.append((neuron, getattr(neuron, "surrogate_disable", False), neuron.spike_grad))
            _set_spike_grad(neuron, neuron._surrogate_bypass)
            neuron.surrogate_disable = True
        yield model
    finally:
        for neuron, flag, spike_grad in reversed(saved):
            _set_spike_grad(neuron, spike_grad)
            neuron.surrogate_disable = flag


def _snntorch_sigmoid_slope(fn: object) -> float | None:
    """The slope of an ``snntorch.surrogate.sigmoid(slope)`` surrogate, ``None`` for any other function."""
    code = getattr(fn, "__code__", None)
    if code is None or getattr(fn, "__qualname__", "") != "sigmoid.<locals>.inner":
        return None
    if getattr(fn, "__module__", "") != "snntorch.surrogate":
        return None
    cells = dict(zip(code.co_freevars, fn.__closure__ or (), strict=True))
    return float(cells["slope"].cell_contents) if "slope" in cells else None


def _stable_sigmoid(slope: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def spike(x: torch.Tensor) -> torch.Tensor:
        # forward exactly (x > 0); gradient d/dx sigmoid(slope x) = slope σ (1 - σ), computed by
        # torch.sigmoid, which never overflows; differentiable to any order (Hutchinson needs the second)
        soft = torch.sigmoid(slope * x)
        return (x > 0).to(x.dtype) + (soft - soft.detach())

    spike.slope = slope  # type: ignore[attr-defined]
    return spike


@contextmanager
def stable_surrogates(model: nn.Module) -> Iterator[int]:
    """Within the block, snnTorch's ``surrogate.sigmoid`` is replaced by the same function written stably.

    snnTorch's sigmoid surrogate computes its gradient as ``slope·e^(−slope·x) / (e^(−slope·x) + 1)²``,
    which is inf/inf = NaN once the membrane is more than 88/slope below threshold (3.5 for the default
    slope 25): one silent neuron far from threshold turns every upstream gradient, Hessian trace and QAT
    step into NaN. The replacement gives the same spikes and the same derivative wherever snnTorch's is
    finite (0 where it is NaN). Yields the number of neurons changed; restores them on exit.
    """
    saved: list[tuple[nn.Module, object]] = []
    try:
        for _, neuron in spiking_neurons(model):
            slope = _snntorch_sigmoid_slope(getattr(neuron, "spike_grad", None))
            if slope is not None:
                saved.append((neuron, neuron.spike_grad))
                _set_spike_grad(neuron, _stable_sigmoid(slope))
        yield len(saved)
    finally:
        for neuron, fn in reversed(saved):
            _set_spike_grad(neuron, fn)


def _set_spike_grad(neuron: nn.Module, fn: object) -> None:
    # A surrogate may be an nn.Module (custom classes); nn.Module refuses to overwrite a child module
    # with a function, so unregister it first and let setattr register whatever comes back.
    if "spike_grad" in neuron._modules:
        del neuron._modules["spike_grad"]
    neuron.__dict__.pop("spike_grad", None)
    neuron.spike_grad = fn


class TimeFolded(nn.Module):
    """Run a stateless ``module`` once on ``[T*B, ...]`` for a time-first input ``[T, B, ...]``.

    The output is unfolded back to ``[T, B, ...]``. :func:`to_multistep` wraps the stateless children
    of an ``nn.Sequential`` in it; :func:`to_stepwise` unwraps them.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``module(x.flatten(0, 1))`` reshaped to ``[T, B, ...]``."""
        if x.dim() < 2:
            raise ValueError(f"TimeFolded expects a time-first tensor [T, B, ...], got {tuple(x.shape)}")
        t, b = x.shape[:2]
        y = self.module(x.flatten(0, 1))
        return y.reshape(t, b, *y.shape[1:])


def _has_neuron(module: nn.Module) -> bool:
    return any(is_spiking_neuron(m) for m in module.modules())


def _check_convertible(module: nn.Module, name: str) -> None:
    # Everything is checked before anything is swapped, so a refused model is left as it was.
    if isinstance(module, MultiStepLeaky):
        return
    label = name or "the model"
    if isinstance(module, snn.Leaky) and not module.init_hidden:
        raise ValueError(
            f"{label} is an snn.Leaky with init_hidden=False, driven by the model's own time loop; "
            "to_multistep converts init_hidden=True neurons only; use MultiStepLeaky there by hand"
        )
    if is_spiking_neuron(module) and not isinstance(module, snn.Leaky):
        raise ValueError(
            f"{label} is an snn.{type(module).__name__}; to_multistep converts snn.Leaky only, "
            "keep this model step-wise or replace the neuron by snn.Leaky"
        )
    if is_spikingjelly_stateful(module):  # folded over T*B it would run once, with no time integration
        raise ValueError(
            f"{label} is SpikingJelly's {type(module).__name__}; to_multistep converts snn.Leaky only (use "
            "SpikingJelly's own step_mode='m' there)"
        )
    for child_name, child in module.named_children():
        _check_convertible(child, f"{name}.{child_name}" if name else child_name)


def _multistep_child(child: nn.Module, in_sequential: bool, backend: str | None) -> nn.Module:
    if isinstance(child, (MultiStepLeaky, TimeFolded)):
        return child
    if isinstance(child, snn.Leaky):
        return MultiStepLeaky.from_leaky(child, backend=backend)
    if _has_neuron(child):
        _convert_children(child, backend)
        return child
    return TimeFolded(child) if in_sequential else child


def _convert_children(module: nn.Module, backend: str | None) -> None:
    in_sequential = isinstance(module, nn.Sequential)
    for name, child in list(module.named_children()):
        new = _multistep_child(child, in_sequential, backend)
        if new is not child:
            setattr(module, name, new)


def to_multistep(
    model: nn.Module, *, backend: str | None = None, example_input: torch.Tensor | None = None
) -> nn.Module:
    """Swap every ``snn.Leaky`` of a per-step snnTorch model for a :class:`MultiStepLeaky`, in place.

    The calling convention changes from one call per time step to one call per sequence::

        out_t = net(x[t])   for t in range(T)    # before: x[t] is [B, ...], state in each Leaky
        out   = net(x)                           # after:  x is [T, B, ...], out is [T, B, ...]

    What changes inside:

    * each ``snn.Leaky`` (``init_hidden=True``) is wrapped, not copied, by ``MultiStepLeaky.from_leaky``:
      same parameters, surrogate and reset; a Leaky with ``output=True`` returns ``(spikes,
      membranes)`` stacked over T. Every call starts from a zero membrane, so ``utils.reset(net)``
      between batches is no longer needed;
    * the stateless children of every ``nn.Sequential`` (Conv, Linear, pooling, Flatten, BatchNorm,
      nested blocks without neurons) are wrapped in :class:`TimeFolded` and run once on the folded
      ``[T*B, ...]`` tensor. BatchNorm in train mode then normalises over T*B samples at once
      instead of per step (eval mode gives the same outputs); Dropout draws one mask per step
      either way;
    * state_dict keys gain ``.lif`` (neurons) and ``.module`` (folded layers);
    * modules with their own ``forward`` get their ``snn.Leaky`` swapped but nothing folded: such a
      forward must itself accept ``[T, B, ...]`` (Linear does; wrap convs in ``TimeFolded``). Since
      hq_ptq cannot read that forward, a Leaky inside one is converted only with an ``example_input``
      that proves the conversion: see below.

    With ``example_input`` (``[T, B, ...]``) the conversion is checked on it: the model is first run
    step by step (``model(x[t])`` for every t, from reset neurons, in eval mode), then converted and run
    once; the outputs must agree (within 1e-5), else the conversion is undone and refused. A model that
    calls a neuron more than once per call (it runs its own time loop) is refused before anything
    changes.

    Args:
        model: an snnTorch model built from ``nn.Sequential`` and ``snn.Leaky(init_hidden=True)``,
            or a bare ``snn.Leaky``.
        backend: the LIF backend of the new layers (``None``: :func:`get_lif_backend`).
        example_input: a ``[T, B, ...]`` probe on which the converted model must reproduce the step-wise
            one; required when a Leaky sits inside a module with its own ``forward``.

    Returns:
        ``model``, converted (a bare Leaky comes back as a new ``MultiStepLeaky``).

    Raises:
        ValueError: the model has no ``snn.Leaky``, or holds another snnTorch neuron, or a Leaky with
            ``init_hidden=False`` (its time loop is the model's own code), or a Leaky inside a custom
            ``forward`` without ``example_input``, or the model runs its own time loop, or the converted
            model's outputs differ from the step-wise ones on ``example_input`` (the model is then left
            as it was).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(2, 8, 3), snn.Leaky(0.9, init_hidden=True), nn.Flatten(),
        ...                     nn.LazyLinear(10), snn.Leaky(0.9, init_hidden=True, output=True))
        >>> spk, mem = to_multistep(net)(x)            # x: [T, B, 2, H, W]
        >>> to_stepwise(net)                            # back to net(x[t]) per step
    """
    if backend is not None:
        _check_backend(backend, "backend=")
    # Other snnTorch neurons are named first: a model of snn.Synaptic/Alpha/... only (no Leaky at all) is
    # told which module it cannot convert, not that it has nothing to convert.
    _check_convertible(model, "")
    if not any(isinstance(m, snn.Leaky) for m in model.modules()):
        raise ValueError(f"to_multistep found no snn.Leaky in {type(model).__name__}; nothing to convert")
    hidden = _behind_custom_forward(model)
    if example_input is None:
        if hidden:
            raise ValueError(
                f"{hidden[0]} is an snn.Leaky inside a module with its own forward, which to_multistep "
                "cannot read (it may loop over time itself); pass example_input=x ([T, B, ...]) to check "
                "the conversion on it, or keep the model step-wise"
            )
        return _multistep_child(model, False, backend)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise ValueError("example_input must be a time-first tensor [T, B, ...]")
    reference = _stepwise_outputs(model, example_input)
    converted = _multistep_child(model, False, backend)
    try:
        with eval_mode(converted), torch.no_grad():
            got = converted(example_input)
        same = _same_outputs(got, reference)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        same, reason = False, f"the converted model fails on it ({first_line(err)})"
    else:
        reason = "the converted model's outputs differ from the step-wise model's"
    if not same:
        restored = to_stepwise(converted)
        raise ValueError(
            f"to_multistep refused {type(restored).__name__}: on example_input {tuple(example_input.shape)} "
            f"{reason}; the model is left step-wise"
        )
    return converted


def _behind_custom_forward(model: nn.Module) -> list[str]:
    """Names of the snn.Leaky layers reached through a module whose ``forward`` is its own code (anything
    but ``nn.Sequential``), where to_multistep cannot tell how the neuron is driven."""
    found: list[str] = []

    def walk(module: nn.Module, name: str, transparent: bool) -> None:
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, (MultiStepLeaky, TimeFolded)):
                continue
            if isinstance(child, snn.Leaky):
                if not transparent:
                    found.append(full)
            else:
                walk(child, full, transparent and isinstance(child, nn.Sequential))

    walk(model, "", isinstance(model, nn.Sequential))
    return found


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` in eval mode within the block; each one's own flag restored on exit."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _stepwise_outputs(model: nn.Module, x: torch.Tensor) -> object:
    """The per-step model's outputs over ``x`` (``model(x[t])`` for every t from reset neurons), stacked
    over time; refuses a model that calls a neuron more than once per call (its own time loop)."""
    calls: dict[str, int] = {}
    hooks = [
        m.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
        for n, m in model.named_modules()
        if isinstance(m, snn.Leaky)
    ]
    try:
        with eval_mode(model), torch.no_grad():
            reset_states(model)
            steps = []
            for x_t in x.unbind(0):
                calls.clear()
                try:
                    steps.append(model(x_t))
                except (RuntimeError, ValueError, TypeError, IndexError) as err:
                    raise ValueError(
                        f"to_multistep: the step-wise model cannot take one time step of example_input, "
                        f"shape {tuple(x_t.shape)} ({first_line(err)}); give "
                        "example_input as [T, B, ...] of what the model takes per step"
                    ) from None
                looped = sorted(n for n, c in calls.items() if c > 1)
                if looped:
                    raise ValueError(
                        f"to_multistep refused {type(model).__name__}: it calls {looped[0]} "
                        f"{calls[looped[0]]} times per call, i.e. it runs its own time loop; hq_ptq "
                        "quantizes it as it is (no conversion needed)"
                    )
    finally:
        for h in hooks:
            h.remove()
        reset_states(model)
    return _stack(steps)


def _stack(steps: list) -> object:
    first = steps[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(steps)
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([s[i] for s in steps]) for i in range(len(first)))
    raise ValueError(f"to_multistep can check tensor or tuple outputs only, got {type(first).__name__}")


def _same_outputs(got: object, want: object) -> bool:
    if isinstance(want, torch.Tensor):
        return (
            isinstance(got, torch.Tensor)
            and got.shape == want.shape
            and torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        )
    if isinstance(want, (tuple, list)):
        return (
            isinstance(got, (tuple, list))
            and len(got) == len(want)
            and all(_same_outputs(g, w) for g, w in zip(got, want, strict=True))
        )
    return False


def to_stepwise(model: nn.Module) -> nn.Module:
    """Undo :func:`to_multistep`: unwrap converted neurons and ``TimeFolded`` layers, in place.

    Only layers made by ``to_multistep`` are unwrapped (``MultiStepLeaky`` around an
    ``init_hidden=True`` Leaky); the zoo's own ``MultiStepLeaky`` layers have no per-step form and
    stay. The original neuron objects come back with their parameters, so the state_dict keys are the
    original ones again; each neuron's hidden state starts empty (as after ``utils.reset``).

    Returns:
        ``model`` (a converted bare Leaky comes back as that Leaky).
    """
    if isinstance(model, MultiStepLeaky) and model.lif.init_hidden:
        return _unwrap_neuron(model)
    if isinstance(model, TimeFolded):
        return to_stepwise(model.module)
    for name, child in list(model.named_children()):
        new = to_stepwise(child)
        if new is not child:
            setattr(model, name, new)
    return model


def _unwrap_neuron(layer: MultiStepLeaky) -> snn.Leaky:
    neuron = layer.lif
    neuron.mem = torch.zeros(0, device=neuron.mem.device)
    return neuron
