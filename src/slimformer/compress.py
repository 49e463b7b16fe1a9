"""The compression entry point: apply a recipe to a loaded model."""

from __future__ import annotations

import copy
import os
import time

import torch

from slimformer.methods import CompressionContext, apply_method
from slimformer.methods.preflight import check_fits, estimate_peak
from slimformer.methods.streaming import STREAMABLE_METHODS, materialize_all
from slimformer.models.loading import LoadedModel, max_positions
from slimformer.recipe import Recipe


def compress(loaded: LoadedModel, recipe: Recipe, progress: bool = False, preflight: bool = True,
             work_dir: str | os.PathLike | None = None, resume: bool = False) -> LoadedModel:
    """Apply every step of ``recipe`` to ``loaded`` in place and return it.

    Each step's record (what it touched, which kernel each layer got, dropped layers, measured
    sparsity, time taken) is appended to ``loaded.applied``; the recipe is kept for the manifest.
    With ``preflight`` the job's peak memory is estimated first and a job that cannot fit is
    refused (``InsufficientMemoryError``) before any work. A model loaded with streamed weights
    (``slimformer.methods.streaming.load_streamed``) keeps its blocks on disk until a blockwise
    step reaches them; other steps load the whole model first.
    """
    ctx = CompressionContext(recipe.calibration, progress=progress)
    ctx.max_positions = max_positions(loaded)
    ctx.weights = getattr(loaded, "streamed_weights", None)
    if preflight:
        check_fits(estimate_peak(loaded, recipe, ctx))
    job = None
    if work_dir is not None:
        from slimformer.methods.checkpoint import JobCheckpoint, job_identity

        job = JobCheckpoint.open(work_dir, job_identity(loaded, recipe), resume)
        ctx.checkpoint = job
    try:
        _apply_steps(loaded, recipe, ctx)
    finally:
        if job is not None:
            job.close()
    loaded.recipe = recipe.to_dict()
    return loaded


def _apply_steps(loaded: LoadedModel, recipe: Recipe, ctx: CompressionContext) -> None:
    if ctx.weights is not None and any(s.requires_original_weights or s.requires_teacher for s in recipe.steps):
        materialize_all(loaded)
    if any(step.requires_teacher for step in recipe.steps):
        ctx.teacher = copy.deepcopy(loaded.model).eval()
    if any(step.requires_original_weights for step in recipe.steps):
        ctx.original_weights = {
            name: module.weight.detach().float().clone()
            for name, module in loaded.model.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
    for index, step in enumerate(recipe.steps):
        ctx.layer_records = {}
        if ctx.checkpoint is not None:
            ctx.checkpoint.begin_step(index, step)
        if ctx.weights is not None and step.name not in STREAMABLE_METHODS:
            materialize_all(loaded)
        t0 = time.perf_counter()
        record = apply_method(loaded, step, ctx)
        loaded.applied.append({"step": step.to_dict(), "seconds": round(time.perf_counter() - t0, 3), **record})
    if ctx.weights is not None:
        materialize_all(loaded)  # blocks no step selected
