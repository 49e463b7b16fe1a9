"""Modules that hold quantized weights in their packed form and compute with them.

``QuantizedLinear`` stores ``qweight`` (out, ceil(in*bits/8)) uint8, ``scales`` (out, groups)
bfloat16, ``zeros`` (out, groups) uint8 (asymmetric only) and an optional float32 ``bias``. These
buffers are exactly what is saved. At construction (and after loading) it prepares the run-time
form for one of four execution paths, recorded in ``kernel``:

- ``int8-dynamic`` (W8A8): 8-bit per-channel weights times int8 activations quantized per token
  at run time (symmetric, absmax), through ``torch._int_mm`` (oneDNN: AMX/VNNI int8 units),
  int32 accumulators rescaled by the token and channel scales. Chosen only when the method was
  asked for int8 activations (``act_bits=8``), because it changes the numerics;
- ``int8pack``: 8-bit per-channel weights through ``torch._weight_int8pack_mm`` (bfloat16
  activations; an asymmetric zero point is applied as a rank-1 correction) for few tokens; from
  ``INT8_UNPACK_MIN_TOKENS`` tokens on, the int8 weight is instead widened to bfloat16 for the
  call (a cheap, memory-bound step) and the product runs on the bf16 matrix units, which this
  op does not use (measured in benchmarks/weight_quantization.py);
- ``int4pack``: 4-bit group-wise weights through ``torch.ops.aten._weight_int4pack_mm_for_cpu``
  (bfloat16 activations; group size 32/64/128/256, ``out`` divisible by 16);
- ``unpack``: every other width or layout (2/3 bits, odd group sizes): the packed codes stay in
  memory and each forward unpacks this layer's weight, computes, and drops it again, so
  memory holds ``bits`` per weight; the cost is the unpacking time of every call.

These are the paths chosen by capability alone (``choose_kernel``), used until the execution
planner (:mod:`slimformer.runtime.planner`) has timed the alternatives on this machine. The
planner may also pick, per regime (few tokens / many tokens), these paths of the same stored
numerics (each selectable by name through :meth:`QuantizedLinear.use_kernels`):

- ``int8-widen-fp32`` / ``int8-widen-bf16``: 8-bit weights widened per call (``int8 * scale``)
  to a float32 (exact) or bfloat16 (weight and activations rounded to bf16) matrix;
- ``w8a8-fp32`` / ``w8a8-bf16`` (W8A8 layers only): the same per-token int8 activation codes
  and int8 weight codes, multiplied by a float32 / bfloat16 GEMM instead of ``torch._int_mm``
  (int8 codes are exact in both; float32 accumulation; the bf16 output of the bf16 GEMM rounds
  the accumulator to 8 significant bits). On CPUs whose int8 GEMM is slow (no VNNI/AMX) or
  whose bf16 GEMM is faster than its int8 one (AMX), the same numbers come out sooner. The
  activation quantization, the widening, the GEMM and the rescale are one compiled function, so
  quantizing costs one pass over the input and rescaling one over the output;
- ``int8-onednn`` (W8A8 layers only): the same integer product as ``int8-dynamic`` through
  oneDNN's quantized linear (``torch.ops.onednn.qlinear_pointwise``) on a weight prepacked
  once for this CPU's int8 units (AMX tiles / VNNI); the activation codes are handed over as
  unsigned bytes (code + 128, zero point 128), the int32 accumulators come back as float32 and
  are rescaled as for ``int8-dynamic`` (:mod:`slimformer.kernels.onednn_int8`; 1 byte per
  weight held);
- ``packed-fp32`` (4- and 8-bit, group size a multiple of 32): slimformer's own kernel
  (:mod:`slimformer.kernels`) reads the stored codes, scales and zero points in place and
  computes in float32 (exact); nothing is held beyond the stored buffers. Built for few rows
  (decoding, speculative verification), where reading the weights is most of the work (8-bit
  codes; 4-bit codes on a 2-core AVX2 CPU are bound by their unpacking arithmetic instead).
- ``packed-q8a`` (the same layouts, groups of 32 or 64 columns or a multiple of the kernel's
  64-byte step): the same stored buffers in place, the activations rounded to int8 per block of 32 columns
  (as llama.cpp's Q8 activations) and multiplied into the codes by integer dot products. Not a
  stored number: the run time's own rounding, offered by the execution planner unless
  ``int8_activations: keep``; about 1 % relative error per product on Gaussian inputs.

``QuantizedEmbedding`` stores the table row-wise packed and dequantizes only the gathered rows.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from slimformer import kernels as kernels_lib
from slimformer.dynamo import allow_graphs
from slimformer.kernels import onednn_int8
from slimformer.methods.quantization import grid

INT4_GROUP_SIZES = (32, 64, 128, 256)
KERNELS = ("int8-dynamic", "int8pack", "int4pack", "unpack", "int8-widen-fp32", "int8-widen-bf16", "w8a8-fp32", "w8a8-bf16",
           "int8-onednn", "packed-fp32", "packed-q8a", "packed-q8a-avx2")
INT8_FORM_KERNELS = ("int8-dynamic", "int8pack", "int8-widen-fp32", "int8-widen-bf16", "w8a8-fp32", "w8a8-bf16", "int8-onednn")
W8A8_KERNELS = ("int8-dynamic", "w8a8-fp32", "w8a8-bf16", "int8-onednn")
PACKED_KERNELS = ("packed-fp32", "packed-q8a", "packed-q8a-avx2")  # the stored codes read in place
INT8_UNPACK_MIN_TOKENS = 64


def int8_activation_paths() -> list[str]:
    """The int8-activation kernel's forms offered as paths here: ``packed-q8a`` (VNNI where the CPU
    has it, else AVX2), plus ``packed-q8a-avx2`` where the CPU has both, so that the planner times
    the two (the AVX2 form was the faster at one row on the AMD EPYC). Check availability first."""
    return ["packed-q8a"] + (["packed-q8a-avx2"] if kernels_lib.has_vnni() else [])

ACT_BITS = (None, 8)  # float activations, or int8 per-token activations (W8A8)

# Every quantized module class, keyed by the "type" of its manifest entry (see describe()).
QUANTIZED_MODULE_TYPES: dict[str, type["QuantizedModule"]] = {}


def register_quantized_module(cls: type["QuantizedModule"]) -> type["QuantizedModule"]:
    """Class decorator: let the loader rebuild ``cls`` from its manifest entry."""
    if cls.__name__ in QUANTIZED_MODULE_TYPES:
        raise TypeError(f"quantized module type {cls.__name__!r} registered twice")
    QUANTIZED_MODULE_TYPES[cls.__name__] = cls
    return cls


class QuantizedModule(nn.Module):
    """What every module holding a compressed weight provides (linears, embeddings, codebooks).

    - ``kernel``: the execution path this layer takes (reported per layer);
    - ``describe()``: a JSON-safe manifest entry with ``"type"`` = the class name, from which
      ``from_description`` rebuilds an empty module of the same layout (buffers are then loaded);
    - ``weight_shape``: ``(rows, cols)`` of the float weight it stands for ((out, in) for a linear);
    - ``dequantized_weight()``: that float32 weight;
    - ``stored_bits()``: bits of the stored tensors that encode the weight (codes, scales, zero
      points, codebooks, low-rank factors; not the bias);
    - ``storage_key()``: a tensor whose identity says which modules share one stored weight (ties);
    - ``runtime_nbytes()``: bytes of run-time tensors held beside the stored buffers;
    - ``set_compute_dtype(dtype)``: the float dtype outputs are produced in.
    """

    kernel: str = "unpack"
    compute_dtype: torch.dtype = torch.float32

    @classmethod
    def from_description(cls, desc: dict) -> "QuantizedModule":
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    @property
    def weight_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def stored_bits(self) -> int:
        raise NotImplementedError

    def storage_key(self) -> torch.Tensor:
        raise NotImplementedError

    def runtime_nbytes(self) -> int:
        return 0

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        self.compute_dtype = dtype
        if getattr(self, "_runtime", None):
            self.prepare()

    def prepare(self) -> None:
        """Build run-time tensors from the stored buffers (nothing by default)."""


def tensor_bits(*tensors: torch.Tensor | None) -> int:
    """Stored bits of ``tensors`` (None ignored)."""
    return sum(8 * t.numel() * t.element_size() for t in tensors if t is not None)


def activation_bytes(x: torch.Tensor, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The codes of :func:`quantize_activations_per_token` shifted by +128 into uint8, with the
    same ``(scale, offset)``: the unsigned form oneDNN's quantized linear takes."""
    codes, scale, offset = activation_codes(x.to(torch.float32, copy=True), symmetric)
    return codes.add_(128.0).to(torch.uint8), scale, offset


def _has_op(name: str) -> bool:
    if name == "int8-onednn":
        return onednn_int8.available()
    if name == "int8-dynamic":
        return hasattr(torch, "_int_mm")
    if name == "int8pack":
        return hasattr(torch, "_weight_int8pack_mm")
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def choose_kernel(bits: int, group_size: int | None, in_features: int, out_features: int, act_bits: int | None = None) -> str:
    """The fastest path that exists for this layout on this PyTorch (see module docstring)."""
    if act_bits == 8 and bits == 8 and group_size is None and _has_op("int8-dynamic"):
        return "int8-dynamic"
    if bits == 8 and group_size is None and in_features % 16 == 0 and _has_op("int8pack"):
        return "int8pack"
    gs = in_features if group_size is None else group_size
    if bits == 4 and gs in INT4_GROUP_SIZES and in_features % gs == 0 and out_features % 16 == 0 and _has_op("int4pack"):
        return "int4pack"
    return "unpack"


def activation_codes(xf: torch.Tensor, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The per-token int8 grid of float32 ``xf`` (tokens, features), codes still held as float32
    integers (overwriting ``xf``): ``(codes, scale, offset)`` as in
    :func:`quantize_activations_per_token`, which casts these codes to int8."""
    if symmetric:
        scale = xf.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127.0)
        return xf.mul_(scale.reciprocal()).round_(), scale, None
    lo = xf.amin(dim=1, keepdim=True).clamp_max_(0.0)
    hi = xf.amax(dim=1, keepdim=True).clamp_min_(0.0)
    scale = (hi - lo).clamp_min_(1e-12).div_(255.0)
    zero = torch.round(-lo / scale)  # code of 0.0 on the unsigned grid [0, 255]
    return xf.mul_(scale.reciprocal()).round_().add_(zero - 128.0).clamp_(-128, 127), scale, 128.0 - zero


def quantize_activations_per_token(x: torch.Tensor, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Int8 codes of ``x`` (tokens, features) with one scale (and zero point) per token.

    Returns ``(codes, scale, offset)``: codes (tokens, features) int8, scale (tokens, 1) float32
    and, when asymmetric, ``offset`` (tokens, 1) float32 such that
    ``x ~= (codes + offset) * scale``; symmetric: ``x ~= codes * scale`` (codes in [-127, 127],
    offset None). The asymmetric grid spends all 256 levels on [min, max] of the token, which
    matters for one-sided activations (e.g. after GELU).
    """
    # One float32 working copy, then in-place passes (allocations dominate at these sizes).
    codes, scale, offset = activation_codes(x.to(torch.float32, copy=True), symmetric)
    return codes.to(torch.int8), scale, offset


def rescale_int8_product(acc: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor, x_offset: torch.Tensor | None,
                         w_rowsum: torch.Tensor, x_sum: torch.Tensor | None, w_offset: torch.Tensor | None,
                         bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Float output (tokens, out) in ``dtype`` from the int32 product ``acc`` (tokens, out) of
    int8 activations and int8 weights: ``acc * w_scale * x_scale``, plus the asymmetric
    activations' ``x_offset * w_rowsum * x_scale``, the asymmetric weights'
    ``x_sum * w_offset``, and the bias."""
    y = acc.float() * w_scale
    if x_offset is not None:
        y = y + x_offset * w_rowsum
    y = y * x_scale
    if w_offset is not None:
        y = y + x_sum * w_offset
    if bias is not None:
        y = y + bias
    return y.to(dtype)


# Compiled graphs each fused function may keep: one per static variant it is called with
# (activation dtype x GEMM dtype x symmetric x bias x zero-point offset...). Dynamo's default of 8
# was reached by the planner timing three W8A8 layer shapes in float32 and bfloat16: every later
# variant then ran eagerly, several passes over memory, and was timed (and chosen) as such.
FUSED_GRAPHS = 64


class _Fused:
    """``fn`` compiled by ``torch.compile`` (inductor fuses its element-wise passes into one
    vectorised C++ loop; shapes dynamic), falling back to eager ``fn`` when compilation is not
    available here (no C++ compiler) or disabled with ``SLIMFORMER_COMPILE=0``. Results are
    the same either way; only the number of passes over memory differs. Compiling first lets
    Dynamo keep ``FUSED_GRAPHS`` graphs per function, so no variant silently runs eagerly."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = None
        self.failed = os.environ.get("SLIMFORMER_COMPILE", "1") == "0"

    def __call__(self, *args):
        if not self.failed:
            try:
                if self.compiled is None:
                    allow_graphs(FUSED_GRAPHS)
                    self.compiled = torch.compile(self.fn, dynamic=True)
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: run eagerly
                self.failed = True
                warnings.warn(f"slimformer: torch.compile unavailable for the W8A8 path ({type(exc).__name__}); running eagerly", stacklevel=2)
        return self.fn(*args)


def w8a8_float_product(x: torch.Tensor, w_int8: torch.Tensor, gemm_dtype: torch.dtype, w_scale: torch.Tensor, w_rowsum: torch.Tensor,
                       w_offset: torch.Tensor | None, bias: torch.Tensor | None, act_symmetric: bool, dtype: torch.dtype) -> torch.Tensor:
    """A W8A8 product on the float units: ``x`` (tokens, in) quantized per token to the int8 grid
    (the same codes as :func:`quantize_activations_per_token`), activation and weight codes
    ``w_int8`` (out, in) widened to ``gemm_dtype`` (float32 or bfloat16: int8 codes are exact in
    both) and multiplied (exact products, float32 accumulation; a bfloat16 GEMM rounds its output
    to bf16), rescaled as :func:`rescale_int8_product`. One function so that the compiler fuses
    the quantization into one pass before the GEMM and the rescale into one after it, and the
    int8 codes never exist as a separate tensor."""
    codes, x_scale, x_offset = activation_codes(x.to(torch.float32, copy=True), act_symmetric)
    acc = F.linear(codes.to(gemm_dtype), w_int8.to(gemm_dtype)).float()
    x_sum = x.float().sum(-1, keepdim=True) if w_offset is not None else None
    return rescale_int8_product(acc, w_scale, x_scale, x_offset, w_rowsum, x_sum, w_offset, bias, dtype)


fused_quantize_activations = _Fused(quantize_activations_per_token)
fused_activation_bytes = _Fused(activation_bytes)
fused_rescale = _Fused(rescale_int8_product)
fused_w8a8_float_product = _Fused(w8a8_float_product)


class PackedWeight(QuantizedModule):
    """Storage shared by uniform-grid packed modules: ``qweight`` (rows, ceil(cols*bits/8)) uint8,
    ``scales`` (rows, groups) bfloat16 and, when asymmetric, ``zeros`` (rows, groups) uint8."""

    def _init_packed(self, rows: int, cols: int, bits: int, group_size: int | None, symmetric: bool) -> None:
        if group_size is not None and cols % group_size:
            raise ValueError(f"group_size {group_size} does not divide the width {cols}")
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self._cols = cols
        self.compute_dtype = torch.float32  # the model's float dtype (see methods.quantization.cast)
        groups = grid.num_groups(cols, group_size)
        self.register_buffer("qweight", torch.zeros(rows, grid.packed_row_bytes(cols, bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(rows, groups, dtype=torch.bfloat16))
        if symmetric:
            self.zeros = None
        else:
            self.register_buffer("zeros", torch.zeros(rows, groups, dtype=torch.uint8))

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.qweight.shape[0], self._cols)

    def stored_bits(self) -> int:
        return tensor_bits(self.qweight, self.scales, self.zeros)

    def storage_key(self) -> torch.Tensor:
        return self.qweight

    def _store(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.qweight.copy_(grid.pack_codes(codes, self.bits))
        self.scales.copy_(scale.to(torch.bfloat16))
        if not self.symmetric:
            self.zeros.copy_(zero.to(torch.uint8))

    def zero_points(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Zero points (rows, groups) as float32 (the implicit ``2**(bits-1)`` when symmetric)."""
        scales = self.scales if rows is None else self.scales[rows]
        if self.zeros is None:
            return torch.full(scales.shape, float(2 ** (self.bits - 1)))
        return (self.zeros if rows is None else self.zeros[rows]).float()

    def codes(self) -> torch.Tensor:
        """Unpacked codes (rows, cols) uint8."""
        return grid.unpack_codes(self.qweight, self.bits, self._cols)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight (rows, cols) the codes stand for."""
        return grid.dequantize_codes(self.codes(), self.scales.float(), self.zero_points())


@register_quantized_module
class QuantizedLinear(PackedWeight):
    """A linear layer ``y = x W^T + b`` whose ``W`` (out, in) is stored as packed ``bits``-bit codes.

    Input ``x`` (..., in_features) of any float dtype; output (..., out_features) in ``x.dtype``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        bias: bool,
        kernel: str | None = None,
        act_bits: int | None = None,
        act_symmetric: bool = True,
    ) -> None:
        super().__init__()
        if act_bits not in ACT_BITS:
            raise ValueError(f"act_bits={act_bits!r} is not supported; use one of {ACT_BITS}")
        self._init_packed(out_features, in_features, bits, group_size, symmetric)
        self.in_features = in_features
        self.out_features = out_features
        self.act_bits = act_bits
        self.act_symmetric = act_symmetric
        self.kernel = kernel or choose_kernel(bits, group_size, in_features, out_features, act_bits)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None
        self._runtime: dict[str, torch.Tensor] = {}
        self._ready: tuple[str, ...] = (self.kernel,)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.prepare())

    # ----- construction ------------------------------------------------------------------------
    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        bias: torch.Tensor | None,
        act_bits: int | None = None,
        act_symmetric: bool = True,
        prepare: bool = True,
    ) -> "QuantizedLinear":
        """Build from codes (out, in) uint8, ``scale``/``zero`` (out, groups) and ``bias`` (out,);
        ``act_bits=8`` asks for int8 activations (W8A8) where the layout allows it, quantized per
        token with a symmetric or (``act_symmetric=False``) asymmetric grid. With
        ``prepare=False`` the kernel's run-time tensors are built at the first forward instead
        (a compression job then holds only the stored form of the layers it finished)."""
        out_features, in_features = codes.shape
        module = cls(in_features, out_features, bits, group_size, symmetric, bias is not None, act_bits=act_bits, act_symmetric=act_symmetric)
        module._store(codes, scale, zero)
        if bias is not None:
            module.bias.copy_(bias.detach().float())
        if prepare:
            module.prepare()
        return module

    @classmethod
    def from_description(cls, desc: dict) -> "QuantizedLinear":
        return cls(
            desc["in_features"], desc["out_features"], desc["bits"], desc["group_size"], desc["symmetric"], desc["bias"],
            act_bits=desc.get("act_bits"), act_symmetric=desc.get("act_symmetric", True),
        )

    # ----- run-time form -----------------------------------------------------------------------
    def available_kernels(self, int8_activations: bool = True) -> tuple[str, ...]:
        """The native paths that compute this layer's stored numerics on this PyTorch (capability
        only: layout, width, available ops). W8A8 layers list only W8A8 paths, unless
        ``int8_activations`` is False: then the weight-only paths of the same stored weights
        (activations left in float, their per-token int8 rounding skipped)."""
        if self.act_bits == 8 and int8_activations:
            if self.bits == 8 and self.group_size is None:
                return tuple(k for k in W8A8_KERNELS if k not in ("int8-dynamic", "int8-onednn") or _has_op(k))
            return ("unpack",)
        kernels = []
        if self.bits == 8 and self.group_size is None:
            if self.in_features % 16 == 0 and _has_op("int8pack"):
                kernels.append("int8pack")
            kernels += ["int8-widen-fp32", "int8-widen-bf16"]
        if choose_kernel(self.bits, self.group_size, self.in_features, self.out_features) == "int4pack":
            kernels.append("int4pack")
        group = grid.effective_group_size(self.in_features, self.group_size)
        if kernels_lib.supports(self.bits, group, self.in_features) and kernels_lib.packed_linear_available():
            kernels.append("packed-fp32")
            if kernels_lib.supports_int8_activations(self.bits, group, self.in_features) and kernels_lib.int8_activations_available():
                kernels += int8_activation_paths()
        kernels.append("unpack")
        return tuple(kernels)

    def use_kernels(self, *kernels: str) -> None:
        """Make the run-time forms of ``kernels`` ready (the first becomes ``self.kernel``, the
        path ``forward`` takes); the others stay callable through :meth:`compute`."""
        for k in kernels:
            if k not in KERNELS:
                raise ValueError(f"unknown kernel {k!r}; choose from {KERNELS}")
        self.kernel = kernels[0]
        self._ready = tuple(dict.fromkeys(kernels))
        self.prepare()

    def prepare(self) -> None:
        """Build the run-time tensors of ``self.kernel`` (and of the other kernels made ready by
        :meth:`use_kernels`) from the stored buffers."""
        rt: dict[str, torch.Tensor] = {}
        ready = set(getattr(self, "_ready", ())) | {self.kernel}
        for k in ready:
            if k not in KERNELS:
                raise ValueError(f"unknown kernel {k!r}; choose from {KERNELS}")
        if ready & set(INT8_FORM_KERNELS):
            codes = self.codes().to(torch.int16)
            w_int8 = (codes - 128).to(torch.int8).contiguous()
            rt["scales"] = self.scales[:, 0].contiguous()
            if ready & set(W8A8_KERNELS):
                rt["scales_f32"] = rt["scales"].float()
                # Asymmetric activations add offset_t * sum_k w_int8[n, k] * s_n per token t.
                rt["w_rowsum"] = w_int8.sum(1, dtype=torch.int32).float() * rt["scales_f32"]
            if ready & (set(INT8_FORM_KERNELS) - {"int8-onednn"}):  # int8-onednn reads only its prepacked copy
                rt["w_int8"] = w_int8
            if "int8-onednn" in ready:
                rt["onednn_packed"] = onednn_int8.prepack(w_int8)
            if not self.symmetric:
                # w = (q - zp) s = (q_int8 + 128 - zp) s: the kernel applies q_int8 * s, the rest is rank 1.
                rt["offset"] = ((128.0 - self.zero_points()[:, 0]) * self.scales[:, 0].float()).contiguous()
        if "int4pack" in ready:
            codes = self.codes().to(torch.int32)
            rt["packed"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
            scale = self.scales.float()
            # Kernel convention: w = (q - 8) * scale + z, i.e. z = (8 - zp) * scale.
            z = (8.0 - self.zero_points()) * scale
            rt["scales_and_zeros"] = torch.stack([scale, z], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self._runtime = rt

    def __getstate__(self) -> dict:
        """Copies and pickles leave out oneDNN's prepacked weight (an opaque tensor that cannot be
        copied); the copy lays it out again at its first forward."""
        state = self.__dict__.copy()
        if "onednn_packed" in state.get("_runtime", {}):
            state["_runtime"] = {k: v for k, v in state["_runtime"].items() if k != "onednn_packed"}
        return state

    def runtime_nbytes(self) -> int:
        """Bytes of the run-time tensors (in addition to the stored buffers)."""
        return sum(t.numel() * t.element_size() for t in self._runtime.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute(x, self.kernel)

    def packed_layout(self) -> dict:
        """The stored buffers in the packed kernels' conventions (``qweight``, ``scales``, ``zeros``
        or None for the implicit zero point, ``mins`` None, ``bits``, ``group_size``)."""
        return {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros, "mins": None, "bits": self.bits,
                "group_size": grid.effective_group_size(self.in_features, self.group_size)}

    def compute(self, x: torch.Tensor, kernel: str) -> torch.Tensor:
        """``x`` (..., in_features) -> (..., out_features) in ``x.dtype`` through ``kernel``
        (one of the kernels made ready)."""
        rt = self._runtime
        if kernel not in ("unpack",) + PACKED_KERNELS and (not rt or (kernel == "int8-onednn" and "onednn_packed" not in rt)):
            self.prepare()  # built lazily (see from_codes and __getstate__)
            rt = self._runtime
        if kernel == "unpack":
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        if kernel in PACKED_KERNELS:  # the stored buffers themselves: nothing held
            return kernels_lib.packed_linear_nd(x, self.qweight, self.scales, self.zeros, self.bits,
                                                grid.effective_group_size(self.in_features, self.group_size), self.bias,
                                                int8_activations=kernel != "packed-fp32", portable=kernel == "packed-q8a-avx2")
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if kernel in ("w8a8-fp32", "w8a8-bf16"):  # the same integer product on the float units
            gemm = torch.float32 if kernel == "w8a8-fp32" else torch.bfloat16
            y = fused_w8a8_float_product(x2, rt["w_int8"], gemm, rt["scales_f32"], rt["w_rowsum"], rt.get("offset"), self.bias, self.act_symmetric, x.dtype)
            return y.reshape(*shape[:-1], self.out_features)
        if kernel in ("int8-dynamic", "int8-onednn"):
            if kernel == "int8-dynamic":
                xq, sx, x_offset = fused_quantize_activations(x2, self.act_symmetric)
                acc = torch._int_mm(xq, rt["w_int8"].t())
            else:
                xu, sx, x_offset = fused_activation_bytes(x2, self.act_symmetric)
                acc = onednn_int8.int8_product(xu, rt["onednn_packed"], self.out_features)
            x_sum = x2.float().sum(-1, keepdim=True) if "offset" in rt else None
            y = fused_rescale(acc, rt["scales_f32"], sx, x_offset, rt["w_rowsum"], x_sum, rt.get("offset"), self.bias, x.dtype)
            return y.reshape(*shape[:-1], self.out_features)
        if kernel == "int8-widen-fp32":
            xf = x2.float()
            y = F.linear(xf, rt["w_int8"].float() * rt["scales"].float().unsqueeze(1))
            if "offset" in rt:
                y = y + xf.sum(-1, keepdim=True) * rt["offset"]
        else:
            x2 = x2.to(torch.bfloat16)
            if kernel in ("int8pack", "int8-widen-bf16"):
                if kernel == "int8-widen-bf16" or x2.shape[0] >= INT8_UNPACK_MIN_TOKENS:
                    y = F.linear(x2, rt["w_int8"].to(torch.bfloat16) * rt["scales"].unsqueeze(1)).float()
                else:
                    y = torch._weight_int8pack_mm(x2, rt["w_int8"], rt["scales"]).float()
                if "offset" in rt:
                    y = y + x2.float().sum(-1, keepdim=True) * rt["offset"]
            elif kernel == "int4pack":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x2, rt["packed"], grid.effective_group_size(self.in_features, self.group_size), rt["scales_and_zeros"]
                ).float()
            else:
                raise ValueError(f"kernel {kernel!r} is not ready on this layer; call use_kernels first")
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, act_bits={self.act_bits}, kernel={self.kernel}"
        )

    def describe(self) -> dict:
        """The manifest entry that lets a loader rebuild this module."""
        return {
            "type": "QuantizedLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "bias": self.bias is not None,
            "act_bits": self.act_bits,
            "act_symmetric": self.act_symmetric,
            "kernel": self.kernel,
        }


@register_quantized_module
class QuantizedEmbedding(PackedWeight):
    """A token-embedding table (num_embeddings, dim) stored row-wise as packed ``bits``-bit codes.

    Input ids (...,) int64; output (..., dim) float32. Only the gathered rows are dequantized.
    """

    kernel = "gather-dequant"

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int | None, symmetric: bool, padding_idx: int | None = None) -> None:
        super().__init__()
        self._init_packed(num_embeddings, embedding_dim, bits, group_size, symmetric)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, padding_idx: int | None = None) -> "QuantizedEmbedding":
        """Build from codes (num_embeddings, dim) uint8 and ``scale``/``zero`` (num_embeddings, groups)."""
        n, d = codes.shape
        module = cls(n, d, bits, group_size, symmetric, padding_idx)
        module._store(codes, scale, zero)
        return module

    @classmethod
    def from_description(cls, desc: dict) -> "QuantizedEmbedding":
        return cls(desc["num_embeddings"], desc["embedding_dim"], desc["bits"], desc["group_size"], desc["symmetric"], desc.get("padding_idx"))

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized table (num_embeddings, dim), for code that reads ``.weight`` (e.g. shapes)."""
        return self.dequantized_weight()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        codes = grid.unpack_codes(self.qweight[flat], self.bits, self.embedding_dim)
        rows = grid.dequantize_codes(codes, self.scales[flat].float(), self.zero_points(flat))
        return rows.reshape(*input_ids.shape, self.embedding_dim).to(self.compute_dtype)

    def runtime_nbytes(self) -> int:
        return 0

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}"

    def describe(self) -> dict:
        return {
            "type": "QuantizedEmbedding",
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "padding_idx": self.padding_idx,
            "kernel": self.kernel,
        }


def module_from_description(desc: dict) -> QuantizedModule:
    """An empty quantized module from its manifest entry (buffers are then loaded).

    The execution path is chosen again for this machine's PyTorch, not copied from the entry.
    """
    cls = QUANTIZED_MODULE_TYPES.get(desc.get("type"))
    if cls is None:
        raise ValueError(f"unknown quantized module type {desc.get('type')!r}")
    return cls.from_description(desc)
