"""Building blocks shared by the zoo: time-folded Conv/BN stacks and the LIF factory.

Everything works on time-first tensors ``[T, B, ...]``. Stateless layers (Conv, BN, pooling) run once
on the folded ``[T*B, ...]`` tensor (spikingjelly's multi-step style); only the LIF loops over T.
Weights live only in ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` (and BN) so the quantizer can swap
every weight layer by type.
"""

from __future__ import annotations

import torch
from torch import nn

from hq_ptq.snn import MultiStepLeaky

__all__ = ["SeqConvBN", "SeqMaxPool", "check_input", "conv2d_bn", "lif", "token_conv_bn"]


def _fold(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(0, 1)


def _unfold(y: torch.Tensor, t: int, b: int) -> torch.Tensor:
    return y.reshape(t, b, *y.shape[1:])


class SeqConvBN(nn.Module):
    """``bn(conv(x))`` on ``[T, B, C, ...]``, computed once over the folded time and batch axes."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b = x.shape[:2]
        return _unfold(self.bn(self.conv(_fold(x))), t, b)


class SeqMaxPool(nn.Module):
    """3x3 stride-2 max pooling (the SPS downsampler) on ``[T, B, C, H, W]``."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b = x.shape[:2]
        return _unfold(self.pool(_fold(x)), t, b)


def conv2d_bn(in_channels: int, out_channels: int, kernel_size: int = 3) -> SeqConvBN:
    """3x3 (same padding, no bias) Conv2d + BatchNorm2d, as in the SPS patch splitting stages."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    return SeqConvBN(conv, nn.BatchNorm2d(out_channels))


def token_conv_bn(in_features: int, out_features: int, *, bias: bool = True) -> SeqConvBN:
    """Token projection: ``Conv1d(kernel_size=1)`` + BatchNorm1d on ``[T, B, C, N]``."""
    conv = nn.Conv1d(in_features, out_features, kernel_size=1, bias=bias)
    return SeqConvBN(conv, nn.BatchNorm1d(out_features))


def lif(beta: float, threshold: float) -> MultiStepLeaky:
    """The zoo's LIF: hard reset to zero with a detached reset (spikingjelly ``detach_reset=True``)."""
    return MultiStepLeaky(beta=beta, threshold=threshold, reset_mechanism="zero")


def check_input(x: torch.Tensor, in_channels: int) -> None:
    """Raise a one-line ValueError unless ``x`` is ``[T, B, in_channels, H, W]``."""
    if x.dim() != 5 or x.shape[2] != in_channels:
        raise ValueError(
            f"expected a time-first input [T, B, {in_channels}, H, W], got shape {tuple(x.shape)}; "
            "turn batch-first data [B, T, ...] into time-first with x.transpose(0, 1)"
        )
