"""StreamingLLM: attention sinks plus the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimformer.runtime.kv.base import KVConfig, ScoreInputs, register_kv


@register_kv
@dataclass
class StreamingLLMConfig(KVConfig):
    """Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks": keep the
    first ``sinks`` tokens and the most recent ones."""

    name = "streaming-llm"
    paper = "Xiao et al. 2024, Efficient Streaming Language Models with Attention Sinks"
    summary = "keep attention sinks and the most recent tokens"

    sinks: int = 4

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        b, h, t, _ = inputs.keys.shape
        return torch.arange(t, device=inputs.keys.device, dtype=torch.float32).expand(b, h, t)
