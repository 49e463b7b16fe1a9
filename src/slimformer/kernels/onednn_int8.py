"""oneDNN's int8 GEMM on a prepacked weight, as one graph-safe operator.

``torch._int_mm`` hands its int8 weight to oneDNN in plain layout on every call, so oneDNN
re-lays it out for the int8 units (AMX tiles, VNNI) each time; measured on a 2-core AMX Xeon
(4096 x 384 by 384 x 1536) it reaches 0.44 TOP/s against 1.77 TOP/s for the same product on a
weight laid out once with ``torch.ops.onednn.qlinear_prepack`` (PyTorch's quantized-linear
kernels for Inductor). :func:`prepack` does that once per layer; :func:`int8_product` computes
the integer product ``sum_k (x_u8 - 128) * w`` from unsigned activation bytes (int8 code + 128:
the zero point oneDNN's quantized linear takes), returned as float32 (the int32 accumulators
converted, exactly as ``acc.float()`` does).

The call is registered as ``torch.ops.slimformer.onednn_int8_product`` so that ``torch.compile``
treats it as one opaque operator (Inductor's own lowering of the oneDNN op needs the packed
weight to be a frozen graph constant, which a dynamic-shape, unfrozen model graph does not
have). Whether this path is faster than the others on the machine at hand is for the
execution planner to measure; :func:`available` says whether it runs here at all.
"""

from __future__ import annotations

import functools

import torch

_works: bool | None = None


@functools.lru_cache(maxsize=None)
def _unit_scales(out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel weight scales of 1 and zero points of 0 (made once per width, not per call:
    a decoding step calls every layer once per token)."""
    return torch.ones(out_features), torch.zeros(out_features, dtype=torch.long)


@torch.library.custom_op("slimformer::onednn_int8_product", mutates_args=())
def _product(x_u8: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    ones, zeros = _unit_scales(out_features)
    return torch.ops.onednn.qlinear_pointwise(x_u8, 1.0, 128, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [], "")


@_product.register_fake
def _(x_u8, packed, out_features):
    return x_u8.new_empty((x_u8.shape[0], out_features), dtype=torch.float32)


def prepack(w_int8: torch.Tensor) -> torch.Tensor:
    """``w_int8`` (out, in) int8 laid out once for this CPU's int8 GEMM (an opaque tensor: it
    cannot be copied or saved; rebuild it from the codes)."""
    return torch.ops.onednn.qlinear_prepack(w_int8.contiguous(), None)


def int8_product(x_u8: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x_u8`` (tokens, in) uint8 activation bytes (code + 128) times a :func:`prepack`-ed
    weight: the integer product (tokens, out) as float32."""
    return torch.ops.slimformer.onednn_int8_product(x_u8.contiguous(), packed, out_features)


def available() -> bool:
    """The op exists in this PyTorch and gives the exact integer product on this CPU (probed
    once on a small product)."""
    global _works
    if _works is None:
        try:
            g = torch.Generator().manual_seed(0)
            w = torch.randint(-127, 128, (16, 32), dtype=torch.int8, generator=g)
            x = torch.randint(-127, 128, (3, 32), dtype=torch.int8, generator=g)
            acc = int8_product((x.to(torch.int16) + 128).to(torch.uint8), prepack(w), 16)
            _works = bool(torch.equal(acc, (x.long() @ w.long().t()).float()))
        except Exception:  # noqa: BLE001 - no oneDNN, the op missing, or refusing this CPU
            _works = False
    return _works
