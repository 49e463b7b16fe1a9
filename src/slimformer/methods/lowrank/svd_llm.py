"""SVD-LLM: truncation-aware data whitening.

Wang et al., 2025, "SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language
Model Compression". With the Cholesky factor ``S`` of the calibration inputs' Gram matrix
(``S S^T = X^T X``), the singular values of ``W S`` measure exactly the output error
``||X (W - W')^T||`` that truncating them causes, so the truncation ``W' = (W S)_r S^-1`` is the
rank-r weight with the least output error on the calibration data. Blocks are calibrated in
order, each on the outputs of the already-factorized blocks.
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
class SVDLLMConfig(LowRankConfig):
    """SVD-LLM whitening; ``damp`` (relative diagonal added to ``X^T X`` so its Cholesky
    factor exists)."""

    name = "svd-llm"
    paper = "SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language Model Compression (Wang et al., 2025)"
    summary = "SVD of the weight in the whitened input space (Cholesky of X^T X): least output error at a rank"
    requires_calibration = True
    resumable = True

    damp: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.damp, bool) or not 0 < self.damp < 1:
            raise ConfigError(f"svd-llm: damp={self.damp!r} must be in (0, 1)", "use e.g. damp: 0.0001")


def whitening_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower Cholesky factor S (in, in) float64 of ``hessian + damp * mean(diag) * I``, raising
    the damping until it exists."""
    H = hessian.double()
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    level = float(torch.diag(H).mean().clamp_min(1e-12))
    for attempt in range(8):
        S, info = torch.linalg.cholesky_ex(H + damp * 10**attempt * level * eye)
        if int(info) == 0:
            return S
    raise ConfigError("svd-llm: the calibration Gram matrix is not positive definite even with heavy damping", "use more calibration samples or a larger damp")


def svd_llm_factors(weight: torch.Tensor, hessian: torch.Tensor, rank: int, damp: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(A, B)``: A (rank, in), B (out, rank) of ``weight`` (out, in) given
    ``hessian`` (in, in) = mean of x x^T over the calibration tokens."""
    S = whitening_factor(hessian, damp)
    B, M, _ = svd_factors(weight.double() @ S, rank)  # M (rank, in) = sqrt(S_r) V_r^T
    A = torch.linalg.solve_triangular(S.t(), M.t(), upper=True).t()  # A = M S^-1
    return A, B


@register_method(SVDLLMConfig)
def apply_svd_llm(loaded, config: SVDLLMConfig, ctx) -> dict:
    modules = select_modules(loaded, config, types=(nn.Linear,))
    check_ranks_shrink(config, modules)
    ranks = ctx.layer_record("ranks")
    for name, module, stats in blockwise(loaded, ctx, modules, hessian=True, desc="svd-llm"):
        A, B = svd_llm_factors(module.weight.detach(), stats.hessian[name] / stats.count[name], config.rank_for(*module.weight.shape), config.damp)
        ranks[name] = replace_by_factors(loaded, name, module, A, B).rank
    return record(modules, ranks)
