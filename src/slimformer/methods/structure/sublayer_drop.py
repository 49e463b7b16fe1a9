"""Attention drop / MLP drop: remove the attention (or MLP) sub-layers whose output is most
similar to their input.

He et al., 2024, "What Matters in Transformers? Not All Attention is Needed". The importance of
a sub-layer is ``S = 1 - E_t[cos(X_t, Y_t)]``, with ``X`` the hidden state entering the
sub-layer and ``Y`` the hidden state after it (the residual stream with the sub-layer's output
added), averaged over calibration tokens. The ``count`` sub-layers of the chosen kind with the
lowest ``S`` are removed in one shot: their modules and the norm feeding them leave the module
tree and the forward pass (see ``ArchitectureAdapter.remove_sublayer``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, register_method
from slimformer.methods.calibration import run_batches
from slimformer.methods.structure.sleb import check_fraction

SUBLAYER_KINDS = ("attention", "mlp")


@dataclass
class SublayerDropConfig(MethodConfig):
    """``sublayer``: ``attention`` or ``mlp``; ``num_sublayers`` to remove, or ``fraction`` of
    the blocks' sub-layers of that kind (rounded)."""

    name = "sublayer-drop"
    family = "structure"
    paper = "What Matters in Transformers? Not All Attention is Needed (He et al., 2024)"
    summary = "drop the attention (or MLP) sub-layers of highest input/output cosine similarity"
    requires_calibration = True

    sublayer: str = "attention"
    num_sublayers: int = 1
    fraction: float | None = None

    def __post_init__(self) -> None:
        if self.sublayer not in SUBLAYER_KINDS:
            raise ConfigError(f"sublayer-drop: sublayer={self.sublayer!r} is not one of {list(SUBLAYER_KINDS)}", "use sublayer: attention or sublayer: mlp")
        if not is_int_at_least(self.num_sublayers, 1):
            raise ConfigError(f"sublayer-drop: num_sublayers={self.num_sublayers!r} must be a positive integer", "use e.g. num_sublayers: 4")
        check_fraction("sublayer-drop", self.fraction)


def sublayer_importance(loaded, ctx, kind: str) -> list[float]:
    """``1 - mean cos(X, Y)`` of the ``kind`` sub-layer of every block (list of num_layers;
    ``nan`` where that sub-layer is already removed), over valid calibration tokens."""
    adapter = loaded.adapter
    blocks = list(adapter.blocks())
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)
    state: dict = {"mask": None}
    handles = []

    def add(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        cos = F.cosine_similarity(x.float(), y.float(), dim=-1)  # (batch, seq)
        mask = state["mask"]
        if mask is not None and tuple(mask.shape) == tuple(cos.shape):
            cos = cos[mask.bool()]
        sums[i] += cos.sum().double()
        counts[i] += cos.numel()

    for i, block in enumerate(blocks):
        attention = getattr(block, adapter.spec.attention)

        def block_in(_m, args, kwargs, i=i):
            state[("in", i)] = args[0] if args else kwargs["hidden_states"]

        def attn_out(_m, _args, _kwargs, output, i=i):
            out = output[0] if isinstance(output, (tuple, list)) else output
            x = state[("in", i)]
            state[("mid", i)] = x + out if adapter.residual_sublayers else out
            if kind == "attention":
                add(i, x, state[("mid", i)])

        def block_out(_m, _args, _kwargs, output, i=i):
            if kind == "mlp":
                out = output[0] if isinstance(output, (tuple, list)) else output
                add(i, state[("mid", i)], out)
            state.pop(("in", i), None)
            state.pop(("mid", i), None)

        handles.append(block.register_forward_pre_hook(block_in, with_kwargs=True))
        handles.append(attention.register_forward_hook(attn_out, with_kwargs=True))
        handles.append(block.register_forward_hook(block_out, with_kwargs=True))
    try:
        run_batches(loaded.model, ctx.batches(loaded.tokenizer), on_batch=lambda b: state.update(mask=b.get("attention_mask")))
    finally:
        for h in handles:
            h.remove()
    scores = (1.0 - sums / counts.clamp(min=1)).tolist()
    return [float("nan") if adapter.sublayer_removed(i, kind) else s for i, s in enumerate(scores)]


@register_method(SublayerDropConfig)
def apply_sublayer_drop(loaded, config: SublayerDropConfig, ctx) -> dict:
    adapter = loaded.adapter
    kind = config.sublayer
    total = adapter.num_layers()
    present = [i for i in range(total) if not adapter.sublayer_removed(i, kind)]
    n = int(round(config.fraction * total)) if config.fraction is not None else config.num_sublayers
    if n < 1:
        raise ConfigError(f"sublayer-drop: fraction={config.fraction} of {total} blocks removes nothing", "raise the fraction")
    if n > len(present):
        raise ConfigError(f"sublayer-drop: only {len(present)} {kind} sub-layers are left", f"remove at most {len(present)}")
    scores = sublayer_importance(loaded, ctx, kind)
    chosen = sorted(sorted(present, key=lambda i: scores[i])[:n])
    blocks = list(adapter.blocks())
    targets = [blocks[i] for i in chosen]
    dropped = []
    for i, block in zip(chosen, targets):
        now = list(adapter.blocks()).index(block)
        other = "mlp" if kind == "attention" else "attention"
        if adapter.sublayer_removed(now, other):
            dropped.append(i)
        adapter.remove_sublayer(now, kind)
    return {
        "removed_sublayers": [[i, kind] for i in chosen if i not in dropped],
        "dropped_layers": dropped,
        "importance": scores,
        "layers_before": total,
        "layers_after": adapter.num_layers(),
    }
