"""Export to llama.cpp / Ollama: a GGUF file holding our quantized codes in GGUF's own blocks.

``export_gguf(loaded, out, gguf_type)`` writes every quantized weight into the GGUF block format
its layout maps to *exactly* (no requantization):

- ``Q8_0``: 8-bit, symmetric, group size 32 (our code - 128 = ggml's int8);
- ``Q4_0``: 4-bit, symmetric, group size 32 (our zero point 8 = ggml's implicit 8);
- ``Q4_1``: 4-bit, asymmetric, group size 32 (ggml's fp16 minimum = ``-zero * scale``);
- GGUF block modules kept from a source GGUF (``slimformer.io.gguf_import``): their own bytes.

Our scales are bfloat16, which fp16 represents exactly in its normal range; every tensor is
checked after conversion: ggml's dequantization of the written blocks must equal our dequantized
weight bit for bit, or the export is refused with one line naming the setting that would map
(group size, symmetry, bits, or scales/minima outside fp16). ``gguf_type`` is the type the
transformer's linear layers must have; the embedding and output head are written in whatever
block type they map to (or as float). Float tensors are written as F32 (1-D, e.g. norms) and
``float_type`` (F16 or F32) for matrices.

Metadata: when the model came from a GGUF (``loaded.source`` or the manifest's base model is a
``.gguf`` file), every key of that file is copied (architecture, hyper-parameters, tokenizer,
chat template) and only ``general.file_type`` changes. Otherwise the llama / qwen2
hyper-parameters are written from the transformers config and a byte-level BPE tokenizer from the
tokenizer's own vocabulary and merges.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimformer.errors import ConfigError, OutputExistsError, SlimformerError
from slimformer.io.gguf_import import hf_to_gguf_names, permuted_heads, rope_row_permutation
from slimformer.methods.quantization.gguf_blocks import BLOCK, GGUF_TYPES, GGUFBlockWeight, blocks_from_codes, dequantize_blocks
from slimformer.methods.quantization.modules import PackedWeight, QuantizedModule
from slimformer.models.loading import LoadedModel

EXPORT_TYPES = GGUF_TYPES
FLOAT_TYPES = ("F16", "F32")
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # transformers model_type -> GGUF architecture
# GGUF general.file_type of a file whose linears are of each type (llama.cpp's LLAMA_FTYPE_*).
FILE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}
LAYOUT_OF = {"Q8_0": (8, True), "Q4_0": (4, True), "Q4_1": (4, False)}  # bits, symmetric


class ExportError(SlimformerError):
    """A model whose weights cannot be written exactly in the requested GGUF layout."""


def _setting_for(gguf_type: str) -> str:
    bits, symmetric = LAYOUT_OF[gguf_type]
    return f"bits: {bits}, group_size: {BLOCK}, symmetric: {'true' if symmetric else 'false'}"


def layout_type(module: QuantizedModule, name: str) -> str:
    """The GGUF block type a quantized weight's layout corresponds to (``ExportError`` if none)."""
    if isinstance(module, GGUFBlockWeight):
        return module.gguf_type
    if not isinstance(module, PackedWeight):
        raise ExportError(
            f"{name}: {type(module).__name__} has no GGUF block layout",
            "export models quantized with rtn, gptq or hqq on a uniform grid (" + _setting_for("Q4_0") + ")",
        )
    bits, symmetric, group = module.bits, module.symmetric, module.group_size
    candidates = [t for t, (b, s) in LAYOUT_OF.items() if b == bits and s == symmetric]
    if group != BLOCK or not candidates:
        want = [t for t, (b, _s) in LAYOUT_OF.items() if b == bits] or list(LAYOUT_OF)
        raise ExportError(
            f"{name}: {bits}-bit {'symmetric' if symmetric else 'asymmetric'} group size {group} has no GGUF block format",
            "quantize with " + " or ".join(f"{_setting_for(t)} for {t}" for t in want),
        )
    return candidates[0]


def packed_to_gguf(module: QuantizedModule, name: str) -> tuple[str, np.ndarray]:
    """``(gguf_type, blocks (rows, row_bytes) uint8)`` of a quantized weight, exactly; raises
    ``ExportError`` when its layout has no exact GGUF block equivalent."""
    gguf_type = layout_type(module, name)
    if isinstance(module, GGUFBlockWeight):
        return gguf_type, module.gguf_bytes()
    bits = module.bits
    codes = module.codes()
    scale = module.scales.float()
    zero = module.zero_points()
    d16 = scale.to(torch.float16)
    mins = None
    if gguf_type == "Q4_1":
        mins = (-(zero * scale)).to(torch.float16)
    elif not torch.all(zero == 2 ** (bits - 1)):
        raise ExportError(f"{name}: symmetric grid with a zero point other than {2 ** (bits - 1)}", f"quantize with {_setting_for(gguf_type)}")
    exact = torch.equal(dequantize_blocks(codes, d16, mins, gguf_type), module.dequantized_weight())
    if not exact:
        bad_scale = int((d16.float() != scale).sum())
        what = f"{bad_scale} scales are not fp16-representable" if bad_scale else "the minima -zero*scale are not fp16-representable" if mins is not None else "its dequantization differs from ggml's"
        fix = f"quantize with {_setting_for('Q4_0')} and export as Q4_0" if gguf_type == "Q4_1" else "quantize again with scales inside fp16's range"
        raise ExportError(f"{name}: {gguf_type} cannot hold this weight exactly ({what})", fix)
    return gguf_type, blocks_from_codes(codes.numpy(), d16.numpy(), None if mins is None else mins.numpy(), gguf_type)


def source_gguf(loaded: LoadedModel) -> Path | None:
    """The GGUF file the model came from, when there is one on this machine."""
    for candidate in (loaded.source, (loaded.manifest or {}).get("base_model")):
        if candidate and str(candidate).endswith(".gguf") and Path(str(candidate)).is_file():
            return Path(str(candidate))
    return None


def _quantized(model: nn.Module) -> dict[str, QuantizedModule]:
    found: dict[str, QuantizedModule] = {}
    for n, m in model.named_modules():
        if isinstance(m, QuantizedModule) and not any(n.startswith(p + ".") for p in found):
            found[n] = m
    return found


def gguf_tensors(loaded: LoadedModel, gguf_type: str, float_type: str = "F16") -> tuple[str, list[tuple[str, np.ndarray, str]]]:
    """``(architecture, [(gguf_name, array, ggml_type), ...])`` for every tensor of the model:
    block bytes (rows, row_bytes) uint8 for quantized weights, float arrays otherwise."""
    import gguf

    if gguf_type not in EXPORT_TYPES:
        raise ConfigError(f"GGUF type {gguf_type!r} is not supported", f"use one of {list(EXPORT_TYPES)}")
    if float_type not in FLOAT_TYPES:
        raise ConfigError(f"float type {float_type!r} is not supported", f"use one of {list(FLOAT_TYPES)}")
    model = loaded.model
    model_type = model.config.model_type
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ExportError(f"GGUF export of {model_type!r} models is not supported", f"export one of {sorted(ARCHITECTURES)}")
    names = hf_to_gguf_names(model, arch)
    adapter = loaded.adapter
    emb_name, emb = adapter.embedding()
    head = adapter.head()
    quantized = _quantized(model)
    tensors: list[tuple[str, np.ndarray, str]] = []
    done: set[str] = set()

    def head_is_tied() -> bool:
        if head is None:
            return False
        h = head[1]
        if isinstance(h, QuantizedModule) and isinstance(emb, QuantizedModule):
            return h.storage_key() is emb.storage_key()
        return getattr(h, "weight", None) is getattr(emb, "weight", object())

    tied = head_is_tied()
    for name, module in quantized.items():
        done.add(name)
        if head is not None and name == head[0] and tied:
            continue
        gname = names.get(name)
        if gname is None:
            raise ExportError(f"{name} has no GGUF tensor name for the {arch} architecture", "quantize only the standard linear layers and the embedding")
        is_linear = name != emb_name and (head is None or name != head[0])
        qtype = layout_type(module, name)
        if is_linear and qtype != gguf_type:
            raise ExportError(f"{name} maps to {qtype}, not the requested {gguf_type}", f"export with --type {qtype}, or quantize with {_setting_for(gguf_type)}")
        qtype, blocks = packed_to_gguf(module, name)
        heads = permuted_heads(arch, gname, model.config)
        if heads is not None:
            blocks = blocks[rope_row_permutation(blocks.shape[0], heads)]
        tensors.append((gname, np.ascontiguousarray(blocks), qtype))
    tmap = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], model.config.num_hidden_layers)
    float_linears = []
    for pname, param in model.named_parameters():
        module_name = pname.rpartition(".")[0]
        if any(module_name == q or module_name.startswith(q + ".") for q in done):
            continue
        if head is not None and module_name == head[0] and tied:
            continue
        gname = tmap.get_name(pname, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ExportError(f"{pname} has no GGUF tensor name for the {arch} architecture", "export a standard transformers checkpoint of this family")
        if param.dim() == 2 and module_name not in (emb_name, head[0] if head else None):
            float_linears.append(module_name)
        arr = param.detach().float().numpy()
        heads = permuted_heads(arch, gname, model.config)
        if heads is not None:
            arr = arr[rope_row_permutation(arr.shape[0], heads)]
        kind = "F32" if arr.ndim == 1 or float_type == "F32" else "F16"
        tensors.append((gname, np.ascontiguousarray(arr.astype(np.float32 if kind == "F32" else np.float16)), kind))
    if float_linears:
        raise ExportError(
            f"{float_linears[0]} (and {len(float_linears) - 1} more linear layers) are not quantized",
            f"compress with rtn or gptq ({_setting_for(gguf_type)}) before exporting as {gguf_type}",
        )
    return arch, tensors


def _copy_metadata(writer, source: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(source))
    skip = {"general.architecture", "general.file_type", "general.alignment"}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), vtype)


def _write_config_metadata(writer, loaded: LoadedModel, arch: str) -> None:
    """Hyper-parameters and tokenizer of a model that did not come from a GGUF."""
    import gguf

    c = loaded.model.config
    writer.add_name(str(getattr(c, "_name_or_path", "") or loaded.source or "slimformer"))
    writer.add_context_length(int(c.max_position_embeddings))
    writer.add_embedding_length(int(c.hidden_size))
    writer.add_block_count(int(c.num_hidden_layers))
    writer.add_feed_forward_length(int(c.intermediate_size))
    writer.add_head_count(int(c.num_attention_heads))
    writer.add_head_count_kv(int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    writer.add_rope_freq_base(float(theta or getattr(c, "rope_theta", 10000.0)))
    writer.add_vocab_size(int(c.vocab_size))
    tok = loaded.tokenizer
    if tok is None or not hasattr(tok, "backend_tokenizer"):
        return
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        return
    vocab: dict[str, int] = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    size = max(int(c.vocab_size), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    if merges:
        writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tok, attr, None)
        if value is not None:
            add(int(value))
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def export_gguf(loaded: LoadedModel, out: str | os.PathLike, gguf_type: str, float_type: str = "F16", force: bool = False) -> Path:
    """Write ``loaded`` as a GGUF file at ``out`` (see the module docstring); the file is written
    under a temporary name beside ``out`` and renamed at the end."""
    import gguf

    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"output file {out} already exists", "choose another --out or pass --force to replace it")
    if out.exists() and out.is_dir():
        raise OutputExistsError(f"output path {out} is a folder", "pass a file path ending in .gguf")
    arch, tensors = gguf_tensors(loaded, gguf_type, float_type)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        source = source_gguf(loaded)
        if source is not None:
            _copy_metadata(writer, source)
        else:
            _write_config_metadata(writer, loaded, arch)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(FILE_TYPES[gguf_type])
        for gname, arr, kind in tensors:
            writer.add_tensor(gname, arr, raw_dtype=gguf.GGMLQuantizationType[kind])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


__all__ = ["EXPORT_TYPES", "ExportError", "export_gguf", "gguf_tensors", "packed_to_gguf", "source_gguf"]
