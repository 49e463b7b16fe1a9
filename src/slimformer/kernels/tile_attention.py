"""Encoder attention on Intel AMX tiles (or their AVX512-BF16 emulation): ``torch.ops.slimformer.tile_attention``.

``softmax(q k^T * scale + mask) v`` for bfloat16 heads whose size is a multiple of 32 and up to
:data:`MAX_KEYS` keys (``tile_attention.cpp``). Per (batch, head) the scores of 16 queries against
16 keys are one AMX tile product (32 head dims per product), the softmax runs in AVX-512 on rows
kept in cache (float32; the probabilities rounded to bf16 before the product with ``v``, as
PyTorch's SDPA does in bf16), and keys after the last one any query may attend to are not
computed at all (a short row in a padded batch costs its own length). Outputs match
``scaled_dot_product_attention`` in bf16 to its own rounding (tested).

Why: PyTorch's CPU flash kernel is built for long sequences and large heads; on MiniLM's 12 heads
of 32 at 16-128 positions it ran at ~0.2 TFLOP/s on a 2-core Xeon with AMX and took a third of a
compiled bf16 encoder's time, while the block's linears ran at ~1.8 TFLOP/s. Measured there (32 rows,
12 heads of 32): 128 positions 3.2 -> 2.5 ms, 48 positions 1.0 -> 0.4 ms, 16 positions 0.30 -> 0.09 ms;
with four tile products in flight and the softmax rows in registers, 128 positions 2.65 -> 2.1 ms
and 67 positions 1.15 -> 1.05 ms (same machine, later session).
Whether it is faster on the machine at hand is measured by the execution planner
(:mod:`slimformer.runtime.tile_attention`), not assumed.

With ``cu_seqlens`` (:func:`tile_attention_packed`) it takes sequences packed back to back in one
row, FlashAttention's varlen layout: a batch of texts then runs with no padding at all.

Built like the other kernels (:mod:`slimformer.kernels`: compiled once per machine and torch into
the kernel cache), with AVX-512 and AMX flags where the CPU reports AMX tiles and AVX512-BF16 (the
first call asks Linux for the tile state, ``arch_prctl``); where it has AVX512-BF16 but no AMX,
the same source is built with every tile product done by ``VDPBF16PS`` on tiles emulated in
memory (:data:`FORM` says which). Elsewhere :func:`available` is False and attention stays with
SDPA.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimformer import kernels as kernels_lib

SOURCE = Path(__file__).with_name("tile_attention.cpp")
_AVX512 = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-fopenmp", "-fPIC", "-shared", "-std=c++17", "-w"]
FLAGS = _AVX512 + ["-mamx-tile", "-mamx-bf16"]
# The same source without AMX: each tile product done by AVX512-BF16 dot products on tiles
# emulated in memory (``SLIMFORMER_TILE_EMULATION`` in tile_attention.cpp), for CPUs with
# AVX512-BF16 and no AMX (AMD EPYC Zen 4, Intel Cooper Lake).
FLAGS_AVX512 = _AVX512 + ["-DSLIMFORMER_TILE_EMULATION"]
MAX_KEYS = 1024
HEAD_MULTIPLE = 32


def _avx512_bf16_reason() -> str | None:
    reason = kernels_lib._cpu_supports()  # x86-64 with AVX2 at least
    if reason is not None:
        return reason
    if not torch.cpu._is_avx512_bf16_supported():
        return "the CPU lacks AVX512-BF16"
    return None


def _cpu_supports() -> str | None:
    if not torch.cpu._is_amx_tile_supported():
        return "the CPU has no AMX tiles"
    return _avx512_bf16_reason()


def _register_fake() -> None:
    @torch.library.register_fake("slimformer::tile_attention")
    def _(q, k, v, mask, scale):
        return q.new_empty((q.shape[0], q.shape[2], q.shape[1], q.shape[3]))

    @torch.library.register_fake("slimformer::tile_attention_packed")
    def _(q, k, v, cu_seqlens, scale, key_bias=None):
        return q.new_empty((1, q.shape[2], q.shape[1], q.shape[3]))


def _after_load() -> None:
    _register_fake()
    q = torch.zeros(1, 1, 1, HEAD_MULTIPLE, dtype=torch.bfloat16)
    torch.ops.slimformer.tile_attention(q, q, q, None, 1.0)  # AMX form: the tile state is granted here


AMX_LIBRARY = kernels_lib.KernelLibrary("tile_attention", SOURCE, FLAGS, _cpu_supports, _after_load)
AVX512_LIBRARY = kernels_lib.KernelLibrary("tile_attention_avx512", SOURCE, FLAGS_AVX512, _avx512_bf16_reason, _after_load)
# One form per process (both register the same operators): AMX tiles where the CPU has them, else
# the AVX512-BF16 form. Whether either is faster than SDPA here is measured, not assumed
# (:func:`slimformer.runtime.tile_attention.choose_attention`).
LIBRARY = AMX_LIBRARY if _cpu_supports() is None else AVX512_LIBRARY
FORM = "AMX" if LIBRARY is AMX_LIBRARY else "AVX512-BF16"


def form_label(form: str = FORM) -> str:
    """How reports and benchmark tables name the kernel in ``form`` (a plan records the form of
    the machine it was made on; default: this process's)."""
    return "AMX tiles" if form == "AMX" else f"the tile kernel ({form})"


# The module's interface to its library (see ``kernels.KernelLibrary``): ``load`` builds (once per
# machine and torch) and loads it, True when usable; ``loaded`` is the lock-free check used inside
# traced forwards.
library_path, load, loaded, unavailable_reason = LIBRARY.path, LIBRARY.load, LIBRARY.loaded, LIBRARY.unavailable_reason
available = load


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packed: bool = False) -> bool:
    """Whether the kernel takes these heads: (batch, heads, positions, dim) bf16 on the CPU, as
    many key heads as query heads, dim a multiple of 32, at most :data:`MAX_KEYS` keys (for
    ``packed`` sequences: per sequence, checked by the kernel)."""
    return (query.dtype == key.dtype == value.dtype == torch.bfloat16 and query.device.type == "cpu" and query.dim() == 4
            and key.shape[1] == query.shape[1] and query.shape[-1] % HEAD_MULTIPLE == 0 and (packed or 1 <= key.shape[2] <= MAX_KEYS))


def tile_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``query`` (batch, heads, q, dim), ``key``/``value`` (batch, heads, k, dim) bf16; ``mask``
    None, bool (True = attend) or additive float, broadcastable to (batch, heads, q, k) -> (batch,
    q, heads, dim) bf16. Rows whose keys are all masked come back as zeros. Call :func:`load`
    first."""
    b, h, lq, _ = query.shape
    tensors = [t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value)]
    if mask is not None:
        mask = (mask if mask.dtype == torch.bool else mask.float()).expand(b, h, lq, key.shape[2])
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    return torch.ops.slimformer.tile_attention(*tensors, mask, float(scale))


def tile_attention_packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
                          key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Packed sequences (FlashAttention's varlen layout): ``query``/``key``/``value`` (1, heads,
    tokens, dim) bf16 hold the sequences back to back, sequence ``i`` at positions
    ``cu_seqlens[i]`` to ``cu_seqlens[i + 1] - 1``, each attending only to itself (no padding)
    -> (1, tokens, heads, dim) bf16. ``key_bias`` (tokens,), optional: added to every query's
    logit of that key (proportional attention's log-size of merged tokens). Call :func:`load`
    first."""
    tensors = [t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value)]
    bias = None if key_bias is None else key_bias.reshape(-1).to(torch.float32).contiguous()
    return torch.ops.slimformer.tile_attention_packed(*tensors, cu_seqlens.to(torch.int64).contiguous(), float(scale), bias)
