"""Encoder attention through the AMX tile kernel, taken where it is measured faster.

:func:`tile_attention_forward` is a transformers attention function (registered with
``AttentionInterface`` as ``"slimformer_tile"``, with SDPA's mask builder) that runs
:mod:`slimformer.kernels.tile_attention` on the heads it takes (bf16, head size a multiple of 32,
at most 1024 keys, no dropout, no gradients, an explicit mask or a non-causal module) and hands
everything else to transformers' SDPA function unchanged.

:func:`choose_attention` decides by measurement: it times one of the model's own blocks (its
planned layers included) at several batch widths with SDPA and with the tile kernel, interleaved,
and switches the model to the tile kernel only if that is at least ``min_gain`` faster per row
over those widths. Timings are cached on disk per machine signature (beside the planner's), so
the comparison runs once per machine, block and dtype. The execution planner calls it for
encoders; :func:`restore_attention` undoes the switch.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from slimformer.kernels import tile_attention as kernel
from slimformer.runtime.machine import signature
from slimformer.runtime.measurements import PlanCache, default_cache_dir

NAME = "slimformer_tile"
WIDTHS = (16, 32, 64, 96, 128)  # batch widths the choice is timed at (capped by the model's length)


def tile_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """``query`` (batch, heads, q, d), ``key``/``value`` (batch, heads, k, d), ``attention_mask``
    bool (True = attend) or additive, (batch, 1, q, k), or None. Returns (batch, q, heads, d), as
    transformers' attention functions do."""
    usable = (
        kernel.supports(query, key, value)
        and not (dropout and module.training)
        and not kwargs.get("output_attentions")
        and kwargs.get("softcap") is None
        and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))
        and (attention_mask is not None or not getattr(module, "is_causal", False))
        and (attention_mask is None or attention_mask.dim() == 4)
        and kernel.loaded()  # switched to only where it loaded (use_tile_attention)
    )
    if not usable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    return kernel.tile_attention(query, key, value, attention_mask, scale), None


AttentionInterface.register(NAME, tile_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def current_attention(model: torch.nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def use_tile_attention(model: torch.nn.Module) -> bool:
    """Switch ``model``'s attention to :func:`tile_attention_forward` (in place). Returns False,
    changing nothing, where the kernel is unavailable or the model cannot switch."""
    if not kernel.available() or not hasattr(model, "set_attn_implementation") or current_attention(model) not in ("sdpa", "eager", NAME):
        return False
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError, AttributeError):
        return False
    return True


def restore_attention(model: torch.nn.Module, implementation: str = "sdpa") -> None:
    """Put ``model`` back on ``implementation`` if it runs the tile kernel."""
    if current_attention(model) == NAME:
        model.set_attn_implementation(implementation)


def _time_block(loaded, widths: tuple[int, ...], tokens: int, repeats: int) -> dict[str, dict[int, float]]:
    """Seconds per row of one block at each width, with SDPA and with the tile kernel
    (rounds interleave the two and the widths)."""
    from slimformer.runtime.alignment import block_call

    model = loaded.model
    before = current_attention(model)
    block = loaded.adapter.blocks()[0]
    calls = {w: block_call(loaded, block, w, tokens) for w in widths}
    samples: dict[str, dict[int, list[float]]] = {"sdpa": {w: [] for w in widths}, NAME: {w: [] for w in widths}}
    try:
        with torch.no_grad():
            for r in range(repeats + 1):  # round 0 warms up
                for impl in ("sdpa", NAME):
                    model.set_attn_implementation(impl)
                    for w, (call, rows) in calls.items():
                        start = time.perf_counter()
                        call()
                        if r:
                            samples[impl][w].append((time.perf_counter() - start) / rows)
    finally:
        model.set_attn_implementation(before)
    return {impl: {w: statistics.median(v) for w, v in per.items()} for impl, per in samples.items()}


def choose_attention(loaded, max_length: int = 128, tokens: int = 1024, repeats: int = 3, min_gain: float = 0.05,
                     cache: bool = True, cache_dir: str | None = None) -> dict:
    """Time SDPA and the tile kernel on one of ``loaded``'s blocks and switch to the faster (see
    the module docstring). Returns ``chosen`` (``"sdpa"`` or ``"slimformer_tile"``),
    ``seconds_per_row`` per implementation and width, ``cached``, and ``reason`` when the tile
    kernel was not timed (unavailable here, or the model's attention does not fit it)."""
    model = loaded.model
    out: dict = {"chosen": current_attention(model), "seconds_per_row": None, "cached": False, "reason": None}
    if getattr(loaded, "kind", None) != "encoder":
        out["reason"] = "attention is chosen for encoders"
        return out
    if not kernel.available():
        out["reason"] = f"tile kernel unavailable: {kernel.unavailable_reason()}"
        return out
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    dtype = next((p.dtype for p in loaded.adapter.blocks()[0].parameters() if p.is_floating_point()), torch.float32)
    if not heads or config.hidden_size % heads or (config.hidden_size // heads) % kernel.HEAD_MULTIPLE or dtype != torch.bfloat16:
        out["reason"] = "the kernel takes bf16 heads whose size is a multiple of 32"
        return out
    if current_attention(model) not in ("sdpa", NAME):
        out["reason"] = f"the model runs {current_attention(model)!r} attention"
        return out
    positions = getattr(config, "max_position_embeddings", None)
    max_length = min(max_length, positions) if positions else max_length
    widths = tuple(w for w in WIDTHS if w <= max_length) or (max_length,)
    from slimformer.runtime.alignment import block_key

    key = json.dumps({"attention": 1, "block": block_key(loaded, loaded.adapter.blocks()[0], max_length, tokens), "widths": widths,
                      "kernel": kernel.library_path().name})
    store = PlanCache(Path(cache_dir) if cache_dir else default_cache_dir(), signature(), prefix="attention") if cache else None
    found = store.get(key) if store is not None else None
    if found is None:
        measured = _time_block(loaded, widths, tokens, repeats)
        found = {impl: {str(w): s for w, s in per.items()} for impl, per in measured.items()}
        if store is not None:
            store.put(key, found)
            store.save()
    else:
        out["cached"] = True
    total = {impl: sum(per.values()) for impl, per in found.items()}
    out["seconds_per_row"] = found
    if total[NAME] <= (1 - min_gain) * total["sdpa"]:
        use_tile_attention(model)
    else:
        restore_attention(model)
    out["chosen"] = current_attention(model)
    return out
