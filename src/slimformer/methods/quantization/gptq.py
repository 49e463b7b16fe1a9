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
    ``block_size`` (columns per lazy update) and ``true_sequential`` (inside each transformer
    block, calibrate each stage of layers on the outputs of the already-quantized stages)."""

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

    def __post_init__(self) -> None:
        super().__post_init__()
        if "embedding" in self.targets:
            raise ConfigError("gptq: the embedding table has no input activations to compensate with", "quantize the embedding with a separate rtn step")
        if not 0 < self.damp < 1:
            raise ConfigError(f"gptq: damp={self.damp} must be in (0, 1)", "use e.g. damp: 0.01")
        if not is_int_at_least(self.block_size, 1):
            raise ConfigError(f"gptq: block_size={self.block_size!r} must be a positive integer", "use e.g. block_size: 128")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    act_order: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    clip_search: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` (out, in) given ``hessian`` (in, in) = sum of x x^T over calibration tokens.

    Returns ``(codes, scale, zero)``: codes (out, in) uint8 in the original column order and
    ``scale``/``zero`` (out, groups), on the grid conventions of :mod:`grid`.
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    g = grid.effective_group_size(cols, group_size)
    groups = cols // g
    scale = torch.empty(rows, groups)
    zero = torch.empty(rows, groups)
    static = act_order or group_size is None
    if static:
        shrink = grid.search_shrink(W, bits, group_size, symmetric, torch.diag(H).float()) if clip_search else 1.0
        scale, zero = grid.grid_params(W, bits, group_size, symmetric, shrink=shrink)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W = W[:, perm]
    H = H[perm][:, perm]
    Hinv = _inverse_hessian_cholesky(H, damp)
    del H  # only the inverse factor is needed from here on (bounds memory on wide layers)
    if group_size is not None and not static and block_size % g:
        block_size = g * max(1, block_size // g)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    qmax = 2**bits - 1
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = int(perm[col])
            gi = orig // g
            if not static and orig % g == 0:
                s, z = grid.grid_params(W1[:, i : i + g], bits, None, symmetric)
                scale[:, gi], zero[:, gi] = s[:, 0], z[:, 0]
            w = W1[:, i]
            s, z = scale[:, gi], zero[:, gi]
            q = torch.clamp(torch.round(w / s) + z, 0, qmax)
            codes[:, col] = q.to(torch.uint8)
            dq = (q - z) * s
            d = Hinv1[i, i]
            err = (w - dq) / d
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    invperm = torch.argsort(perm)
    return codes[:, invperm], scale, zero


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


def quantize_linear_gptq(module: torch.nn.Linear, hessian: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                         act_order: bool = True, damp: float = 0.01, block_size: int = 128, act_bits: int | None = None,
                         clip_search: bool = False) -> QuantizedLinear:
    """The GPTQ-quantized replacement of ``module`` given its mean input Hessian (in, in)."""
    codes, scale, zero = gptq_quantize(module.weight, hessian, bits, group_size, symmetric, act_order, damp, block_size, clip_search)
    new = QuantizedLinear.from_codes(codes, scale, zero, bits, group_size, symmetric, module.bias, act_bits=act_bits)
    new.set_compute_dtype(module.weight.dtype)
    return new


@register_method(GPTQConfig)
def apply_gptq(loaded, config: GPTQConfig, ctx) -> dict:
    modules = select_modules(loaded, config, types=(torch.nn.Linear,))
    check_group_size(config.name, modules, config.group_size)
    kernels = ctx.layer_record("kernels")
    for name, module, stats in blockwise(loaded, ctx, modules, hessian=True, desc="gptq", sequential=config.true_sequential):
        new = quantize_linear_gptq(
            module, stats.hessian[name] / stats.count[name], config.bits, config.group_size, config.symmetric,
            config.act_order, config.damp, config.block_size, config.act_bits, config.clip_search,
        )
        set_submodule(loaded.model, name, new)
        kernels[name] = new.kernel
    return {"modules": sorted(modules), "kernels": kernels}
