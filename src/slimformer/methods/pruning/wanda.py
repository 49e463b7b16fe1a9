"""Wanda: pruning by weights and activations.

Sun et al., 2024, "A Simple and Effective Pruning Approach for Large Language Models". The score
of weight ``W_ij`` is ``|W_ij| * ||X_j||_2`` over the calibration tokens; weights are compared
within each output row (or within each N:M group). Blocks are calibrated in order, each on the
outputs of the already-pruned blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimformer.methods.base import register_method
from slimformer.methods.calibration import blockwise
from slimformer.methods.pruning.base import PruningConfig, check_nm_width, prune_linear
from slimformer.methods.selection import select_modules


@dataclass
class WandaConfig(PruningConfig):
    """Wanda pruning of linear layers: unstructured (per output row) or N:M."""

    name = "wanda"
    family = "pruning"
    paper = "A Simple and Effective Pruning Approach for Large Language Models (Sun et al., 2024)"
    summary = "zero weights with the smallest |weight| x input-activation norm, per output row or N:M"
    requires_calibration = True
    resumable = True


@register_method(WandaConfig)
def apply_wanda(loaded, config: WandaConfig, ctx) -> dict:
    modules = select_modules(loaded, config, types=(nn.Linear,))
    check_nm_width(config, modules)
    sparsity = ctx.layer_record("sparsity")
    for name, module, stats in blockwise(loaded, ctx, modules, hessian=False, desc="wanda"):
        norm = torch.sqrt(stats.sq_norm[name])
        scores = module.weight.detach().abs() * norm.unsqueeze(0)
        sparsity[name] = prune_linear(loaded, name, module, scores, config, per_row=True)
    return {"modules": sorted(modules), "sparsity": sparsity}
