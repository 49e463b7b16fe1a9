"""Storage formats of a compressed KV cache: bit-packed integer codes with per-group scales.

A ``PackedTensor`` holds codes of ``bits`` bits packed into ``uint8`` (4 codes a byte at 2 bits,
2 at 4 bits, 1 at 8), plus an asymmetric ``scale`` and ``zero`` per group, stored in float16.
Groups run along one axis of a ``(batch, heads, tokens, head_dim)`` block:

- ``axis="token"`` groups ``group`` consecutive tokens of one channel (KIVI's per-channel keys:
  one scale per channel per block of tokens);
- ``axis="channel"`` groups ``group`` consecutive channels of one token (KIVI's per-token values).

``nbytes`` counts every tensor kept (codes, scales, zeros), so bytes are measured, not assumed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

PACKABLE_BITS = (2, 4, 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last axis into ``uint8``.

    codes: ``(..., n)`` with ``n * bits`` a multiple of 8 -> ``(..., n * bits // 8)`` uint8.
    """
    per_byte = 8 // bits
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    out = c[..., 0].clone()
    for i in range(1, per_byte):
        out |= c[..., i] << (bits * i)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: ``(..., m)`` uint8 -> ``(..., m * 8 // bits)`` uint8 codes."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & mask).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


@dataclass
class PackedTensor:
    """Asymmetric uniform quantization of a ``(batch, heads, tokens, head_dim)`` block.

    ``codes``: uint8, codes packed along ``head_dim``; ``scale``/``zero``: float16, one per group
    (broadcastable to the block after reshaping, see ``dequantize``); ``bits``, ``group``,
    ``axis`` say what the storage is, so a mismatch fails loudly.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group: int
    axis: str
    shape: tuple[int, int, int, int]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    @property
    def tokens(self) -> int:
        return self.shape[2]


def concat_tokens(first: PackedTensor, second: PackedTensor) -> PackedTensor:
    """One ``PackedTensor`` holding ``first``'s tokens then ``second``'s (same bits, group, axis,
    heads and head_dim): codes, scales and zeros are all laid out token-major, so a cache keeps
    one block per layer and dequantizes it in one pass per step instead of one per block."""
    if (first.bits, first.group, first.axis) != (second.bits, second.group, second.axis) or first.shape[:2] + first.shape[3:] != second.shape[:2] + second.shape[3:]:
        raise ValueError("cannot concatenate packed blocks of different formats or shapes")
    b, h, t, d = first.shape
    return PackedTensor(torch.cat([first.codes, second.codes], dim=2), torch.cat([first.scale, second.scale], dim=2),
                        torch.cat([first.zero, second.zero], dim=2), first.bits, first.group, first.axis, (b, h, t + second.shape[2], d))


def _grouped(x: torch.Tensor, group: int, axis: str) -> torch.Tensor:
    b, h, t, d = x.shape
    if axis == "token":  # (b, h, t/g, g, d): statistics over the g tokens of each channel
        return x.reshape(b, h, t // group, group, d)
    return x.reshape(b, h, t, d // group, group)  # (b, h, t, d/g, g): over the g channels of each token


def quantize(x: torch.Tensor, bits: int, group: int, axis: str) -> PackedTensor:
    """Quantize ``x`` ``(batch, heads, tokens, head_dim)`` to ``bits`` with groups of ``group``
    along ``axis``; the tokens (``axis="token"``) or channels must divide by ``group``."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}, got {bits}")
    b, h, t, d = x.shape
    xf = x.float()
    g = _grouped(xf, group, axis)
    red = -2 if axis == "token" else -1
    lo = g.amin(dim=red, keepdim=True)
    hi = g.amax(dim=red, keepdim=True)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8).to(torch.float16)
    zero = lo.to(torch.float16)
    q = torch.round((g - zero.float()) / scale.float()).clamp_(0, qmax)
    codes = pack_codes(q.reshape(b, h, t, d), bits)
    return PackedTensor(codes, scale, zero, bits, group, axis, (b, h, t, d))


def dequantize(p: PackedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(batch, heads, tokens, head_dim)`` in ``dtype`` from a ``PackedTensor``."""
    b, h, t, d = p.shape
    q = unpack_codes(p.codes, p.bits).reshape(b, h, t, d).to(torch.float32)
    g = _grouped(q, p.group, p.axis)
    x = g * p.scale.float() + p.zero.float()
    return x.reshape(b, h, t, d).to(dtype)


def max_error(p: PackedTensor) -> torch.Tensor:
    """The grid's bound on ``|x - dequantize(quantize(x))|``: half a step (plus float16 rounding of
    the scale and zero), per group, broadcast to the block ``(batch, heads, tokens, head_dim)``."""
    b, h, t, d = p.shape
    ones = torch.ones(b, h, t, d)
    return (_grouped(ones, p.group, p.axis) * (p.scale.float() * 0.5)).reshape(b, h, t, d)


@functools.lru_cache(maxsize=8)
def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Hadamard matrix ``(n, n)`` (Sylvester construction); ``n`` a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {n}")
    m = torch.ones(1, 1)
    while m.shape[0] < n:
        m = torch.cat([torch.cat([m, m], 1), torch.cat([m, -m], 1)], 0)
    return m / math.sqrt(n)
