"""GGUF's own block formats (llama.cpp's Q8_0, Q4_0 and Q4_1) held as packed modules of ours.

A weight (rows, cols) is cut along ``cols`` into blocks of 32 values; each block has an fp16
scale ``d`` and, for Q4_1, an fp16 *minimum* ``m`` (a float offset, not an integer zero point):

- ``Q8_0``: int8 ``q`` in [-128, 127]; value ``q * d``;
- ``Q4_0``: 4-bit ``q`` in [0, 15]; value ``(q - 8) * d``;
- ``Q4_1``: 4-bit ``q`` in [0, 15]; value ``q * d + m``.

The modules store ``qweight`` (rows, cols * bits / 8) uint8 (our row-wise bit packing, codes
``q`` unsigned: Q8_0 keeps ``q + 128``), ``scales`` (rows, cols / 32) float16 and, for Q4_1,
``mins`` (rows, cols / 32) float16. Dequantization follows ggml's arithmetic in float32 operation
for operation, so ``dequantized_weight()`` equals ``gguf.quants.dequantize`` of the same blocks
bit for bit. These are what a GGUF's quantized tensors become when a GGUF is loaded with
``keep_quantized`` (see ``slimformer.io.gguf_import``), and what ``slimformer.io.gguf_export``
writes back byte for byte. Forward passes dequantize this layer's weight per call (``unpack``
path): memory holds the packed blocks only. ``GGUFBlockLinear.packed_forward`` runs the same
blocks through slimformer's packed-code kernel (:mod:`slimformer.kernels`; float32 arithmetic,
one rounding per dequantized weight where ggml's takes two), which the execution planner offers as
the ``packed-fp32`` path, and with the activations rounded to int8 per block of 32 (as ggml's
CPU dot products do) as ``packed-q8a``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from slimformer import kernels as kernels_lib
from slimformer.methods.quantization import grid
from slimformer.methods.quantization.modules import QuantizedModule, register_quantized_module, tensor_bits

BLOCK = 32
GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1")
BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4}
OFFSET = {"Q8_0": 128, "Q4_0": 8, "Q4_1": 0}  # stored unsigned code minus this = ggml's q


def _check_type(gguf_type: str, cols: int) -> None:
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"GGUF block type {gguf_type!r} is not supported; use one of {GGUF_TYPES}")
    if cols % BLOCK:
        raise ValueError(f"width {cols} is not a multiple of the GGUF block size {BLOCK}")


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, gguf_type: str) -> torch.Tensor:
    """Float32 weight (rows, cols) from unsigned codes (rows, cols) uint8, ``scales`` (rows, blocks)
    float16 and ``mins`` (rows, blocks) float16 or None, with ggml's float32 arithmetic."""
    rows, cols = codes.shape
    q = codes.reshape(rows, cols // BLOCK, BLOCK).to(torch.int32) - OFFSET[gguf_type]
    d = scales.float().unsqueeze(-1)
    w = q.float() * d
    if gguf_type == "Q4_1":
        w = w + mins.float().unsqueeze(-1)
    return w.reshape(rows, cols)


# ----- ggml's byte layout of one row of blocks --------------------------------------------------
def blocks_from_codes(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None, gguf_type: str) -> np.ndarray:
    """GGUF tensor bytes (rows, cols / 32 * block_bytes) uint8 from unsigned codes (rows, cols)
    uint8, ``scales`` (rows, blocks) float16 and ``mins`` (rows, blocks) float16 (Q4_1)."""
    rows, cols = codes.shape
    nb = cols // BLOCK
    q = codes.reshape(rows, nb, BLOCK).astype(np.uint8)
    d = scales.astype(np.float16).reshape(rows, nb, 1).view(np.uint8)
    if gguf_type == "Q8_0":
        qs = (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        parts = [d, qs]
    else:
        qs = q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << np.uint8(4))  # low nibble j, high nibble j + 16
        parts = [d] + ([mins.astype(np.float16).reshape(rows, nb, 1).view(np.uint8)] if gguf_type == "Q4_1" else []) + [qs]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def codes_from_blocks(data: np.ndarray, cols: int, gguf_type: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Inverse of :func:`blocks_from_codes`: GGUF bytes (rows, row_bytes) uint8 -> ``(codes
    (rows, cols) uint8, scales (rows, blocks) float16, mins (rows, blocks) float16 or None)``."""
    rows = data.shape[0]
    nb = cols // BLOCK
    b = np.ascontiguousarray(data).reshape(rows, nb, -1)
    scales = b[..., 0:2].copy().view(np.float16).reshape(rows, nb)
    mins = None
    if gguf_type == "Q8_0":
        codes = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:
        start = 2
        if gguf_type == "Q4_1":
            mins = b[..., 2:4].copy().view(np.float16).reshape(rows, nb)
            start = 4
        qs = b[..., start:]
        codes = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)
    return codes.reshape(rows, cols), scales, mins


class GGUFBlockWeight(QuantizedModule):
    """Storage shared by the GGUF block modules (see the module docstring)."""

    kernel = "unpack"

    def _init_blocks(self, rows: int, cols: int, gguf_type: str) -> None:
        _check_type(gguf_type, cols)
        self.gguf_type = gguf_type
        self.bits = BITS[gguf_type]
        self.group_size = BLOCK
        self._cols = cols
        self.compute_dtype = torch.float32
        self.register_buffer("qweight", torch.zeros(rows, grid.packed_row_bytes(cols, self.bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(rows, cols // BLOCK, dtype=torch.float16))
        if gguf_type == "Q4_1":
            self.register_buffer("mins", torch.zeros(rows, cols // BLOCK, dtype=torch.float16))
        else:
            self.mins = None

    def _store(self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> None:
        if int(codes.max()) >= 2**self.bits:
            raise ValueError(f"codes exceed {self.bits} bits")
        self.qweight.copy_(grid.pack_codes(codes.to(torch.uint8), self.bits))
        self.scales.copy_(scales.to(torch.float16))
        if self.mins is not None:
            self.mins.copy_(mins.to(torch.float16))

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.qweight.shape[0], self._cols)

    def codes(self) -> torch.Tensor:
        """Unsigned codes (rows, cols) uint8 (ggml's ``q`` plus 128 for Q8_0, 8 for Q4_0)."""
        return grid.unpack_codes(self.qweight, self.bits, self._cols)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight (rows, cols), equal to ggml's dequantization of the blocks."""
        return dequantize_blocks(self.codes(), self.scales, self.mins, self.gguf_type)

    def gguf_bytes(self) -> np.ndarray:
        """This weight in ggml's block layout: (rows, cols / 32 * block_bytes) uint8."""
        mins = None if self.mins is None else self.mins.numpy()
        return blocks_from_codes(self.codes().numpy(), self.scales.numpy(), mins, self.gguf_type)

    def stored_bits(self) -> int:
        return tensor_bits(self.qweight, self.scales, self.mins)

    def storage_key(self) -> torch.Tensor:
        return self.qweight


@register_quantized_module
class GGUFBlockLinear(GGUFBlockWeight):
    """A linear layer ``y = x W^T + b`` whose ``W`` (out, in) is held in a GGUF block format.

    Input ``x`` (..., in_features); output (..., out_features) in ``x.dtype``.
    """

    def __init__(self, in_features: int, out_features: int, gguf_type: str, bias: bool) -> None:
        super().__init__()
        self._init_blocks(out_features, in_features, gguf_type)
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None

    @classmethod
    def from_blocks(cls, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, gguf_type: str, bias: torch.Tensor | None = None) -> "GGUFBlockLinear":
        """Build from unsigned codes (out, in), ``scales``/``mins`` (out, in / 32) and ``bias`` (out,)."""
        out_features, in_features = codes.shape
        module = cls(in_features, out_features, gguf_type, bias is not None)
        module._store(codes, scales, mins)
        if bias is not None:
            module.bias.copy_(bias.detach().float())
        return module

    @classmethod
    def from_description(cls, desc: dict) -> "GGUFBlockLinear":
        return cls(desc["in_features"], desc["out_features"], desc["gguf_type"], desc["bias"])

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight (out, in), for code that reads ``.weight``."""
        return self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def packed_kernel_ok(self) -> bool:
        """Whether :meth:`packed_forward` can run here (the kernel built on this machine)."""
        return kernels_lib.supports(self.bits, BLOCK, self.in_features) and kernels_lib.packed_linear_available()

    def int8_activations_ok(self) -> bool:
        """Whether :meth:`packed_forward` can also run with int8 activations here."""
        return self.packed_kernel_ok() and kernels_lib.int8_activations_available()

    def packed_layout(self) -> dict:
        """The stored buffers in the packed kernels' conventions (``qweight``, ``scales``, ``zeros``
        None: the implicit zero point, ``mins`` for Q4_1, ``bits``, ``group_size``)."""
        return {"qweight": self.qweight, "scales": self.scales, "zeros": None, "mins": self.mins, "bits": self.bits, "group_size": BLOCK}

    def packed_forward(self, x: torch.Tensor, int8_activations: bool = False, portable: bool = False) -> torch.Tensor:
        """The blocks read in place by slimformer's kernel: ``x`` (..., in) -> (..., out) in ``x.dtype``.
        Q4_0 and Q8_0 use the kernel's implicit zero point (8, 128), Q4_1 its fp16 minima. With
        ``int8_activations`` ``x`` is rounded to int8 per block of 32, as llama.cpp does for these types
        (``portable``: the kernel's AVX2 form on a CPU with VNNI)."""
        return kernels_lib.packed_linear_nd(x, self.qweight, self.scales, None, self.bits, BLOCK, self.bias, mins=self.mins,
                                            int8_activations=int8_activations, portable=portable)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, gguf_type={self.gguf_type}, bias={self.bias is not None}"

    def describe(self) -> dict:
        return {
            "type": "GGUFBlockLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "gguf_type": self.gguf_type,
            "bits": self.bits,
            "group_size": BLOCK,
            "bias": self.bias is not None,
            "kernel": self.kernel,
        }


@register_quantized_module
class GGUFBlockEmbedding(GGUFBlockWeight):
    """A token-embedding table (num_embeddings, dim) held in a GGUF block format.

    Input ids (...,) int64; output (..., dim) in the compute dtype. Only gathered rows are dequantized.
    """

    kernel = "gather-dequant"

    def __init__(self, num_embeddings: int, embedding_dim: int, gguf_type: str, padding_idx: int | None = None) -> None:
        super().__init__()
        self._init_blocks(num_embeddings, embedding_dim, gguf_type)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx

    @classmethod
    def from_blocks(cls, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, gguf_type: str, padding_idx: int | None = None) -> "GGUFBlockEmbedding":
        """Build from unsigned codes (num_embeddings, dim) and ``scales``/``mins`` (num_embeddings, dim / 32)."""
        n, d = codes.shape
        module = cls(n, d, gguf_type, padding_idx)
        module._store(codes, scales, mins)
        return module

    @classmethod
    def from_description(cls, desc: dict) -> "GGUFBlockEmbedding":
        return cls(desc["num_embeddings"], desc["embedding_dim"], desc["gguf_type"], desc.get("padding_idx"))

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized_weight()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        codes = grid.unpack_codes(self.qweight[flat], self.bits, self.embedding_dim)
        mins = None if self.mins is None else self.mins[flat]
        rows = dequantize_blocks(codes, self.scales[flat], mins, self.gguf_type)
        return rows.reshape(*input_ids.shape, self.embedding_dim).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, gguf_type={self.gguf_type}"

    def describe(self) -> dict:
        return {
            "type": "GGUFBlockEmbedding",
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "gguf_type": self.gguf_type,
            "bits": self.bits,
            "group_size": BLOCK,
            "padding_idx": self.padding_idx,
            "kernel": self.kernel,
        }


def tie_blocks(head: GGUFBlockLinear, embedding: GGUFBlockEmbedding) -> None:
    """Make ``head`` hold the very tensors of ``embedding`` (a tied pair is stored once)."""
    for name in ("qweight", "scales", "mins"):
        if embedding._buffers.get(name) is not None:
            head._buffers[name] = embedding._buffers[name]
