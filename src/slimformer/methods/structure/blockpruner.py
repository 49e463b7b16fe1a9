"""BlockPruner: iterative removal of attention and MLP sub-blocks by calibration perplexity.

Zhong et al., 2024, "BlockPruner: Fine-grained Pruning for Large Language Models". Every block
is split into its two sub-blocks (multi-head attention, MLP). At each step every remaining
sub-block is tentatively removed and the calibration perplexity of the resulting model measured;
the sub-block whose removal raises it least is deleted; this repeats until the removed
parameters reach the budget. A block whose two sub-blocks are both removed is dropped as a
whole. Removed sub-blocks leave the module tree and the forward pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tqdm.auto import tqdm

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, register_method
from slimformer.methods.structure.search import RemovalScorer, Shortlist, block_parameters, sublayer_parameters
from slimformer.methods.structure.sleb import check_fraction, check_rescore
from slimformer.methods.structure.sublayer_drop import SUBLAYER_KINDS

logger = logging.getLogger(__name__)


@dataclass
class BlockPrunerConfig(MethodConfig):
    """Budget: ``num_sublayers`` sub-blocks, or ``param_fraction`` of the transformer blocks'
    parameters (removal stops at the first step that reaches it), or ``num_layers`` blocks' worth
    of parameters (the average block's size times ``num_layers``: to compare with block removal
    at the same parameter count).

    ``rescore``: ``None`` re-scores every remaining sub-block at every step (the paper);
    ``k`` scores all at the first step and then re-scores only the ``k`` that cost least when
    last scored (a step costs O(k * depth) instead of O(depth^2) block passes)."""

    name = "blockpruner"
    family = "structure"
    paper = "BlockPruner: Fine-grained Pruning for Large Language Models (Zhong et al., 2024)"
    summary = "remove attention/MLP sub-blocks iteratively by calibration perplexity until a parameter budget"
    requires_calibration = True

    num_sublayers: int = 1
    param_fraction: float | None = None
    num_layers: int | None = None
    rescore: int | None = None

    def __post_init__(self) -> None:
        if not is_int_at_least(self.num_sublayers, 1):
            raise ConfigError(f"blockpruner: num_sublayers={self.num_sublayers!r} must be a positive integer", "use e.g. num_sublayers: 4")
        check_fraction("blockpruner", self.param_fraction)
        if self.num_layers is not None and not is_int_at_least(self.num_layers, 1):
            raise ConfigError(f"blockpruner: num_layers={self.num_layers!r} must be a positive integer", "use e.g. num_layers: 8")
        if self.num_layers is not None and self.param_fraction is not None:
            raise ConfigError("blockpruner: both num_layers and param_fraction are set", "give one budget")
        check_rescore("blockpruner", self.rescore, "sub-block")


@register_method(BlockPrunerConfig)
def apply_blockpruner(loaded, config: BlockPrunerConfig, ctx) -> dict:
    adapter = loaded.adapter
    total = adapter.num_layers()
    block_params = sum(block_parameters(adapter, i) for i in range(total))
    if config.num_layers is not None:
        if config.num_layers >= total:
            raise ConfigError(f"blockpruner: num_layers={config.num_layers} is not below the model's {total} blocks", f"use at most {total - 1}")
        budget = block_params * config.num_layers / total
    elif config.param_fraction is not None:
        budget = block_params * config.param_fraction
    else:
        budget = None
    blocks = list(adapter.blocks())
    index_of = {id(b): i for i, b in enumerate(blocks)}  # block -> index in the model as given
    scorer = RemovalScorer(loaded, ctx.batches(loaded.tokenizer))
    shortlist = Shortlist(config.rescore)
    removed_params = 0
    order: list[list] = []
    losses_after: list[float] = []
    scored_per_step: list[int] = []
    base = None
    bar = tqdm(desc="blockpruner", disable=not ctx.progress, unit="candidate")
    try:
        while (budget is None and len(order) < config.num_sublayers) or (budget is not None and removed_params < budget):
            now = list(adapter.blocks())
            candidates = [(id(b), k) for i, b in enumerate(now) for k in SUBLAYER_KINDS if not adapter.sublayer_removed(i, k)]
            if len(candidates) <= 1:
                raise ConfigError("blockpruner: the budget would remove every sub-block", "lower the budget")
            loss_now = scorer.refresh()
            base = loss_now if base is None else base
            position = {id(b): i for i, b in enumerate(now)}
            scored = []
            for key in shortlist.pick(candidates):
                i, k = position[key[0]], key[1]
                loss = scorer.loss_without_sublayer(i, k)
                shortlist.record(key, loss, loss_now)
                scored.append((loss, i, k))
                bar.update(1)
            scored_per_step.append(len(scored))
            loss, i, k = min(scored)
            removed_params += sublayer_parameters(adapter, i, k)
            order.append([index_of[id(now[i])], k])
            losses_after.append(loss)
            adapter.remove_sublayer(i, k)
            logger.info("blockpruner: removed %s of block %d (calibration loss %.4f, %d candidates scored)", k, order[-1][0], loss, len(scored))
    finally:
        bar.close()
    kinds: dict[int, set] = {}
    for i, k in order:
        kinds.setdefault(i, set()).add(k)
    dropped = sorted(i for i, ks in kinds.items() if len(ks) == 2)
    return {
        "dropped_layers": dropped,
        "removed_sublayers": [[i, k] for i, k in order if i not in dropped],
        "removal_order": order,
        "removed_parameters": removed_params,
        "removed_block_parameter_fraction": removed_params / block_params,
        "calibration_loss_before": base,
        "calibration_loss_after_each": losses_after,
        "candidates_scored_each_step": scored_per_step,
        "rescore": config.rescore,
        "layers_before": total,
        "layers_after": adapter.num_layers(),
    }
