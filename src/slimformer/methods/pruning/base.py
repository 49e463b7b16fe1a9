"""Shared pruning settings and the template transform: a method only supplies a score."""

from __future__ import annotations

from dataclasses import dataclass


import torch
from torch import nn

from slimformer.errors import ConfigError
from slimformer.methods.base import MethodConfig, ModuleSelection
from slimformer.methods.pruning.masks import nm_mask, parse_nm, unstructured_mask


@dataclass
class PruningConfig(MethodConfig, ModuleSelection):
    """``sparsity``: fraction of weights set to zero, in [0, 1) (default 0.5); or ``pattern``: an
    N:M pattern such as ``"2:4"`` (then ``sparsity`` must be left unset or equal 1 - N/M)."""

    sparsity: float | None = None
    pattern: str | None = None

    def __post_init__(self) -> None:
        self._validate_selection(allowed=("linear", "head"))
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
    if config.nm is None:
        return
    m = config.nm[1]
    for name, module in modules.items():
        if module.weight.shape[1] % m:
            raise ConfigError(
                f"{config.name}: pattern {config.pattern} needs input widths divisible by {m}, {name} has {module.weight.shape[1]}",
                "exclude that layer or choose another pattern",
            )


def prune_linear(module: nn.Linear, scores: torch.Tensor, config: PruningConfig, per_row: bool) -> float:
    """Zero the weights of ``module`` not kept by the mask of ``scores`` (out, in); returns the
    measured sparsity of the layer."""
    if config.nm is not None:
        mask = nm_mask(scores, *config.nm)
    else:
        mask = unstructured_mask(scores, config.sparsity, per_row=per_row)
    with torch.no_grad():
        module.weight.mul_(mask.to(module.weight.dtype))
    return float((module.weight == 0).float().mean())


