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

from dataclasses import dataclass

from tqdm.auto import tqdm

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, register_method
from slimformer.methods.structure.search import RemovalScorer


def resolve_count(method: str, num: int, fraction: float | None, total: int, what: str) -> int:
    """How many of ``total`` items to remove: ``round(fraction * total)`` or ``num``."""
    n = int(round(fraction * total)) if fraction is not None else num
    if n < 1:
        raise ConfigError(f"{method}: fraction={fraction} of {total} {what} removes nothing", "raise the fraction")
    if n >= total:
        raise ConfigError(f"{method}: cannot remove {n} of the model's {total} {what}", f"remove at most {total - 1}")
    return n


def check_fraction(method: str, fraction: float | None) -> None:
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0):
        raise ConfigError(f"{method}: fraction={fraction!r} must be a number in (0, 1)", "use e.g. fraction: 0.25")


@dataclass
class SLEBConfig(MethodConfig):
    """``num_layers``: how many blocks to remove, or ``fraction`` of the blocks (rounded)."""

    name = "sleb"
    family = "structure"
    paper = "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of Transformer Blocks (Song et al., 2024)"
    summary = "remove blocks greedily, re-scoring the calibration perplexity after every removal"
    requires_calibration = True

    num_layers: int = 1
    fraction: float | None = None

    def __post_init__(self) -> None:
        if not is_int_at_least(self.num_layers, 1):
            raise ConfigError(f"sleb: num_layers={self.num_layers!r} must be a positive integer", "use e.g. num_layers: 2")
        check_fraction("sleb", self.fraction)


@register_method(SLEBConfig)
def apply_sleb(loaded, config: SLEBConfig, ctx) -> dict:
    adapter = loaded.adapter
    total = adapter.num_layers()
    n = resolve_count("sleb", config.num_layers, config.fraction, total, "blocks")
    scorer = RemovalScorer(loaded, ctx.batches(loaded.tokenizer))
    original = list(range(total))  # current block index -> index in the model as given
    order: list[int] = []
    losses_after: list[float] = []
    first_step: list[float] | None = None
    base = None
    bar = tqdm(total=sum(total - s for s in range(n)), desc="sleb", disable=not ctx.progress, unit="candidate")
    try:
        for _ in range(n):
            loss_now = scorer.refresh()
            base = loss_now if base is None else base
            losses = []
            for i in range(adapter.num_layers()):
                losses.append(scorer.loss_without_block(i))
                bar.update(1)
            if first_step is None:
                first_step = losses
            best = min(range(len(losses)), key=losses.__getitem__)
            adapter.drop_blocks([best])
            order.append(original.pop(best))
            losses_after.append(losses[best])
    finally:
        bar.close()
    return {
        "dropped_layers": sorted(order),
        "removal_order": order,
        "criterion": "nll" if scorer.causal else "relative-hidden-error",
        "calibration_loss_before": base,
        "calibration_loss_after_each": losses_after,
        "first_step_losses": first_step,
        "layers_before": total,
        "layers_after": total - n,
    }
