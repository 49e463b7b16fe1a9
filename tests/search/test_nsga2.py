"""NSGA-II (Optuna ask/tell) over per-unit levels: a true front, seeded, resumable to the same end."""

from __future__ import annotations

import pytest

from slimformer.errors import ConfigError
from slimformer.search.nsga2 import ParetoSettings, non_dominated, pareto_search, repaired, spread

from test_search import QuadraticPool, _costs

SETTINGS = ParetoSettings(population=12, generations=6, batches=1, seed=3)


def _cost(levels, costs):
    return sum(costs[u][k] for u, k in enumerate(levels))


def test_front_is_non_dominated_and_covers_the_uniform_settings():
    costs, _ = _costs()
    pool = QuadraticPool(len(costs), 4)
    result = pareto_search(pool, costs, SETTINGS)
    front = result.front
    assert len(front) >= 4
    assert [p["cost"] for p in front] == sorted(p["cost"] for p in front)
    assert all(a["fitness"] > b["fitness"] for a, b in zip(front, front[1:])), "more cost, strictly lower fitness"
    for p in front:
        assert p["cost"] == _cost(p["levels"], costs)
        assert p["fitness"] == pytest.approx(pool.score([p["levels"]], 1)[0])
    # Every uniform setting was scored in the first generation, and the front is at least as good at its cost.
    for k in range(4):
        uni = [k] * len(costs)
        f_uni = pool.score([uni], 1)[0]
        at_or_below = [p for p in front if p["cost"] <= _cost(uni, costs)]
        assert at_or_below and min(p["fitness"] for p in at_or_below) <= f_uni + 1e-12
    # Evolution found candidates that beat the uniform front somewhere between its points.
    assert result.evaluated > 4 * 2 and len(front) > 4


def test_same_seed_same_front_and_resume_after_a_kill_ends_identically(tmp_path):
    costs, _ = _costs()
    whole = pareto_search(QuadraticPool(len(costs), 4), costs, SETTINGS, journal=tmp_path / "a.jsonl")
    again = pareto_search(QuadraticPool(len(costs), 4), costs, SETTINGS)
    assert again.front == whole.front
    # A kill after generation 2, in the middle of writing generation 3's line.
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert len(lines) == SETTINGS.generations
    (tmp_path / "b.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    pool = QuadraticPool(len(costs), 4)
    resumed = pareto_search(pool, costs, SETTINGS, journal=tmp_path / "b.jsonl")
    assert resumed.front == whole.front
    assert resumed.evaluated == whole.evaluated
    assert pool.calls < whole.evaluated, "finished generations were not scored again"
    # Resuming a finished search scores nothing.
    done = QuadraticPool(len(costs), 4)
    assert pareto_search(done, costs, SETTINGS, journal=tmp_path / "a.jsonl").front == whole.front and done.calls == 0
    with pytest.raises(ValueError, match="other units"):
        pareto_search(QuadraticPool(6, 4), costs[:6], SETTINGS, journal=tmp_path / "a.jsonl")


def test_drop_groups_are_repaired_before_scoring_and_costing(tmp_path):
    """Units 0-2 and 3-4 each remove one sub-layer at level 0 (costing nothing): a drawn candidate
    with one member removed is scored and costed as the whole sub-layer removed."""
    base, _ = _costs(n_units=9)
    costs = [[0] + c[:3] if u < 5 else c for u, c in enumerate(base)]
    groups = [(0, 1, 2), (3, 4)]
    assert repaired([0, 2, 3, 1, 0, 1, 2, 3, 0], groups) == (0, 0, 0, 0, 0, 1, 2, 3, 0)
    assert repaired([1, 2, 3, 1, 2, 1, 2, 3, 0], groups) == (1, 2, 3, 1, 2, 1, 2, 3, 0)

    class Recording(QuadraticPool):
        def __init__(self, *a):
            super().__init__(*a)
            self.scored = []

        def score(self, candidates, n_batches):
            self.scored += [tuple(c) for c in candidates]
            return super().score(candidates, n_batches)

    settings = ParetoSettings(population=16, generations=5, batches=1, seed=1)
    pool = Recording(len(costs), 4)
    result = pareto_search(pool, costs, settings, journal=tmp_path / "g.jsonl", groups=groups)
    assert pool.scored and all(repaired(c, groups) == c for c in pool.scored), "only consistent candidates are scored"
    assert len(set(pool.scored)) == len(pool.scored) == result.evaluated
    drawn = [c for line in (tmp_path / "g.jsonl").read_text().splitlines() for c in __import__("json").loads(line)["levels"]]
    assert any(repaired(c, groups) != tuple(c) for c in drawn), "the sampler drew partial groups, which were repaired"
    for p in result.front:
        assert repaired(p["levels"], groups) == tuple(p["levels"])
        assert p["cost"] == _cost(p["levels"], costs)
    # Resuming from the journal rebuilds the same study (genes as drawn, costs of the repaired candidates).
    lines = (tmp_path / "g.jsonl").read_text().splitlines()
    (tmp_path / "h.jsonl").write_text("\n".join(lines[:2]) + "\n")
    again = pareto_search(QuadraticPool(len(costs), 4), costs, settings, journal=tmp_path / "h.jsonl", groups=groups)
    assert again.front == result.front and again.evaluated == result.evaluated


def test_helpers_and_settings():
    pts = [{"levels": [i], "fitness": f, "cost": c} for i, (f, c) in enumerate([(5, 1), (4, 2), (4.5, 3), (1, 4), (1, 5)])]
    assert [p["cost"] for p in non_dominated(pts)] == [1, 2, 4]
    front = [{"levels": [i], "fitness": 10 - i, "cost": i} for i in range(11)]
    assert [p["cost"] for p in spread(front, 3)] == [0, 5, 10]
    with pytest.raises(ConfigError, match="population"):
        ParetoSettings(population=1)
    with pytest.raises(ConfigError, match="seed"):
        ParetoSettings(seed="x")


def test_search_with_pareto_saves_front_members_on_a_tiny_model(tiny_factory, tmp_path):
    import dataclasses
    import json

    from slimformer.io.serialization import load_compressed
    from slimformer.search import search
    from test_search import _space

    space = dataclasses.replace(_space(), pareto=ParetoSettings(population=6, generations=2, batches=1, points=3))
    loaded = tiny_factory("llama")
    out = search(loaded, space, [], tmp_path / "s", eval_texts=8, eval_max_length=48, pareto=True)
    members = out.front["pareto"]["members"]
    assert 2 <= len(members) <= 3
    bits = [m["code_bits_per_weight"] for m in members]
    assert bits == sorted(bits) and 2.0 <= bits[0] and bits[-1] <= 8.0
    cal = [m["calibration_fitness"] for m in members]
    assert all(a > b for a, b in zip(cal, cal[1:])), "along the front, more bits means lower calibration KL"
    for m in members:
        model = load_compressed(tmp_path / "s" / "pareto" / m["label"] / "model")
        widths = [mod.bits for n, mod in model.model.named_modules() if hasattr(mod, "bits") and hasattr(mod, "weight_shape")]
        shapes = [tuple(mod.weight_shape) for n, mod in model.model.named_modules() if hasattr(mod, "bits") and hasattr(mod, "weight_shape")]
        avg = sum(b * r * c for b, (r, c) in zip(widths, shapes)) / sum(r * c for r, c in shapes)
        assert abs(avg - m["code_bits_per_weight"]) < 1e-9, "the saved model holds the front member's widths"
    assert json.loads((tmp_path / "s" / "front.json").read_text())["pareto"]["front_size"] >= len(members)
    with pytest.raises(ConfigError, match="no budget"):
        search(loaded, space, [], tmp_path / "t")
