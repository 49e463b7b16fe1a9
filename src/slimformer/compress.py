"""The compression entry point: apply a recipe to a loaded model."""

from __future__ import annotations

import time

import torch

from slimformer.methods import CompressionContext, apply_method
from slimformer.models.loading import LoadedModel, max_positions
from slimformer.recipe import Recipe


def compress(loaded: LoadedModel, recipe: Recipe, progress: bool = False) -> LoadedModel:
    """Apply every step of ``recipe`` to ``loaded`` in place and return it.

    Each step's record (what it touched, which kernel each layer got, dropped layers, measured
    sparsity, time taken) is appended to ``loaded.applied``; the recipe is kept for the manifest.
    """
    ctx = CompressionContext(recipe.calibration, progress=progress)
    ctx.max_positions = max_positions(loaded)
    if any(step.requires_original_weights for step in recipe.steps):
        ctx.original_weights = {
            name: module.weight.detach().float().clone()
            for name, module in loaded.model.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
    for step in recipe.steps:
        t0 = time.perf_counter()
        record = apply_method(loaded, step, ctx)
        loaded.applied.append({"step": step.to_dict(), "seconds": round(time.perf_counter() - t0, 3), **record})
    loaded.recipe = recipe.to_dict()
    return loaded
