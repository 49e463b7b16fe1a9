"""GGUF export and GGUF block modules: exact round trips (write -> read with the ``gguf``
package -> same codes, scales and minima), refusals naming the setting that would map, and
keep-quantized loading of a GGUF file."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from slimformer.compress import compress
from slimformer.io.gguf_export import ExportError, export_gguf
from slimformer.io.gguf_import import keep_gguf_quantized, rope_row_permutation
from slimformer.io.serialization import load_compressed, save_compressed
from slimformer.methods.quantization import RTNConfig
from slimformer.methods.quantization.gguf_blocks import (
    GGUFBlockEmbedding,
    GGUFBlockLinear,
    blocks_from_codes,
    codes_from_blocks,
)
from slimformer.methods.quantization.modules import PackedWeight
from slimformer.recipe import Recipe

LAYOUTS = {"Q8_0": (8, True), "Q4_0": (4, True), "Q4_1": (4, False)}


def _random_blocks(gguf_type: str, rows: int = 6, cols: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bits = 8 if gguf_type == "Q8_0" else 4
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = (torch.rand(rows, cols // 32, generator=g) * 0.02 + 1e-4).half()
    mins = (-torch.rand(rows, cols // 32, generator=g) * 0.1).half() if gguf_type == "Q4_1" else None
    return codes, scales, mins


@pytest.mark.parametrize("gguf_type", list(LAYOUTS))
def test_block_bytes_round_trip_and_dequantize_like_ggml(gguf_type):
    codes, scales, mins = _random_blocks(gguf_type)
    data = blocks_from_codes(codes.numpy(), scales.numpy(), None if mins is None else mins.numpy(), gguf_type)
    qtype = gguf.GGMLQuantizationType[gguf_type]
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    assert data.shape == (6, 96 // 32 * block_bytes)
    c2, s2, m2 = codes_from_blocks(data, 96, gguf_type)
    assert np.array_equal(c2, codes.numpy()) and np.array_equal(s2.view(np.uint16), scales.numpy().view(np.uint16))
    if mins is not None:
        assert np.array_equal(m2.view(np.uint16), mins.numpy().view(np.uint16))
    module = GGUFBlockLinear.from_blocks(codes, scales, mins, gguf_type)
    ref = gguf.quants.dequantize(data, qtype)
    assert torch.equal(module.dequantized_weight(), torch.from_numpy(ref))  # bit for bit
    assert np.array_equal(module.gguf_bytes(), data)
    x = torch.randn(3, 96)
    assert torch.allclose(module(x), x @ torch.from_numpy(ref).T, atol=1e-5)
    emb = GGUFBlockEmbedding.from_blocks(codes, scales, mins, gguf_type)
    ids = torch.tensor([[5, 0, 2]])
    assert torch.equal(emb(ids)[0], torch.from_numpy(ref)[[5, 0, 2]])
    assert module.stored_bits() == 8 * (module.qweight.numel() + 2 * scales.numel() * (2 if mins is not None else 1))


def _quantized_tiny(tiny_factory, family: str, bits: int, symmetric: bool, group_size: int = 32, targets=("linear", "embedding", "head")):
    loaded = tiny_factory(family)
    recipe = Recipe(name="t", steps=[RTNConfig(bits=bits, group_size=group_size, symmetric=symmetric, targets=targets)])
    return compress(loaded, recipe)


def _q4_1_exact(loaded):
    """Clear the last mantissa bit of every asymmetric 4-bit scale (bfloat16): ``zero * scale``
    then needs at most 11 significant bits, so GGUF's fp16 minimum holds it exactly. (Our
    asymmetric grids do not guarantee this; the export refuses the groups where it fails.)"""
    for module in loaded.model.modules():
        if isinstance(module, PackedWeight) and not module.symmetric and module.bits == 4:
            bits = module.scales.view(torch.int16) & ~1
            module.scales.copy_(bits.view(torch.bfloat16))
            module.prepare()
    return loaded


def _read(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("family,gguf_type", [("llama", "Q8_0"), ("llama", "Q4_0"), ("llama", "Q4_1"), ("qwen2", "Q4_0")])
def test_export_round_trip_same_codes_and_scales(tiny_factory, tmp_path, family, gguf_type):
    bits, symmetric = LAYOUTS[gguf_type]
    loaded = _quantized_tiny(tiny_factory, family, bits, symmetric)
    if gguf_type == "Q4_1":
        _q4_1_exact(loaded)
    out = export_gguf(loaded, tmp_path / "m.gguf", gguf_type)
    reader, tensors = _read(out)
    assert reader.fields["general.architecture"].contents() == family
    assert reader.fields["general.file_type"].contents() == {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[gguf_type]
    config = loaded.model.config
    checked = 0
    for name, module in loaded.model.named_modules():
        if not isinstance(module, PackedWeight):
            continue
        gname = {"model.embed_tokens": "token_embd.weight", "lm_head": "output.weight"}.get(name)
        if gname is None:
            layer, part = name.split(".")[2], name.split(".")[-1]
            gname = f"blk.{layer}." + {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                                        "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[part] + ".weight"
        if name == "lm_head" and config.tie_word_embeddings:
            assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
            continue
        t = tensors[gname]
        assert t.tensor_type.name == gguf_type
        data = np.asarray(t.data).reshape(int(t.shape[1]), -1)
        codes, scales, mins = codes_from_blocks(data, int(t.shape[0]), gguf_type)
        if family == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            heads = config.num_attention_heads if ".attn_q." in gname else config.num_key_value_heads
            back = np.argsort(rope_row_permutation(codes.shape[0], heads))
            codes, scales, data = codes[back], scales[back], data[back]
            mins = None if mins is None else mins[back]
        assert np.array_equal(codes, module.codes().numpy())
        assert np.array_equal(scales.astype(np.float32), module.scales.float().numpy())
        if mins is not None:
            assert np.array_equal(mins.astype(np.float32), (-module.zero_points() * module.scales.float()).numpy())
        dq = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[gguf_type])
        assert torch.equal(torch.from_numpy(dq), module.dequantized_weight())
        checked += 1
    assert checked == 4 * 7 + 1 + (0 if config.tie_word_embeddings else 1)
    for i in range(config.num_hidden_layers):  # norms as F32, exactly
        t = tensors[f"blk.{i}.attn_norm.weight"]
        assert t.tensor_type.name == "F32"
        assert np.array_equal(np.asarray(t.data), loaded.model.model.layers[i].input_layernorm.weight.numpy())
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == config.vocab_size


def test_export_refuses_layouts_that_do_not_map(tiny_factory, tmp_path):
    g64 = _quantized_tiny(tiny_factory, "llama", 4, True, group_size=64, targets=("linear",))
    with pytest.raises(ExportError, match="group_size: 32"):
        export_gguf(g64, tmp_path / "a.gguf", "Q4_0")
    asym = _quantized_tiny(tiny_factory, "llama", 4, False, targets=("linear",))
    with pytest.raises(ExportError, match="maps to Q4_1, not the requested Q4_0.*symmetric: true"):
        export_gguf(asym, tmp_path / "b.gguf", "Q4_0")
    three = _quantized_tiny(tiny_factory, "llama", 3, True, targets=("linear",))
    with pytest.raises(ExportError, match="3-bit symmetric group size 32 has no GGUF block format"):
        export_gguf(three, tmp_path / "c.gguf", "Q4_0")
    with pytest.raises(ExportError, match="not quantized"):
        export_gguf(tiny_factory("llama"), tmp_path / "d.gguf", "Q8_0")
    with pytest.raises(ExportError, match="not supported"):
        export_gguf(_quantized_tiny(tiny_factory, "gpt2", 4, True, targets=("linear",)), tmp_path / "e.gguf", "Q4_0")
    with pytest.raises(ExportError, match="Q4_1 cannot hold this weight exactly .the minima -zero.scale are not fp16"):
        export_gguf(asym, tmp_path / "f.gguf", "Q4_1")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_export_refuses_scales_fp16_cannot_hold(tiny_factory, tmp_path):
    loaded = _quantized_tiny(tiny_factory, "llama", 4, True, targets=("linear",))
    layer = loaded.model.model.layers[0].mlp.up_proj
    layer.scales[0, 0] = 2.0**-20 * (1 + 2.0**-7)  # a bfloat16 value below fp16's precision
    with pytest.raises(ExportError, match="up_proj: Q4_0 cannot hold this weight exactly .1 scales are not fp16"):
        export_gguf(loaded, tmp_path / "a.gguf", "Q4_0")


def test_float_embedding_written_as_f16_and_head_untied(tiny_factory, tmp_path):
    loaded = _quantized_tiny(tiny_factory, "llama", 4, True, targets=("linear",))
    _, tensors = _read(export_gguf(loaded, tmp_path / "m.gguf", "Q4_0"))
    assert tensors["token_embd.weight"].tensor_type.name == "F16"
    assert np.array_equal(np.asarray(tensors["output.weight"].data), loaded.model.lm_head.weight.half().numpy())


def test_keep_quantized_maps_blocks_exactly_and_exports_same_bytes(tiny_factory, tmp_path):
    """A GGUF (written here with mixed Q4_1 linears and a Q8_0 embedding) loaded with its
    quantized tensors kept: weights equal ggml's dequantization, the folder format saves them,
    and exporting again gives the same bytes for every tensor."""
    loaded = _quantized_tiny(tiny_factory, "llama", 4, False, targets=("linear",))
    compress(loaded, Recipe(name="e", steps=[RTNConfig(bits=8, group_size=32, symmetric=True, targets=("embedding", "head"))]))
    _q4_1_exact(loaded)
    src = export_gguf(loaded, tmp_path / "src.gguf", "Q4_1", float_type="F32")
    fresh = tiny_factory("llama")
    record = keep_gguf_quantized(fresh, src)
    assert record["gguf_types"]["model.embed_tokens"] == "Q8_0" and record["gguf_types"]["model.layers.0.self_attn.q_proj"] == "Q4_1"
    assert len(record["modules"]) == 4 * 7 + 2
    for name, module in loaded.model.named_modules():
        if isinstance(module, PackedWeight):
            kept = fresh.model.get_submodule(name)
            assert isinstance(kept, (GGUFBlockLinear, GGUFBlockEmbedding))
            assert torch.equal(kept.dequantized_weight(), module.dequantized_weight())
    fresh.source = str(src)
    folder = save_compressed(fresh, tmp_path / "folder")
    back = load_compressed(folder)
    ids = torch.tensor([[1, 17, 99, 4, 250]])
    with torch.no_grad():
        assert torch.equal(back.model(ids).logits, fresh.model(ids).logits)
        reference = tiny_factory("llama")  # float model holding the dequantized weights
        for name, module in loaded.model.named_modules():
            if isinstance(module, PackedWeight):
                reference.model.get_submodule(name).weight.data = module.dequantized_weight()
        assert torch.allclose(fresh.model(ids).logits, reference.model(ids).logits, atol=1e-5)
    again = export_gguf(back, tmp_path / "again.gguf", "Q4_1", float_type="F32")
    (_, a), (_, b) = _read(src), _read(again)
    assert set(a) == set(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name


def test_cli_export(tiny_factory, tmp_path, capsys):
    from slimformer.cli import main

    loaded = _quantized_tiny(tiny_factory, "qwen2", 4, True)
    folder = save_compressed(loaded, tmp_path / "folder")
    out = tmp_path / "m.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--type", "Q4_0", "--out", str(out)]) == 0
    _, tensors = _read(out)
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q4_0"
    assert main(["export", str(folder), "--type", "Q4_0", "--out", str(out)]) == 2  # exists, no --force
    assert main(["export", str(folder), "--type", "Q8_0", "--out", str(tmp_path / "q8.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("slimformer: error: model.") and "maps to Q4_0, not the requested Q8_0" in err[-1]
    assert not (tmp_path / "q8.gguf").exists()
