"""Encoder attention through the tile kernel (AMX, or its AVX512-BF16 form where the CPU has no
AMX: ``kernel.FORM``), taken where it is measured faster.

:func:`tile_attention_forward` is a transformers attention function (registered with
``AttentionInterface`` as ``"slimformer_tile"``, with SDPA's mask builder) that runs
:mod:`slimformer.kernels.tile_attention` on the heads it takes (bf16, head size a multiple of 32,
at most 1024 keys, no dropout, no gradients, an explicit mask or a non-causal module) and hands
everything else to transformers' SDPA function unchanged.

:func:`choose_attention` decides by measurement: it times the model's own ``embed`` (its planned
layers included) on a batch of rows of mixed lengths, as embedding workloads have, with SDPA (rows
bucketed by length), with the tile kernel (bucketed), and with the tile kernel on *packed* rows
(every real token of the batch in one row, each sequence attending only to itself:
:func:`slimformer.models.batching.pack_rows`, ``loaded.packing``), interleaved, and switches to
the fastest only if it is at least ``min_gain`` faster than SDPA. Timings are cached on disk per
machine signature (beside the planner's), so the comparison runs once per machine, model shape
and dtype. The execution planner calls it for encoders; :func:`restore_attention` undoes the
switch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from slimformer.kernels import tile_attention as kernel
from slimformer.models.batching import sequence_index
from slimformer.models.adapters import attention_implementation
from slimformer.runtime.attention import switch_attention
from slimformer.runtime.machine import signature
from slimformer.runtime.measurements import PlanCache, default_cache_dir
from slimformer.timing import interleaved_medians

NAME = "slimformer_tile"


def tile_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """``query`` (batch, heads, q, d), ``key``/``value`` (batch, heads, k, d), ``attention_mask``
    bool (True = attend) or additive, (batch, 1, q, k), or None. Returns (batch, q, heads, d), as
    transformers' attention functions do. With ``cu_seq_lens_q`` (= ``cu_seq_lens_k``; transformers'
    packed-sequence keywords) the single batch row holds sequences back to back, each attending
    only to itself (:func:`slimformer.models.batching.pack_rows` builds such inputs); the mask is then
    None or an additive bias per key, (1, 1, 1, tokens), the same for every query (the log-size of
    merged tokens, as the dynamic runtime passes for proportional attention)."""
    packed = kwargs.get("cu_seq_lens_q")
    if packed is not None:
        return _packed_attention(module, query, key, value, attention_mask, packed, kwargs.get("cu_seq_lens_k"), dropout, scaling, **kwargs)
    usable = (
        _kernel_takes(module, query, key, value, dropout, packed=False)
        and not kwargs.get("output_attentions")
        and kwargs.get("softcap") is None
        and (attention_mask is not None or not getattr(module, "is_causal", False))
        and (attention_mask is None or attention_mask.dim() == 4)
    )
    if not usable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    return kernel.tile_attention(query, key, value, attention_mask, scale), None


def _kernel_takes(module, query, key, value, dropout: float, packed: bool) -> bool:
    """The heads fit the kernel, nothing needs what it does not do (dropout in training,
    gradients), and it loaded (models are switched to it only where it did)."""
    return (kernel.supports(query, key, value, packed=packed) and not (dropout and module.training)
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)) and kernel.loaded())


def _packed_attention(module, query, key, value, key_bias, cu_q, cu_k, dropout, scaling, **kwargs):
    """Packed sequences on the kernel, or (where it does not take them) SDPA with the
    block-diagonal mask that keeps each sequence to itself. ``key_bias``: None or additive
    (1, 1, 1, tokens)."""
    if query.shape[0] != 1 or cu_k is None or cu_k is not cu_q and not torch.equal(cu_k, cu_q) or query.shape[2] != key.shape[2]:
        raise ValueError("packed attention: one row of sequences with the same boundaries for queries and keys (cu_seq_lens_q = cu_seq_lens_k)")
    tokens = query.shape[2]
    if key_bias is not None and (key_bias.dtype == torch.bool or key_bias.numel() != tokens):
        raise ValueError("packed attention: the mask must be None or an additive bias per key, (1, 1, 1, tokens)")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if _kernel_takes(module, query, key, value, dropout, packed=True):
        return kernel.tile_attention_packed(query, key, value, cu_q, scale, key_bias), None
    segment = sequence_index(cu_q, tokens)
    mask = (segment[:, None] == segment[None, :])[None, None]
    if key_bias is not None:
        mask = torch.where(mask, key_bias.reshape(1, 1, 1, tokens).to(query.dtype), torch.finfo(query.dtype).min)
    rest = {k: v for k, v in kwargs.items() if k not in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scale, **rest)


def tile_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                        attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """transformers' SDPA mask, except for one row with no padding and no cache: no mask. That
    row is one sequence (it attends to all of itself) or sequences packed back to back, whose
    boundaries :func:`tile_attention_forward` takes from ``cu_seq_lens_q``; transformers >= 5.25
    reads the restarting ``position_ids`` of packed rows as packing and would otherwise build a
    (tokens, tokens) block mask on every forward (6 ms for 2472 tokens), under ``torch.compile``
    too. (The planner puts encoders only on the kernel; a causal model's row would run SDPA with
    ``is_causal``, as SDPA's own mask allows, and a sliding window, ``local_size``, keeps its mask.)"""
    if (batch_size == 1 and attention_mask is None and q_length == kv_length and not q_offset and not kv_offset
            and kwargs.get("local_size") is None):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(NAME, tile_attention_forward)
AttentionMaskInterface.register(NAME, tile_attention_mask)


def use_tile_attention(model: torch.nn.Module) -> bool:
    """Switch ``model``'s attention to :func:`tile_attention_forward` (in place). Returns False,
    changing nothing, where the kernel is unavailable or the model cannot switch."""
    return kernel.available() and switch_attention(model, NAME)


def restore_attention(model: torch.nn.Module, implementation: str = "sdpa") -> None:
    """Put ``model`` back on ``implementation`` if it runs the tile kernel."""
    if attention_implementation(model) == NAME:
        model.set_attn_implementation(implementation)


CANDIDATES = (("sdpa", False), (NAME, False), (NAME, True))  # (attention, packing)


def label(attention: str, packing: bool) -> str:
    return ("tiles" if attention == NAME else attention) + (", packed" if packing else "")


def mixed_batch(loaded, rows: int, max_length: int, seed: int = 0) -> dict:
    """A tokenized-like batch of ``rows`` random-id rows whose lengths spread evenly from
    ``max_length / 16`` to ``max_length`` (right-padded), the mix an embedding workload has."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(getattr(loaded.model.config, "vocab_size", 1000))
    low = max(2, max_length // 16)
    lengths = [low + round(i * (max_length - low) / max(1, rows - 1)) for i in range(rows)]
    ids = torch.randint(min(1000, vocab // 2), vocab, (rows, max_length), generator=g)
    mask = (torch.arange(max_length)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _time_candidates(loaded, batch: dict, repeats: int) -> dict[str, float]:
    """Median seconds of ``loaded.embed(batch)`` with each candidate (interleaved rounds; the
    switch to a candidate is not timed)."""
    model = loaded.model
    before, packing_before = attention_implementation(model), loaded.packing

    def switch(attention: str, packing: bool) -> None:
        model.set_attn_implementation(attention)
        loaded.packing = packing

    try:
        with torch.no_grad():
            return interleaved_medians({label(*c): lambda: loaded.embed(batch) for c in CANDIDATES}, repeats,
                                       setup={label(*c): (lambda c=c: switch(*c)) for c in CANDIDATES})
    finally:
        switch(before, packing_before)


def choose_attention(loaded, max_length: int = 128, rows: int = 32, repeats: int = 3, min_gain: float = 0.05,
                     cache: bool = True, cache_dir: str | None = None) -> dict:
    """Time ``embed`` of a mixed-length batch (:func:`mixed_batch`) with SDPA, with the tile
    kernel, and with the tile kernel on packed rows (``loaded.packing``), and switch ``loaded``
    to the fastest if it is at least ``min_gain`` faster than SDPA (see the module docstring).
    Returns ``chosen`` (the attention implementation), ``packing``, ``seconds`` per candidate,
    ``cached``, and ``reason`` when the kernel was not timed (unavailable here, or the model's
    attention does not fit it)."""
    model = loaded.model
    out: dict = {"chosen": attention_implementation(model), "packing": bool(loaded.packing), "seconds": None, "cached": False, "reason": None,
                 "form": kernel.FORM}
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
    if attention_implementation(model) not in ("sdpa", NAME):
        out["reason"] = f"the model runs {attention_implementation(model)!r} attention"
        return out
    positions = getattr(config, "max_position_embeddings", None)
    max_length = min(max_length, positions) if positions else max_length
    from slimformer.runtime.alignment import block_key

    key = json.dumps({"attention": 2, "block": block_key(loaded, loaded.adapter.blocks()[0], max_length, rows), "layers": len(loaded.adapter.blocks()),
                      "rows": rows, "kernel": kernel.library_path().name})
    store = PlanCache(Path(cache_dir) if cache_dir else default_cache_dir(), signature(), prefix="attention") if cache else None
    found = store.get(key) if store is not None else None
    if found is None:
        found = _time_candidates(loaded, mixed_batch(loaded, rows, max_length), repeats)
        if store is not None:
            store.put(key, found)
            store.save()
    else:
        out["cached"] = True
    out["seconds"] = found
    best = min(CANDIDATES, key=lambda c: found[label(*c)])
    if best[0] == NAME and found[label(*best)] <= (1 - min_gain) * found[label("sdpa", False)]:
        use_tile_attention(model)
        loaded.packing = best[1]
    else:
        restore_attention(model)
        loaded.packing = False
    out["chosen"], out["packing"] = attention_implementation(model), bool(loaded.packing)
    return out
