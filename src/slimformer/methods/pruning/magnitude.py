"""Magnitude pruning: drop the weights of smallest absolute value.

Zhu & Gupta, 2017, "To prune, or not to prune: exploring the efficacy of pruning for model
compression" (one-shot, layer-wise threshold), and N:M patterns (2:4, 4:8) as in SR-STE
(Zhou et al., 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch").
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from slimformer.methods.base import register_method
from slimformer.methods.pruning.base import PruningConfig, check_nm_width, prune_linear
from slimformer.methods.selection import select_modules


@dataclass
class MagnitudeConfig(PruningConfig):
    """Magnitude pruning of linear layers: unstructured (per-layer threshold) or N:M."""

    name = "magnitude"
    family = "pruning"
    paper = "To prune, or not to prune: exploring the efficacy of pruning for model compression (Zhu & Gupta, 2017)"
    summary = "zero the smallest-magnitude weights, unstructured per layer or N:M (2:4, 4:8)"


@register_method(MagnitudeConfig)
def apply_magnitude(loaded, config: MagnitudeConfig, ctx) -> dict:
    modules = select_modules(loaded, config, types=(nn.Linear,))
    check_nm_width(config, modules)
    sparsity = {name: prune_linear(loaded, name, m, m.weight.detach().abs(), config, per_row=False) for name, m in modules.items()}
    return {"modules": sorted(modules), "sparsity": sparsity}
