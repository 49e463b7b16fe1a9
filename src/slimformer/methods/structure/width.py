"""Width slimming: remove attention heads and MLP neurons of low calibration importance, shrink
the matrices, and optionally distil the slimmed model from the original.

After COST-EFF (Shen et al., 2022, "COST-EFF: Collaborative Optimization of Spatial and
Temporal Efficiency with Slenderized Multi-exit Language Models"), which slenderizes the width
of every layer (heads and FFN neurons) and recovers accuracy by distillation from the full
model. Importance is the expected squared contribution of a unit to the block's output on the
calibration text:

- MLP neuron ``j``: ``E[a_j^2] * ||W_out[:, j]||^2`` (``a_j``: the neuron's activation entering
  the output projection, ``W_out``: that projection, (hidden, neurons));
- attention head ``h``: ``E[||W_o[:, h] c_h||^2] = sum(W_o[:, h]^T W_o[:, h] * E[c_h c_h^T])``
  (``c_h``: the head's context vector entering the output projection).

Grouped-query attention: query heads share a key/value head, so either whole KV groups are
removed with their query heads (``gqa: groups``, the KV cache shrinks too) or the same number of
query heads is removed inside every group (``gqa: within-groups``). Whole heads are kept, so
rotary position embeddings, applied per head, are untouched. The widths follow a FLOPs target
(``flops_ratio`` of the blocks' FLOPs at ``seq_len`` tokens): heads are kept in the ratio
``head_ratio`` (default: ``flops_ratio``) and the MLP width is solved so that the block meets the
target; or ``mlp_ratio`` sets it directly. The shrunk model computes exactly what the original
computes with the removed heads and neurons masked to zero; distillation then recovers accuracy.

With ``refit``, the output projections of the attention and the MLP are instead refitted by least
squares to what the full-width sub-layer computed on the calibration text (the structured form
of the OBS update used by SparseGPT/ZipLM-style pruning): for the kept input columns ``K`` of a
projection ``W`` (with its bias as a constant input column),
``W_K <- W G[:, K] (G[K, K] + damp I)^-1``, ``G`` the second moments of its inputs (the context
vectors of every head, or every neuron's activation) on the original model. The kept heads and
neurons compute the same inputs as before, so the removed ones' contribution is re-expressed
through their correlation with the kept ones; no gradient step, seconds on a CPU. With
``select: obs`` the heads and neurons themselves are chosen the same way (ZipLM's structured
OBS: greedily remove the unit whose removal, after the re-fit of the others, costs least, and
update the inverse second moments), instead of by their importance alone.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, register_method
from slimformer.methods.calibration import InputStatistics, open_activation_store, open_block_inputs, run_block, run_batches
from slimformer.methods.distill import AUTOCAST_DTYPES, TEACHER_OUTPUTS, TRAINING_ATTENTION, distill, fingerprint_key, load_finished

GQA_MODES = ("within-groups", "groups")
SELECTIONS = ("importance", "obs")
LOSSES = ("auto", "mse", "mse+cos", "cos", "mse+cos+layers", "kl")
ALLOCATIONS = ("uniform", "local-error")


def _ratio(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ConfigError(f"width-slim: {name}={value!r} must be a number in (0, 1]", f"use e.g. {name}: 0.5")


@dataclass
class WidthSlimConfig(MethodConfig):
    """``flops_ratio``: target FLOPs of the blocks (fraction of the original, at ``seq_len``
    tokens); ``block_flops_ratios``: one target per block instead (a list as long as the model
    is deep; 1.0 leaves a block whole); ``allocation: local-error`` chooses those targets itself:
    each block is slimmed alone to every target in ``allocation_levels`` (on the original
    model's inputs, one block at a time: cost linear in depth, memory one block), its output's
    relative squared error measured on the calibration text, and the targets with the least
    summed error whose FLOPs meet ``flops_ratio`` are chosen by dynamic programming;
    ``head_ratio`` / ``mlp_ratio``: fractions of heads / MLP neurons kept (override the
    target); ``gqa``: ``within-groups`` or ``groups``; ``round_to``: MLP widths are multiples of
    it; ``distill_steps`` > 0: distil from the original (``distill_lr``, ``distill_loss``:
    ``auto`` = ``mse`` of hidden states for encoders, ``kl`` of logits for causal LMs;
    ``mse+cos`` adds the cosine distance of mean-pooled embeddings, ``cos`` is that distance alone,
    ``mse+cos+layers`` (encoders)
    every earlier block's output too) on the calibration batches, seeded by ``seed``, resumable
    from ``checkpoint`` (a file path, written every ``checkpoint_every`` steps: a 50 % MiniLM checkpoint, 204 MB, takes ~0.7 s to write);
    ``distill_autocast``: ``float32`` or ``bfloat16`` (the student's training passes under
    bfloat16 autocast, float32 weights: faster where the CPU has bfloat16 units);
    ``distill_embeddings: false`` keeps the input embedding table as loaded (and a head tied to
    it) and trains the rest: no dense gradient and AdamW update of the table each step.
    ``distill_teacher_outputs``: ``auto`` keeps an encoder teacher's final hidden states for the
    whole calibration set when they fit half of the memory still available, ``cache`` always,
    ``recompute`` never (the teacher then runs on each step's batch: the same training, memory
    bounded by a batch; the pre-flight check counts whichever will happen).
    ``distill_attention``: the attention implementation the student trains with: ``auto``
    times SDPA and eager on the first batch's forward and backward and takes the faster (on the
    AMX Xeon eager under bfloat16 autocast: SDPA's CPU backward is slow at small head sizes),
    ``sdpa`` / ``eager`` fix it (bit-for-bit repeatable runs); a resumed run keeps the one it
    started with, and the model is handed back on the attention it came with.
    ``distill_continue_from``: the checkpoint file of a *finished* distillation of this same
    slimming with fewer ``distill_steps`` (every other setting equal, its ``checkpoint`` that
    file); its student, AdamW state and sampler are taken over and trained on to
    ``distill_steps`` along the tail of a cosine over the new total (see ``distill``): a run
    of several sessions, reported as continued."""

    name = "width-slim"
    family = "structure"
    paper = "COST-EFF: Collaborative Optimization of Spatial and Temporal Efficiency with Slenderized Multi-exit Language Models (Shen et al., 2022)"
    summary = "remove low-importance attention heads and MLP neurons (matrices shrunk), optional distillation"
    requires_calibration = True

    flops_ratio: float = 0.5
    block_flops_ratios: tuple[float, ...] | None = None
    allocation: str = "uniform"
    allocation_levels: tuple[float, ...] = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    head_ratio: float | None = None
    mlp_ratio: float | None = None
    gqa: str = "within-groups"
    seq_len: int = 128
    round_to: int = 16
    distill_steps: int = 0
    distill_lr: float = 1e-4
    distill_loss: str = "auto"
    distill_autocast: str = "float32"
    distill_embeddings: bool = True
    seed: int = 0
    checkpoint: str | None = None
    checkpoint_every: int = 200
    distill_continue_from: str | None = None
    distill_teacher_outputs: str = "auto"
    distill_attention: str = "auto"
    refit: bool = False
    refit_damp: float = 0.01
    select: str = "importance"

    def __post_init__(self) -> None:
        _ratio("flops_ratio", self.flops_ratio, allow_none=False)
        if self.block_flops_ratios is not None:
            if isinstance(self.block_flops_ratios, (str, bytes)) or not hasattr(self.block_flops_ratios, "__iter__"):
                raise ConfigError(f"width-slim: block_flops_ratios={self.block_flops_ratios!r} must be a list of numbers", "use e.g. block_flops_ratios: [0.75, 0.5, 0.25]")
            self.block_flops_ratios = tuple(self.block_flops_ratios)
            for r in self.block_flops_ratios:
                _ratio("block_flops_ratios", r, allow_none=False)
        _ratio("head_ratio", self.head_ratio)
        _ratio("mlp_ratio", self.mlp_ratio)
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"width-slim: allocation={self.allocation!r} is not one of {list(ALLOCATIONS)}", "use allocation: uniform or allocation: local-error")
        if isinstance(self.allocation_levels, (str, bytes)) or not hasattr(self.allocation_levels, "__iter__") or not self.allocation_levels:
            raise ConfigError(f"width-slim: allocation_levels={self.allocation_levels!r} must be a list of numbers", "use e.g. allocation_levels: [0.25, 0.5, 0.75, 1.0]")
        for r in self.allocation_levels:
            _ratio("allocation_levels", r, allow_none=False)
        self.allocation_levels = tuple(sorted(set(self.allocation_levels)))
        if self.allocation != "uniform" and (self.block_flops_ratios is not None or self.mlp_ratio is not None):
            raise ConfigError("width-slim: allocation chooses the per-block targets itself", "leave out block_flops_ratios and mlp_ratio, or use allocation: uniform")
        if self.allocation != "uniform" and min(self.allocation_levels) > self.flops_ratio:
            raise ConfigError(f"width-slim: no allocation level is at or below flops_ratio={self.flops_ratio}", "add lower allocation_levels")
        if self.gqa not in GQA_MODES:
            raise ConfigError(f"width-slim: gqa={self.gqa!r} is not one of {list(GQA_MODES)}", "use gqa: within-groups or gqa: groups")
        if self.distill_loss not in LOSSES:
            raise ConfigError(f"width-slim: distill_loss={self.distill_loss!r} is not one of {list(LOSSES)}", "use distill_loss: auto")
        for name in ("seq_len", "round_to", "checkpoint_every"):
            if not is_int_at_least(getattr(self, name), 1):
                raise ConfigError(f"width-slim: {name}={getattr(self, name)!r} must be a positive integer", f"use e.g. {name}: 16")
        if not is_int_at_least(self.distill_steps, 0):
            raise ConfigError(f"width-slim: distill_steps={self.distill_steps!r} must be a non-negative integer", "use e.g. distill_steps: 200")
        if isinstance(self.distill_lr, bool) or not isinstance(self.distill_lr, (int, float)) or not self.distill_lr > 0:
            raise ConfigError(f"width-slim: distill_lr={self.distill_lr!r} must be a positive number", "use e.g. distill_lr: 1e-4")
        if self.distill_autocast not in AUTOCAST_DTYPES:
            raise ConfigError(f"width-slim: distill_autocast={self.distill_autocast!r} is not one of {list(AUTOCAST_DTYPES)}", "use distill_autocast: bfloat16")
        if self.distill_teacher_outputs not in TEACHER_OUTPUTS:
            raise ConfigError(f"width-slim: distill_teacher_outputs={self.distill_teacher_outputs!r} is not one of {list(TEACHER_OUTPUTS)}",
                              "use distill_teacher_outputs: auto (cache only what fits), cache or recompute")
        if self.distill_attention not in ("auto", *TRAINING_ATTENTION):
            raise ConfigError(f"width-slim: distill_attention={self.distill_attention!r} is not one of {['auto', *TRAINING_ATTENTION]}",
                              "use distill_attention: auto (the faster, measured), sdpa or eager")
        if not isinstance(self.distill_embeddings, bool):
            raise ConfigError(f"width-slim: distill_embeddings={self.distill_embeddings!r} must be true or false", "use distill_embeddings: false")
        if self.distill_continue_from is not None:
            if not isinstance(self.distill_continue_from, str) or not self.distill_continue_from:
                raise ConfigError(f"width-slim: distill_continue_from={self.distill_continue_from!r} must be a file path", "use e.g. distill_continue_from: /tmp/run-8000.ckpt")
            if self.distill_steps == 0:
                raise ConfigError("width-slim: distill_continue_from needs distill_steps > 0", "set distill_steps above the finished run's")
            if self.checkpoint is not None and os.path.abspath(self.checkpoint) == os.path.abspath(self.distill_continue_from):
                raise ConfigError("width-slim: checkpoint and distill_continue_from are the same file", "write the continued run's checkpoint to a new path")
        if self.select not in SELECTIONS:
            raise ConfigError(f"width-slim: select={self.select!r} is not one of {list(SELECTIONS)}", "use select: importance or select: obs")
        if not isinstance(self.refit, bool):
            raise ConfigError(f"width-slim: refit={self.refit!r} must be true or false", "use refit: true")
        if isinstance(self.refit_damp, bool) or not isinstance(self.refit_damp, (int, float)) or not self.refit_damp > 0:
            raise ConfigError(f"width-slim: refit_damp={self.refit_damp!r} must be a positive number", "use e.g. refit_damp: 0.01")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"width-slim: seed={self.seed!r} must be an integer", "use e.g. seed: 0")


def _fingerprint(config: WidthSlimConfig, adapter, **changes) -> dict:
    """What a distillation checkpoint of this slimming must match (``changes``: settings of
    the run it would have been written by). A run that continues none leaves the key out, so
    checkpoints written before the key existed still resume; whether the teacher's outputs are
    cached does not change the training, so it is left out as well, and so is the attention
    (a resumed run keeps the one its checkpoint names)."""
    settings = config.to_dict() | changes
    settings.pop("distill_teacher_outputs", None)
    settings.pop("distill_attention", None)
    if settings.get("distill_continue_from") is None:
        settings.pop("distill_continue_from", None)
    return {"config": settings, "structure": adapter.structure_record()}


def _same_run(config: WidthSlimConfig, adapter, state: dict) -> dict:
    """``state``, the finished checkpoint ``distill_continue_from`` names, checked to be this slimming's."""
    expected = fingerprint_key(_fingerprint(config, adapter, distill_steps=int(state["steps"]), checkpoint=config.distill_continue_from, distill_continue_from=None))
    if state.get("fingerprint") != expected:
        raise ConfigError(f"width-slim: {config.distill_continue_from!r} was written by a different slimming or distillation",
                          "continue only a run whose settings other than distill_steps are these (its checkpoint: that file)")
    return state


def block_flops_per_token(hidden: int, head_dim: int, n_q: int, n_kv: int, mlp_inputs: int, width: int, seq_len: int) -> int:
    """FLOPs per token of one block: q/k/v/o projections, the two attention products at
    ``seq_len`` keys, and the MLP (``mlp_inputs`` input projections of ``width`` neurons)."""
    attention = 2 * hidden * head_dim * (n_q + 2 * n_kv) + 2 * n_q * head_dim * hidden + 4 * seq_len * n_q * head_dim
    return attention + 2 * hidden * width * mlp_inputs + 2 * width * hidden


def head_importance(out_proj: torch.nn.Linear, hessian: torch.Tensor, count: int, n_heads: int, head_dim: int) -> torch.Tensor:
    """Expected squared output norm of each head (n_heads,) from the output projection
    (hidden, n_heads * head_dim) and the Gram matrix of its inputs (in, in) over ``count`` tokens."""
    w = out_proj.weight.detach().float()
    scores = []
    for h in range(n_heads):
        s = slice(h * head_dim, (h + 1) * head_dim)
        scores.append(float((w[:, s].t() @ w[:, s] * hessian[s, s]).sum()) / max(count, 1))
    return torch.tensor(scores)


def choose_heads(scores: torch.Tensor, n_kv: int, ratio: float, mode: str) -> tuple[list[int], list[int]]:
    """Kept ``(query heads, kv heads)`` from per-query-head scores (n_q,)."""
    n_q = scores.numel()
    group = n_q // n_kv
    if group == 1 or mode == "groups":
        group_scores = scores.view(n_kv, group).sum(1)
        keep = max(1, int(round(ratio * n_kv)))
        kv = sorted(group_scores.topk(keep).indices.tolist())
        return [g * group + j for g in kv for j in range(group)], kv
    per = max(1, int(round(ratio * group)))
    q = []
    for g in range(n_kv):
        top = scores[g * group : (g + 1) * group].topk(per).indices
        q.extend(sorted((g * group + top).tolist()))
    return q, list(range(n_kv))


def obs_removal(weight: torch.Tensor, gram: torch.Tensor, groups: list[list[int]], n_remove: int, damp: float,
                allowed=None) -> list[int]:
    """Structured OBS (ZipLM-style): which ``n_remove`` of ``groups`` (lists of input columns of
    the projection ``weight`` (out, in)) to remove, greedily, each step removing the group whose
    removal raises ``E||W x - W' x||^2`` least once the remaining columns are re-fitted
    (cost ``tr(W_S [H^-1]_SS^-1 W_S^T)``), then updating the weight and the inverse of the
    damped second-moment matrix ``gram`` (in, in) for the removal. ``allowed(removed, g)``: may
    group ``g`` go after the groups ``removed`` (e.g. grouped-query limits)? Returns the
    removed group indices in removal order."""
    w = weight.detach().double().clone()
    h = gram.to(torch.float64, copy=True)
    h.diagonal().add_(damp * h.diagonal().mean())  # damped in place: no second (in, in) matrix
    hinv = torch.linalg.inv(h)
    del h  # the inverse is all the loop needs
    removed: list[int] = []
    if allowed is None and all(len(g) == 1 for g in groups):  # single columns: vectorised
        cols = torch.tensor([g[0] for g in groups])
        gone = torch.zeros(len(groups), dtype=torch.bool)
        for _ in range(n_remove):
            cost = (w[:, cols] ** 2).sum(0) / hinv.diagonal()[cols]
            best = int(cost.masked_fill(gone, float("inf")).argmin())
            j = int(cols[best])
            row = hinv[j] / hinv[j, j]
            w = w - w[:, j : j + 1] * row
            hinv = hinv - hinv[:, j : j + 1] * row
            gone[best] = True
            removed.append(best)
        return removed
    alive = set(range(len(groups)))
    for _ in range(n_remove):
        best, best_cost = None, None
        for g in sorted(alive):
            if allowed is not None and not allowed(removed, g):
                continue
            idx = groups[g]
            block = hinv[idx][:, idx]
            ws = w[:, idx]
            cost = float((ws @ torch.linalg.solve(block, ws.t())).diagonal().sum()) if len(idx) > 1 else float((ws[:, 0] ** 2).sum() / block[0, 0])
            if best_cost is None or cost < best_cost:
                best, best_cost = g, cost
        if best is None:
            break
        idx = groups[best]
        block_inv = torch.linalg.inv(hinv[idx][:, idx])
        w = w - w[:, idx] @ block_inv @ hinv[idx]
        hinv = hinv - hinv[:, idx] @ block_inv @ hinv[idx]
        removed.append(best)
        alive.discard(best)
    return removed


def obs_heads(out_proj: torch.nn.Linear, gram: torch.Tensor, n_kv: int, head_dim: int, ratio: float, mode: str, damp: float) -> tuple[list[int], list[int]]:
    """Kept ``(query heads, kv heads)`` chosen by structured OBS on the output projection (the
    same counts as :func:`choose_heads`)."""
    n_q = out_proj.in_features // head_dim
    group = n_q // n_kv
    cols = lambda heads: [c for h in heads for c in range(h * head_dim, (h + 1) * head_dim)]  # noqa: E731
    if group == 1 or mode == "groups":
        keep = max(1, int(round(ratio * n_kv)))
        units = [cols(range(g * group, (g + 1) * group)) for g in range(n_kv)]
        gone = set(obs_removal(out_proj.weight, gram, units, n_kv - keep, damp))
        kv = [g for g in range(n_kv) if g not in gone]
        return [g * group + j for g in kv for j in range(group)], kv
    per = max(1, int(round(ratio * group)))
    units = [cols([h]) for h in range(n_q)]
    allowed = lambda removed, h: sum(1 for r in removed if r // group == h // group) < group - per  # noqa: E731
    gone = set(obs_removal(out_proj.weight, gram, units, n_q - n_kv * per, damp, allowed))
    return [h for h in range(n_q) if h not in gone], list(range(n_kv))


def refit_projection(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, input_sum: torch.Tensor, count: int,
                     keep: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares output projection on the kept input columns ``keep`` (k,).

    ``weight`` (out, in), ``bias`` (out,) or None; ``gram`` = sum x x^T (in, in), ``input_sum`` =
    sum x (in,) over ``count`` tokens. Returns ``(weight (out, k), bias)`` minimising
    ``E || W x + b - W' x_K - b' ||^2`` (the bias as a constant input; with no bias, none is
    added), with ``damp`` times the mean diagonal added to the kept block."""
    w = weight.detach().double()
    g = gram.double() / max(count, 1)
    if bias is not None:
        mean = input_sum.double() / max(count, 1)
        n = g.shape[0]
        g = torch.cat([torch.cat([g, mean[:, None]], 1), torch.cat([mean, torch.ones(1, dtype=g.dtype)])[None]], 0)
        w = torch.cat([w, bias.detach().double()[:, None]], 1)
        keep = torch.cat([keep, torch.tensor([n])])
    gkk = g[keep][:, keep]
    gkk = gkk + damp * gkk.diagonal().mean() * torch.eye(len(keep), dtype=g.dtype)
    new = torch.linalg.solve(gkk, (w @ g[:, keep]).t()).t()  # (out, k[+1]); G_KK symmetric
    if bias is None:
        return new.to(weight.dtype), None
    return new[:, :-1].to(weight.dtype), new[:, -1].to(bias.dtype)


def allocate_flops(errors: dict[int, dict[float, float]], costs: dict[int, dict[float, tuple[int, int]]], ratio: float,
                   resolution: int = 2000) -> dict[int, float]:
    """Per-block FLOPs targets with the least summed error whose FLOPs stay within ``ratio`` of
    the blocks' total: ``errors[i][r]`` is block ``i``'s error at target ``r``, ``costs[i][r]``
    its FLOPs per token ``(before, after)``. Dynamic programming over blocks on the FLOPs
    budget, counted in ``resolution`` steps of the total (rounded up, so the budget holds)."""
    total = sum(next(iter(c.values()))[0] for c in costs.values())
    budget = int(ratio * resolution + 1e-9)
    best: dict[int, tuple[float, list[float]]] = {0: (0.0, [])}  # used steps -> (error, choices)
    for i in sorted(errors):
        nxt: dict[int, tuple[float, list[float]]] = {}
        for used, (err, picks) in best.items():
            for r, e in errors[i].items():
                step = -(-costs[i][r][1] * resolution // total)
                u = used + step
                if u <= budget and (u not in nxt or err + e < nxt[u][0]):
                    nxt[u] = (err + e, picks + [r])
        if not nxt:
            raise ConfigError(f"width-slim: no choice of allocation levels meets flops_ratio={ratio}", "add lower allocation_levels")
        best = nxt
    _, picks = min(best.values(), key=lambda t: t[0])
    return dict(zip(sorted(errors), picks))


@register_method(WidthSlimConfig)
def apply_width_slim(loaded, config: WidthSlimConfig, ctx) -> dict:
    adapter = loaded.adapter
    model = loaded.model
    hidden = model.config.hidden_size
    hd = adapter.head_dim()
    batches = ctx.batches(loaded.tokenizer)
    names = adapter.qualified_names()
    blocks = [i for i in range(adapter.num_layers()) if not (adapter.sublayer_removed(i, "attention") or adapter.sublayer_removed(i, "mlp"))]
    if len(blocks) != adapter.num_layers():
        raise ConfigError("width-slim: some blocks have a removed sub-layer", "apply width-slim before sub-layer removal")
    if config.distill_steps > 0 and config.distill_loss == "mse+cos+layers" and loaded.kind == "causal-lm":
        raise ConfigError("width-slim: distill_loss mse+cos+layers is for encoders", "use distill_loss: auto (kl) for a causal language model")
    if config.block_flops_ratios is not None and len(config.block_flops_ratios) != adapter.num_layers():
        raise ConfigError(f"width-slim: block_flops_ratios has {len(config.block_flops_ratios)} entries for {adapter.num_layers()} blocks",
                          f"give one ratio per block ({adapter.num_layers()})")
    attn_out = {i: adapter.attention_linears(adapter.attention(i))[1] for i in blocks}
    mlp_out = {i: adapter.mlp_linears(i)[1] for i in blocks}
    for module in list(attn_out.values()) + list(mlp_out.values()) + [m for i in blocks for m in adapter.mlp_linears(i)[0]]:
        if not isinstance(module, torch.nn.Linear):
            raise ConfigError(f"width-slim: {names[id(module)]} is not a float linear layer", "apply width-slim before quantization or low-rank steps")
    # a missing or unfinished run to continue fails before minutes of slimming
    finished = load_finished(config.distill_continue_from) if config.distill_continue_from else None
    teacher = copy.deepcopy(model) if config.distill_steps > 0 else None
    target = {i: config.block_flops_ratios[i] if config.block_flops_ratios is not None else config.flops_ratio for i in blocks}
    # OBS choice and refit read the second moments of the projections' inputs: taken block by block
    # on the model slimmed so far (one pass through depth, as GPTQ does), so each block is fitted
    # to the inputs it will see; importance alone reads them once from the original model.
    sequential = config.refit or config.select == "obs"
    flops = {"before": 0, "after": 0}
    plan: dict[int, dict] = {}

    def plan_block(i: int, stats_h: InputStatistics, stats_n: InputStatistics, ratio: float,
                   removal_orders: dict[int, list[int]] | None = None) -> tuple[dict, int, int]:
        """Which heads and neurons block ``i`` keeps at FLOPs target ``ratio``; with the block's
        FLOPs per token before and after. ``removal_orders``: block -> OBS neuron removal order
        already computed on the same statistics; greedy removal of n neurons is the first n of a
        longer removal, so one pass at the deepest level serves every shallower one."""
        n_q, n_kv = adapter.attention_heads(i)
        ins, out = adapter.mlp_linears(i)
        width = out.in_features
        full = block_flops_per_token(hidden, hd, n_q, n_kv, len(ins), width, config.seq_len)
        name = names[id(attn_out[i])]
        head_ratio = config.head_ratio if config.head_ratio is not None else ratio
        if ratio == 1.0 and config.head_ratio is None and config.mlp_ratio is None:  # left whole
            return {"query_heads": list(range(n_q)), "kv_heads": list(range(n_kv)), "mlp_neurons": list(range(width)), "whole": True}, full, full
        if config.select == "obs":
            q_keep, kv_keep = obs_heads(attn_out[i], stats_h.hessian[name], n_kv, hd, head_ratio, config.gqa, config.refit_damp)
        else:
            scores = head_importance(attn_out[i], stats_h.hessian[name], stats_h.count[name], n_q, hd)
            q_keep, kv_keep = choose_heads(scores, n_kv, head_ratio, config.gqa)
        attn_only = block_flops_per_token(hidden, hd, len(q_keep), len(kv_keep), len(ins), 0, config.seq_len)
        if config.mlp_ratio is not None:
            new_width = config.mlp_ratio * width
        else:
            new_width = (ratio * full - attn_only) / (2 * hidden * (len(ins) + 1))
        new_width = int(min(width, max(config.round_to, config.round_to * round(new_width / config.round_to))))
        on = names[id(out)]
        if config.select == "obs":
            n_remove = width - new_width
            order = removal_orders.get(i) if removal_orders is not None else None
            if order is None or len(order) < n_remove:
                order = obs_removal(out.weight, stats_n.hessian[on], [[j] for j in range(width)], n_remove, config.refit_damp)
                if removal_orders is not None:
                    removal_orders[i] = order
            gone = set(order[:n_remove])
            keep = [j for j in range(width) if j not in gone]
        else:
            neuron = stats_n.sq_norm[on] / max(stats_n.count[on], 1) * out.weight.detach().float().pow(2).sum(0)
            keep = sorted(neuron.topk(new_width).indices.tolist())
        after = block_flops_per_token(hidden, hd, len(q_keep), len(kv_keep), len(ins), new_width, config.seq_len)
        return {"query_heads": q_keep, "kv_heads": kv_keep, "mlp_neurons": keep}, full, after

    def slim_block(i: int, p: dict, stats_h: InputStatistics, stats_n: InputStatistics) -> None:
        if p.get("whole"):
            return
        refitted = {}
        if config.refit:
            cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in p["query_heads"]])
            for kind, lin, stats, keep in (("attention", attn_out[i], stats_h, cols), ("mlp", mlp_out[i], stats_n, torch.as_tensor(p["mlp_neurons"]))):
                n = names[id(lin)]
                refitted[kind] = refit_projection(lin.weight, lin.bias, stats.hessian[n], stats.sum[n], stats.count[n], keep, config.refit_damp)
        adapter.keep_heads(i, p["query_heads"], p["kv_heads"])
        adapter.keep_neurons(i, p["mlp_neurons"])
        for kind, (w, b) in refitted.items():
            lin = adapter.attention_linears(adapter.attention(i))[1] if kind == "attention" else adapter.mlp_linears(i)[1]
            with torch.no_grad():
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)

    def statistics(selected: list[int]) -> tuple[InputStatistics, InputStatistics]:
        return (InputStatistics({names[id(attn_out[i])]: attn_out[i] for i in selected}, hessian=True),
                InputStatistics({names[id(mlp_out[i])]: mlp_out[i] for i in selected}, hessian=sequential))

    def block_statistics(i: int, block, states, calls, sink=None) -> tuple[InputStatistics, InputStatistics]:
        """Block ``i``'s projection-input statistics over the calibration ``states`` (an iterable
        of one (batch, seq, hidden) tensor per batch); ``sink(b, output)`` receives its outputs."""
        stats_h, stats_n = statistics([i])
        with stats_h, stats_n, torch.no_grad():
            for b, x in enumerate(states):
                stats_h.set_batch(batches[b])
                stats_n.set_batch(batches[b])
                y = run_block(block, x, calls[b][i])
                if sink is not None:
                    sink(b, y)
        return stats_h, stats_n

    def local_errors() -> tuple[dict, dict]:
        """Every block slimmed alone to every allocation level, on the original model's inputs:
        the relative squared error of its output over real tokens, and its FLOPs. The original
        stream's inputs and outputs of the current block are two activation stores (spilled as
        ``calibration.offload`` says) that swap roles block by block."""
        modules = adapter.blocks()
        originals = list(modules)
        n = len(batches)
        inputs, calls = open_block_inputs(loaded, ctx, batches)
        errors: dict[int, dict[float, float]] = {}
        costs: dict[int, dict[float, tuple[int, int]]] = {}
        masks = [b["attention_mask"].bool() if "attention_mask" in b else None for b in batches]
        real = lambda t, b: t[masks[b]] if masks[b] is not None else t  # noqa: E731
        removal_orders: dict[int, list[int]] = {}  # levels ascend: the first level's OBS pass is the longest
        try:
            outputs = open_activation_store(loaded, ctx, batches)
            try:
                for i in blocks:
                    stats_h, stats_n = block_statistics(i, originals[i], (inputs.get(b) for b in range(n)), calls, sink=outputs.put)
                    norm = sum(float(real(outputs.get(b), b).float().pow(2).sum()) for b in range(n))
                    errors[i], costs[i] = {}, {}
                    for r in config.allocation_levels:
                        p, full, after = plan_block(i, stats_h, stats_n, r, removal_orders)
                        costs[i][r] = (full, after)
                        if p.get("whole"):
                            errors[i][r] = 0.0
                            continue
                        modules[i] = copy.deepcopy(originals[i])  # a trial copy of one block
                        try:
                            slim_block(i, p, stats_h, stats_n)
                            with torch.no_grad():
                                e = sum(float(real(run_block(modules[i], inputs.get(b), calls[b][i]) - outputs.get(b), b).float().pow(2).sum()) for b in range(n))
                        finally:
                            modules[i] = originals[i]
                        errors[i][r] = e / max(norm, 1e-30)
                    inputs, outputs = outputs, inputs  # this block's outputs are the next one's inputs
            finally:
                outputs.close()
        finally:
            inputs.close()
        return errors, costs

    allocation = None
    if config.allocation == "local-error":
        errors, costs = local_errors()
        target = allocate_flops(errors, costs, config.flops_ratio)
        total = sum(next(iter(costs[i].values()))[0] for i in blocks)  # every level's "before" is the block's full FLOPs
        allocation = {"levels": list(config.allocation_levels), "errors": {str(i): {str(r): e for r, e in errs.items()} for i, errs in errors.items()},
                      "flops_share": {str(i): {str(r): after / total for r, (_, after) in c.items()} for i, c in costs.items()},
                      "chosen": [target[i] for i in blocks]}

    def planned(i: int, stats_h: InputStatistics, stats_n: InputStatistics) -> dict:
        p, full, after = plan_block(i, stats_h, stats_n, target[i])
        flops["before"] += full
        flops["after"] += after
        return p

    if not sequential:
        stats_h, stats_n = statistics(blocks)
        with stats_h, stats_n:
            run_batches(model, batches, on_batch=lambda b: (stats_h.set_batch(b), stats_n.set_batch(b)))
        for i in blocks:
            plan[i] = planned(i, stats_h, stats_n)
        for i, p in plan.items():
            slim_block(i, p, stats_h, stats_n)
    else:
        # one set of calibration activations, replaced batch by batch as the stream moves through
        # depth: in memory, or spilled to disk as calibration.offload says; closed (freed) before
        # any distillation
        modules = list(adapter.blocks())
        store, calls = open_block_inputs(loaded, ctx, batches)
        try:
            for i in blocks:
                stats_h, stats_n = block_statistics(i, modules[i], (store.get(b) for b in range(len(batches))), calls)
                plan[i] = planned(i, stats_h, stats_n)
                slim_block(i, plan[i], stats_h, stats_n)
                with torch.no_grad():
                    for b in range(len(batches)):
                        store.put(b, run_block(modules[i], store.get(b), calls[b][i]))
        finally:
            store.close()
        del calls
    before, after = flops["before"], flops["after"]
    record = {
        "heads": {str(i): [len(p["query_heads"]), len(p["kv_heads"])] for i, p in plan.items()},
        "mlp_widths": {str(i): len(p["mlp_neurons"]) for i, p in plan.items()},
        "kept": {str(i): p for i, p in plan.items()},
        "block_flops_ratio": after / before if before else None,
        "refit": config.refit,
        "select": config.select,
        "statistics": "block by block, on the model slimmed so far" if sequential else "one pass of the original model",
    }
    if allocation is not None:
        record["allocation"] = allocation
    if teacher is not None:
        loss = config.distill_loss if config.distill_loss != "auto" else ("kl" if loaded.kind == "causal-lm" else "mse")
        start_from = _same_run(config, adapter, finished) if finished is not None else None
        record["distillation"] = distill(
            model, teacher, batches, causal=loaded.kind == "causal-lm", steps=config.distill_steps, lr=config.distill_lr, loss=loss,
            seed=config.seed, checkpoint=config.checkpoint, checkpoint_every=config.checkpoint_every, fingerprint=_fingerprint(config, adapter),
            progress=ctx.progress, autocast=config.distill_autocast, train_embeddings=config.distill_embeddings, start_from=start_from,
            teacher_outputs=config.distill_teacher_outputs, attention=config.distill_attention,
        )
        if start_from is not None:
            record["distillation"]["continued_from"] = config.distill_continue_from
        del teacher
    return record
