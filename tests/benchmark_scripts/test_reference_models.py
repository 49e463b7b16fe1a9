"""The reference-model builder: deterministic for a seed, resumable, cached, reports honest."""

import json

import pytest
import torch
from safetensors.torch import load_file

from slimformer.data import TextSpec, load_texts


@pytest.fixture(scope="module")
def rm(load_benchmark):
    return load_benchmark("reference_models")


@pytest.fixture(scope="module")
def small_corpus():
    return load_texts(TextSpec(n=200, seed=5)), load_texts(TextSpec(split="evaluation", n=40, seed=5))


def _micro(rm, name):
    return rm.ReferenceSpec(name, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, context=32,
                            train_tokens=12 * 4 * 32, batch_size=4, lr=3e-3, vocab_size=400, warmup_steps=2, checkpoint_every=2)


def test_build_is_deterministic_resumable_and_cached(rm, small_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a"))
    straight = rm.build(_micro(rm, "micro"), quiet=True, texts=small_corpus)
    assert straight == tmp_path / "a" / "slimformer" / "reference-models" / "micro"
    report = json.loads((straight / "training_report.json").read_text())

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    work = rm.build(_micro(rm, "micro"), quiet=True, texts=small_corpus, stop_after=6)
    assert (work / "checkpoint.safetensors").is_file() and not (tmp_path / "b" / "slimformer" / "reference-models" / "micro").exists()
    resumed = rm.build(_micro(rm, "micro"), quiet=True, texts=small_corpus)

    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "same seed, same weights, interrupted or not"
    assert json.loads((resumed / "training_report.json").read_text())["held_out_loss"] == report["held_out_loss"]

    mtime = (resumed / "model.safetensors").stat().st_mtime
    assert rm.build(_micro(rm, "micro"), quiet=True, texts=small_corpus) == resumed
    assert (resumed / "model.safetensors").stat().st_mtime == mtime, "a cached model is not rebuilt"

    assert report["steps"] == 12 and report["tokens_seen"] == 12 * 4 * 32
    import math

    assert report["held_out_perplexity"] == pytest.approx(math.exp(report["held_out_loss"]), rel=1e-3)
    assert report["loss_curve_every_10_steps"][0] > report["train_loss_last20"], "training lowers the loss"
    assert report["parameters"] == sum(t.numel() for k, t in a.items())


def test_checkpoint_loads_with_the_ordinary_loaders(rm, small_corpus, tmp_path, monkeypatch):
    from slimformer.models import load_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = rm.build(_micro(rm, "micro"), quiet=True, texts=small_corpus)
    loaded = load_model(folder)
    assert loaded.kind == "causal-lm" and type(loaded.model).__name__ == "LlamaForCausalLM"
    config = loaded.model.config
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention


def test_unigram_perplexity_of_a_uniform_stream(rm):
    stream = torch.arange(100).repeat(10)
    assert rm.unigram_perplexity(stream, stream, 100) == pytest.approx(100, rel=1e-9)
