"""GPTQ: second-order error compensation for weight quantization.

Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers". Columns are quantized one at a time; the error of each is spread over the
not-yet-quantized columns through the inverse Hessian ``H = X^T X`` of the layer's calibration
inputs (damped by ``damp * mean(diag H)``), processed in lazy blocks. With ``act_order`` columns
go in order of decreasing ``diag H``; group scales are then fixed up front from the weight
("static groups"), so groups stay contiguous on disk and no column permutation is stored.
Layers are processed block by block, each block calibrated on the outputs of the
already-quantized blocks before it, and with ``true_sequential`` stage by stage inside a block
(q/k/v, then the attention output, then the MLP), as in the GPTQ reference implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import register_method
from slimformer.methods.calibration import blockwise
from slimformer.methods.quantization import grid
from slimformer.methods.quantization.modules import QuantizedLinear
from slimformer.methods.quantization.rtn import WeightQuantConfig
from slimformer.methods.selection import check_group_size, select_modules
from slimformer.models.adapters import set_submodule


@dataclass
class GPTQConfig(WeightQuantConfig):
    """GPTQ settings: the grid (``bits``, ``group_size``, ``symmetric``), ``act_order`` (quantize
    columns by decreasing Hessian diagonal, static groups), ``damp`` (relative Hessian damping)
    ``block_size`` (columns per lazy update), ``true_sequential`` (inside each transformer
    block, calibrate each stage of layers on the outputs of the already-quantized stages),
    ``clip_search`` (with ``act_order``: each group's range shrunk to the clipping, from 1.0 down
    to 0.75, that minimises its Hessian-diagonal-weighted rounding error before the column loop;
    small at 4 bits, large at 2-3 bits: see the search section of the README) and
    ``bias_correction`` (layers that have a bias absorb the mean output shift the quantization
    error causes on the calibration inputs, ``(W - W_q) E[x]``, as in Nagel et al., 2019,
    "Data-Free Quantization Through Weight Equalization and Bias Correction"; layers without a
    bias are left as they are; off by default: on MiniLM's dev text it did not help, see
    benchmarks/results/calibration_transfer.md)."""

    name = "gptq"
    family = "quantization"
    paper = "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers (Frantar et al., 2023)"
    summary = "second-order (inverse-Hessian) error compensation of quantized weights on calibration data"
    requires_calibration = True
    resumable = True

    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    clip_search: bool = False
    bias_correction: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if "embedding" in self.targets:
            raise ConfigError("gptq: the embedding table has no input activations to compensate with", "quantize the embedding with a separate rtn step")
        if not 0 < self.damp < 1:
            raise ConfigError(f"gptq: damp={self.damp} must be in (0, 1)", "use e.g. damp: 0.01")
        if not is_int_at_least(self.block_size, 1):
            raise ConfigError(f"gptq: block_size={self.block_size!r} must be a positive integer", "use e.g. block_size: 128")
        if self.clip_search and not self.act_order and self.group_size is not None:
            raise ConfigError("gptq: clip_search needs act_order: true (static groups; groups found during the column loop are not searched)",
                              "set act_order: true or leave clip_search out")


@dataclass
class PreparedHessian:
    """What GPTQ needs from a layer's Hessian, computed once and shared by every layer that reads
    the same input (e.g. q, k and v): the column order ``perm`` (cols,), the columns that never saw
    a non-zero input ``dead`` (cols,) bool, and ``hinv`` (cols, cols), the upper Cholesky factor of
    the damped inverse Hessian in that order (float32)."""

    perm: torch.Tensor
    dead: torch.Tensor
    hinv: torch.Tensor
    diag: torch.Tensor  # diag H (cols,) in the original order, float32 (clip search importance)
    act_order: bool


def prepare_hessian(hessian: torch.Tensor, act_order: bool = True, damp: float = 0.01, scale: float = 1.0) -> PreparedHessian:
    """Column order, dead columns and inverse factor of ``scale * hessian`` (in, in) (pass a
    sum of x x^T and ``scale = 1 / tokens`` to skip a temporary mean).

    Float32, as in the GPTQ reference implementation, with at most two (in, in) matrices alive
    at a time (the Hessian of a 14k-wide down projection is 0.8 GB in float32); damping grows
    tenfold while a factorisation fails, and a float64 chain is the last resort.
    """
    H = hessian.detach().float() * scale  # a new tensor: the caller's stays as it is
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    diag = torch.diag(H).clone()
    perm = torch.argsort(diag, descending=True) if act_order else torch.arange(H.shape[0])
    if act_order:
        H = H.index_select(0, perm)
        H = H.index_select(1, perm)
    mean_diag = float(diag.mean())
    added = 0.0
    hinv = None
    for attempt in range(6):
        target = damp * 10**attempt * mean_diag
        H.diagonal().add_(target - added)
        added = target
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) != 0:
            continue
        L = torch.cholesky_inverse(L)  # the inverse Hessian (the factor is dropped)
        U, info = torch.linalg.cholesky_ex(L, upper=True)
        del L
        if int(info) == 0:
            hinv = U
            break
    del H
    if hinv is None:  # float32 could not factor it even with heavy damping: float64
        H64 = (hessian.detach().double() * scale)[perm][:, perm]
        H64[dead[perm], dead[perm]] = 1.0
        hinv = _inverse_hessian_cholesky(H64, damp)
    return PreparedHessian(perm, dead, hinv.contiguous(), diag, act_order)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | PreparedHessian,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    act_order: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    clip_search: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` (out, in) given ``hessian`` (in, in) = sum of x x^T over calibration
    tokens, or its :func:`prepare_hessian` form (then ``act_order``/``damp`` were applied there).

    Returns ``(codes, scale, zero)``: codes (out, in) uint8 in the original column order and
    ``scale``/``zero`` (out, groups), on the grid conventions of :mod:`grid`.

    The column loop runs on NumPy views with the rank-1 update of the remaining columns of a
    lazy block done in place by BLAS ``sger`` (a few microseconds per column instead of a dozen
    PyTorch calls); the update of the columns after the block is one matrix product.
    """
    prepared = hessian if isinstance(hessian, PreparedHessian) else prepare_hessian(hessian, act_order, damp)
    W = weight.detach().float().clone()
    rows, cols = W.shape
    W[:, prepared.dead] = 0.0
    g = grid.effective_group_size(cols, group_size)
    perm = prepared.perm
    static = prepared.act_order or group_size is None
    if static:
        shrink = grid.search_shrink(W, bits, group_size, symmetric, prepared.diag) if clip_search else 1.0
        scale, zero = grid.grid_params(W, bits, group_size, symmetric, shrink=shrink)
    else:
        scale = torch.empty(rows, cols // g)
        zero = torch.empty(rows, cols // g)
        if block_size % g:
            block_size = g * max(1, block_size // g)
    # Column-major working copy: row j of ``wt`` is column perm[j] of the weight.
    wt = np.ascontiguousarray(W.numpy().T[perm.numpy()])
    del W
    hinv = prepared.hinv.numpy()
    group_of = (perm // g).numpy()
    scale_t = np.ascontiguousarray(scale.numpy().T)  # (groups, rows): row group_of[j] serves column j
    zero_t = np.ascontiguousarray(zero.numpy().T)
    qt = np.empty((cols, rows), np.uint8)
    qmax = float(2**bits - 1)
    wt_torch, hinv_torch = torch.from_numpy(wt), torch.from_numpy(hinv)  # the same memory
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = wt[i1:i2]  # view: updated in place
        w1_torch = wt_torch[i1:i2]
        err1 = np.empty((i2 - i1, rows), np.float32)
        err1_torch = torch.from_numpy(err1)
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % g == 0:  # dynamic groups: columns in order, params from the updated weights
                s_g, z_g = grid.grid_params(torch.from_numpy(np.ascontiguousarray(w1[i : i + g].T)), bits, None, symmetric)
                scale_t[col // g], zero_t[col // g] = s_g[:, 0].numpy(), z_g[:, 0].numpy()
            w, s, z = w1[i], scale_t[group_of[col]], zero_t[group_of[col]]
            q = np.clip(np.rint(w / s) + z, 0.0, qmax)
            qt[col] = q
            err = (w - (q - z) * s) / hinv[col, col]
            err1[i] = err
            if i + 1 < i2 - i1:  # w1[i+1:] -= hinv[col, col+1:i2]^T err (rank 1, in place)
                w1_torch[i + 1 :].addr_(hinv_torch[col, col + 1 : i2], err1_torch[i], alpha=-1.0)
        if i2 < cols:
            wt_torch[i2:].sub_(hinv_torch[i1:i2, i2:].t() @ err1_torch)
    if not static:
        scale, zero = torch.from_numpy(scale_t.T.copy()), torch.from_numpy(zero_t.T.copy())
    return torch.from_numpy(qt[torch.argsort(perm).numpy()].T.copy()), scale, zero


def _inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian (float32), raising damping if needed."""
    diag_mean = torch.mean(torch.diag(H))
    for attempt in range(6):
        try:
            damped = H.clone()  # damping added in place: no (in, in) identity or sum temporaries
            damped.diagonal().add_((damp * 10**attempt) * diag_mean)
            L = torch.linalg.cholesky(damped)
            del damped
            Hinv = torch.cholesky_inverse(L)
            del L
            return torch.linalg.cholesky(Hinv, upper=True).float()
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            continue
    raise ConfigError("gptq: the calibration Hessian is not positive definite even with heavy damping", "use more calibration samples or a larger damp")


def quantize_linear_gptq(module: torch.nn.Linear, hessian: torch.Tensor | PreparedHessian, bits: int, group_size: int | None, symmetric: bool,
                         act_order: bool = True, damp: float = 0.01, block_size: int = 128, act_bits: int | None = None,
                         clip_search: bool = False) -> QuantizedLinear:
    """The GPTQ-quantized replacement of ``module`` given its mean input Hessian (in, in) or its
    :func:`prepare_hessian` form."""
    codes, scale, zero = gptq_quantize(module.weight, hessian, bits, group_size, symmetric, act_order, damp, block_size, clip_search)
    new = QuantizedLinear.from_codes(codes, scale, zero, bits, group_size, symmetric, module.bias, act_bits=act_bits, prepare=False)
    new.set_compute_dtype(module.weight.dtype)
    return new


@register_method(GPTQConfig)
def apply_gptq(loaded, config: GPTQConfig, ctx) -> dict:
    modules = select_modules(loaded, config, types=(torch.nn.Linear,))
    check_group_size(config.name, modules, config.group_size)
    kernels = ctx.layer_record("kernels")
    prepared, prepared_for = None, None  # layers reading the same input share one inverse Hessian
    for name, module, stats in blockwise(loaded, ctx, modules, hessian=True, desc="gptq", sequential=config.true_sequential):
        leader = stats.input_leader(name)
        if leader != prepared_for:
            prepared = None  # the previous stage's inverse goes before the next is built
            prepared = prepare_hessian(stats.hessian[name], config.act_order, config.damp, scale=1.0 / stats.count[name])
            prepared_for = leader
        new = quantize_linear_gptq(
            module, prepared, config.bits, config.group_size, config.symmetric,
            config.act_order, config.damp, config.block_size, config.act_bits, config.clip_search,
        )
        if config.bias_correction and new.bias is not None:
            correct_bias(new, module.weight, stats.sum[name] / stats.count[name])
        set_submodule(loaded.model, name, new)
        kernels[name] = new.kernel
    return {"modules": sorted(modules), "kernels": kernels}


def correct_bias(new: QuantizedLinear, weight: torch.Tensor, input_mean: torch.Tensor) -> None:
    """Add ``(W - W_q) mean(x)`` to the bias of ``new`` (float32 bias, stored as it is): the
    expected output error of the quantized layer on the calibration inputs becomes zero, which
    lowers its mean squared output error by exactly the square of that shift."""
    shift = (weight.detach().float() - new.dequantized_weight()) @ input_mean.float()
    new.bias.add_(shift)  # every kernel reads the bias buffer itself: no run-time form to rebuild
