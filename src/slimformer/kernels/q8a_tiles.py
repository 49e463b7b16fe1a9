"""Few-row linears from 4/8-bit codes in channel tiles: ``torch.ops.slimformer.q8a_tiles_linear``.

The numerics of ``packed_linear_q8a`` (activations rounded to int8 per block of 32 columns, as
llama.cpp's CPU kernels do; the dequantized weight times the rounded activations in float32
arithmetic), computed from a run-time copy of the codes laid out for AVX-512 VNNI
(``q8a_tiles.cpp``): the codes of 16 output channels interleaved four columns per 32-bit lane, so
that one 64-byte load serves 16 channels for every row of the call. The stored-layout kernel's
arithmetic grows with every row; this one's mostly does not, which is what a speculative verify
step (2-8 tokens) needs. It holds the copy (the codes' bytes, plus two float32 per group and
channel for the scales and offsets), so it is a candidate path of the execution planner
(``packed-q8a-tiles``), timed against the others on the machine at hand, never a default.

:func:`pack` builds the copy from the stored buffers (the conventions of
:func:`slimformer.kernels.packed_linear`: codes ``(out, in*bits/8)`` uint8, 4-bit two per byte
with the low nibble first; per group bf16/fp16 scales and uint8 zero points, an implicit zero
point ``2^(bits-1)``, or fp16 minima). Built like the other kernels (:mod:`slimformer.kernels`),
usable only where the CPU has AVX-512 VNNI (:func:`available`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from slimformer import kernels as kernels_lib

SOURCE = Path(__file__).with_name("q8a_tiles.cpp")
FLAGS = kernels_lib.FLAGS
TILE = 16  # output channels per tile


def _cpu_reason() -> str | None:
    reason = kernels_lib._cpu_supports()
    if reason is None and not kernels_lib.has_vnni():
        return "the CPU lacks AVX-512 VNNI"
    return reason


def _after_load() -> None:
    @torch.library.register_fake("slimformer::q8a_tiles_linear")
    def _(x, tiles, scales, offsets, bits, group_size, out_features, bias):
        return x.new_empty((x.shape[0], out_features))


LIBRARY = kernels_lib.KernelLibrary("q8a_tiles", SOURCE, FLAGS, _cpu_reason, _after_load)

# The module's interface to its library (see ``kernels.KernelLibrary``).
library_path, load, loaded, unavailable_reason, version = (LIBRARY.path, LIBRARY.load, LIBRARY.loaded, LIBRARY.unavailable_reason,
                                                           LIBRARY.version)
available = load


def supports(bits: int, group_size: int, in_features: int) -> bool:
    """Whether the layout can be tiled: 4 or 8 bits, width and group size multiples of 32."""
    return bits in (4, 8) and in_features % 32 == 0 and group_size % 32 == 0 and in_features % group_size == 0


@dataclass
class Tiles:
    """The run-time copy: ``tiles`` uint8 (out/16, steps, 16, 4), ``scales`` and ``offsets``
    float32 (out/16, groups, 16) (out features padded to a multiple of 16 with zeros)."""

    tiles: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    bits: int
    group_size: int
    out_features: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.tiles, self.scales, self.offsets))


def _unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    if bits == 8:
        return qweight
    low, high = qweight & 0x0F, qweight >> 4
    return torch.stack((low, high), dim=-1).reshape(qweight.shape[0], -1)[:, :in_features]


def _interleave(t: torch.Tensor, padded: int) -> torch.Tensor:
    """(out, groups) float -> (out/16, groups, 16) float32, padded rows 0."""
    out, groups = t.shape
    full = torch.zeros(padded, groups, dtype=torch.float32)
    full[:out] = t.float()
    return full.reshape(padded // TILE, TILE, groups).transpose(1, 2).contiguous()


def pack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int,
         in_features: int, mins: torch.Tensor | None = None) -> Tiles:
    """The tiled copy of stored codes (see the module docstring for the conventions)."""
    if not supports(bits, group_size, in_features):
        raise ValueError(f"q8a tiles take 4/8-bit codes with width and group size multiples of 32, got {bits} bits, "
                         f"group {group_size}, width {in_features}")
    out = qweight.shape[0]
    padded = -(-out // TILE) * TILE
    codes = torch.zeros(padded, in_features, dtype=torch.uint8)
    codes[:out] = _unpack_codes(qweight, bits, in_features)
    if bits == 8:  # (tiles, 16, K/4, 4) -> (tiles, K/4, 16, 4)
        tiles = codes.reshape(padded // TILE, TILE, in_features // 4, 4).transpose(1, 2).contiguous()
    else:  # step s: columns 8s..8s+3 in the low nibbles, 8s+4..8s+7 in the high ones
        c = codes.reshape(padded // TILE, TILE, in_features // 8, 2, 4)
        packed = c[:, :, :, 0, :] | (c[:, :, :, 1, :] << 4)
        tiles = packed.transpose(1, 2).contiguous()
    s = scales.float()
    if mins is not None:
        offsets = mins.float()
    else:
        z = zeros.float() if zeros is not None else torch.full_like(s, float(2 ** (bits - 1)))
        offsets = -(z * s)
    return Tiles(tiles, _interleave(s, padded), _interleave(offsets, padded), bits, group_size, out)


def linear(x: torch.Tensor, tiles: Tiles, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (..., in) of any float dtype -> (..., out) in ``x.dtype`` (computed in float32).
    Call :func:`load` first."""
    rows = x.reshape(-1, x.shape[-1]).float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    y = torch.ops.slimformer.q8a_tiles_linear(rows, tiles.tiles, tiles.scales, tiles.offsets, tiles.bits, tiles.group_size,
                                             tiles.out_features, b)
    return y.reshape(*x.shape[:-1], tiles.out_features).to(x.dtype)
