"""Batch widths chosen by measurement: the choice rule, unchanged outputs when batches run wider
(plain and dynamic encoders), the widths really run, the sweep is cached, the planner installs
and removes the table."""

import pytest
import torch

from slimformer.compress import compress
from slimformer.errors import ConfigError
from slimformer.methods import TokenPruningConfig
from slimformer.methods.calibration import CompressionContext
from slimformer.recipe import Recipe
from slimformer.runtime.alignment import align_widths, choose_widths, measure_widths
from slimformer.runtime.planner import PlanSettings, plan_execution, remove_plan


def test_choose_widths_moves_only_to_a_clearly_faster_width_within_the_slack():
    per_row = [0.0] + [1.0 * w for w in range(1, 41)]  # proportional: nothing to gain
    assert choose_widths(per_row, slack=8, min_gain=0.1) == tuple(range(41))
    per_row[30] = 40.0  # width 30 is slow: 32 (32.0) is 20 % faster, 31 (31.0) 22.5 %
    per_row[31] = 40.0
    widths = choose_widths(per_row, slack=8, min_gain=0.1)
    assert widths[30] == 32 and widths[31] == 32 and widths[29] == 29
    per_row[30] = 34.0  # 32 saves 6 %: under min_gain, stays
    assert choose_widths(per_row, slack=8, min_gain=0.1)[30] == 30
    assert choose_widths(per_row, slack=1, min_gain=0.1)[30] == 30  # 32 is beyond the slack of 30
    assert choose_widths(per_row, slack=1, min_gain=0.1)[31] == 32


def _wider(max_len: int, extra: int) -> tuple[int, ...]:
    return tuple([0] + [min(max_len, w + extra) for w in range(1, max_len + 1)])


def _widths_seen(model, block: int) -> list[int]:
    """Widths of the hidden states entering ``block``, one entry per call."""
    seen: list[int] = []
    model.adapter.blocks()[block].register_forward_pre_hook(lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
    return seen


@pytest.mark.parametrize("bucketing", [True, False])
def test_wider_batches_give_the_same_embeddings_and_really_run_wider(tiny_factory, fast_calibration, bucketing):
    model = tiny_factory("bert")
    model.bucketing = bucketing
    batch = CompressionContext(fast_calibration).batches(model.tokenizer)[0]
    seen = _widths_seen(model, 0)
    reference = model.embed(batch)
    plain = list(seen)
    seen.clear()
    model.padded_widths = _wider(64, 5)
    out = model.embed(batch)
    assert torch.allclose(out, reference, atol=1e-5)
    assert plain and seen == [min(64, w + 5) for w in plain]


def test_a_pruned_model_runs_its_reduced_widths_wider_with_the_same_embeddings(tiny_factory, fast_calibration):
    model = tiny_factory("bert")
    compress(model, Recipe(steps=[TokenPruningConfig(layers=(0,), keep_ratio=0.5, schedule="length", min_tokens=4)], calibration=fast_calibration))
    batch = CompressionContext(fast_calibration).batches(model.tokenizer)[0]
    first, after = _widths_seen(model, 0), _widths_seen(model, 1)
    reference = model.embed(batch)
    plain_first, plain_after = list(first), list(after)
    first.clear()
    after.clear()
    model.padded_widths = _wider(64, 3)
    out = model.embed(batch)
    assert torch.allclose(out, reference, atol=1e-5)
    assert first == [min(64, w + 3) for w in plain_first]
    assert after == [min(64, w + 3) for w in plain_after]  # the pruned width, widened
    assert max(plain_after) < max(plain_first)  # it was pruned


def test_the_sweep_is_cached_per_machine_and_covers_every_width(tiny_factory, tmp_path):
    model = tiny_factory("bert")
    first = measure_widths(model, max_length=24, tokens=64, slack=4, repeats=1, cache_dir=str(tmp_path))
    assert not first["cached"] and len(first["widths"]) == 25 and len(first["seconds_per_row"]) == 25
    assert all(w <= v <= min(24, w + 4) for w, v in enumerate(first["widths"]) if w)
    again = measure_widths(model, max_length=24, tokens=64, slack=4, repeats=1, cache_dir=str(tmp_path))
    assert again["cached"] and again["seconds_per_row"] == first["seconds_per_row"]
    with pytest.raises(ConfigError) as err:
        measure_widths(model, max_length=0)
    assert "max_length" in str(err.value)


def test_the_cache_key_tells_formats_and_planned_paths_apart(tiny_factory, fast_calibration):
    from slimformer.methods import RTNConfig
    from slimformer.runtime.alignment import block_key

    def key(model):
        return block_key(model, model.adapter.blocks()[0], 32, 64)

    plain = tiny_factory("bert")
    eight, four = tiny_factory("bert"), tiny_factory("bert")
    compress(eight, Recipe(steps=[RTNConfig(bits=8, group_size=None)], calibration=fast_calibration))
    compress(four, Recipe(steps=[RTNConfig(bits=4, group_size=32)], calibration=fast_calibration))
    assert len({key(plain), key(eight), key(four)}) == 3
    before = key(four)
    from slimformer.runtime.execution import install_planned_forward

    linear = next(m for m in four.adapter.blocks()[0].modules() if type(m).__name__ == "QuantizedLinear")
    install_planned_forward(linear, "unpack-fp32", "dequant-fp32", 32)
    assert key(four) != before


def test_the_planner_installs_the_widths_for_encoders_and_removing_the_plan_clears_them(tiny_factory, tmp_path):
    model = tiny_factory("bert")
    plan = plan_execution(model, PlanSettings(cache_dir=str(tmp_path), repeats=1, batch_tokens=64, widths_max_length=16))
    assert model.padded_widths is not None and len(model.padded_widths) == 17
    assert plan.summary()["widths"]["max_length"] == 16
    remove_plan(model)
    assert model.padded_widths is None
    off = tiny_factory("bert")
    plan_execution(off, PlanSettings(cache_dir=str(tmp_path), repeats=1, batch_tokens=64, widths=False))
    assert off.padded_widths is None
    lm = tiny_factory("llama")
    plan_execution(lm, PlanSettings(cache_dir=str(tmp_path), repeats=1, batch_tokens=64))
    assert lm.padded_widths is None  # decoders decode: no batch widths


def test_widths_are_measured_for_encoders_only(tiny_factory):
    with pytest.raises(ConfigError):
        align_widths(tiny_factory("llama"), max_length=8)
