"""KIVI: keys quantized per channel, values per token, recent tokens at full precision."""

from __future__ import annotations

from dataclasses import dataclass

from slimformer.runtime.kv.base import KVConfig, register_kv


@register_kv
@dataclass
class KIVIConfig(KVConfig):
    """Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache".

    Entries older than ``window`` are stored at ``bits`` (bit-packed): keys with one scale/zero
    per channel per block of ``group`` tokens, values with one per ``group`` channels of a token.
    """

    name = "kivi"
    paper = "Liu et al. 2024, KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"
    summary = "per-channel keys / per-token values at 2-8 bits, full-precision recent window"

    bits: int | None = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits is None:
            from slimformer.errors import ConfigError

            raise ConfigError("kivi: bits is null", "give bits: 2, 4 or 8")
