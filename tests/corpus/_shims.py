"""Drop-in stand-ins for a few third-party names the corpus models import (spikingjelly's clock_driven
neurons, timm, utilsd), so that the models run without those packages or on snnTorch neurons. The model files
import these from ``._shims`` instead of from their original packages; that import line is the only change
made to the authors' code.

* ``MultiStepLIFNode`` / ``MultiStepParametricLIFNode`` (spikingjelly.clock_driven.neuron): built from
  ``snntorch.Leaky`` with explicit membranes, looping over dim 0 of a ``[T, ...]`` input. The maths is
  spikingjelly's LIF with ``decay_input=True``: ``H = V + (X - (V - V_reset)) / tau``, spike
  ``S = H >= V_th`` (``H - V_th > 0`` in snnTorch), hard reset to ``V_reset`` (``reset_mechanism="zero"``,
  ``V_reset = 0``) or soft reset (``v_reset=None``: ``"subtract"``), reset in the same step
  (``reset_delay=False``), surrogate ``sigmoid(alpha=4)`` (spikingjelly's default). As
  ``Leaky(beta=1 - 1/tau)`` integrates ``beta*V + I``, the input is scaled by ``1/tau`` first. One
  difference remains: with ``reset_delay=False`` snnTorch lets the gradient flow through the reset, where
  spikingjelly's ``detach_reset=True`` cuts it. The forward pass is spike-for-spike the same for the hard
  reset that every corpus model uses (checked in tests/test_corpus_models.py); with the soft reset
  (``v_reset=None``, unused here) snnTorch also subtracts at the next step when the membrane is still above
  threshold after a subtraction, so very strong inputs spike differently. ``backend`` ('cupy') is
  accepted and ignored: everything runs in plain torch, on any device.
* ``DropPath``, ``trunc_normal_``, ``to_2tuple`` (timm.models.layers), ``register_model``
  (timm.models.registry), ``_cfg`` (timm.models.vision_transformer), ``NETWORKS`` (SeqSNN's registry, from
  ``utilsd``): minimal equivalents.
"""

from __future__ import annotations

import collections.abc
from itertools import repeat

import snntorch as snn
import torch
from snntorch import surrogate
from torch import nn

__all__ = [
    "DropPath",
    "MultiStepLIFNode",
    "MultiStepParametricLIFNode",
    "NETWORKS",
    "_cfg",
    "register_model",
    "to_2tuple",
    "trunc_normal_",
]


def _sigmoid_surrogate(alpha: float = 4.0):
    # spikingjelly.clock_driven.surrogate.Sigmoid(alpha=4): d/dx = alpha * sig(alpha x) * (1 - sig(alpha x)),
    # which is snnTorch's sigmoid surrogate with slope = alpha.
    return surrogate.sigmoid(slope=alpha)


class MultiStepLIFNode(nn.Module):
    """spikingjelly's ``MultiStepLIFNode`` on ``snn.Leaky``: ``[T, ...]`` in, ``[T, ...]`` spikes out."""

    def __init__(
        self,
        tau: float = 2.0,
        decay_input: bool = True,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        surrogate_function=None,
        detach_reset: bool = False,
        backend: str = "torch",
        lava_s_cale: int = 1 << 6,
    ):
        super().__init__()
        if v_reset not in (None, 0.0):
            raise NotImplementedError("only v_reset=0 (hard reset) and v_reset=None (soft reset)")
        self.tau = float(tau)
        self.decay_input = decay_input
        self.v_threshold = v_threshold
        self.v_reset = v_reset
        self.detach_reset = detach_reset
        self.backend = backend
        self.lif = snn.Leaky(
            beta=self._beta(),
            threshold=v_threshold,
            spike_grad=surrogate_function or _sigmoid_surrogate(),
            learn_beta=self.learn_beta,
            reset_mechanism="subtract" if v_reset is None else "zero",
            reset_delay=False,
        )

    learn_beta = False

    def _beta(self):
        return 1.0 - 1.0 / self.tau

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.tau if self.decay_input else x

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        mem = self.lif.reset_mem()
        spikes = []
        for t in range(x_seq.shape[0]):
            spk, mem = self.lif(self._input(x_seq[t]), mem)
            spikes.append(spk)
        return torch.stack(spikes)

    def extra_repr(self) -> str:
        return (
            f"tau={self.tau}, v_threshold={self.v_threshold}, v_reset={self.v_reset}, "
            f"backend={self.backend!r}"
        )


class MultiStepParametricLIFNode(MultiStepLIFNode):
    """spikingjelly's ``MultiStepParametricLIFNode``: the decay ``1/tau = sigmoid(w)`` is learned. Here it is
    ``snn.Leaky(learn_beta=True)`` with ``beta = 1 - 1/tau`` and the input scaled by ``1 - beta``."""

    def __init__(self, init_tau: float = 2.0, *args, **kwargs):
        # spikingjelly's argument list, but tau is called init_tau
        super().__init__(init_tau, *args, **kwargs)

    learn_beta = True

    def _beta(self):
        return torch.tensor(1.0 - 1.0 / self.tau)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 - self.lif.beta.clamp(0, 1)) if self.decay_input else x


# ----------------------------------------------------------------------------------------------- timm


def _ntuple(n):
    def parse(x):
        if isinstance(x, collections.abc.Iterable) and not isinstance(x, str):
            return tuple(x)
        return tuple(repeat(x, n))

    return parse


to_2tuple = _ntuple(2)


def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0):
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    """Stochastic depth per sample (timm.models.layers.DropPath)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)


def register_model(fn):
    """timm's model registry decorator; here a no-op."""
    return fn


class NETWORKS:
    """SeqSNN's network registry (``SeqSNN.network.base.NETWORKS``, a ``utilsd`` ``Registry``); here
    ``register_module(name)`` is a no-op decorator."""

    @staticmethod
    def register_module(name: str | None = None, **kwargs):
        return lambda cls: cls


def _cfg(url: str = "", **kwargs) -> dict:
    return {"url": url, "num_classes": 1000, "input_size": (3, 224, 224), **kwargs}
