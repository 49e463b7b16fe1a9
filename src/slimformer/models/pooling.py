"""Sentence embeddings from hidden states: the pooling an embedding model was trained with."""

from __future__ import annotations

import torch


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool hidden states (batch, seq, dim) over valid tokens ``mask`` (batch, seq) -> (batch, dim)."""
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
