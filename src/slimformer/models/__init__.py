"""Model loading, architecture adapters and tiny test models."""

from slimformer.models.adapters import (
    SPECS,
    SUPPORTED_MODEL_TYPES,
    ArchitectureAdapter,
    ArchitectureSpec,
    attention_implementation,
    conv1d_to_linear,
    set_attention,
    set_submodule,
)
from slimformer.models.loading import DEFAULT_MODEL, LoadedModel, default_model_path, from_module, load_model

__all__ = [
    "DEFAULT_MODEL",
    "SPECS",
    "SUPPORTED_MODEL_TYPES",
    "ArchitectureAdapter",
    "ArchitectureSpec",
    "LoadedModel",
    "attention_implementation",
    "conv1d_to_linear",
    "default_model_path",
    "from_module",
    "load_model",
    "set_attention",
    "set_submodule",
]
