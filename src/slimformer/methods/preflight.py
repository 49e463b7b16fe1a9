"""Memory pre-flight: an estimate of a compression job's peak memory, made before any work, and
a one-line refusal (naming the setting to change) when it cannot fit in the memory available."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from slimformer.errors import ConfigError
from slimformer.methods.memory import available_memory_bytes

GIB = 1 << 30
TRANSIENT = ("block_forward", "method", "head_logits")
# a distillation runs after the calibration work, in place of its transients
TRAINING = ("teacher_outputs", "distillation")
ATTENTION_MASK_BYTES = 4  # per (query, key) pair of a cached 4-D attention mask (float masks; bool take 1)


class InsufficientMemoryError(ConfigError):
    """A compression job whose estimated peak memory exceeds the memory available."""


@dataclass
class MemoryEstimate:
    """Estimated peak memory of a compression job, in bytes, by part.

    ``parts``: ``model`` (weights resident during the job: the whole model, or with streamed
    weights its non-block parts, the memory-mapped input embedding counted only for the rows the
    calibration tokens touch, plus the compressed blocks), ``block`` (one block's float weights
    while it is worked on, streamed only), ``activations`` (cached block inputs, or with spilling
    one batch in and one out), ``stage_outputs`` (outputs of a block's finished stages recorded
    by true-sequential calibration, only while they fit the activation budget), ``block_forward`` (transients of one block's forward on one
    batch), ``statistics`` (Hessians and input statistics of the layers calibrated together),
    ``method`` (the method's working set for one layer, e.g. GPTQ's inverse Hessian),
    ``head_logits``, ``teacher_logits``, ``original_weights``, ``teacher_outputs`` (an encoder
    teacher's final hidden states that a distillation keeps for the whole calibration set, when it
    will keep them), ``distillation`` (the teacher's copy, gradients and AdamW's two moments,
    bounded by four times the model's float weights, plus one training step's activations).
    The transient parts
    (``block_forward``, ``method``, ``head_logits``) never coexist, and a distillation's two
    parts come after them, so the peak counts the largest of those three or the two training
    parts together, on top of the others. ``resident`` is what was already allocated when the
    estimate was made (the loaded model), ``settings`` the numbers it used.
    """

    parts: dict[str, int]
    resident: int
    settings: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        held = sum(v for k, v in self.parts.items() if k not in TRANSIENT + TRAINING)
        transient = max((v for k, v in self.parts.items() if k in TRANSIENT), default=0)
        return int(held + max(transient, sum(v for k, v in self.parts.items() if k in TRAINING)))

    @property
    def additional_bytes(self) -> int:
        """What the job still has to allocate on top of what is already resident."""
        return max(self.total_bytes - self.resident, 0)

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "resident_bytes": self.resident, "parts": dict(self.parts), "settings": dict(self.settings)}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _selected_linears(loaded, step) -> dict[str, nn.Module]:
    from slimformer.methods.selection import select_modules

    try:
        return select_modules(loaded, step, types=(nn.Linear,))
    except (ConfigError, AttributeError, TypeError):
        return {}


def _stage_groups(names: list[str], sequential: bool) -> list[list[str]]:
    """Layers calibrated together: the stages of a block (q/k/v share an input; then the
    attention output; the MLP inputs; the MLP output), or the whole block."""
    if not sequential:
        return [names]
    groups: dict[str, list[str]] = {}
    for n in names:
        leaf = n.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "k_proj", "v_proj", "query", "key", "value", "c_attn"):
            key = "qkv"
        elif leaf in ("gate_proj", "up_proj", "c_fc") or n.endswith("intermediate.dense"):
            key = "mlp_in"
        else:
            key = n  # its own stage
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def estimate_peak(loaded, recipe, ctx=None) -> MemoryEstimate:
    """Estimate the peak memory of applying ``recipe`` to ``loaded`` (before any work).

    Uses the model's geometry (block weights, widths, vocabulary), the tokenized calibration
    batches (their exact token counts) and each step's layer selection.
    """
    return estimate_steps_peak(loaded, recipe.steps, recipe.calibration, ctx)


def estimate_steps_peak(loaded, steps: list, calibration, ctx=None) -> MemoryEstimate:
    """:func:`estimate_peak` of the method configs ``steps`` with ``calibration`` (the
    ``CalibrationSettings`` of their recipe), for callers that hold steps, not a recipe."""
    from slimformer.methods.calibration import CompressionContext, _is_causal, activation_bytes, replay_bytes
    from slimformer.methods.distill import caches_teacher_outputs

    model = loaded.model
    adapter = loaded.adapter
    ctx = ctx or CompressionContext(calibration)
    if ctx.max_positions is None:
        from slimformer.models.loading import max_positions

        ctx.max_positions = max_positions(loaded)
    params = list(model.parameters()) + list(model.buffers())
    streamed = any(p.is_meta for p in params)
    resident = _bytes(p for p in params if not p.is_meta)
    blocks = list(adapter.blocks())
    block_bytes = max((_bytes(list(b.parameters()) + list(b.buffers())) for b in blocks), default=0)
    in_block_ids = {id(p) for b in blocks for p in b.parameters()}
    outside = _bytes(p for p in model.parameters() if id(p) not in in_block_ids and not p.is_meta)
    config = model.config
    hidden = int(model.get_input_embeddings().weight.shape[1])
    vocab = int(model.get_input_embeddings().weight.shape[0])
    inter = max((m.out_features for m in adapter.linear_layers(0).values()), default=hidden) if blocks else hidden
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1))
    elem = model.get_input_embeddings().weight.element_size()
    calibrated = [s for s in steps if s.requires_calibration]
    parts = {k: 0 for k in ("model", "block", "activations", "stage_outputs", "block_forward", "statistics", "method", "head_logits", "teacher_logits",
                            "original_weights", "teacher_outputs", "distillation")}
    settings: dict = {"streamed": streamed, "offload": calibration.offload}
    if streamed:
        compressed = 0
        for step in steps:
            bits = getattr(step, "bits", None)
            group = getattr(step, "group_size", None) or hidden
            for m in _selected_linears(loaded, step).values():
                w = m.weight.numel()
                compressed += w * (bits / 8 + 4 / group) if bits else w * m.weight.element_size()
        # The input embedding stays a view of the memory-mapped file: only the rows of the
        # calibration tokens become resident (a 1B model's 400 MB table touches a few MB).
        emb = model.get_input_embeddings().weight
        if not emb.is_meta:
            touched = min(_bytes([emb]), _calibration_tokens(ctx, loaded, calibrated) * emb.shape[1] * emb.element_size())
            outside = outside - _bytes([emb]) + touched
        parts["model"] = outside + int(compressed)
        parts["block"] = block_bytes
    else:
        parts["model"] = resident
    if calibrated:
        batches = ctx.batches(loaded.tokenizer)
        settings.update(n_batches=len(batches), tokens=sum(int(b["input_ids"].numel()) for b in batches))
        tok_max = max(int(b["input_ids"].numel()) for b in batches)
        seq_max = max(int(b["input_ids"].shape[1]) for b in batches)
        batch_max = max(int(b["input_ids"].shape[0]) for b in batches)
        all_acts = activation_bytes(loaded, batches)
        budget = ctx.activation_budget if ctx.activation_budget is not None else available_memory_bytes() // 4
        spill = calibration.offload == "disk" or (calibration.offload == "auto" and all_acts > budget)
        settings["spill"] = spill
        masks = sum(int(b["input_ids"].shape[0]) * int(b["input_ids"].shape[1]) ** 2 for b in batches) * ATTENTION_MASK_BYTES
        # methods that carry more than one calibration stream through depth hold one set each
        # (fusegpt: the original's, the shortened model's and the span targets; width-slim's
        # local-error allocation: a block's inputs and outputs); spilled, one batch each
        streams = max((3 if s.name == "fusegpt" else 2 if s.name == "width-slim" and getattr(s, "allocation", "") == "local-error" else 1) for s in calibrated)
        parts["activations"] = (2 * streams * tok_max * hidden * elem if spill else streams * all_acts + tok_max * hidden * elem) + masks
        settings["streams"] = streams
        # one block on one batch: residual stream copies, q/k/v/attention, MLP intermediates,
        # attention scores (batch, heads, seq, seq) when the attention path materialises them
        parts["block_forward"] = tok_max * (8 * hidden + 3 * inter) * 4 + batch_max * heads * seq_max * seq_max * 4
        stats = method = head = teacher = replay = kept_outputs = training = forward_extra = 0
        n_blocks = len(blocks)
        float_bytes = _bytes(p for p in model.parameters() if p.is_floating_point())
        for step in calibrated:
            if getattr(step, "distill_steps", 0) > 0 or step.name == "scale-tuning":
                tok_max, seq_max, batch_max = _training_batch(ctx, loaded, step, (tok_max, seq_max, batch_max))
                causal = _is_causal(model)
                layers = getattr(step, "distill_loss", "") == "mse+cos+layers"
                mlp_inputs = len(adapter.mlp_linears(0)[0]) if blocks else 1  # 2 for a gated MLP (gate and up)
                # a training step keeps every block's activations for the backward pass (causal LMs:
                # the teacher's and student's logits, the log-softmax and its gradient as well)
                step_acts = n_blocks * (tok_max * (4 * hidden + 2 * mlp_inputs * inter) * 4 + 2 * batch_max * heads * seq_max * seq_max * 4)
                step_acts += 4 * tok_max * vocab * 4 if causal else 0
                # the teacher's outputs are one more set of the calibration hidden states
                if not (causal or layers) and caches_teacher_outputs(getattr(step, "distill_teacher_outputs", "auto"), all_acts):
                    kept_outputs = max(kept_outputs, all_acts)
                else:  # the teacher's forward on each step's batch: its output and an MLP's intermediate
                    step_acts += tok_max * (hidden + inter) * 4
                # distillation: the teacher's copy, gradients and AdamW's two moments of every float
                # weight; scale tuning: the teacher's copy, the float32 centred codes and the
                # per-layer weights a backward pass keeps (the gains' optimizer state is small)
                training = max(training, (3 if step.name == "scale-tuning" else 4) * float_bytes + step_acts)
            if step.name == "width-slim":
                # the Gram matrices of a block's attention and MLP output projections' inputs
                # (float32, with their sums); during the block's forward, one batch's statistics
                # being added (the float input, its square, absolute values: about five copies,
                # and one x^T x); and structured OBS / the refit on the widest: the weight and
                # (in, in) float64 matrices, about five at once (a measured peak: 4.5)
                stats = max(stats, (hidden * hidden + inter * inter) * 4 + 2 * (hidden + inter) * 4)
                forward_extra = max(forward_extra, 5 * tok_max * inter * 4 + inter * inter * 4)
                if getattr(step, "select", "") == "obs" or getattr(step, "refit", False):
                    method = max(method, 5 * inter * inter * 8 + 2 * hidden * inter * 8)
            selected = _selected_linears(loaded, step)
            sequential = bool(getattr(step, "true_sequential", False))
            uses_hessian = step.name not in ("wanda", "smoothquant")
            for i in range(len(blocks)):
                prefix = adapter.block_prefix(i) + "."
                names = [n for n in selected if n.startswith(prefix)]
                groups = [g for g in _stage_groups(names, sequential) if g]
                if len(groups) > 1 and not spill:  # finished stages' outputs are recorded when they fit
                    need = replay_bytes(batches, {n: selected[n] for n in names})
                    if need <= budget:
                        replay = max(replay, need)
                for group in groups:
                    widths = [selected[n].in_features for n in group]
                    group_stats = sum((w * w * 4 if uses_hessian else 0) + 4 * w * 4 for w in widths)
                    # the masked float copy of a batch's inputs and the x^T x product being added
                    group_stats += 2 * tok_max * max(widths) * 4 + (max(widths) ** 2 * 4 if uses_hessian else 0)
                    group_stats += getattr(step, "samples", 0) * max(widths) * 4 * len(widths)
                    stats = max(stats, group_stats)
            for n, m in selected.items():
                d_in, d_out = m.in_features, m.out_features
                if step.name == "gptq":
                    # float32 inverse-Hessian chain, two (in, in) matrices at a time, then the
                    # factor beside the column-major weight copy, its codes and the result
                    work = 2 * d_in * d_in * 4 + 2 * d_in * d_out * 4 + 2 * d_in * d_out
                elif step.name in ("sparsegpt", "vptq"):
                    # the same float32 chain (gptq.prepare_hessian) plus float32 weight copies
                    work = 2 * d_in * d_in * 4 + 4 * d_in * d_out * 4
                else:
                    # inverse-Hessian chain in float64 (H, its damped copy or Cholesky factor, the
                    # inverse / upper factor) plus float32 weight copies and codes
                    work = (3 * d_in * d_in * 8 if uses_hessian else 0) + 4 * d_in * d_out * 4
                method = max(method, work)
            head_mod = adapter.head()
            if head_mod is not None and head_mod[0] in selected and _is_causal(model):
                head = max(head, tok_max * vocab * 4)
            if getattr(step, "requires_teacher_logits", False):
                teacher = max(teacher, settings["tokens"] * vocab * 4)
        parts["block_forward"] += forward_extra
        parts.update(statistics=stats, method=method, head_logits=head, teacher_logits=teacher, stage_outputs=replay, teacher_outputs=kept_outputs, distillation=training)
    if any(s.requires_original_weights for s in steps):
        parts["original_weights"] = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
    return MemoryEstimate(parts={k: int(v) for k, v in parts.items()}, resident=resident if not streamed else outside, settings=settings)


def _training_batch(ctx, loaded, step, recipe_batch: tuple[int, int, int]) -> tuple[int, int, int]:
    """(tokens, positions, rows) of the largest batch a training step draws: the recipe's
    calibration batches, or the batches of the step's own calibration context (scale tuning's
    ``n_samples``/``max_length``/``batch_size``)."""
    if not hasattr(step, "calibration_context"):
        return recipe_batch
    batches = step.calibration_context(ctx).batches(loaded.tokenizer)
    return (max(int(b["input_ids"].numel()) for b in batches), max(int(b["input_ids"].shape[1]) for b in batches),
            max(int(b["input_ids"].shape[0]) for b in batches))


def _calibration_tokens(ctx, loaded, calibrated) -> int:
    """Tokens of the calibration batches (0 when no step calibrates)."""
    if not calibrated:
        return 0
    return sum(int(b["input_ids"].numel()) for b in ctx.batches(loaded.tokenizer))


_FIXES = {
    "activations": "lower calibration.n_samples, calibration.windows or calibration.max_length, or set calibration.offload: disk",
    "stage_outputs": "lower calibration.n_samples, calibration.windows or calibration.max_length (or set calibration.offload: disk: stages are then re-run)",
    "block_forward": "lower calibration.batch_size or calibration.max_length",
    "statistics": "lower calibration.max_length, or calibrate fewer layers at once (true_sequential: true)",
    "method": "quantize fewer or narrower layers in one step (include/exclude patterns)",
    "head_logits": "lower calibration.batch_size, or leave the head out of the step's targets",
    "teacher_logits": "lower calibration.n_samples, calibration.windows or calibration.max_length",
    "model": "load the model with streamed weights (--stream) so blocks stay on disk",
    "block": "free memory for one block of the model, or use a machine with more memory",
    "original_weights": "run the error-compensation step in a separate job",
    "teacher_outputs": "set distill_teacher_outputs: recompute (the teacher then runs on each step's batch), or lower calibration.n_samples, calibration.windows or calibration.max_length",
    "distillation": "lower calibration.batch_size or calibration.max_length, or a scale-tuning step's own batch_size/max_length (one training step's activations), or train where the teacher's copy and AdamW's state fit (4x the float weights)",
}


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def check_fits(estimate: MemoryEstimate, available: int | None = None) -> None:
    """Raise ``InsufficientMemoryError`` (one line naming the setting to change) when the job
    still needs more than ``available`` bytes (default: what this process can allocate)."""
    available = available_memory_bytes() if available is None else available
    need = estimate.additional_bytes
    if need <= available:
        return
    movable = {k: v for k, v in estimate.parts.items() if k != "model" or estimate.settings.get("streamed") is False}
    worst = max(movable, key=movable.get)
    raise InsufficientMemoryError(
        f"the recipe needs about {_size(need)} more memory (largest part: {worst} {_size(estimate.parts[worst])}) "
        f"but {_size(available)} are available",
        _FIXES[worst],
    )
