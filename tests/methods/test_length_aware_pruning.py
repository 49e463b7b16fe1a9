"""Length-aware token pruning: texts at or below ``min_tokens`` are untouched, longer ones lose
``(1 - keep_ratio) * (n - min_tokens)`` tokens each, even when they share a batch."""

import copy

import pytest
import torch

from slimformer.compress import compress
from slimformer.errors import ConfigError
from slimformer.methods import CalibrationSettings, TokenPruningConfig, WidthSlimConfig
from slimformer.recipe import Recipe

SHORT = "Raise ValueError if negative."
LONG = " ".join(["Return the number of items in a container, counting nested containers as one item each."] * 3)


def _batch(loaded, texts):
    batch = dict(loaded.tokenizer(list(texts), padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    return batch


def test_short_texts_are_untouched_and_long_ones_lose_their_share(tiny_factory):
    bert = tiny_factory("bert")
    original = copy.deepcopy(bert)
    compress(bert, Recipe(steps=[TokenPruningConfig(keep_ratio=0.5, layers=(0,), schedule="length", min_tokens=24)]))
    bert.bucketing = False  # short and long rows in one padded batch
    batch = _batch(bert, [SHORT, LONG])
    n_short, n_long = (int(x) for x in batch["attention_mask"].sum(1))
    assert n_short <= 24 < n_long
    out, stats = bert.embed(batch, return_stats=True)
    expected_long = n_long - round(0.5 * (n_long - 24))
    assert stats.tokens_per_layer[1] == pytest.approx((n_short + expected_long) / 2)
    # the short text alone: nothing is removed, its embedding is the original's
    short = _batch(bert, [SHORT])
    assert torch.allclose(bert.embed(short), original.embed(short), atol=1e-5)
    assert torch.allclose(out[0], original.embed(short)[0], atol=1e-5)
    assert not torch.allclose(out[1], original.embed(_batch(bert, [LONG]))[0], atol=1e-4)


def test_constant_schedule_still_cuts_short_texts(tiny_factory):
    bert = tiny_factory("bert")
    compress(bert, Recipe(steps=[TokenPruningConfig(keep_ratio=0.5, layers=(0,))]))
    batch = _batch(bert, [SHORT])
    _, stats = bert.embed(batch, return_stats=True)
    assert stats.tokens_per_layer[1] < stats.tokens_per_layer[0]


@pytest.mark.parametrize("bad", [{"schedule": "pyramid"}, {"min_tokens": -1}])
def test_bad_schedule_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        TokenPruningConfig(**bad)


def test_pruning_runs_on_a_width_slimmed_model(tiny_factory):
    bert = tiny_factory("bert")
    compress(bert, Recipe(steps=[WidthSlimConfig(flops_ratio=0.5, head_ratio=0.5), TokenPruningConfig(keep_ratio=0.5, layers=(0,), schedule="length", min_tokens=8)],
                         calibration=CalibrationSettings(n_samples=8, max_length=32, batch_size=4)))
    batch = _batch(bert, [SHORT, LONG])
    out, stats = bert.embed(batch, return_stats=True)
    assert torch.isfinite(out).all() and stats.tokens_per_layer[1] < stats.tokens_per_layer[0]


def test_cls_importance_without_projecting_the_keys_equals_the_projected_scores(tiny_factory):
    """The [CLS] scores fold the key projection into the query (the key bias cancels in the
    softmax over tokens): the same importances as projecting every key, to float rounding."""
    from slimformer.methods.dynamic.runtime import DynamicEncoder
    from slimformer.methods.dynamic.token_reduction import attention_importance

    bert = tiny_factory("bert")
    runner = DynamicEncoder(bert)
    attn = getattr(runner.adapter.blocks()[1], runner.adapter.spec.attention)
    q_proj, k_proj = runner.adapter.query_key(attn)
    with torch.no_grad():
        k_proj.bias.normal_()  # a key bias that the fold must cancel, not ignore by luck
        hidden = torch.randn(3, 11, bert.model.config.hidden_size)
        sizes = torch.ones(3, 11)
        sizes[1, 7:] = 0  # a padded row
        folded = attention_importance(runner, 0, hidden, sizes, "cls")
        heads, hd = bert.model.config.num_attention_heads, bert.model.config.hidden_size // bert.model.config.num_attention_heads
        q = q_proj(hidden[:, 0]).view(3, 1, heads, hd)
        k = k_proj(hidden).view(3, 11, heads, hd)
        logits = (k * q).sum(-1) / hd**0.5 + torch.where(sizes > 0, 0.0, float("-inf"))[:, :, None]
        projected = logits.softmax(1).mean(-1)
    assert torch.allclose(folded, projected, atol=1e-6)
    assert float(folded[1, 7:].abs().max()) == 0.0  # padding gets no importance


def test_tokens_are_gathered_whole_and_in_order():
    from slimformer.methods.dynamic.token_reduction import _gather_tokens

    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    index = torch.tensor([[0, 2, 4], [1, 3, 4]])
    assert torch.equal(_gather_tokens(x, index), torch.stack([x[0, [0, 2, 4]], x[1, [1, 3, 4]]]))
    assert torch.equal(_gather_tokens(x[..., 0], index), torch.stack([x[0, [0, 2, 4], 0], x[1, [1, 3, 4], 0]]))
