"""Evaluation settings: which held-out text, how much of it, and how latency is timed."""

from __future__ import annotations

from dataclasses import dataclass

from slimformer.errors import ConfigError, is_int_at_least


@dataclass(frozen=True)
class EvalSettings:
    """``source``/``n_texts``/``seed``: held-out documents (evaluation split) to measure on;
    ``n_queries``: how many of them serve as retrieval queries (encoders; their first sentence);
    ``max_length``: tokens per text; ``batch_size``: texts per forward pass;
    ``latency_batch``/``latency_tokens``: the fixed batch timed for latency (e.g. 32 x 128);
    ``latency_repeats``/``latency_warmup``: timed runs (median reported) and untimed warm-up runs;
    ``transfer_source``: a second held-out source of a different kind from the calibration text
    (default ``package-docs``, never in the default calibration mix), measured the same way and
    compared with the first; ``None`` skips it."""

    source: str = "stdlib-docs"
    n_texts: int = 320
    n_queries: int = 64
    max_length: int = 128
    batch_size: int = 32
    seed: int = 0
    latency_batch: int = 32
    latency_tokens: int = 128
    latency_repeats: int = 10
    latency_warmup: int = 3
    transfer_source: str | None = "package-docs"

    def __post_init__(self) -> None:
        from slimformer.data.text import check_source

        check_source(self.source, "evaluation source")
        if self.transfer_source is not None:
            check_source(self.transfer_source, "second evaluation source")
        for name in ("n_texts", "max_length", "batch_size", "latency_batch", "latency_tokens", "latency_repeats"):
            v = getattr(self, name)
            if not is_int_at_least(v, 1):
                raise ConfigError(f"evaluation setting {name}={v!r} must be a positive integer", f"pass e.g. {name}=32")
        if not 0 < self.n_queries < self.n_texts:
            raise ConfigError(f"n_queries={self.n_queries} must be between 1 and n_texts-1={self.n_texts - 1}", "lower n_queries or raise n_texts")
        if self.latency_warmup < 0:
            raise ConfigError(f"latency_warmup={self.latency_warmup} must be >= 0", "pass e.g. latency_warmup=3")
