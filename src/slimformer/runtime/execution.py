"""Execution paths: the ways one linear layer can compute the numerics it stores, and the
per-layer dispatcher the planner installs.

A path is named and described by :data:`PATHS` (what it holds between calls, how it rounds).
Paths of a ``QuantizedLinear`` are its kernels (see
:mod:`slimformer.methods.quantization.modules`); every linear-like ``QuantizedModule`` also has
the generic paths below, and a plain ``nn.Linear`` its own:

- ``native``: the module's own forward (its built-in kernel);
- ``dequant-fp32``: dequantized once into a cached float32 weight, float32 GEMM (exact; 4 bytes
  per weight held: only under ``memory: fast``);
- ``dequant-bf16``: dequantized once into a cached bfloat16 weight, bfloat16 GEMM (weight and
  activations rounded to bf16, float32 accumulation; 2 bytes per weight held);
- ``dequant-bf16-widen``: the cached bfloat16 weight widened per call to a float32 GEMM (only
  the weight is rounded to bf16);
- ``unpack-fp32``: dequantized per call into float32, nothing held (exact); ``unpack-bf16``: the
  same into bfloat16, bf16 GEMM (a batch path beside a decode path that holds its own copy);
- ``packed-q8a-tiles`` (4/8-bit layouts that ``packed-q8a`` takes, CPUs with AVX-512 VNNI): the
  codes copied into 16-channel tiles (:mod:`slimformer.kernels.q8a_tiles`; at most 1.25 bytes
  per weight), activations rounded to int8 per 32 columns; a few-row path whose cost grows little
  with the rows of a speculative verify step;
- plain ``nn.Linear`` with a bf16 weight under float32 activations: ``widen-fp32`` (widened per
  call, exact), ``dequant-fp32`` (cached float32 copy), ``native`` (bf16 GEMM);
- plain ``nn.Linear`` with a float32 or bf16 weight, where slimformer's kernels build:
  ``dense-kernel`` (:mod:`slimformer.kernels.dense_linear`: the weight read in place by a few-row
  kernel, float32 arithmetic; for decoding, where the BLAS's one-row GEMV is slow on some CPUs).

:class:`PlannedForward` is installed as the module's ``forward`` (an instance attribute, so the
stored buffers, the state dict and the class are untouched; :func:`remove_planned_forward`
takes it off again): it sends few-token inputs (decoding) down one path and many-token inputs
(batches, prefill) down another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimformer.kernels import dense_linear as dense_kernel
from slimformer.kernels import q8a_tiles
from slimformer.methods.quantization.modules import W8A8_KERNELS, QuantizedLinear, QuantizedModule, int8_activation_paths


@dataclass(frozen=True)
class PathInfo:
    """``rounding``: ``exact`` (float32 arithmetic on the stored values), ``bf16`` (weight
    and/or activations rounded to bfloat16) or ``int8-act`` (float activations rounded to int8
    per block of 32 columns by the run time, not by the recipe); ``form``: the run-time tensor the path holds
    (paths sharing a form share it) and ``form_bytes``: its bytes per weight; ``max_rows``: the most
    rows (tokens) a few-row path takes (more go down the batch path; it is never a batch path)."""

    rounding: str
    form: str | None
    form_bytes: float
    summary: str
    max_rows: int | None = None  # a few-row path: inputs with more rows take the batch path


PATHS: dict[str, PathInfo] = {
    "int8-dynamic": PathInfo("exact", "int8", 1.0, "W8A8: int8 codes x per-token int8 activations, torch._int_mm, int32 accumulators"),
    "int8-onednn": PathInfo("exact", "onednn-int8", 1.0, "W8A8: the same integer product through oneDNN's quantized linear on a weight prepacked for this CPU"),
    "w8a8-fp32": PathInfo("exact", "int8", 1.0, "W8A8 codes multiplied by a float32 GEMM (exact products, fp32 accumulation)"),
    "w8a8-bf16": PathInfo("bf16", "int8", 1.0, "W8A8 codes multiplied by a bfloat16 GEMM (exact products, accumulator rounded to bf16)"),
    "int8pack": PathInfo("bf16", "int8", 1.0, "int8 weights, torch._weight_int8pack_mm (bf16 activations)"),
    "int8-widen-fp32": PathInfo("exact", "int8", 1.0, "int8 weights widened per call to float32"),
    "int8-widen-bf16": PathInfo("bf16", "int8", 1.0, "int8 weights widened per call to bfloat16"),
    "int4pack": PathInfo("bf16", "int4pack", 0.5, "int4 codes, torch int4pack CPU kernel (bf16 activations)"),
    "packed-fp32": PathInfo("exact", None, 0.0, "stored 4/8-bit codes read in place by slimformer's kernel, float32 arithmetic"),
    "packed-q8a": PathInfo("int8-act", None, 0.0, "stored 4/8-bit codes read in place, activations rounded to int8 per 32 columns, "
                                                  "integer dot products (AVX-512 VNNI, else AVX2), as llama.cpp's CPU kernels"),
    # Offered where the CPU has VNNI: which form is faster is measured, not assumed (on the 2-core
    # AMD EPYC the AVX2 form read the 8-bit linears of a one-row step faster; packed_kernel_amd.md)
    "packed-q8a-avx2": PathInfo("int8-act", None, 0.0, "packed-q8a's AVX2 form (vpmaddubsw + vpmaddwd dot products) on a CPU that also has "
                                                       "AVX-512 VNNI; the same roundings, sums in another order"),
    # A copy of the codes in channel tiles (the codes' bytes plus two float32 per group and channel:
    # at most 1.25 bytes per weight, for 8-bit codes in groups of 32); a few-row path whose cost
    # grows little with the rows of a speculative verify step (kernels/q8a_tiles.py)
    "packed-q8a-tiles": PathInfo("int8-act", "q8a-tiles", 1.25, "the codes copied into 16-channel tiles, activations rounded to int8 per 32 "
                                                                "columns, AVX-512 VNNI products shared by every row of the call", max_rows=16),
    "unpack": PathInfo("exact", None, 0.0, "dequantized per call in the activation dtype, nothing held"),
    "native": PathInfo("exact", None, 0.0, "the module's own forward (its format's unpack path)"),
    "dequant-fp32": PathInfo("exact", "fp32", 4.0, "dequantized once into a cached float32 weight"),
    "dequant-bf16": PathInfo("bf16", "bf16", 2.0, "dequantized once into a cached bfloat16 weight, bf16 GEMM"),
    "dequant-bf16-widen": PathInfo("bf16", "bf16", 2.0, "cached bfloat16 weight widened per call to a float32 GEMM"),
    "unpack-fp32": PathInfo("exact", None, 0.0, "dequantized per call into float32, nothing held"),
    "unpack-bf16": PathInfo("bf16", None, 0.0, "dequantized per call into bfloat16, bf16 GEMM, nothing held"),
    "widen-fp32": PathInfo("exact", None, 0.0, "bfloat16 weight widened per call to float32"),
    "native-bf16": PathInfo("bf16", None, 0.0, "bfloat16 weight, bfloat16 GEMM"),
    # max_rows 7 (a speculative verify step of 6 drafts): on a 2-core AMD EPYC the kernel beat
    # F.linear on float32 weights at 1-16 rows and on bf16 weights at 1-7, and lost to the bf16 GEMM
    # from 8 rows on (benchmarks/results/packed_kernel_amd.md)
    "dense-kernel": PathInfo("exact", None, 0.0, "float32 or bfloat16 weight read in place by slimformer's few-row kernel "
                                                 "(float32 arithmetic, bf16 widened exactly)", max_rows=7),
}
GENERIC_PATHS = ("dequant-fp32", "dequant-bf16", "dequant-bf16-widen", "unpack-fp32", "unpack-bf16")
DISPATCHER_PATHS = GENERIC_PATHS + ("packed-q8a-tiles",)  # forms held by the dispatcher, not by the module


def is_linear_like(module: nn.Module) -> bool:
    """A module computing ``x W^T + b`` that the planner can plan: a linear ``QuantizedModule``
    (it has ``in_features`` and a dequantized weight) or a plain ``nn.Linear``."""
    if isinstance(module, QuantizedModule):
        return hasattr(module, "in_features") and hasattr(module, "out_features")
    return isinstance(module, nn.Linear)


def is_w8a8(module: nn.Module) -> bool:
    return isinstance(module, QuantizedLinear) and module.act_bits == 8


def weight_version(module: nn.Module) -> int:
    """Changes whenever the stored weight is written in place (e.g. by ``load_state_dict``)."""
    key = module.storage_key() if isinstance(module, QuantizedModule) else module.weight
    return key._version


def skips_int8_activations(module: nn.Module, path: str) -> bool:
    """``path`` runs a W8A8 layer's stored int8 weights on float activations: the per-token int8
    rounding of its input is skipped (the product is closer to the original model's, not
    further)."""
    return is_w8a8(module) and path not in W8A8_KERNELS


def candidate_paths(module: nn.Module, act_dtype: torch.dtype, int8_activations: str = "auto") -> list[str]:
    """Every path that computes ``module``'s stored numerics here (capability only).

    A W8A8 layer's int8 activations are a run-time rounding chosen for speed, not a stored
    number: with ``int8_activations="auto"`` its weight-only paths (the same int8 weights, float
    activations) are candidates too, so that a CPU whose float units outrun its int8 ones (AMX
    bf16) is not made slower by them; ``"keep"`` offers only the W8A8 paths (bit-faithful to an
    int8 deployment). Conversely ``"auto"`` lets a weight-only 4/8-bit layer round its float
    activations to int8 per 32 columns (``packed-q8a``, as llama.cpp does), and ``"keep"`` does not."""
    if isinstance(module, QuantizedModule):
        if isinstance(module, QuantizedLinear):
            native = list(module.available_kernels())
        else:  # other formats: their forward, and the packed-code kernel where they offer it
            native = ["native"] + (["packed-fp32"] if hasattr(module, "packed_forward") and module.packed_kernel_ok() else [])
            if hasattr(module, "int8_activations_ok") and module.int8_activations_ok():
                native += int8_activation_paths()
        if "packed-q8a" in native and hasattr(module, "packed_layout") and q8a_tiles.available():
            layout = module.packed_layout()
            if q8a_tiles.supports(layout["bits"], layout["group_size"], module.in_features):
                native.insert(native.index("packed-q8a") + 1, "packed-q8a-tiles")
        if int8_activations == "keep":  # activations as the recipe left them: no run-time int8 rounding added
            native = [p for p in native if PATHS.get(p, PATHS["native"]).rounding != "int8-act"]
        if is_w8a8(module):
            if int8_activations == "keep":
                return native
            # its weight-only alternatives on float activations (not a second, per-block int8 rounding)
            return native + [p for p in module.available_kernels(int8_activations=False) + GENERIC_PATHS
                             if p not in native and PATHS[p].rounding != "int8-act"]
        return native + list(GENERIC_PATHS)
    kernel = ["dense-kernel"] if module.weight.dtype in (torch.float32, torch.bfloat16) and dense_kernel.available() else []
    if module.weight.dtype == torch.float32 or act_dtype == module.weight.dtype:
        return ["native", *kernel]
    return ["widen-fp32", "dequant-fp32", "native-bf16", *kernel]


def form_bytes(module: nn.Module, paths: tuple[str, ...]) -> float:
    """Bytes per weight of the run-time forms ``paths`` hold together (shared forms once)."""
    forms = {PATHS[p].form: PATHS[p].form_bytes for p in paths if PATHS[p].form}
    return sum(forms.values())


class PlannedForward:
    """The forward installed on a planned layer: inputs with fewer than ``split_rows`` rows
    (tokens) take ``decode``, the others ``batch``. Input ``x`` (..., in); output (..., out) in
    ``x.dtype``."""

    def __init__(self, module: nn.Module, decode: str, batch: str, split_rows: int, also: tuple[str, ...] = ()) -> None:
        self.module = module
        self.decode = decode
        self.batch = batch
        self.split_rows = split_rows
        self.also = tuple(also)  # further paths made ready (the planner times them all at once)
        self.batch_when_traced = False  # set by runtime.compile for dynamic-shape whole-model graphs
        self.forms: dict[str, torch.Tensor] = {}
        self.tiles: q8a_tiles.Tiles | None = None  # the packed-q8a-tiles form
        self.version = -1
        self.build()

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.decode, self.batch, *self.also)))

    def label(self) -> str:
        return self.batch if self.decode == self.batch else f"{self.decode}|{self.batch}"

    def build(self) -> None:
        """(Re)build the run-time forms from the stored weight."""
        m = self.module
        self.forms = {}
        if isinstance(m, QuantizedLinear):
            kernels = [p for p in self.paths if p in PATHS and p not in DISPATCHER_PATHS and p != "native"]
            m.use_kernels(*(kernels or ["unpack"]))  # "unpack" holds nothing: no unused kernel form stays
        forms = {PATHS[p].form for p in self.paths}
        if forms & {"fp32", "bf16"}:
            w = m.dequantized_weight() if isinstance(m, QuantizedModule) else m.weight.detach()
            if "fp32" in forms:
                self.forms["fp32"] = w.float().contiguous()
            if "bf16" in forms:
                self.forms["bf16"] = w.to(torch.bfloat16).contiguous()
        self.tiles = None
        if "q8a-tiles" in forms:
            layout = m.packed_layout()
            self.tiles = q8a_tiles.pack(layout["qweight"], layout["scales"], layout["zeros"], layout["bits"], layout["group_size"],
                                        m.in_features, mins=layout["mins"])
        bias = getattr(m, "bias", None)
        self.forms_bias = {} if bias is None else {torch.float32: bias.detach().float(), torch.bfloat16: bias.detach().to(torch.bfloat16)}
        self.version = weight_version(m)

    def held_tensors(self) -> list[torch.Tensor]:
        """The run-time forms this dispatcher holds (kernel forms are the module's own)."""
        tiles = [] if self.tiles is None else [self.tiles.tiles, self.tiles.scales, self.tiles.offsets]
        return list(self.forms.values()) + tiles

    def nbytes(self) -> int:
        """Bytes of the run-time forms this dispatcher holds."""
        return sum(t.numel() * t.element_size() for t in self.held_tensors())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_when_traced and torch.compiler.is_compiling():
            # A whole forward compiled with dynamic shapes (runtime.compile): comparing the
            # symbolic row count would guard on it and recompile for every bucket shape crossing
            # ``split_rows``; both paths compute the same stored numbers, so take the batch one.
            return self.run(self.batch, x)
        rows = x.numel() // max(1, x.shape[-1])
        info = PATHS.get(self.decode)
        cap = info.max_rows if info else None  # a few-row path's limit
        return self.run(self.decode if rows < self.split_rows and (cap is None or rows <= cap) else self.batch, x)

    def run(self, path: str, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        # A tensor's in-place version counter cannot be read inside a compiled graph (torch.compile
        # of the decode step): there the forms built before compiling are used; eager calls rebuild
        # them after an in-place write of the stored weight.
        if not torch.compiler.is_compiling() and self.version != weight_version(m):
            self.build()
        if path == "native":
            if isinstance(m, QuantizedModule):
                return type(m).forward(m, x)
            return F.linear(x, m.weight, m.bias)
        if isinstance(m, QuantizedLinear) and path in m._ready:
            return m.compute(x, path)
        if path == "packed-fp32" and hasattr(m, "packed_forward"):
            return m.packed_forward(x)
        if path in ("packed-q8a", "packed-q8a-avx2") and hasattr(m, "packed_forward"):
            return m.packed_forward(x, int8_activations=True, portable=path == "packed-q8a-avx2")
        b32 = self.forms_bias.get(torch.float32)
        if path == "packed-q8a-tiles":
            return q8a_tiles.linear(x, self.tiles, b32)
        if path == "dequant-fp32":
            return F.linear(x.float(), self.forms["fp32"], b32).to(x.dtype)
        if path == "dequant-bf16":
            return F.linear(x.to(torch.bfloat16), self.forms["bf16"], self.forms_bias.get(torch.bfloat16)).to(x.dtype)
        if path == "dequant-bf16-widen":
            return F.linear(x.float(), self.forms["bf16"].float(), b32).to(x.dtype)
        if path == "unpack-fp32":
            return F.linear(x.float(), m.dequantized_weight(), b32).to(x.dtype)
        if path == "unpack-bf16":
            return F.linear(x.to(torch.bfloat16), m.dequantized_weight().to(torch.bfloat16), self.forms_bias.get(torch.bfloat16)).to(x.dtype)
        if path == "widen-fp32":
            return F.linear(x.float(), m.weight.float(), b32).to(x.dtype)
        if path == "native-bf16":
            return F.linear(x.to(m.weight.dtype), m.weight, m.bias).to(x.dtype)
        if path == "dense-kernel":
            return dense_kernel.dense_linear(x, m.weight, b32)
        raise ValueError(f"execution path {path!r} is not ready on {type(m).__name__}")


def install_planned_forward(module: nn.Module, decode: str, batch: str, split_rows: int) -> PlannedForward:
    """Route ``module``'s forward through a :class:`PlannedForward` (replacing an earlier one)."""
    remove_planned_forward(module)
    planned = PlannedForward(module, decode, batch, split_rows)
    module.forward = planned  # instance attribute: nn.Module.__call__ finds it before the class's
    module._slimformer_execution = planned
    return planned


def remove_planned_forward(module: nn.Module) -> None:
    """Back to the module's class forward and its capability-chosen kernel."""
    planned = module.__dict__.pop("_slimformer_execution", None)
    if planned is None:
        return
    module.__dict__.pop("forward", None)
    if isinstance(module, QuantizedLinear):
        from slimformer.methods.quantization.modules import choose_kernel

        module.use_kernels(choose_kernel(module.bits, module.group_size, module.in_features, module.out_features, module.act_bits))


class PlannedEmbedding:
    """The forward installed on a quantized embedding table the planner keeps dense: the stored
    table dequantized once into the module's compute dtype (``table`` (num_embeddings, dim)),
    rows gathered from it. Input ids (...,) int64 -> (..., dim) in the module's compute dtype.
    For ``QuantizedEmbedding`` it is bit-identical to the module's own gather-then-dequantize
    (each row dequantized in float32 and rounded to the compute dtype either way); the planner
    checks the equality for every table format before keeping it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.table = torch.empty(0)
        self.version = -1
        self.build()

    def build(self) -> None:
        m = self.module
        self.table = m.dequantized_weight().to(m.compute_dtype).contiguous()
        self.version = weight_version(m)

    def held_tensors(self) -> list[torch.Tensor]:
        return [self.table]

    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    def label(self) -> str:
        return f"dense-{str(self.table.dtype).replace('torch.', '')}"

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and (self.version != weight_version(self.module) or self.table.dtype != self.module.compute_dtype):
            self.build()
        return F.embedding(input_ids, self.table)


def install_planned_embedding(module: nn.Module) -> PlannedEmbedding:
    """Route a ``QuantizedEmbedding``'s forward through a dense :class:`PlannedEmbedding`."""
    remove_planned_forward(module)
    planned = PlannedEmbedding(module)
    module.forward = planned
    module._slimformer_execution = planned
    return planned


def planned_forward_of(module: nn.Module) -> PlannedForward | PlannedEmbedding | None:
    return module.__dict__.get("_slimformer_execution")


def planned_nbytes(module: nn.Module) -> int:
    """Bytes held by a planned layer's dispatcher (0 when not planned)."""
    planned = planned_forward_of(module)
    return 0 if planned is None else planned.nbytes()
