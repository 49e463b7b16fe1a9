"""Shared pieces of the low-rank methods: the two-factor linear layer, the rank budget, and the
template transform (a method supplies only its factorization of one weight)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, ModuleSelection
from slimformer.methods.quantization.modules import QuantizedModule, register_quantized_module, tensor_bits
from slimformer.models.adapters import set_submodule


@register_quantized_module
class LowRankLinear(QuantizedModule):
    """A linear layer replaced by two smaller ones: ``y = up(down(x))`` with ``down`` an
    ``nn.Linear(in, rank, bias=False)`` (weight A (rank, in)) and ``up`` an
    ``nn.Linear(rank, out)`` (weight B (out, rank), carrying the original bias). It holds
    ``rank * (in + out)`` weights instead of ``in * out`` and computes two products of those
    sizes. Input ``x`` (..., in); output (..., out) in the parameters' dtype."""

    kernel = "two-linears"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> "LowRankLinear":
        """Build from A (rank, in), B (out, rank) and ``bias`` (out,), stored in ``dtype``."""
        module = cls(A.shape[1], B.shape[0], A.shape[0], bias is not None)
        with torch.no_grad():
            module.down.weight.copy_(A)
            module.up.weight.copy_(B)
            if bias is not None:
                module.up.bias.copy_(bias)
        module.requires_grad_(False)
        module.set_compute_dtype(dtype)
        return module

    @classmethod
    def from_description(cls, desc: dict) -> "LowRankLinear":
        module = cls(desc["in_features"], desc["out_features"], desc["rank"], desc["bias"])
        module.requires_grad_(False)
        return module

    def describe(self) -> dict:
        return {"type": "LowRankLinear", "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.up.bias is not None, "kernel": self.kernel}

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 product ``B @ A`` (out, in)."""
        return self.up.weight.float() @ self.down.weight.float()

    def stored_bits(self) -> int:
        return tensor_bits(self.down.weight, self.up.weight)

    def storage_key(self) -> torch.Tensor:
        return self.down.weight

    def logical_parameters(self) -> int:
        """Weights this layer really holds and computes with: ``rank * (in + out)`` (+ bias)."""
        return self.rank * (self.in_features + self.out_features)

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        self.compute_dtype = dtype
        self.down.to(dtype)
        self.up.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype)))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@dataclass
class LowRankConfig(MethodConfig, ModuleSelection):
    """Shared low-rank settings: ``params_ratio`` (fraction of each targeted linear's weights
    kept: 0.8 = 20 % fewer parameters; each layer gets the largest rank with
    ``rank * (in + out) <= params_ratio * in * out``) or a fixed ``rank`` for every layer
    (then ``params_ratio`` is ignored)."""

    family = "lowrank"
    params_ratio: float = 0.8
    rank: int | None = None

    def __post_init__(self) -> None:
        self._validate_selection(allowed=("linear", "head"))
        if isinstance(self.params_ratio, bool) or not isinstance(self.params_ratio, (int, float)) or not 0 < self.params_ratio < 1:
            raise ConfigError(f"{self.name}: params_ratio={self.params_ratio!r} must be in (0, 1)", "use e.g. params_ratio: 0.8 (20% fewer parameters)")
        if self.rank is not None and not is_int_at_least(self.rank, 1):
            raise ConfigError(f"{self.name}: rank={self.rank!r} must be a positive integer or null", "use e.g. rank: 64, or params_ratio instead")

    def rank_for(self, out_features: int, in_features: int) -> int:
        if self.rank is not None:
            return min(self.rank, out_features, in_features)
        return max(1, int(self.params_ratio * out_features * in_features // (out_features + in_features)))


def check_ranks_shrink(config: LowRankConfig, modules: dict[str, nn.Module]) -> None:
    """Refuse a rank that would not make a layer smaller."""
    for name, module in modules.items():
        out_features, in_features = module.weight.shape
        r = config.rank_for(out_features, in_features)
        if r * (in_features + out_features) >= in_features * out_features:
            raise ConfigError(
                f"{config.name}: rank {r} does not shrink {name} ({out_features}x{in_features})",
                "choose a smaller rank or params_ratio, or exclude that layer",
            )


def svd_factors(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``M`` (out, in), float64: ``(U_r sqrt(S_r), sqrt(S_r) V_r^T, S)``
    with shapes (out, rank), (rank, in) and all singular values (min(out, in),)."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root.unsqueeze(1) * Vh[:rank], S


def replace_by_factors(loaded, name: str, module: nn.Linear, A: torch.Tensor, B: torch.Tensor) -> LowRankLinear:
    """Put ``LowRankLinear`` (A (rank, in), B (out, rank)) in place of ``module``."""
    new = LowRankLinear.from_factors(A.float(), B.float(), None if module.bias is None else module.bias.detach().float(), module.weight.dtype)
    set_submodule(loaded.model, name, new)
    return new


def record(modules: dict, ranks: dict[str, int]) -> dict:
    before = sum(m.weight.numel() for m in modules.values())
    after = sum(r * sum(modules[n].weight.shape) for n, r in ranks.items())
    return {"modules": sorted(modules), "ranks": ranks, "params_before": before, "params_after": after, "params_ratio": after / before}


FactorFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
