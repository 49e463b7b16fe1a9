"""All compression methods. Importing this package registers every method.

To add a method: write its file (config dataclass + ``@register_method`` transform), import it
here, add it to ``tests/methods_under_test.py`` and to the README's methods table.
"""

from slimformer.methods.base import MethodConfig, apply_method, method_from_dict, register_method, registered_methods
from slimformer.methods.calibration import CalibrationSettings, CompressionContext
from slimformer.methods.quantization import CastConfig, GPTQConfig, RTNConfig
from slimformer.methods.pruning import MagnitudeConfig, SparseGPTConfig, WandaConfig
from slimformer.methods.structure import BlockPrunerConfig, ShortGPTConfig, SLEBConfig, SublayerDropConfig, WidthSlimConfig
from slimformer.methods.lowrank import ASVDConfig, LQLoRAConfig, SVDConfig, SVDLLMConfig
from slimformer.methods.dynamic import CostEffConfig, EarlyExitConfig, TokenMergingConfig, TokenPruningConfig

__all__ = [
    "ASVDConfig",
    "CalibrationSettings",
    "CastConfig",
    "CostEffConfig",
    "EarlyExitConfig",
    "CompressionContext",
    "GPTQConfig",
    "LQLoRAConfig",
    "MagnitudeConfig",
    "MethodConfig",
    "RTNConfig",
    "SVDConfig",
    "SVDLLMConfig",
    "ShortGPTConfig",
    "SparseGPTConfig",
    "SLEBConfig",
    "SublayerDropConfig",
    "WidthSlimConfig",
    "BlockPrunerConfig",
    "TokenMergingConfig",
    "TokenPruningConfig",
    "WandaConfig",
    "apply_method",
    "method_from_dict",
    "register_method",
    "registered_methods",
]
