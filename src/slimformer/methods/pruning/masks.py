"""Keep-masks from importance scores: unstructured (per layer or per output row) and N:M."""

from __future__ import annotations

import re

import torch

from slimformer.errors import ConfigError


def parse_nm(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: keep N of every M consecutive weights along the input dimension."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m:
        raise ConfigError(f"N:M pattern {pattern!r} is malformed", "write it as \"2:4\" or \"4:8\"")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ConfigError(f"N:M pattern {pattern!r} must keep 0 < N < M weights", "use e.g. \"2:4\"")
    return n, mm


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Bool keep-mask (out, in): drop the ``sparsity`` fraction of lowest ``scores`` (out, in),
    over the whole matrix or within each output row. Exactly ``round(sparsity * count)`` are dropped."""
    if per_row:
        k = int(round(sparsity * scores.shape[1]))
        mask = torch.ones_like(scores, dtype=torch.bool)
        if k:
            idx = torch.topk(scores, k, dim=1, largest=False).indices
            mask.scatter_(1, idx, False)
        return mask
    k = int(round(sparsity * scores.numel()))
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    if k:
        idx = torch.topk(scores.reshape(-1), k, largest=False).indices
        mask[idx] = False
    return mask.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool keep-mask (out, in) keeping the ``n`` highest ``scores`` in every ``m`` consecutive
    input columns of each row; ``in`` must be divisible by ``m``."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.reshape(rows, cols)
