"""Resolving a method's ``ModuleSelection`` to concrete modules, with up-front validation."""

from __future__ import annotations

import math

from torch import nn

from slimformer.errors import ConfigError
from slimformer.methods.base import ModuleSelection


def select_modules(loaded, config: ModuleSelection, types: tuple[type, ...] = (nn.Linear, nn.Embedding), allow_tied: bool = False) -> dict[str, nn.Module]:
    """Modules chosen by ``config`` that are still of one of ``types`` (not yet compressed).

    Raises ``ConfigError`` when nothing is selected, so a recipe step can never silently do
    nothing, and when a selected weight is tied to another module (e.g. an embedding table
    shared with the output head): methods that can keep the tie (``allow_tied``) must select
    every module of the tie, the others must not touch it.
    """
    adapter = loaded.adapter
    chosen: dict[str, nn.Module] = {}
    for kind in config.targets:
        for name, module in adapter.modules_of_kind(kind).items():
            if isinstance(module, types) and config.selects(name):
                chosen[name] = module
    if chosen:
        _check_ties(loaded, config, chosen, allow_tied)
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
            common = math.gcd(*(m.weight.shape[1] for m in modules.values()))
            fits = [g for g in (16, 32, 64, 96, 128, 192, 256) if common % g == 0] or [common]
            raise ConfigError(
                f"{config_name}: group_size {group_size} does not divide the width {width} of {name}",
                f"choose a group size that divides every selected layer's input width (here: {', '.join(map(str, fits))}), or exclude that layer",
            )


def _check_ties(loaded, config: ModuleSelection, chosen: dict[str, nn.Module], allow_tied: bool) -> None:
    owners: dict[int, list[str]] = {}
    for name, module in loaded.model.named_modules(remove_duplicate=False):
        weight = getattr(module, "_parameters", {}).get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(name)
    for name, module in chosen.items():
        sharing = sorted(set(owners.get(id(module.weight), [])) - {name})
        if not sharing:
            continue
        if not allow_tied:
            raise ConfigError(
                f"{config.name}: {name} shares its weight with {sharing[0]} (tied weights)",
                "leave it out of this step (e.g. drop 'head' from targets) or quantize the tied pair with rtn, targets [embedding, head]",
            )
        missing = [s for s in sharing if s not in chosen]
        if missing:
            raise ConfigError(
                f"{config.name}: {name} shares its weight with {missing[0]}, which this step does not select",
                "select both (targets [embedding, head]): a tied pair is quantized together and stored once",
            )
