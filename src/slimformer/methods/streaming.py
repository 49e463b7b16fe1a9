"""Streamed weights: a model whose transformer blocks stay in their safetensors file until a
calibrated method works on them.

The model is built with empty (meta-device) parameters; the parts before and around the blocks
(embeddings, final norm) are loaded at once, each block only when ``blockwise`` reaches it
(``materialize``), read from the memory-mapped file, and an untied output head at the end (or
when a step calibrates it). After the method replaced its linears,
only the compressed block stays in memory, so peak memory is bounded by one float block, the
calibration activations and the statistics, not by the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from slimformer.errors import ModelLoadError, UnsupportedArchitectureError
from slimformer.models.adapters import ArchitectureAdapter, spec_for_model_type
from slimformer.models.loading import LoadedModel, _quiet_transformers, _read_pooling, check_safetensors_file, from_module

# Methods whose transform visits layers only through ``blockwise`` (so blocks may stay on disk
# until it reaches them); any other step first loads every remaining block.
STREAMABLE_METHODS = frozenset({"gptq", "awq", "adadim", "vptq", "wanda", "smoothquant"})


class StreamedWeights:
    """Where the weights of a meta-device model live: ``key -> safetensors file``."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self.files = files
        self.where: dict[str, Path] = {}
        for f in files:
            check_safetensors_file(f)
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    self.where[key] = f

    def _load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        for f, ks in by_file.items():
            with safe_open(str(f), framework="pt") as fh:
                for k in ks:
                    out[k] = fh.get_tensor(k)
        return out

    def materialize(self, prefix: str, module: nn.Module) -> int:
        """Load every meta parameter/buffer of ``module`` (named ``prefix.<name>`` in the file);
        returns the number of tensors loaded."""
        missing = [(n, t) for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if not missing:
            return 0
        keys = [f"{prefix}.{n}" if prefix else n for n, _ in missing]
        absent = [k for k in keys if k not in self.where]
        if absent:
            raise ModelLoadError(f"the weights file has no tensor {absent[0]!r}", "pass a complete Hugging Face checkpoint")
        tensors = self._load(keys)
        for (name, old), key in zip(missing, keys):
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            # A copy, not a view of the memory-mapped file: a view would keep the file's mapping
            # (and every page of it the forward touched) resident after the block's float
            # weights are replaced, so memory would grow with depth.
            value = tensors.pop(key).to(old.dtype, copy=True)
            if isinstance(old, nn.Parameter):
                setattr(owner, attr, nn.Parameter(value, requires_grad=False))
            else:
                owner.register_buffer(attr, value)
        return len(missing)


def is_streamed(model: nn.Module) -> bool:
    """Whether some weights of ``model`` are still on disk (meta device)."""
    return any(p.is_meta for p in model.parameters())


def materialize_all(loaded: LoadedModel) -> None:
    """Load every block still on disk (for steps that need the whole model)."""
    weights = getattr(loaded, "streamed_weights", None)
    if weights is None:
        return
    adapter = loaded.adapter
    for i, block in enumerate(adapter.blocks()):
        weights.materialize(adapter.block_prefix(i), block)
    weights.materialize("", loaded.model)


def load_streamed(folder: str | os.PathLike) -> LoadedModel:
    """Load a Hugging Face folder (config, ``*.safetensors``, tokenizer) with its blocks left on
    disk. The result has ``streamed_weights``; ``compress`` loads each block when it is reached.
    """
    import transformers
    from accelerate import init_empty_weights

    folder = Path(folder)
    _quiet_transformers()
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        raise ModelLoadError(f"{folder} has no config.json or no .safetensors weights", "pass a Hugging Face folder with safetensors weights to stream")
    config = transformers.AutoConfig.from_pretrained(folder)
    spec = spec_for_model_type(config.model_type)
    if spec.family == "gpt2":
        raise UnsupportedArchitectureError("streamed weights do not support GPT-2 (its Conv1D layers are converted on load)", "load the model without streaming")
    auto = transformers.AutoModelForCausalLM if spec.kind == "causal-lm" else transformers.AutoModel
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=torch.float32)
    weights = StreamedWeights(files)
    _strip_prefix_if_needed(model, weights)
    adapter = ArchitectureAdapter(model)
    head = adapter.head()
    tied = head is not None and getattr(config, "tie_word_embeddings", False)
    # the output head (when not tied) is only needed by steps that calibrate it or at the end
    lazy = {id(m) for b in adapter.blocks() for m in b.modules()} | ({id(head[1])} if head is not None and not tied else set())
    names = adapter.qualified_names()
    for module in model.modules():
        if id(module) in lazy:
            continue
        own = [n for n, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)) if t.is_meta]
        if own:
            _materialize_own(weights, names[id(module)], module, own)
    tie_if_needed(model)
    if model.get_input_embeddings().weight.is_meta:
        raise ModelLoadError(f"the weights in {folder} do not hold the model's embedding table", "pass a complete Hugging Face checkpoint")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    loaded = from_module(model, tokenizer, source=str(folder.resolve()), pooling=_read_pooling(folder))
    loaded.streamed_weights = weights  # read by compress()
    return loaded


def _strip_prefix_if_needed(model: nn.Module, weights: StreamedWeights) -> None:
    """Checkpoints of a bare base model (e.g. BERT) may name keys without the model prefix, or
    with it; map the file's keys onto the model's names."""
    wanted = {n for n, _ in model.named_parameters()}
    if wanted & set(weights.where):
        return
    base = getattr(model, "base_model_prefix", "")
    remapped = {}
    for k, f in weights.where.items():
        if base and k.startswith(base + "."):
            remapped[k[len(base) + 1 :]] = f
        else:
            remapped[k] = f
    weights.where = remapped


def _materialize_own(weights: StreamedWeights, prefix: str, module: nn.Module, names: list[str]) -> None:
    for n in names:
        key = f"{prefix}.{n}" if prefix else n
        if key not in weights.where:
            continue
        value = weights._load([key])[key]
        old = getattr(module, n)
        if isinstance(old, nn.Parameter):
            setattr(module, n, nn.Parameter(value.to(old.dtype), requires_grad=False))
        else:
            module.register_buffer(n, value.to(old.dtype))


def tie_if_needed(model: nn.Module) -> None:
    """Tie the output head to the input embeddings when the config says so and the head is empty."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight.is_meta and getattr(model.config, "tie_word_embeddings", False):
        head.weight = model.get_input_embeddings().weight


def describe(loaded: LoadedModel) -> dict:
    """Which tensors are in memory and which still on disk (for logs and tests)."""
    on_disk = [n for n, p in loaded.model.named_parameters() if p.is_meta]
    return {"on_disk": len(on_disk), "in_memory": sum(1 for _ in loaded.model.parameters()) - len(on_disk), "files": [str(f) for f in getattr(loaded, "streamed_weights").files]}


__all__ = ["STREAMABLE_METHODS", "StreamedWeights", "is_streamed", "load_streamed", "materialize_all"]
