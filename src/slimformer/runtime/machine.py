"""What machine are we on: CPU model, the instruction-set flags that decide which matrix units
exist (AVX2/FMA, AVX-512, AVX-512 VNNI and BF16, AVX-VNNI, AMX tiles), threads and the PyTorch
build, plus measured matrix-multiply ceilings (fp32, bf16, int8 through ``torch._int_mm``).

The execution planner keys its cached decisions on :func:`signature`; every benchmark records
:func:`describe_machine` next to its speed figures and reports achieved FLOP/s against the
ceilings measured in the same process.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time

import torch

from slimformer.timing import steady_allocator

# The flags that change which execution path is fastest (from /proc/cpuinfo).
RELEVANT_FLAGS = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "asimd", "sve", "bf16", "i8mm",
)
CEILING_SHAPE = (4096, 384, 1536)  # (m, k, n): an activation batch of 32x128 tokens times a MiniLM MLP weight


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in (platform.processor(), platform.machine(), ""):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    return _cpuinfo()[0]


def cpu_flags() -> list[str]:
    """The relevant instruction-set flags this CPU reports (see ``RELEVANT_FLAGS``), sorted."""
    return sorted(f for f in _cpuinfo()[1] if f in RELEVANT_FLAGS)


def signature() -> dict:
    """What a timing decision depends on: CPU model, relevant flags, PyTorch version and its CPU
    kernel level, and the number of threads PyTorch uses."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    return {
        "cpu": cpu_model(),
        "flags": cpu_flags(),
        "torch": torch.__version__,
        "capability": capability,
        "threads": torch.get_num_threads(),
    }


def signature_key(sig: dict | None = None) -> str:
    """A short stable hash of :func:`signature` (file names of cached plans)."""
    sig = signature() if sig is None else sig
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:16]


def _median_seconds(fn, repeats: int, warmups: int = 3) -> float:
    """Median time of ``repeats`` calls after ``warmups`` untimed ones. One warm-up was not
    enough for ``torch._int_mm`` on an AMD EPYC (torch 2.13): the first ceilings measured in a
    process read int8 at 448 GOP/s, the same call a second time 855."""
    steady_allocator()
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def matmul_ceilings(shape: tuple[int, int, int] = CEILING_SHAPE, repeats: int = 5) -> dict:
    """Measured multiply throughput (FLOP/s; int8: OP/s) of (m, k) by (k, n) in float32,
    bfloat16 (``F.linear``) and int8 (``torch._int_mm``), median of ``repeats`` after warm-up calls.

    On a busy machine these are what this process gets, not what the silicon can do; the
    load average is recorded beside them (:func:`describe_machine`).
    """
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    flop = 2.0 * m * k * n
    out = {"shape": [m, k, n]}
    out["fp32_flops"] = flop / _median_seconds(lambda: torch.nn.functional.linear(a, w), repeats)
    ab, wb = a.bfloat16(), w.bfloat16()
    out["bf16_flops"] = flop / _median_seconds(lambda: torch.nn.functional.linear(ab, wb), repeats)
    if hasattr(torch, "_int_mm"):
        ai = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        wi = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        out["int8_ops"] = flop / _median_seconds(lambda: torch._int_mm(ai, wi.t()), repeats)
    return out


def describe_machine(ceilings: bool = True) -> dict:
    """Signature, load average and (optionally) measured matmul ceilings: the header of every
    speed table. Puts the process under the steady allocator (:mod:`slimformer.timing`), as
    every timing that follows runs, and names it."""
    import transformers

    info = {**signature(), "cores": os.cpu_count(), "allocator": steady_allocator(), "transformers": transformers.__version__}
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["loadavg"] = None
    if ceilings:
        info["ceilings"] = matmul_ceilings()
        try:
            info["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            pass
    return info


def machine_line(info: dict) -> str:
    """One markdown line naming the machine, its flags, load and ceilings."""
    flags = ", ".join(info.get("flags") or []) or "none of " + "/".join(RELEVANT_FLAGS[:4])
    text = f"{info.get('cpu')} ({info.get('threads')} threads of {info.get('cores')} cores; flags: {flags}; torch {info.get('torch')}"
    text += (f", transformers {info['transformers']}" if info.get("transformers") else "") + f", kernels {info.get('capability')})"
    if info.get("allocator"):
        text += f"; allocator: {info['allocator']}"
    if info.get("loadavg"):
        text += f"; load average {info['loadavg'][0]:.1f}"
    c = info.get("ceilings")
    if c:
        text += (
            f"; measured ceilings {c['shape'][0]}x{c['shape'][1]} by {c['shape'][1]}x{c['shape'][2]}: "
            f"fp32 {c['fp32_flops'] / 1e9:.3g} GFLOP/s, bf16 {c['bf16_flops'] / 1e9:.3g} GFLOP/s"
        )
        if "int8_ops" in c:
            text += f", int8 (_int_mm) {c['int8_ops'] / 1e9:.3g} GOP/s"
    return text
