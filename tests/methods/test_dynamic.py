"""Dynamic inference: exits really skip work, token reduction follows its schedule, padding and
pooling stay right, and the neutral settings reproduce the original exactly."""

import copy

import pytest
import torch
from conftest import sample_batch

from slimformer.compress import compress
from slimformer.methods import EarlyExitConfig, TokenMergingConfig, TokenPruningConfig
from slimformer.methods.dynamic.runtime import DynamicEncoder
from slimformer.methods.dynamic.token_reduction import bipartite_merge
from slimformer.recipe import Recipe

TEXTS = (
    "Return the number of items in a container, counting nested containers as one item each.",
    "Raise ValueError if the argument is negative.",
    "Create a new temporary directory and return its path; the caller must remove it when done with it.",
)


@pytest.fixture
def bert(tiny_factory):
    return tiny_factory("bert")


def _batch(loaded, texts=TEXTS):
    return sample_batch(loaded, texts)


def _block_rows(loaded):
    """Hooks recording how many rows (and tokens) enter each block."""
    seen = {i: [] for i in range(loaded.adapter.num_layers())}
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(tuple(a[0].shape[:2]))) for i, b in enumerate(loaded.adapter.blocks())]
    return seen, handles


def test_strictest_threshold_runs_every_layer_and_equals_the_original(bert, fast_calibration):
    batch = _batch(bert)
    original = bert.embed(batch)
    compress(bert, Recipe(steps=[EarlyExitConfig(threshold=2.0, train_steps=10)], calibration=fast_calibration))
    out, stats = bert.embed(batch, return_stats=True)
    assert torch.all(stats.layers_run == bert.adapter.num_layers())
    assert torch.equal(out, original)


def test_an_input_that_exits_at_k_never_touches_later_blocks(bert, fast_calibration):
    batch = _batch(bert)
    compress(bert, Recipe(steps=[EarlyExitConfig(threshold=-1.0, train_steps=10)], calibration=fast_calibration))
    seen, handles = _block_rows(bert)
    try:
        out, stats = bert.embed(batch, return_stats=True)
    finally:
        for h in handles:
            h.remove()
    # The first exit has no predecessor to agree with; the second (after block 1) fires for all.
    assert torch.all(stats.layers_run == 2)
    assert seen[0] and seen[1] and not seen[2] and not seen[3]
    assert torch.isfinite(out).all()


def test_exited_rows_leave_the_batch(bert, fast_calibration):
    compress(bert, Recipe(steps=[EarlyExitConfig(threshold=0.999, train_steps=10)], calibration=fast_calibration))
    batch = _batch(bert)
    bert.bucketing = False  # one pass in batch order: the forced decision below is by row position
    # Force row 1 to exit at the second exit and the others to continue.
    rule = bert.dynamic.rule
    real_decide = rule.decide

    def decide(layer, output, state):
        done = real_decide(layer, output, state)
        return torch.tensor([False, True, False])[: len(done)] if layer == 1 and len(done) == 3 else torch.zeros_like(done)

    rule.decide = decide
    seen, handles = _block_rows(bert)
    try:
        _, stats = bert.embed(batch, return_stats=True)
    finally:
        for h in handles:
            h.remove()
    assert stats.layers_run.tolist() == [4, 2, 4]
    assert [s[0][0] for s in seen.values()] == [3, 3, 2, 2]


def test_trained_exits_approach_the_final_embedding(bert, fast_calibration):
    untrained, ridge = copy.deepcopy(bert), copy.deepcopy(bert)
    compress(untrained, Recipe(steps=[EarlyExitConfig(train_steps=0, fit="adam")], calibration=fast_calibration))
    compress(bert, Recipe(steps=[EarlyExitConfig(train_steps=150, lr=0.01, fit="adam")], calibration=fast_calibration))
    compress(ridge, Recipe(steps=[EarlyExitConfig()], calibration=fast_calibration))  # fit: ridge
    before, after = untrained.applied[-1]["exit_fidelity"], bert.applied[-1]["exit_fidelity"]
    assert all(after[k] > before[k] for k in before)
    assert all(ridge.applied[-1]["exit_fidelity"][k] > before[k] for k in before)


def test_tome_with_r_zero_is_the_identity(bert, fast_calibration):
    batch = _batch(bert)
    original = bert.embed(batch)
    compress(bert, Recipe(steps=[TokenMergingConfig(r=0)], calibration=fast_calibration))
    assert torch.equal(DynamicEncoder(bert).embed(batch), original)


def test_merged_token_counts_follow_the_schedule(bert, fast_calibration):
    batch = _batch(bert, TEXTS[:1])  # one row: no padding
    T = batch["input_ids"].shape[1]
    compress(bert, Recipe(steps=[TokenMergingConfig(r=4, layers=(0, 2))], calibration=fast_calibration))
    _, stats = bert.embed(batch, return_stats=True)
    assert stats.tokens_per_layer == [T, T - 4, T - 4, T - 8]


def test_pruning_schedule_keeps_the_ratio(bert, fast_calibration):
    batch = _batch(bert, TEXTS[:1])
    T = batch["input_ids"].shape[1]
    compress(bert, Recipe(steps=[TokenPruningConfig(keep_ratio=0.5, layers=(1,))], calibration=fast_calibration))
    _, stats = bert.embed(batch, return_stats=True)
    assert stats.tokens_per_layer == [T, T, round(T * 0.5), round(T * 0.5)]


def test_merging_conserves_token_mass_and_keeps_special_tokens():
    torch.manual_seed(0)
    hidden = torch.randn(3, 12, 8)
    sizes = torch.ones(3, 12)
    sizes[1, 9:] = 0  # a padded row
    protect = torch.zeros(3, 12, dtype=torch.bool)
    protect[:, 0] = True
    protect[0, 11] = protect[1, 8] = protect[2, 11] = True
    h2, s2, p2 = bipartite_merge(hidden, sizes, protect, r=4)
    assert h2.shape == (3, 8, 8)
    assert torch.equal(s2.sum(1), sizes.sum(1)), "merging keeps every original token's weight"
    assert torch.equal(p2.sum(1), protect.sum(1)), "special tokens are never merged away"
    # Every row merges its r best real tokens; the padded row (3 mergeable A tokens: 0 and 8 are
    # special) merges all 3 and gives up its A-set padding slot as the 4th removed column.
    assert int((s2[0] > 0).sum()) == 12 - 4
    assert int((s2[1] > 0).sum()) == 9 - 3
    assert int((s2[1] == 0).sum()) == 2  # of its 3 padding slots, the B-set ones stay
    # Size-weighted mean of the merged sequence equals the mean of the original real tokens.
    for row in range(3):
        before = (hidden[row] * sizes[row, :, None]).sum(0) / sizes[row].sum()
        after = (h2[row] * s2[row, :, None]).sum(0) / s2[row].sum()
        assert torch.allclose(before, after, atol=1e-5)


def test_a_text_merged_by_tome_embeds_the_same_alone_and_in_a_padded_batch(bert):
    """ToMe merges r real tokens of every row, whatever its padding: padding no longer absorbs a
    short text's merges when it shares a batch with longer ones (it used to be removed first)."""
    compress(bert, Recipe(steps=[TokenMergingConfig(r=2)]))
    bert.bucketing = False  # one padded batch, as a caller's own batching would give
    together = bert.embed(_batch(bert))
    alone = [bert.embed(_batch(bert, (t,)))[0] for t in TEXTS]
    lengths = _batch(bert)["attention_mask"].sum(1)
    assert int(lengths.min()) < int(lengths.max())  # the batch really pads its short texts
    for i, a in enumerate(alone):
        assert torch.allclose(together[i], a, atol=1e-5), f"text {i} changed with its batch-mates"


def test_padding_does_not_change_an_input_s_embedding(bert):
    alone = [bert.embed(_batch(bert, (t,))) for t in TEXTS]
    together = bert.embed(_batch(bert))
    for i, a in enumerate(alone):
        assert torch.allclose(together[i], a[0], atol=1e-5)
    # Through the dynamic runtime with pruning active, padding never becomes a kept token.
    compress(bert, Recipe(steps=[TokenPruningConfig(keep_ratio=0.9, layers=(0,))]))
    out, stats = bert.embed(_batch(bert), return_stats=True)
    assert torch.isfinite(out).all()
