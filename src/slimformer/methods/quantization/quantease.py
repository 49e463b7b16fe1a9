"""QuantEase: layer-wise quantization by cyclic coordinate descent on the layer's output error.

Behdin et al., 2023, "QuantEase: Optimization-based Quantization for Language Models". For a
linear layer with weight ``W`` (out, in) and input Hessian ``H`` (in, in) = mean of ``x x^T`` over
calibration tokens, the layer-wise objective is

    f(Q) = tr((W - Q) H (W - Q)^T),      Q on the quantization grid.

Rows are independent, so one coordinate step updates a whole column ``j`` of ``Q`` at once: with
``G = (W - Q) H``, the best unconstrained value of column ``j`` given all others is
``Q[:, j] + G[:, j] / H[j, j]``, and because ``f`` is a convex quadratic in that one column the
best grid value is the grid point nearest to it. Every step therefore lowers ``f`` or leaves it
as it is; a sweep visits every column once. QuantEase starts from any feasible ``Q``: here from
GPTQ's solution (with its clipping search), so the result is never worse than GPTQ's on the
calibration objective.

Two choices of ours, beside the paper's algorithm:
- ``damp`` adds ``damp * mean(diag H) * I`` to the objective's Hessian (a ridge pulling ``Q``
  towards ``W``): with a few thousand calibration tokens and 1536-wide inputs the undamped
  objective is over-fitted, and on held-out activations the gain shrinks to almost nothing for
  the down projections (measured on SmolLM2; see the README's search section);
- ``refit_scales``: after each sweep every group's scale is moved to its least-squares value in
  the same objective with the codes and the integer zero point fixed (rounded to the stored
  bfloat16), so the grid itself follows the codes.

Lazy column blocks keep each coordinate step at ``O(out * block)``; the rest of ``G`` is updated
by one matrix product per block, so a sweep costs about one GPTQ pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import register_method
from slimformer.methods.calibration import blockwise
from slimformer.methods.quantization import grid
from slimformer.methods.quantization.gptq import PreparedHessian, gptq_quantize, prepare_hessian
from slimformer.methods.quantization.modules import QuantizedLinear
from slimformer.methods.quantization.rtn import WeightQuantConfig
from slimformer.methods.selection import check_group_size, select_modules
from slimformer.models.adapters import set_submodule


@dataclass
class QuantEaseConfig(WeightQuantConfig):
    """QuantEase settings: the grid (``bits``, ``group_size``, ``symmetric``), ``passes`` (coordinate
    descent sweeps over all columns after the GPTQ start), ``damp`` (relative ridge on the
    objective's Hessian; also GPTQ's damping at the start), ``clip_search`` (GPTQ's clipping
    search for the start's grid), ``refit_scales`` (least-squares group scales after each sweep)
    and ``true_sequential`` (inside each block, calibrate each stage on the outputs of the stages
    already quantized, as GPTQ does)."""

    name = "quantease"
    family = "quantization"
    paper = "QuantEase: Optimization-based Quantization for Language Models (Behdin et al., 2023)"
    summary = "coordinate descent on each layer's calibration output error, from GPTQ's solution; group scales refitted"
    requires_calibration = True
    resumable = True

    passes: int = 4
    damp: float = 0.05
    clip_search: bool = True
    refit_scales: bool = True
    true_sequential: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if "embedding" in self.targets:
            raise ConfigError("quantease: the embedding table has no input activations to fit", "quantize the embedding with a separate rtn step")
        if self.activations != "float":
            raise ConfigError("quantease: weight-only quantization (activations: float)", "use smoothquant or rtn for W8A8")
        if not is_int_at_least(self.passes, 0):
            raise ConfigError(f"quantease: passes={self.passes!r} must be an integer >= 0", "use e.g. passes: 4")
        if not 0 <= self.damp < 1:
            raise ConfigError(f"quantease: damp={self.damp!r} must be in [0, 1)", "use e.g. damp: 0.05")
        for flag in ("clip_search", "refit_scales", "true_sequential"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"quantease: {flag}={getattr(self, flag)!r} must be true or false", f"write {flag}: true or {flag}: false")


def layer_objective(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)`` for ``weight``/``dequantized`` (out, in) and ``hessian`` (in, in), in float64."""
    d = (weight.double() - dequantized.double())
    return float(torch.einsum("oi,ij,oj->", d, hessian.double(), d))


def objective_hessian(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """The Hessian (in, in) float32 QuantEase minimises over: never-seen columns get a unit
    diagonal (so their codes are pulled to the target weight, which :func:`quantease_quantize`
    sets to zero there, as GPTQ does) and ``damp * mean(diag)`` is added."""
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * float(torch.diag(H).mean()))
    return H


def start_hessian(hessian: torch.Tensor, damp: float) -> PreparedHessian:
    """GPTQ's form of ``hessian`` for the start (act-order; ``damp``, at least 1e-4: the
    objective's ridge may be 0, GPTQ's inverse needs some)."""
    return prepare_hessian(hessian, act_order=True, damp=max(damp, 1e-4))


def quantease_refine(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int | None,
    passes: int = 4,
    refit_scales: bool = True,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coordinate descent from a feasible start.

    ``weight`` (out, in); ``hessian`` (in, in), the objective's (see :func:`objective_hessian`);
    ``codes`` (out, in) uint8 and ``scale``/``zero`` (out, groups): the start, on the conventions
    of :mod:`grid` (scales are rounded to bfloat16, as stored). Returns ``(codes, scale, zero)``
    of the same shapes; ``zero`` is returned unchanged. No step raises the objective (a code
    step moves to the best grid point of its column given the others; a scale moves only for
    rows where its rounded least-squares value lowers the error), up to float32 rounding of the
    running residual.
    """
    H = hessian.detach().float().contiguous()
    W = weight.detach().float()
    rows, cols = W.shape
    g = grid.effective_group_size(cols, group_size)
    groups = cols // g
    qmax = float(2**bits - 1)
    scale = scale.float().to(torch.bfloat16).float()
    # Column-major working copies: row j is column j of the weight.
    st = np.ascontiguousarray(scale.numpy().T.repeat(g, axis=0))  # (cols, rows): the scale of each weight
    zt = np.ascontiguousarray(zero.float().numpy().T.repeat(g, axis=0))
    qt = np.ascontiguousarray(codes.numpy().T.astype(np.float32))
    dt = st * (qt - zt)  # dequantized, (cols, rows)
    gt_torch = H @ (W - torch.from_numpy(dt).T).T  # G^T = H (W - Q)^T, (cols, rows)
    gt = gt_torch.numpy()
    h = H.numpy()
    hdiag = np.diag(h).copy()
    for _ in range(passes):
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            delta = np.zeros((i2 - i1, rows), np.float32)
            delta_torch, h_blk = torch.from_numpy(delta), H[i1:i2, i1:i2].contiguous()
            g_blk = gt_torch[i1:i2]
            for i in range(i2 - i1):
                j = i1 + i
                target = dt[j] + gt[j] / hdiag[j]
                q = np.clip(np.rint(target / st[j]) + zt[j], 0.0, qmax)
                new = st[j] * (q - zt[j])
                step = new - dt[j]
                qt[j], dt[j], delta[i] = q, new, step
                g_blk.addr_(h_blk[:, i], delta_torch[i], alpha=-1.0)  # G^T[block] -= H[block, j] step^T
            if i1 > 0:
                gt_torch[:i1].sub_(H[:i1, i1:i2] @ delta_torch)
            if i2 < cols:
                gt_torch[i2:].sub_(H[i2:, i1:i2] @ delta_torch)
        if refit_scales:
            for k in range(groups):
                J = slice(k * g, (k + 1) * g)
                c = qt[J] - zt[J]  # (g, rows) integer offsets
                c_torch = torch.from_numpy(np.ascontiguousarray(c))
                num = (gt[J] * c).sum(0)  # (rows,)
                den = (c_torch * (H[J, J] @ c_torch)).sum(0).numpy()
                old = st[k * g]
                with np.errstate(divide="ignore", invalid="ignore"):
                    proposed = np.where(den > 0, old + num / den, old)
                proposed = torch.from_numpy(proposed.astype(np.float32)).to(torch.bfloat16).float().numpy()
                moved = proposed - old
                # the bf16 rounding may land past the optimum: keep a row's old scale unless its error falls
                proposed = np.where((proposed > 0) & (moved * (moved * den - 2 * num) < 0), proposed, old)
                step = (proposed - old)[None, :] * c  # (g, rows)
                if not np.any(step):
                    continue
                st[J] = proposed[None, :]
                dt[J] += step
                gt_torch.sub_(H[:, J] @ torch.from_numpy(np.ascontiguousarray(step)))
    new_scale = torch.from_numpy(np.ascontiguousarray(st[::g].T))
    return torch.from_numpy(np.ascontiguousarray(qt.T)).to(torch.uint8), new_scale, zero


def quantease_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                       passes: int = 4, damp: float = 0.05, clip_search: bool = True, refit_scales: bool = True,
                       prepared: PreparedHessian | None = None, objective: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's solution (act-order, static groups, ``damp``, optional clipping search) refined by
    ``passes`` QuantEase sweeps on the ``damp``-ridged objective of ``hessian`` (in, in) (a mean of
    ``x x^T``). Returns ``(codes, scale, zero)`` as :func:`gptq_quantize` does. ``prepared``
    (:func:`start_hessian`) and ``objective`` (:func:`objective_hessian`)
    may be passed in when several grids are fitted to one layer; they are computed otherwise."""
    prepared = prepared if prepared is not None else start_hessian(hessian, damp)
    codes, scale, zero = gptq_quantize(weight, prepared, bits, group_size, symmetric, act_order=True, clip_search=clip_search)
    del prepared
    if passes == 0:
        return codes, scale, zero
    target = weight.detach().float().clone()
    target[:, torch.diag(hessian) == 0] = 0.0  # inputs never seen: their weights go to zero, as in GPTQ
    objective = objective if objective is not None else objective_hessian(hessian, damp)
    return quantease_refine(target, objective, codes, scale, zero, bits, group_size, passes, refit_scales)


def quantize_linear_quantease(module: torch.nn.Linear, hessian: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                              passes: int = 4, damp: float = 0.05, clip_search: bool = True, refit_scales: bool = True,
                              prepared: PreparedHessian | None = None, objective: torch.Tensor | None = None) -> QuantizedLinear:
    """The QuantEase-quantized replacement of ``module`` given its mean input Hessian (in, in)
    (``prepared``/``objective``: see :func:`quantease_quantize`)."""
    codes, scale, zero = quantease_quantize(module.weight, hessian, bits, group_size, symmetric, passes, damp, clip_search, refit_scales,
                                            prepared, objective)
    new = QuantizedLinear.from_codes(codes, scale, zero, bits, group_size, symmetric, module.bias, prepare=False)
    new.set_compute_dtype(module.weight.dtype)
    return new


@register_method(QuantEaseConfig)
def apply_quantease(loaded, config: QuantEaseConfig, ctx) -> dict:
    modules = select_modules(loaded, config, types=(torch.nn.Linear,))
    check_group_size(config.name, modules, config.group_size)
    kernels = ctx.layer_record("kernels")
    for name, module, stats in blockwise(loaded, ctx, modules, hessian=True, desc="quantease", sequential=config.true_sequential):
        new = quantize_linear_quantease(module, stats.hessian[name] / stats.count[name], config.bits, config.group_size, config.symmetric,
                                        config.passes, config.damp, config.clip_search, config.refit_scales)
        set_submodule(loaded.model, name, new)
        kernels[name] = new.kernel
    return {"modules": sorted(modules), "kernels": kernels}
