"""AWQ: Activation-aware Weight Quantization.

Lin et al., 2024, "AWQ: Activation-aware Weight Quantization for On-Device LLM Compression and
Acceleration". Weights that meet large activations matter most; scaling input channel ``j`` of
the weight up by ``s_j`` (and the activation down by ``1/s_j``) shrinks its relative rounding
error. Per linear layer, on its calibration inputs ``X`` (tokens, in):

- **scale search**: ``s = mean|x|^alpha`` (normalised to geometric mean 1 of its extremes), with
  ``alpha`` on a grid over [0, 1] (0 = plain round-to-nearest) chosen to minimise the layer's
  output error ``||X W^T - X (Q(W diag s) diag(1/s))^T||^2 = tr(dW H dW^T)``, ``H = X^T X``;
- **clip search**: per (row, group) of ``W diag s``, the range is shrunk by the factor in
  ``1, 1 - 1/n_grid, ..., 1 - max_shrink`` that minimises that group's output error
  ``dw_g^T H'_gg dw_g`` (``H' = diag(1/s) H diag(1/s)``, the inputs the scaled weight sees), as
  AWQ's ``auto_clip`` does.

The previous operation (a LayerNorm, another linear) cannot be rescaled generically for every
architecture, so the scale is stored with the layer: ``AWQLinear`` is a ``QuantizedLinear`` of
``W diag s`` with an ``input_scale`` (in,) bfloat16 buffer; its forward multiplies the input by
``1/s`` and runs the same low-bit kernel (int4/int8), and the dequantized weight has ``1/s``
folded in. With ``search: clip`` no scale is stored (a plain ``QuantizedLinear``).
Layers are processed block by block, each calibrated on the already-quantized blocks before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import register_method
from slimformer.methods.calibration import blockwise
from slimformer.methods.quantization import grid
from slimformer.methods.quantization.modules import QuantizedLinear, register_quantized_module, tensor_bits
from slimformer.methods.quantization.rtn import WeightQuantConfig
from slimformer.methods.selection import check_group_size, select_modules
from slimformer.models.adapters import set_submodule

SEARCHES = ("scale", "clip", "scale+clip")


@dataclass
class AWQConfig(WeightQuantConfig):
    """AWQ settings: the grid (``bits``, ``group_size``, ``symmetric``), ``search`` (``scale``,
    ``clip`` or ``scale+clip``), ``n_grid`` (grid points of alpha in [0, 1] and of the clip
    factor) and ``max_shrink`` (the most the clip search may shrink a group's range)."""

    name = "awq"
    family = "quantization"
    paper = "AWQ: Activation-aware Weight Quantization for On-Device LLM Compression and Acceleration (Lin et al., 2024)"
    summary = "activation-aware per-input-channel weight scales (stored, applied to the input) plus range clipping, searched on calibration data"
    requires_calibration = True
    resumable = True

    search: str = "scale+clip"
    n_grid: int = 20
    max_shrink: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if "embedding" in self.targets:
            raise ConfigError("awq: the embedding table has no input activations to scale", "quantize the embedding with a separate rtn or hqq step")
        if self.search not in SEARCHES:
            raise ConfigError(f"awq: search={self.search!r} is not supported", f"use one of {list(SEARCHES)}")
        if not is_int_at_least(self.n_grid, 1):
            raise ConfigError(f"awq: n_grid={self.n_grid!r} must be a positive integer", "use e.g. n_grid: 20")
        if not 0 <= self.max_shrink < 1:
            raise ConfigError(f"awq: max_shrink={self.max_shrink} must be in [0, 1)", "use e.g. max_shrink: 0.5")


@register_quantized_module
class AWQLinear(QuantizedLinear):
    """A ``QuantizedLinear`` holding ``W diag(s)`` plus ``input_scale`` = ``s`` (in,) bfloat16.

    ``y = (x / s) (W diag s)^T + b``: the kernels see the scaled weight and the scaled input.
    Input ``x`` (..., in_features); output (..., out_features) in ``x.dtype``.
    """

    def __init__(self, in_features: int, out_features: int, *args, **kwargs) -> None:
        super().__init__(in_features, out_features, *args, **kwargs)
        self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.bfloat16))

    @classmethod
    def from_scaled_codes(cls, codes, scale, zero, input_scale: torch.Tensor, bits, group_size, symmetric, bias, act_bits=None, act_symmetric=True) -> "AWQLinear":
        """Build from codes (out, in) of ``W diag s``, ``scale``/``zero`` (out, groups) and ``input_scale`` s (in,)."""
        module = cls.from_codes(codes, scale, zero, bits, group_size, symmetric, bias, act_bits=act_bits, act_symmetric=act_symmetric)
        module.input_scale.copy_(input_scale.to(torch.bfloat16))
        module.prepare()
        return module

    def prepare(self) -> None:
        super().prepare()
        if "input_scale" in self._buffers:  # absent while QuantizedLinear.__init__ runs
            self._runtime["inv_input_scale"] = 1.0 / self.input_scale.float()

    def stored_bits(self) -> int:
        return super().stored_bits() + tensor_bits(self.input_scale)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight (out, in) the layer stands for: ``1/s`` folded in."""
        return super().dequantized_weight() / self.input_scale.float()

    def compute(self, x: torch.Tensor, kernel: str) -> torch.Tensor:
        if kernel == "unpack":  # this path uses dequantized_weight(): 1/s is folded in
            return super().compute(x, kernel)
        if "inv_input_scale" not in self._runtime:  # built lazily (see QuantizedLinear.from_codes)
            self.prepare()
        return super().compute(x * self._runtime["inv_input_scale"].to(x.dtype), kernel)

    def describe(self) -> dict:
        return {**super().describe(), "type": "AWQLinear", "input_scale": "bfloat16 (in,), input multiplied by 1/s"}


def _output_error(dW: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``tr(dW H dW^T)`` for dW (out, in), H (in, in)."""
    return ((dW @ H) * dW).sum()


def _fake_quantize(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, shrink: torch.Tensor | float = 1.0) -> torch.Tensor:
    scale, zero = grid.grid_params(w, bits, group_size, symmetric, shrink)
    return grid.dequantize_codes(grid.quantize_codes(w, scale, zero, bits), scale, zero)


def search_input_scale(weight: torch.Tensor, hessian: torch.Tensor, act_mean: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, n_grid: int = 20) -> tuple[torch.Tensor, float]:
    """AWQ's scale search: ``s = act_mean^alpha`` for alpha in ``{0, 1/n_grid, ..., 1}``.

    ``weight`` (out, in), ``hessian`` (in, in) = mean x x^T, ``act_mean`` (in,) = mean |x|.
    Returns ``(s, alpha)``: s (in,) float32 holding bfloat16 values (alpha 0: all ones).
    """
    W = weight.float()
    x = act_mean.float().clamp_min(1e-4)
    best_s, best_alpha, best_err = torch.ones_like(x), 0.0, float("inf")
    for i in range(n_grid + 1):
        alpha = i / n_grid
        s = x.pow(alpha)
        s = (s / torch.sqrt(s.max() * s.min())).to(torch.bfloat16).float()
        err = _output_error(W - _fake_quantize(W * s, bits, group_size, symmetric) / s, hessian).item()
        if err < best_err:
            best_s, best_alpha, best_err = s, alpha, err
    return best_s, best_alpha


def search_clip(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """AWQ's clip search: the range factor (rows, groups) minimising each group's output error.

    ``weight`` (out, in), ``hessian`` (in, in) of the inputs this weight sees. Each (row, group)
    is scored by ``dw_g^T H_gg dw_g`` with its diagonal Hessian block, as AWQ scores groups
    on their own inputs.
    """
    W = weight.float()
    rows, cols = W.shape
    g = grid.effective_group_size(cols, group_size)
    groups = cols // g
    Hg = torch.stack([hessian[i * g : (i + 1) * g, i * g : (i + 1) * g] for i in range(groups)]).float()  # (groups, g, g)
    best = torch.full((rows, groups), float("inf"))
    best_shrink = torch.ones(rows, groups)
    for i in range(int(max_shrink * n_grid + 1e-9) + 1):
        shrink = 1 - i / n_grid
        d = (W - _fake_quantize(W, bits, group_size, symmetric, shrink)).reshape(rows, groups, g)
        err = torch.einsum("rgi,gij,rgj->rg", d, Hg, d)
        better = err < best
        best = torch.where(better, err, best)
        best_shrink = torch.where(better, torch.full_like(best_shrink, shrink), best_shrink)
    return best_shrink


def awq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    act_mean: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    search: str = "scale+clip",
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """AWQ-quantize ``weight`` (out, in) given ``hessian`` (in, in) = mean x x^T and ``act_mean``
    (in,) = mean |x| of its calibration inputs.

    Returns ``(codes, scale, zero, input_scale, alpha)``: codes (out, in) uint8 and
    ``scale``/``zero`` (out, groups) of the grid of ``W diag(input_scale)``; ``input_scale`` (in,)
    (all ones without scale search) and the chosen ``alpha``. The layer's weight is ``dequantize(codes, scale, zero) / input_scale``.
    """
    W = weight.detach().float()
    H = hessian.detach().float()
    s, alpha = torch.ones(W.shape[1]), 0.0
    if "scale" in search:
        s, alpha = search_input_scale(W, H, act_mean, bits, group_size, symmetric, n_grid)
    Ws = W * s
    shrink: torch.Tensor | float = 1.0
    if "clip" in search:
        shrink = search_clip(Ws, H / torch.outer(s, s), bits, group_size, symmetric, n_grid, max_shrink)
    scale, zero = grid.grid_params(Ws, bits, group_size, symmetric, shrink)
    codes = grid.quantize_codes(Ws, scale, zero, bits)
    return codes, scale, zero, s, alpha


@register_method(AWQConfig)
def apply_awq(loaded, config: AWQConfig, ctx) -> dict:
    modules = select_modules(loaded, config, types=(torch.nn.Linear,))
    check_group_size(config.name, modules, config.group_size)
    kernels = ctx.layer_record("kernels")
    alphas = ctx.layer_record("alpha")
    for name, module, stats in blockwise(loaded, ctx, modules, hessian=True, desc="awq"):
        n = stats.count[name]
        H = stats.hessian[name] / n
        act_mean = stats.abs_sum[name] / n
        codes, scale, zero, s, alpha = awq_quantize(
            module.weight, H, act_mean, config.bits, config.group_size, config.symmetric, config.search, config.n_grid, config.max_shrink
        )
        args = (config.bits, config.group_size, config.symmetric, module.bias)
        if "scale" in config.search:
            new = AWQLinear.from_scaled_codes(codes, scale, zero, s, *args, act_bits=config.act_bits)
        else:
            new = QuantizedLinear.from_codes(codes, scale, zero, *args, act_bits=config.act_bits)
        new.set_compute_dtype(module.weight.dtype)
        set_submodule(loaded.model, name, new)
        kernels[name] = new.kernel
        alphas[name] = alpha
    return {"modules": sorted(modules), "kernels": kernels, "alpha": alphas}

