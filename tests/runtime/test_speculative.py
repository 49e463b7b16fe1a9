"""Speculative decoding is lossless: greedy output equals plain greedy decoding token for token,
with every drafter (prompt lookup, the model's own first blocks, a separate draft model), and
drafts that are accepted save verify steps."""

import pytest
import torch
from test_generation import CAUSAL, lively

from slimformer.errors import ConfigError
from slimformer.runtime import GenerationConfig, TextGenerator
from slimformer.runtime.speculative import SpeculationConfig, lookup_proposal, self_draft_model

REPEATS = "def foo(x): return x + 1\ndef bar(y): return y * 2\ndef foo(x): return"


@pytest.mark.parametrize("family", CAUSAL)
def test_every_drafter_reproduces_plain_greedy_decoding(family):
    loaded = lively(family)
    gen = TextGenerator(loaded, compile=False)
    config = dict(max_new_tokens=24, stop_at_eos=False)
    plain = gen.generate(REPEATS, GenerationConfig(**config))
    other = lively(family, seed=5)  # an unrelated draft: most drafts rejected
    for spec in (
        SpeculationConfig("prompt-lookup", num_draft=4),
        SpeculationConfig("prompt-lookup", num_draft=2, ngram=1),
        SpeculationConfig("self", exit_layer=2, num_draft=3),
        SpeculationConfig("draft", draft=loaded, num_draft=4),
        SpeculationConfig("draft", draft=other, num_draft=3),
    ):
        got = gen.generate(REPEATS, GenerationConfig(speculation=spec, **config))
        assert got.tokens == plain.tokens, spec.mode
        stats = got.stats.speculation
        assert stats["accepted"] <= stats["drafted"]
        if spec.draft is loaded:  # the model drafting for itself: every draft accepted
            assert stats["acceptance_rate"] == 1.0 and stats["verify_steps"] == -(-(24 - 1) // 5)


def test_speculation_stops_like_plain_decoding():
    gen = TextGenerator(lively("llama"), compile=False)
    plain = gen.generate(REPEATS, GenerationConfig(max_new_tokens=20, stop_at_eos=False))
    gen.eos_ids = {plain.tokens[0][6]}
    stop_at = plain.tokens[0].index(plain.tokens[0][6])
    spec = gen.generate(REPEATS, GenerationConfig(max_new_tokens=20, speculation=SpeculationConfig("draft", draft=gen.loaded)))
    assert spec.finish == ["eos"] and spec.tokens[0] == plain.tokens[0][:stop_at]


def test_prompt_lookup_copies_what_followed_the_last_ngram():
    context = [1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 8, 2, 3]
    assert lookup_proposal(context, 3, ngram=2, min_ngram=1) == [4, 7, 8]  # latest match of (2, 3)
    assert lookup_proposal([1, 2, 3], 3, ngram=2, min_ngram=1) == []
    assert lookup_proposal([5, 6, 5], 4, ngram=3, min_ngram=1) == [6, 5]


def test_self_draft_shares_weights_and_drops_blocks():
    loaded = lively("llama")
    view = self_draft_model(loaded.model, 2)
    assert len(view.model.layers) == 2 and len(loaded.model.model.layers) == 4
    assert view.model.layers[0].self_attn.q_proj.weight is loaded.model.model.layers[0].self_attn.q_proj.weight
    assert view.lm_head.weight is loaded.model.lm_head.weight and loaded.model.config.num_hidden_layers == 4
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        hidden = loaded.model(ids, output_hidden_states=True).hidden_states[2]
        expected = loaded.model.lm_head(loaded.model.model.norm(hidden))
        torch.testing.assert_close(view(ids).logits, expected)


def test_speculation_settings_are_checked():
    with pytest.raises(ConfigError, match="greedy"):
        GenerationConfig(temperature=0.7, speculation=SpeculationConfig())
    with pytest.raises(ConfigError, match="mode"):
        SpeculationConfig("medusa")
    with pytest.raises(ConfigError, match="draft model"):
        SpeculationConfig("draft")
    gen = TextGenerator(lively("llama"), compile=False)
    with pytest.raises(ConfigError, match="one prompt"):
        gen.generate(["a", "b"], GenerationConfig(speculation=SpeculationConfig()))
    with pytest.raises(ConfigError, match="vocabulary"):
        gen.generate("a", GenerationConfig(speculation=SpeculationConfig("draft", draft=lively("gpt2").__class__(
            model=_other_vocab(), tokenizer=gen.tokenizer, kind="causal-lm", source="x"))))


def _other_vocab():
    import transformers

    return transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                                  num_attention_heads=2, intermediate_size=64)).eval()
