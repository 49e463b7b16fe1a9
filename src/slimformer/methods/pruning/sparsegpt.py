"""SparseGPT: one-shot pruning with second-order (OBS) weight updates, optionally joint with
quantization.

Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot". For each linear layer with calibration inputs ``X`` and Hessian ``H = X^T X``
(damped by ``damp * mean(diag H)``), columns are processed left to right in blocks of
``block_size``. At the start of each block the mask of the block is chosen by the OBS saliency
``w^2 / [H^-1]_jj^2`` (unstructured: the lowest ``sparsity`` fraction of the block; N:M: the
lowest M-N of every M columns of each row, chosen when the sweep reaches them); each column
is then pruned (and, with ``bits``, its kept weights rounded to the grid) and its error is
spread over the not-yet-processed columns through the upper Cholesky factor of ``H^-1``, as
GPTQ does for rounding. With ``bits`` the layer is stored with quantized kept values whose
grid is fixed at the first column of each group from the updated weights (joint
sparsification and quantization in one pass, the paper's section 3.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import register_method
from slimformer.methods.calibration import blockwise
from slimformer.methods.pruning.base import PruningConfig, check_nm_width, store_pruned
from slimformer.methods.quantization import grid
from slimformer.methods.quantization.gptq import prepare_hessian
from slimformer.methods.selection import select_modules


@dataclass
class SparseGPTConfig(PruningConfig):
    """SparseGPT pruning of linear layers: unstructured (mask per column block) or N:M, with
    ``damp`` (relative Hessian damping), ``block_size`` (columns per mask block and lazy update)
    and, with ``bits``, joint quantization of the kept weights (see PruningConfig)."""

    name = "sparsegpt"
    family = "pruning"
    paper = "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot (Frantar & Alistarh, 2023)"
    summary = "OBS pruning with inverse-Hessian weight updates, unstructured or N:M, optionally joint with quantization"
    requires_calibration = True
    resumable = True

    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.damp, bool) or not 0 < self.damp < 1:
            raise ConfigError(f"sparsegpt: damp={self.damp} must be in (0, 1)", "use e.g. damp: 0.01")
        if not is_int_at_least(self.block_size, 1):
            raise ConfigError(f"sparsegpt: block_size={self.block_size!r} must be a positive integer", "use e.g. block_size: 128")
        if self.nm is not None and self.block_size % self.nm[1]:
            raise ConfigError(f"sparsegpt: block_size {self.block_size} is not a multiple of M={self.nm[1]}", "use e.g. block_size: 128")


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                    bits: int | None = None, group_size: int | None = None, symmetric: bool = False,
                    damp: float = 0.01, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Prune ``weight`` (out, in) given ``hessian`` (in, in) (mean of x x^T over calibration tokens).

    Returns ``(pruned, mask, scale, zero)``: the updated float32 weight (out, in) with zeros
    where pruned (and, with ``bits``, kept values exactly on the grid), the keep-mask (out, in)
    bool, and with ``bits`` the grid ``scale``/``zero`` (out, groups), else ``None``.
    Unstructured: each block of columns loses exactly ``round(sparsity * out * block)`` weights.
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    prepared = prepare_hessian(hessian, act_order=False, damp=damp)  # float32, at most two (in, in) alive
    W[:, prepared.dead] = 0.0
    Hinv = prepared.hinv
    g = grid.effective_group_size(cols, group_size)
    if bits is not None and group_size is not None and block_size % g:
        block_size = g * max(1, block_size // g)
    scale = zero = None
    if bits is not None:
        scale = torch.ones(rows, grid.num_groups(cols, group_size))
        zero = torch.zeros(rows, grid.num_groups(cols, group_size))
        if group_size is None:  # one grid per row, fixed from the whole (unpruned) row up front
            scale, zero = grid.grid_params(W, bits, None, symmetric)
    qmax = None if bits is None else 2**bits - 1
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        prune1 = torch.zeros(rows, count, dtype=torch.bool)
        if nm is None:
            k = int(round(sparsity * rows * count))
            if k:
                saliency = (W1**2 / (d.unsqueeze(0) ** 2)).reshape(-1)
                prune1.view(-1)[torch.topk(saliency, k, largest=False).indices] = True
        for i in range(count):
            col = i1 + i
            if nm is not None and i % nm[1] == 0:
                saliency = W1[:, i : i + nm[1]] ** 2 / (d[i : i + nm[1]].unsqueeze(0) ** 2)
                drop = torch.topk(saliency, nm[1] - nm[0], dim=1, largest=False).indices
                prune1.scatter_(1, i + drop, True)
            if bits is not None and group_size is not None and col % g == 0:
                span = W1[:, i : i + g]
                if nm is None:
                    span = torch.where(prune1[:, i : i + g], torch.zeros(()), span)
                s, z = grid.grid_params(span, bits, None, symmetric)
                scale[:, col // g], zero[:, col // g] = s[:, 0], z[:, 0]
            w = W1[:, i]
            q = torch.where(prune1[:, i], torch.zeros(()), w)
            if bits is not None:
                s, z = scale[:, col // g], zero[:, col // g]
                q = (torch.clamp(torch.round(q / s) + z, 0, qmax) - z) * s
                q = torch.where(prune1[:, i], torch.zeros(()), q)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~prune1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, keep, scale, zero


@register_method(SparseGPTConfig)
def apply_sparsegpt(loaded, config: SparseGPTConfig, ctx) -> dict:
    modules = select_modules(loaded, config, types=(nn.Linear,))
    check_nm_width(config, modules)
    sparsity = ctx.layer_record("sparsity")
    for name, module, stats in blockwise(loaded, ctx, modules, hessian=True, desc="sparsegpt"):
        pruned, keep, scale, zero = sparsegpt_prune(
            module.weight, stats.hessian[name] / stats.count[name], config.sparsity, config.nm,
            config.bits, config.group_size, config.symmetric, config.damp, config.block_size,
        )
        sparsity[name] = store_pruned(loaded, name, module, pruned, keep, config, scale, zero)
    return {"modules": sorted(modules), "sparsity": sparsity, "storage": config.storage, "bits": config.bits}
