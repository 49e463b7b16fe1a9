"""ShortGPT: remove whole transformer blocks of lowest Block Influence.

Men et al., 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You
Expect". Block Influence of block i is ``BI_i = 1 - E_t[cos(h_i(t), h_{i+1}(t))]``, the mean
cosine between a token's hidden state before and after the block, over calibration tokens. The
``num_layers`` blocks of lowest BI are deleted from the module tree and the config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimformer.errors import ConfigError
from slimformer.methods.base import MethodConfig, register_method
from slimformer.methods.calibration import run_batches
from slimformer.methods.structure.sleb import check_block_list, check_blocks_exist


@dataclass
class ShortGPTConfig(MethodConfig):
    """``num_layers``: how many blocks to drop (by lowest Block Influence); or ``layers``: the
    exact block indices to drop (then no calibration is needed)."""

    name = "shortgpt"
    family = "structure"
    paper = "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect (Men et al., 2024)"
    summary = "drop the transformer blocks of lowest Block Influence (1 - cos(input, output))"
    requires_calibration = True

    num_layers: int = 1
    layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.layers, self.num_layers = check_block_list("shortgpt", self.layers, self.num_layers)


def block_influence(loaded, ctx) -> list[float]:
    """Block Influence of every block (list of length num_layers), on the calibration batches."""
    adapter = loaded.adapter
    blocks = adapter.blocks()
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def make_hook(i: int):
        def hook(_module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, (tuple, list)) else output
            cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # (batch, seq)
            mask = state["mask"]
            if mask is not None and tuple(mask.shape) == tuple(cos.shape):
                cos = cos[mask.bool()]
            sums[i] += cos.sum().double()
            counts[i] += cos.numel()

        return hook

    handles = [b.register_forward_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        run_batches(loaded.model, ctx.batches(loaded.tokenizer), on_batch=lambda b: state.update(mask=b.get("attention_mask")))
    finally:
        for h in handles:
            h.remove()
    return (1.0 - sums / counts.clamp(min=1)).tolist()


@register_method(ShortGPTConfig)
def apply_shortgpt(loaded, config: ShortGPTConfig, ctx) -> dict:
    adapter = loaded.adapter
    total = adapter.num_layers()
    if config.num_layers >= total:
        raise ConfigError(
            f"shortgpt: cannot drop {config.num_layers} of the model's {total} blocks",
            f"drop at most {total - 1}",
        )
    if config.layers:
        check_blocks_exist("shortgpt", config.layers, total)
        influence = None
        drop = sorted(config.layers)
    else:
        influence = block_influence(loaded, ctx)
        drop = sorted(sorted(range(total), key=lambda i: influence[i])[: config.num_layers])
    adapter.drop_blocks(drop)
    return {"dropped_layers": drop, "block_influence": influence, "layers_before": total, "layers_after": total - len(drop)}
