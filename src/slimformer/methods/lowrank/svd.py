"""Plain truncated SVD of each linear weight into two smaller linears.

The rank-r truncation of ``W = U S V^T`` is the best rank-r approximation of the weight in the
Frobenius norm (Eckart & Young, 1936, "The approximation of one matrix by another of lower
rank"); it ignores which input directions the data actually uses, which is what ASVD and
SVD-LLM add.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from slimformer.methods.base import register_method
from slimformer.methods.lowrank.base import LowRankConfig, check_ranks_shrink, record, replace_by_factors, svd_factors
from slimformer.methods.selection import select_modules


@dataclass
class SVDConfig(LowRankConfig):
    """Truncated SVD of the weights (no calibration), rank from ``params_ratio`` or ``rank``."""

    name = "svd"
    paper = "The approximation of one matrix by another of lower rank (Eckart & Young, 1936)"
    summary = "truncated SVD: each linear becomes two smaller linears (rank from a parameter budget)"


@register_method(SVDConfig)
def apply_svd(loaded, config: SVDConfig, ctx) -> dict:
    modules = select_modules(loaded, config, types=(nn.Linear,))
    check_ranks_shrink(config, modules)
    ranks = {}
    for name, module in modules.items():
        r = config.rank_for(*module.weight.shape)
        B, A, _ = svd_factors(module.weight.detach(), r)
        ranks[name] = replace_by_factors(loaded, name, module, A, B).rank
    return record(modules, ranks)
