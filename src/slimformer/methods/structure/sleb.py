"""SLEB: greedy elimination of transformer blocks, re-scored after every removal.

Song et al., 2024, "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of
Transformer Blocks". At each step every remaining block is tentatively removed and the
calibration loss of the resulting model is measured (next-token NLL, i.e. log perplexity, for
causal LMs; relative error of the final hidden states for encoders); the block whose removal
costs least is deleted, and the next step re-scores the remaining blocks on the model without
it. Unlike a one-shot ranking (ShortGPT), a block that was redundant only together with an
already-removed neighbour is not removed too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tqdm.auto import tqdm

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, register_method
from slimformer.methods.structure.search import RemovalScorer, Shortlist

logger = logging.getLogger(__name__)


def resolve_count(method: str, num: int, fraction: float | None, total: int, what: str) -> int:
    """How many of ``total`` items to remove: ``round(fraction * total)`` or ``num``."""
    n = int(round(fraction * total)) if fraction is not None else num
    if n < 1:
        raise ConfigError(f"{method}: fraction={fraction} of {total} {what} removes nothing", "raise the fraction")
    if n >= total:
        raise ConfigError(f"{method}: cannot remove {n} of the model's {total} {what}", f"remove at most {total - 1}")
    return n


def check_block_list(method: str, layers, num_layers) -> tuple[tuple[int, ...], int]:
    """Validate ``layers`` (block indices, may be empty) and ``num_layers``; returns ``(layers
    as a tuple, the count to remove)``: ``len(layers)`` when given, else ``num_layers``."""
    layers = tuple(layers)
    if layers:
        if not all(is_int_at_least(i, 0) for i in layers):
            raise ConfigError(f"{method}: layers={list(layers)} must be non-negative block indices", "write e.g. layers: [3, 4]")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"{method}: layers={list(layers)} repeats an index", "list each block once")
        num_layers = len(layers)
    if not is_int_at_least(num_layers, 1):
        raise ConfigError(f"{method}: num_layers={num_layers!r} must be a positive integer", "use e.g. num_layers: 2")
    return layers, num_layers


def check_blocks_exist(method: str, layers, total: int) -> None:
    bad = [i for i in layers if i >= total]
    if bad:
        raise ConfigError(f"{method}: block {bad[0]} does not exist (the model has {total})", f"use indices 0..{total - 1}")


def check_fraction(method: str, fraction: float | None) -> None:
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0):
        raise ConfigError(f"{method}: fraction={fraction!r} must be a number in (0, 1)", "use e.g. fraction: 0.25")


def check_rescore(method: str, rescore: int | None, candidates: str = "block") -> None:
    """``rescore``: None (re-score every candidate at every step) or a positive shortlist size."""
    if rescore is not None and not is_int_at_least(rescore, 1):
        raise ConfigError(f"{method}: rescore={rescore!r} must be a positive integer or null", f"use e.g. rescore: 8, or null to re-score every {candidates}")


@dataclass
class SLEBConfig(MethodConfig):
    """``num_layers``: how many blocks to remove, or ``fraction`` of the blocks (rounded).

    ``rescore``: ``None`` re-scores every remaining block at every step (the paper); ``k``
    scores all at the first step and then re-scores only the ``k`` blocks whose removal cost
    least when last scored (a step costs O(k * depth) instead of O(depth^2) block passes)."""

    name = "sleb"
    family = "structure"
    paper = "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of Transformer Blocks (Song et al., 2024)"
    summary = "remove blocks greedily, re-scoring the calibration perplexity after every removal"
    requires_calibration = True

    num_layers: int = 1
    fraction: float | None = None
    rescore: int | None = None

    def __post_init__(self) -> None:
        if not is_int_at_least(self.num_layers, 1):
            raise ConfigError(f"sleb: num_layers={self.num_layers!r} must be a positive integer", "use e.g. num_layers: 2")
        check_fraction("sleb", self.fraction)
        check_rescore("sleb", self.rescore)


@register_method(SLEBConfig)
def apply_sleb(loaded, config: SLEBConfig, ctx) -> dict:
    adapter = loaded.adapter
    total = adapter.num_layers()
    n = resolve_count("sleb", config.num_layers, config.fraction, total, "blocks")
    scorer = RemovalScorer(loaded, ctx.batches(loaded.tokenizer))
    shortlist = Shortlist(config.rescore)
    original = list(range(total))  # current block index -> index in the model as given
    order: list[int] = []
    losses_after: list[float] = []
    scored_per_step: list[int] = []
    first_step: list[float] | None = None
    base = None
    bar = tqdm(desc="sleb", disable=not ctx.progress, unit="candidate")
    try:
        for _ in range(n):
            loss_now = scorer.refresh()
            base = loss_now if base is None else base
            now = list(adapter.blocks())
            position = {id(b): i for i, b in enumerate(now)}
            scored = []
            for key in shortlist.pick([id(b) for b in now]):
                loss = scorer.loss_without_block(position[key])
                shortlist.record(key, loss, loss_now)
                scored.append((loss, position[key]))
                bar.update(1)
            if first_step is None:
                first_step = [loss for loss, _ in scored]
            scored_per_step.append(len(scored))
            loss, best = min(scored)
            adapter.drop_blocks([best])
            order.append(original.pop(best))
            losses_after.append(loss)
            logger.info("sleb: removed block %d (calibration loss %.4f, %d candidates scored)", order[-1], loss, len(scored))
    finally:
        bar.close()
    return {
        "dropped_layers": sorted(order),
        "removal_order": order,
        "criterion": "nll" if scorer.causal else "relative-hidden-error",
        "calibration_loss_before": base,
        "calibration_loss_after_each": losses_after,
        "first_step_losses": first_step,
        "candidates_scored_each_step": scored_per_step,
        "rescore": config.rescore,
        "layers_before": total,
        "layers_after": total - n,
    }
