"""Shared plumbing of dynamic (run-time) methods: checks and attaching settings to a model."""

from __future__ import annotations

from slimformer.errors import ConfigError
from slimformer.methods.dynamic.runtime import DynamicSettings


def require_encoder(loaded, method: str) -> None:
    if loaded.kind != "encoder":
        raise ConfigError(
            f"{method} runs on encoders / embedding models, not on a {loaded.kind}",
            "apply it to an encoder such as the default all-MiniLM-L6-v2",
        )


def settings_of(loaded) -> DynamicSettings:
    """The model's dynamic settings, created on first use."""
    if getattr(loaded, "dynamic", None) is None:
        loaded.dynamic = DynamicSettings()
    return loaded.dynamic


def check_layers(method: str, layers: tuple[int, ...], num_layers: int, allow_last: bool = False) -> None:
    limit = num_layers if allow_last else num_layers - 1
    bad = [i for i in layers if not 0 <= i < limit]
    if bad:
        raise ConfigError(f"{method}: layer {bad[0]} is out of range (the model has {num_layers} blocks)", f"use block indices 0..{limit - 1}")
