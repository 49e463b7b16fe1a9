"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimformer.errors import ConfigError, is_int_at_least


@dataclass
class SamplingConfig:
    """``temperature == 0`` is greedy (argmax); otherwise sample from softmax(logits / T) kept to
    the ``top_k`` most likely tokens and the smallest set whose probability reaches ``top_p``.
    ``seed`` makes sampling reproducible (a private ``torch.Generator``; the global RNG is untouched)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature!r} must be a number >= 0", "use 0 for greedy decoding, e.g. 0.7 for sampling")
        if self.top_k is not None and not is_int_at_least(self.top_k, 1):
            raise ConfigError(f"top_k={self.top_k!r} must be an integer >= 1", "pass e.g. top_k=50, or leave it unset")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p={self.top_p!r} must lie in (0, 1]", "pass e.g. top_p=0.9, or leave it unset")
        if self.seed is not None and not is_int_at_least(self.seed, 0):
            raise ConfigError(f"seed={self.seed!r} must be an integer >= 0", "pass e.g. seed=0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else torch.seed())
        return gen


def filtered_probs(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Probabilities (batch, vocab) float32 after temperature, top-k and top-p (non-greedy only)."""
    logits = logits.float() / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= config.top_p  # keep the first token always
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def next_tokens(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (batch,) int64 from ``logits`` (batch, vocab)."""
    if config.greedy:
        return logits.argmax(-1)
    return torch.multinomial(filtered_probs(logits, config), 1, generator=generator).squeeze(-1)
