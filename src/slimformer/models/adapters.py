"""Architecture adapters: where each supported model family keeps its blocks, attention, MLP,
embedding table and linear layers. Methods ask the adapter; they never hard-code attribute names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimformer.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchitectureSpec:
    """Layout of one model family, relative to ``model.base_model``.

    ``blocks``: dotted path to the ``ModuleList`` of transformer blocks; ``attention`` and ``mlp``:
    attribute names inside one block; ``num_layers_key``: the config attribute holding the depth;
    ``kind``: ``"encoder"`` (bidirectional, embeddings by pooling) or ``"causal-lm"``.
    """

    family: str
    model_types: tuple[str, ...]
    blocks: str
    attention: str
    mlp: tuple[str, ...]
    num_layers_key: str
    kind: str


SPECS: tuple[ArchitectureSpec, ...] = (
    ArchitectureSpec("bert", ("bert", "roberta"), "encoder.layer", "attention", ("intermediate", "output"), "num_hidden_layers", "encoder"),
    ArchitectureSpec("llama", ("llama", "mistral"), "layers", "self_attn", ("mlp",), "num_hidden_layers", "causal-lm"),
    ArchitectureSpec("qwen2", ("qwen2",), "layers", "self_attn", ("mlp",), "num_hidden_layers", "causal-lm"),
    ArchitectureSpec("gpt2", ("gpt2",), "h", "attn", ("mlp",), "n_layer", "causal-lm"),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for s in SPECS for t in s.model_types)


def spec_for_model_type(model_type: str) -> ArchitectureSpec:
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    raise UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r}",
        f"slimformer supports model types {list(SUPPORTED_MODEL_TYPES)}",
    )


def _get_path(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def set_submodule(root: nn.Module, qualified_name: str, new: nn.Module) -> None:
    """Replace the module at ``qualified_name`` (e.g. ``"encoder.layer.0.output.dense"``)."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class ArchitectureAdapter:
    """Knows where a supported model keeps its parts. Built from the model's ``config.model_type``."""

    def __init__(self, model: nn.Module) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type is None:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has no Hugging Face config",
                f"pass a transformers model of a supported type {list(SUPPORTED_MODEL_TYPES)}",
            )
        self.spec = spec_for_model_type(model_type)
        self.model = model

    # ----- where things are -----------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.spec.kind

    def base(self) -> nn.Module:
        return self.model.base_model

    def blocks(self) -> nn.ModuleList:
        return _get_path(self.base(), self.spec.blocks)

    def num_layers(self) -> int:
        return len(self.blocks())

    def qualified_names(self) -> dict[int, str]:
        """``id(module) -> fully-qualified name`` for every module of the model."""
        return {id(m): n for n, m in self.model.named_modules()}

    def block_prefix(self, index: int) -> str:
        names = self.qualified_names()
        return names[id(self.blocks()[index])]

    def linear_layers(self, block_index: int | None = None) -> dict[str, nn.Linear]:
        """Linear layers inside the transformer blocks (all blocks, or one), by qualified name."""
        names = self.qualified_names()
        blocks = self.blocks() if block_index is None else [self.blocks()[block_index]]
        out: dict[str, nn.Linear] = {}
        for block in blocks:
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    out[names[id(module)]] = module
        return out

    def attention(self, block_index: int) -> nn.Module:
        return getattr(self.blocks()[block_index], self.spec.attention)

    def query_key(self, attention: nn.Module) -> tuple[nn.Linear, nn.Linear]:
        """The query and key projections of an attention module (for attention-based scores)."""
        for q, k in (("self.query", "self.key"), ("q_proj", "k_proj")):
            try:
                return attention.get_submodule(q), attention.get_submodule(k)
            except AttributeError:
                continue
        raise UnsupportedArchitectureError(
            f"no query/key projections found in {type(attention).__name__}", "token pruning by attention supports BERT-style and Llama-style attention"
        )

    def mlp(self, block_index: int) -> list[nn.Module]:
        return [getattr(self.blocks()[block_index], a) for a in self.spec.mlp]

    def embedding(self) -> tuple[str, nn.Module]:
        """The token-embedding table ``(qualified name, module)``."""
        module = self.model.get_input_embeddings()
        return self.qualified_names()[id(module)], module

    def head(self) -> tuple[str, nn.Module] | None:
        """The output projection (``lm_head``) if the model has one, else ``None``."""
        get = getattr(self.model, "get_output_embeddings", None)
        module = get() if get is not None else None
        if module is None:
            return None
        return self.qualified_names()[id(module)], module

    def modules_of_kind(self, kind: str) -> dict[str, nn.Module]:
        """Modules for a selection target kind: ``linear``, ``embedding`` or ``head``."""
        if kind == "linear":
            return self.linear_layers()
        if kind == "embedding":
            name, module = self.embedding()
            return {name: module}
        if kind == "head":
            head = self.head()
            return {} if head is None else {head[0]: head[1]}
        raise ValueError(kind)

    # ----- structural edits -----------------------------------------------------------------
    def drop_blocks(self, indices: list[int]) -> None:
        """Remove the blocks at ``indices`` from the module tree and the config.

        The remaining blocks are renumbered; ``layer_idx`` attributes (used by KV caches) and
        per-layer config lists (``layer_types``) follow.
        """
        blocks = self.blocks()
        drop = set(indices)
        kept = [b for i, b in enumerate(blocks) if i not in drop]
        parent_path, _, attr = self.spec.blocks.rpartition(".")
        parent = _get_path(self.base(), parent_path) if parent_path else self.base()
        setattr(parent, attr, nn.ModuleList(kept))
        config = self.model.config
        setattr(config, self.spec.num_layers_key, len(kept))
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == len(blocks):
            config.layer_types = [t for i, t in enumerate(layer_types) if i not in drop]
        for new_index, block in enumerate(kept):
            for module in block.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_index


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace GPT-2 style ``Conv1D`` (weight stored ``(in, out)``) by equivalent ``nn.Linear``.

    Every method then sees one kind of linear layer, with weight ``(out_features, in_features)``.
    Returns the number of modules replaced.
    """
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old transformers
        return 0
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            linear = nn.Linear(in_features, out_features, bias=module.bias is not None, dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            set_submodule(model, name, linear)
            replaced += 1
    return replaced
