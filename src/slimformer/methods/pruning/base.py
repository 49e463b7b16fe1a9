"""Shared pruning settings and the template transform: a method only supplies a score."""

from __future__ import annotations

from dataclasses import dataclass


import torch
from torch import nn

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, ModuleSelection
from slimformer.methods.pruning.masks import nm_mask, parse_nm, unstructured_mask
from slimformer.methods.pruning.sparse_storage import SparseLinear
from slimformer.methods.quantization import grid
from slimformer.methods.selection import check_group_size
from slimformer.models.adapters import set_submodule

STORAGES = ("sparse", "dense")


@dataclass
class PruningConfig(MethodConfig, ModuleSelection):
    """``sparsity``: fraction of weights set to zero, in [0, 1) (default 0.5); or ``pattern``: an
    N:M pattern such as ``"2:4"`` (then ``sparsity`` must be left unset or equal 1 - N/M).

    ``storage``: ``"sparse"`` (default: the layer becomes a ``SparseLinear`` holding a bitmap or
    N:M index plus the kept values, so the file shrinks) or ``"dense"`` (an ``nn.Linear`` with
    zeros, e.g. to quantize it afterwards with another step). ``bits`` (2, 3, 4 or 8; sparse
    storage only): the kept values are stored as codes on a uniform grid with ``group_size``
    input columns per scale (``None``: per output channel) and ``symmetric`` zero point."""

    sparsity: float | None = None
    pattern: str | None = None
    storage: str = "sparse"
    bits: int | None = None
    group_size: int | None = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        self._validate_selection(allowed=("linear", "head"))
        if self.storage not in STORAGES:
            raise ConfigError(f"{self.name}: storage={self.storage!r} is not supported", f"use storage: sparse or storage: dense")
        if self.bits is not None:
            if isinstance(self.bits, bool) or self.bits not in grid.SUPPORTED_BITS:
                raise ConfigError(f"{self.name}: bits={self.bits!r} is not supported", f"use bits in {list(grid.SUPPORTED_BITS)}, or null for float values")
            if self.storage != "sparse":
                raise ConfigError(f"{self.name}: bits={self.bits} needs storage: sparse", "set storage: sparse, or quantize the dense pruned model with a separate step")
        if self.group_size is not None and not is_int_at_least(self.group_size, 1):
            raise ConfigError(f"{self.name}: group_size={self.group_size!r} must be a positive integer or null", "use e.g. group_size: 128, or null for per-channel")
        if self.pattern is not None:
            n, m = parse_nm(self.pattern)
            implied = 1 - n / m
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ConfigError(
                    f"{self.name}: sparsity={self.sparsity} contradicts pattern {self.pattern} (sparsity {implied:g})",
                    "give either sparsity or pattern",
                )
            self.sparsity = implied
        elif self.sparsity is None:
            self.sparsity = 0.5
        if self.sparsity is None or isinstance(self.sparsity, bool) or not 0 <= self.sparsity < 1:
            raise ConfigError(f"{self.name}: sparsity={self.sparsity!r} is outside [0, 1)", "use a fraction such as sparsity: 0.5")

    @property
    def nm(self) -> tuple[int, int] | None:
        return None if self.pattern is None else parse_nm(self.pattern)


def check_nm_width(config: PruningConfig, modules: dict[str, nn.Module]) -> None:
    """Raise ``ConfigError`` unless every layer's input width fits the N:M pattern and, for
    quantized kept values, the group size."""
    if config.bits is not None:
        check_group_size(config.name, modules, config.group_size)
    if config.nm is None:
        return
    m = config.nm[1]
    for name, module in modules.items():
        if module.weight.shape[1] % m:
            raise ConfigError(
                f"{config.name}: pattern {config.pattern} needs input widths divisible by {m}, {name} has {module.weight.shape[1]}",
                "exclude that layer or choose another pattern",
            )


def mask_from_scores(scores: torch.Tensor, config: PruningConfig, per_row: bool) -> torch.Tensor:
    """Keep-mask (out, in) bool from importance ``scores`` (out, in) for ``config``'s sparsity."""
    if config.nm is not None:
        return nm_mask(scores, *config.nm)
    return unstructured_mask(scores, config.sparsity, per_row=per_row)


def store_pruned(loaded, name: str, module: nn.Linear, weight: torch.Tensor, mask: torch.Tensor, config: PruningConfig,
                 scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> float:
    """Put the pruned ``weight`` (out, in) with keep-``mask`` (out, in) in place of ``module``:
    a ``SparseLinear`` (storage sparse; kept values quantized with ``config.bits``, on the grid
    ``scale``/``zero`` (out, groups) when given) or the zeroed ``nn.Linear`` (storage dense).
    Returns the measured sparsity of the layer."""
    pruned = torch.where(mask, weight.to(module.weight.dtype), torch.zeros((), dtype=module.weight.dtype))
    if config.storage == "dense":
        with torch.no_grad():
            module.weight.copy_(pruned)
        return float((module.weight == 0).float().mean())
    new = SparseLinear.from_dense(pruned, mask, module.bias, config.nm, config.bits, config.group_size, config.symmetric, scale, zero)
    new.set_compute_dtype(module.weight.dtype)
    set_submodule(loaded.model, name, new)
    return 1.0 - new.nnz / mask.numel()


def prune_linear(loaded, name: str, module: nn.Linear, scores: torch.Tensor, config: PruningConfig, per_row: bool) -> float:
    """Prune ``module`` by the mask of ``scores`` (out, in) and store it as ``config.storage``
    says; returns the measured sparsity of the layer."""
    mask = mask_from_scores(scores, config, per_row)
    return store_pruned(loaded, name, module, module.weight.detach(), mask, config)
