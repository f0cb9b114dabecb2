"""``nn.MultiheadAttention`` with its projections as four plain ``nn.Linear`` layers, which can be quantized.

``torch.nn.MultiheadAttention`` never calls a Linear module: ``F.multi_head_attention_forward`` reads its
``in_proj_weight`` (q, k and v packed) and ``out_proj.weight`` directly, so a quantizer attached to
``out_proj`` would be bypassed and the packed input projection is not a layer at all. In a transformer those
are a third of the weights. :func:`split_attention` replaces every ``nn.MultiheadAttention`` (the exact type;
a subclass may have its own forward) by a :class:`SplitMultiheadAttention` holding ``q_proj``, ``k_proj``,
``v_proj`` and ``out_proj``: the same weights, the same forward signature and the same arithmetic as torch's
slow path after the projections, so outputs agree with the original to float rounding. Every hq_ptq entry
point that looks for layers (``analyze``, ``quantize``, ``apply_plan`` and so ``load``, ``swap_layers``, DNAS,
the baselines) calls it first, so a plan names ``<attn>.q_proj`` ... ``<attn>.out_proj``.

Kept separate rather than one packed ``in_proj`` so that cross-attention (different query and key inputs)
needs no slicing, and so the search can give q, k and v their own bits.

What differs from torch's module, by design or by limitation:
- q, k and v get new Parameters (cut from ``in_proj_weight``; ``requires_grad`` carried over); an optimizer
  built before the split does not hold them. ``out_proj`` and ``bias_k``/``bias_v`` are the same objects.
- An ``nn.TransformerEncoder`` in eval mode under ``no_grad`` with a ``src_key_padding_mask`` packs its
  input into nested tensors and returns 0 at padded positions; split from the encoder (or above), it takes
  the regular path, which computes those positions (torch's own grad-enabled path does the same). The
  unpadded positions agree.
- An attention with hooks of its own (forward hooks, ``torch.nn.utils.prune``) is not split, since the split
  module would drop them: it stays float32 and :func:`hq_ptq.swap.float_layers` names it.
- ``torch.jit.script`` and ``torch.fx.symbolic_trace`` do not take the split module (``torch.export``,
  ``torch.jit.trace`` and the ONNX exports do).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init

__all__ = ["SplitMultiheadAttention", "split_attention"]


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """torch's mask convention: a bool mask is True where attention is *not* allowed (→ -inf), a float
    mask is added to the scores as it is."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"attention masks must be bool or float, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


class SplitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s forward, with q/k/v/out projections as ``nn.Linear`` children.

    Build it with :meth:`from_float`. ``in_proj_bias`` is always None: torch's ``TransformerEncoderLayer``
    fast path would otherwise read ``in_proj_weight`` and run the float attention kernel, bypassing the
    projections (their quantizers included); with None it calls this module, as it does for ``bias=False``.
    """

    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False  # no packed in_proj here, whatever the dimensions

    def __init__(self, embed_dim: int, num_heads: int, *, kdim: int, vdim: int, bias: bool, dropout: float,
                 batch_first: bool, add_zero_attn: bool, bias_k: nn.Parameter | None = None,
                 bias_v: nn.Parameter | None = None, device=None, dtype=None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim, vdim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        # uninitialised (skip_init): from_float fills them, and a split must not draw from the global RNG
        made = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = skip_init(nn.Linear, embed_dim, embed_dim, **made)
        self.k_proj = skip_init(nn.Linear, kdim, embed_dim, **made)
        self.v_proj = skip_init(nn.Linear, vdim, embed_dim, **made)
        self.out_proj = skip_init(nn.Linear, embed_dim, embed_dim, **made)
        self.bias_k, self.bias_v = bias_k, bias_v

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> SplitMultiheadAttention:
        """The same attention with ``mha``'s weights (copied: the packed ``in_proj_weight`` is cut in three;
        ``out_proj`` and ``bias_k``/``bias_v`` are shared), in ``mha``'s training mode."""
        w = mha.out_proj.weight
        split = cls(mha.embed_dim, mha.num_heads, kdim=mha.kdim, vdim=mha.vdim,
                    bias=mha.in_proj_bias is not None, dropout=mha.dropout, batch_first=mha.batch_first,
                    add_zero_attn=mha.add_zero_attn, bias_k=mha.bias_k, bias_v=mha.bias_v,
                    device=w.device, dtype=w.dtype)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                weights = mha.in_proj_weight.chunk(3)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
            for proj, weight, bias in zip((split.q_proj, split.k_proj, split.v_proj), weights, biases):
                proj.weight.copy_(weight)
                proj.weight.requires_grad_(weight.requires_grad)  # a frozen attention stays frozen
                if bias is not None:
                    proj.bias.copy_(bias)
                    proj.bias.requires_grad_(bias.requires_grad)
        split.out_proj.weight = mha.out_proj.weight
        split.out_proj.bias = mha.out_proj.bias
        split.train(mha.training)
        return split

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward`` (torch's slow path, which its fast path matches)."""
        if query.is_nested:
            raise ValueError(
                "SplitMultiheadAttention got a nested tensor: the enclosing nn.TransformerEncoder packs its "
                "input for a fast path the split attention does not take; set its use_nested_tensor = False "
                "(hq_ptq does when it splits the encoder or a module above it)"
            )
        batched = query.dim() == 3
        if batched and self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if not batched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, _ = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        key_padding_mask = _float_mask(key_padding_mask, query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "is_causal=True needs attn_mask (e.g. nn.Transformer.generate_square_subsequent_mask)"
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        else:
            attn_mask = _float_mask(attn_mask, query.dtype)
            if key_padding_mask is not None:
                is_causal = False
        src_len = key.shape[0]
        if attn_mask is not None:  # torch's checks: a wrong mask must not broadcast silently
            want = (tgt_len, src_len) if attn_mask.dim() == 2 else (bsz * heads, tgt_len, src_len)
            if tuple(attn_mask.shape) != want:
                raise RuntimeError(f"the {attn_mask.dim()}-D attn_mask has shape {tuple(attn_mask.shape)}, "
                                   f"but should be {want}")
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (bsz, src_len):
            raise RuntimeError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, but should be "
                               f"{(bsz, src_len)}")

        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros(bsz * heads, 1, head_dim, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[1]
        if key_padding_mask is not None:
            pad = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
            pad = pad.reshape(bsz * heads, 1, src_len)
            attn_mask = pad if attn_mask is None else attn_mask + pad
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            scores = q * math.sqrt(1.0 / head_dim)
            scores = (torch.bmm(scores, k.transpose(-2, -1)) if attn_mask is None
                      else torch.baddbmm(attn_mask, scores, k.transpose(-2, -1)))
            weights = scores.softmax(dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, self.embed_dim)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            if attn_mask is not None:
                attn_mask = (attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1
                             else attn_mask.view(bsz, heads, -1, src_len))
            out = F.scaled_dot_product_attention(
                q.view(bsz, heads, tgt_len, head_dim), k.view(bsz, heads, src_len, head_dim),
                v.view(bsz, heads, src_len, head_dim), attn_mask, dropout_p, is_causal,
            )
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, self.embed_dim)
            weights = None
        out = self.out_proj(out).view(tgt_len, bsz, -1)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, h) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                              "_backward_pre_hooks", "_state_dict_hooks",
                                              "_load_state_dict_pre_hooks"))


def splittable(name: str, module: nn.Module) -> bool:
    """An attention :func:`split_attention` replaces: the exact ``nn.MultiheadAttention`` type, not the
    model itself (it cannot be replaced in place), without hooks of its own (the split would drop them)."""
    return bool(name) and type(module) is nn.MultiheadAttention and not _has_hooks(module)


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def split_attention(model: nn.Module, wanted: Callable[[str], bool] | None = None) -> list[str]:
    """Replace every splittable ``nn.MultiheadAttention`` in ``model`` (in place) by a
    :class:`SplitMultiheadAttention` with the same weights; returns their names. Calling it again does
    nothing. A module registered under several names is replaced under all of them.

    Args:
        wanted: split only an attention for which ``wanted("<attn>.<projection>")`` is true for one of its
            projections (q_proj, k_proj, v_proj, out_proj): e.g. the layer globs, or a plan's names, so a
            plan or packed file from before hq_ptq split attention (which left it float) still applies.
    """
    found = {}
    for name, m in model.named_modules():
        if splittable(name, m) and (wanted is None or any(wanted(f"{name}.{p}") for p in PROJECTIONS)):
            found[id(m)] = SplitMultiheadAttention.from_float(m)
    names = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in found:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, found[id(module)])
            names.append(name)
    # a TransformerEncoder decided at construction whether to pack inputs as nested tensors for its fast
    # path; the split layers take the regular path, which needs regular tensors
    if names:
        for module in model.modules():
            if isinstance(module, nn.TransformerEncoder):
                module.use_nested_tensor = False
    return names
