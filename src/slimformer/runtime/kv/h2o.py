"""H2O: heavy hitters by attention accumulated over every query."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimformer.runtime.kv.base import KVConfig, ScoreInputs, register_kv


@register_kv
@dataclass
class H2OConfig(KVConfig):
    """Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
    Language Models": keep the entries with the largest attention accumulated over all queries
    (computed here from the cached keys and the captured queries), plus the recent window."""

    name = "h2o"
    paper = "Zhang et al. 2023, H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs"
    summary = "evict by attention accumulated over every query (heavy hitters)"
    accumulates = True

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.accumulated
