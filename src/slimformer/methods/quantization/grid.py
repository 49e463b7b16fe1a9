"""Uniform integer quantization grids: scales and zero points per (row, group), codes, packing.

Conventions used everywhere in slimformer:

- a weight ``w`` of shape ``(rows, cols)`` is split along ``cols`` into groups of ``group_size``
  columns (``None``: one group per row, i.e. per-channel);
- ``scale`` and ``zero`` have shape ``(rows, groups)``; codes are unsigned integers in
  ``[0, 2**bits - 1]`` and dequantize to ``(code - zero) * scale``;
- symmetric grids have ``zero = 2**(bits-1)`` and ``scale = absmax / (2**(bits-1) - 1)``;
  asymmetric grids use an integer zero point so that 0.0 is exactly representable;
- scales are rounded up to bfloat16 before codes are computed, because bfloat16 is what is
  stored and what the CPU low-bit kernels consume: the stored grid is the grid that was
  optimised, and rounding up keeps the whole range representable (error within one step).
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
# Widths the packed format stores exactly (any width packs as a bit stream, :func:`pack_codes`)
# and unpacks per call; the per-layer search offers them as levels. The methods' own configs
# keep to SUPPORTED_BITS, the widths with kernels and GGUF types.
PACKED_BITS = (2, 3, 4, 5, 6, 7, 8)


def num_groups(cols: int, group_size: int | None) -> int:
    return 1 if group_size is None else cols // group_size


def effective_group_size(cols: int, group_size: int | None) -> int:
    return cols if group_size is None else group_size


def round_up_to_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 values >= ``x`` (positive float32), returned as float32."""
    down = x.to(torch.bfloat16)
    up = torch.nextafter(down.float().to(torch.bfloat16), torch.tensor(float("inf"), dtype=torch.bfloat16))
    return torch.where(down.float() >= x, down.float(), up.float())


def grid_params(
    w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, shrink: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scales and zero points for ``w`` (rows, cols) -> ``(scale, zero)`` (rows, groups).

    ``shrink`` (scalar or (rows, groups)) multiplies the range, for clipping searches.
    """
    rows, cols = w.shape
    g = effective_group_size(cols, group_size)
    wg = w.float().reshape(rows, cols // g, g)
    qmax = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        absmax = wg.abs().amax(-1) * shrink
        scale = absmax / (half - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scale = round_up_to_bfloat16(scale)
        zero = torch.full_like(scale, float(half))
        return scale, zero
    lo = wg.amin(-1).clamp(max=0) * shrink
    hi = wg.amax(-1).clamp(min=0) * shrink
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = round_up_to_bfloat16(scale)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def search_shrink(
    w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, importance: torch.Tensor | None = None,
    candidates: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75),
) -> torch.Tensor:
    """Per-group range shrink (rows, groups) that minimises the round-to-nearest error of ``w``.

    The error of column j is weighted by ``importance[j]`` (cols,), e.g. the Hessian diagonal
    (mean squared input of the column): clipping trades a larger error on rare outliers for a
    finer grid on the bulk of each group. Candidates are tried in order; ties keep the larger
    range, so ``candidates=(1.0,)`` is plain min-max.
    """
    rows, cols = w.shape
    g = effective_group_size(cols, group_size)
    groups = cols // g
    wf = w.float()
    imp = torch.ones(cols) if importance is None else importance.float().clamp(min=0)
    imp = imp.reshape(1, groups, g)
    best_err = torch.full((rows, groups), float("inf"))
    best = torch.ones(rows, groups)
    for c in candidates:
        scale, zero = grid_params(wf, bits, group_size, symmetric, shrink=c)
        dq = dequantize_codes(quantize_codes(wf, scale, zero, bits), scale, zero)
        err = ((dq - wf).reshape(rows, groups, g) ** 2 * imp).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, c), best)
    return best


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (rows, cols) uint8 of ``w`` (rows, cols) on the grid ``scale``/``zero`` (rows, groups)."""
    rows, cols = w.shape
    groups = scale.shape[1]
    wg = w.float().reshape(rows, groups, cols // groups)
    q = torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    return q.clamp(0, 2**bits - 1).to(torch.uint8).reshape(rows, cols)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Float32 weight (rows, cols) from codes (rows, cols) and ``scale``/``zero`` (rows, groups)."""
    rows, cols = codes.shape
    groups = scale.shape[1]
    q = codes.float().reshape(rows, groups, cols // groups)
    return ((q - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)).reshape(rows, cols)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of ``w`` (rows, cols); for error measurements."""
    scale, zero = grid_params(w, bits, group_size, symmetric)
    return dequantize_codes(quantize_codes(w, scale, zero, bits), scale, zero)


# --------------------------------------------------------------------------------------------
# Bit packing: codes (rows, cols) of ``bits`` bits -> (rows, ceil(cols * bits / 8)) uint8.
# Rows are packed independently so that a row (an embedding vector) can be gathered alone.
# Within a row, value j occupies bits [j*bits, (j+1)*bits) of the little-endian bit stream.
# --------------------------------------------------------------------------------------------


def packed_row_bytes(cols: int, bits: int) -> int:
    return math.ceil(cols * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (rows, cols) with values < 2**bits into (rows, packed_row_bytes) uint8."""
    rows, cols = codes.shape
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    if 8 % bits == 0:
        per_byte = 8 // bits
        pad = (-cols) % per_byte
        c = torch.nn.functional.pad(codes, (0, pad)).reshape(rows, -1, per_byte).to(torch.int32)
        shifts = torch.arange(per_byte, dtype=torch.int32) * bits
        return (c << shifts).sum(-1).to(torch.uint8)
    bit_index = torch.arange(bits, dtype=torch.uint8)
    stream = ((codes.unsqueeze(-1) >> bit_index) & 1).reshape(rows, cols * bits)
    pad = (-stream.shape[1]) % 8
    stream = torch.nn.functional.pad(stream, (0, pad)).reshape(rows, -1, 8).to(torch.int32)
    return (stream << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (rows, packed_row_bytes) uint8 -> codes (rows, cols) uint8."""
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :cols]
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
        vals = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return vals.reshape(rows, -1)[:, :cols]
    bitsarr = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    stream = bitsarr.reshape(rows, -1)[:, : cols * bits].reshape(rows, cols, bits)
    return (stream << torch.arange(bits, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
