"""The evaluation harness measures what it claims: identity is perfect, degradation shows,
bytes are the bytes on disk, bits per weight count scales and zero points."""

import copy

import pytest

from slimformer.compress import compress
from slimformer.data import TextSpec, load_texts
from slimformer.evaluate import EvalSettings, evaluate
from slimformer.evaluate.cost import model_cost
from slimformer.evaluate.quality import causal_quality, encoder_quality
from slimformer.io import save_compressed
from slimformer.methods import RTNConfig
from slimformer.recipe import Recipe

FAST = EvalSettings(n_texts=40, n_queries=10, max_length=64, latency_batch=4, latency_tokens=32, latency_repeats=2, latency_warmup=1)


def test_identity_is_perfect_for_causal_lms(tiny_factory):
    model = tiny_factory("llama")
    texts = load_texts(TextSpec(split="evaluation", n=12))
    q = causal_quality(model, copy.deepcopy(model), texts, max_length=64, batch_size=4)
    assert q["kl_divergence"] == pytest.approx(0, abs=1e-6)
    assert q["top1_agreement"] == 1.0
    assert q["perplexity"] == pytest.approx(q["perplexity_original"])
    assert q["n_tokens"] > 100


def test_degradation_shows_in_causal_metrics(tiny_factory):
    model = tiny_factory("qwen2")
    low = compress(copy.deepcopy(model), Recipe(steps=[RTNConfig(bits=2, group_size=None, symmetric=True)]))
    mid = compress(copy.deepcopy(model), Recipe(steps=[RTNConfig(bits=4, group_size=32)]))
    texts = load_texts(TextSpec(split="evaluation", n=12))
    q_low = causal_quality(model, low, texts, 64, 4)
    q_mid = causal_quality(model, mid, texts, 64, 4)
    assert q_low["kl_divergence"] > q_mid["kl_divergence"] > 0
    assert q_low["top1_agreement"] < q_mid["top1_agreement"] <= 1


def test_identity_is_perfect_for_encoders(tiny_factory):
    model = tiny_factory("bert")
    texts = load_texts(TextSpec(split="evaluation", n=30))
    q = encoder_quality(model, copy.deepcopy(model), texts, n_queries=8, max_length=64, batch_size=8)
    assert q["embedding_cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert q["retrieval_agreement_at_10"] == 1.0


def test_storage_bytes_are_the_bytes_on_disk_and_bits_count_metadata(tiny_factory, tmp_path):
    model = compress(tiny_factory("llama"), Recipe(steps=[RTNConfig(bits=4, group_size=32)]))
    cost = model_cost(model.model)
    folder = save_compressed(model, tmp_path / "m")
    assert cost["storage_bytes"] == (folder / "model.safetensors").stat().st_size
    # 4-bit codes + a bfloat16 scale and a uint8 zero point per 32 weights.
    assert cost["quantized_linear_bits_per_weight"] == pytest.approx(4 + (16 + 8) / 32)


def test_evaluate_reports_quality_cost_and_kernels(tiny_factory):
    original = tiny_factory("gpt2")
    compressed = compress(copy.deepcopy(original), Recipe(steps=[RTNConfig(bits=8, group_size=None, symmetric=True)]))
    result = evaluate(original, compressed, FAST)
    assert result["kind"] == "causal-lm"
    assert set(result["quality"]) >= {"perplexity", "kl_divergence", "top1_agreement"}
    cost = result["cost"]
    assert cost["size_ratio"] < 0.6  # linears at 8 bits, embeddings still fp32 in this tiny model
    assert cost["speedup"] > 0 and cost["latency_batch"] == [4, 32]
    assert sum(result["kernels"].values()) == 16


def test_compiled_timing_agrees_with_eager_and_is_taken_off_afterwards(tiny_factory):
    """``compile=``: the compressed model is compiled on the latency batch, its output checked
    against eager, and the model is eager again after the evaluation (its quality was measured
    eagerly)."""
    from slimformer.errors import ConfigError
    from slimformer.evaluate.report import row_of

    original = tiny_factory("bert")
    compressed = compress(copy.deepcopy(original), Recipe(steps=[RTNConfig(bits=8, group_size=None, symmetric=True)]))
    plain = evaluate(original, compressed, FAST)
    result = evaluate(original, compressed, FAST, compile="aot_eager")
    assert "compile" not in plain
    report = result["compile"]
    assert report["backend"] == "aot_eager" and report["compile_seconds"] > 0
    assert report["max_abs_diff"] <= 1e-3 * 10  # agreed with eager (the output scale is O(1..10))
    assert (report["speedup"] is not None) == report["compiled"]
    if not report["compiled"]:
        assert report["reason"].startswith("not faster than eager on the example batch (median of 5 interleaved rounds: ")
        assert report["ratio"] <= 1.0
    assert "forward" not in compressed.model.__dict__  # eager again
    assert result["quality"] == plain["quality"]  # quality is always measured eagerly
    row = row_of("m", {"evaluation": result})
    assert ("timed compiled (aot_eager" in row["kernels"]) == report["compiled"]
    with pytest.raises(ConfigError, match="not a compiler backend"):
        evaluate(original, compressed, FAST, compile="tensorrt")
