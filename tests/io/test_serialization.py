"""Compressed folders: really smaller, bit-exact round trips, corrupt files rejected."""

import json

import pytest
import torch
from conftest import model_output, sample_batch

import slimformer
from slimformer.compress import compress
from slimformer.errors import ModelLoadError, OutputExistsError
from slimformer.io import load_compressed, save_compressed
from slimformer.methods import GPTQConfig, RTNConfig, ShortGPTConfig
from slimformer.methods.quantization import QuantizedLinear
from slimformer.recipe import Recipe


def _compressed(tiny, calibration):
    recipe = Recipe(
        steps=[ShortGPTConfig(num_layers=1), GPTQConfig(bits=4, group_size=32), RTNConfig(bits=8, group_size=None, symmetric=True, targets=("embedding", "head"))],
        calibration=calibration,
    )
    return compress(tiny, recipe)


def test_round_trip_is_bit_exact_and_keeps_the_manifest(tiny, fast_calibration, tmp_path):
    model = _compressed(tiny, fast_calibration)
    batch = sample_batch(model)
    before = model_output(model, batch)
    folder = save_compressed(model, tmp_path / "m", evaluation={"quality": {"x": 1.0}})
    loaded = slimformer.load(folder)
    assert torch.equal(model_output(loaded, batch), before)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["recipe"]["steps"][1]["method"] == "gptq"
    assert manifest["evaluation"] == {"quality": {"x": 1.0}}
    assert set(manifest["versions"]) >= {"slimformer", "torch", "transformers", "safetensors"}
    assert all(desc["bits"] in (4, 8) for desc in manifest["modules"].values())
    assert loaded.applied[0]["dropped_layers"] == model.applied[0]["dropped_layers"]


def test_four_bit_weights_take_half_a_byte_on_disk(tiny_factory, tmp_path):
    model = tiny_factory("llama")
    compress(model, Recipe(steps=[RTNConfig(bits=4, group_size=32)]))
    folder = save_compressed(model, tmp_path / "m")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for name, module in model.model.named_modules():
            if isinstance(module, QuantizedLinear):
                q = f.get_tensor(f"{name}.qweight")
                assert q.dtype == torch.uint8
                assert q.numel() * 2 == module.in_features * module.out_features
                assert f.get_tensor(f"{name}.scales").numel() == module.out_features * module.in_features // 32


def test_output_folder_is_never_half_written(tiny_factory, tmp_path, monkeypatch):
    model = tiny_factory("bert")
    out = tmp_path / "out"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("slimformer.io.serialization.save_file", boom)
    with pytest.raises(RuntimeError):
        save_compressed(model, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tiny_factory, tmp_path):
    model = tiny_factory("bert")
    out = save_compressed(model, tmp_path / "out")
    with pytest.raises(OutputExistsError):
        save_compressed(model, out)
    save_compressed(model, out, force=True)
    assert (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_or_truncated_weights_are_rejected(tiny_factory, tmp_path, damage):
    model = tiny_factory("gpt2")
    folder = save_compressed(model, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\xff" * 64 + data[64:])
    else:
        weights.write_bytes(b"")
    with pytest.raises(ModelLoadError) as info:
        load_compressed(folder)
    assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_tied_embedding_and_head_quantized_together_are_stored_once(tiny_factory, tmp_path):
    model = tiny_factory("qwen2")  # tie_word_embeddings=True
    assert model.model.lm_head.weight is model.model.model.embed_tokens.weight
    compress(model, Recipe(steps=[RTNConfig(bits=8, group_size=None, symmetric=True, targets=("embedding", "head"))]))
    head, emb = model.model.lm_head, model.model.model.embed_tokens
    assert head.qweight is emb.qweight and head.scales is emb.scales
    folder = save_compressed(model, tmp_path / "m")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert sum(k.endswith(".qweight") and ("lm_head" in k or "embed_tokens" in k) for k in f.keys()) == 1
    again = load_compressed(folder)
    assert again.model.lm_head.qweight is again.model.model.embed_tokens.qweight
    batch = sample_batch(model)
    assert torch.equal(model_output(again, batch), model_output(model, batch))


def test_auxiliary_weights_are_quantized_stored_smaller_and_round_trip(tiny_factory, tmp_path):
    """``targets: [auxiliary]`` reaches BERT's position/token-type embeddings and pooler (outside
    the blocks, not the token table), stores them as 8-bit codes and reloads them bit for bit."""
    model = tiny_factory("bert")
    names = set(model.adapter.auxiliary_modules())
    assert names == {"embeddings.position_embeddings", "embeddings.token_type_embeddings", "pooler.dense"}
    batch = sample_batch(model)
    before = model_output(model, batch)
    fp32_bytes = sum(m.weight.numel() * 4 for m in model.adapter.auxiliary_modules().values())
    compress(model, Recipe(steps=[RTNConfig(bits=8, group_size=None, symmetric=True, targets=("auxiliary",))]))
    assert model.adapter.auxiliary_modules() == {}  # all replaced by quantized modules
    after = model_output(model, batch)
    assert (after - before).abs().max() < 0.05 * before.abs().max()
    folder = save_compressed(model, tmp_path / "m")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = [f.get_tensor(k) for k in f.keys() if k.startswith(("embeddings.position", "embeddings.token_type", "pooler.dense.")) and not k.endswith("bias")]
    held = sum(t.numel() * t.element_size() for t in stored)
    assert held < 0.3 * fp32_bytes
    again = load_compressed(folder)
    assert torch.equal(model_output(again, batch), after)


def test_methods_that_need_activations_refuse_the_auxiliary_target():
    from slimformer.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown target 'auxiliary'"):
        GPTQConfig(bits=4, targets=("auxiliary",))


def test_a_model_saved_while_on_a_run_time_attention_kernel_loads_on_sdpa(tiny_factory, tmp_path):
    """An execution plan may leave an encoder on the AMX tile attention; the saved folder must
    still load (the kernel is this machine's choice, planned again at load) and compute the same."""
    from slimformer.models import attention_implementation, set_attention
    from slimformer.runtime.tile_attention import NAME

    model = tiny_factory("bert")
    batch = sample_batch(model)
    before = model_output(model, batch)
    assert set_attention(model.model, NAME) and attention_implementation(model.model) == NAME
    folder = save_compressed(model, tmp_path / "m")
    assert json.loads((folder / "manifest.json").read_text())["attn_implementation"] == "sdpa"
    loaded = slimformer.load(folder, execution="off")
    assert attention_implementation(loaded.model) == "sdpa"
    torch.testing.assert_close(model_output(loaded, batch), before, atol=1e-6, rtol=1e-6)
