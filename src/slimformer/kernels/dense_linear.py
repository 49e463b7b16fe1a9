"""A few-row linear on a dense float32 or bfloat16 weight: ``torch.ops.slimformer.dense_linear``.

``x W^T + b`` for the decode step and the speculative verify step (``dense_linear.cpp``): each
weight row is streamed once per call, channels split across the intra-op threads, float32
arithmetic (a bfloat16 weight is widened exactly as it is read). It exists because the BLAS behind
PyTorch's one-row GEMV does not read memory at the rate every CPU sustains: on a 2-core AMD EPYC
SmolLM2's float32 linears went through ``F.linear`` at ~11 GB/s where an elementwise pass reads
~30 GB/s, while on a Xeon the same call is near the memory rate. So it is a candidate path of plain
``nn.Linear`` layers (:mod:`slimformer.runtime.execution`, ``dense-kernel``) that the execution
planner times against ``F.linear`` on the machine at hand, never a default.

Built like the other kernels (:mod:`slimformer.kernels`: AVX2 + FMA, compiled once per machine and
torch into the kernel cache); where it cannot be built, :func:`available` is False and plain linears
keep ``F.linear``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimformer import kernels as kernels_lib

SOURCE = Path(__file__).with_name("dense_linear.cpp")
FLAGS = kernels_lib.FLAGS


def _after_load() -> None:
    @torch.library.register_fake("slimformer::dense_linear")
    def _(x, weight, bias):
        return x.new_empty((x.shape[0], weight.shape[0]))


LIBRARY = kernels_lib.KernelLibrary("dense_linear", SOURCE, FLAGS, kernels_lib._cpu_supports, _after_load)

# The module's interface to its library (see ``kernels.KernelLibrary``).
library_path, load, loaded, unavailable_reason, version = (LIBRARY.path, LIBRARY.load, LIBRARY.loaded, LIBRARY.unavailable_reason,
                                                           LIBRARY.version)
available = load


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (..., in) of any float dtype, ``weight`` (out, in) float32 or bfloat16, ``bias``
    (out,) or None -> (..., out) in ``x.dtype``, computed in float32. Call :func:`load` first."""
    rows = x.reshape(-1, x.shape[-1]).float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    y = torch.ops.slimformer.dense_linear(rows, weight.contiguous(), b)
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)
