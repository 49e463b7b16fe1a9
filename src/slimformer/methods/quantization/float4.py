"""4-bit non-uniform formats from a 16-entry level table: NF4 (QLoRA) and FP4 (LLM-FP4).

Both store 4-bit codes, the table and bfloat16 scales in a :class:`LUTLinear` /
:class:`LUTEmbedding` (see :mod:`codebook_modules`), and execute from the packed codes. They
differ only in the table and in how the scales are chosen, so the two methods share this file
(one quantizer, one tie-aware apply function) while each names its own paper.

- ``nf4``: Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs". The levels are
  quantiles of the standard normal (8 positive, 7 negative and an exact zero, normalised to
  [-1, 1], as in bitsandbytes' ``create_normal_map``); each block of ``group_size`` weights is
  scaled by its absmax.
- ``fp4``: Liu et al., 2023, "LLM-FP4: 4-Bit Floating-Point Quantized Transformers". Sign +
  3 bits of exponent/mantissa (E2M1, E1M2 or E3M0, with subnormals; the format is searched per
  layer) and a per-output-channel exponent bias found by search to minimise the reconstruction
  error, weighted by the calibration Hessian ``sum x x^T`` when ``calibrated`` (else plain).
  Storage of the exponent bias: with ``group_size: null`` the per-channel scale *is* the
  exponent bias, a pure power of two ``2**e`` (held exactly in the bfloat16 ``scales``: zero
  mantissa, so 16 bits a row where an int8 exponent would take 8); with groups, each group's
  absmax scale is multiplied by the channel's ``2**-k`` (``k`` >= 0, exact in bfloat16), i.e.
  folded into the stored group scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, ModuleSelection, register_method
from slimformer.methods.calibration import blockwise
from slimformer.methods.quantization import grid
from slimformer.methods.quantization.codebook_modules import LUTEmbedding, LUTLinear, share_lut_storage
from slimformer.methods.selection import check_group_size, select_modules
from slimformer.models.adapters import set_submodule

NF4_OFFSET = 0.9677083  # QLoRA / bitsandbytes: the outermost quantile probability
FP4_FORMATS = {"e2m1": (2, 1), "e1m2": (1, 2), "e3m0": (3, 0)}


def normal_float_levels(bits: int = 4, offset: float = NF4_OFFSET) -> torch.Tensor:
    """NormalFloat levels (2**bits,) float32, ascending, in [-1, 1], with an exact 0.

    ``2**(bits-1)`` positive levels are normal quantiles at probabilities evenly spaced in
    ``[0.5, offset]`` (0.5 excluded), ``2**(bits-1) - 1`` negative ones likewise, plus zero.
    """
    half = 2 ** (bits - 1)
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.max()).float()


def fp_levels(fmt: str) -> torch.Tensor:
    """The 16 values (16,) float32 of a sign + ``E`` exponent + ``M`` mantissa 4-bit float, by code.

    Code ``8*sign + (e << M) + m``; IEEE-style bias ``2**(E-1) - 1`` and subnormals at ``e = 0``
    (E2M1: 0, 0.5, 1, 1.5, 2, 3, 4, 6). Codes 0 and 8 are +0 and -0, as in real FP4.
    """
    e_bits, m_bits = FP4_FORMATS[fmt]
    bias = 2 ** (e_bits - 1) - 1
    values = []
    for code in range(16):
        sign = -1.0 if code >= 8 else 1.0
        mag = code & 7
        e, m = mag >> m_bits, mag & (2**m_bits - 1)
        if e == 0:
            v = (m / 2**m_bits) * 2.0 ** (1 - bias)
        else:
            v = (1 + m / 2**m_bits) * 2.0 ** (e - bias)
        values.append(sign * v)
    return torch.tensor(values, dtype=torch.float32)


def nearest_level_codes(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Codes (same shape as ``x``) uint8: the index into ``lut`` (L,) of the level nearest each value."""
    order = torch.argsort(lut, stable=True)
    levels = lut[order]
    mids = (levels[1:] + levels[:-1]) / 2
    return order[torch.bucketize(x.contiguous(), mids)].to(torch.uint8)


def absmax_scales(w: torch.Tensor, group_size: int | None, max_level: float) -> torch.Tensor:
    """Scales (rows, groups) float32 mapping each group's absmax onto ``max_level``, rounded up to bfloat16."""
    rows, cols = w.shape
    g = grid.effective_group_size(cols, group_size)
    absmax = w.float().reshape(rows, cols // g, g).abs().amax(-1)
    scale = absmax / max_level
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return grid.round_up_to_bfloat16(scale)


def lut_quantize(w: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-level codes (rows, cols) uint8 of ``w`` (rows, cols) and the weight they stand for (float32)."""
    rows, cols = w.shape
    groups = scales.shape[1]
    s = scales.float().unsqueeze(-1)
    wg = w.float().reshape(rows, groups, cols // groups)
    codes = nearest_level_codes(wg / s, lut)
    deq = (lut[codes.long()] * s).reshape(rows, cols)
    return codes.reshape(rows, cols), deq


def row_errors(w: torch.Tensor, deq: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """Per-row reconstruction error (rows,): ``d H d^T`` with ``d = w - deq`` (``||d||^2`` without ``hessian`` (cols, cols))."""
    d = w.float() - deq
    if hessian is None:
        return (d * d).sum(1)
    return ((d @ hessian) * d).sum(1)


def quantize_nf4(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NF4 of ``w`` (rows, cols) -> ``(codes (rows, cols) uint8, lut (16,), scales (rows, groups))``."""
    lut = normal_float_levels(4)
    scales = absmax_scales(w, group_size, 1.0)
    codes, _ = lut_quantize(w, lut, scales)
    return codes, lut, scales


def quantize_fp4(
    w: torch.Tensor,
    group_size: int | None,
    formats: tuple[str, ...] = tuple(FP4_FORMATS),
    exponent_search: int = 2,
    hessian: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """FP4 of ``w`` (rows, cols) with format and per-channel exponent-bias search.

    ``hessian`` (cols, cols) weights the error (None: plain squared error). For each format the
    per-row exponent shift ``k`` in ``0..exponent_search`` (scale ``* 2**-k``: ``k`` halvings of
    the range, trading clipped outliers for resolution) minimising that row's error is kept; the
    format with the least total error wins. Without groups the base scale is the smallest power
    of two that covers the row's absmax. Returns ``(codes (rows, cols) uint8, lut (16,),
    scales (rows, groups) float32, info)`` with ``info = {"format", "shift" (rows,) int}``.
    """
    rows, cols = w.shape
    w = w.float()
    best: tuple[float, str, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for fmt in formats:
        lut = fp_levels(fmt)
        max_level = float(lut.abs().max())
        if group_size is None:
            absmax = w.abs().amax(1, keepdim=True)
            absmax = torch.where(absmax > 0, absmax, torch.full_like(absmax, max_level))
            base = torch.exp2(torch.ceil(torch.log2(absmax / max_level)))
        else:
            base = absmax_scales(w, group_size, max_level)
        errors = torch.stack([row_errors(w, lut_quantize(w, lut, base * 2.0**-k)[1], hessian) for k in range(exponent_search + 1)])
        err, shift = errors.min(0)
        total = float(err.sum())
        if best is None or total < best[0]:
            best = (total, fmt, lut, base, shift)
    _, fmt, lut, base, shift = best
    scales = base * torch.exp2(-shift.float()).unsqueeze(1)
    codes, _ = lut_quantize(w, lut, scales)
    return codes, lut, scales, {"format": fmt, "shift": shift}


@dataclass
class Float4Config(MethodConfig, ModuleSelection):
    """Shared settings of the 4-bit table formats: ``group_size`` (columns per scale; ``None`` =
    one scale per output channel / embedding row). Codes are always 4 bits (``bits`` = 4)."""

    bits: ClassVar[int] = 4
    family = "quantization"
    group_size: int | None = 64

    def __post_init__(self) -> None:
        self._validate_selection()
        if self.group_size is not None and not is_int_at_least(self.group_size, 1):
            raise ConfigError(f"{self.name}: group_size={self.group_size!r} must be a positive integer or null", "use e.g. group_size: 64, or null for per-channel")


@dataclass
class NF4Config(Float4Config):
    """NormalFloat-4 weights: 16 normal-quantile levels, absmax scale per block of ``group_size``."""

    name = "nf4"
    paper = "QLoRA: Efficient Finetuning of Quantized LLMs (Dettmers et al., 2023)"
    summary = "4-bit NormalFloat (normal-quantile levels) with absmax block scales, run from the packed codes"


@dataclass
class FP4Config(Float4Config):
    """4-bit floating point: ``formats`` searched per layer (among e2m1, e1m2, e3m0),
    ``exponent_search`` (per-channel exponent-bias shifts tried: 0..n halvings of the range;
    0 = no search) and ``calibrated`` (weight the search's error by the layers' input Hessians
    from calibration text; embeddings and tied tables always use the plain error)."""

    name = "fp4"
    paper = "LLM-FP4: 4-Bit Floating-Point Quantized Transformers (Liu et al., 2023)"
    summary = "4-bit float (E2M1/E1M2/E3M0 searched per layer) with a searched per-channel exponent bias"

    formats: tuple[str, ...] = ("e2m1", "e1m2", "e3m0")
    exponent_search: int = 2
    calibrated: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.formats, str):
            self.formats = (self.formats,)
        self.formats = tuple(self.formats)
        bad = [f for f in self.formats if f not in FP4_FORMATS]
        if not self.formats or bad:
            raise ConfigError(f"fp4: formats={list(self.formats)} must be a non-empty list of known formats", f"choose among {list(FP4_FORMATS)}")
        if not (is_int_at_least(self.exponent_search, 0) and self.exponent_search <= 8):
            raise ConfigError(f"fp4: exponent_search={self.exponent_search!r} must be an integer in 0..8", "use e.g. exponent_search: 2 (0 turns the search off)")
        if not isinstance(self.calibrated, bool):
            raise ConfigError(f"fp4: calibrated={self.calibrated!r} must be true or false", "write calibrated: true or calibrated: false")


def _replacement(module: nn.Module, codes: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor, group_size: int | None, fmt: str) -> nn.Module:
    if isinstance(module, nn.Embedding):
        new = LUTEmbedding.from_codes(codes, lut, scales, group_size, fmt, module.padding_idx)
    else:
        new = LUTLinear.from_codes(codes, lut, scales, group_size, module.bias, fmt)
    new.set_compute_dtype(module.weight.dtype)
    return new


def _quantize(config: Float4Config, w: torch.Tensor, hessian: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    if isinstance(config, FP4Config):
        return quantize_fp4(w, config.group_size, config.formats, config.exponent_search, hessian)
    codes, lut, scales = quantize_nf4(w, config.group_size)
    return codes, lut, scales, {"format": "nf4"}


def apply_float4(loaded, config: Float4Config, ctx) -> dict:
    """Quantize the selected modules; a tied embedding/head pair is quantized once and shared."""
    modules = select_modules(loaded, config, allow_tied=True)
    check_group_size(config.name, modules, config.group_size)
    by_weight: dict[int, list[str]] = {}
    for name, module in modules.items():
        by_weight.setdefault(id(module.weight), []).append(name)
    calibrated = getattr(config, "calibrated", False)
    hessian_layers = {
        name: m for name, m in modules.items() if calibrated and isinstance(m, nn.Linear) and len(by_weight[id(m.weight)]) == 1
    }
    kernels: dict[str, str] = {}
    formats: dict[str, str] = {}
    shifts: dict[str, float] = {}
    tied: list[str] = []

    def replace(name: str, module: nn.Module, hessian: torch.Tensor | None) -> None:
        codes, lut, scales, info = _quantize(config, module.weight.detach().float(), hessian)
        first = None
        for other in by_weight[id(module.weight)]:
            original = modules[other]
            new = _replacement(original, codes, lut, scales, config.group_size, info["format"])
            if first is None:
                first = new
            else:  # a tied pair: one stored table
                share_lut_storage(new, first)
                tied.append(other)
            set_submodule(loaded.model, other, new)
            kernels[other] = new.kernel
            formats[other] = info["format"]
            if "shift" in info:
                shifts[other] = round(float(info["shift"].float().mean()), 3)

    done: set[int] = set()
    for name, module in modules.items():  # plain error first: embeddings, tied pairs, or all
        if name not in hessian_layers and id(module.weight) not in done:
            done.add(id(module.weight))
            replace(name, module, None)
    if hessian_layers:
        for name, module, stats in blockwise(loaded, ctx, hessian_layers, hessian=True, desc=config.name):
            replace(name, module, stats.hessian[name] / stats.count[name])
    record = {"modules": sorted(modules), "kernels": kernels, "formats": formats, "tied": tied}
    if shifts:
        record["exponent_shift"] = shifts
    return record


@register_method(NF4Config)
def apply_nf4(loaded, config: NF4Config, ctx) -> dict:
    return apply_float4(loaded, config, ctx)


@register_method(FP4Config)
def apply_fp4(loaded, config: FP4Config, ctx) -> dict:
    return apply_float4(loaded, config, ctx)


__all__ = [
    "FP4Config",
    "FP4_FORMATS",
    "NF4Config",
    "fp_levels",
    "normal_float_levels",
    "quantize_fp4",
    "quantize_nf4",
]
