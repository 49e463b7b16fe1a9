"""FuseGPT-style folding: removed blocks are fused into their kept neighbours, not just deleted.

Pei et al., 2024, "FuseGPT: Learnable Layers Fusion of Generative Pre-trained Transformers".
After blocks are removed (chosen here by SLEB's greedy re-scored search, or given), each
removed block's parameters are folded into a kept neighbouring block ("host") through learnable
low-rank coefficients, trained to make the host reproduce what the original blocks computed,
and then merged, so the model has exactly the parameters and the forward of plain removal.

For every linear layer ``n`` of a host ``h`` and the same layer of each block ``r`` folded into
it::

    W_h,n  <-  W_h,n + (A_h,n B_h,n) * W_h,n + sum_r (A_r,n B_r,n) * W_r,n

(``*`` element-wise, ``A`` (out, rank) starting at zero so training starts from plain removal,
``B`` (rank, in)). A run of consecutive removed blocks is split between the kept blocks before
and after it (the first half into the one before; a run at either end goes wholly to the one
kept block next to it), so each host replaces a contiguous span of the original blocks.

One pass through depth, memory bounded by a block: two streams of calibration hidden states are
carried, the original model's (the teacher) and the pruned model's (the student). At each kept
block the teacher runs the original blocks of the host's span, the student runs the host; a
host with folded blocks first trains its coefficients (AdamW, cosine-decayed learning rate, one
calibration batch per step) to minimise the relative squared error between its output on the
student's hidden states and the teacher's output over valid tokens, so errors of earlier
removals are corrected too. A share of the calibration batches is held out: the coefficients
kept are those of the evaluation with the lowest held-out loss, starting from plain removal,
so folding never makes the held-out calibration loss worse than removal alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, register_method
from slimformer.methods.calibration import BlockCall, open_activation_store, open_block_inputs, run_block
from slimformer.methods.distill import distillation_loss, optimizer_step
from slimformer.methods.structure.sleb import SLEBConfig, apply_sleb, check_block_list, check_blocks_exist, check_fraction, check_rescore

logger = logging.getLogger(__name__)


@dataclass
class FuseGPTConfig(MethodConfig):
    """Which blocks go: ``layers`` (exact original indices) or ``num_layers`` / ``fraction``
    chosen by SLEB (``rescore`` as in SLEB). Folding: ``rank`` of the coefficient factors,
    ``steps`` optimiser steps per host, learning rate ``lr``, ``validation`` share of the
    calibration batches held out to pick the kept coefficients, ``seed``."""

    name = "fusegpt"
    family = "structure"
    paper = "FuseGPT: Learnable Layers Fusion of Generative Pre-trained Transformers (Pei et al., 2024)"
    summary = "remove blocks (SLEB's choice or given) and fold each into its kept neighbours through learned low-rank coefficients"
    requires_calibration = True

    num_layers: int = 1
    fraction: float | None = None
    layers: tuple[int, ...] = ()
    rescore: int | None = None
    rank: int = 16
    steps: int = 400
    lr: float = 2e-3
    validation: float = 0.125
    seed: int = 0

    def __post_init__(self) -> None:
        self.layers, self.num_layers = check_block_list("fusegpt", self.layers, self.num_layers)
        check_fraction("fusegpt", self.fraction)
        for name in ("rank", "steps"):
            if not is_int_at_least(getattr(self, name), 1 if name == "rank" else 0):
                raise ConfigError(f"fusegpt: {name}={getattr(self, name)!r} must be a {'positive' if name == 'rank' else 'non-negative'} integer", f"use e.g. {name}: 8")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1:
            raise ConfigError(f"fusegpt: lr={self.lr!r} must be a number in (0, 1)", "use e.g. lr: 0.002")
        if isinstance(self.validation, bool) or not isinstance(self.validation, (int, float)) or not 0 <= self.validation < 1:
            raise ConfigError(f"fusegpt: validation={self.validation!r} must be a number in [0, 1)", "use e.g. validation: 0.125")
        check_rescore("fusegpt", self.rescore)


def assign_hosts(total: int, removed: list[int]) -> dict[int, list[int]]:
    """``{kept block: removed blocks folded into it}`` (original indices). A run of consecutive
    removed blocks goes half to the kept block before it (the first ``len // 2``), half to the
    one after; a run at either end of the model goes wholly to its one kept neighbour."""
    gone = set(removed)
    if len(gone) >= total:
        raise ConfigError(f"fusegpt: cannot remove {len(gone)} of the model's {total} blocks", f"remove at most {total - 1}")
    hosts: dict[int, list[int]] = {i: [] for i in range(total) if i not in gone}
    i = 0
    while i < total:
        if i not in gone:
            i += 1
            continue
        j = i
        while j + 1 < total and j + 1 in gone:
            j += 1
        run = list(range(i, j + 1))
        before = i - 1 if i > 0 else None
        after = j + 1 if j + 1 < total else None
        if before is None:
            hosts[after] += run
        elif after is None:
            hosts[before] += run
        else:
            half = len(run) // 2
            hosts[before] += run[:half]
            hosts[after] += run[half:]
        i = j + 1
    return hosts


def _linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if type(m) is nn.Linear}


class FoldedHost(nn.Module):
    """The coefficients folding ``sources`` (blocks, the host first) into ``host``'s linears.

    ``weights()`` gives ``{"<linear>.weight": effective weight}`` for ``functional_call``."""

    def __init__(self, host: nn.Module, sources: list[nn.Module], rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.host = [host]  # not a submodule: its parameters are not trained
        self.targets = _linears(host)
        self.sources: dict[str, list[torch.Tensor]] = {}
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for name, linear in self.targets.items():
            weights = []
            for k, block in enumerate(sources):
                other = _linears(block).get(name) if k else linear
                if other is None or other.weight.shape != linear.weight.shape:
                    continue  # a layer the removed block lacks (or shapes differ): nothing to fold
                key = f"{name.replace('.', '__')}__{k}"
                out, inp = linear.weight.shape
                self.A[key] = nn.Parameter(torch.zeros(out, rank))
                self.B[key] = nn.Parameter(torch.randn(rank, inp, generator=generator) / math.sqrt(rank))
                weights.append((key, other.weight.detach().float()))
            self.sources[name] = weights

    def weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, linear in self.targets.items():
            w = linear.weight.detach().float()
            for key, source in self.sources[name]:
                w = w + (self.A[key] @ self.B[key]) * source
            out[f"{name}.weight"] = w.to(linear.weight.dtype)
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Write the effective weights into the host's linears (the coefficients are dropped)."""
        for key, w in self.weights().items():
            name = key[: -len(".weight")]
            self.targets[name].weight.data.copy_(w)


def _call_host(host: nn.Module, weights: dict, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    if call.hidden_as_kwarg:
        out = functional_call(host, weights, call.args, {**call.kwargs, "hidden_states": hidden}, strict=False)
    else:
        out = functional_call(host, weights, (hidden, *call.args), call.kwargs, strict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


def fold(host: nn.Module, removed: list[nn.Module], inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], calls: list[BlockCall],
         masks: list[torch.Tensor], config: FuseGPTConfig, bar=None) -> dict:
    """Train and merge the coefficients folding ``removed`` into ``host`` so that
    ``host(inputs[b]) ~ targets[b]`` (hidden states (batch, seq, dim)); returns the losses."""
    g = torch.Generator().manual_seed(config.seed)
    folded = FoldedHost(host, [host, *removed], config.rank, g)
    n = len(inputs)
    n_val = min(n - 1, max(1, round(config.validation * n))) if config.validation > 0 and n > 1 else 0
    train, val = list(range(n - n_val)), list(range(n - n_val, n))
    held_out = val or train

    def loss_on(indices: list[int]) -> float:
        with torch.no_grad():
            w = folded.weights()
            return sum(float(distillation_loss(_call_host(host, w, inputs[b], calls[b]), targets[b], masks[b], "mse")) for b in indices) / len(indices)

    flags = [(p, p.requires_grad) for p in host.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        before = loss_on(held_out)
        best, best_state, best_step = before, {k: v.detach().clone() for k, v in folded.state_dict().items()}, 0
        params = list(folded.parameters())
        optim = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / max(config.steps, 1))))
        order: list[int] = []
        every = max(1, config.steps // 8)
        with torch.enable_grad():
            for step in range(1, config.steps + 1):
                if not order:
                    order = [train[i] for i in torch.randperm(len(train), generator=g).tolist()]
                b = order.pop()
                optimizer_step(distillation_loss(_call_host(host, folded.weights(), inputs[b], calls[b]), targets[b], masks[b], "mse"), optim, sched, params)
                if bar is not None:
                    bar.update(1)
                if step % every == 0 or step == config.steps:
                    now = loss_on(held_out)
                    if now < best:
                        best, best_step = now, step
                        best_state = {k: v.detach().clone() for k, v in folded.state_dict().items()}
        folded.load_state_dict(best_state)
        folded.merge()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return {"held_out_loss_removed": before, "held_out_loss_folded": best, "best_step": best_step,
            "held_out_batches": len(val), "coefficients": sum(p.numel() for p in folded.parameters())}


@register_method(FuseGPTConfig)
def apply_fusegpt(loaded, config: FuseGPTConfig, ctx) -> dict:
    adapter = loaded.adapter
    total = adapter.num_layers()
    blocks = list(adapter.blocks())
    if any(not _linears(b) for b in blocks):
        raise ConfigError("fusegpt: the blocks have no float linear layers to fold", "apply fusegpt before quantization or low-rank steps")
    batches = ctx.batches(loaded.tokenizer)
    check_blocks_exist("fusegpt", config.layers, total)
    # The original model's block-0 inputs and how it calls every block (before anything goes),
    # in an activation store (spilled as calibration.offload says); the original's stream, the
    # shortened model's and each span's targets are three such stores, replaced batch by batch.
    teacher, calls = open_block_inputs(loaded, ctx, batches)
    targets = student = None
    bar = None
    try:
        if config.layers:
            removed = sorted(config.layers)
            hosts = assign_hosts(total, removed)
            adapter.drop_blocks(removed)
            selection: dict = {"select": "given"}
        else:
            sleb = apply_sleb(loaded, SLEBConfig(num_layers=config.num_layers, fraction=config.fraction, rescore=config.rescore), ctx)
            removed = sleb["dropped_layers"]
            hosts = assign_hosts(total, removed)
            selection = {"select": "sleb", "removal_order": sleb["removal_order"], "sleb_calibration_loss_after_each": sleb["calibration_loss_after_each"]}
        masks = [b["attention_mask"] for b in batches]
        n = len(batches)
        targets = open_activation_store(loaded, ctx, batches)
        folds: dict[int, dict] = {}
        bar = tqdm(total=config.steps * sum(1 for r in hosts.values() if r), desc="fusegpt", disable=not ctx.progress, unit="step")
        with torch.no_grad():
            for h in sorted(hosts):
                span = sorted([h, *hosts[h]])
                for b in range(n):
                    x = teacher.get(b)
                    for i in span:
                        x = run_block(blocks[i], x, calls[b][i])
                    targets.put(b, x)
                # until a block is removed the student's stream is the original's
                inputs = student if student is not None else teacher
                if hosts[h]:
                    folds[h] = {"folded": hosts[h], **fold(blocks[h], [blocks[r] for r in hosts[h]], inputs, targets,
                                                          [calls[b][h] for b in range(n)], masks, config, bar)}
                    logger.info("fusegpt: blocks %s folded into %d (held-out loss %.4f -> %.4f)", hosts[h], h,
                                folds[h]["held_out_loss_removed"], folds[h]["held_out_loss_folded"])
                if student is not None or hosts[h]:
                    if student is None:
                        student = open_activation_store(loaded, ctx, batches)
                    for b in range(n):
                        student.put(b, run_block(blocks[h], inputs.get(b), calls[b][h]))
                teacher, targets = targets, teacher  # the span's targets are the next span's inputs
    finally:
        if bar is not None:
            bar.close()
        for store in (teacher, targets, student):
            if store is not None:
                store.close()
    return {
        "dropped_layers": sorted(removed),
        **selection,
        "hosts": {str(h): r for h, r in hosts.items() if r},
        "folds": {str(h): f for h, f in folds.items()},
        "rank": config.rank,
        "steps": config.steps,
        "layers_before": total,
        "layers_after": total - len(removed),
    }
