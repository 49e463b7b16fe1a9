"""Timing two alternatives fairly on a shared machine: interleaved rounds, medians of ratios.
A leaf module (no slimformer imports), so every layer can measure the same way.

Every timing helper first puts glibc's allocator in a steady state (:func:`steady_allocator`):
by default glibc serves a large tensor from a fresh ``mmap`` and gives freed memory at the top
of the heap back to the system, so a model whose activations are large (float32, wide layers)
pays page faults on every call while a smaller variant does not. On an AMX Xeon (2 threads,
torch 2.13.0+cpu) this made float32 all-MiniLM-L6-v2 on 16 x 128 tokens take 177-194 ms
instead of 144-150 ms, inflating every speed-up measured against it by up to ~20 %.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import time
from typing import Callable

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_allocator: str | None = None


def steady_allocator() -> str:
    """Make glibc malloc keep what it has: no ``mmap`` per large block, no trimming of the heap
    (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2**40)``), so repeated calls reuse
    the same pages as a long-running server's would. Idempotent; returns what it did, for the
    record (``"glibc steady (no mmap, no trim)"``, or why nothing was done)."""
    global _allocator
    if _allocator is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            mallopt = getattr(libc, "mallopt", None)
        except OSError:
            mallopt = None
        if mallopt is None:
            _allocator = "system default (no glibc mallopt)"
        else:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
            _allocator = "glibc steady (no mmap, no trim)" if ok else "glibc default (mallopt refused)"
    return _allocator


def interleaved_times(first, second, repeats: int, warmup: bool = True) -> tuple[float, float, float]:
    """Time ``first`` and ``second`` alternately ``repeats`` times (after one warm-up call of
    each, unless ``warmup`` is False because both just ran), so that a change of machine load
    hits both alike. Returns the median seconds of each and the median of the per-round ratios
    ``first / second``."""
    steady_allocator()
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
                        warmup: bool = True, steady: bool = True) -> dict[str, float]:
    """Median seconds of each of several alternatives, timed in ``repeats`` interleaved rounds
    (the order rotating each round, so no alternative always follows the same one), after one
    warm-up call of each unless ``warmup`` is False; ``setup[name]``, untimed, runs before every
    call of ``name`` (e.g. switching a model to that alternative). ``steady=False`` leaves the
    process's allocator as it is (a choice timed inside a job whose memory peak must not grow:
    the steady allocator keeps what is freed)."""
    if steady:
        steady_allocator()
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
