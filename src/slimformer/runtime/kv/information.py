"""Keep what the model could not predict: eviction by token self-information, with a share of the
budget for what recent queries attend to."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.runtime.kv.base import KVConfig, ScoreInputs, register_kv


def _pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max over ``kernel`` neighbouring entries of ``(b, h, t)`` scores."""
    if kernel <= 1:
        return scores
    b, h, t = scores.shape
    return torch.nn.functional.max_pool1d(scores.reshape(b * h, 1, t), kernel, stride=1, padding=kernel // 2).reshape(b, h, t)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry among its head's ``t`` entries, scaled to ``[0, 1]`` (1 = highest)."""
    t = scores.shape[-1]
    ranks = scores.argsort(dim=-1).argsort(dim=-1).float()
    return ranks / max(t - 1, 1)


@register_kv
@dataclass
class InformationConfig(KVConfig):
    """Eviction by self-information, after Li et al. 2023, "Compressing Context to Enhance
    Inference Efficiency of Large Language Models" (Selective Context), which drops the context
    tokens with the least self-information ``-log p(token | context)``: what the model predicts
    from the rest carries little that the rest does not. Here the same measure scores cache
    entries: a rare fact (a name, a number, a key) is kept even when no query has asked for it
    yet, which attention-scored eviction at prefill cannot know (SnapKV's observation window sees
    only the text before the question).

    The budget is shared: ``attention_share`` of it goes to the entries the last 32 queries attend
    to most (SnapKV's observation window, which serves the continuation), the rest to the
    entries of highest self-information; both scores are max-pooled over ``kernel`` neighbours
    so a kept token comes with its context. The two selections are joined by rank: an entry is
    kept if it is within its share of either list (overlaps leave room for the next best).
    Self-information is known only after the forward has reached the output, so layers evict
    once the forward ends (see ``KVCache.end_forward``).
    """

    name = "information"
    paper = "Li et al. 2023, Compressing Context to Enhance Inference Efficiency of LLMs (Selective Context); SnapKV's window"
    summary = "keep tokens the model could not predict (self-information), plus a share for recent queries' attention"
    query_window = 32
    needs_information = True

    attention_share: float = 0.5
    kernel: int = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        share = self.attention_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
            raise ConfigError(f"information: attention_share must be in [0, 1], got {share!r}", "write e.g. attention_share: 0.5")
        if not is_int_at_least(self.kernel, 1) or self.kernel % 2 == 0:
            raise ConfigError(f"information: kernel must be an odd integer >= 1, got {self.kernel!r}", "write e.g. kernel: 7")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        info = _ranks(_pool(inputs.information.float(), self.kernel))
        if self.attention_share == 0.0:
            return info
        attention = _ranks(_pool(inputs.attention.sum(2).float(), self.kernel))
        if self.attention_share == 1.0:
            return attention
        kept = inputs.keep / inputs.information.shape[-1]  # an entry within its share of a list scores >= 1
        return torch.maximum(attention + self.attention_share * kept, info + (1.0 - self.attention_share) * kept)
