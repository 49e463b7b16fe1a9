"""No work on padding: a batch of texts of different lengths is run as length buckets, each cut
to its own longest row, so padded positions are (almost) never computed.

Rows are sorted by length and split where a new forward pass costs less than the padding it
saves (an exact dynamic programme over the sorted lengths, with a fixed cost per forward pass
in token units); the results are put back in the caller's row order. Because every row's
positions beyond its length were masked anyway, the outputs equal the padded computation up to
floating-point summation order (tested).

Shapes: ``input_ids``/``attention_mask`` (batch, seq); results (batch, ...).
"""

from __future__ import annotations

from typing import Callable

import torch

CALL_COST_TOKENS = 48  # the fixed cost of one more forward pass, in padded-token units


def length_buckets(lengths: list[int], call_cost: int = CALL_COST_TOKENS) -> list[list[int]]:
    """Row indices grouped into buckets minimising ``sum(rows * longest + call_cost)``.

    ``lengths``: real tokens per row. Buckets are runs of the rows sorted by length (longest
    first), each a list of original row indices.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    if n == 0:
        return []
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # bucket = sorted rows i..j-1, longest is row i
            cost = best[i] + (j - i) * lengths[order[i]] + call_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets: list[list[int]] = []
    j = n
    while j > 0:
        i = cut[j]
        buckets.append(order[i:j])
        j = i
    return buckets[::-1]


def padded_fraction(attention_mask: torch.Tensor) -> float:
    """Share of the (batch, seq) positions that are padding."""
    return 1.0 - float(attention_mask.float().mean()) if attention_mask.numel() else 0.0


def run_bucketed(batch: dict, fn: Callable[[dict], torch.Tensor], call_cost: int = CALL_COST_TOKENS) -> torch.Tensor:
    """``fn`` applied to each length bucket of ``batch`` (tensors (batch, seq) trimmed to the
    bucket's longest row); returns ``fn``'s per-row results (batch, ...) in the original order.

    A batch without padding is passed through whole.
    """
    mask = batch["attention_mask"]
    lengths = mask.sum(1).tolist()
    if not lengths or min(lengths) == mask.shape[1]:
        return fn(batch)
    buckets = length_buckets([int(x) for x in lengths], call_cost)
    out = None
    for rows in buckets:
        index = torch.tensor(rows, dtype=torch.long)
        width = max(int(lengths[r]) for r in rows)
        sub = {k: (v[index, :width] if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == mask.shape else v) for k, v in batch.items()}
        result = fn(sub)
        if out is None:
            out = result.new_empty((mask.shape[0], *result.shape[1:]))
        out[index] = result
    return out


def length_order(lengths: list[int]) -> list[int]:
    """Indices that sort texts by length (longest first), so consecutive batches hold texts of
    similar length; invert with :func:`restore_order`."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def restore_order(values: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Rows of ``values`` (n, ...) computed in ``order`` put back in the original order."""
    out = torch.empty_like(values)
    out[torch.tensor(order, dtype=torch.long)] = values
    return out
