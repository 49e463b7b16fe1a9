"""Sparse storage of a pruned linear layer: where the kept weights are, plus their values.

``SparseLinear`` stores, for a weight (out, in):

- the positions of the kept weights, either
  - ``bitmap`` (out, ceil(in/8)) uint8: one bit per weight (unstructured sparsity), or
  - ``nm_index`` (out, ceil(in/M * b / 8)) uint8: for an N:M pattern, one ``b``-bit code per group
    of M columns naming which of the C(M, N) choices of N positions is kept
    (``b = ceil(log2 C(M, N))``: 3 bits per 4 weights for 2:4, 7 bits per 8 for 4:8);
- the kept values in row-major order of their positions, either
  - ``values`` (nnz,) in the model's float dtype (float32 or bfloat16), or
  - ``qvalues`` (1, ceil(nnz*bits/8)) uint8: packed ``bits``-bit codes on the grid of
    :mod:`slimformer.methods.quantization.grid`, with ``scales`` (out, groups) bfloat16 and
    (asymmetric) ``zeros`` (out, groups) uint8 per group of ``group_size`` input columns of the
    dense layout.

Stored bits (see :func:`sparse_stored_bits`, checked by the tests against the saved bytes):
``index + nnz * value_bits + scales/zeros``. A 50 %-sparse layer with float32 values takes
``1 + 16`` bits per weight instead of 32; with 4-bit values (group 128, asymmetric)
``1 + 2 + 0.19`` instead of ``4.19``. The positions of an unstructured 50 % mask carry one bit
of information per weight, so no encoding of them can take less than one bit.

Execution (``kernel``), measured on this CPU in ``benchmarks/sparsity_lowrank.py``:

- ``dense`` (default): the dense weight is rebuilt once when the layer is prepared (built or
  loaded) and kept beside the stored form (counted in ``runtime_nbytes``); the product is the
  ordinary dense one, so the file shrinks but neither run-time memory nor speed changes.
  Chosen because no sparse path measured faster than the dense product on this CPU;
- ``reconstruct``: each forward rebuilds this layer's dense weight from the stored form,
  computes and drops it, so memory holds only the sparse form; every call pays the rebuilding
  (hundreds of times a one-token product, several times a 128-token one);
- ``csr``: the weight is kept as a ``torch.sparse_csr`` matrix and multiplied by PyTorch's
  sparse kernel (2-3x slower than the dense product at 50 % sparsity here).

PyTorch's semi-structured (2:4) sparse tensors run on CUDA only, so 2:4 has no CPU kernel here.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from slimformer.methods.quantization import grid
from slimformer.methods.quantization.modules import QuantizedModule, register_quantized_module, tensor_bits

SPARSE_KERNELS = ("dense", "reconstruct", "csr")
_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@lru_cache(maxsize=None)
def _nm_tables(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(choices, code_of_pattern, bits)``: ``choices`` (C(m,n), m) bool, the kept positions of
    each code; ``code_of_pattern`` (2**m,) int64 mapping a pattern's bit value to its code (-1 if
    it does not keep exactly n); ``bits`` per group code."""
    combos = list(itertools.combinations(range(m), n))
    choices = torch.zeros(len(combos), m, dtype=torch.bool)
    code_of_pattern = torch.full((2**m,), -1, dtype=torch.int64)
    for code, combo in enumerate(combos):
        choices[code, list(combo)] = True
        code_of_pattern[sum(1 << j for j in combo)] = code
    return choices, code_of_pattern, max(1, math.ceil(math.log2(len(combos))))


def _pack_bits_1d(flags: torch.Tensor) -> torch.Tensor:
    """Bool (rows, cols) -> bitmap (rows, ceil(cols/8)) uint8, bit j%8 of byte j//8 = flag j."""
    return grid.pack_codes(flags.to(torch.uint8), 1)


def _unpack_bits_1d(bitmap: torch.Tensor, cols: int) -> torch.Tensor:
    return grid.unpack_codes(bitmap, 1, cols).bool()


def sparse_stored_bits(rows: int, cols: int, nnz: int, nm: tuple[int, int] | None, value_bits: int, group_size: int | None, symmetric: bool, quantized: bool) -> int:
    """Bits a ``SparseLinear`` stores for its weight (out=rows, in=cols) with ``nnz`` kept values.

    Index: ``rows * ceil(cols/8) * 8`` (bitmap) or ``rows * ceil(cols/M * b / 8) * 8`` (N:M codes);
    values: ``ceil(nnz * value_bits / 8) * 8``; quantized values add 16-bit scales and (asymmetric)
    8-bit zero points per (row, group)."""
    if nm is None:
        index = rows * math.ceil(cols / 8) * 8
    else:
        index = rows * grid.packed_row_bytes(cols // nm[1], _nm_tables(*nm)[2]) * 8
    values = math.ceil(nnz * value_bits / 8) * 8
    meta = 0
    if quantized:
        groups = grid.num_groups(cols, group_size)
        meta = rows * groups * (16 if symmetric else 24)
    return index + values + meta


@register_quantized_module
class SparseLinear(QuantizedModule):
    """A linear layer ``y = x W^T + b`` whose pruned weight ``W`` (out, in) is stored sparse.

    Input ``x`` (..., in) of any float dtype; output (..., out) in ``x.dtype``. See the module
    docstring for the stored tensors. ``weight`` (property) is the dense float weight, so code
    that reads a pruned layer's ``.weight`` keeps working.
    """

    def __init__(self, in_features: int, out_features: int, nnz: int, nm: tuple[int, int] | None = None, bits: int | None = None,
                 group_size: int | None = None, symmetric: bool = False, bias: bool = False, value_dtype: str = "float32", kernel: str = "dense") -> None:
        super().__init__()
        if nm is not None and in_features % nm[1]:
            raise ValueError(f"N:M pattern {nm} needs the input width {in_features} divisible by {nm[1]}")
        if bits is not None and group_size is not None and in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide the width {in_features}")
        if value_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"value_dtype {value_dtype!r} is not one of {sorted(_FLOAT_DTYPES)}")
        if kernel not in SPARSE_KERNELS:
            raise ValueError(f"unknown sparse kernel {kernel!r}; choose from {SPARSE_KERNELS}")
        self.in_features = in_features
        self.out_features = out_features
        self.nnz = nnz
        self.nm = None if nm is None else (int(nm[0]), int(nm[1]))
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.value_dtype = value_dtype
        self.compute_dtype = _FLOAT_DTYPES[value_dtype]
        if self.nm is None:
            self.register_buffer("bitmap", torch.zeros(out_features, math.ceil(in_features / 8), dtype=torch.uint8))
        else:
            code_bits = _nm_tables(*self.nm)[2]
            self.register_buffer("nm_index", torch.zeros(out_features, grid.packed_row_bytes(in_features // self.nm[1], code_bits), dtype=torch.uint8))
        if bits is None:
            self.register_buffer("values", torch.zeros(nnz, dtype=_FLOAT_DTYPES[value_dtype]))
        else:
            groups = grid.num_groups(in_features, group_size)
            self.register_buffer("qvalues", torch.zeros(1, grid.packed_row_bytes(nnz, bits), dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.bfloat16))
            if symmetric:
                self.zeros = None
            else:
                self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None
        self.kernel = kernel
        self._runtime: dict[str, torch.Tensor] = {}
        self.register_load_state_dict_post_hook(lambda module, _keys: module.prepare())

    # ----- construction ------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None, nm: tuple[int, int] | None = None,
                   bits: int | None = None, group_size: int | None = None, symmetric: bool = False,
                   scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> "SparseLinear":
        """Store ``weight`` (out, in) at the positions of the keep-``mask`` (out, in) bool.

        Float values are kept in ``weight.dtype`` exactly. With ``bits``, the kept values are
        quantized on the grid ``scale``/``zero`` (out, groups) when given (e.g. the grid a joint
        sparsity+quantization pass already rounded to, so the codes are exact), else on the
        min-max grid of the masked weight per group."""
        out_features, in_features = weight.shape
        mask = mask.bool()
        if nm is not None:
            per_group = mask.reshape(out_features, -1, nm[1]).sum(-1)
            if not torch.all(per_group == nm[0]):
                raise ValueError(f"the mask is not exactly {nm[0]}:{nm[1]}")
        nnz = int(mask.sum())
        value_dtype = {v: k for k, v in _FLOAT_DTYPES.items()}.get(weight.dtype, "float32")
        module = cls(in_features, out_features, nnz, nm, bits, group_size, symmetric, bias is not None, value_dtype)
        if nm is None:
            module.bitmap.copy_(_pack_bits_1d(mask))
        else:
            choices, code_of_pattern, code_bits = _nm_tables(*nm)
            weights_of_bits = 1 << torch.arange(nm[1], dtype=torch.int64)
            patterns = (mask.reshape(out_features, -1, nm[1]).to(torch.int64) * weights_of_bits).sum(-1)
            module.nm_index.copy_(grid.pack_codes(code_of_pattern[patterns].to(torch.uint8), code_bits))
        w = weight.detach()
        if bits is None:
            module.values.copy_(w[mask])
        else:
            masked = torch.where(mask, w.float(), torch.zeros((), dtype=torch.float32))
            if scale is None:
                scale, zero = grid.grid_params(masked, bits, group_size, symmetric)
            codes = grid.quantize_codes(masked, scale, zero, bits)
            module.qvalues.copy_(grid.pack_codes(codes[mask].reshape(1, -1), bits))
            module.scales.copy_(scale.to(torch.bfloat16))
            if not symmetric:
                module.zeros.copy_(zero.to(torch.uint8))
        if bias is not None:
            module.bias.copy_(bias.detach().float())
        module.prepare()
        return module

    @classmethod
    def from_description(cls, desc: dict) -> "SparseLinear":
        nm = desc.get("nm")
        return cls(desc["in_features"], desc["out_features"], desc["nnz"], None if nm is None else tuple(nm), desc.get("bits"),
                   desc.get("group_size"), desc.get("symmetric", False), desc["bias"], desc.get("value_dtype", "float32"), desc.get("kernel", "dense"))

    def describe(self) -> dict:
        return {
            "type": "SparseLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "nnz": self.nnz,
            "nm": None if self.nm is None else list(self.nm),
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "bias": self.bias is not None,
            "value_dtype": self.value_dtype,
            "kernel": self.kernel,
        }

    # ----- the stored form -----------------------------------------------------------------------
    def mask(self) -> torch.Tensor:
        """The keep-mask (out, in) bool."""
        if self.nm is None:
            return _unpack_bits_1d(self.bitmap, self.in_features)
        choices, _, code_bits = _nm_tables(*self.nm)
        codes = grid.unpack_codes(self.nm_index, code_bits, self.in_features // self.nm[1])
        return choices[codes.long()].reshape(self.out_features, self.in_features)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight (out, in) in ``dtype``: zeros where pruned, the stored values elsewhere."""
        mask = self.mask()
        if self.bits is None:
            w = torch.zeros(self.out_features, self.in_features, dtype=dtype)
            w[mask] = self.values.to(dtype)
            return w
        zero = self.zero_points()
        codes = zero.to(torch.uint8).repeat_interleave(grid.effective_group_size(self.in_features, self.group_size), dim=1)
        codes[mask] = grid.unpack_codes(self.qvalues, self.bits, self.nnz)[0]
        return grid.dequantize_codes(codes, self.scales.float(), zero).to(dtype)

    def zero_points(self) -> torch.Tensor:
        """Zero points (out, groups) float32 (the implicit ``2**(bits-1)`` when symmetric)."""
        if self.zeros is None:
            return torch.full(self.scales.shape, float(2 ** (self.bits - 1)))
        return self.zeros.float()

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (out, in) in the compute dtype (rebuilt on every access)."""
        return self.dense_weight(self.compute_dtype)

    # ----- the QuantizedModule interface -------------------------------------------------------
    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self.dense_weight(torch.float32)

    def stored_bits(self) -> int:
        index = self.bitmap if self.nm is None else self.nm_index
        if self.bits is None:
            return tensor_bits(index, self.values)
        return tensor_bits(index, self.qvalues, self.scales, self.zeros)

    def storage_key(self) -> torch.Tensor:
        return self.bitmap if self.nm is None else self.nm_index

    def runtime_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._runtime.values())

    def set_kernel(self, kernel: str) -> None:
        """Choose the execution path (``dense``, ``reconstruct`` or ``csr``, see the module docstring)."""
        if kernel not in SPARSE_KERNELS:
            raise ValueError(f"unknown sparse kernel {kernel!r}; choose from {SPARSE_KERNELS}")
        self.kernel = kernel
        self.prepare()

    def prepare(self) -> None:
        if self.kernel == "csr":
            self._runtime = {"csr": self.dense_weight(self.compute_dtype).to_sparse_csr()}
        elif self.kernel == "dense":
            self._runtime = {"dense": self.dense_weight(self.compute_dtype)}
        else:
            self._runtime = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.kernel == "csr":
            x2 = x.reshape(-1, self.in_features)
            csr = self._runtime["csr"]
            y = torch.sparse.mm(csr, x2.to(csr.dtype).t()).t().to(x.dtype)
            if bias is not None:
                y = y + bias
            return y.reshape(*x.shape[:-1], self.out_features)
        if self.kernel == "dense":
            return F.linear(x, self._runtime["dense"].to(x.dtype), bias)
        return F.linear(x, self.dense_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        layout = "bitmap" if self.nm is None else f"{self.nm[0]}:{self.nm[1]}"
        values = self.value_dtype if self.bits is None else f"{self.bits}-bit g{self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, index={layout}, values={values}, kernel={self.kernel}"
