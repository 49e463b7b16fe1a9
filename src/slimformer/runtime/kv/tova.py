"""TOVA: keep the entries the latest query attends to most."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimformer.runtime.kv.base import KVConfig, ScoreInputs, register_kv


@register_kv
@dataclass
class TOVAConfig(KVConfig):
    """Oren et al. 2024, "Transformers are Multi-State RNNs" (TOVA): the attention of the last
    query, averaged over the query heads of each KV head, decides."""

    name = "tova"
    paper = "Oren et al. 2024, Transformers are Multi-State RNNs"
    summary = "evict by the attention of the most recent query"
    query_window = 1

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.attention[:, :, -1, :]
