"""Floating-point operations of a forward pass, measured by hooks on the modules that run.

Every linear layer that runs (float, quantized or factored: anything with ``in_features`` and
``out_features``) counts ``2 * rows * in * out``; every attention sub-layer that runs counts
``4 * batch * seq_q * seq_k * heads * head_dim`` for its two matrix products (scores and the
weighted sum of values). Removed sub-layers and blocks run nothing and count nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from slimformer.models.adapters import RemovedSublayer


def _has_shape(module: nn.Module) -> bool:
    return hasattr(module, "in_features") and hasattr(module, "out_features")


def _is_linear(module: nn.Module) -> bool:
    """A float linear, or a linear-like module (quantized, factored) with no linear-like module
    inside it (so that a wrapper and the layers it wraps are not counted twice)."""
    return isinstance(module, nn.Linear) or (_has_shape(module) and not any(_has_shape(c) for c in module.modules() if c is not module))


@torch.no_grad()
def forward_flops(loaded, batch: dict) -> dict:
    """FLOPs of one forward pass on ``batch`` (input_ids/attention_mask (batch, seq)):
    ``{"blocks": ..., "outside_blocks": ..., "total": ...}`` (padding tokens included)."""
    adapter = loaded.adapter
    model = loaded.model
    block_modules = {id(m) for b in adapter.blocks() for m in b.modules()}
    counts = {"blocks": 0, "outside_blocks": 0}
    handles = []

    def linear_hook(module, inputs, _output):
        x = inputs[0]
        rows = x.numel() // x.shape[-1]
        key = "blocks" if id(module) in block_modules else "outside_blocks"
        counts[key] += 2 * rows * int(module.in_features) * int(module.out_features)

    for name, module in model.named_modules():
        if _is_linear(module):
            handles.append(module.register_forward_hook(linear_hook))
    head_dim = adapter.head_dim()
    for i, block in enumerate(adapter.blocks()):
        attention = getattr(block, adapter.spec.attention)
        if isinstance(attention, RemovedSublayer):
            continue
        heads = adapter.attention_heads(i)[0]

        def attn_hook(_m, args, kwargs, _output, heads=heads):
            h = args[0] if args else kwargs["hidden_states"]
            b, s = h.shape[0], h.shape[1]
            counts["blocks"] += 4 * b * s * s * heads * head_dim

        handles.append(attention.register_forward_hook(attn_hook, with_kwargs=True))
    try:
        extra = {"use_cache": False} if loaded.kind == "causal-lm" else {}
        model(**batch, **extra)
    finally:
        for h in handles:
            h.remove()
    return {**counts, "total": counts["blocks"] + counts["outside_blocks"]}
