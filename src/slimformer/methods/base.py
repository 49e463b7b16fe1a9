"""Method configs, the one registry of methods, and module selection shared by all families.

A method is a ``@dataclass`` config (its fields are exactly its hyperparameters, validated on
construction) plus a transform function registered for that config type::

    @register_method(RTNConfig)
    def apply_rtn(model: LoadedModel, config: RTNConfig, ctx: CompressionContext) -> dict: ...

``apply_method`` dispatches on the config's type; ``method_from_dict`` rebuilds a config from its
type-tagged, versioned dictionary and accepts only registered names.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from slimformer.errors import ConfigError, did_you_mean

TARGET_KINDS = ("linear", "embedding", "head")
# Also selectable by the methods that need no activations (rtn): the weights outside the blocks
# that are neither the token-embedding table nor the head (position embeddings, a pooler).
AUXILIARY = "auxiliary"

@dataclass
class MethodConfig:
    """Base of every method config.

    Class attributes (not fields): ``name`` (registry key, used in recipes), ``family``,
    ``paper`` (the method's paper), ``summary`` (one line for ``slimformer methods``),
    ``version`` (bumped when the meaning of a field changes).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    version: ClassVar[int] = 1
    requires_calibration: ClassVar[bool] = False
    requires_original_weights: ClassVar[bool] = False  # e.g. error compensation of a quantized model
    requires_teacher: ClassVar[bool] = False  # the whole model before the recipe (ctx.teacher), e.g. to distil from
    # A killed job resumes this step from its last finished block (see methods/checkpoint.py):
    # the method changes the model only through blockwise's layers and keeps its per-layer
    # record in ctx.layer_record.
    resumable: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        """Type-tagged, versioned plain dictionary (JSON/YAML safe)."""
        out: dict[str, Any] = {"method": self.name, "version": self.version}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

@dataclass
class ModuleSelection:
    """Which weights a method touches.

    ``targets``: kinds of module — ``linear`` (the linear layers inside the transformer blocks),
    ``embedding`` (the token-embedding table), ``head`` (the output projection, e.g. ``lm_head``)
    and, for ``rtn``, ``auxiliary`` (every other weight outside the blocks: BERT's position and
    token-type embeddings and its pooler).
    ``include`` / ``exclude``: ``fnmatch`` patterns on fully-qualified module names
    (e.g. ``"*.attention.*"``); a module is selected if it matches a target kind, matches some
    ``include`` pattern (when any are given) and matches no ``exclude`` pattern.
    """

    targets: tuple[str, ...] = ("linear",)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def _validate_selection(self, allowed: tuple[str, ...] = TARGET_KINDS) -> None:
        for attr in ("targets", "include", "exclude"):
            value = getattr(self, attr)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(
                    f"{self.name}: {attr} must be a list of strings, got {value!r}",
                    f"write e.g. {attr}: [\"linear\"]" if attr == "targets" else f"write e.g. {attr}: [\"*.attention.*\"]",
                )
            setattr(self, attr, tuple(value))
        if not self.targets:
            raise ConfigError(f"{self.name}: targets is empty", f"choose some of {list(allowed)}")
        bad = [t for t in self.targets if t not in allowed]
        if bad:
            raise ConfigError(
                f"{self.name}: unknown target {bad[0]!r}", f"choose targets among {list(allowed)}"
            )

    def selects(self, name: str) -> bool:
        """Whether a module of a selected kind with this qualified ``name`` passes the patterns."""
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

@dataclass
class RegisteredMethod:
    config_type: type[MethodConfig]
    transform: Callable[..., dict]

_REGISTRY: dict[str, RegisteredMethod] = {}

def register_method(config_type: type[MethodConfig]) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    """Decorator registering ``transform`` as the implementation of ``config_type``."""

    def decorator(transform: Callable[..., dict]) -> Callable[..., dict]:
        if not config_type.name:
            raise TypeError(f"{config_type.__name__} has no name")
        if config_type.name in _REGISTRY:
            raise TypeError(f"method {config_type.name!r} registered twice")
        _REGISTRY[config_type.name] = RegisteredMethod(config_type, transform)
        return transform

    return decorator

def registered_methods() -> dict[str, RegisteredMethod]:
    """All registered methods, keyed by name, in registration order."""
    import slimformer.methods  # noqa: F401  (importing the package registers every method)

    return dict(_REGISTRY)

def _coerce(value: Any, annotation: Any, method: str, key: str) -> Any:
    """Coerce YAML/JSON values to the field's declared type (lists to tuples), else raise."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        last: ConfigError | None = None
        for a in inner:
            try:
                return _coerce(value, a, method, key)
            except ConfigError as exc:
                last = exc
        if len(inner) == 1 and last is not None:
            raise last
        raise ConfigError(f"{method}: {key}={value!r} has the wrong type", f"give a value of type {annotation}")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{method}: {key} must be a list, got {value!r}", f"write e.g. {key}: [...]")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, method, key) for v in value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{method}: {key} must be true or false, got {value!r}", f"write {key}: true or {key}: false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{method}: {key} must be an integer, got {value!r}", f"write e.g. {key}: 4")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{method}: {key} must be a number, got {value!r}", f"write e.g. {key}: 0.5")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{method}: {key} must be a string, got {value!r}", f"write it in quotes (YAML reads 2:4 as the number 124), e.g. {key}: \"2:4\"")
        return value
    return value

def method_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Rebuild a method config from ``{"method": name, "version": v, **fields}``.

    Only registered names are accepted; unknown fields and wrong types raise ``ConfigError``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe step must be a mapping, got {data!r}", "write each step as {method: NAME, ...}")
    methods = registered_methods()
    data = dict(data)
    name = data.pop("method", None)
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"recipe step has method {name!r}, not a name", f"write method: one of {sorted(methods)}")
    if name is None:
        raise ConfigError(f"recipe step {data!r} has no 'method'", f"add method: one of {sorted(methods)}")
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}{did_you_mean(name, methods)}", f"use one of {sorted(methods)} (see 'slimformer methods')")
    config_type = methods[name].config_type
    version = data.pop("version", config_type.version)
    if version != config_type.version:
        raise ConfigError(
            f"{name}: recipe step has version {version}, this slimformer reads version {config_type.version}",
            "update the recipe to the current version",
        )
    hints = typing.get_type_hints(config_type)
    fields = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{name}: unknown setting {unknown[0]!r}{did_you_mean(unknown[0], fields)}", f"valid settings are {sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], name, k) for k, v in data.items()}
    return config_type(**kwargs)

def apply_method(model: Any, config: MethodConfig, ctx: Any) -> dict:
    """Apply one method to ``model`` in place; returns a record of what it did."""
    methods = registered_methods()
    if config.name not in methods or not isinstance(config, methods[config.name].config_type):
        raise ConfigError(f"{type(config).__name__} is not a registered method", "register it with @register_method")
    return methods[config.name].transform(model, config, ctx)

__all__ = [
    "MethodConfig",
    "ModuleSelection",
    "TARGET_KINDS",
    "AUXILIARY",
    "apply_method",
    "method_from_dict",
    "register_method",
    "registered_methods",
]

