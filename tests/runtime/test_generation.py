"""The decode loop on tiny Llama/Qwen2/GPT-2: static-cache greedy decoding equals Hugging Face
``generate`` token for token (batches, left padding), sampling is reproducible from a seed, stop
rules and streaming behave, and the compiled step equals the eager one."""

import pytest
import torch

from slimformer.errors import ConfigError
from slimformer.models.tiny import tiny_model
from slimformer.runtime import GenerationConfig, StaticKVCache, TextGenerator
from slimformer.runtime.sampling import SamplingConfig, filtered_probs

CAUSAL = ("llama", "qwen2", "gpt2")
PROMPTS = ["def foo(x): return", "A short docstring about nothing at all, really"]


def lively(family: str, seed: int = 0):
    """A tiny random model whose greedy output varies (weights x8: the default init repeats one token)."""
    loaded = tiny_model(family, seed=seed)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return loaded


@pytest.fixture(scope="module", params=CAUSAL)
def model(request):
    return lively(request.param)


def hf_greedy(loaded, ids, mask, n):
    with torch.no_grad():
        out = loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def test_static_cache_greedy_equals_hf_generate_for_a_left_padded_batch(model):
    gen = TextGenerator(model, compile=False)
    ids, mask = gen.encode(PROMPTS)
    assert (mask[:, 0] == 0).any()  # the batch really is left-padded
    ours = gen.generate_ids(ids, mask, GenerationConfig(max_new_tokens=16, stop_at_eos=False))
    assert ours.tokens == hf_greedy(model, ids, mask, 16)
    assert len(set(ours.tokens[0])) > 4  # not a degenerate repetition
    for row, prompt in enumerate(PROMPTS):  # a row does not depend on its neighbours or padding
        assert gen.generate(prompt, GenerationConfig(max_new_tokens=16, stop_at_eos=False)).tokens[0] == ours.tokens[row]


def test_our_static_cache_serves_hf_generate(model):
    gen = TextGenerator(model, compile=False)
    ids, mask = gen.encode(PROMPTS[:1])
    cache = StaticKVCache.for_model(model.model, 1, 64)
    with torch.no_grad():
        out = model.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                   pad_token_id=0, past_key_values=cache)
    assert out[:, ids.shape[1]:].tolist() == hf_greedy(model, ids, mask, 10)
    assert cache.get_seq_length() == ids.shape[1] + 9  # written in place: prompt + all new tokens but the last
    keys = cache.layers[0].keys
    assert keys.shape[2] == 64 and keys[:, :, cache.get_seq_length():].abs().sum() == 0


def test_cache_crop_rolls_back_and_rewrites_in_place():
    loaded = lively("llama")
    cache = StaticKVCache.for_model(loaded.model, 1, 32)
    ptr = cache.layers[0].keys.data_ptr()
    k = torch.randn(1, 2, 5, 16)
    cache.layers[0].update(k, k)
    cache.layers[0].crop(-2)
    assert cache.layers[0].get_seq_length() == 3
    k2 = torch.randn(1, 2, 1, 16)
    cache.layers[0].update(k2, k2)
    assert torch.equal(cache.layers[0].keys[:, :, :3], k[:, :, :3]) and torch.equal(cache.layers[0].keys[:, :, 3:4], k2)
    assert cache.layers[0].keys.data_ptr() == ptr and cache.nbytes() == 4 * 2 * (1 * 2 * 32 * 16) * 4


def test_sampling_is_reproducible_from_a_seed_and_respects_top_k():
    gen = TextGenerator(lively("llama"), compile=False)
    config = dict(max_new_tokens=12, temperature=1.0, top_k=5, stop_at_eos=False)
    a = gen.generate(PROMPTS, GenerationConfig(seed=7, **config))
    b = gen.generate(PROMPTS, GenerationConfig(seed=7, **config))
    c = gen.generate(PROMPTS, GenerationConfig(seed=8, **config))
    greedy = gen.generate(PROMPTS, GenerationConfig(max_new_tokens=12, stop_at_eos=False))
    assert a.tokens == b.tokens and a.tokens != c.tokens and a.tokens != greedy.tokens
    logits = torch.randn(3, 50)
    probs = filtered_probs(logits, SamplingConfig(temperature=0.5, top_k=5))
    assert ((probs > 0).sum(-1) == 5).all() and torch.allclose(probs.sum(-1), torch.ones(3))
    top_p = filtered_probs(logits, SamplingConfig(temperature=1.0, top_p=0.5))
    kept = torch.sort(top_p, descending=True).values
    assert (kept[:, 0] > 0).all() and torch.allclose(top_p.sum(-1), torch.ones(3))
    full = logits.softmax(-1).sort(-1, descending=True).values.cumsum(-1)
    assert ((top_p > 0).sum(-1) == (full < 0.5).sum(-1) + 1).all()  # the smallest set reaching p


def test_stop_strings_eos_and_streaming():
    loaded = lively("llama")
    gen = TextGenerator(loaded, compile=False)
    free = gen.generate(PROMPTS[0], GenerationConfig(max_new_tokens=16, stop_at_eos=False))
    text = free.texts[0]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = gen.generate(PROMPTS[0], GenerationConfig(max_new_tokens=16, stop=(stop,), stop_at_eos=False))
    assert cut.finish == ["stop"] and cut.texts[0] == text[: text.find(stop)]
    gen.eos_ids = {free.tokens[0][3]}
    ended = gen.generate(PROMPTS[0], GenerationConfig(max_new_tokens=16))
    assert ended.finish == ["eos"] and ended.tokens[0] == free.tokens[0][: free.tokens[0].index(free.tokens[0][3])]
    gen.eos_ids = set()
    pieces = list(gen.stream(PROMPTS[0], GenerationConfig(max_new_tokens=16, stop_at_eos=False)))
    assert len(pieces) > 1 and "".join(pieces) == text
    assert gen.last_result.stats.new_tokens == 16 and gen.last_result.stats.decode_tokens_per_s > 0


def test_bad_settings_raise_config_errors():
    with pytest.raises(ConfigError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ConfigError, match="top_p"):
        GenerationConfig(temperature=1.0, top_p=1.5)
    gen = TextGenerator(lively("llama"), compile=False)
    with pytest.raises(ConfigError, match="context"):
        gen.generate(PROMPTS[0], GenerationConfig(max_new_tokens=1000))
    with pytest.raises(ConfigError, match="encoder"):
        TextGenerator(tiny_model("bert"))


def test_compiled_step_equals_eager(monkeypatch):
    """Inductor-compiled decode step against the eager one (one small model: compiling is slow)."""
    monkeypatch.delenv("SLIMFORMER_COMPILE", raising=False)
    loaded = lively("llama")
    eager = TextGenerator(loaded, compile=False)
    compiled = TextGenerator(loaded, compile=True)
    config = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    from torch._inductor.utils import run_and_get_code

    got, code = run_and_get_code(compiled.generate, PROMPTS, config)
    assert compiled.compile and compiled._compiled is not None  # it did not fall back to eager
    # compiled without Inductor's per-tensor size/alignment asserts (generation.step_codegen)
    assert code and not any("assert_size_stride(" in c or "assert_alignment(" in c for c in code)
    assert got.tokens == eager.generate(PROMPTS, config).tokens
    cache, key_valid = eager.cache_for(2, 8)
    ids, mask = eager.encode(PROMPTS)
    from slimformer.runtime import prefill

    with torch.no_grad():
        prefill(loaded.model, cache, ids, mask, key_valid, next_pos := torch.zeros(2, dtype=torch.long), eager.dtype, eager.cache_kwarg)
    snapshot = [(layer.keys.clone(), layer.values.clone(), layer.cumulative_length.clone()) for layer in cache.layers]
    kv, pos = key_valid.clone(), next_pos.clone()
    token = torch.tensor([[5], [9]])
    a = eager.run_step(cache, token, key_valid, next_pos)
    for layer, (k, v, n) in zip(cache.layers, snapshot):
        layer.keys.copy_(k), layer.values.copy_(v), layer.cumulative_length.copy_(n)
    key_valid.copy_(kv), next_pos.copy_(pos)
    b = compiled.run_step(cache, token, key_valid, next_pos)
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    # The step's guards skip modules whose __dict__ is unchanged (generation.step_guards): weights
    # written in place and a parameter replaced by a new one must still reach the compiled step.
    model = loaded.model
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-1)
    assert compiled.generate(PROMPTS, config).tokens == eager.generate(PROMPTS, config).tokens
    before = compiled.generate(PROMPTS, config).tokens
    rolled = torch.nn.Parameter(torch.roll(model.get_output_embeddings().weight.detach(), 1, dims=0))
    for gen in (compiled, eager):  # each generator runs its own weight-sharing view of the model
        gen.model.get_output_embeddings().weight = rolled
    after = compiled.generate(PROMPTS, config).tokens
    assert after == eager.generate(PROMPTS, config).tokens and after != before


def test_compile_off_switch(monkeypatch):
    monkeypatch.setenv("SLIMFORMER_COMPILE", "0")
    assert TextGenerator(lively("llama"), compile=True).compile is False


@pytest.mark.parametrize("family", ("llama", "qwen2"))
def test_generation_over_a_compressed_kv_cache(family):
    """A KV-cache recipe in GenerationConfig: ratio 0 at model precision gives the static cache's
    tokens exactly; an evicting, quantizing recipe holds the budget's entries and fewer bytes."""
    loaded = lively(family)
    gen = TextGenerator(loaded, compile=False)
    prompt = PROMPTS[1] * 3
    plain = gen.generate(prompt, GenerationConfig(max_new_tokens=12, stop_at_eos=False))
    same = gen.generate(prompt, GenerationConfig(max_new_tokens=12, stop_at_eos=False, kv_cache={"method": "h2o", "ratio": 0.0, "fp_dtype": "model"}))
    assert same.tokens == plain.tokens
    small = gen.generate(prompt, GenerationConfig(max_new_tokens=12, stop_at_eos=False,
                                                  kv_cache={"method": "information", "ratio": 0.5, "bits": 4, "group": 16, "window": 8}))
    assert len(small.tokens[0]) == 12 and small.stats.kv_cache_mb < 0.5 * same.stats.kv_cache_mb  # same tokens, float32 and whole
    with pytest.raises(ConfigError, match="one prompt at a time"):
        gen.generate(PROMPTS, GenerationConfig(max_new_tokens=4, kv_cache={"method": "snapkv", "ratio": 0.5}))
    with pytest.raises(ConfigError, match="unknown KV-cache method"):
        GenerationConfig(kv_cache={"method": "nope"})
