"""snnTorch adapters: a multi-step LIF layer, per-instance state reset, neuron discovery, surrogate switch.

State rule of the whole project: neuron state lives per call (``MultiStepLeaky``) or per instance
(``reset_states``). Nothing here reads or writes snnTorch's class-level ``SpikingNeuron.instances``
list, which spans every network ever built in the process (snnTorch issues #438/#449).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import snntorch as snn
import torch
from snntorch._neurons.neurons import SpikingNeuron
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "MultiStepLeaky",
    "explicit_membranes",
    "is_spiking_neuron",
    "reset_states",
    "spiking_neurons",
    "surrogate_disabled",
]

_RESET_SUBTRACT, _RESET_ZERO, _RESET_NONE = 0, 1, 2  # snnTorch's SpikingNeuron.reset_dict codes


class MultiStepLeaky(nn.Module):
    """One ``snntorch.Leaky`` applied over a time-first tensor ``[T, ...]`` in a single call.

    The membrane is a local variable of ``forward``: every call starts from zero, so no state survives
    between batches and two models never share state. Conv/BN layers around it run once on the
    time-folded ``[T*B, ...]`` tensor; only this layer loops over T.

    The snnTorch neuron stays reachable as ``.lif`` so converters (export, quantization) can find it,
    and its ``beta``, ``threshold``, ``graded_spikes_factor`` and ``spike_grad`` are read at call time,
    so ``surrogate_disabled`` and learnable beta/threshold act on this layer too.

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
    ) -> None:
        super().__init__()
        if reset_mechanism not in ("zero", "subtract", "none"):
            raise ValueError(f"reset_mechanism={reset_mechanism!r} is not one of 'zero', 'subtract', 'none'")
        self.lif = snn.Leaky(
            beta=beta,
            threshold=threshold,
            spike_grad=spike_grad,
            init_hidden=False,
            reset_mechanism=reset_mechanism,
            learn_beta=learn_beta,
            learn_threshold=learn_threshold,
        )
        self.return_mem = return_mem
        self.initial_mem: torch.Tensor | None = None
        self.record_final_mem = False
        self.final_mem: torch.Tensor | None = None

    def extra_repr(self) -> str:
        def fmt(t: torch.Tensor) -> str:
            return f"{t.item():g}" if t.numel() == 1 else f"<{tuple(t.shape)}>"

        return (
            f"beta={fmt(self.lif.beta)}, threshold={fmt(self.lif.threshold)}, "
            f"reset={self.lif.reset_mechanism}, return_mem={self.return_mem}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Spikes ``[T, ...]`` for input currents ``x`` of shape ``[T, ...]`` (plus the membrane trace)."""
        if x.dim() < 2:
            raise ValueError(
                f"MultiStepLeaky expects a time-first tensor [T, ...] with >= 2 dims, got {tuple(x.shape)}"
            )
        if self._fast_path_ok():
            spk, mem = self._unrolled(x)
        else:
            spk, mem = self._stepped(x)
        return (spk, mem) if self.return_mem else spk

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

    def _unrolled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Same arithmetic, in the same order, as snntorch.Leaky.forward (bit-identical, tested), minus
        # its per-step bookkeeping: the detached reset is the previous step's spike instead of a second
        # surrogate call. About 20% off a spikformer-tiny fwd+bwd on CPU.
        lif = self.lif
        spike_fn = lif.spike_grad
        beta = lif.beta.clamp(0, 1)
        thr = lif.threshold
        gain = lif.graded_spikes_factor
        mode = int(lif.reset_mechanism_val)
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
        for x_t in x.unbind(0):
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


def reset_states(model: nn.Module) -> int:
    """Zero and detach the hidden state of every snnTorch neuron inside ``model``, per instance.

    Works for neurons built with ``init_hidden=True`` (``Leaky``, ``Synaptic``, ``Alpha``, ``RLeaky``,
    ...): each one's own ``reset_mem()`` replaces its state buffers (``mem``, ``syn``, ``spk``, ...)
    with fresh zero tensors, which also cuts the autograd graph of the previous batch. Only modules
    reachable through ``model.modules()`` are touched, never other networks.

    Args:
        model: any module tree.

    Returns:
        The number of neurons reset.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, SpikingNeuron) and callable(getattr(module, "reset_mem", None)):
            module.reset_mem()
            count += 1
    return count


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


def _set_spike_grad(neuron: nn.Module, fn: object) -> None:
    # A surrogate may be an nn.Module (custom classes); nn.Module refuses to overwrite a child module
    # with a function, so unregister it first and let setattr register whatever comes back.
    if "spike_grad" in neuron._modules:
        del neuron._modules["spike_grad"]
    neuron.__dict__.pop("spike_grad", None)
    neuron.spike_grad = fn
