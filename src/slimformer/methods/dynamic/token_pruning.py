"""Token pruning by attention importance between encoder blocks, with a staged schedule."""

from __future__ import annotations

import dataclasses
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
    ``min_tokens``), so short texts are not gutted and long ones are shortened most.

    ``keep_ratios``: one keep ratio per entry of ``layers`` (instead of ``keep_ratio`` for all).
    ``target_cos``: choose the per-layer ratios on the calibration text (DiffRate-style, see
    ``rate_search``): ``layers`` are the candidates, ``keep_ratio`` the lowest ratio allowed, and
    ratios fall by multiples of ``step`` while the calibration embeddings keep a mean cosine of
    at least ``target_cos`` to the unpruned model's; ``cost``: what a move must save, the wall
    time of the calibration passes measured on this machine against the current setting
    (``time``, at least 2 %), or the runtime's FLOP count (``flops``, reproducible anywhere);
    ``target_top10`` (with ``target_cos``): also keep each calibration text's 10 nearest
    calibration texts, on average, at least this much the same as the unpruned model's; the
    chosen ratios are what is saved. ``fuse``: the tokens a row drops are fused into one token
    (their size-weighted mean, carrying their total size) instead of discarded (EViT), so later
    blocks and mean pooling still count them."""

    name = "token-pruning"
    family = "dynamic"
    paper = ("[CLS] Attention is All You Need for Training-Free Visual Token Compression (VTC-CLS, 2024); PyramidDrop (Xing et al., 2024); "
             "EViT: Not All Patches are What You Need (Liang et al., 2022) for fuse")
    summary = "drop the tokens the next block's [CLS]/mean attention ranks least important, at staged layers"

    keep_ratio: float = 0.7
    layers: tuple[int, ...] = (1, 3)
    score: str = "cls"
    schedule: str = "constant"
    min_tokens: int = 0
    keep_ratios: tuple[float, ...] = ()
    target_cos: float | None = None
    target_top10: float | None = None
    step: float = 0.1
    cost: str = "time"
    fuse: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.fuse, bool):
            raise ConfigError(f"token-pruning: fuse={self.fuse!r} must be true or false", "use fuse: true to fuse the dropped tokens into one, fuse: false to discard them")
        if self.cost not in ("time", "flops"):
            raise ConfigError(f"token-pruning: cost={self.cost!r} is unknown", "use cost: time (measured) or cost: flops")
        self.keep_ratios = tuple(self.keep_ratios)
        if self.keep_ratios and len(self.keep_ratios) != len(tuple(self.layers)):
            raise ConfigError(f"token-pruning: {len(self.keep_ratios)} keep_ratios for {len(tuple(self.layers))} layers", "give one keep ratio per layer, e.g. layers: [1, 3] with keep_ratios: [0.8, 0.6]")
        if any(isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1 for k in self.keep_ratios):
            raise ConfigError(f"token-pruning: keep_ratios={list(self.keep_ratios)} must each be in (0, 1]", "use e.g. keep_ratios: [0.8, 0.6]")
        if self.target_cos is not None and (isinstance(self.target_cos, bool) or not isinstance(self.target_cos, (int, float)) or not 0 < self.target_cos < 1):
            raise ConfigError(f"token-pruning: target_cos={self.target_cos!r} must be in (0, 1)", "use e.g. target_cos: 0.99")
        if self.target_top10 is not None and (isinstance(self.target_top10, bool) or not isinstance(self.target_top10, (int, float)) or not 0 < self.target_top10 <= 1):
            raise ConfigError(f"token-pruning: target_top10={self.target_top10!r} must be in (0, 1]", "use e.g. target_top10: 0.9")
        if self.target_top10 is not None and self.target_cos is None:
            raise ConfigError("token-pruning: target_top10 is a floor of the rate search, which target_cos starts", "give target_cos too, e.g. target_cos: 0.98")
        if self.target_cos is not None and self.keep_ratios:
            raise ConfigError("token-pruning: target_cos chooses the keep ratios; keep_ratios fixes them", "give one of target_cos or keep_ratios")
        if isinstance(self.step, bool) or not isinstance(self.step, (int, float)) or not 0 < self.step < 1:
            raise ConfigError(f"token-pruning: step={self.step!r} must be in (0, 1)", "use e.g. step: 0.1")
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
    ratios = config.keep_ratios or (config.keep_ratio,) * len(config.layers)
    for layer, keep in zip(config.layers, ratios):
        settings.reducers.setdefault(layer, []).append(TokenPruner(keep, config.score, config.schedule, config.min_tokens, config.fuse))
    settings.configs.append(config.to_dict())


@register_method(TokenPruningConfig)
def apply_token_pruning(loaded, config: TokenPruningConfig, ctx) -> dict:
    require_encoder(loaded, "token-pruning")
    if config.target_cos is None:
        install_token_pruning(loaded, config)
        return {"layers": list(config.layers), "keep_ratios": list(config.keep_ratios or (config.keep_ratio,) * len(config.layers))}
    from tqdm.auto import tqdm

    from slimformer.methods.dynamic.rate_search import search_keep_ratios

    check_layers("token-pruning", config.layers, loaded.adapter.num_layers())
    settings_of(loaded)
    batches = ctx.batches(loaded.tokenizer)
    with tqdm(desc="token-pruning rates", unit="trial", disable=not getattr(ctx, "progress", False)) as bar:
        found = search_keep_ratios(loaded, batches, tuple(config.layers), float(config.target_cos), float(config.keep_ratio), float(config.step),
                                   config.score, config.schedule, config.min_tokens, cost=config.cost, progress=bar, target_top10=config.target_top10, fuse=config.fuse)
    layers = tuple(sorted(found["keep"]))
    if layers:  # what is saved: the chosen ratios, so loading does not search again
        chosen = dataclasses.replace(config, layers=layers, keep_ratios=tuple(found["keep"][l] for l in layers), target_cos=None, target_top10=None)
        install_token_pruning(loaded, chosen)
    return {"layers": list(layers), "keep_ratios": [found["keep"][l] for l in layers], "calibration_cos": found["cos"], "calibration_top10": found["top10"],
            "flops_ratio": found["flops_ratio"], "cost": found["cost"], "cost_ratio": found["cost_ratio"], "target_cos": config.target_cos, "target_top10": config.target_top10,
            "search_path": found["path"]}


def describe_rates(record: dict) -> str:
    """What a ``token-pruning`` record (the dict :func:`apply_token_pruning` returns) prunes, in
    words: ``after block(s) 2, 3 keeping 50%, 40%``, or ``no pruning``."""
    if not record["layers"]:
        return "no pruning"
    return f"after block(s) {', '.join(map(str, record['layers']))} keeping {', '.join(f'{k:.0%}' for k in record['keep_ratios'])}"
