"""Pruning: magnitude, Wanda and SparseGPT, unstructured and N:M, stored sparse."""

from slimformer.methods.pruning.magnitude import MagnitudeConfig
from slimformer.methods.pruning.wanda import WandaConfig
from slimformer.methods.pruning.sparsegpt import SparseGPTConfig

__all__ = ["MagnitudeConfig", "SparseGPTConfig", "WandaConfig"]
