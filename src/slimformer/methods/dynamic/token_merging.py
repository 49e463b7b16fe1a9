"""ToMe token merging between encoder blocks (see ``token_reduction`` for the algorithm)."""

from __future__ import annotations

from dataclasses import dataclass

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, register_method
from slimformer.methods.dynamic.base import check_layers, require_encoder, settings_of
from slimformer.methods.dynamic.token_reduction import TokenMerger


@dataclass
class TokenMergingConfig(MethodConfig):
    """Merge ``r`` tokens per input after each block in ``layers`` (default: every block but
    the last) by bipartite soft matching; ``proportional_attention`` adds log(size) to the
    attention logits of merged tokens (as ToMe does; off, attention runs without a bias mask,
    which CPU attention kernels run faster)."""

    name = "tome"
    family = "dynamic"
    paper = "Token Merging: Your ViT But Faster (Bolya et al., 2023)"
    summary = "merge the r most similar token pairs after each block (bipartite matching, proportional attention)"

    r: int = 8
    layers: tuple[int, ...] = ()
    proportional_attention: bool = True

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        if not is_int_at_least(self.r, 0):
            raise ConfigError(f"tome: r={self.r!r} must be a non-negative integer", "use e.g. r: 8")


def install_token_merging(loaded, config: TokenMergingConfig) -> list[int]:
    n = loaded.adapter.num_layers()
    layers = list(config.layers) or list(range(n - 1))
    check_layers("tome", tuple(layers), n)
    settings = settings_of(loaded)
    settings.proportional_attention = config.proportional_attention
    if config.r > 0:
        for layer in layers:
            settings.reducers.setdefault(layer, []).append(TokenMerger(config.r))
    settings.configs.append(config.to_dict())
    return layers


@register_method(TokenMergingConfig)
def apply_token_merging(loaded, config: TokenMergingConfig, ctx) -> dict:
    require_encoder(loaded, "tome")
    return {"layers": install_token_merging(loaded, config), "r": config.r}
