"""Loading a GGUF while keeping its quantized tensors as they are.

``load_gguf(path, keep_quantized=True)`` loads the model (transformers dequantizes every tensor),
then puts back each Q8_0 / Q4_0 / Q4_1 tensor of the file as a packed module of ours
(:mod:`slimformer.methods.quantization.gguf_blocks`: the same codes, fp16 scales and fp16
minima), so a user who starts from a GGUF loses nothing before compressing further: the kept
layers dequantize to exactly the weights transformers loaded, they are saved in our folder format
as they are, and ``slimformer export`` writes them back as the very same GGUF bytes.

Names: a Hugging Face module ``model.layers.3.self_attn.q_proj`` is GGUF's ``blk.3.attn_q``
(``gguf``'s own tensor name map). On the ``llama`` architecture GGUF stores the rows of the
query and key projections interleaved per head for its rotary embedding; they are permuted back
here (and forth again on export), rows only, so blocks stay intact.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimformer.errors import ConfigError, ModelLoadError
from slimformer.models.adapters import set_submodule
from slimformer.models.loading import LoadedModel, from_module

KEEP_KINDS = ("linear", "embedding", "head")


def find_gguf_file(path: str | os.PathLike) -> Path:
    """The ``.gguf`` file at ``path`` or the only one inside the folder ``path``."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir():
        files = sorted(p.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise ModelLoadError(f"{p} holds {len(files)} .gguf files", "pass the path of the one to load")
    raise ModelLoadError(f"{p} is not a .gguf file or a folder holding one", "pass a .gguf file")


def gguf_architecture(reader) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelLoadError("the GGUF file has no general.architecture", "re-create it with llama.cpp's converter")
    return str(field.contents())


def rope_row_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order that turns a Hugging Face q/k projection (rows, in) into llama.cpp's
    (``gguf_rows = hf_rows[perm]``); ``np.argsort(perm)`` goes back."""
    idx = np.arange(rows)
    dim = rows // n_head // 2
    return idx.reshape(n_head, 2, dim).swapaxes(1, 2).reshape(rows)


def permuted_heads(arch: str, gguf_name: str, config) -> int | None:
    """Heads whose rows llama.cpp interleaves for this tensor (None: stored as in Hugging Face)."""
    if arch != "llama":
        return None
    if ".attn_q." in gguf_name:
        return config.num_attention_heads
    if ".attn_k." in gguf_name:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def hf_to_gguf_names(model: nn.Module, arch: str) -> dict[str, str]:
    """GGUF tensor name of each linear/embedding module's weight, keyed by module name."""
    import gguf

    arch_enum = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if arch_enum is None:
        raise ModelLoadError(f"GGUF architecture {arch!r} is unknown to the gguf package", "upgrade the gguf package")
    n_layers = model.config.num_hidden_layers
    tmap = gguf.get_tensor_name_map(arch_enum, n_layers)
    names: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) or hasattr(module, "weight_shape"):
            mapped = tmap.get_name(name + ".weight", try_suffixes=(".weight",))
            if mapped is not None:
                names[name] = mapped
    return names


def load_gguf(path: str | os.PathLike, keep_quantized: bool | tuple[str, ...] = False) -> LoadedModel:
    """Load a GGUF model; ``keep_quantized`` (True, or some of ``"linear"``, ``"embedding"``,
    ``"head"``) keeps those of its Q8_0/Q4_0/Q4_1 tensors as packed GGUF block modules.

    The loaded model's ``source`` is the GGUF file, so an export copies its metadata and tokenizer.
    """
    import transformers

    from slimformer.models.loading import _quiet_transformers

    file = find_gguf_file(path)
    _quiet_transformers()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except Exception as exc:  # transformers raises many types for an unreadable GGUF
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"cannot load {file}: {message}", "pass a GGUF file of an architecture transformers supports") from exc
    loaded = from_module(model, tokenizer, source=str(file.resolve()))
    if keep_quantized:
        keep_gguf_quantized(loaded, file, KEEP_KINDS if keep_quantized is True else tuple(keep_quantized))
    return loaded


def keep_gguf_quantized(loaded: LoadedModel, file: str | os.PathLike, kinds: tuple[str, ...] = KEEP_KINDS) -> dict:
    """Replace the modules of ``kinds`` whose GGUF tensor in ``file`` is Q8_0/Q4_0/Q4_1 by GGUF
    block modules holding that tensor's codes, fp16 scales and minima. Returns the step record
    (also appended to ``loaded.applied``)."""
    import gguf

    from slimformer.methods.quantization.gguf_blocks import GGUF_TYPES, GGUFBlockEmbedding, GGUFBlockLinear, codes_from_blocks, tie_blocks

    bad = [k for k in kinds if k not in KEEP_KINDS]
    if bad:
        raise ConfigError(f"keep_quantized kind {bad[0]!r} is unknown", f"choose among {list(KEEP_KINDS)}")
    reader = gguf.GGUFReader(str(file))
    arch = gguf_architecture(reader)
    tensors = {t.name: t for t in reader.tensors}
    adapter = loaded.adapter
    emb_name, _ = adapter.embedding()
    head = adapter.head()
    head_name = head[0] if head is not None else None
    model = loaded.model
    kept: dict[str, str] = {}
    embedding_module = None
    for name, gname in hf_to_gguf_names(model, arch).items():
        kind = "embedding" if name == emb_name else "head" if name == head_name else "linear"
        if kind not in kinds or gname not in tensors:
            continue
        t = tensors[gname]
        qtype = t.tensor_type.name
        if qtype not in GGUF_TYPES:
            continue
        cols = int(t.shape[0])
        codes, scales, mins = codes_from_blocks(np.asarray(t.data).reshape(int(t.shape[1]), -1), cols, qtype)
        heads = permuted_heads(arch, gname, model.config)
        if heads is not None:
            back = np.argsort(rope_row_permutation(codes.shape[0], heads))
            codes, scales = codes[back], scales[back]
            mins = None if mins is None else mins[back]
        to_t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        old = model.get_submodule(name)
        if kind == "embedding":
            new = GGUFBlockEmbedding.from_blocks(to_t(codes), to_t(scales), to_t(mins), qtype, old.padding_idx)
            embedding_module = new
        else:
            new = GGUFBlockLinear.from_blocks(to_t(codes), to_t(scales), to_t(mins), qtype, getattr(old, "bias", None))
        set_submodule(model, name, new)
        kept[name] = qtype
    # A tied head has no tensor of its own in the GGUF: it shares the embedding's blocks.
    if head_name is not None and head_name not in kept and "head" in kinds and embedding_module is not None:
        old = model.get_submodule(head_name)
        if getattr(model.config, "tie_word_embeddings", False) and getattr(old, "weight", None) is not None:
            new = GGUFBlockLinear.from_blocks(embedding_module.codes(), embedding_module.scales, embedding_module.mins, embedding_module.gguf_type, getattr(old, "bias", None))
            tie_blocks(new, embedding_module)
            set_submodule(model, head_name, new)
            kept[head_name] = embedding_module.gguf_type
    record = {"step": {"method": "gguf-keep-quantized", "source": str(file), "kinds": list(kinds)}, "modules": sorted(kept), "gguf_types": kept}
    loaded.applied.append(record)
    return record
