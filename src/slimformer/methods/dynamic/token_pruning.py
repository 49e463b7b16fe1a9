"""Token pruning by attention importance between encoder blocks, with a staged schedule."""

from __future__ import annotations

from dataclasses import dataclass

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, register_method
from slimformer.methods.dynamic.base import check_layers, require_encoder, settings_of
from slimformer.methods.dynamic.token_reduction import TokenPruner


@dataclass
class TokenPruningConfig(MethodConfig):
    """After each block in ``layers``, keep the ``keep_ratio`` most important tokens of each
    input; importance is the [CLS] query's attention (``score: cls``) or the mean attention over
    queries (``score: mean``) of the next block. Several layers give a staged, pyramid-like
    schedule (PyramidDrop). ``schedule: length`` makes the rate length-aware: an input of ``n``
    tokens loses ``(1 - keep_ratio) * (n - min_tokens)`` of them (none at or below
    ``min_tokens``), so short texts are not gutted and long ones are shortened most."""

    name = "token-pruning"
    family = "dynamic"
    paper = "[CLS] Attention is All You Need for Training-Free Visual Token Compression (VTC-CLS, 2024); PyramidDrop (Xing et al., 2024)"
    summary = "drop the tokens the next block's [CLS]/mean attention ranks least important, at staged layers"

    keep_ratio: float = 0.7
    layers: tuple[int, ...] = (1, 3)
    score: str = "cls"
    schedule: str = "constant"
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "length"):
            raise ConfigError(f"token-pruning: schedule={self.schedule!r} is unknown", "use schedule: constant or schedule: length")
        if not is_int_at_least(self.min_tokens, 0):
            raise ConfigError(f"token-pruning: min_tokens={self.min_tokens!r} must be a non-negative integer", "use e.g. min_tokens: 32")
        self.layers = tuple(self.layers)
        if isinstance(self.keep_ratio, bool) or not 0 < self.keep_ratio <= 1:
            raise ConfigError(f"token-pruning: keep_ratio={self.keep_ratio!r} must be in (0, 1]", "use e.g. keep_ratio: 0.7")
        if self.score not in ("cls", "mean"):
            raise ConfigError(f"token-pruning: score={self.score!r} is unknown", "use score: cls or score: mean")
        if not self.layers:
            raise ConfigError("token-pruning: layers is empty", "give the blocks after which to prune, e.g. layers: [1, 3]")


def install_token_pruning(loaded, config: TokenPruningConfig) -> None:
    check_layers("token-pruning", config.layers, loaded.adapter.num_layers())
    settings = settings_of(loaded)
    for layer in config.layers:
        settings.reducers.setdefault(layer, []).append(TokenPruner(config.keep_ratio, config.score, config.schedule, config.min_tokens))
    settings.configs.append(config.to_dict())


@register_method(TokenPruningConfig)
def apply_token_pruning(loaded, config: TokenPruningConfig, ctx) -> dict:
    require_encoder(loaded, "token-pruning")
    install_token_pruning(loaded, config)
    return {"layers": list(config.layers), "keep_ratio": config.keep_ratio}
