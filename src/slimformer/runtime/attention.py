"""Attention for decode steps: a few query tokens against a long (static) cache.

PyTorch's CPU ``scaled_dot_product_attention`` runs a flash kernel built for many queries; for
one query token per sequence it spends most of its time on set-up (measured on a 2-core AMD
EPYC, AVX2: ~260 us per SmolLM2 layer for 9 heads x 256 cached slots, a fifth of a bfloat16
decode step). For few queries this module computes attention with slimformer's decode-attention
kernel (:mod:`slimformer.kernels.decode_attention`: one call per layer, grouped-query heads
sharing each key read, slots no query attends to skipped) where it is built, else as two batched
matmuls with the grouped-query heads folded into the query axis (no ``repeat_kv`` copy of the
cache) and a float32 softmax, which Inductor fuses inside the compiled decode step. The matmul
form cost ~90 us per SmolLM2 layer on a 2-core Xeon with AMX, mostly set-up (a quarter of an
8-bit decode step). Longer inputs (prefill) go to transformers' SDPA function unchanged.

Registered with transformers' ``AttentionInterface`` as ``"slimformer_decode"``; use
:func:`use_decode_attention` to switch a model (or a weight-sharing view of it) to it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from slimformer.kernels import decode_attention as decode_kernel
from slimformer.models.adapters import attention_implementation, set_attention

NAME = "slimformer_decode"
MAX_DECODE_QUERIES = 16  # queries per sequence up to which the matmul form is used


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """``query`` (batch, heads, q, d), ``key``/``value`` (batch, kv_heads, slots, d) with
    ``heads`` a multiple of ``kv_heads``; ``attention_mask`` additive (batch, 1, q, slots) or
    boolean (True = attend), or None. Returns (batch, q, heads, d) in ``query.dtype``, as
    transformers' attention functions do."""
    b, h, q, d = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    if q > MAX_DECODE_QUERIES or dropout or h % kv_heads or (attention_mask is None and q > 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    group = h // kv_heads
    scale = d**-0.5 if scaling is None else scaling
    mask = None if attention_mask is None else attention_mask[:, :, -q:, -slots:]
    if decode_kernel.loaded() and decode_kernel.supports(query, key, value) and (
            mask is None or (mask.dtype in (torch.bool, torch.float32) and mask.shape[1] == 1)):
        if mask is not None:
            mask = mask.expand(b, 1, q, slots)
        return decode_kernel.decode_attention(query, key, value, mask, scale), None
    scores = torch.matmul(query.reshape(b, kv_heads, group * q, d), key.transpose(-1, -2)).float() * scale
    scores = scores.view(b, kv_heads, group, q, slots)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask[:, :, None], torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask[:, :, None].float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(b, kv_heads, group * q, slots)
    out = torch.matmul(probs, value).view(b, h, q, d)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, decode_attention)
# transformers builds no mask at all for an attention name its mask interface does not know (a
# 2-D padding mask would be dropped): SDPA's mask builder gives the boolean masks handled above
AttentionMaskInterface.register(NAME, sdpa_mask)


def switch_attention(model: torch.nn.Module, name: str, switchable_from: tuple[str, ...] = ("sdpa", "eager")) -> bool:
    """Set ``model``'s attention implementation to ``name`` (in place) if it runs one of
    ``switchable_from`` and can switch; returns False, changing nothing, otherwise."""
    if attention_implementation(model) not in (*switchable_from, name):
        return False
    return set_attention(model, name)


def use_decode_attention(model: torch.nn.Module) -> bool:
    """Switch ``model``'s attention layers to :func:`decode_attention` (in place; pass a
    weight-sharing view such as ``generation.shared_copy(model)`` to leave the user's model
    alone). Returns False, changing nothing, for models that cannot switch attention functions.
    Builds (once per machine) and loads the decode-attention kernel it uses where it can."""
    decode_kernel.load()
    return switch_attention(model, NAME)
