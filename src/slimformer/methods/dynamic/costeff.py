"""COST-EFF: a slimmed, multi-exit encoder whose backbone and exits are trained together.

Shen et al., 2022, "COST-EFF: Collaborative Optimization of Spatial and Temporal Efficiency with
Slenderized Multi-exit Language Models". The model is slenderized in width (attention heads and
MLP neurons of low calibration importance removed, matrices physically shrunk, depth kept; see
``structure.width``), exits are attached after chosen blocks, and the slimmed backbone and every
exit are then trained *jointly* by distillation from the original model's final embedding, so
each exit keeps what it needs instead of only the last layer. The loss weights every exit
(deeper exits more, ``exit_weighting: linear``, or equally) plus the final embedding, and
optionally the pooled hidden state after every block (``hidden_weight``). The backbone trains
at a small learning rate (``backbone: full``, every block parameter; ``frozen`` trains only the
exits, the frozen-backbone baseline). Every third calibration row is held back: it checks that
the final embedding keeps its quality and calibrates the exits' learned confidence (see
``confidence``), which the ``predicted`` exit rule uses.

Training: AdamW, cosine-decayed learning rates, batches in a seeded order, a tqdm bar; a
checkpoint file (model and exit weights, optimizer, scheduler, sampler state, loss history) is
written every ``checkpoint_every`` steps and a run with the same checkpoint path resumes from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, register_method
from slimformer.methods.dynamic.base import check_layers, require_encoder, settings_of
from slimformer.methods.dynamic.confidence import fit_confidence, held_back_rows, pooled_states
from slimformer.methods.dynamic.rules import RULES, make_rule
from slimformer.methods.dynamic.runtime import DynamicEncoder, DynamicSettings, ExitHeads
from slimformer.methods.distill import AUTOCAST_DTYPES, adamw, optimizer_step, save_checkpoint, training_autocast

log = logging.getLogger(__name__)

BACKBONE_MODES = ("full", "frozen")
WEIGHTINGS = ("linear", "uniform")


def _number(name: str, value, low: float, high: float, example: str, low_open: bool = False) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not (low < value if low_open else low <= value) or value > high
    if bad:
        raise ConfigError(f"costeff: {name}={value!r} must be a number in {'(' if low_open else '['}{low}, {high}]", f"use e.g. {name}: {example}")


@dataclass
class CostEffConfig(MethodConfig):
    """Width: ``flops_ratio`` of the blocks' FLOPs at ``seq_len`` tokens kept (1.0 = no
    slimming), or ``head_ratio`` / ``mlp_ratio`` directly, MLP widths multiples of ``round_to``;
    ``width_select`` / ``width_refit``: width-slim's ``select`` and ``refit`` (heads and neurons
    chosen by structured OBS, output projections refitted by least squares).
    Exits after ``exit_layers`` (default every block but the last). Joint training: ``steps``
    AdamW steps over the calibration batches, backbone at ``lr`` (``backbone: full`` or
    ``frozen``), exits at ``exit_lr``; loss = sum over exits of w_k (1 - cos(exit_k, teacher))
    (``exit_weighting``: ``linear`` w_k = (k+1)/blocks, or ``uniform``) + ``final_weight``
    (1 - cos(final, teacher)) + ``hidden_weight`` x relative squared error of the pooled state
    after every block; seeded by ``seed``, resumable from ``checkpoint``; ``exit_warmup_steps``
    > 0 first fits the exits alone on the frozen slimmed backbone (full-batch, cached features),
    so joint training starts from good exits. ``autocast``: ``float32`` or ``bfloat16`` (the
    training passes under bfloat16 autocast, float32 weights and losses; as width-slim's
    ``distill_autocast``: faster where the CPU has bfloat16 units). Then each exit's
    confidence is fitted (``confidence_steps``) and the exit ``rule`` (default ``predicted``,
    or ``similarity`` / ``patience``) with ``threshold`` / ``patience`` installed."""

    name = "costeff"
    family = "dynamic"
    paper = "COST-EFF: Collaborative Optimization of Spatial and Temporal Efficiency with Slenderized Multi-exit Language Models (Shen et al., 2022)"
    summary = "width-slimmed multi-exit encoder; backbone and every exit trained jointly by distillation; learned exit confidence"
    requires_calibration = True

    flops_ratio: float = 0.5
    head_ratio: float | None = None
    mlp_ratio: float | None = None
    seq_len: int = 128
    round_to: int = 16
    width_select: str = "importance"
    width_refit: bool = False
    exit_layers: tuple[int, ...] = ()
    exit_weighting: str = "linear"
    final_weight: float = 1.0
    hidden_weight: float = 0.0
    backbone: str = "full"
    steps: int = 200
    lr: float = 5e-5
    exit_lr: float = 1e-3
    rule: str = "predicted"
    threshold: float = 0.97
    patience: int = 2
    confidence_steps: int = 300
    exit_warmup_steps: int = 0
    seed: int = 0
    checkpoint: str | None = None
    checkpoint_every: int = 25
    autocast: str = "float32"

    def __post_init__(self) -> None:
        self.exit_layers = tuple(self.exit_layers)
        if self.width_select not in ("importance", "obs"):
            raise ConfigError(f"costeff: width_select={self.width_select!r} is not one of ['importance', 'obs']", "use width_select: obs")
        if not isinstance(self.width_refit, bool):
            raise ConfigError(f"costeff: width_refit={self.width_refit!r} must be true or false", "use width_refit: true")
        _number("flops_ratio", self.flops_ratio, 0.0, 1.0, "0.5", low_open=True)
        for name in ("head_ratio", "mlp_ratio"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name), 0.0, 1.0, "0.5", low_open=True)
        for name in ("final_weight", "hidden_weight"):
            _number(name, getattr(self, name), 0.0, 1e6, "1.0")
        for name in ("lr", "exit_lr"):
            _number(name, getattr(self, name), 0.0, 1.0, "1e-4", low_open=True)
        if self.backbone not in BACKBONE_MODES:
            raise ConfigError(f"costeff: backbone={self.backbone!r} is not one of {list(BACKBONE_MODES)}", "use backbone: full or backbone: frozen")
        if self.exit_weighting not in WEIGHTINGS:
            raise ConfigError(f"costeff: exit_weighting={self.exit_weighting!r} is not one of {list(WEIGHTINGS)}", "use exit_weighting: linear")
        if self.rule not in RULES or self.rule == "confidence":
            raise ConfigError(f"costeff: rule={self.rule!r} is not an embedding exit rule", "use rule: predicted, similarity or patience")
        for name in ("seq_len", "round_to", "checkpoint_every", "patience"):
            if not is_int_at_least(getattr(self, name), 1):
                raise ConfigError(f"costeff: {name}={getattr(self, name)!r} must be a positive integer", f"use e.g. {name}: 16")
        for name in ("steps", "confidence_steps", "exit_warmup_steps"):
            if not is_int_at_least(getattr(self, name), 0):
                raise ConfigError(f"costeff: {name}={getattr(self, name)!r} must be a non-negative integer", f"use e.g. {name}: 200")
        if self.autocast not in AUTOCAST_DTYPES:
            raise ConfigError(f"costeff: autocast={self.autocast!r} is not one of {list(AUTOCAST_DTYPES)}", "use autocast: bfloat16")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"costeff: seed={self.seed!r} must be an integer", "use e.g. seed: 0")


def install_costeff_exits(loaded, config: CostEffConfig) -> ExitHeads:
    """Attach (untrained) exits with confidence heads and the configured rule; used when
    applying the method and when a saved model is loaded (weights load after)."""
    n = loaded.adapter.num_layers()
    layers = sorted(config.exit_layers) if config.exit_layers else list(range(n - 1))
    check_layers("costeff", tuple(layers), n)
    heads = ExitHeads(layers, loaded.model.config.hidden_size, confidence=True)
    loaded.model.slimformer_exits = heads
    settings = settings_of(loaded)
    settings.exits = heads
    settings.rule = make_rule(config.rule, config.threshold, config.patience, heads)
    settings.configs.append(config.to_dict())
    return heads


def exit_weights(layers: list[int], n_layers: int, mode: str) -> dict[int, float]:
    return {layer: ((layer + 1) / n_layers if mode == "linear" else 1.0) for layer in layers}


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).sum() / (b**2).sum().clamp(min=1e-12)


def step_losses(runner: DynamicEncoder, heads: ExitHeads, batch: dict, target: torch.Tensor, teacher_layers: list[torch.Tensor] | None,
                rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-term distillation losses of one batch on the selected ``rows`` (bool (batch,)):
    ``exit<k>`` = mean (1 - cos) of exit k's output to the teacher embedding ``target``
    (batch, dim), ``final`` the same for the final embedding, ``hidden`` the mean relative squared
    error of the pooled states to ``teacher_layers`` (list of (batch, dim)) when given."""
    final, pooled = runner._embed_padded(batch, collect_layers=True)
    out = {f"exit{layer}": (1 - F.cosine_similarity(heads(layer, pooled[layer])[rows].float(), target[rows], dim=-1)).mean() for layer in heads.layers}
    out["final"] = (1 - F.cosine_similarity(final[rows].float(), target[rows], dim=-1)).mean()
    if teacher_layers is not None:
        out["hidden"] = sum(_rel(p[rows].float(), t[rows]) for p, t in zip(pooled, teacher_layers)) / len(pooled)
    return out


def total_loss(parts: dict[str, torch.Tensor], weights: dict[int, float], config: CostEffConfig) -> torch.Tensor:
    loss = sum(w * parts[f"exit{layer}"] for layer, w in weights.items()) + config.final_weight * parts["final"]
    if "hidden" in parts:
        loss = loss + config.hidden_weight * parts["hidden"]
    return loss


@torch.no_grad()
def mean_losses(runner, heads, batches, targets, teacher_layers, row_masks) -> dict[str, float]:
    """Mean per-term losses over all batches (rows per ``row_masks``)."""
    sums: dict[str, float] = {}
    count = 0
    for j, batch in enumerate(batches):
        if not row_masks[j].any():
            continue
        parts = step_losses(runner, heads, batch, targets[j], teacher_layers[j] if teacher_layers else None, row_masks[j])
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        count += 1
    return {k: v / max(count, 1) for k, v in sums.items()}


def _row_masks(batches: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per batch: bool masks of training rows and of held-back rows (every third row overall)."""
    sizes = [int(b["input_ids"].shape[0]) for b in batches]
    held = held_back_rows(sum(sizes))
    if held.sum() == 0 or (~held).sum() == 0:
        held = torch.zeros_like(held)
    fit, back = [], []
    start = 0
    for n in sizes:
        back.append(held[start : start + n])
        fit.append(~held[start : start + n])
        start += n
    return fit, back


def joint_train(loaded, heads: ExitHeads, batches: list[dict], targets: list[torch.Tensor], teacher_layers: list[list[torch.Tensor]] | None,
                config: CostEffConfig, progress: bool = False) -> dict:
    """Train backbone and exits together (see the module docstring). ``targets``: per batch the
    original's final embeddings (batch, dim); ``teacher_layers``: per batch its pooled states
    after every block (list of (batch, dim)), or None."""
    settings = settings_of(loaded)
    runner = DynamicEncoder(loaded)
    runner.settings = DynamicSettings(reducers=settings.reducers, proportional_attention=settings.proportional_attention)
    fit_rows, held_rows = _row_masks(batches)
    weights = exit_weights(heads.layers, loaded.adapter.num_layers(), config.exit_weighting)
    before = mean_losses(runner, heads, batches, targets, teacher_layers, fit_rows)
    held_before = mean_losses(runner, heads, batches, targets, teacher_layers, held_rows)
    heads.float()
    backbone = [p for p in loaded.adapter.blocks().parameters() if p.is_floating_point()] if config.backbone == "full" else []
    exit_params = list(heads.heads.parameters())
    params = backbone + exit_params
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    groups = [{"params": exit_params, "lr": config.exit_lr}] + ([{"params": backbone, "lr": config.lr}] if backbone else [])
    optim = adamw(groups)
    steps = config.steps
    low = AUTOCAST_DTYPES[config.autocast]
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    gen = torch.Generator().manual_seed(config.seed)
    start, order, history = 0, [], []
    key = hashlib.sha256(json.dumps({"config": config.to_dict(), "structure": loaded.adapter.structure_record()}, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(config.checkpoint) if config.checkpoint else None
    model = loaded.model
    if path is not None and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") == key:
            model.load_state_dict(state["model"])
            optim.load_state_dict(state["optim"])
            sched.load_state_dict(state["sched"])
            gen.set_state(state["generator"])
            order, start, history = list(state["order"]), int(state["step"]), list(state["history"])
            log.info("costeff training resumes at step %d from %s", start, path)
        else:
            log.warning("costeff checkpoint %s belongs to another run; starting afresh", path)
    bar = tqdm(total=steps, initial=start, desc="costeff", disable=not progress, unit="step")
    try:
        with torch.enable_grad():
            for step in range(start, steps):
                if not order:
                    order = torch.randperm(len(batches), generator=gen).tolist()
                j = order.pop()
                if not fit_rows[j].any():
                    continue
                with training_autocast(low):
                    parts = step_losses(runner, heads, batches[j], targets[j], teacher_layers[j] if teacher_layers else None, fit_rows[j])
                loss = total_loss(parts, weights, config)
                history.append(optimizer_step(loss, optim, sched, params))
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1]:.4f}")
                if path is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == steps):
                    save_checkpoint(path, {"fingerprint": key, "step": step + 1, "model": model.state_dict(), "optim": optim.state_dict(),
                                           "sched": sched.state_dict(), "generator": gen.get_state(), "order": list(order), "history": history})
    finally:
        bar.close()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
    model.eval()
    after = mean_losses(runner, heads, batches, targets, teacher_layers, fit_rows)
    held_after = mean_losses(runner, heads, batches, targets, teacher_layers, held_rows)
    return {"steps": steps, "resumed_at": start, "autocast": config.autocast, "history": history, "loss_before": before, "loss_after": after,
            "held_back_before": held_before, "held_back_after": held_after, "exit_weights": weights}


@register_method(CostEffConfig)
def apply_costeff(loaded, config: CostEffConfig, ctx) -> dict:
    require_encoder(loaded, "costeff")
    from slimformer.methods.structure.width import WidthSlimConfig, apply_width_slim

    batches = ctx.batches(loaded.tokenizer)
    with torch.no_grad():
        final, per_layer, _ = pooled_states(loaded, batches, reducers=False)
    sizes = [int(b["input_ids"].shape[0]) for b in batches]
    targets = list(final.split(sizes))
    teacher_layers = [list(t) for t in zip(*[p.split(sizes) for p in per_layer])] if config.hidden_weight > 0 else None
    record: dict = {}
    if config.flops_ratio < 1.0 or config.head_ratio is not None or config.mlp_ratio is not None:
        width = WidthSlimConfig(flops_ratio=config.flops_ratio, head_ratio=config.head_ratio, mlp_ratio=config.mlp_ratio,
                                seq_len=config.seq_len, round_to=config.round_to, select=config.width_select, refit=config.width_refit)
        record["width"] = {k: v for k, v in apply_width_slim(loaded, width, ctx).items() if k != "kept"}
    torch.manual_seed(config.seed)
    heads = install_costeff_exits(loaded, config)
    if config.exit_warmup_steps:
        from slimformer.methods.dynamic.early_exit import train_exits

        fit = torch.cat(_row_masks(batches)[0])
        record["exit_warmup"] = train_exits(loaded, heads, batches, config.exit_warmup_steps, config.exit_lr, fit)
    record["training"] = joint_train(loaded, heads, batches, targets, teacher_layers, config, progress=ctx.progress)
    record["confidence"] = fit_confidence(loaded, heads, batches, steps=config.confidence_steps, seed=config.seed)
    heads.to(next(loaded.model.parameters()).dtype)
    record["exit_layers"] = heads.layers
    return record
