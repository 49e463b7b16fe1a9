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
