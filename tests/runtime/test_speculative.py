"""Speculative decoding is lossless: greedy output equals plain greedy decoding token for token,
with every drafter (prompt lookup, the model's own first blocks, a separate draft model), and
drafts that are accepted save verify steps."""

import pytest
import torch
from test_generation import CAUSAL, lively

from slimformer.errors import ConfigError
from slimformer.runtime import GenerationConfig, TextGenerator
from slimformer.runtime.speculative import SpeculationConfig, StepCosts, _LookupDrafter, best_draft_length, lookup_proposal, self_draft_model

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
        SpeculationConfig("prompt-lookup", num_draft=2, ngram=1, min_ngram=1),
        SpeculationConfig("prompt-lookup", num_draft=8, min_ngram=1, adaptive=True),
        SpeculationConfig("prompt-lookup", num_draft=6, adaptive=False),
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


def test_prompt_lookup_copies_what_followed_the_longest_match():
    context = [1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 8, 2, 3]
    assert lookup_proposal(context, 3, ngram=2, min_ngram=1) == [4, 7, 8]  # (2, 3) twice: the latest
    # (9, 2, 3) agrees over 3 tokens with the end, the later (2, 3) over 2: the longer one wins
    context = [1, 2, 3, 4, 5, 9, 2, 3, 6, 6, 7, 2, 3, 0, 0, 9, 2, 3]
    assert lookup_proposal(context, 2, ngram=8, min_ngram=1) == [6, 6]
    assert lookup_proposal(context, 2, ngram=2, min_ngram=1) == [0, 0]  # capped at 2: the latest of equals
    assert lookup_proposal([1, 2, 3], 3, ngram=2, min_ngram=1) == []
    # the copy reaches the end of the context: it continues periodically (a repetition loop)
    assert lookup_proposal([5, 6, 5], 4, ngram=3, min_ngram=1) == [6, 5, 6, 5]
    assert lookup_proposal([7, 1, 2, 3, 1, 2, 3], 5, ngram=4, min_ngram=2) == [1, 2, 3, 1, 2]
    # a match shorter than min_ngram drafts nothing
    assert lookup_proposal([5, 6, 5], 4, ngram=3, min_ngram=2) == []
    assert lookup_proposal([4, 5, 6, 9, 5, 6], 2, ngram=3, min_ngram=2) == [9, 5]


def test_prompt_lookup_without_a_match_takes_plain_steps():
    gen = TextGenerator(lively("llama"), compile=False)
    config = dict(max_new_tokens=12, stop_at_eos=False)
    plain = gen.generate("a b c d", GenerationConfig(**config))
    got = gen.generate("a b c d", GenerationConfig(speculation=SpeculationConfig(ngram=16, min_ngram=16), **config))
    stats = got.stats.speculation
    assert got.tokens == plain.tokens
    assert stats["drafted"] == 0 and stats["plain_steps"] == stats["verify_steps"] == 11


def test_draft_length_maximises_expected_tokens_per_cost():
    # a nearly free two-token step: a 30% token is worth drafting; a dear one: it is not
    assert best_draft_length([0.3], [1.0, 1.05]) == 1
    assert best_draft_length([0.3], [1.0, 1.5]) == 0
    # sure tokens fill the widest step that pays: 2.71 / 1.2 beats 3.44 / 1.9, 3.44 / 1.3 beats 2.71 / 1.2
    assert best_draft_length([0.9, 0.9, 0.9], [1.0, 1.1, 1.2, 1.9]) == 2
    assert best_draft_length([0.9, 0.9, 0.9], [1.0, 1.1, 1.2, 1.3]) == 3
    # never beyond the widths that were measured, and nothing to draft drafts nothing
    assert best_draft_length([1.0] * 8, [1.0, 1.0, 1.0]) == 2
    assert best_draft_length([], [1.0, 1.0]) == 0


def test_adaptive_lookup_drafts_by_agreement_and_learns_from_misses():
    costs = [1.0, 1.05, 1.1, 1.2, 1.3, 1.8, 2.0]
    drafter = _LookupDrafter(SpeculationConfig(num_draft=6), StepCosts(costs))
    assert drafter.spec.adaptive and drafter.spec.min_ngram == 1
    long_match = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12, 13, 14, 15, 16, 17, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    chances = [drafter.chance(min(10 + j, 16)) for j in range(6)]
    assert drafter.propose(long_match, 6) == [11, 12, 13, 14, 15, 16][: best_draft_length(chances, costs)]
    assert len(drafter.propose(long_match, 6)) >= 4  # a 10-token agreement: a long draft
    drafter = _LookupDrafter(SpeculationConfig(num_draft=6), StepCosts(costs))  # (an index follows one growing context)
    one_token = [5, 1, 2, 3, 4, 6, 7, 5]  # 5 seen once before: a one-token match
    # a 20% prior for the first token (50% for the second): only cheap steps pay
    assert drafter.propose(one_token, 6) == [1, 2]
    assert best_draft_length([drafter.chance(1), drafter.chance(2)], [1.0, 1.3, 1.4]) == 0
    before = drafter.chance(1)
    for _ in range(20):  # one-token matches keep missing: their estimate falls and drafting stops
        drafter.propose(one_token, 6)
        drafter.accepted(0, 6)
    assert drafter.chance(1) < before / 3 and drafter.propose(one_token, 6) == []
    assert drafter.width(3, 6) == 3
    fixed = _LookupDrafter(SpeculationConfig(num_draft=6, adaptive=False))
    assert fixed.spec.min_ngram == 3 and fixed.propose(one_token, 6) == []
    assert fixed.propose(long_match, 6) == [11, 12, 13, 14, 15, 16] and fixed.width(2, 6) == 6


def test_verify_costs_are_measured_per_width_and_kept():
    gen = TextGenerator(lively("llama"), compile=False)
    costs = gen.verify_costs(4, rounds=2, context=8)
    assert len(costs) == 4 and costs[0] == 1.0 and costs == sorted(costs)
    assert gen.verify_costs(3) == costs[:3]  # measured once per generator


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
    with pytest.raises(ConfigError, match="min_ngram"):
        SpeculationConfig(ngram=2, min_ngram=3)
    with pytest.raises(ConfigError, match="adaptive"):
        SpeculationConfig(adaptive="yes")
    with pytest.raises(ConfigError, match="prompt-lookup"):
        SpeculationConfig("self", adaptive=True)
    assert SpeculationConfig().num_draft == 6 and SpeculationConfig("self").num_draft == 4
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


def test_compiled_verify_steps_of_every_width_share_one_graph(monkeypatch):
    """Verify steps of 2..5 tokens: one compiled graph (the width is symbolic), each row equal to
    the eager model's output for the same prefix."""
    from torch._dynamo.utils import counters

    from slimformer.runtime import prefill

    monkeypatch.delenv("SLIMFORMER_COMPILE", raising=False)
    loaded = lively("llama")
    compiled, eager = TextGenerator(loaded, compile=True), TextGenerator(loaded, compile=False)
    cache, key_valid = compiled.cache_for(1, 32)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    next_pos = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        prefill(compiled.model, cache, ids, torch.ones_like(ids), key_valid, next_pos, compiled.dtype, compiled.cache_kwarg)
    graphs = []
    for width in (2, 3, 4, 5):
        tokens = torch.arange(10, 10 + width)[None]
        got = compiled.run_step(cache, tokens, key_valid, next_pos)
        graphs.append(counters["stats"]["unique_graphs"])
        cache.crop(-width)
        next_pos.sub_(width)
        with torch.no_grad():
            want = eager.model(torch.cat([ids, tokens], 1)).logits[:, -width:]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert compiled.compile and graphs[1:] == [graphs[0]] * 3  # widths 3..5 compiled nothing new


def test_step_costs_follow_the_steps_timed_in_place():
    clock = StepCosts([1.0, 1.1, 1.3])
    assert clock.costs() == [1.0, 1.1, 1.3]  # nothing timed yet: the up-front measurement
    for _ in range(StepCosts.MIN_SEEN):
        clock.observe(1, 0.010)
        clock.observe(3, 0.020)
    assert clock.costs() == pytest.approx([1.0, 1.1, 2.0])  # width 3 seen dearer in place; width 2 not timed yet
    for _ in range(StepCosts.MIN_SEEN):
        clock.observe(2, 0.025)
    assert clock.costs() == pytest.approx([1.0, 2.5, 2.5])  # never cheaper for more tokens
    clock.observe(9, 1.0)  # a width it does not track is ignored
    assert len(clock.costs()) == 3


def test_a_speculative_generation_times_its_steps_for_the_next():
    gen = TextGenerator(lively("llama"), compile=False)
    config = GenerationConfig(max_new_tokens=24, stop_at_eos=False, speculation=SpeculationConfig(num_draft=4))
    first = gen.generate(REPEATS, config)
    clock = gen._step_costs
    timed = sum(len(s) for s in clock.seen)
    assert timed == first.stats.speculation["verify_steps"] and len(clock.measured) == 5
    second = gen.generate(REPEATS, config)
    assert second.tokens == first.tokens and gen._step_costs is clock
    assert sum(len(s) for s in clock.seen) == timed + second.stats.speculation["verify_steps"]


BRANCHY = "a1 b2 a3 c4 a5 d6 a7 b2 a3 c4 a8 d6 a7 b2 a1 b9 a3 c4 a5 d6 a7 b2 a"


def test_a_token_tree_scores_each_branch_as_its_own_chain():
    """Two drafts verified in one step: each branch's logits are those of the root plus that
    branch run alone (positions by depth, each branch blind to the other)."""
    from slimformer.runtime.generation import prefill
    from slimformer.runtime.speculative import tree_ancestry

    loaded = lively("llama")
    gen = TextGenerator(loaded, compile=False)
    ids = torch.tensor([[3, 9, 4, 7, 11, 5]])
    branches = [[8, 2, 6], [12, 1]]

    def fresh():
        cache, key_valid = gen.cache_for(1, 32)
        next_pos = torch.zeros(1, dtype=torch.long)
        prefill(gen.model, cache, ids, torch.ones_like(ids), key_valid, next_pos, gen.dtype, gen.cache_kwarg)
        return cache, key_valid, next_pos

    cache, key_valid, next_pos = fresh()
    tree = gen.run_step(cache, torch.tensor([[10] + branches[0] + branches[1]]), key_valid, next_pos, tree=tree_ancestry(branches))[0]
    assert int(next_pos) == 6 + 6 and int(cache.length) == 6 + 6
    for offset, branch in ((1, branches[0]), (4, branches[1])):
        cache, key_valid, next_pos = fresh()
        chain = gen.run_step(cache, torch.tensor([[10] + branch]), key_valid, next_pos)[0]
        assert torch.allclose(tree[0], chain[0], atol=1e-5)
        assert torch.allclose(tree[offset:offset + len(branch)], chain[1:], atol=1e-5)
    assert torch.equal(tree_ancestry(branches).sum(-1), torch.tensor([1, 2, 3, 4, 2, 3]))


@pytest.mark.parametrize("family", CAUSAL)
def test_tree_verification_reproduces_plain_greedy_decoding(family):
    """Several lookup drafts per step (flat step costs, so every branch pays): the output is the
    plain greedy output, token for token, and some steps did verify a tree."""
    from slimformer.runtime.speculative import StepCosts

    loaded = lively(family)
    gen = TextGenerator(loaded, compile=False)
    config = dict(max_new_tokens=32, stop_at_eos=False)
    plain = gen.generate(BRANCHY, GenerationConfig(**config))
    gen._step_costs = StepCosts([1.0] * 7)
    gen._step_costs.MIN_SEEN = 10 ** 9  # keep the flat costs: no refinement by the steps' times
    got = gen.generate(BRANCHY, GenerationConfig(speculation=SpeculationConfig("prompt-lookup", branches=3), **config))
    assert got.tokens == plain.tokens
    stats = got.stats.speculation
    assert stats["tree_steps"] > 0 and stats["accepted"] <= stats["drafted"]
    single = gen.generate(BRANCHY, GenerationConfig(speculation=SpeculationConfig("prompt-lookup", branches=1), **config))
    assert single.tokens == plain.tokens and single.stats.speculation["tree_steps"] == 0


def test_tree_sizes_follow_reach_per_cost():
    from slimformer.runtime.speculative import best_tree

    flat = [1.0] * 7
    # one draft: exactly best_draft_length
    for chances in ([0.2, 0.5, 0.6], [0.9] * 6, [0.05]):
        for costs in (flat, [1.0, 1.05, 1.1, 1.2, 1.5, 1.8, 2.1], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]):
            assert best_tree([chances], costs) == [best_draft_length(chances, costs)]
    # a second draft is worth its first token when steps are flat and the first draft is unsure
    assert best_tree([[0.2, 0.5, 0.6], [0.2, 0.5]], flat) == [3, 2]
    # ... and not when an extra token costs as much as a step
    assert best_tree([[0.2, 0.5, 0.6], [0.2, 0.5]], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]) == [0, 0]
    # at most len(costs) - 1 tokens in all, the highest reaches first
    sizes = best_tree([[0.9] * 6, [0.5] * 6, [0.5] * 6], flat)
    assert sum(sizes) == 6 and sizes[0] >= sizes[1] >= sizes[2]
    assert best_tree([], flat) == []
    with pytest.raises(ConfigError, match="branches"):
        SpeculationConfig("prompt-lookup", branches=0)
