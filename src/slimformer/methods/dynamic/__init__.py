"""Dynamic (run-time) methods for encoders: early exit, token merging, token pruning."""

from slimformer.methods.dynamic.costeff import CostEffConfig, install_costeff_exits
from slimformer.methods.dynamic.early_exit import EarlyExitConfig, install_early_exit, set_exit_rule
from slimformer.methods.dynamic.runtime import DynamicEncoder, DynamicSettings, ExitHeads, RunStats
from slimformer.methods.dynamic.token_merging import TokenMergingConfig, install_token_merging
from slimformer.methods.dynamic.token_pruning import TokenPruningConfig, install_token_pruning
from slimformer.models.loading import register_dynamic_runner

register_dynamic_runner(DynamicEncoder)

__all__ = [
    "CostEffConfig",
    "DynamicEncoder",
    "DynamicSettings",
    "EarlyExitConfig",
    "ExitHeads",
    "RunStats",
    "TokenMergingConfig",
    "TokenPruningConfig",
    "install_early_exit",
    "install_token_merging",
    "install_token_pruning",
    "set_exit_rule",
]


def reinstall(loaded, configs: list[dict]) -> None:
    """Rebuild a loaded model's dynamic settings from its manifest (exit weights load after)."""
    from slimformer.methods.base import method_from_dict

    for data in configs:
        config = method_from_dict(data)
        if isinstance(config, EarlyExitConfig):
            install_early_exit(loaded, config)
        elif isinstance(config, TokenMergingConfig):
            install_token_merging(loaded, config)
        elif isinstance(config, CostEffConfig):
            install_costeff_exits(loaded, config)
        elif isinstance(config, TokenPruningConfig):
            install_token_pruning(loaded, config)
