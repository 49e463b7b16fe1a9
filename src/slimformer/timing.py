"""Timing two alternatives fairly on a shared machine: interleaved rounds, medians of ratios.
A leaf module (no slimformer imports), so every layer can measure the same way."""

from __future__ import annotations

import statistics
import time
from typing import Callable


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


def interleaved_medians(calls: dict[str, Callable[[], object]], repeats: int, setup: dict[str, Callable[[], object]] | None = None,
                        warmup: bool = True) -> dict[str, float]:
    """Median seconds of each of several alternatives, timed in ``repeats`` interleaved rounds
    (the order rotating each round, so no alternative always follows the same one), after one
    warm-up call of each unless ``warmup`` is False; ``setup[name]``, untimed, runs before every
    call of ``name`` (e.g. switching a model to that alternative)."""
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats + 1 if warmup else repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if setup and name in setup:
                setup[name]()
            t0 = time.perf_counter()
            calls[name]()
            if r or not warmup:
                samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}
