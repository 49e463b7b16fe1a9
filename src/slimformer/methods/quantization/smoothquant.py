"""SmoothQuant: W8A8 linears with activation outliers migrated into the weights.

Xiao et al., 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models". Int8 activations quantized per token lose the small channels of a token when
a few input channels carry outliers. Dividing input channel ``j`` by
``s_j = max|X_j|^alpha / max|W_{:,j}|^(1-alpha)`` and multiplying the weight's column ``j`` by
the same ``s_j`` leaves ``X W^T`` unchanged and balances the two ranges; then weights are
quantized per output channel (symmetric int8) and activations per token (symmetric int8) at
run time, and the layer runs on the int8 matrix units (``torch._int_mm``).

``alpha`` is SmoothQuant's migration strength; with ``alpha: null`` it is searched per layer on
calibration inputs (grid over [0, 1]) to minimise the simulated W8A8 output error of that
layer, instead of one value for the whole model. The smoothing factor is stored with the layer
(an ``input_scale`` buffer, as AWQ's scales are) because folding it into the previous
operation is architecture-specific; the extra cost is one multiply of the input per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, ModuleSelection, register_method
from slimformer.methods.calibration import blockwise
from slimformer.methods.quantization import grid
from slimformer.methods.quantization.awq import AWQLinear
from slimformer.methods.quantization.modules import quantize_activations_per_token
from slimformer.methods.selection import select_modules
from slimformer.models.adapters import set_submodule


@dataclass
class SmoothQuantConfig(MethodConfig, ModuleSelection):
    """``alpha``: migration strength in [0, 1] (``null``: searched per layer on ``n_grid + 1``
    values); ``activation_grid``: the per-token int8 grid of the inputs, ``symmetric``,
    ``asymmetric`` (all 256 levels on [min, max], for one-sided inputs such as GELU outputs) or
    ``search`` (per layer); ``samples``: calibration tokens per layer used by the searches.
    Weights are always 8-bit per-channel symmetric (W8A8)."""

    name = "smoothquant"
    family = "quantization"
    paper = "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models (Xiao et al., 2023)"
    summary = "W8A8 linears on the int8 matrix units, activation outliers migrated into the weights (per-layer searched strength)"
    requires_calibration = True

    alpha: float | None = None
    n_grid: int = 10
    samples: int = 1024
    activation_grid: str = "search"

    def __post_init__(self) -> None:
        self._validate_selection(allowed=("linear", "head"))
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1):
            raise ConfigError(f"smoothquant: alpha={self.alpha!r} must be in [0, 1] or null", "use e.g. alpha: 0.5, or null to search it per layer")
        for name in ("n_grid", "samples"):
            if not is_int_at_least(getattr(self, name), 1):
                raise ConfigError(f"smoothquant: {name}={getattr(self, name)!r} must be a positive integer", f"use e.g. {name}: 10")
        if self.activation_grid not in ("symmetric", "asymmetric", "search"):
            raise ConfigError(f"smoothquant: activation_grid={self.activation_grid!r} is not supported", "use symmetric, asymmetric or search")

    @property
    def bits(self) -> int:
        return 8


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s`` (in,) = max|X_j|^alpha / max|W_:,j|^(1-alpha), rounded to bfloat16 (as stored).

    ``act_absmax`` (in,) per input channel, ``weight`` (out, in)."""
    a = act_absmax.float().clamp_min(1e-5)
    w = weight.float().abs().amax(0).clamp_min(1e-5)
    s = (a.pow(alpha) / w.pow(1 - alpha)).clamp(1e-4, 1e4)
    return s.to(torch.bfloat16).float()


def w8a8_output_error(x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, act_symmetric: bool = True) -> float:
    """Squared error of the simulated W8A8 layer with smoothing ``s`` against ``x W^T``.

    ``x`` (tokens, in), ``weight`` (out, in), ``s`` (in,)."""
    ws = weight.float() * s
    scale, zero = grid.grid_params(ws, 8, None, symmetric=True)
    wq = grid.dequantize_codes(grid.quantize_codes(ws, scale, zero, 8), scale, zero)
    xq, sx, offset = quantize_activations_per_token(x / s, act_symmetric)
    xd = (xq.float() if offset is None else xq.float() + offset) * sx
    y = xd @ wq.t()
    return float((y - x @ weight.float().t()).pow(2).sum())


def smooth_layer(weight: torch.Tensor, act_absmax: torch.Tensor, samples: torch.Tensor, alpha: float | None, n_grid: int, act_grids: tuple[bool, ...] = (True, False)) -> tuple[torch.Tensor, float, bool]:
    """The smoothing factor (in,) of one layer, its alpha (given, or searched) and whether its
    activations use the symmetric grid (searched among ``act_grids`` on ``samples``)."""
    alphas = [float(alpha)] if alpha is not None else [i / n_grid for i in range(n_grid + 1)]
    best = (None, 0.0, True, float("inf"))
    for a in alphas:
        s = smoothing_factors(act_absmax, weight, a)
        for sym in act_grids:
            err = w8a8_output_error(samples, weight, s, sym) if len(alphas) * len(act_grids) > 1 else 0.0
            if err < best[3]:
                best = (s, a, sym, err)
    return best[0], best[1], best[2]


@register_method(SmoothQuantConfig)
def apply_smoothquant(loaded, config: SmoothQuantConfig, ctx) -> dict:
    modules = select_modules(loaded, config, types=(torch.nn.Linear,))
    kernels: dict[str, str] = {}
    alphas: dict[str, float] = {}
    grids: dict[str, str] = {}
    act_grids = {"symmetric": (True,), "asymmetric": (False,), "search": (True, False)}[config.activation_grid]
    for name, module, stats in blockwise(loaded, ctx, modules, hessian=False, desc="smoothquant", keep_samples=config.samples):
        w = module.weight.detach().float()
        s, alphas[name], sym = smooth_layer(w, stats.absmax[name], stats.samples[name], config.alpha, config.n_grid, act_grids)
        grids[name] = "symmetric" if sym else "asymmetric"
        ws = w * s
        scale, zero = grid.grid_params(ws, 8, None, symmetric=True)
        codes = grid.quantize_codes(ws, scale, zero, 8)
        new = AWQLinear.from_scaled_codes(codes, scale, zero, s, 8, None, True, module.bias, act_bits=8, act_symmetric=sym)
        new.set_compute_dtype(module.weight.dtype)
        set_submodule(loaded.model, name, new)
        kernels[name] = new.kernel
    return {"modules": sorted(modules), "kernels": kernels, "alpha": alphas, "activation_grid": grids}
