"""HQQ: Half-Quadratic Quantization, calibration-free.

Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Machine Learning Models". For each
group of weights ``w`` the zero point (and, optionally, the scale) minimises the sparsity-
promoting ``||w - Q^-1(Q(w))||_p^p`` with ``p < 1`` (heavy-tailed quantization errors). A
half-quadratic split adds an auxiliary error ``e`` and alternates two closed-form steps:

- ``e = shrink_p(w - Q^-1(Q(w)), beta)``: the generalised soft-thresholding operator
  ``sign(x) * relu(|x| - |x|^(p-1) / beta)`` (the proximal step of the lp term);
- ``zero = mean(q - (w - e) / scale)`` over the group (the quadratic step; with
  ``optimize_scale`` the scale too, by a least-squares fit of ``w - e`` on the codes ``q``);

with ``beta`` multiplied by ``kappa`` each iteration (the defaults are HQQ's: p=0.7, beta=10,
kappa=1.01, 20 iterations). No calibration data is used.

Storage: HQQ's zero points are real numbers. By default (``zero_format: fixed``) they are stored
in the same uint8 slot as an ordinary integer zero point, in fixed point with ``8 - bits``
fractional bits (4-bit grids: zero = u8 / 16, a resolution of 1/16 step), so an HQQ layer takes
exactly the storage of a round-to-nearest one (packed codes, bfloat16 scales, uint8 zeros) and
runs through the same kernels: the int4 CPU kernel takes a real offset per group
(``w = (q - 8) * scale + z``). ``zero_format: int`` rounds the zero points to integers instead
(plain ``QuantizedLinear``); the iterate is projected on the stored grid at every step, so the
optimisation sees exactly what will be stored. Per group the best iterate is kept, and the
round-to-nearest grid is a candidate, so the lp error never exceeds RTN's. With real zero
points 0.0 is no longer exactly representable: after pruning, quantize with ``zero_format: int``
(or rtn/gptq) to keep pruned weights exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import register_method
from slimformer.methods.quantization import grid
from slimformer.methods.quantization.modules import QuantizedEmbedding, QuantizedLinear, register_quantized_module
from slimformer.methods.quantization.rtn import WeightQuantConfig, replace_keeping_ties
from slimformer.methods.selection import check_group_size, select_modules

ZERO_FORMATS = ("fixed", "int")


@dataclass
class HQQConfig(WeightQuantConfig):
    """HQQ settings: the grid (``bits``, ``group_size``; always asymmetric), the solver
    (``lp_norm`` p in (0, 1], ``beta`` and its growth ``kappa``, ``iters``), ``optimize_scale``
    (fit the scale as well as the zero point) and ``zero_format`` (``fixed``: real zero points in
    uint8 fixed point, same storage as RTN; ``int``: integer zero points)."""

    name = "hqq"
    family = "quantization"
    paper = "Half-Quadratic Quantization of Large Machine Learning Models (Badri & Shaji, 2023)"
    summary = "calibration-free: zero points (and scales) fitted per group by a half-quadratic lp (p<1) solver"

    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    optimize_scale: bool = False
    zero_format: str = "fixed"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.symmetric:
            raise ConfigError("hqq: the solver fits the zero point, a symmetric grid has none", "use symmetric: false")
        if not 0 < self.lp_norm <= 1:
            raise ConfigError(f"hqq: lp_norm={self.lp_norm} must be in (0, 1]", "use e.g. lp_norm: 0.7")
        if not self.beta > 0:
            raise ConfigError(f"hqq: beta={self.beta} must be positive", "use e.g. beta: 10")
        if not self.kappa >= 1:
            raise ConfigError(f"hqq: kappa={self.kappa} must be >= 1", "use e.g. kappa: 1.01")
        if not is_int_at_least(self.iters, 1):
            raise ConfigError(f"hqq: iters={self.iters!r} must be a positive integer", "use e.g. iters: 20")
        if self.zero_format not in ZERO_FORMATS:
            raise ConfigError(f"hqq: zero_format={self.zero_format!r} is not supported", f"use one of {list(ZERO_FORMATS)}")

    @property
    def zero_frac_bits(self) -> int:
        """Fractional bits of the stored zero points."""
        return fixed_point_frac_bits(self.bits) if self.zero_format == "fixed" else 0


def fixed_point_frac_bits(bits: int) -> int:
    """Fractional bits of a zero point in [0, 2**bits) held in one uint8."""
    return 8 - bits


# --------------------------------------------------------------------------------------------
# Modules: uint8 zero points in fixed point
# --------------------------------------------------------------------------------------------


class _FixedPointZeros:
    """Mixin for packed modules whose ``zeros`` (rows, groups) uint8 hold ``zero * 2**(8-bits)``.

    Everything downstream (dequantization, the int8/int4 kernels' offsets) reads zero points
    through ``zero_points()``, so only storing and reading change.
    """

    def _zero_unit(self) -> float:
        return 2.0 ** -fixed_point_frac_bits(self.bits)

    def _store(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        super()._store(codes, scale, torch.zeros_like(zero))
        self.zeros.copy_(torch.round(zero.float() / self._zero_unit()).clamp(0, 255).to(torch.uint8))

    def zero_points(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        return super().zero_points(rows) * self._zero_unit()

    def describe(self) -> dict:
        desc = super().describe()
        desc["type"] = type(self).__name__
        desc["zero_format"] = f"uint8 fixed point, zero = u8 / 2**{fixed_point_frac_bits(self.bits)}"
        return desc


@register_quantized_module
class HQQLinear(_FixedPointZeros, QuantizedLinear):
    """``QuantizedLinear`` with real (fixed-point uint8) zero points; same buffers and kernels."""


@register_quantized_module
class HQQEmbedding(_FixedPointZeros, QuantizedEmbedding):
    """``QuantizedEmbedding`` with real (fixed-point uint8) zero points."""


# --------------------------------------------------------------------------------------------
# The solver
# --------------------------------------------------------------------------------------------


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding (proximal operator of ``|x|^p / beta``), elementwise."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * torch.pow(x.abs() + 1e-8, p - 1))


def _codes(W: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(W / s.unsqueeze(-1) + z.unsqueeze(-1)), 0, qmax)


def lp_error(weight: torch.Tensor, deq: torch.Tensor, p: float, group_size: int | None) -> torch.Tensor:
    """``sum |w - deq|^p`` per (row, group) of ``weight``/``deq`` (rows, cols) -> (rows, groups)."""
    rows, cols = weight.shape
    g = grid.effective_group_size(cols, group_size)
    return (weight.float() - deq.float()).abs().pow(p).reshape(rows, cols // g, g).sum(-1)


def hqq_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    zero_frac_bits: int | None = 4,
    optimize_scale: bool = False,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ-quantize ``weight`` (rows, cols) in groups of ``group_size`` columns.

    Returns ``(codes, scale, zero)``: codes (rows, cols) uint8 in ``[0, 2**bits)``, ``scale``
    (rows, groups) float32 holding bfloat16 values and ``zero`` (rows, groups) float32 on the
    grid of ``2**-zero_frac_bits`` (0: integers; ``None``: unrounded floats, for measurements,
    not storable); dequantization is ``(code - zero) * scale``.
    """
    rows, cols = weight.shape
    g = grid.effective_group_size(cols, group_size)
    W = weight.detach().float().reshape(rows, cols // g, g)
    qmax = 2**bits - 1
    unit = None if zero_frac_bits is None else 2.0**-zero_frac_bits
    zmax = float(qmax) if unit is None else min(float(qmax), 255 * unit)

    def project(s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = s.clamp_min(1e-10).to(torch.bfloat16).float()
        return s, (z if unit is None else torch.round(z / unit) * unit).clamp(0, zmax)

    def error(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        deq = (_codes(W, s, z, qmax) - z.unsqueeze(-1)) * s.unsqueeze(-1)
        return (W - deq).abs().pow(lp_norm).sum(-1)

    # Round-to-nearest (integer zero) is both a candidate and the start (with the real min-max zero).
    best_s, best_z = grid.grid_params(weight, bits, group_size, symmetric=False)
    best = error(best_s, best_z)
    s, z = project(best_s, -W.amin(-1).clamp(max=0) / best_s)
    for _ in range(iters):
        q = _codes(W, s, z, qmax)
        e = shrink_lp(W - (q - z.unsqueeze(-1)) * s.unsqueeze(-1), beta, lp_norm)
        target = W - e  # the weights the grid should reproduce, outlier errors set aside
        if optimize_scale:
            # Least squares target ~ a * q + b per group: scale = a, zero = -b / a.
            qc = q - q.mean(-1, keepdim=True)
            tc = target - target.mean(-1, keepdim=True)
            var = (qc * qc).sum(-1)
            a = (qc * tc).sum(-1) / var.clamp_min(1e-12)
            ok = (var > 0) & (a > 0)
            s_new = torch.where(ok, a, s)
            z_new = q.mean(-1) - target.mean(-1) / s_new
        else:
            s_new = s
            z_new = (q - target / s.unsqueeze(-1)).mean(-1)
        s, z = project(s_new, z_new)
        err = error(s, z)
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        beta *= kappa
    codes = _codes(W, best_s, best_z, qmax).to(torch.uint8).reshape(rows, cols)
    return codes, best_s, best_z


def quantize_module_hqq(module: nn.Module, config: HQQConfig) -> nn.Module:
    """The HQQ-quantized replacement of an ``nn.Linear`` or ``nn.Embedding`` (row-wise)."""
    codes, scale, zero = hqq_quantize(
        module.weight, config.bits, config.group_size, config.zero_frac_bits, config.optimize_scale,
        config.lp_norm, config.beta, config.kappa, config.iters,
    )
    fixed = config.zero_frac_bits > 0
    if isinstance(module, nn.Embedding):
        cls = HQQEmbedding if fixed else QuantizedEmbedding
        new = cls.from_codes(codes, scale, zero, config.bits, config.group_size, False, module.padding_idx)
    else:
        cls = HQQLinear if fixed else QuantizedLinear
        new = cls.from_codes(codes, scale, zero, config.bits, config.group_size, False, module.bias, act_bits=config.act_bits)
    new.set_compute_dtype(module.weight.dtype)
    return new


@register_method(HQQConfig)
def apply_hqq(loaded, config: HQQConfig, ctx) -> dict:
    modules = select_modules(loaded, config, allow_tied=True)
    check_group_size(config.name, modules, config.group_size)
    return replace_keeping_ties(loaded, modules, lambda m: quantize_module_hqq(m, config))
