"""Building blocks shared by the zoo: time-folded Conv/BN stacks and the LIF factory.

Everything works on time-first tensors ``[T, B, ...]``. Stateless layers (Conv, BN, pooling) run once
on the folded ``[T*B, ...]`` tensor (spikingjelly's multi-step style); only the LIF loops over T.
Weights live only in ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` (and BN) so the quantizer can swap
every weight layer by type.

The rest is what Spikformer and the Spike-driven Transformer have in common: their shared config
fields and checks, patch-splitting stages, q/k/v branches, trunk and preset registration. The helpers
that add modules set them on the model itself, so parameter names stay those of saved checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hq_ptq.snn import MultiStepLeaky

__all__ = [
    "SeqConvBN",
    "SeqMaxPool",
    "TransformerConfig",
    "add_qkv",
    "add_trunk",
    "check_input",
    "check_sizes_and_neurons",
    "check_widths",
    "conv2d_bn",
    "encode",
    "lif",
    "pooled_tokens",
    "sps_stages",
    "token_conv_bn",
    "trunc_normal_init",
]


@dataclass(frozen=True)
class TransformerConfig:
    """The settings every zoo transformer has; each model's config subclasses it and adds its own.

    A subclass's fields come after these (one that redefines a default, as ``num_heads``, keeps its
    place), so the field order, and with it ``hq_config`` and the unknown-setting message, reads as
    if every config listed all its fields itself.
    """

    img_size: int = 128
    in_channels: int = 2
    num_classes: int = 10
    embed_dim: int = 256
    num_heads: int = 8
    depth: int = 2
    mlp_ratio: float = 4.0


# The config checks come in two parts because each model checks its pooling setting in between
# (the first failing check names the error, so the order stays as it was).
def check_widths(cfg: TransformerConfig, stem: str) -> None:
    """``embed_dim`` must split into the ``stem``'s C/8 first stage and into ``num_heads`` heads."""
    if cfg.embed_dim < 8 or cfg.embed_dim % 8:
        raise ValueError(f"embed_dim must be a positive multiple of 8 ({stem} uses C/8), got {cfg.embed_dim}")
    if cfg.num_heads < 1 or cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"num_heads={cfg.num_heads} must divide embed_dim={cfg.embed_dim}")


def check_sizes_and_neurons(cfg: Any) -> None:
    """Sizes >= 1, ``mlp_ratio`` > 0 and the LIF settings ``beta``, ``threshold``, ``attn_threshold``."""
    for key in ("img_size", "in_channels", "num_classes", "depth"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be > 0, got {cfg.mlp_ratio}")
    if not 0 < cfg.beta <= 1:
        raise ValueError(f"beta must be in (0, 1], got {cfg.beta}")
    if cfg.threshold <= 0 or cfg.attn_threshold <= 0:
        raise ValueError(
            f"thresholds must be > 0, got threshold={cfg.threshold}, attn_threshold={cfg.attn_threshold}"
        )


def pooled_tokens(img_size: int, pools: int) -> int:
    """Tokens left of an ``img_size`` x ``img_size`` input after ``pools`` :class:`SeqMaxPool` stages."""
    side = img_size
    for _ in range(pools):
        side = (side - 1) // 2 + 1  # MaxPool2d(3, 2, padding=1)
    return side * side


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


def sps_stages(cfg: Any) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The four patch-splitting stages: Conv3x3 + BN (C_in -> C/8 -> C/4 -> C/2 -> C) and their LIFs."""
    c = cfg.embed_dim
    widths = [cfg.in_channels, c // 8, c // 4, c // 2, c]
    convs = nn.ModuleList(conv2d_bn(widths[i], widths[i + 1]) for i in range(4))
    lifs = nn.ModuleList(lif(cfg.beta, cfg.threshold) for _ in range(4))
    return convs, lifs


def add_qkv(attn: nn.Module, cfg: Any) -> None:
    """Give ``attn`` the q/k/v projections (Conv1d, no bias, + BN) and then their LIFs.

    Set on ``attn`` itself, in this order, so the parameter names (``...attn.q.conv.weight``) stay
    those of the published checkpoints.
    """
    c = cfg.embed_dim
    attn.q = token_conv_bn(c, c, bias=False)
    attn.k = token_conv_bn(c, c, bias=False)
    attn.v = token_conv_bn(c, c, bias=False)
    attn.q_lif = lif(cfg.beta, cfg.threshold)
    attn.k_lif = lif(cfg.beta, cfg.threshold)
    attn.v_lif = lif(cfg.beta, cfg.threshold)


def add_trunk(
    model: nn.Module, cfg: TransformerConfig, patch_embed: nn.Module, block: Callable[[Any], nn.Module]
) -> None:
    """Give a zoo transformer its ``config``, ``patch_embed`` and ``cfg.depth`` ``block(cfg)`` blocks.

    Set on ``model`` itself (as :func:`add_qkv`), so the parameter names stay ``patch_embed.*`` and
    ``blocks.<i>.*``; the model adds its head after this and runs the trunk with :func:`encode`.
    """
    model.config = cfg
    model.patch_embed = patch_embed
    model.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.depth))


def encode(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run the trunk of :func:`add_trunk`: check ``x``, patch-embed it, run the blocks -> ``[T, B, C, N]``.

    The input is cast to the dtype of ``model.head``, so a half-precision model takes float32 frames.
    """
    check_input(x, model.config.in_channels)
    x = model.patch_embed(x.to(model.head.weight.dtype))
    for block in model.blocks:
        x = block(x)
    return x


def trunc_normal_init(m: nn.Module, types: tuple[type[nn.Module], ...]) -> None:
    """Truncated-normal (std 0.02) weight and zero bias for ``m`` if it is one of ``types``."""
    if isinstance(m, types):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
