"""Token-pruning rates chosen on calibration text under a quality floor.

DiffRate (Chen et al., 2023, "DiffRate: Differentiable Compression Rate for Efficient Vision
Transformers") learns each layer's pruning/merging rate under a FLOP budget instead of fixing it
by hand. This is its discrete, training-free counterpart for our encoders: starting from no
pruning, lower one candidate layer's keep ratio (by any multiple of ``step``) at a time — the move
that saves the most cost per unit of embedding cosine lost on the calibration text — while the
mean cosine to the unpruned model's embeddings stays at or above ``target_cos``.

The cost is measured, not assumed (``cost="time"``, the default): each candidate move is timed
against the current setting in ``repeats`` interleaved rounds of passes over the calibration
batches on this machine (the median of the per-round ratios), and must save at least
``min_gain`` of the current time. Counting FLOPs alone (``cost="flops"``) favours many
mild pruning points, and each costs more than its FLOPs: the importance scores, the gather, a
new attention mask and, compiled, one more graph boundary. Measured on a 2-core Xeon with AMX
(bf16 MiniLM, 258 documents of training text, floor 0.99): by FLOPs the search pruned after
blocks 1-4 keeping 80/90/90/90 % (0.84 of the block FLOPs), which, compiled, encoded held-out
text at 3.55x fp32 against 4.51x without pruning.

A mean cosine does not protect what embedding users rank by: pruning that keeps cos 0.98 can
reorder near neighbours (measured on held-out licences and release notes, top-10 retrieval
agreement 0.81 at cos 0.98). ``target_top10`` adds a second floor: each calibration text's 10
nearest other calibration texts must overlap at least that much, on average, with the
unpruned model's.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from slimformer.methods.dynamic.runtime import DynamicEncoder
from slimformer.methods.dynamic.token_reduction import TokenPruner
from slimformer.timing import interleaved_times


@contextlib.contextmanager
def _reducers_added(loaded, reducers: dict[int, TokenPruner]):
    """``reducers`` added to the model's own dynamic settings for the duration."""
    settings = loaded.dynamic
    saved = {layer: list(r) for layer, r in settings.reducers.items()}
    for layer, reducer in reducers.items():
        settings.reducers.setdefault(layer, []).append(reducer)
    try:
        yield
    finally:
        settings.reducers.clear()
        settings.reducers.update(saved)


def _embed_pass(loaded, batches: list[dict], reducers: dict[int, TokenPruner]) -> tuple[list[torch.Tensor], float]:
    """Normalised embeddings (one (batch, dim) tensor per batch) and block FLOPs with ``reducers``."""
    with _reducers_added(loaded, reducers):
        runner = DynamicEncoder(loaded)
        out, flops = [], 0.0
        for batch in batches:
            emb, stats = runner.embed(batch, return_stats=True)
            out.append(F.normalize(emb, dim=-1))
            flops += stats.flops
    return out, flops


def neighbour_agreement(reference: torch.Tensor, trial: torch.Tensor, k: int = 10) -> float:
    """Mean over rows of |k nearest other rows under ``trial`` ∩ under ``reference``| / k;
    embeddings (n, dim) L2-normalised. 1.0 when there are fewer than 2 rows."""
    n = reference.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return 1.0
    eye = torch.eye(n, dtype=torch.bool)
    ra = (reference @ reference.t()).masked_fill(eye, -2.0).topk(k, dim=1).indices
    rb = (trial @ trial.t()).masked_fill(eye, -2.0).topk(k, dim=1).indices
    hits = (ra[:, :, None] == rb[:, None, :]).any(-1).float().sum(1) / k
    return float(hits.mean())


def _time_ratio(loaded, batches: list[dict], trial: dict[int, TokenPruner], current: dict[int, TokenPruner], repeats: int) -> float:
    """Median over ``repeats`` interleaved rounds of (seconds of a pass with ``trial``) / (seconds
    of a pass with ``current``); both settings have just run, so no warm-up."""

    def run(reducers):
        with _reducers_added(loaded, reducers):
            runner = DynamicEncoder(loaded)
            for batch in batches:
                runner.embed(batch)

    return interleaved_times(lambda: run(trial), lambda: run(current), repeats, warmup=False)[2]


def search_keep_ratios(loaded, batches: list[dict], layers: tuple[int, ...], target_cos: float, floor: float, step: float,
                       score: str, schedule: str, min_tokens: int, cost: str = "time", repeats: int = 3, min_gain: float = 0.02,
                       progress=None, target_top10: float | None = None, fuse: bool = False) -> dict:
    """Greedy per-layer keep ratios (see the module docstring). Returns ``keep`` (layer -> ratio,
    only layers that prune), the calibration ``cos`` and ``top10`` (neighbour agreement, see
    :func:`neighbour_agreement`; None without ``target_top10``), ``cost_ratio`` (the chosen setting's cost
    against no pruning: the product of the accepted moves' measured time ratios, or FLOPs),
    ``flops_ratio``, and the accepted ``path`` of moves."""

    def pruners(keep: dict[int, float]) -> dict[int, TokenPruner]:
        return {l: TokenPruner(k, score, schedule, min_tokens, fuse) for l, k in keep.items() if k < 1.0}

    reference, base_flops = _embed_pass(loaded, batches, {})
    reference_all = torch.cat(reference)
    keep = {l: 1.0 for l in layers}
    cos, current, flops = 1.0, 1.0, 1.0
    top10 = 1.0 if target_top10 is not None else None
    path = []
    while True:
        best = None
        for layer in layers:
            # every lower ratio of this layer, not only the next step: one pruning point has a
            # fixed cost, so a single mild step may save nothing while a deeper cut does
            lower = round(keep[layer] - step, 6)
            while lower >= floor - 1e-9:
                trial = {**keep, layer: lower}
                emb, trial_flops = _embed_pass(loaded, batches, pruners(trial))
                c = float(torch.cat([(a * b).sum(-1) for a, b in zip(emb, reference)]).mean())
                f = trial_flops / base_flops if base_flops else 1.0
                if progress is not None:
                    progress.update(1)
                if c < target_cos:
                    break  # lower ratios of this layer lose more
                t = neighbour_agreement(reference_all, torch.cat(emb)) if target_top10 is not None else None
                if t is not None and t < target_top10:
                    break
                # the move's cost against the current setting: measured (interleaved) or counted
                k = current * (_time_ratio(loaded, batches, pruners(trial), pruners(keep), repeats) if cost == "time" else f / flops)
                gain = (current - k) / max(cos - c, 1e-9)
                if k <= current * (1 - min_gain) and (best is None or gain > best[0]):
                    best = (gain, trial, c, t, k, f)
                lower = round(lower - step, 6)
        if best is None:
            break
        _, keep, cos, top10, current, flops = best
        path.append({"keep": {str(l): k for l, k in keep.items()}, "cos": cos, "top10": top10, "cost_ratio": current, "flops_ratio": flops})
    return {"keep": {l: k for l, k in keep.items() if k < 1.0}, "cos": cos, "top10": top10, "cost": cost, "cost_ratio": current,
            "flops_ratio": flops, "path": path}
