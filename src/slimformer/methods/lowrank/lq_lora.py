"""LQ-LoRA-style decomposition: a low-rank part plus a quantized residual.

Guo et al., 2024, "LQ-LoRA: Low-rank Plus Quantized Matrix Decomposition for Efficient Language
Model Finetuning". The weight is split as ``W ~= Q + B A`` with ``Q`` on a low-bit grid and
``B A`` of rank ``rank``, by alternating: ``B A`` = best rank-r approximation of ``W - Q``, then
``Q`` = round-to-nearest of ``W - B A`` (starting from ``Q = 0``), keeping the pair with the
least weight error. The result is a ``LowRankCompensated`` layer (quantized inner layer plus
bfloat16 factors), which the rest of slimformer already stores, loads and runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, ModuleSelection, register_method
from slimformer.methods.lowrank.base import svd_factors
from slimformer.methods.quantization import grid
from slimformer.methods.quantization.eora import LowRankCompensated
from slimformer.methods.quantization.modules import QuantizedLinear
from slimformer.methods.selection import check_group_size, select_modules
from slimformer.models.adapters import set_submodule


@dataclass
class LQLoRAConfig(MethodConfig, ModuleSelection):
    """Low-rank (``rank``, bfloat16 factors) plus a quantized residual on the grid ``bits`` /
    ``group_size`` / ``symmetric``, alternated ``iterations`` times."""

    name = "lq-lora"
    family = "lowrank"
    paper = "LQ-LoRA: Low-rank Plus Quantized Matrix Decomposition for Efficient Language Model Finetuning (Guo et al., 2024)"
    summary = "W = quantized residual + low-rank factors, found by alternating SVD and rounding"

    rank: int = 16
    bits: int = 3
    group_size: int | None = 64
    symmetric: bool = False
    iterations: int = 5

    def __post_init__(self) -> None:
        self._validate_selection(allowed=("linear", "head"))
        if not is_int_at_least(self.rank, 1):
            raise ConfigError(f"lq-lora: rank={self.rank!r} must be a positive integer", "use e.g. rank: 16")
        if isinstance(self.bits, bool) or self.bits not in grid.SUPPORTED_BITS:
            raise ConfigError(f"lq-lora: bits={self.bits!r} is not supported", f"use bits in {list(grid.SUPPORTED_BITS)}")
        if self.group_size is not None and not is_int_at_least(self.group_size, 1):
            raise ConfigError(f"lq-lora: group_size={self.group_size!r} must be a positive integer or null", "use e.g. group_size: 64")
        if not is_int_at_least(self.iterations, 1):
            raise ConfigError(f"lq-lora: iterations={self.iterations!r} must be a positive integer", "use e.g. iterations: 5")


def lq_decompose(weight: torch.Tensor, rank: int, bits: int, group_size: int | None, symmetric: bool, iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """Split ``weight`` (out, in) into quantized ``Q`` plus ``B A``.

    Returns ``(codes, scale, zero, A, B, errors)``: codes (out, in) uint8 and ``scale``/``zero``
    (out, groups) of Q, A (rank, in) and B (out, rank) bfloat16-representable float32, and the
    relative weight error ``||W - Q - B A|| / ||W||`` after each iteration (the kept pair is the
    best of them)."""
    W = weight.detach().float()
    norm = float(W.norm().clamp_min(1e-12))
    Q = torch.zeros_like(W)
    best = None
    errors: list[float] = []
    for _ in range(iterations):
        B, A, _s = svd_factors(W - Q, rank)
        A, B = A.to(torch.bfloat16).float(), B.to(torch.bfloat16).float()
        low = B @ A
        scale, zero = grid.grid_params(W - low, bits, group_size, symmetric)
        codes = grid.quantize_codes(W - low, scale, zero, bits)
        Q = grid.dequantize_codes(codes, scale, zero)
        err = float((W - Q - low).norm()) / norm
        errors.append(err)
        if best is None or err < best[0]:
            best = (err, codes, scale, zero, A, B)
    _, codes, scale, zero, A, B = best
    return codes, scale, zero, A, B, errors


@register_method(LQLoRAConfig)
def apply_lq_lora(loaded, config: LQLoRAConfig, ctx) -> dict:
    modules = select_modules(loaded, config, types=(nn.Linear,))
    check_group_size(config.name, modules, config.group_size)
    errors: dict[str, float] = {}
    ranks: dict[str, int] = {}
    for name, module in modules.items():
        rank = min(config.rank, *module.weight.shape)
        codes, scale, zero, A, B, errs = lq_decompose(module.weight, rank, config.bits, config.group_size, config.symmetric, config.iterations)
        inner = QuantizedLinear.from_codes(codes, scale, zero, config.bits, config.group_size, config.symmetric, module.bias)
        new = LowRankCompensated.from_factors(inner, A, B)
        new.set_compute_dtype(module.weight.dtype)
        set_submodule(loaded.model, name, new)
        errors[name] = min(errs)
        ranks[name] = rank
    return {"modules": sorted(modules), "ranks": ranks, "relative_weight_error": errors}
