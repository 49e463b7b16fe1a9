"""Token-pruning rates chosen on calibration text (``target_cos``): the chosen ratios meet the
floor on that text, a lower floor prunes more, and what is saved is the chosen ratios."""

import pytest
import torch
import torch.nn.functional as F

import slimformer
from slimformer.compress import compress
from slimformer.errors import ConfigError
from slimformer.io import save_compressed
from slimformer.methods import TokenPruningConfig
from slimformer.methods.calibration import CompressionContext
from slimformer.methods.dynamic.runtime import DynamicEncoder
from slimformer.recipe import Recipe


def _calibration_cos(original, pruned, batches):
    a = torch.cat([F.normalize(DynamicEncoder(original).embed(b), dim=-1) for b in batches])
    b = torch.cat([F.normalize(pruned.embed(b), dim=-1) for b in batches])
    return float((a * b).sum(-1).mean())


def _flops(model, batches):
    return sum(model.embed(b, return_stats=True)[1].flops for b in batches)


def test_chosen_rates_keep_the_calibration_floor_and_a_lower_floor_prunes_more(tiny_factory, fast_calibration):
    original = tiny_factory("bert")
    batches = CompressionContext(fast_calibration).batches(original.tokenizer)
    results = {}
    for target in (0.995, 0.9):
        model = tiny_factory("bert")
        compress(model, Recipe(steps=[TokenPruningConfig(layers=(0, 1, 2), keep_ratio=0.2, target_cos=target, schedule="constant", cost="flops")], calibration=fast_calibration))
        record = model.applied[-1]
        cos = _calibration_cos(original, model, batches)
        assert cos >= target - 1e-6 and record["calibration_cos"] == pytest.approx(cos, abs=1e-5)
        assert all(0.2 - 1e-9 <= k < 1.0 for k in record["keep_ratios"])
        results[target] = (_flops(model, batches), record)
    assert results[0.9][0] < results[0.995][0]  # the lower floor removed more work
    assert results[0.9][1]["flops_ratio"] < 1.0


def test_a_neighbour_floor_keeps_the_calibration_top10_and_prunes_no_more(tiny_factory, fast_calibration):
    """With ``target_top10`` the chosen rates keep the calibration texts' nearest neighbours at
    the floor, and never remove more work than the cosine floor alone."""
    from slimformer.methods.dynamic.rate_search import neighbour_agreement

    original = tiny_factory("bert")
    batches = CompressionContext(fast_calibration).batches(original.tokenizer)
    reference = torch.cat([F.normalize(DynamicEncoder(original).embed(b), dim=-1) for b in batches])
    flops = {}
    for floor in (None, 0.9):
        model = tiny_factory("bert")
        compress(model, Recipe(steps=[TokenPruningConfig(layers=(0, 1, 2), keep_ratio=0.2, target_cos=0.8, target_top10=floor, schedule="constant", cost="flops")],
                               calibration=fast_calibration))
        record = model.applied[-1]
        pruned = torch.cat([F.normalize(model.embed(b), dim=-1) for b in batches])
        top10 = neighbour_agreement(reference, pruned)
        if floor is None:
            assert top10 < 0.9 and record["calibration_top10"] is None  # the cosine floor alone reorders neighbours
        else:
            assert record["calibration_top10"] == pytest.approx(top10, abs=1e-6) and top10 >= floor
            assert model.dynamic.configs[-1]["target_top10"] is None  # the chosen ratios are saved, not the floor
        flops[floor] = _flops(model, batches)
    assert flops[None] < flops[0.9] < _flops(tiny_factory("bert"), batches)  # it binds, and still prunes


def test_neighbour_agreement_counts_shared_neighbours():
    base = F.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    from slimformer.methods.dynamic.rate_search import neighbour_agreement

    assert neighbour_agreement(base, base) == 1.0
    shuffled = F.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert neighbour_agreement(base, shuffled) < 0.6  # unrelated embeddings share few of 10 neighbours of 29
    assert neighbour_agreement(base[:1], shuffled[:1]) == 1.0


def test_the_saved_model_carries_the_chosen_ratios_and_does_not_search_again(tiny_factory, fast_calibration, tmp_path):
    model = tiny_factory("bert")
    compress(model, Recipe(steps=[TokenPruningConfig(layers=(0, 1, 2), keep_ratio=0.3, target_cos=0.9, cost="flops")], calibration=fast_calibration))
    record = model.applied[-1]
    assert record["layers"], "the search pruned nothing at a 0.9 floor"
    saved = model.dynamic.configs[-1]
    assert saved["target_cos"] is None and list(saved["keep_ratios"]) == record["keep_ratios"]
    save_compressed(model, tmp_path / "m")
    again = slimformer.load(tmp_path / "m")
    assert {l: [r.keep_ratio for r in rs] for l, rs in again.dynamic.reducers.items()} == {l: [k] for l, k in zip(record["layers"], record["keep_ratios"])}
    batch = CompressionContext(fast_calibration).batches(model.tokenizer)[0]
    assert torch.allclose(again.embed(batch), model.embed(batch), atol=1e-5)


def test_with_measured_cost_a_move_that_saves_no_time_is_not_taken(tiny_factory, fast_calibration, monkeypatch):
    """Every pass "takes" one second (a fake clock): pruning saves FLOPs but no measured time, so
    the time objective keeps the model unpruned where the FLOP objective pruned it."""
    clock = iter(range(10**6))
    monkeypatch.setattr("time.perf_counter", lambda: float(next(clock)))
    model = tiny_factory("bert")
    compress(model, Recipe(steps=[TokenPruningConfig(layers=(0, 1, 2), keep_ratio=0.3, target_cos=0.5)], calibration=fast_calibration))
    record = model.applied[-1]
    assert record["cost"] == "time" and record["layers"] == [] and record["cost_ratio"] == 1.0
    assert not any(model.dynamic.reducers.values())


@pytest.mark.parametrize("kw, fix", [({"keep_ratios": (0.5,), "layers": (1, 2)}, "one keep ratio per layer"),
                                      ({"keep_ratios": (1.5,), "layers": (1,)}, "keep_ratios: [0.8, 0.6]"),
                                      ({"target_cos": 1.2}, "target_cos: 0.99"),
                                      ({"target_cos": 0.99, "keep_ratios": (0.5, 0.5)}, "one of target_cos or keep_ratios"),
                                      ({"step": 0}, "step: 0.1"),
                                      ({"cost": "latency"}, "cost: time"),
                                      ({"target_cos": 0.98, "target_top10": 0}, "target_top10: 0.9"),
                                      ({"target_top10": 0.9}, "target_cos: 0.98")])
def test_bad_rate_settings_name_the_fix(kw, fix):
    with pytest.raises(ConfigError) as err:
        TokenPruningConfig(**kw)
    assert fix in err.value.fix
