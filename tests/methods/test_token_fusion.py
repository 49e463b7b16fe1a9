"""Token pruning with ``fuse`` (EViT): the dropped tokens of a row become one token carrying their
total size, so the row's mass and its mean-pooled state at the pruning point are unchanged."""

import copy

import pytest
import torch

from slimformer.compress import compress
from slimformer.errors import ConfigError
from slimformer.methods import TokenPruningConfig
from slimformer.methods.dynamic.runtime import DynamicEncoder, pool
from slimformer.methods.dynamic.token_reduction import TokenPruner
from slimformer.recipe import Recipe

LONG = " ".join(["Return the number of items in a container, counting nested containers as one item each."] * 3)
SHORT = "Raise ValueError if negative."


def _state(rows: int = 3, tokens: int = 20, dim: int = 32):
    torch.manual_seed(0)
    hidden = torch.randn(rows, tokens, dim)
    sizes = torch.ones(rows, tokens)
    sizes[1, 12:] = 0  # a padded row
    sizes[2, 3] = 2.5  # a token that already stands for several (an earlier fusion)
    protect = torch.zeros(rows, tokens, dtype=torch.bool)
    protect[:, 0] = True
    return hidden, sizes, protect


@pytest.mark.parametrize("schedule", ["length", "constant"])
def test_fusion_keeps_each_row_s_mass_and_mean_pooled_state(tiny_factory, schedule):
    bert = tiny_factory("bert")
    runner = DynamicEncoder(bert)
    hidden, sizes, protect = _state(dim=bert.model.config.hidden_size)
    plain = TokenPruner(0.5, "cls", schedule, min_tokens=4)
    fused = TokenPruner(0.5, "cls", schedule, min_tokens=4, fuse=True)
    with torch.no_grad():
        h0, s0, p0 = plain.reduce(runner, 0, hidden, sizes, protect)
        h1, s1, p1 = fused.reduce(runner, 0, hidden, sizes, protect)
    # the kept tokens are the plain pruner's, in order; one fused token follows
    assert torch.equal(h1[:, :-1], h0) and torch.equal(s1[:, :-1], s0) and torch.equal(p1[:, :-1], p0)
    assert not p1[:, -1].any()
    assert torch.allclose(s1.sum(1), sizes.sum(1))  # no mass lost
    assert torch.allclose(pool(h1, s1, "mean"), pool(hidden, sizes, "mean"), atol=1e-5)
    assert not torch.allclose(pool(h0, s0, "mean"), pool(hidden, sizes, "mean"), atol=1e-3)  # what plain pruning loses


def test_a_row_that_drops_nothing_gets_an_empty_fused_slot(tiny_factory):
    bert = tiny_factory("bert")
    runner = DynamicEncoder(bert)
    hidden, sizes, protect = _state(dim=bert.model.config.hidden_size)
    with torch.no_grad():
        h, s, p = TokenPruner(0.5, "cls", "length", min_tokens=12, fuse=True).reduce(runner, 0, hidden, sizes, protect)
    assert float(s[1, -1]) == 0.0 and float(h[1, -1].abs().max()) == 0.0  # row 1 has 12 real tokens: untouched
    assert float(s[0, -1]) == pytest.approx(4.0)  # 20 real tokens, half of the 8 above min_tokens dropped


def test_fused_pruning_runs_end_to_end_and_stays_closer_to_the_original(tiny_factory):
    bert = tiny_factory("bert")
    original = copy.deepcopy(bert)
    plain, fused = copy.deepcopy(bert), copy.deepcopy(bert)
    compress(plain, Recipe(steps=[TokenPruningConfig(keep_ratio=0.3, layers=(0,), schedule="length", min_tokens=4)]))
    compress(fused, Recipe(steps=[TokenPruningConfig(keep_ratio=0.3, layers=(0,), schedule="length", min_tokens=4, fuse=True)]))
    batch = dict(bert.tokenizer([LONG, SHORT], padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    ref = torch.nn.functional.normalize(original.embed(batch), dim=-1)
    out_plain, st_plain = plain.embed(batch, return_stats=True)
    out_fused, st_fused = fused.embed(batch, return_stats=True)
    assert st_fused.tokens_per_layer[1] == pytest.approx(st_plain.tokens_per_layer[1] + 1.0)  # one fused token per row
    cos = lambda out: (torch.nn.functional.normalize(out, dim=-1) * ref).sum(-1)
    assert float(cos(out_fused)[0]) > float(cos(out_plain)[0])


def test_fuse_must_be_a_boolean():
    with pytest.raises(ConfigError, match="fuse"):
        TokenPruningConfig(fuse="yes")
