"""slimformer.timing: interleaved medians, and the steady allocator every timing runs under."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from slimformer import timing

# A child process mallocs 64 MiB through glibc and reports whether the block lies in the brk heap
# ([heap] in /proc/self/maps): glibc's default serves a block that large by a fresh mmap (page
# faults on every reuse once it is freed); with the steady allocator it comes from the heap.
_CHILD = r"""
import ctypes, sys
from slimformer.timing import steady_allocator
if sys.argv[1] == "steady":
    steady_allocator()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
p = libc.malloc(64 << 20)
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        print(int(lo <= p < hi))
        break
else:
    print(0)
"""


def _block_in_heap(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not Path("/proc/self/maps").exists() or platform.libc_ver()[0] != "glibc",
                    reason="needs Linux with glibc (/proc/self/maps, mallopt)")
def test_steady_allocator_serves_large_blocks_from_the_heap():
    assert _block_in_heap("default") == 0  # the control: glibc maps a fresh block
    assert _block_in_heap("steady") == 1


def test_steady_allocator_is_idempotent_and_timing_helpers_apply_it():
    first = timing.steady_allocator()
    assert timing.steady_allocator() == first
    timing.interleaved_medians({"a": lambda: None}, repeats=1)
    assert timing._allocator == first


def test_interleaved_medians_rotates_order_and_runs_setup():
    calls = []
    out = timing.interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2,
                                     setup={"b": lambda: calls.append("setup-b")})
    assert set(out) == {"a", "b"}
    # warm-up round then 2 timed rounds; the second round starts with b
    assert calls == ["a", "setup-b", "b", "setup-b", "b", "a", "a", "setup-b", "b"]
