"""slimformer's own CPU kernels, compiled on the machine that runs them.

Six operators. :mod:`slimformer.kernels.dense_linear` computes a few-row linear on a dense float32
or bfloat16 weight read in place (``torch.ops.slimformer.dense_linear``: decoding with an original
model's float weights, where the BLAS's one-row GEMV is slow on some CPUs).
:mod:`slimformer.kernels.decode_attention` computes the decode step's attention against a long KV
cache (``torch.ops.slimformer.decode_attention``). :mod:`slimformer.kernels.tile_attention` computes encoder attention on Intel
AMX tiles (``torch.ops.slimformer.tile_attention``), or, where the CPU has AVX512-BF16 but no AMX,
the same kernel with each tile product done by ``VDPBF16PS`` on tiles emulated in memory.
:mod:`slimformer.kernels.onednn_int8` wraps oneDNN's int8 GEMM on a weight
prepacked once (``torch.ops.slimformer.onednn_int8_product``, W8A8 layers). The fifth,
``torch.ops.slimformer.packed_linear`` (``packed_linear.cpp``): a few-row
linear (decoding, speculative verification) computed straight from the packed 4- or 8-bit codes,
bf16 scales and uint8 zero points that :class:`~slimformer.methods.quantization.modules.QuantizedLinear`
stores (and from GGUF's Q8_0 / Q4_0 / Q4_1 blocks as
:class:`~slimformer.methods.quantization.gguf_blocks.GGUFBlockLinear` holds them: fp16 scales,
fp16 minima), in float32 arithmetic. It reads half (8-bit) or a quarter (4-bit) of the bytes of a bf16
weight and holds nothing beyond the stored buffers. Its sibling ``torch.ops.slimformer.packed_linear_q8a``
reads the same buffers but rounds the activations to int8 per block of 32 columns, as llama.cpp's CPU
kernels do, and multiplies them into the codes with integer dot products: AVX-512 VNNI where the CPU
has it (compiled for that instruction set by a target pragma, chosen at run time), else AVX2. PyTorch's own int4/int8 CPU kernels compute
in bf16 and, on CPUs without AMX, are several times slower than a float GEMM; whether this kernel
is faster than the alternatives *here* is for the execution planner to measure. The sixth,
:mod:`slimformer.kernels.q8a_tiles` (``torch.ops.slimformer.q8a_tiles_linear``), computes
``packed-q8a``'s numbers from a copy of the codes laid out in 16-channel tiles for AVX-512 VNNI, so
that the rows of a speculative verify step share every load of the weights.

The source is compiled with the system C++ compiler against the installed torch (AVX2 + FMA; no
``-march=native``) into ``$SLIMFORMER_KERNEL_CACHE`` (else ``$XDG_CACHE_HOME/slimformer/kernels``,
else ``~/.cache/slimformer/kernels``), keyed by a hash of the source, the flags and the torch
version, and loaded with ``torch.ops.load_library`` (about 15 s the first time on 2 cores, then
instant). Where there is no compiler, no AVX2, or the build fails, :func:`packed_linear_available`
is False (the reason in :func:`unavailable_reason`) and the layer keeps its other paths.
``SLIMFORMER_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable

import torch

SOURCE = Path(__file__).with_name("packed_linear.cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared", "-std=c++17", "-w"]
CHUNK = 32  # the kernel's group-size granularity (columns per inner step)


def cache_dir() -> Path:
    if os.environ.get("SLIMFORMER_KERNEL_CACHE"):
        return Path(os.environ["SLIMFORMER_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "slimformer" / "kernels"


def _cpu_supports() -> str | None:
    """None when this CPU runs the AVX2 build, else the reason it does not."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2 (torch reports {capability})"
    return None


def _build(target: Path, source: Path = SOURCE, flags: list[str] = FLAGS) -> None:
    """Compile ``source`` with ``flags`` into ``target`` (written to a temporary name, then moved
    into place)."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (install g++)")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libdirs = cpp_extension.library_paths()
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *flags, abi, *includes, str(source), "-o", tmp,
           *[f"-L{p}" for p in libdirs], *[f"-Wl,-rpath,{p}" for p in libdirs], "-lc10", "-ltorch_cpu"]
    try:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            raise RuntimeError(f"no C++ compiler at {compiler} (install g++ or set CXX)") from None
        if done.returncode:
            raise RuntimeError(f"compiling {source.name} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _local_headers(source: Path) -> list[Path]:
    """The headers beside ``source`` that it includes (``#include "name.h"``)."""
    names = re.findall(r'^#include "([^"]+)"', source.read_text(), flags=re.M)
    return [source.with_name(n) for n in names]


def library_key(source: Path = SOURCE, flags: list[str] = FLAGS) -> str:
    """Hash of the source and the headers it includes, the flags and the torch version: names the
    build (and the plans timed with it)."""
    text = source.read_bytes() + b"".join(h.read_bytes() for h in _local_headers(source))
    return hashlib.sha256(text + " ".join(flags).encode() + torch.__version__.encode()).hexdigest()[:16]


class KernelLibrary:
    """One of our kernel libraries: ``source`` compiled with ``flags`` into the kernel cache as
    ``NAME-KEY.so`` (once per machine and torch), loaded once per process. ``cpu_reason()`` says
    why this CPU cannot run it (None when it can); ``after_load`` registers its fake functions
    (and may probe it). ``state`` records ``ok`` and the ``reason`` it is not usable."""

    def __init__(self, name: str, source: Path, flags: list[str], cpu_reason: Callable[[], str | None],
                 after_load: Callable[[], None]) -> None:
        self.name = name
        self.source = source
        self.flags = flags
        self.cpu_reason = cpu_reason
        self.after_load = after_load
        self.state: dict[str, object] = {}
        self.lock = threading.Lock()

    def path(self) -> Path:
        return cache_dir() / f"{self.name}-{library_key(self.source, self.flags)}.so"

    def load(self) -> bool:
        """Build the library if missing, load it and run ``after_load``, once per process; True
        when it is usable (not when turned off, ``cpu_reason()``, or the build, load or probe failed)."""
        with self.lock:
            if "ok" in self.state:
                return bool(self.state["ok"])
            reason = "turned off (SLIMFORMER_KERNELS=0)" if os.environ.get("SLIMFORMER_KERNELS", "1") == "0" else self.cpu_reason()
            if reason is None:
                try:
                    path = self.path()
                    if not path.exists():
                        _build(path, self.source, self.flags)
                    torch.ops.load_library(str(path))
                    self.after_load()
                except (OSError, RuntimeError) as exc:
                    reason = str(exc).splitlines()[0][:200]
            self.state["ok"] = reason is None
            self.state["reason"] = reason
            return reason is None

    def version(self) -> str:
        """The build's key when the library is usable here, else ``"none"`` (in plan cache keys)."""
        return library_key(self.source, self.flags) if self.load() else "none"

    def loaded(self) -> bool:
        """True once :meth:`load` succeeded (no lock, no build: cheap inside a traced forward)."""
        return bool(self.state.get("ok"))

    def unavailable_reason(self) -> str | None:
        self.load()
        return self.state.get("reason")  # type: ignore[return-value]


def library_path() -> Path:
    return LIBRARY.path()


def version() -> str:
    """``library_key()`` when the kernels are usable here, else ``"none"``."""
    return LIBRARY.version()


def load() -> bool:
    """Build (once per machine and torch) and load the kernels; True when they are usable."""
    return LIBRARY.load()


def packed_linear_available() -> bool:
    return load()


def unavailable_reason() -> str | None:
    return LIBRARY.unavailable_reason()


def supports(bits: int, group_size: int, in_features: int) -> bool:
    """Whether the kernel takes this layout (capability of the layout only)."""
    return bits in (4, 8) and group_size % CHUNK == 0 and in_features % group_size == 0


def _register_fake() -> None:

    @torch.library.register_fake("slimformer::packed_linear")
    def _(x, qweight, scales, zeros, mins, bits, group_size, bias):
        return x.new_empty((x.shape[0], qweight.shape[0]))

    @torch.library.register_fake("slimformer::packed_linear_q8a")
    def _q8a(x, qweight, scales, zeros, mins, bits, group_size, bias, portable=False):
        return x.new_empty((x.shape[0], qweight.shape[0]))


LIBRARY = KernelLibrary("packed_linear", SOURCE, FLAGS, _cpu_supports, _register_fake)


def packed_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  bits: int, group_size: int, bias: torch.Tensor | None = None, mins: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (rows, in) float32 contiguous, ``qweight`` (out, in*bits/8) uint8, ``scales``
    (out, groups) bf16 or fp16, and per group either ``zeros`` (out, groups) uint8 — or None for
    the implicit ``2**(bits-1)`` — giving ``W = (q - z) * s``, or ``mins`` (out, groups) fp16 giving
    ``W = q * s + m`` (GGUF's Q4_1); ``bias`` (out,) float32 or None -> (rows, out) float32. Call
    :func:`load` first."""
    return torch.ops.slimformer.packed_linear(x, qweight, scales, zeros, mins, bits, group_size, bias)


def int8_activations_available() -> bool:
    """Whether :func:`packed_linear_q8a` runs here (wherever the kernels build: AVX-512 VNNI dot
    products where the CPU has them, else AVX2's)."""
    return load()


def has_vnni() -> bool:
    """Whether :func:`packed_linear_q8a` uses AVX-512 VNNI here (else its AVX2 form)."""
    return load() and bool(torch.ops.slimformer.cpu_has_vnni())


def supports_int8_activations(bits: int, group_size: int, in_features: int) -> bool:
    """Whether :func:`packed_linear_q8a` takes this layout (groups of 32 or 64 columns, or a
    multiple of its 64-byte step: 64 columns at 8 bits, 128 at 4 bits)."""
    return supports(bits, group_size, in_features) and (group_size <= 64 or group_size % (64 if bits == 8 else 128) == 0)


def packed_linear_q8a(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      bits: int, group_size: int, bias: torch.Tensor | None = None, mins: torch.Tensor | None = None,
                      portable: bool = False) -> torch.Tensor:
    """:func:`packed_linear` with the activations rounded to int8 per block of 32 columns
    (symmetric, scale max|x|/127, as llama.cpp's Q8 activations) and multiplied into the stored
    codes by integer dot products (AVX-512 VNNI where the CPU has it, else AVX2; ``portable``
    forces the AVX2 form): the product of the dequantized weight and the int8-rounded ``x``, in
    float32 arithmetic. A row's output does not depend on the other rows passed with it. Check
    :func:`int8_activations_available` first."""
    return torch.ops.slimformer.packed_linear_q8a(x, qweight, scales, zeros, mins, bits, group_size, bias, portable)


def packed_linear_nd(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     bits: int, group_size: int, bias: torch.Tensor | None = None, mins: torch.Tensor | None = None,
                     int8_activations: bool = False, portable: bool = False) -> torch.Tensor:
    """:func:`packed_linear` (or, with ``int8_activations``, :func:`packed_linear_q8a`, in its AVX2
    form if ``portable``) for ``x`` (..., in) of any float dtype: output (..., out) in ``x.dtype``
    (computed in float32)."""
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    if int8_activations:
        y = packed_linear_q8a(x2, qweight, scales, zeros, bits, group_size, bias, mins=mins, portable=portable)
    else:
        y = packed_linear(x2, qweight, scales, zeros, bits, group_size, bias, mins=mins)
    return y.reshape(*x.shape[:-1], qweight.shape[0]).to(x.dtype)
