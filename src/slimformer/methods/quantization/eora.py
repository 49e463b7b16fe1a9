"""EoRA: training-free low-rank compensation of compressed linear layers.

Liu et al., 2024, "EoRA: Training-free Compensation for Compressed LLM with Eigenspace
Low-Rank Approximation". For every already-compressed linear layer (quantized, or pruned and
still an ``nn.Linear``), the compression error ``dW = W_orig - W_compressed`` (out, in) is
projected into the eigenspace of the layer's input covariance ``H = X^T X / n = Q L Q^T``
(measured block by block on the *compressed* model), ``dW' = dW Q L^{1/2}``, truncated by SVD
to ``rank`` (``dW' ~ U_r S_r V_r^T``) and projected back:

    B = U_r S_r^{1/2}                       (out, r)
    A = S_r^{1/2} V_r^T L^{-1/2} Q^T        (r, in)

so that ``y = compressed(x) + (x A^T) B^T``. The truncation minimises the layer's *output* error
``||(dW - B A) X^T||_F`` on the calibration activations instead of ``||dW - B A||_F`` (plain SVD).
``B A`` is the projection of ``dW`` onto the ``r`` output directions that matter most for ``X``,
so the factors stay bounded even where ``H`` is nearly singular.

The factors are stored in bfloat16, or (``factor_bits``) round-to-nearest quantized as EoRA
does to cut their overhead; the layer becomes a :class:`LowRankCompensated` wrapping the
compressed module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, ModuleSelection, register_method, registered_methods
from slimformer.methods.calibration import blockwise
from slimformer.methods.quantization import grid
from slimformer.methods.quantization.modules import (
    QuantizedLinear,
    QuantizedModule,
    module_from_description,
    register_quantized_module,
    tensor_bits,
)
from slimformer.models.adapters import set_submodule

DEFAULT_RANK = 16
FACTOR_GROUP_SIZE = 64  # columns per scale of quantized factors (per row when it does not divide)


@dataclass
class EoRAConfig(MethodConfig, ModuleSelection):
    """EoRA settings: ``rank`` of the compensation per layer, or ``rank_fraction`` of
    ``min(out, in)`` (give at most one; rank 16 when neither is given), and ``factor_bits``
    (``None``: bfloat16 factors; 8/4/3/2: round-to-nearest quantized factors, groups of 64
    columns). ``targets``: ``linear`` and/or ``head``: the layers to compensate, which must have
    been compressed earlier in the same recipe."""

    name = "eora"
    family = "quantization"
    paper = "EoRA: Training-free Compensation for Compressed LLM with Eigenspace Low-Rank Approximation (Liu et al., 2024)"
    summary = "low-rank compensation of quantization/pruning error in the eigenspace of the layer inputs (run after rtn/gptq/pruning)"
    requires_calibration = True
    resumable = True
    requires_original_weights = True

    rank: int | None = None
    rank_fraction: float | None = None
    factor_bits: int | None = None

    def __post_init__(self) -> None:
        self._validate_selection(allowed=("linear", "head"))
        if self.rank is not None and self.rank_fraction is not None:
            raise ConfigError("eora: both rank and rank_fraction are given", "give one of them (e.g. rank: 16)")
        if self.rank is None and self.rank_fraction is None:
            self.rank = DEFAULT_RANK
        if self.rank is not None and not is_int_at_least(self.rank, 1):
            raise ConfigError(f"eora: rank={self.rank!r} must be a positive integer", "use e.g. rank: 16")
        if self.rank_fraction is not None and not 0 < self.rank_fraction <= 1:
            raise ConfigError(f"eora: rank_fraction={self.rank_fraction!r} must be in (0, 1]", "use e.g. rank_fraction: 0.05")
        if self.factor_bits is not None and (isinstance(self.factor_bits, bool) or self.factor_bits not in grid.SUPPORTED_BITS):
            raise ConfigError(f"eora: factor_bits={self.factor_bits!r} is not supported", f"use factor_bits in {list(grid.SUPPORTED_BITS)}, or null for bfloat16 factors")

    def rank_for(self, out_features: int, in_features: int) -> int:
        """The compensation rank of an (out, in) layer (never above ``min(out, in)``)."""
        full = min(out_features, in_features)
        if self.rank_fraction is not None:
            return max(1, min(full, round(self.rank_fraction * full)))
        return min(full, self.rank)


# --------------------------------------------------------------------------------------------
# The factors
# --------------------------------------------------------------------------------------------


def eora_factors(delta: torch.Tensor, hessian: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EoRA factors of the compression error ``delta`` (out, in) given ``hessian`` (in, in)
    (``X^T X``, any positive scale) -> ``(A, B)``: A (rank, in), B (out, rank), float32, with
    ``B @ A`` the rank-``rank`` approximation of ``delta`` minimising ``||(delta - B A) X^T||``.

    Eigenvalues that are not positive (dead input features) are raised to the smallest
    positive one, as in the reference implementation.
    """
    H = hessian.detach().double()
    H = (H + H.t()) / 2
    L, Q = torch.linalg.eigh(H)
    positive = L[L > L.max().clamp(min=0) * 1e-12]
    floor = positive.min() if positive.numel() else torch.tensor(1.0, dtype=L.dtype)
    L = torch.where(L > floor, L, floor)
    sqrt_l = L.sqrt()
    projected = delta.detach().double() @ (Q * sqrt_l)  # dW Q L^{1/2}: (out, in)
    U, S, Vh = torch.linalg.svd(projected, full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    B = U[:, :r] * root
    A = (root.unsqueeze(1) * Vh[:r] / sqrt_l) @ Q.t()
    return A.float(), B.float()


def plain_svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` SVD of ``delta`` (out, in) without eigenspace projection -> ``(A, B)``:
    A (rank, in), B (out, rank). The baseline EoRA improves on."""
    U, S, Vh = torch.linalg.svd(delta.detach().double(), full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    return (root.unsqueeze(1) * Vh[:r]).float(), (U[:, :r] * root).float()


def _factor_group(cols: int) -> int | None:
    return FACTOR_GROUP_SIZE if cols % FACTOR_GROUP_SIZE == 0 else None


def _quantized_factor(w: torch.Tensor, bits: int) -> QuantizedLinear:
    """A factor (rows, cols) as a ``QuantizedLinear`` (cols -> rows), round-to-nearest."""
    group = _factor_group(w.shape[1])
    scale, zero = grid.grid_params(w, bits, group, symmetric=False)
    codes = grid.quantize_codes(w, scale, zero, bits)
    return QuantizedLinear.from_codes(codes, scale, zero, bits, group, False, None)


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


def _inner_shape(inner: nn.Module) -> tuple[int, int]:
    if isinstance(inner, QuantizedModule):
        return tuple(inner.weight_shape)
    return tuple(inner.weight.shape)


def _inner_weight(inner: nn.Module) -> torch.Tensor:
    """The compressed float32 weight (out, in) of a linear-like module."""
    if isinstance(inner, QuantizedModule):
        return inner.dequantized_weight().float()
    return inner.weight.detach().float()


@register_quantized_module
class LowRankCompensated(QuantizedModule):
    """A compressed linear layer plus a low-rank correction: ``y = inner(x) + (x A^T) B^T``.

    ``inner``: the compressed layer (any linear ``QuantizedModule``, or an ``nn.Linear`` holding
    a pruned weight), kept as a child. Factors ``lora_a`` (rank, in) and ``lora_b`` (out, rank):
    bfloat16 buffers, or, with ``factor_bits``, ``QuantizedLinear`` children (in -> rank and
    rank -> out). Input ``x`` (..., in) of any float dtype; output (..., out) in ``x.dtype``.
    """

    def __init__(self, inner: nn.Module, rank: int, factor_bits: int | None = None) -> None:
        super().__init__()
        out_features, in_features = _inner_shape(inner)
        self.inner = inner
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.factor_bits = factor_bits
        self.compute_dtype = getattr(inner, "compute_dtype", None) or inner.weight.dtype
        if factor_bits is None:
            self.register_buffer("lora_a", torch.zeros(rank, in_features, dtype=torch.bfloat16))
            self.register_buffer("lora_b", torch.zeros(out_features, rank, dtype=torch.bfloat16))
        else:
            self.lora_a = QuantizedLinear(in_features, rank, factor_bits, _factor_group(in_features), False, False)
            self.lora_b = QuantizedLinear(rank, out_features, factor_bits, _factor_group(rank), False, False)

    @classmethod
    def from_factors(cls, inner: nn.Module, A: torch.Tensor, B: torch.Tensor, factor_bits: int | None = None) -> "LowRankCompensated":
        """Wrap ``inner`` with factors A (rank, in) and B (out, rank) (stored as configured)."""
        module = cls(inner, A.shape[0], factor_bits)
        if factor_bits is None:
            module.lora_a.copy_(A.to(torch.bfloat16))
            module.lora_b.copy_(B.to(torch.bfloat16))
        else:
            module.lora_a = _quantized_factor(A.float(), factor_bits)
            module.lora_b = _quantized_factor(B.float(), factor_bits)
            module.set_compute_dtype(module.compute_dtype)
        return module

    @classmethod
    def from_description(cls, desc: dict) -> "LowRankCompensated":
        inner_desc = desc["inner"]
        if inner_desc.get("type") == "Linear":
            inner: nn.Module = nn.Linear(inner_desc["in_features"], inner_desc["out_features"], bias=inner_desc["bias"])
        else:
            inner = module_from_description(inner_desc)
        return cls(inner, desc["rank"], desc.get("factor_bits"))

    def describe(self) -> dict:
        if isinstance(self.inner, QuantizedModule):
            inner = self.inner.describe()
        else:
            inner = {"type": "Linear", "in_features": self.in_features, "out_features": self.out_features, "bias": self.inner.bias is not None}
        return {
            "type": "LowRankCompensated",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "factor_bits": self.factor_bits,
            "inner": inner,
            "kernel": self.kernel,
        }

    # ----- the QuantizedModule interface -------------------------------------------------------
    @property
    def kernel(self) -> str:  # type: ignore[override]
        inner = self.inner.kernel if isinstance(self.inner, QuantizedModule) else "dense"
        return f"{inner}+lowrank"

    @property
    def bias(self) -> torch.Tensor | None:
        return self.inner.bias

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 factors ``(A, B)``: A (rank, in), B (out, rank)."""
        if self.factor_bits is None:
            return self.lora_a.float(), self.lora_b.float()
        return self.lora_a.dequantized_weight(), self.lora_b.dequantized_weight()

    def dequantized_weight(self) -> torch.Tensor:
        """The effective float32 weight (out, in): the inner weight plus ``B @ A``."""
        A, B = self.factors()
        return _inner_weight(self.inner) + B @ A

    def factor_bits_stored(self) -> int:
        if self.factor_bits is None:
            return tensor_bits(self.lora_a, self.lora_b)
        return self.lora_a.stored_bits() + self.lora_b.stored_bits()

    def stored_bits(self) -> int:
        inner = self.inner.stored_bits() if isinstance(self.inner, QuantizedModule) else tensor_bits(self.inner.weight)
        return inner + self.factor_bits_stored()

    def storage_key(self) -> torch.Tensor:
        return self.inner.storage_key() if isinstance(self.inner, QuantizedModule) else self.inner.weight

    def runtime_nbytes(self) -> int:
        return sum(m.runtime_nbytes() for m in (self.inner, self.lora_a, self.lora_b) if isinstance(m, QuantizedModule))

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        self.compute_dtype = dtype
        for m in (self.inner, self.lora_a, self.lora_b):
            if isinstance(m, QuantizedModule):
                m.set_compute_dtype(dtype)
        if not isinstance(self.inner, QuantizedModule):
            self.inner.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if self.factor_bits is None:
            low = F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        else:
            low = self.lora_b(self.lora_a(x))
        return y + low.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, factor_bits={self.factor_bits}"


# --------------------------------------------------------------------------------------------
# The transform
# --------------------------------------------------------------------------------------------


def _refuse_after_structure(loaded) -> None:
    methods = registered_methods()
    for record in loaded.applied:
        name = (record.get("step") or {}).get("method")
        if name in methods and methods[name].config_type.family == "structure":
            raise ConfigError(
                f"eora: a {name} step dropped blocks earlier, so layer names no longer match the original weights",
                "run eora before the block-dropping step (e.g. gptq, eora, then shortgpt)",
            )


def compensable_modules(loaded, config: EoRAConfig) -> dict[str, nn.Module]:
    """Linear-like layers chosen by ``config``: ``nn.Linear`` or linear ``QuantizedModule``s
    (not already compensated, not nested inside another compressed module), by name."""
    adapter = loaded.adapter
    names = adapter.qualified_names()
    candidates: dict[str, nn.Module] = {}
    if "linear" in config.targets:
        for block in adapter.blocks():
            nested = {id(c) for m in block.modules() if isinstance(m, QuantizedModule) for c in m.modules() if c is not m}
            for m in block.modules():
                if id(m) not in nested and (isinstance(m, nn.Linear) or (isinstance(m, QuantizedModule) and hasattr(m, "in_features"))):
                    candidates[names[id(m)]] = m
    if "head" in config.targets and adapter.head() is not None:
        name, m = adapter.head()
        if isinstance(m, (nn.Linear, QuantizedModule)) and hasattr(m, "in_features"):
            candidates[name] = m
    return {n: m for n, m in candidates.items() if config.selects(n) and not isinstance(m, LowRankCompensated)}


@register_method(EoRAConfig)
def apply_eora(loaded, config: EoRAConfig, ctx) -> dict:
    _refuse_after_structure(loaded)
    originals = ctx.original_weights
    if originals is None:
        raise ConfigError("eora: the original weights were not kept", "run eora through slimformer.compress in the same recipe as the step that compressed the layers")
    modules = compensable_modules(loaded, config)
    changed: dict[str, nn.Module] = {}
    for name, module in modules.items():
        original = originals.get(name)
        if original is None:
            raise ConfigError(
                f"eora: {name} has no original weight (it was already compressed when this recipe started)",
                "compress the original model with one recipe holding both the compression step and eora",
            )
        if tuple(original.shape) != _inner_shape(module):
            raise ConfigError(f"eora: {name} changed shape since the recipe started", "run eora right after the quantization or pruning step")
        if not torch.equal(original, _inner_weight(module)):
            changed[name] = module
    if not changed:
        raise ConfigError(
            "eora: no selected layer differs from its original weight: there is no error to compensate",
            "put eora after a quantization or pruning step in the same recipe (e.g. gptq, then eora)",
        )
    kernels = ctx.layer_record("kernels")
    ranks = ctx.layer_record("ranks")
    for name, module, stats in blockwise(loaded, ctx, changed, hessian=True, desc="eora"):
        delta = originals[name] - _inner_weight(module)
        rows, cols = delta.shape
        A, B = eora_factors(delta, stats.hessian[name] / stats.count[name], config.rank_for(rows, cols))
        new = LowRankCompensated.from_factors(module, A, B, config.factor_bits)
        new.set_compute_dtype(getattr(module, "compute_dtype", None) or module.weight.dtype)
        set_submodule(loaded.model, name, new)
        kernels[name] = new.kernel
        ranks[name] = new.rank
    return {"modules": sorted(changed), "kernels": kernels, "ranks": ranks, "unchanged": sorted(set(modules) - set(changed))}
