"""SnapKV: attention of an observation window of recent queries, pooled over neighbours."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.runtime.kv.base import KVConfig, ScoreInputs, register_kv


@register_kv
@dataclass
class SnapKVConfig(KVConfig):
    """Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation": the
    attention of the last 32 queries, summed, then max-pooled over ``kernel`` neighbouring
    entries so that kept entries come with their context."""

    name = "snapkv"
    paper = "Li et al. 2024, SnapKV: LLM Knows What You are Looking for Before Generation"
    summary = "evict by observation-window attention, pooled over neighbours"
    query_window = 32

    kernel: int = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_int_at_least(self.kernel, 1) or self.kernel % 2 == 0:
            raise ConfigError(f"snapkv: kernel must be an odd integer >= 1, got {self.kernel!r}", "write e.g. kernel: 7")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        s = inputs.attention.sum(2)  # (b, h, t)
        if self.kernel > 1:
            b, h, t = s.shape
            s = torch.nn.functional.max_pool1d(s.reshape(b * h, 1, t), self.kernel, stride=1, padding=self.kernel // 2).reshape(b, h, t)
        return s
