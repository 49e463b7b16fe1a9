"""Token-pruning rates chosen on calibration text under a quality floor.

DiffRate (Chen et al., 2023, "DiffRate: Differentiable Compression Rate for Efficient Vision
Transformers") learns each layer's pruning/merging rate under a FLOP budget instead of fixing it
by hand. This is its discrete, training-free counterpart for our encoders: starting from no
pruning, lower one candidate layer's keep ratio by one ``step`` at a time — the move that saves
the most block FLOPs per unit of embedding cosine lost on the calibration text — while the mean
cosine to the unpruned model's embeddings stays at or above ``target_cos``. Each trial is one
pass of the dynamic runtime over the calibration batches (FLOPs counted by the runtime), so the
search costs about ``layers × (1 - floor) / step`` passes per accepted move.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimformer.methods.dynamic.runtime import DynamicEncoder
from slimformer.methods.dynamic.token_reduction import TokenPruner


def _measure(loaded, batches: list[dict], reducers: dict[int, TokenPruner]) -> tuple[list[torch.Tensor], float]:
    """Embeddings (one (batch, dim) tensor per batch) and block FLOPs with ``reducers`` added to
    the model's own dynamic settings for the duration of the pass."""
    settings = loaded.dynamic
    saved = {layer: list(r) for layer, r in settings.reducers.items()}
    for layer, reducer in reducers.items():
        settings.reducers.setdefault(layer, []).append(reducer)
    try:
        runner = DynamicEncoder(loaded)
        out, flops = [], 0.0
        for batch in batches:
            emb, stats = runner.embed(batch, return_stats=True)
            out.append(F.normalize(emb, dim=-1))
            flops += stats.flops
    finally:
        settings.reducers.clear()
        settings.reducers.update(saved)
    return out, flops


def search_keep_ratios(loaded, batches: list[dict], layers: tuple[int, ...], target_cos: float, floor: float, step: float,
                       score: str, schedule: str, min_tokens: int, progress=None) -> dict:
    """Greedy per-layer keep ratios (see the module docstring). Returns ``keep`` (layer -> ratio,
    only layers that prune), the calibration ``cos`` and ``flops_ratio`` (block FLOPs against no
    pruning), and the accepted ``path`` of moves."""

    def pruners(keep: dict[int, float]) -> dict[int, TokenPruner]:
        return {l: TokenPruner(k, score, schedule, min_tokens) for l, k in keep.items() if k < 1.0}

    reference, base_flops = _measure(loaded, batches, {})

    def evaluate(keep: dict[int, float]) -> tuple[float, float]:
        emb, flops = _measure(loaded, batches, pruners(keep))
        cos = torch.cat([(a * b).sum(-1) for a, b in zip(emb, reference)]).mean()
        return float(cos), flops / base_flops if base_flops else 1.0

    keep = {l: 1.0 for l in layers}
    cos, flops = 1.0, 1.0
    path = []
    while True:
        best = None
        for layer in layers:
            lower = round(keep[layer] - step, 6)
            if lower < floor - 1e-9:
                continue
            trial = {**keep, layer: lower}
            c, f = evaluate(trial)
            if progress is not None:
                progress.update(1)
            if c < target_cos or f >= flops:
                continue
            gain = (flops - f) / max(cos - c, 1e-9)
            if best is None or gain > best[0]:
                best = (gain, trial, c, f)
        if best is None:
            break
        _, keep, cos, flops = best
        path.append({"keep": {str(l): k for l, k in keep.items()}, "cos": cos, "flops_ratio": flops})
    return {"keep": {l: k for l, k in keep.items() if k < 1.0}, "cos": cos, "flops_ratio": flops, "path": path}
