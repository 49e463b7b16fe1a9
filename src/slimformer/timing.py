"""Timing two alternatives fairly on a shared machine: interleaved rounds, medians of ratios.
A leaf module (no slimformer imports), so every layer can measure the same way."""

from __future__ import annotations

import statistics
import time


def interleaved_times(first, second, repeats: int, warmup: bool = True) -> tuple[float, float, float]:
    """Time ``first`` and ``second`` alternately ``repeats`` times (after one warm-up call of
    each, unless ``warmup`` is False because both just ran), so that a change of machine load
    hits both alike. Returns the median seconds of each and the median of the per-round ratios
    ``first / second``."""
    if warmup:
        first()
        second()
    a, b = [], []
    for i in range(repeats):
        for fn, times in ((first, a), (second, b)) if i % 2 == 0 else ((second, b), (first, a)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b), statistics.median(x / y if y > 0 else 1.0 for x, y in zip(a, b))
