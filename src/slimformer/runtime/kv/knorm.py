"""Key-norm eviction: keep the entries whose keys have the smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimformer.runtime.kv.base import KVConfig, ScoreInputs, register_kv


@register_kv
@dataclass
class KnormConfig(KVConfig):
    """Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression": low key norm goes with high attention, so the lowest norms are kept."""

    name = "knorm"
    paper = "Devoto et al. 2024, A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
    summary = "evict the entries with the largest key norms"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return -inputs.keys.float().norm(dim=-1)
