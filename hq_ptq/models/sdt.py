"""Spike-driven Transformer v1 (Yao et al., NeurIPS 2023; BICLab/Spike-Driven-Transformer) on snnTorch LIFs.

Input ``[T, B, C_in, H, W]`` (time first), logits ``[B, num_classes]``. Layout of one forward:

* MS-SPS: stages 0-2 are Conv3x3 + BN + LIF (+ 3x3/2 max-pool where ``pooling_stat[i] == "1"``);
  stage 3 is Conv3x3 + BN (+ pool) whose *membrane-level* output ``f`` feeds
  ``f + BN(Conv3x3(LIF(f)))`` (the relative-position conv with a membrane shortcut).
* Membrane shortcuts everywhere: each branch starts with a LIF and ends with Conv + BN, and the
  residual adds pre-spike values. ``depth`` blocks of
  SDSA: ``s = LIF(x)``; q/k/v = Conv1d(no bias) + BN + LIF of ``s``;
  ``kv = LIF_0.5(sum_tokens(k * v))``; ``x = x + BN(Conv1d(q * kv))`` (Hadamard products only), and
  MLP: ``x = x + BN(Conv1d(LIF(BN(Conv1d(LIF(x))))))``.
* Head: token mean -> LIF -> Linear -> mean over time.

The reference's ``talking_heads`` Conv1d is built but never called in forward, so it is left out
(a weight with no gradient would only confuse a sensitivity analysis). The CIFAR10-DVS-only
``dvs_mode`` (3x3 erosion pooling inside attention) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hq_ptq.models import layers
from hq_ptq.models.layers import SeqMaxPool, conv2d_bn, lif, token_conv_bn
from hq_ptq.models.registry import register_presets

__all__ = ["SDTConfig", "SpikeDrivenTransformer"]


@dataclass(frozen=True)
class SDTConfig(layers.TransformerConfig):
    """Constructor settings of :class:`SpikeDrivenTransformer` (all JSON-serialisable).

    The shared ones (``img_size`` ... ``mlp_ratio``, with ``num_heads`` 8) come from
    :class:`~hq_ptq.models.layers.TransformerConfig`.
    """

    pooling_stat: str = "0111"  # DVS128 Gesture reference config; "0011" for 32-px inputs
    beta: float = 0.5  # spikingjelly tau = 2
    threshold: float = 1.0
    attn_threshold: float = 0.5

    def __post_init__(self) -> None:
        layers.check_widths(self, "MS-SPS")
        if len(self.pooling_stat) != 4 or set(self.pooling_stat) - {"0", "1"}:
            raise ValueError(
                f"pooling_stat must be 4 characters of '0'/'1' (one per MS-SPS stage), "
                f"got {self.pooling_stat!r}"
            )
        layers.check_sizes_and_neurons(self)

    @property
    def num_tokens(self) -> int:
        """Tokens for an ``img_size`` x ``img_size`` input."""
        return layers.pooled_tokens(self.img_size, self.pooling_stat.count("1"))


class MSSPS(nn.Module):
    """Membrane-shortcut spiking patch splitting."""

    def __init__(self, cfg: SDTConfig) -> None:
        super().__init__()
        self.convs, self.lifs = layers.sps_stages(cfg)
        self.pool_after = tuple(i for i, flag in enumerate(cfg.pooling_stat) if flag == "1")
        self.pool = SeqMaxPool()
        self.rpe = conv2d_bn(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(3):
            x = self.lifs[i](self.convs[i](x))
            if i in self.pool_after:
                x = self.pool(x)
        x = self.convs[3](x)
        if 3 in self.pool_after:
            x = self.pool(x)  # pooled before the LIF: the shortcut carries membrane values
        x = x + self.rpe(self.lifs[3](x))
        return x.flatten(3)  # [T, B, C, N]


class SDSA(nn.Module):
    """Spike-driven self-attention: Hadamard products and a token sum, no matrix product of spikes.

    Every operation is per channel, so heads do not change the result; ``num_heads`` only records
    the reference configuration.
    """

    def __init__(self, cfg: SDTConfig) -> None:
        super().__init__()
        self.shortcut_lif = lif(cfg.beta, cfg.threshold)
        layers.add_qkv(self, cfg)
        self.kv_lif = lif(cfg.beta, cfg.attn_threshold)
        self.proj = token_conv_bn(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shortcut_lif(x)
        q = self.q_lif(self.q(s))
        k = self.k_lif(self.k(s))
        v = self.v_lif(self.v(s))
        kv = self.kv_lif((k * v).sum(dim=-1, keepdim=True))  # [T, B, C, 1]
        return x + self.proj(q * kv)


class MSMLP(nn.Module):
    """LIF -> Conv1d + BN -> LIF -> Conv1d + BN, with a membrane shortcut."""

    def __init__(self, cfg: SDTConfig) -> None:
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.inner_residual = hidden == cfg.embed_dim  # as the reference, only when widths match
        self.fc1_lif = lif(cfg.beta, cfg.threshold)
        self.fc1 = token_conv_bn(cfg.embed_dim, hidden)
        self.fc2_lif = lif(cfg.beta, cfg.threshold)
        self.fc2 = token_conv_bn(hidden, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        h = self.fc1(self.fc1_lif(x))
        if self.inner_residual:
            h = h + identity
            identity = h
        return identity + self.fc2(self.fc2_lif(h))


class Block(nn.Module):
    def __init__(self, cfg: SDTConfig) -> None:
        super().__init__()
        self.attn = SDSA(cfg)
        self.mlp = MSMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x))


class SpikeDrivenTransformer(nn.Module):
    """Spike-driven Transformer v1 for event frames ``[T, B, C_in, H, W]`` -> ``[B, num_classes]``."""

    def __init__(self, config: SDTConfig | None = None) -> None:
        super().__init__()
        cfg = config or SDTConfig()
        layers.add_trunk(self, cfg, MSSPS(cfg), Block)
        self.head_lif = lif(cfg.beta, cfg.threshold)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_lif(layers.encode(self, x).mean(-1))  # [T, B, C] spikes
        return self.head(x).mean(0)


def _init_weights(m: nn.Module) -> None:
    # As the reference: truncated-normal conv weights, zero conv bias; Linear keeps PyTorch's default.
    layers.trunc_normal_init(m, (nn.Conv1d, nn.Conv2d))


_PRESETS: dict[str, dict[str, object]] = {
    "sdt-2-256": dict(img_size=128, embed_dim=256, num_heads=8, depth=2, mlp_ratio=4.0, pooling_stat="0111"),
    "sdt-tiny": dict(img_size=32, embed_dim=64, num_heads=4, depth=2, mlp_ratio=4.0, pooling_stat="0011"),
}

register_presets(SpikeDrivenTransformer, SDTConfig, _PRESETS)
