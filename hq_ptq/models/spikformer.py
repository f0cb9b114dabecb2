"""Spikformer (Zhou et al., ICLR 2023), the cifar10dvs variant of ZK-Zhou/spikformer, on snnTorch LIFs.

Input ``[T, B, C_in, H, W]`` (time first), logits ``[B, num_classes]``. Layout of one forward:

* SPS: 4 x (Conv3x3 + BN + LIF), channels C/8 -> C/4 -> C/2 -> C, with a 3x3/2 max-pool after the
  last ``n_pool`` stages; then a relative-position Conv3x3 + BN + LIF added to its input. Tokens: H*W
  after pooling (128 px with 4 pools and 32 px with 2 pools both give 8x8).
* ``depth`` blocks: ``x = x + SSA(x)``, ``x = x + MLP(x)`` (SEW-style additive residuals).
  SSA: q/k/v = Conv1d(no bias) + BN + LIF; per head ``q @ k^T @ v * attn_scale`` -> LIF (threshold
  ``attn_threshold``) -> Conv1d + BN + LIF. MLP: (Conv1d + BN + LIF) x 2 with ``mlp_ratio * dim``
  hidden channels.
* Head: ``Linear`` on the token mean, averaged over time.

The reference's unused ``pos_embed`` and LayerNorms are left out (they never enter forward), so the
2-256 model has 2.567M parameters, the published 2.57M.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hq_ptq.models.layers import SeqMaxPool, check_input, conv2d_bn, lif, token_conv_bn
from hq_ptq.models.registry import make_config, register_model

__all__ = ["Spikformer", "SpikformerConfig"]


@dataclass(frozen=True)
class SpikformerConfig:
    """Constructor settings of :class:`Spikformer` (all JSON-serialisable)."""

    img_size: int = 128
    in_channels: int = 2
    num_classes: int = 10
    embed_dim: int = 256
    num_heads: int = 16
    depth: int = 2
    mlp_ratio: float = 4.0
    n_pool: int = 4
    # Pool after the FIRST n_pool stages instead of the last: the reference places them late, which runs
    # three 3x3 convs at full resolution; early pooling is ~4x cheaper and is what small CPU models use.
    pool_early: bool = False
    attn_scale: float = 0.25  # cifar10dvs reference; the CIFAR-10 variant uses 0.125
    beta: float = 0.5  # spikingjelly tau = 2
    threshold: float = 1.0
    attn_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.embed_dim < 8 or self.embed_dim % 8:
            raise ValueError(
                f"embed_dim must be a positive multiple of 8 (SPS uses C/8), got {self.embed_dim}"
            )
        if self.num_heads < 1 or self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide embed_dim={self.embed_dim}")
        if not 0 <= self.n_pool <= 4:
            raise ValueError(f"n_pool must be in 0..4 (SPS has 4 stages), got {self.n_pool}")
        for key in ("img_size", "in_channels", "num_classes", "depth"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0 < self.beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {self.beta}")
        if self.threshold <= 0 or self.attn_threshold <= 0:
            raise ValueError(
                f"thresholds must be > 0, got threshold={self.threshold}, "
                f"attn_threshold={self.attn_threshold}"
            )

    @property
    def num_tokens(self) -> int:
        """Tokens for an ``img_size`` x ``img_size`` input."""
        side = self.img_size
        for _ in range(self.n_pool):
            side = (side - 1) // 2 + 1  # MaxPool2d(3, 2, padding=1)
        return side * side


class SPS(nn.Module):
    """Spiking patch splitting: conv stages with max-pools, then a residual relative-position conv."""

    def __init__(self, cfg: SpikformerConfig) -> None:
        super().__init__()
        c = cfg.embed_dim
        widths = [cfg.in_channels, c // 8, c // 4, c // 2, c]
        self.convs = nn.ModuleList(conv2d_bn(widths[i], widths[i + 1]) for i in range(4))
        self.lifs = nn.ModuleList(lif(cfg.beta, cfg.threshold) for _ in range(4))
        # Pools sit after the last n_pool stages, as in the reference cifar10 (2 pools) and
        # cifar10dvs (4 pools) models, unless pool_early asks for the first ones.
        self.pool_after = tuple(range(cfg.n_pool)) if cfg.pool_early else tuple(range(4 - cfg.n_pool, 4))
        self.pool = SeqMaxPool()
        self.rpe = conv2d_bn(c, c)
        self.rpe_lif = lif(cfg.beta, cfg.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, neuron) in enumerate(zip(self.convs, self.lifs, strict=True)):
            x = neuron(conv(x))
            if i in self.pool_after:
                x = self.pool(x)
        x = x + self.rpe_lif(self.rpe(x))
        return x.flatten(3)  # [T, B, C, N]


class SSA(nn.Module):
    """Spiking self-attention; softmax-free, so the product of spike matrices is exact."""

    def __init__(self, cfg: SpikformerConfig) -> None:
        super().__init__()
        c = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.scale = cfg.attn_scale
        self.q = token_conv_bn(c, c, bias=False)
        self.k = token_conv_bn(c, c, bias=False)
        self.v = token_conv_bn(c, c, bias=False)
        self.q_lif = lif(cfg.beta, cfg.threshold)
        self.k_lif = lif(cfg.beta, cfg.threshold)
        self.v_lif = lif(cfg.beta, cfg.threshold)
        self.attn_lif = lif(cfg.beta, cfg.attn_threshold)
        self.proj = token_conv_bn(c, c)
        self.proj_lif = lif(cfg.beta, cfg.threshold)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        t, b, c, n = x.shape
        return x.reshape(t, b, self.num_heads, c // self.num_heads, n).transpose(-1, -2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b, c, n = x.shape
        q = self._heads(self.q_lif(self.q(x)))  # [T, B, h, N, d]
        k = self._heads(self.k_lif(self.k(x)))
        v = self._heads(self.v_lif(self.v(x)))
        # No softmax, so (q k^T) v == q (k^T v), and with binary spikes both are exact integer counts in
        # fp32. k^T v is d x d instead of N x N: cheaper whenever head_dim < tokens (16 vs 64 here).
        attn = q @ (k.transpose(-2, -1) @ v)
        x = (attn * self.scale).transpose(-1, -2).reshape(t, b, c, n)
        x = self.attn_lif(x)
        return self.proj_lif(self.proj(x))


class MLP(nn.Module):
    """(Conv1d + BN + LIF) x 2."""

    def __init__(self, cfg: SpikformerConfig) -> None:
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = token_conv_bn(cfg.embed_dim, hidden)
        self.fc1_lif = lif(cfg.beta, cfg.threshold)
        self.fc2 = token_conv_bn(hidden, cfg.embed_dim)
        self.fc2_lif = lif(cfg.beta, cfg.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2_lif(self.fc2(self.fc1_lif(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, cfg: SpikformerConfig) -> None:
        super().__init__()
        self.attn = SSA(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class Spikformer(nn.Module):
    """Spikformer for event frames ``[T, B, C_in, H, W]`` -> logits ``[B, num_classes]``."""

    def __init__(self, config: SpikformerConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or SpikformerConfig()
        self.patch_embed = SPS(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.config.in_channels)
        x = self.patch_embed(x.to(self.head.weight.dtype))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(-1).mean(0))  # Linear is affine: head(mean_T) == mean_T(head)


def _init_weights(m: nn.Module) -> None:
    # As the reference: truncated-normal Linear weights, zero bias; convs keep PyTorch's default.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


_PRESETS: dict[str, dict[str, object]] = {
    "spikformer-2-256": dict(img_size=128, embed_dim=256, num_heads=16, depth=2, mlp_ratio=4.0, n_pool=4),
    "spikformer-4-384": dict(img_size=128, embed_dim=384, num_heads=12, depth=4, mlp_ratio=4.0, n_pool=4),
    "spikformer-tiny": dict(
        img_size=32, embed_dim=64, num_heads=4, depth=2, mlp_ratio=4.0, n_pool=2, pool_early=True
    ),
}


def _register(name: str) -> None:
    @register_model(name)
    def build(**overrides: object) -> Spikformer:
        return Spikformer(make_config(SpikformerConfig, _PRESETS[name], overrides))

    build.__name__ = build.__qualname__ = name.replace("-", "_")


for _name in _PRESETS:
    _register(_name)
