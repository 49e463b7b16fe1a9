"""Short knowledge distillation of a slimmed model from its original, on calibration text.

Used by width slimming (COST-EFF's recovery step, shortened to CPU minutes) and by scale tuning
(PV-Tuning's P step: only the group scales and norms of a quantized model train). The student is the
slimmed model, the teacher the model before slimming; the loss is the relative squared error of
the final hidden states over valid tokens (encoders, ``mse``) or the KL divergence of the
next-token distributions (causal LMs, ``kl``); for embedding models ``mse+cos`` adds the cosine
distance of the mean-pooled sentence embeddings (``cos``: that distance alone), and
``mse+cos+layers`` adds the mean relative squared error of every earlier block's output as well
(layer-wise distillation, as in TinyBERT and CoFi: width slimming keeps the hidden size, so the
student's blocks can be matched to the teacher's one for one; the teacher's hidden states are
recomputed each step, not cached). AdamW with a cosine-decayed learning rate, batches drawn in a
seeded order; progress on a tqdm bar. ``autocast="bfloat16"`` runs the student's training
forward and backward under ``torch.autocast`` (bfloat16 matrix products; float32 weights,
optimizer state and loss); the losses before and after are measured in float32 either way. The
student trains in the mode it comes in (a loaded model is in eval mode: no dropout), with fused
AdamW, and on the attention implementation that ran its training pass fastest here
(``attention="auto"``: SDPA and eager timed on the first batch). On the AMX Xeon here
(``benchmarks/results/distill_step.md``), one MiniLM step at 50 % width (batch 16 x 128, eval
mode) took 396 ms in float32 with SDPA and the for-loop AdamW (how it ran before), 352 ms with
fused AdamW, 333 ms under bf16 autocast with SDPA, and 205 ms under bf16 autocast with eager
attention (1.93x): SDPA's CPU backward at head size 32 costs more than the whole eager
attention, and autocast only pays off once it is gone; freezing the embedding table (its dense
gradient and AdamW update) saves 13 ms more. Measure before relying on it. An encoder teacher's final hidden states are computed once and kept (calibration tokens x
hidden x its element size: 4.5 GB for MiniLM's 26312 windows, 2.9 M padded tokens) only where they fit
(``teacher_outputs: auto``: within half of the memory the process can still allocate when the
distillation starts); otherwise, or with ``recompute``, the teacher runs on each step's batch (one more
forward per step; the same numbers, so the same training), and memory stays bounded by a batch.
A checkpoint file (student weights, optimizer
state, step, sampler state) is written every ``checkpoint_every`` steps and a run with the same
checkpoint path resumes from it. A *finished* shorter run can be continued to more steps
(``start_from``, the loaded state of its checkpoint): its weights, AdamW moments and sampler
state are taken over and the learning rate follows the remaining part of a cosine over the new
total, restarting at ``lr * (1 + cos(pi * s0 / steps)) / 2`` at the old length ``s0`` (16000 of
20000 steps: 9.5 % of the peak). This is not the same run as one planned for the longer length
from the start (whose schedule decays more slowly); reports say it was continued.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimformer.errors import ConfigError
from slimformer.methods.calibration import hidden_state_bytes
from slimformer.methods.memory import available_memory_bytes
from slimformer.models.adapters import attention_implementation, set_attention
from slimformer.timing import interleaved_medians

log = logging.getLogger(__name__)


def optimizer_step(loss: torch.Tensor, optim, sched, params, max_norm: float = 1.0) -> float:
    """One clipped optimiser step on ``loss``; returns the loss value."""
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optim.step()
    sched.step()
    return float(loss.detach())


def save_checkpoint(path: Path, state: dict) -> None:
    """Write a training checkpoint atomically (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp)
    os.replace(tmp, path)


LAYER_LOSSES = ("mse+cos+layers",)


def _outputs(model, batch: dict, causal: bool, layers: bool = False) -> torch.Tensor:
    """Logits (causal), the final hidden states (batch, seq, dim), or with ``layers`` every
    block's output stacked (blocks, batch, seq, dim), the last being the final hidden states."""
    if causal:
        return model(**batch, use_cache=False).logits
    if layers:
        return torch.stack(model(**batch, output_hidden_states=True).hidden_states[1:])
    return model(**batch).last_hidden_state


def distillation_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, mask: torch.Tensor, loss: str) -> torch.Tensor:
    """Loss over valid tokens ``mask`` (batch, seq): ``mse`` (relative squared error of hidden
    states (batch, seq, dim)), ``mse+cos`` (that plus ``1 - cos`` of the mean-pooled sentence
    embeddings, the quantity an embedding model is judged by), ``cos`` (that distance alone),
    ``mse+cos+layers`` (outputs (blocks, batch, seq, dim): ``mse+cos`` of the last plus the mean
    relative squared error of the others) or ``kl`` (KL(teacher || student) per token of logits
    (batch, seq, vocab))."""
    if loss in LAYER_LOSSES:
        final = distillation_loss(student_out[-1], teacher_out[-1], mask, "mse+cos")
        if student_out.shape[0] == 1:
            return final
        inner = torch.stack([distillation_loss(s_l, t_l, mask, "mse") for s_l, t_l in zip(student_out[:-1], teacher_out[:-1])])
        return final + inner.mean()
    if loss in ("mse", "mse+cos", "cos"):
        value = student_out.new_zeros((), dtype=torch.float32)
        if loss != "cos":
            valid = mask.bool()
            s, t = student_out[valid].float(), teacher_out[valid].float()
            value = ((s - t) ** 2).sum() / (t**2).sum().clamp(min=1e-12)
        if loss != "mse":
            m = mask.unsqueeze(-1).float()
            ps = (student_out.float() * m).sum(1) / m.sum(1).clamp(min=1)
            pt = (teacher_out.float() * m).sum(1) / m.sum(1).clamp(min=1)
            value = value + (1 - F.cosine_similarity(ps, pt, dim=-1)).mean()
        return value
    s = student_out[mask.bool()].float()
    t = teacher_out[mask.bool()].float()
    log_t = F.log_softmax(t, dim=-1)
    return F.kl_div(F.log_softmax(s, dim=-1), log_t, log_target=True, reduction="batchmean")


@torch.no_grad()
def calibration_loss(student, teacher_outputs, batches: list[dict], causal: bool, loss: str) -> float:
    total = 0.0
    for batch, target in zip(batches, teacher_outputs):
        total += float(distillation_loss(_outputs(student, batch, causal, loss in LAYER_LOSSES), target(), batch["attention_mask"], loss))
    return total / max(len(batches), 1)


AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def training_autocast(low: torch.dtype | None):
    """``torch.autocast`` on the CPU to ``low`` (a value of ``AUTOCAST_DTYPES``; None: off)."""
    return torch.autocast("cpu", dtype=low or torch.bfloat16, enabled=low is not None)


def cosine_factor(step: int, steps: int) -> float:
    """The learning-rate factor of a cosine decay to 0 over ``steps`` at ``step``."""
    return 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def fingerprint_key(fingerprint: dict | None) -> str:
    """The short hash a checkpoint stores to tell its own run from another."""
    return hashlib.sha256(json.dumps(fingerprint or {}, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_finished(path: str | Path) -> dict:
    """The state of a finished distillation checkpoint (to continue with ``start_from``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"distillation checkpoint to continue from {str(path)!r} does not exist", "give the checkpoint file of a finished run")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "steps" not in state or state.get("step") != state.get("steps"):
        raise ConfigError(f"distillation checkpoint {str(path)!r} is not a finished run (step {state.get('step') if isinstance(state, dict) else '?'} "
                          f"of {state.get('steps') if isinstance(state, dict) else '?'})", "let that run finish first, or resume it with its own steps")
    return state


TRAINING_ATTENTION = ("sdpa", "eager")


def fastest_training_attention(student, batch: dict, causal: bool, layers: bool, low, rounds: int = 3) -> str | None:
    """The faster of ``TRAINING_ATTENTION`` for ``student``'s training pass (forward and backward
    of ``batch`` under the run's autocast ``low``, with the parameters it trains requiring
    gradients), measured here in ``rounds`` interleaved rounds; the student is left on it. None,
    changing nothing, where the model runs another attention or cannot switch. The gradients the
    timing leaves are cleared."""
    before = attention_implementation(student)
    if before not in TRAINING_ATTENTION or not hasattr(student, "set_attn_implementation"):
        return None
    candidates = [name for name in TRAINING_ATTENTION if set_attention(student, name)]
    student.set_attn_implementation(before)
    if len(candidates) < 2:
        return before

    def pass_():
        with torch.enable_grad(), training_autocast(low):
            out = _outputs(student, batch, causal, layers)
        out.float().square().mean().backward()  # a stand-in loss: the cost is the two passes

    times = interleaved_medians({name: pass_ for name in candidates}, rounds,
                                setup={name: (lambda n=name: student.set_attn_implementation(n)) for name in candidates}, steady=False)
    for p in student.parameters():
        p.grad = None
    best = min(times, key=times.get)
    student.set_attn_implementation(best)
    log.info("distillation attention: %s (%s)", best, ", ".join(f"{n} {t * 1e3:.0f} ms" for n, t in times.items()))
    return best


def adamw(params: list, lr: float = 1e-3) -> torch.optim.Optimizer:
    """AdamW without weight decay over ``params`` (tensors or parameter groups), fused where this
    torch and device allow it (one kernel over all parameters: MiniLM's update at 50 % width, in
    the profiler, 10 ms a step instead of the for-loop version's 74)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


TEACHER_OUTPUTS = ("auto", "cache", "recompute")


def caches_teacher_outputs(mode: str, need: int) -> bool:
    """Whether ``need`` bytes of an encoder teacher's outputs (one hidden-state set over the
    calibration batches, :func:`~slimformer.methods.calibration.hidden_state_bytes`) are cached
    under ``mode`` (``auto``: when they fit half of the memory this process can still allocate)."""
    if mode not in TEACHER_OUTPUTS:
        raise ConfigError(f"distillation teacher_outputs {mode!r} is not one of {list(TEACHER_OUTPUTS)}", "use auto, cache or recompute")
    if mode != "auto":
        return mode == "cache"
    return need <= available_memory_bytes() // 2


def distill(student, teacher, batches: list[dict], *, causal: bool, steps: int, lr: float, loss: str, seed: int,
            checkpoint: str | None = None, checkpoint_every: int = 25, fingerprint: dict | None = None, progress: bool = False,
            autocast: str = "float32", train_embeddings: bool = True, start_from: dict | None = None,
            teacher_outputs: str = "auto", attention: str = "auto", parameters: list | None = None) -> dict:
    """Train ``student`` (in place) to match ``teacher`` on ``batches`` for ``steps`` steps.

    Returns ``{"loss_before", "loss_after"}`` (mean calibration loss over all batches) and the
    first/last step losses, and whether the teacher's outputs were ``cached`` or ``recomputed``.
    Teacher outputs of encoders (batch, seq, dim) are cached when ``teacher_outputs`` says so
    (``auto``: when they fit, see :func:`caches_teacher_outputs`); those
    of causal LMs (batch, seq, vocab) and the per-block ones of ``mse+cos+layers`` are always
    recomputed per step (memory bounded by one batch, not by the calibration set). ``train_embeddings=False``
    leaves the input embedding table (and a head tied to it) as it is. ``start_from``: the state of
    a finished shorter run's checkpoint (``load_finished``; the caller checks it is the same
    training), continued to ``steps`` on the tail of a cosine over ``steps``. ``attention``:
    the student's attention implementation while it trains (``auto``: the faster of
    ``TRAINING_ATTENTION``, measured by :func:`fastest_training_attention`; a resumed run keeps
    its checkpoint's); the student is handed back on the one it came with. ``parameters``: train
    only these (e.g. the gains of scale tuning; default every floating-point parameter, less the
    embeddings with ``train_embeddings=False``).
    """
    if not batches:
        raise ConfigError("distillation has no calibration batches", "raise calibration.n_samples")
    if loss in LAYER_LOSSES and causal:
        raise ConfigError(f"distillation loss {loss!r} is for encoders", "use kl for causal language models")
    if autocast not in AUTOCAST_DTYPES:
        raise ConfigError(f"distillation autocast {autocast!r} is not one of {list(AUTOCAST_DTYPES)}", "use float32 or bfloat16")
    if attention not in ("auto", *TRAINING_ATTENTION):
        raise ConfigError(f"distillation attention {attention!r} is not one of {['auto', *TRAINING_ATTENTION]}", "use auto, sdpa or eager")
    low = AUTOCAST_DTYPES[autocast]
    layers = loss in LAYER_LOSSES
    cache_bytes = 0 if causal or layers else hidden_state_bytes(teacher, batches)
    cached = not (causal or layers) and caches_teacher_outputs(teacher_outputs, cache_bytes)
    if not cached:
        def target_of(b):
            def target():
                with torch.no_grad():
                    return _outputs(teacher, b, causal, layers).detach()
            return target
        targets = [target_of(b) for b in batches]
    else:
        with torch.no_grad():
            kept_outputs = [_outputs(teacher, b, False).detach() for b in batches]
        targets = [(lambda c=c: c) for c in kept_outputs]
    loss_before = calibration_loss(student, targets, batches, causal, loss)
    every = [p for p in student.parameters() if p.is_floating_point()]
    if parameters is not None:
        chosen = {id(p) for p in parameters}
        kept = {id(p) for p in every if id(p) not in chosen}
    else:
        kept = set() if train_embeddings else {id(p) for p in student.get_input_embeddings().parameters()}
    flags = [p.requires_grad for p in every]
    params = [p for p in every if id(p) not in kept]
    for p in every:
        p.requires_grad_(id(p) not in kept)
    if start_from is not None and not int(start_from["steps"]) < steps:
        raise ConfigError(f"distillation continues a run of {start_from['steps']} steps to {steps}", "raise the steps above the finished run's")
    optim = adamw(params, lr)
    # a continued run's schedule is the tail of the cosine over the new total, from its old length
    offset = int(start_from["steps"]) if start_from is not None else 0
    gen = torch.Generator().manual_seed(seed)
    start = 0
    order: list[int] = []
    key = fingerprint_key(fingerprint)
    path = Path(checkpoint) if checkpoint else None
    resumed = None
    loss_continued = None
    if path is not None and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") == key and state.get("steps") == steps and state.get("offset", 0) == offset:
            resumed = state
        else:
            log.warning("distillation checkpoint %s belongs to another run; starting afresh", path)
    if resumed is None and start_from is not None:
        student.load_state_dict(start_from["student"])
        optim.load_state_dict(start_from["optim"])
        gen.set_state(start_from["generator"])
        order = list(start_from["order"])
        start = offset
        log.info("distillation continues a finished run of %d steps to %d", offset, steps)
        loss_continued = calibration_loss(student, targets, batches, causal, loss)
    for group in optim.param_groups:
        group["lr"] = group["initial_lr"] = lr
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: cosine_factor(s + offset, steps))
    if resumed is not None:
        student.load_state_dict(resumed["student"])
        optim.load_state_dict(resumed["optim"])
        sched.load_state_dict(resumed["sched"])
        gen.set_state(resumed["generator"])
        order = list(resumed["order"])
        start = int(resumed["step"])
        log.info("distillation resumes at step %d from %s", start, path)
    attention_before = attention_implementation(student)
    if attention_before in TRAINING_ATTENTION:
        if resumed is not None:
            chosen = resumed.get("attention", attention_before)  # the same kernels as before the kill
        elif attention == "auto":
            chosen = fastest_training_attention(student, batches[0], causal, layers, low)
        else:
            chosen = attention
        if chosen != attention_before:
            student.set_attn_implementation(chosen)
    trained_with = attention_implementation(student)
    history: list[float] = []
    bar = tqdm(total=steps, initial=start, desc="distill", disable=not progress, unit="step")
    try:
        for step in range(start, steps):
            if not order:
                order = torch.randperm(len(batches), generator=gen).tolist()
            j = order.pop()
            batch = batches[j]
            with training_autocast(low):
                out = _outputs(student, batch, causal, layers)
            value = distillation_loss(out, targets[j](), batch["attention_mask"], loss)
            history.append(optimizer_step(value, optim, sched, params))
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            if path is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                save_checkpoint(path, {"fingerprint": key, "steps": steps, "step": step + 1, "offset": offset, "student": student.state_dict(), "optim": optim.state_dict(),
                                       "sched": sched.state_dict(), "generator": gen.get_state(), "order": list(order), "attention": trained_with})
    finally:
        bar.close()
        if trained_with != attention_before:
            student.set_attn_implementation(attention_before)
        for p, f in zip(every, flags):
            p.requires_grad_(f)
            p.grad = None
    student.eval()
    loss_after = calibration_loss(student, targets, batches, causal, loss)
    return {"loss": loss, "steps": steps, "resumed_at": start, "teacher_outputs": "cached" if cached else "recomputed", "teacher_cache_bytes": cache_bytes if cached else 0, **({"continued_from_steps": offset, "loss_at_continuation": loss_continued} if offset else {}), "lr": lr, "autocast": autocast, "attention": trained_with, "embeddings": "trained" if train_embeddings else "kept",
            "loss_before": loss_before, "loss_after": loss_after,
            "first_step_loss": history[0] if history else None, "last_step_loss": history[-1] if history else None}
