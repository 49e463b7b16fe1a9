"""No work on padding: a batch of texts of different lengths is run as length buckets, each cut
to its own longest row, so padded positions are (almost) never computed.

Rows are sorted by length and split where a new forward pass costs less than the padding it
saves (an exact dynamic programme over the sorted lengths, with a fixed cost per forward pass
in token units); the results are put back in the caller's row order. Because every row's
positions beyond its length were masked anyway, the outputs equal the padded computation up to
floating-point summation order (tested).

``widths`` (optional, from :func:`slimformer.runtime.alignment.align_widths`): ``widths[w]`` is
the width a bucket whose longest row has ``w`` tokens is run at — a few masked columns more where
this machine's attention kernel is measured to be faster at that width (it can be several times
slower at widths off its block size). The extra columns are masked, so the outputs are unchanged.

``pack_rows`` goes further where the model's attention takes packed sequences (transformers'
``cu_seq_lens_q``/``cu_seq_lens_k`` keywords; slimformer's tile attention does): all real tokens
of a batch in one row, every token-wise layer on exactly the real tokens, each sequence attending
only to itself, one forward pass per batch.

Shapes: ``input_ids``/``attention_mask`` (batch, seq); results (batch, ...).
"""

from __future__ import annotations

from typing import Callable

import torch

CALL_COST_TOKENS = 48  # the fixed cost of one more forward pass, in padded-token units
# attention implementations (transformers' names) that keep packed sequences apart through the
# cu_seq_lens_q / cu_seq_lens_k keywords: only these may run pack_rows' inputs
PACKED_ATTENTION = ("slimformer_tile",)


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


def run_width(width: int, widths: tuple[int, ...] | list[int] | None) -> int:
    """The width to run a batch whose longest row has ``width`` tokens (``widths[width]``, or
    ``width`` itself where the table does not reach)."""
    return int(widths[width]) if widths is not None and 0 <= width < len(widths) else width


def widen(batch: dict, width: int) -> dict:
    """``batch`` with its (rows, seq) tensors padded on the right to ``width`` columns: masked
    positions (``attention_mask`` 0, ids 0). Unchanged when already that wide."""
    mask = batch["attention_mask"]
    extra = width - mask.shape[1]
    if extra <= 0:
        return batch
    return {k: (torch.nn.functional.pad(v, (0, extra)) if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == mask.shape else v)
            for k, v in batch.items()}


def run_bucketed(batch: dict, fn: Callable[[dict], torch.Tensor], call_cost: int = CALL_COST_TOKENS,
                 widths: tuple[int, ...] | list[int] | None = None) -> torch.Tensor:
    """``fn`` applied to each length bucket of ``batch`` (tensors (batch, seq) trimmed to the
    bucket's longest row, then widened to ``widths`` of it when given); returns ``fn``'s per-row
    results (batch, ...) in the original order.

    A batch without padding is passed through whole (widened when ``widths`` says so).
    """
    mask = batch["attention_mask"]
    lengths = mask.sum(1).tolist()
    if not lengths or min(lengths) == mask.shape[1]:
        return fn(widen(batch, run_width(mask.shape[1], widths)))
    buckets = length_buckets([int(x) for x in lengths], call_cost)
    out = None
    for rows in buckets:
        index = torch.tensor(rows, dtype=torch.long)
        width = max(int(lengths[r]) for r in rows)
        sub = {k: (v[index, :width] if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == mask.shape else v) for k, v in batch.items()}
        result = fn(widen(sub, run_width(width, widths)))
        if out is None:
            out = result.new_empty((mask.shape[0], *result.shape[1:]))
        out[index] = result
    return out


def sequence_index(cu_seq_lens: torch.Tensor, tokens: int) -> torch.Tensor:
    """The sequence (tokens,) int64 each of ``tokens`` packed tokens belongs to, from the
    boundaries ``cu_seq_lens`` (sequences + 1,); shape-static, so it traces under ``torch.compile``."""
    return torch.searchsorted(cu_seq_lens[1:].to(torch.int64), torch.arange(tokens, device=cu_seq_lens.device), right=True)


def pack_rows(batch: dict) -> tuple[dict, torch.Tensor]:
    """The real tokens of a padded batch packed back to back into one row, FlashAttention's
    varlen layout: ``input_ids``, ``token_type_ids`` (zeros unless given) and ``position_ids``
    (each row counting from 0) of shape (1, tokens), and ``cu_seq_lens_q``/``cu_seq_lens_k``
    (rows + 1,) int64, transformers' keywords for packed sequences (each attends only to itself).
    Returns (inputs, index): ``index`` (tokens,) is each packed token's flat position in the
    (rows, seq) batch, for :func:`unpack_rows`. Rows are right-padded (real tokens first)."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1)
    index = mask.reshape(-1).nonzero().squeeze(1)
    cu = torch.zeros(mask.shape[0] + 1, dtype=torch.long)
    cu[1:] = lengths.cumsum(0)
    tokens = int(cu[-1])
    positions = torch.arange(tokens) - cu[:-1][sequence_index(cu, tokens)]
    types = batch.get("token_type_ids")
    inputs = {"input_ids": batch["input_ids"].reshape(-1)[index][None],
              "token_type_ids": (types.reshape(-1)[index] if types is not None else torch.zeros_like(index))[None],
              "position_ids": positions[None], "cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
    return inputs, index


def unpack_rows(values: torch.Tensor, index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Packed per-token ``values`` (tokens, ...) back to (rows, seq, ...) with zeros at padding."""
    out = values.new_zeros((shape[0] * shape[1], *values.shape[1:]))
    out[index] = values
    return out.reshape(*shape, *values.shape[1:])


def length_order(lengths: list[int]) -> list[int]:
    """Indices that sort texts by length (longest first), so consecutive batches hold texts of
    similar length; invert with :func:`restore_order`."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def restore_order(values: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Rows of ``values`` (n, ...) computed in ``order`` put back in the original order."""
    out = torch.empty_like(values)
    out[torch.tensor(order, dtype=torch.long)] = values
    return out
