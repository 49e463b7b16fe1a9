"""Pruning: magnitude and Wanda, unstructured and N:M."""

from slimformer.methods.pruning.magnitude import MagnitudeConfig
from slimformer.methods.pruning.wanda import WandaConfig

__all__ = ["MagnitudeConfig", "WandaConfig"]
