"""KV-cache compression: identity at ratio 0, kept entries are the top scores, lengths follow the
budget in prefill and decoding, quantization within its grid's bound, measured bytes equal the
formula, and the cache works through Hugging Face generate."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from slimformer.errors import ConfigError
from slimformer.runtime.kv import kv_cache, kv_config_from_dict, kv_methods
from slimformer.runtime.kv.storage import dequantize, max_error, pack_codes, quantize, unpack_codes

CAUSAL = ("llama", "qwen2")
EVICTING = [
    {"method": "streaming-llm", "ratio": 0.5},
    {"method": "knorm", "ratio": 0.6},
    {"method": "tova", "ratio": 0.5},
    {"method": "snapkv", "ratio": 0.7, "budget": "pyramid"},
    {"method": "h2o", "ratio": 0.5},
    {"method": "snapkv", "ratio": 0.5, "bits": 4, "group": 16, "window": 8},
    {"method": "information", "ratio": 0.6, "bits": 4, "group": 16, "window": 8},
]


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (1, n), generator=g)


def _forward(model, cache, ids, start):
    pos = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    return model(ids, cache=cache, position_ids=pos, use_cache=True).logits


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("method", ["snapkv", "h2o", "tova", "knorm", "streaming-llm"])
@torch.no_grad()
def test_ratio_zero_is_the_identity(tiny_factory, family, method):
    loaded = tiny_factory(family)
    model, ids = loaded.model.eval(), _ids(40)
    ref_cache, cache = DynamicCache(config=model.config), kv_cache(loaded, {"method": method, "ratio": 0.0, "fp_dtype": "model"})
    with cache.attach(loaded):
        for start, chunk in ((0, ids[:, :30]), (30, ids[:, 30:31]), (31, ids[:, 31:36]), (36, ids[:, 36:37])):
            assert torch.equal(_forward(model, ref_cache, chunk, start), _forward(model, cache, chunk, start))


@torch.no_grad()
def test_kept_entries_are_exactly_the_top_scores(tiny_factory):
    loaded = tiny_factory("llama")
    model, ids = loaded.model.eval(), _ids(50)
    ref = DynamicCache(config=model.config)
    model(ids, cache=ref)
    cache = kv_cache(loaded, {"method": "knorm", "ratio": 0.6, "window": 0, "fp_dtype": "model"})
    with cache.attach(loaded):
        model(ids, cache=cache)
    keep = math.ceil(0.4 * 50)
    for layer, full in zip(cache.layers, ref.layers):
        expected = (-full.keys.norm(dim=-1)).topk(keep, dim=-1).indices.sort(-1).values
        assert torch.equal(layer.kept_indices, expected)
        assert torch.equal(layer.keys, full.keys.gather(2, expected.unsqueeze(-1).expand(-1, -1, -1, full.keys.shape[-1])))


@torch.no_grad()
def test_streaming_keeps_sinks_and_the_most_recent(tiny_factory):
    loaded = tiny_factory("qwen2")
    model, ids = loaded.model.eval(), _ids(40)
    ref = DynamicCache(config=model.config)
    model(ids, cache=ref)
    cache = kv_cache(loaded, {"method": "streaming-llm", "ratio": 0.5, "sinks": 4, "window": 0, "fp_dtype": "model"})
    model(ids, cache=cache)
    expected = torch.cat([torch.arange(4), torch.arange(40 - 16, 40)])
    assert torch.equal(cache.layers[1].keys, ref.layers[1].keys[:, :, expected])


@pytest.mark.parametrize("spec", EVICTING, ids=lambda s: "-".join(f"{v}" for v in s.values()))
@torch.no_grad()
def test_length_follows_the_budget_in_prefill_and_decoding(tiny_factory, spec):
    loaded = tiny_factory("llama")
    model, ids = loaded.model.eval(), _ids(64)
    cache = kv_cache(loaded, spec)
    config = kv_config_from_dict(spec)
    with cache.attach(loaded):
        _forward(model, cache, ids, 0)
        for i in range(12):
            for layer in cache.layers:
                budget = max(min(layer.seen, config.window + config.sinks), math.ceil(layer.keep * layer.seen - 1e-9))
                assert layer.get_seq_length() == budget
                assert layer.seen == 64 + i
            _forward(model, cache, ids[:, i : i + 1], 64 + i)
    if config.budget == "pyramid":
        lengths = [layer.get_seq_length() for layer in cache.layers]
        assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]


@torch.no_grad()
def test_decoding_compresses_every_step_tokens(tiny_factory):
    loaded = tiny_factory("llama")
    model, ids = loaded.model.eval(), _ids(60)
    cache = kv_cache(loaded, {"method": "tova", "ratio": 0.5, "step": 4})
    with cache.attach(loaded):
        _forward(model, cache, ids, 0)
        lengths = []
        for i in range(8):
            _forward(model, cache, ids[:, i : i + 1], 60 + i)
            lengths.append(cache.get_seq_length())
    budgets = [math.ceil(0.5 * (61 + i)) for i in range(8)]
    assert all(b <= n <= b + 3 for n, b in zip(lengths, budgets))
    assert any(n == b for n, b in zip(lengths, budgets)) and any(n > b for n, b in zip(lengths, budgets))


@torch.no_grad()
def test_chunk_after_compression_matches_token_by_token(tiny_factory):
    """Per-layer budgets give layers different lengths; a multi-token chunk over them (mask
    aligned per layer by the hooks) equals decoding the same tokens one at a time."""
    loaded = tiny_factory("llama")
    model, ids = loaded.model.eval(), _ids(70)
    spec = {"method": "snapkv", "ratio": 0.6, "budget": "pyramid", "step": 100, "fp_dtype": "model"}
    a, b = kv_cache(loaded, spec), kv_cache(loaded, spec)
    with a.attach(loaded), b.attach(loaded):
        _forward(model, a, ids[:, :60], 0)
        _forward(model, b, ids[:, :60], 0)
        assert len({layer.get_seq_length() for layer in a.layers}) > 1
        chunk = _forward(model, a, ids[:, 60:], 60)
        steps = torch.cat([_forward(model, b, ids[:, 60 + i : 61 + i], 60 + i) for i in range(10)], dim=1)
    torch.testing.assert_close(chunk, steps, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_quantize_dequantize_within_the_grid_bound(bits, axis):
    x = torch.randn(2, 3, 64, 32) * torch.linspace(0.1, 5, 32)
    p = quantize(x, bits, 16, axis)
    codes = unpack_codes(p.codes, bits)
    assert int(codes.max()) < 2**bits and torch.equal(pack_codes(codes, bits), p.codes)
    err = (dequantize(p) - x).abs()
    assert (err <= max_error(p) * (1 + 1e-2) + 1e-3).all()
    assert p.codes.dtype == torch.uint8 and p.codes.numel() == x.numel() * bits // 8


@torch.no_grad()
def test_measured_bytes_equal_the_formula(tiny_factory):
    loaded = tiny_factory("llama")
    model, n = loaded.model.eval(), 100
    spec = {"method": "kivi", "bits": 2, "group": 32, "window": 16}
    cache = kv_cache(loaded, spec)
    model(_ids(n), cache=cache)
    layer = cache.layers[0]
    b, h, _, d = layer.keys.shape
    quantized = (n - 16) // 32 * 32  # 64 tokens in blocks of 32, 36 kept at float16
    codes = 2 * b * h * quantized * d * 2 // 8
    key_scales = b * h * (quantized // 32) * d * 2 * 2  # scale + zero per channel per block, float16
    value_scales = b * h * quantized * (d // min(32, d)) * 2 * 2  # per token per group of channels
    fp = 2 * b * h * (n - quantized) * d * 2
    assert layer.nbytes == codes + key_scales + value_scales + fp
    assert cache.nbytes == len(cache.layers) * layer.nbytes
    assert layer.get_seq_length() == n


@torch.no_grad()
def test_quantized_cache_attends_within_tolerance(tiny_factory):
    loaded = tiny_factory("llama")
    model, ids = loaded.model.eval(), _ids(80)
    ref = DynamicCache(config=model.config)
    _forward(model, ref, ids[:, :72], 0)
    full = _forward(model, ref, ids[:, 72:], 72)
    errors = {}
    for bits in (8, 4, 2):
        cache = kv_cache(loaded, {"method": "kivi", "bits": bits, "group": 16, "window": 8})
        _forward(model, cache, ids[:, :72], 0)
        errors[bits] = (_forward(model, cache, ids[:, 72:], 72) - full).abs().max().item()
    assert errors[8] < errors[4] < errors[2] and errors[8] < 1e-2


@pytest.mark.parametrize("spec", [{"method": "snapkv", "ratio": 0.5}, {"method": "rotatekv", "bits": 2, "group": 16, "window": 8},
                                  {"method": "information", "ratio": 0.5, "window": 8}])
@torch.no_grad()
def test_works_through_generate(tiny_factory, spec):
    loaded = tiny_factory("llama")
    model, ids = loaded.model.eval(), _ids(80)
    cache = kv_cache(loaded, spec)
    with cache.attach(loaded):
        out = model.generate(ids, cache=cache, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == 86 and cache.seen_tokens == 85
    if kv_config_from_dict(spec).evicts:
        assert cache.get_seq_length() == math.ceil(0.5 * 85)
    same = kv_cache(loaded, {"method": "h2o", "ratio": 0.0, "fp_dtype": "model"})
    with same.attach(loaded):
        assert torch.equal(model.generate(ids, cache=same, max_new_tokens=6, do_sample=False), model.generate(ids, max_new_tokens=6, do_sample=False))


def test_bad_settings_raise_config_error():
    for bad in ({"method": "snapkv", "ratio": 1.0}, {"method": "nope"}, {"method": "kivi", "ratio": 0.5},
                {"method": "snapkv", "ratio": 0.5, "kernel": 4}, {"method": "kivi", "bits": 3}, {"method": "h2o", "budget": "x"},
                {"method": "snapkv", "colour": 1}):
        with pytest.raises(ConfigError):
            kv_config_from_dict(bad)
    assert {"kivi", "rotatekv", "snapkv", "h2o", "tova", "knorm", "streaming-llm"} <= set(kv_methods())


def test_scorer_without_attached_hooks_says_how_to_fix(tiny_factory):
    loaded = tiny_factory("llama")
    cache = kv_cache(loaded, {"method": "snapkv", "ratio": 0.5})
    with pytest.raises(ConfigError, match="attach"):
        loaded.model(_ids(20), cache=cache)


def test_cli_kv_eval_against_the_full_cache(tmp_path, tiny_factory, run_cli):
    import json

    loaded = tiny_factory("llama")
    loaded.model.save_pretrained(tmp_path / "m")
    loaded.tokenizer.save_pretrained(tmp_path / "m")
    code, out, err = run_cli("kv-eval", tmp_path / "m", "--cache", "{method: snapkv, ratio: 0.5}", "--cache", "{method: kivi, bits: 4, group: 16, window: 8}",
                             "--prefix", "96", "--continuation", "16", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["full"]["kl"] == 0.0 and result["full"]["ratio"] == pytest.approx(1.0)
    assert result["{method: snapkv, ratio: 0.5}"]["ratio"] == pytest.approx(2.0)
    assert result["{method: kivi, bits: 4, group: 16, window: 8}"]["ratio"] > 2.0
    code, _, err = run_cli("kv-eval", tmp_path / "m", "--cache", "{method: snapkv, ratio: 2}")
    assert code == 2 and err.startswith("slimformer: error: snapkv: ratio must be in [0, 1)") and err.count("\n") == 1


@torch.no_grad()
def test_self_information_equals_the_model_log_probabilities(tiny_factory):
    """token_information from the final hidden states equals -log p of each token under the
    model's own logits, across two forwards (the first forward's last state predicts the next)."""
    from slimformer.runtime.kv.base import FIRST_TOKEN_INFORMATION, token_information

    loaded = tiny_factory("llama")
    model, ids = loaded.model.eval(), _ids(30)
    out = model(ids, output_hidden_states=True)
    logp = out.logits.float().log_softmax(-1)
    expected = -logp[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    hidden = out.hidden_states[-1]
    whole = token_information(model.lm_head, hidden, ids, chunk=7)
    assert whole[0, 0] == FIRST_TOKEN_INFORMATION
    torch.testing.assert_close(whole[0, 1:], expected, atol=1e-5, rtol=1e-5)
    resumed = token_information(model.lm_head, hidden[:, 12:], ids[:, 12:], previous_logp=logp[:, 11], chunk=5)
    torch.testing.assert_close(resumed, whole[:, 12:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_information_keeps_the_least_predictable_entries(tiny_factory):
    """attention_share 0, kernel 1: each layer keeps exactly the entries of highest self-information
    (plus the window), evicting after the forward, in prefill and every decode step."""
    from slimformer.runtime.kv.base import token_information

    loaded = tiny_factory("llama")
    model, ids = loaded.model.eval(), _ids(48)
    out = model(ids, output_hidden_states=True)
    info = token_information(model.lm_head, out.hidden_states[-1], ids).to(torch.float16).float()
    ref = DynamicCache(config=model.config)
    model(ids, cache=ref)
    cache = kv_cache(loaded, {"method": "information", "ratio": 0.5, "attention_share": 0.0, "kernel": 1, "window": 4, "fp_dtype": "model"})
    with cache.attach(loaded):
        _forward(model, cache, ids, 0)
        for layer, full in zip(cache.layers, ref.layers):
            kept = layer.kept_indices[0, 0]
            assert layer.get_seq_length() == 24 and set(range(44, 48)) <= set(kept.tolist())
            evicted = torch.ones(48, dtype=torch.bool)
            evicted[kept] = False
            chosen = kept[kept < 44]  # 20 entries chosen by score, none below an evicted one (float16 ties aside)
            assert info[0, chosen].min() >= info[0, evicted].max() - 1e-2
            torch.testing.assert_close(layer.information[0, 0].float(), info[0, kept], atol=1e-2, rtol=1e-3)
            assert torch.equal(layer.keys, full.keys[:, :, kept])
        for i in range(5):
            _forward(model, cache, ids[:, i : i + 1], 48 + i)
            assert all(layer.get_seq_length() == math.ceil(0.5 * (49 + i)) for layer in cache.layers)
    assert cache.aux_nbytes > 0


@torch.no_grad()
def test_information_share_joins_both_selections(tiny_factory):
    """With attention_share 0.5 the kept set contains the top quarter of each score list (as
    their ranks say), and ratio 0 is the identity."""
    from slimformer.runtime.kv.base import ScoreInputs
    from slimformer.runtime.kv.information import InformationConfig

    g = torch.Generator().manual_seed(1)
    t, keep = 40, 20
    info, attn = torch.rand(1, 2, t, generator=g), torch.rand(1, 2, 3, t, generator=g)
    cfg = InformationConfig(ratio=0.5, kernel=1)
    scores = cfg.score(ScoreInputs(torch.zeros(1, 2, t, 4), torch.zeros(1, 2, t, 4), attn, None, t, info, keep))
    kept = set(scores[0, 0].topk(keep).indices.tolist())
    assert set(info[0, 0].topk(10).indices.tolist()) <= kept
    assert set(attn[0, 0].sum(0).topk(10).indices.tolist()) <= kept
    loaded = tiny_factory("qwen2")
    model, ids = loaded.model.eval(), _ids(30)
    ref_cache, cache = DynamicCache(config=model.config), kv_cache(loaded, {"method": "information", "ratio": 0.0, "fp_dtype": "model"})
    with cache.attach(loaded):
        for start, chunk in ((0, ids[:, :20]), (20, ids[:, 20:21]), (21, ids[:, 21:26])):
            assert torch.equal(_forward(model, ref_cache, chunk, start), _forward(model, cache, chunk, start))
    with pytest.raises(ConfigError, match="attach"):
        fresh = kv_cache(loaded, {"method": "information", "ratio": 0.5})
        model(ids, cache=fresh)
        model(ids[:, :1], cache=fresh)


@torch.no_grad()
def test_replayed_prefill_equals_the_forward_and_resumes_a_shared_prefix(tiny_factory):
    """The evaluation's recorded prefill, replayed into an information cache, keeps what prefilling
    through the forward keeps; a prefill resumed from a shared prefix records the same
    self-information as one run from scratch."""
    from slimformer.evaluate.kv_cache import record_prefill, replay

    loaded = tiny_factory("llama")
    model, ids = loaded.model.eval(), _ids(50)
    spec = {"method": "information", "ratio": 0.5, "window": 4, "fp_dtype": "model"}
    direct = kv_cache(loaded, spec)
    with direct.attach(loaded):
        _forward(model, direct, ids, 0)
    whole = record_prefill(model, ids)
    replayed = replay(model, spec, whole)
    for a, b in zip(direct.layers, replayed.layers):
        assert torch.equal(a.kept_indices, b.kept_indices)
        torch.testing.assert_close(a.keys, b.keys)
    other = torch.cat([ids[:, :30], _ids(20, seed=1)], dim=1)
    resumed = record_prefill(model, ids, previous=record_prefill(model, other))
    torch.testing.assert_close(resumed.information, whole.information, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(resumed.keys[3], whole.keys[3], atol=1e-5, rtol=1e-5)


def test_cli_generate_with_a_kv_cache_recipe(tmp_path, tiny_factory, run_cli):
    import json

    loaded = tiny_factory("llama")
    loaded.model.save_pretrained(tmp_path / "m")
    loaded.tokenizer.save_pretrained(tmp_path / "m")
    code, out, err = run_cli("generate", tmp_path / "m", "--prompt", "def f(x): return x " * 8, "--max-new-tokens", "5", "--no-compile",
                             "--kv-cache", "{method: snapkv, ratio: 0.5}", "--json")
    assert code == 0, err
    assert json.loads(out)["stats"]["new_tokens"] == 5
    code, _, err = run_cli("generate", tmp_path / "m", "--prompt", "x", "--kv-cache", "{method: snapkv, ratio: [1]}")
    assert code == 2 and err.startswith("slimformer: error: snapkv: ratio must be in [0, 1)") and err.count("\n") == 1


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_packed_blocks_concatenate_exactly(axis):
    """A quantized cache keeps one growing block: concatenated blocks dequantize to the blocks'
    dequantizations side by side, with the bytes of both."""
    from slimformer.runtime.kv.storage import concat_tokens

    g = torch.Generator().manual_seed(3)
    a, b = quantize(torch.randn(1, 2, 32, 16, generator=g), 4, 8 if axis == "channel" else 16, axis), quantize(torch.randn(1, 2, 16, 16, generator=g), 4, 8 if axis == "channel" else 16, axis)
    joined = concat_tokens(a, b)
    assert joined.tokens == 48 and joined.nbytes == a.nbytes + b.nbytes
    assert torch.equal(dequantize(joined), torch.cat([dequantize(a), dequantize(b)], dim=2))
    with pytest.raises(ValueError):
        concat_tokens(a, quantize(torch.randn(1, 2, 16, 16, generator=g), 2, 16, "token"))


@torch.no_grad()
def test_decode_eviction_never_requantizes_stored_entries(tiny_factory):
    """Evict+quantize while decoding: the codes quantized at prefill stay bit for bit (eviction
    chooses among full-precision entries), and the cache still holds its budget."""
    loaded = tiny_factory("llama")
    model, ids = loaded.model.eval(), _ids(80)
    cache = kv_cache(loaded, {"method": "h2o", "ratio": 0.5, "bits": 4, "group": 8, "window": 4})
    with cache.attach(loaded):
        _forward(model, cache, ids[:, :64], 0)
        before = [layer.quantized[0][0].codes.clone() for layer in cache.layers]
        for i in range(16):
            _forward(model, cache, ids[:, 64 + i : 65 + i], 64 + i)
    for layer, codes in zip(cache.layers, before):
        assert torch.equal(layer.quantized[0][0].codes[:, :, : codes.shape[2]], codes)
        assert layer.get_seq_length() == math.ceil(0.5 * 80)
