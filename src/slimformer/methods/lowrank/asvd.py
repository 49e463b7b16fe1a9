"""ASVD: activation-aware SVD.

Yuan et al., 2023, "ASVD: Activation-aware Singular Value Decomposition for Compressing Large
Language Models". Input channels that carry large activations matter more: the weight's
columns are scaled by ``s_j = (mean_t |x_tj|)^alpha`` over the calibration tokens before the
truncated SVD, and the scaling is folded back: ``W ~= (W S)_r S^-1``. Blocks are calibrated
in order, each on the outputs of the already-factorized blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimformer.errors import ConfigError
from slimformer.methods.base import register_method
from slimformer.methods.calibration import blockwise
from slimformer.methods.lowrank.base import LowRankConfig, check_ranks_shrink, record, replace_by_factors, svd_factors
from slimformer.methods.selection import select_modules


@dataclass
class ASVDConfig(LowRankConfig):
    """ASVD: columns scaled by the mean absolute input activation to the power ``alpha`` (the
    paper's 0.5) before the truncated SVD."""

    name = "asvd"
    paper = "ASVD: Activation-aware Singular Value Decomposition for Compressing Large Language Models (Yuan et al., 2023)"
    summary = "SVD of the weight with columns scaled by input-activation magnitudes, scaling folded back"
    requires_calibration = True
    resumable = True

    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alpha, bool) or not 0 < self.alpha <= 2:
            raise ConfigError(f"asvd: alpha={self.alpha!r} must be in (0, 2]", "use e.g. alpha: 0.5")


def asvd_factors(weight: torch.Tensor, mean_abs: torch.Tensor, rank: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(A, B)``: A (rank, in), B (out, rank) of ``weight`` (out, in) given the mean
    absolute input activation per input channel ``mean_abs`` (in,)."""
    s = mean_abs.double().clamp_min(1e-6 * float(mean_abs.max().clamp_min(1e-12))) ** alpha
    B, A, _ = svd_factors(weight.double() * s.unsqueeze(0), rank)
    return A / s.unsqueeze(0), B


@register_method(ASVDConfig)
def apply_asvd(loaded, config: ASVDConfig, ctx) -> dict:
    modules = select_modules(loaded, config, types=(nn.Linear,))
    check_ranks_shrink(config, modules)
    ranks = ctx.layer_record("ranks")
    for name, module, stats in blockwise(loaded, ctx, modules, hessian=False, desc="asvd"):
        A, B = asvd_factors(module.weight.detach(), stats.abs_sum[name] / stats.count[name], config.rank_for(*module.weight.shape), config.alpha)
        ranks[name] = replace_by_factors(loaded, name, module, A, B).rank
    return record(modules, ranks)
