"""Modules that hold non-uniform (codebook) quantized weights in packed form and compute from it.

Scalar codebooks (``LUTLinear``, ``LUTEmbedding``; used by NF4 and FP4). Stored buffers:

- ``qweight`` (rows, ceil(cols*bits/8)) uint8: codes packed with :func:`grid.pack_codes`;
- ``lut`` (2**bits,) float32: the level each code stands for (64 bytes for 4 bits);
- ``scales`` (rows, groups) bfloat16: one scale per (row, group of ``group_size`` columns);
- ``bias`` (out,) float32, linears only, when the layer has one.

``weight[r, c] = lut[code[r, c]] * scales[r, c // group_size]``.

Vector codebooks (``VQLinear``; used by VPTQ). The weight (out, in) is split along the input
dimension into vectors of ``vector_dim`` columns; each stage ``s`` stores ``codebook{s}``
(K_s, vector_dim) bfloat16 and ``indices{s}`` (out, ceil(in/vector_dim*log2(K_s)/8)) uint8 (one
packed index per vector); ``scales`` (out,) bfloat16 (when ``row_scale``) and ``bias``.
``weight[r, j*d:(j+1)*d] = scales[r] * sum_s codebook{s}[index_s[r, j]]``.

Execution (``kernel``):

- ``lut-unpack``: only the packed codes are held; each forward expands them in the compute dtype
  through a 256-entry byte table (each byte -> its ``8/bits`` levels; one gather per byte, no
  shifts), multiplies by the scales and runs ``F.linear``. The only run-time tensor is that
  table ((256, 8/bits) values). Widths that do not divide a byte (3 bits) unpack with shifts.
- ``vq-unpack``: the packed indices are unpacked and gathered from the (tiny) codebooks on every
  forward, then ``F.linear``. Nothing is held beside the stored buffers.

Both compute in the model's float dtype (bfloat16 after ``cast``, which is fast on this CPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from slimformer.methods.quantization import grid
from slimformer.methods.quantization.modules import QuantizedModule, register_quantized_module, tensor_bits

BYTE_LUT_BITS = (1, 2, 4, 8)


def byte_table(lut: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8 // bits) table: the levels of the codes packed in each byte value, in ``dtype``.

    ``lut`` (2**bits,) float. Code ``k`` of a byte sits at bits ``[k*bits, (k+1)*bits)``, as
    :func:`grid.pack_codes` writes them.
    """
    per_byte = 8 // bits
    byte = torch.arange(256, dtype=torch.int32).unsqueeze(1)
    codes = (byte >> (torch.arange(per_byte, dtype=torch.int32) * bits)) & (2**bits - 1)
    return lut.float()[codes.long()].to(dtype)


def lut_values(qweight: torch.Tensor, lut: torch.Tensor, bits: int, cols: int, table: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Levels (rows, cols) in ``dtype`` of packed codes ``qweight`` (rows, packed bytes) uint8.

    ``table`` is :func:`byte_table` (or None to build nothing and unpack with shifts).
    """
    rows = qweight.shape[0]
    if table is not None and bits in BYTE_LUT_BITS:  # index_select: ~3x faster than t[idx] here
        values = table.index_select(0, qweight.reshape(-1).int()).reshape(rows, -1)
        return values if values.shape[1] == cols else values[:, :cols]
    codes = grid.unpack_codes(qweight, bits, cols)
    return lut.to(dtype).index_select(0, codes.reshape(-1).int()).reshape(rows, cols)


def apply_group_scales(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``values`` (rows, cols) times ``scales`` (rows, groups), group-wise along cols."""
    rows, cols = values.shape
    groups = scales.shape[1]
    return (values.reshape(rows, groups, cols // groups) * scales.to(values.dtype).unsqueeze(-1)).reshape(rows, cols)


class LUTWeight(QuantizedModule):
    """Storage shared by the scalar-codebook modules (see the module docstring)."""

    kernel = "lut-unpack"

    def _init_lut(self, rows: int, cols: int, bits: int, group_size: int | None, fmt: str) -> None:
        if not 1 <= bits <= 8:
            raise ValueError(f"bits={bits} must be in 1..8")
        if group_size is not None and cols % group_size:
            raise ValueError(f"group_size {group_size} does not divide the width {cols}")
        self.bits = bits
        self.group_size = group_size
        self.format = fmt
        self._cols = cols
        self.compute_dtype = torch.float32
        self.register_buffer("qweight", torch.zeros(rows, grid.packed_row_bytes(cols, bits), dtype=torch.uint8))
        self.register_buffer("lut", torch.zeros(2**bits, dtype=torch.float32))
        self.register_buffer("scales", torch.ones(rows, grid.num_groups(cols, group_size), dtype=torch.bfloat16))
        self._runtime: dict[str, torch.Tensor] = {}
        self.register_load_state_dict_post_hook(lambda module, _keys: module.prepare())

    def _store(self, codes: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor) -> None:
        """``codes`` (rows, cols) uint8 < 2**bits, ``lut`` (2**bits,), ``scales`` (rows, groups)."""
        self.qweight.copy_(grid.pack_codes(codes, self.bits))
        self.lut.copy_(lut.float())
        self.scales.copy_(scales.to(torch.bfloat16))
        self.prepare()

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.qweight.shape[0], self._cols)

    def stored_bits(self) -> int:
        return tensor_bits(self.qweight, self.lut, self.scales)

    def storage_key(self) -> torch.Tensor:
        return self.qweight

    def prepare(self) -> None:
        """Build the byte table in the compute dtype (nothing else is kept at run time)."""
        self._runtime = {"table": byte_table(self.lut, self.bits, self.compute_dtype)} if self.bits in BYTE_LUT_BITS else {}

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        self.compute_dtype = dtype
        self.prepare()

    def runtime_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._runtime.values())

    def codes(self) -> torch.Tensor:
        """Unpacked codes (rows, cols) uint8."""
        return grid.unpack_codes(self.qweight, self.bits, self._cols)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight (rows, cols): ``lut[codes] * scales`` group-wise."""
        return apply_group_scales(self.lut[self.codes().long()], self.scales.float())

    def weight_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight (rows, cols) expanded from the packed codes in ``dtype`` (run-time path)."""
        table = self._runtime.get("table")
        if table is not None and table.dtype != dtype:
            table = byte_table(self.lut, self.bits, dtype)
        return apply_group_scales(lut_values(self.qweight, self.lut, self.bits, self._cols, table, dtype), self.scales)


@register_quantized_module
class LUTLinear(LUTWeight):
    """A linear layer ``y = x W^T + b`` whose ``W`` (out, in) is ``lut[codes] * scales``.

    Input ``x`` (..., in_features) of any float dtype; output (..., out_features) in ``x.dtype``;
    the weight is expanded from the packed codes in the compute dtype on every call.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None, bias: bool, fmt: str = "lut") -> None:
        super().__init__()
        self._init_lut(out_features, in_features, bits, group_size, fmt)
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None
        self.prepare()

    @classmethod
    def from_codes(cls, codes: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor, group_size: int | None, bias: torch.Tensor | None, fmt: str = "lut") -> "LUTLinear":
        """Build from codes (out, in) uint8, ``lut`` (2**bits,), ``scales`` (out, groups), ``bias`` (out,)."""
        out_features, in_features = codes.shape
        bits = int(math.log2(lut.numel()))
        module = cls(in_features, out_features, bits, group_size, bias is not None, fmt)
        if bias is not None:
            module.bias.copy_(bias.detach().float())
        module._store(codes, lut, scales)
        return module

    @classmethod
    def from_description(cls, desc: dict) -> "LUTLinear":
        return cls(desc["in_features"], desc["out_features"], desc["bits"], desc["group_size"], desc["bias"], desc.get("format", "lut"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype if self.compute_dtype in (torch.float32, torch.bfloat16, torch.float16) else x.dtype
        w = self.weight_in(dtype)
        y = F.linear(x.to(dtype), w, None if self.bias is None else self.bias.to(dtype))
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, bits={self.bits}, group_size={self.group_size}, kernel={self.kernel}"

    def describe(self) -> dict:
        return {
            "type": "LUTLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "bias": self.bias is not None,
            "format": self.format,
            "kernel": self.kernel,
        }


@register_quantized_module
class LUTEmbedding(LUTWeight):
    """A token-embedding table (num_embeddings, dim) stored row-wise as packed codebook codes.

    Input ids (...,) int64; output (..., dim) in the compute dtype. Only gathered rows are expanded.
    """

    kernel = "lut-gather"

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int | None, fmt: str = "lut", padding_idx: int | None = None) -> None:
        super().__init__()
        self._init_lut(num_embeddings, embedding_dim, bits, group_size, fmt)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.prepare()

    @classmethod
    def from_codes(cls, codes: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor, group_size: int | None, fmt: str = "lut", padding_idx: int | None = None) -> "LUTEmbedding":
        """Build from codes (num_embeddings, dim) uint8, ``lut`` (2**bits,), ``scales`` (num_embeddings, groups)."""
        n, d = codes.shape
        module = cls(n, d, int(math.log2(lut.numel())), group_size, fmt, padding_idx)
        module._store(codes, lut, scales)
        return module

    @classmethod
    def from_description(cls, desc: dict) -> "LUTEmbedding":
        return cls(desc["num_embeddings"], desc["embedding_dim"], desc["bits"], desc["group_size"], desc.get("format", "lut"), desc.get("padding_idx"))

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized table (num_embeddings, dim), for code that reads ``.weight``."""
        return self.dequantized_weight()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        table = self._runtime.get("table")
        if table is not None:
            table = table.float()
        values = lut_values(self.qweight[flat], self.lut, self.bits, self.embedding_dim, table, torch.float32)
        rows = apply_group_scales(values, self.scales[flat].float())
        return rows.reshape(*input_ids.shape, self.embedding_dim).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.format}, bits={self.bits}, group_size={self.group_size}"

    def describe(self) -> dict:
        return {
            "type": "LUTEmbedding",
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "bits": self.bits,
            "group_size": self.group_size,
            "format": self.format,
            "padding_idx": self.padding_idx,
            "kernel": self.kernel,
        }


def share_lut_storage(dst: LUTWeight, src: LUTWeight) -> None:
    """Make ``dst`` hold the very tensors of ``src`` (a tied embedding/head pair is stored once)."""
    for buffer in ("qweight", "lut", "scales"):
        dst._buffers[buffer] = src._buffers[buffer]
    dst.prepare()


@register_quantized_module
class VQLinear(QuantizedModule):
    """A linear layer whose weight (out, in) is vector-quantized (see the module docstring).

    ``codebook_sizes``: K of each stage (powers of two, 2..256; stage 2 onwards code the residual
    of the earlier stages). Input ``x`` (..., in_features); output (..., out_features) in ``x.dtype``.
    """

    kernel = "vq-unpack"

    def __init__(self, in_features: int, out_features: int, vector_dim: int, codebook_sizes: list[int] | tuple[int, ...], row_scale: bool, bias: bool) -> None:
        super().__init__()
        if in_features % vector_dim:
            raise ValueError(f"vector_dim {vector_dim} does not divide the width {in_features}")
        for k in codebook_sizes:
            if k < 2 or k > 256 or k & (k - 1):
                raise ValueError(f"codebook size {k} must be a power of two in 2..256")
        self.in_features = in_features
        self.out_features = out_features
        self.vector_dim = vector_dim
        self.codebook_sizes = tuple(int(k) for k in codebook_sizes)
        self.index_bits = tuple(int(math.log2(k)) for k in self.codebook_sizes)
        self.compute_dtype = torch.float32
        nvec = in_features // vector_dim
        for s, (k, b) in enumerate(zip(self.codebook_sizes, self.index_bits)):
            self.register_buffer(f"codebook{s}", torch.zeros(k, vector_dim, dtype=torch.bfloat16))
            self.register_buffer(f"indices{s}", torch.zeros(out_features, grid.packed_row_bytes(nvec, b), dtype=torch.uint8))
        if row_scale:
            self.register_buffer("scales", torch.ones(out_features, dtype=torch.bfloat16))
        else:
            self.scales = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None

    @classmethod
    def from_indices(cls, codebooks: list[torch.Tensor], indices: list[torch.Tensor], scales: torch.Tensor | None, bias: torch.Tensor | None) -> "VQLinear":
        """Build from ``codebooks`` [(K_s, d)], ``indices`` [(out, in/d) integer], ``scales`` (out,), ``bias`` (out,)."""
        out_features, nvec = indices[0].shape
        d = codebooks[0].shape[1]
        module = cls(nvec * d, out_features, d, [c.shape[0] for c in codebooks], scales is not None, bias is not None)
        for s, (c, idx) in enumerate(zip(codebooks, indices)):
            getattr(module, f"codebook{s}").copy_(c.to(torch.bfloat16))
            getattr(module, f"indices{s}").copy_(grid.pack_codes(idx.to(torch.uint8), module.index_bits[s]))
        if scales is not None:
            module.scales.copy_(scales.to(torch.bfloat16))
        if bias is not None:
            module.bias.copy_(bias.detach().float())
        return module

    @classmethod
    def from_description(cls, desc: dict) -> "VQLinear":
        return cls(desc["in_features"], desc["out_features"], desc["vector_dim"], desc["codebook_sizes"], desc["row_scale"], desc["bias"])

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def stages(self) -> int:
        return len(self.codebook_sizes)

    def indices(self, stage: int) -> torch.Tensor:
        """Unpacked indices (out, in/vector_dim) uint8 of ``stage``."""
        return grid.unpack_codes(getattr(self, f"indices{stage}"), self.index_bits[stage], self.in_features // self.vector_dim)

    def stored_bits(self) -> int:
        tensors = [getattr(self, f"codebook{s}") for s in range(self.stages)] + [getattr(self, f"indices{s}") for s in range(self.stages)]
        return tensor_bits(*tensors, self.scales)

    def storage_key(self) -> torch.Tensor:
        return self.indices0

    def weight_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight (out, in) gathered from the codebooks in ``dtype``."""
        w = None
        for s in range(self.stages):
            part = getattr(self, f"codebook{s}").to(dtype).index_select(0, self.indices(s).reshape(-1).int())
            w = part if w is None else w + part
        w = w.reshape(self.out_features, self.in_features)
        if self.scales is not None:
            w = w * self.scales.to(dtype).unsqueeze(1)
        return w

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight (out, in)."""
        return self.weight_in(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype if self.compute_dtype in (torch.float32, torch.bfloat16, torch.float16) else x.dtype
        y = F.linear(x.to(dtype), self.weight_in(dtype), None if self.bias is None else self.bias.to(dtype))
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, vector_dim={self.vector_dim}, codebook_sizes={list(self.codebook_sizes)}, kernel={self.kernel}"

    def describe(self) -> dict:
        return {
            "type": "VQLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "vector_dim": self.vector_dim,
            "codebook_sizes": list(self.codebook_sizes),
            "row_scale": self.scales is not None,
            "bias": self.bias is not None,
            "kernel": self.kernel,
        }


__all__ = ["LUTEmbedding", "LUTLinear", "LUTWeight", "VQLinear", "byte_table", "share_lut_storage"]
