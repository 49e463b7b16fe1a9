"""Attention of a few query tokens against a long KV cache: ``torch.ops.slimformer.decode_attention``.

``softmax(q k^T * scale + mask) v`` for the decode step and the speculative verify step
(``decode_attention.cpp``): per (batch, key/value head) the grouped query heads and tokens that
share it are one block of rows, so each cached key and value is read once for all of them; slots
no row attends to (the unused end of a static cache, left padding) are skipped rather than
masked after the fact; float32 arithmetic, float32 or bfloat16 inputs, head size a multiple of 8.
It replaces two batched matmuls and a softmax whose set-up dominated a one-token step: ~90 us per
SmolLM2 layer through ``torch.matmul`` on a 2-core Xeon with AMX (a quarter of an 8-bit decode step).
Whether it is used is checked by :mod:`slimformer.runtime.attention`; outputs equal the matmul
form within float32 rounding (tested).

Built like the other kernels (:mod:`slimformer.kernels`: AVX2 + FMA, compiled once per machine
and torch into the kernel cache); where it cannot be built, :func:`available` is False and decode
attention stays with the matmul form.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimformer import kernels as kernels_lib

SOURCE = Path(__file__).with_name("decode_attention.cpp")
FLAGS = kernels_lib.FLAGS
MAX_ROWS = 64  # grouped query heads x query tokens per key/value head

def _after_load() -> None:
    @torch.library.register_fake("slimformer::decode_attention")
    def _(query, key, value, mask, scale):
        return query.new_empty((query.shape[0], query.shape[2], query.shape[1], query.shape[3]))


LIBRARY = kernels_lib.KernelLibrary("decode_attention", SOURCE, FLAGS, kernels_lib._cpu_supports, _after_load)


# The module's interface to its library (see ``kernels.KernelLibrary``): ``load`` builds (once per
# machine and torch) and loads it, True when usable; ``loaded`` is the lock-free check used inside
# traced forwards.
library_path, load, loaded, unavailable_reason = LIBRARY.path, LIBRARY.load, LIBRARY.loaded, LIBRARY.unavailable_reason
available = load


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the kernel takes these heads: (batch, heads, tokens, dim) on the CPU, all float32 or
    all bfloat16, query heads a multiple of key heads, dim a multiple of 8, at most ``MAX_ROWS``
    query rows per key/value head."""
    return (query.device.type == "cpu" and query.dim() == key.dim() == 4 and query.dtype == key.dtype == value.dtype
            and query.dtype in (torch.float32, torch.bfloat16) and key.shape[1] > 0 and query.shape[1] % key.shape[1] == 0
            and query.shape[-1] % 8 == 0 and (query.shape[1] // key.shape[1]) * query.shape[2] <= MAX_ROWS)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``query`` (B, H, Q, D), ``key``/``value`` (B, KVH, S, D), ``mask`` None, bool (B, 1, Q, S)
    (True = attend) or additive float32 -> (B, Q, H, D) in ``query.dtype``. Call :func:`load` first."""
    return torch.ops.slimformer.decode_attention(query.contiguous(), key.contiguous(), value.contiguous(),
                                                 None if mask is None else mask.contiguous(), float(scale))
