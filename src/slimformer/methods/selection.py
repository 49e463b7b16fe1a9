"""Resolving a method's ``ModuleSelection`` to concrete modules, with up-front validation."""

from __future__ import annotations

from torch import nn

from slimformer.errors import ConfigError
from slimformer.methods.base import ModuleSelection


def select_modules(loaded, config: ModuleSelection, types: tuple[type, ...] = (nn.Linear, nn.Embedding)) -> dict[str, nn.Module]:
    """Modules chosen by ``config`` that are still of one of ``types`` (not yet compressed).

    Raises ``ConfigError`` when nothing is selected, so a recipe step can never silently do nothing.
    """
    adapter = loaded.adapter
    chosen: dict[str, nn.Module] = {}
    for kind in config.targets:
        for name, module in adapter.modules_of_kind(kind).items():
            if isinstance(module, types) and config.selects(name):
                chosen[name] = module
    if not chosen:
        raise ConfigError(
            f"{config.name}: the selection targets={list(config.targets)} include={list(config.include)} "
            f"exclude={list(config.exclude)} matches no uncompressed module",
            "check the patterns against the module names (see the model's named_modules())",
        )
    return chosen


def check_group_size(config_name: str, modules: dict[str, nn.Module], group_size: int | None) -> None:
    """Raise ``ConfigError`` if ``group_size`` does not divide the input width of every module."""
    if group_size is None:
        return
    for name, module in modules.items():
        width = module.weight.shape[1]
        if width % group_size:
            raise ConfigError(
                f"{config_name}: group_size {group_size} does not divide the width {width} of {name}",
                "choose a group size that divides every selected layer's input width (e.g. 32, 64 or 128), or exclude that layer",
            )
