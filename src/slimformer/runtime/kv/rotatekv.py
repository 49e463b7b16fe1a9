"""RotateKV: Hadamard-rotated keys before low-bit quantization."""

from __future__ import annotations

from dataclasses import dataclass

from slimformer.runtime.kv.kivi import KIVIConfig
from slimformer.runtime.kv.base import register_kv


@register_kv
@dataclass
class RotateKVConfig(KIVIConfig):
    """Su et al. 2025, "RotateKV: Accurate and Robust 2-Bit KV Cache Quantization for LLMs via
    Outlier-Aware Adaptive Rotations" (the Hadamard part: keys rotated by an orthonormal Hadamard
    matrix over head_dim, which spreads outlier channels, then quantized per token in groups of
    ``group`` channels; undone at dequantization)."""

    name = "rotatekv"
    paper = "Su et al. 2025, RotateKV: Accurate and Robust 2-Bit KV Cache Quantization via Outlier-Aware Adaptive Rotations"
    summary = "Hadamard-rotated keys then KIVI-style 2-bit storage"

    bits: int | None = 2
    rotate: bool = True
