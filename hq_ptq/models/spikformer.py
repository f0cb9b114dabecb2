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

from hq_ptq.models import layers
from hq_ptq.models.layers import SeqMaxPool, conv2d_bn, lif, token_conv_bn
from hq_ptq.models.registry import register_presets

__all__ = ["Spikformer", "SpikformerConfig"]


@dataclass(frozen=True)
class SpikformerConfig(layers.TransformerConfig):
    """Constructor settings of :class:`Spikformer` (all JSON-serialisable).

    The shared ones (``img_size`` ... ``mlp_ratio``) come from
    :class:`~hq_ptq.models.layers.TransformerConfig`.
    """

    num_heads: int = 16  # keeps its place after embed_dim
    n_pool: int = 4
    # Pool after the FIRST n_pool stages instead of the last: the reference places them late, which runs
    # three 3x3 convs at full resolution; early pooling is ~4x cheaper and is what small CPU models use.
    pool_early: bool = False
    attn_scale: float = 0.25  # cifar10dvs reference; the CIFAR-10 variant uses 0.125
    beta: float = 0.5  # spikingjelly tau = 2
    threshold: float = 1.0
    attn_threshold: float = 0.5

    def __post_init__(self) -> None:
        layers.check_widths(self, "SPS")
        if not 0 <= self.n_pool <= 4:
            raise ValueError(f"n_pool must be in 0..4 (SPS has 4 stages), got {self.n_pool}")
        layers.check_sizes_and_neurons(self)

    @property
    def num_tokens(self) -> int:
        """Tokens for an ``img_size`` x ``img_size`` input."""
        return layers.pooled_tokens(self.img_size, self.n_pool)


class SPS(nn.Module):
    """Spiking patch splitting: conv stages with max-pools, then a residual relative-position conv."""

    def __init__(self, cfg: SpikformerConfig) -> None:
        super().__init__()
        self.convs, self.lifs = layers.sps_stages(cfg)
        # Pools sit after the last n_pool stages, as in the reference cifar10 (2 pools) and
        # cifar10dvs (4 pools) models, unless pool_early asks for the first ones.
        self.pool_after = tuple(range(cfg.n_pool)) if cfg.pool_early else tuple(range(4 - cfg.n_pool, 4))
        self.pool = SeqMaxPool()
        self.rpe = conv2d_bn(cfg.embed_dim, cfg.embed_dim)
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
        self.num_heads = cfg.num_heads
        self.scale = cfg.attn_scale
        layers.add_qkv(self, cfg)
        self.attn_lif = lif(cfg.beta, cfg.attn_threshold)
        self.proj = token_conv_bn(cfg.embed_dim, cfg.embed_dim)
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
        cfg = config or SpikformerConfig()
        layers.add_trunk(self, cfg, SPS(cfg), Block)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Linear is affine: head(mean_T) == mean_T(head)
        return self.head(layers.encode(self, x).mean(-1).mean(0))


def _init_weights(m: nn.Module) -> None:
    # As the reference: truncated-normal Linear weights, zero bias; convs keep PyTorch's default.
    layers.trunc_normal_init(m, (nn.Linear,))


_PRESETS: dict[str, dict[str, object]] = {
    "spikformer-2-256": dict(img_size=128, embed_dim=256, num_heads=16, depth=2, mlp_ratio=4.0, n_pool=4),
    "spikformer-4-384": dict(img_size=128, embed_dim=384, num_heads=12, depth=4, mlp_ratio=4.0, n_pool=4),
    "spikformer-tiny": dict(
        img_size=32, embed_dim=64, num_heads=4, depth=2, mlp_ratio=4.0, n_pool=2, pool_early=True
    ),
}

register_presets(Spikformer, SpikformerConfig, _PRESETS)
