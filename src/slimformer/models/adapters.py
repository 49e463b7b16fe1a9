"""Architecture adapters: where each supported model family keeps its blocks, attention, MLP,
embedding table and linear layers. Methods ask the adapter; they never hard-code attribute names.
"""

from __future__ import annotations

from contextlib import contextmanager
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


def attention_implementation(model: nn.Module) -> str | None:
    """The attention implementation ``model`` runs (transformers' ``config._attn_implementation``:
    ``"sdpa"``, ``"eager"``, a registered kernel's name), or None for a model without one."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def set_attention(model: nn.Module, name: str) -> bool:
    """Switch ``model`` (in place) to the attention implementation ``name``; False, changing
    nothing, where the model cannot switch or transformers refuses ``name`` for it."""
    if not hasattr(model, "set_attn_implementation"):
        return False
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError, AttributeError):
        return False
    return True


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
        """Modules for a selection target kind: ``linear``, ``embedding``, ``head`` or ``auxiliary``."""
        if kind == "linear":
            return self.linear_layers()
        if kind == "embedding":
            name, module = self.embedding()
            return {name: module}
        if kind == "head":
            head = self.head()
            return {} if head is None else {head[0]: head[1]}
        if kind == "auxiliary":
            return self.auxiliary_modules()
        raise ValueError(kind)

    def auxiliary_modules(self) -> dict[str, nn.Module]:
        """Weight-holding modules outside the blocks that are neither the token-embedding table
        nor the head: BERT's position and token-type embeddings and its pooler, for example."""
        inside = {id(m) for block in self.blocks() for m in block.modules()}
        inside.add(id(self.embedding()[1]))
        head = self.head()
        if head is not None:
            inside.add(id(head[1]))
        return {
            name: m for name, m in self.model.named_modules()
            if id(m) not in inside and isinstance(getattr(m, "_parameters", {}).get("weight"), torch.Tensor) and m.weight.dim() == 2
        }

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
        self.renumber_layers()

    def renumber_layers(self) -> None:
        """Set ``layer_idx`` (the KV-cache slot) of every block's modules: blocks that still
        have their attention are numbered 0, 1, ... in order (a block whose attention was
        removed holds no cache slot, so the cache stays dense and slot 0 is always used)."""
        slot = 0
        for block in self.blocks():
            has_attention = not isinstance(getattr(block, self.spec.attention, None), RemovedSublayer)
            for module in block.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = slot
            slot += int(has_attention)

    # ----- sub-layer removal and width edits (structure methods) ------------------------------
    def sublayer_removed(self, block_index: int, kind: str) -> bool:
        """Whether the ``"attention"`` or ``"mlp"`` sub-layer of a block was removed."""
        block = self.blocks()[block_index]
        names = (self.spec.attention,) if kind == "attention" else self.spec.mlp
        return isinstance(getattr(block, names[-1]), RemovedSublayer)

    @contextmanager
    def temporary_blocks(self, blocks: list[nn.Module]):
        """Run the model with the block list replaced by ``blocks`` (config and ``layer_idx``
        untouched: for cache-free calibration passes only); the original list is restored."""
        parent_path, _, attr = self.spec.blocks.rpartition(".")
        parent = _get_path(self.base(), parent_path) if parent_path else self.base()
        original = getattr(parent, attr)
        setattr(parent, attr, nn.ModuleList(blocks))
        try:
            yield
        finally:
            setattr(parent, attr, original)

    @property
    def residual_sublayers(self) -> bool:
        """Whether a sub-layer's output is added to the residual stream by the block
        (pre-norm families); ``False`` where the sub-layer module returns the new stream itself
        (BERT's post-norm ``LayerNorm(h + f(h))``)."""
        return self.spec.family != "bert"

    def sublayer_modules(self, block_index: int, kind: str) -> list[nn.Module]:
        """The modules whose parameters belong to a sub-layer: the attention (or MLP) modules and
        the norm that feeds them (pre-norm families)."""
        block = self.blocks()[block_index]
        names = (self.spec.attention,) if kind == "attention" else self.spec.mlp
        norm = _SUBLAYER_NORMS.get(self.spec.family, {}).get(kind)
        return [getattr(block, n) for n in names] + ([getattr(block, norm)] if norm else [])

    def remove_sublayer(self, block_index: int, kind: str) -> None:
        """Remove the attention or MLP sub-layer of one block from the module tree.

        Its modules (and the norm that fed it) are replaced by parameter-free stand-ins so the
        block's forward adds nothing to the residual stream: the block computes
        ``h + 0`` (pre-norm families) or passes ``h`` on (BERT's post-norm sub-layers). A block
        whose two sub-layers are both removed is dropped as a whole.
        """
        if kind not in ("attention", "mlp"):
            raise ValueError(kind)
        block = self.blocks()[block_index]
        if self.sublayer_removed(block_index, kind):
            return
        family = self.spec.family
        if kind == "attention":
            setattr(block, self.spec.attention, RemovedSublayer("passthrough-pair" if family == "bert" else "zero-pair"))
        elif family == "bert":
            setattr(block, self.spec.mlp[0], RemovedSublayer("identity"))
            setattr(block, self.spec.mlp[1], RemovedSublayer("second-arg"))
        else:
            setattr(block, self.spec.mlp[0], RemovedSublayer("zero"))
        norm = _SUBLAYER_NORMS.get(family, {}).get(kind)
        if norm:
            setattr(block, norm, RemovedSublayer("identity"))
        other = "mlp" if kind == "attention" else "attention"
        if self.sublayer_removed(block_index, other):
            self.drop_blocks([block_index])
        else:
            self.renumber_layers()

    def attention_linears(self, attention: nn.Module) -> tuple[list[nn.Module], nn.Module, str]:
        """``([q, k, v] or [qkv], out, layout)`` of an attention module."""
        family = self.spec.family
        if family == "bert":
            return [attention.self.query, attention.self.key, attention.self.value], attention.output.dense, "separate"
        if family == "gpt2":
            return [attention.c_attn], attention.c_proj, "fused-qkv"
        return [attention.q_proj, attention.k_proj, attention.v_proj], attention.o_proj, "separate"

    def head_dim(self) -> int:
        config = self.model.config
        value = getattr(config, "head_dim", None)
        return int(value) if value else config.hidden_size // config.num_attention_heads

    def attention_heads(self, block_index: int) -> tuple[int, int]:
        """``(query heads, key/value heads)`` of one block as it is now."""
        attention = self.attention(block_index)
        ins, _, layout = self.attention_linears(attention)
        hd = self.head_dim()
        if layout == "fused-qkv":
            n = _out_features(ins[0]) // (3 * hd)
            return n, n
        return _out_features(ins[0]) // hd, _out_features(ins[1]) // hd

    def mlp_linears(self, block_index: int) -> tuple[list[nn.Module], nn.Module]:
        """``(input projections, output projection)`` of a block's MLP: neurons are the rows of
        the inputs and the columns of the output."""
        block = self.blocks()[block_index]
        family = self.spec.family
        if family == "bert":
            return [block.intermediate.dense], block.output.dense
        if family == "gpt2":
            return [block.mlp.c_fc], block.mlp.c_proj
        return [block.mlp.gate_proj, block.mlp.up_proj], block.mlp.down_proj

    def mlp_width(self, block_index: int) -> int:
        return _out_features(self.mlp_linears(block_index)[0][0])

    def keep_heads(self, block_index: int, query_heads: list[int], kv_heads: list[int]) -> None:
        """Physically shrink one block's attention to the given query heads and key/value heads
        (indices into the current heads, kept in order). Each kept KV head must keep the same
        number of query heads (grouped-query attention repeats KV heads uniformly). Whole heads
        are kept, so rotary position embeddings (applied per head) are unaffected."""
        attention = self.attention(block_index)
        ins, out, layout = self.attention_linears(attention)
        hd = self.head_dim()
        n_q, n_kv = self.attention_heads(block_index)
        group = n_q // n_kv
        q_rows = _head_rows(query_heads, hd)
        if layout == "fused-qkv":
            rows = torch.cat([q_rows, q_rows + n_q * hd, q_rows + 2 * n_q * hd])
            attention.c_attn = _slice_linear(ins[0], rows=rows)
            attention.num_heads = len(query_heads)
            attention.split_size = len(query_heads) * hd
        else:
            kv_rows = _head_rows(kv_heads, hd)
            per_kv = [sum(1 for h in query_heads if h // group == g) for g in kv_heads]
            if len(set(per_kv)) != 1 or per_kv[0] == 0 or any(h // group not in kv_heads for h in query_heads):
                raise ValueError("every kept KV head must keep the same (non-zero) number of its query heads")
            q, k, v = ins
            names = ("query", "key", "value") if self.spec.family == "bert" else ("q_proj", "k_proj", "v_proj")
            parent = attention.self if self.spec.family == "bert" else attention
            for name, lin, rows in zip(names, (q, k, v), (q_rows, kv_rows, kv_rows)):
                setattr(parent, name, _slice_linear(lin, rows=rows))
            if self.spec.family == "bert":
                parent.num_attention_heads = len(query_heads)
                parent.all_head_size = len(query_heads) * hd
            else:
                attention.num_key_value_groups = len(query_heads) // len(kv_heads)
        new_out = _slice_linear(out, cols=q_rows)
        if self.spec.family == "bert":
            attention.output.dense = new_out
        elif layout == "fused-qkv":
            attention.c_proj = new_out
        else:
            attention.o_proj = new_out

    def keep_neurons(self, block_index: int, neurons: list[int]) -> None:
        """Physically shrink one block's MLP to the given hidden neurons (kept in order)."""
        block = self.blocks()[block_index]
        idx = torch.as_tensor(sorted(neurons), dtype=torch.long)
        ins, out = self.mlp_linears(block_index)
        names = {id(m): n for n, m in block.named_modules()}
        for lin in ins:
            set_submodule(block, names[id(lin)], _slice_linear(lin, rows=idx))
        set_submodule(block, names[id(out)], _slice_linear(out, cols=idx))

    def structure_record(self) -> dict:
        """Per-block structure that differs from what the config builds: removed sub-layers and
        attention/MLP widths, ``{"blocks": {index: {...}}}`` (empty when nothing differs)."""
        config = self.model.config
        default_q = config.num_attention_heads
        default_kv = getattr(config, "num_key_value_heads", None) or default_q
        default_ffn = _default_mlp_width(self.spec.family, config)
        blocks: dict[str, dict] = {}
        for i in range(self.num_layers()):
            entry: dict = {}
            removed = [k for k in ("attention", "mlp") if self.sublayer_removed(i, k)]
            if removed:
                entry["removed"] = removed
            if "attention" not in removed:
                n_q, n_kv = self.attention_heads(i)
                if (n_q, n_kv) != (default_q, default_kv):
                    entry["heads"] = [n_q, n_kv]
            if "mlp" not in removed and self.mlp_width(i) != default_ffn:
                entry["mlp_width"] = self.mlp_width(i)
            if entry:
                blocks[str(i)] = entry
        return {"blocks": blocks} if blocks else {}

    def apply_structure_record(self, record: dict) -> None:
        """Rebuild the structure described by :meth:`structure_record` on a model freshly built
        from its config (the weights are loaded afterwards)."""
        for key, entry in (record or {}).get("blocks", {}).items():
            i = int(key)
            for kind in entry.get("removed", []):
                self.remove_sublayer(i, kind)
            if "heads" in entry:
                n_q, n_kv = entry["heads"]
                _, cur_kv = self.attention_heads(i)
                group_now = self.attention_heads(i)[0] // cur_kv
                per_group = n_q // n_kv
                self.keep_heads(i, [g * group_now + j for g in range(n_kv) for j in range(per_group)], list(range(n_kv)))
            if "mlp_width" in entry:
                self.keep_neurons(i, list(range(entry["mlp_width"])))


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


# ----- sub-layer removal and width edits: helpers ----------------------------------------------
# The norm that feeds each sub-layer in pre-norm families (removed with the sub-layer).
_SUBLAYER_NORMS: dict[str, dict[str, str]] = {
    "llama": {"attention": "input_layernorm", "mlp": "post_attention_layernorm"},
    "qwen2": {"attention": "input_layernorm", "mlp": "post_attention_layernorm"},
    "gpt2": {"attention": "ln_1", "mlp": "ln_2"},
}


class RemovedSublayer(nn.Module):
    """A parameter-free stand-in for a removed attention/MLP sub-layer (or the norm feeding it).

    ``returns``: ``"zero"`` (a 0-dim zero: ``residual + 0`` leaves the stream unchanged),
    ``"zero-pair"`` (``(0, None)`` for attention modules that return ``(output, weights)``),
    ``"passthrough-pair"`` (``(hidden_states, None)``: BERT's attention, whose output replaces
    the stream), ``"identity"`` (its first input) or ``"second-arg"`` (BERT's output sub-module
    ``(h, input_tensor) -> input_tensor``).
    """

    KINDS = ("zero", "zero-pair", "passthrough-pair", "identity", "second-arg")

    def __init__(self, returns: str) -> None:
        super().__init__()
        if returns not in self.KINDS:
            raise ValueError(returns)
        self.returns = returns

    def forward(self, hidden_states: torch.Tensor | None = None, *args, **kwargs):
        if self.returns == "zero":
            return hidden_states.new_zeros(())
        if self.returns == "zero-pair":
            return hidden_states.new_zeros(()), None
        if self.returns == "passthrough-pair":
            return hidden_states, None
        if self.returns == "identity":
            return hidden_states
        return args[0] if args else kwargs["input_tensor"]

    def extra_repr(self) -> str:
        return f"returns={self.returns}"


def _out_features(module: nn.Module) -> int:
    """Output width of a float, quantized or factored linear module."""
    if hasattr(module, "out_features"):
        return int(module.out_features)
    if hasattr(module, "weight_shape"):
        return int(module.weight_shape[0])
    return int(module.weight.shape[0])


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row indices (len(heads) * head_dim,) of whole heads in a projection's output."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in sorted(heads)]) if heads else torch.zeros(0, dtype=torch.long)


def _slice_linear(linear: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding the selected output rows / input columns of ``linear``."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{type(linear).__name__} is not a float linear layer")
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        w = w.index_select(0, rows)
        b = b.index_select(0, rows) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols)
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.requires_grad_(linear.weight.requires_grad)
    return new


def _default_mlp_width(family: str, config) -> int:
    if family == "gpt2":
        return getattr(config, "n_inner", None) or 4 * config.hidden_size
    return config.intermediate_size
