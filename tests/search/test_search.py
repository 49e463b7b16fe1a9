"""EvoPress search: budgets, mutation, DP start, resume, level database, Ray parity."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from slimformer.errors import ConfigError
from slimformer.methods import CalibrationSettings
from slimformer.search import Budget, EvolutionSettings, QuantizationLevels, SearchSpace, build_database, dp_allocation, evolve, mutate, search
from slimformer.search.evolution import sensitivities, total_cost
from slimformer.search.fitness import Evaluator, reference_outputs
from slimformer.search.pool import LocalPool
from slimformer.search.space import unit_costs

CAL = CalibrationSettings(n_samples=16, max_length=48, batch_size=8)


class QuadraticPool:
    """A deterministic stand-in for a model: distortion falls with bits, and units 2k, 2k+1
    interact (their errors add up only when both are low), which an additive DP cannot see."""

    workers = 1

    def __init__(self, n_units: int, n_levels: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.w = [rng.uniform(0.5, 2.0) for _ in range(n_units)]
        self.n_levels = n_levels
        self.calls = 0

    def _err(self, u: int, k: int) -> float:
        return 0.0 if k < 0 else self.w[u] * 4.0 ** -k

    def score(self, candidates, n_batches):
        self.calls += len(candidates)
        out = []
        for c in candidates:
            s = sum(self._err(u, k) for u, k in enumerate(c))
            s += sum(3 * self._err(u, c[u]) * self._err(u + 1, c[u + 1]) for u in range(0, len(c) - 1, 2))
            out.append(s + 1e-3 * n_batches)  # more batches, a slightly different estimate
        return out


def _costs(n_units=12, n_levels=4, seed=1):
    rng = random.Random(seed)
    sizes = [rng.choice([64, 128, 256]) for _ in range(n_units)]
    return [[s * b for b in (2, 3, 4, 8)[:n_levels]] for s in sizes], sizes


def test_mutation_never_exceeds_the_budget_and_only_switches_levels():
    costs, sizes = _costs()
    budget = int(3.0 * sum(sizes))
    rng = random.Random(0)
    parent = dp_allocation([[4.0**-k * (u + 1) for k in range(4)] for u in range(len(costs))], costs, budget)
    assert total_cost(parent, costs) <= budget
    changed = 0
    for _ in range(300):
        child = mutate(parent, costs, budget, rng, max_switches=3)
        assert total_cost(child, costs) <= budget
        assert all(0 <= k < 4 for k in child)
        changed += child != parent
        parent = child
    assert changed > 200
    # The slack left by switches between units of different sizes is spent: no unit could still go up.
    cost = total_cost(parent, costs)
    assert all(k == 3 or cost - costs[u][k] + costs[u][k + 1] > budget for u, k in enumerate(parent))


def test_mutation_can_trade_one_large_unit_for_several_small_ones():
    """Drop/keep units of sizes 3 (an MLP sub-layer) and 1 (attention): a parent dropping two
    MLPs has children that keep one of them and drop three attention sub-layers instead (a
    one-for-one switch keeps the number of dropped units and could never get there)."""
    sizes = [3, 1] * 6
    costs = [[0, s] for s in sizes]
    budget = sum(sizes) - 6
    parent = [0 if u in (0, 2) else 1 for u in range(len(sizes))]  # the MLPs 0 and 2 dropped
    assert total_cost(parent, costs) == budget
    rng = random.Random(0)
    counts = set()
    for _ in range(400):
        child = mutate(parent, costs, budget, rng, max_switches=3)
        assert total_cost(child, costs) <= budget
        counts.add(child.count(0))
    assert 2 in counts and 4 in counts  # e.g. 1 MLP + 3 attention sub-layers dropped


def _grouped_costs():
    """Two drop groups (an "attention" of 3 linears of size 2, an "MLP" of 2 linears of size 3)
    and two plain units; levels: 0 = removed (grouped units) or 2 bits, then 2/4/8 bits."""
    groups = [(0, 1, 2), (3, 4)]
    sizes = [2, 2, 2, 3, 3, 4, 4]
    costs = [[0] + [s * b for b in (2, 4, 8)] if u < 5 else [s * b for b in (2, 4, 8)] for u, s in enumerate(sizes)]
    return groups, sizes, costs


def test_grouped_mutation_moves_drop_groups_whole_and_keeps_the_budget():
    """Units of a drop group reach and leave level 0 only together, and the bytes a removed
    sub-layer frees are spent on other units (so the children differ from bits-only moves)."""
    groups, sizes, costs = _grouped_costs()
    budget = total_cost([1, 1, 1, 1, 1, 0, 0], costs) + 8  # all at 2 bits, a little slack
    parent = [1, 1, 1, 1, 1, 0, 0]
    rng = random.Random(0)
    seen_dropped, seen_restored = set(), 0
    for _ in range(500):
        child = mutate(parent, costs, budget, rng, max_switches=3, groups=groups)
        assert total_cost(child, costs) <= budget
        for g in groups:  # consistent: the whole group at 0 or none of it
            assert len({child[u] == 0 for u in g}) == 1, child
        dropped = tuple(g for g in groups if child[g[0]] == 0)
        seen_dropped.add(dropped)
        if parent[0] == 0 and child[0] != 0:
            seen_restored += 1
        parent = child
    assert ((0, 1, 2),) in seen_dropped and ((3, 4),) in seen_dropped and seen_restored > 0
    # without groups the draws are those of the plain mutation
    a, b = random.Random(3), random.Random(3)
    c0, _ = _costs()
    start = [1] * len(c0)
    budget = total_cost(start, c0)
    assert [mutate(start, c0, budget, a, 3) for _ in range(20)] == [mutate(start, c0, budget, b, 3, groups=()) for _ in range(20)]


def test_grouped_dp_is_the_exact_optimum_over_consistent_candidates():
    """The DP over drop groups as whole items equals brute force over every consistent
    candidate (a group removed whole or not at all) for several budgets."""
    import itertools

    groups, sizes, costs = _grouped_costs()
    rng = random.Random(5)
    sens = []
    for u in range(len(costs)):
        widths = sorted((rng.uniform(0.1, 3.0) for _ in range(3)), reverse=True)
        sens.append(([0.0] if u < 5 else []) + widths)
    drop_cost = {0: 2.5, 3: 1.2}
    for g in groups:  # a removal's sensitivity, as every member's level-0 probe measures it
        for u in g:
            sens[u][0] = drop_cost[g[0]]

    def value(c):
        total = 0.0
        for g in groups:
            total += drop_cost[g[0]] if c[g[0]] == 0 else sum(sens[u][c[u]] for u in g)
        return total + sum(sens[u][c[u]] for u in (5, 6))

    consistent = [c for c in itertools.product(*(range(len(r)) for r in costs)) if all(len({c[u] == 0 for u in g}) == 1 for g in groups)]
    for budget in (20, 28, 40, 60, 90):
        fits = [c for c in consistent if total_cost(list(c), costs) <= budget]
        best = min(value(c) for c in fits)
        dp = dp_allocation(sens, costs, budget, groups)
        assert tuple(dp) in fits and value(dp) == pytest.approx(best)
    # the tightest budget can only be met by removing sub-layers, which the DP then does
    assert dp_allocation(sens, costs, 20, groups)[0] == 0 or dp_allocation(sens, costs, 20, groups)[3] == 0
    # a large group (e.g. the linears of many experts in one MLP) is merged member by member,
    # never enumerated as the product of its members' widths (4^24 here)
    big = list(range(24))
    big_costs = [[0, 2, 4, 8] for _ in big]
    big_sens = [[100.0, 1.0, 0.5, 0.1] for _ in big]  # removing it costs more than any widths
    chosen = dp_allocation(big_sens, big_costs, 24 * 4, [tuple(big)])
    assert chosen == [2] * 24  # 4 bits each: every cheaper mix of widths costs more sensitivity


def test_grouped_sensitivity_probes_remove_the_whole_group_once():
    class Recording(QuadraticPool):
        def score(self, candidates, n_batches):
            self.seen = getattr(self, "seen", []) + [tuple(c) for c in candidates]
            return super().score(candidates, n_batches)

    pool = Recording(7, 4)
    sens = sensitivities(pool, [4, 4, 4, 4, 4, 3, 3], groups=[(0, 1, 2), (3, 4)])
    drops = [c for c in pool.seen if 0 in c]
    assert (0, 0, 0, -1, -1, -1, -1) in drops and (-1, -1, -1, 0, 0, -1, -1) in drops
    assert not any(c.count(0) == 1 and (c.index(0) < 5) for c in drops)  # never one member alone
    assert sens[0][0] == sens[1][0] == sens[2][0] and sens[3][0] == sens[4][0]


def test_probe_cache_reuses_earlier_scores_and_scores_only_new_probes():
    def key_of(c):
        return ";".join(f"{u}@{k}" for u, k in enumerate(c) if k >= 0) or "original"

    cache: dict[str, float] = {}
    first = QuadraticPool(6, 4)
    expected = sensitivities(first, 6, 4, cache=cache, key_of=key_of)
    assert first.calls == 24 and len(cache) == 24
    again = QuadraticPool(6, 4)
    assert sensitivities(again, 6, 4, cache=cache, key_of=key_of) == expected and again.calls == 0
    # A search with one more level per unit scores only the new probes.
    more = QuadraticPool(6, 5)
    got = sensitivities(more, 6, 5, cache=cache, key_of=key_of)
    assert more.calls == 6 and [row[:4] for row in got] == expected and len(cache) == 30


def test_levels_equal_to_the_original_are_probed_once():
    """``original``: levels that leave a unit as in the original (KEEP) all give the original
    model, scored once instead of once per unit."""

    class KeepTopPool(QuadraticPool):
        def _err(self, u, k):
            return 0.0 if k in (-1, 3) else super()._err(u, k)  # level 3 = the original weights

    full, fewer = KeepTopPool(8, 4), KeepTopPool(8, 4)
    expected = sensitivities(full, 8, 4)
    got = sensitivities(fewer, 8, 4, original=[{3}] * 8)
    assert got == expected and (full.calls, fewer.calls) == (32, 8 * 3 + 1)


def test_zero_generations_returns_the_dp_allocation():
    costs, sizes = _costs()
    budget = int(3.0 * sum(sizes))
    pool = QuadraticPool(len(costs), 4)
    sens = sensitivities(pool, len(costs), 4)
    dp = dp_allocation(sens, costs, budget)
    result = evolve(pool, costs, budget, dp, EvolutionSettings(generations=0))
    assert result.levels == dp
    assert result.fitness == pool.score([dp], EvolutionSettings().stages[-1][1])[0]


def test_evolution_beats_the_additive_dp_when_layers_interact():
    costs, sizes = _costs(n_units=16)
    budget = int(3.0 * sum(sizes))
    pool = QuadraticPool(len(costs), 4)
    dp = dp_allocation(sensitivities(pool, len(costs), 4), costs, budget)
    result = evolve(pool, costs, budget, dp, EvolutionSettings(generations=60, offspring=8, stages=((2, 1), (1, 2)), seed=3))
    final = EvolutionSettings().stages[-1][1]
    assert total_cost(result.levels, costs) <= budget
    assert pool.score([result.levels], final)[0] < pool.score([dp], final)[0]
    assert all(b["fitness"] >= a["fitness"] - 1e-12 for a, b in zip(result.history[1:], result.history)), "fitness never gets worse"


def test_killed_and_resumed_search_ends_where_an_uninterrupted_one_does(tmp_path):
    costs, sizes = _costs()
    budget = int(2.5 * sum(sizes))
    pool = QuadraticPool(len(costs), 4)
    dp = dp_allocation(sensitivities(pool, len(costs), 4), costs, budget)
    settings = EvolutionSettings(generations=25, offspring=6, stages=((3, 1), (1, 2)), seed=7)
    whole = evolve(pool, costs, budget, dp, settings, journal=tmp_path / "a.jsonl")

    class Killed(Exception):
        pass

    def kill_at(gen, _result):
        if gen == 9:
            raise Killed

    with pytest.raises(Killed):
        evolve(pool, costs, budget, dp, settings, journal=tmp_path / "b.jsonl", on_generation=kill_at)
    with open(tmp_path / "b.jsonl", "a") as f:
        f.write('{"generation": 10, "par')  # a line cut by the kill
    resumed = evolve(pool, costs, budget, dp, settings, journal=tmp_path / "b.jsonl")
    assert resumed.levels == whole.levels
    assert resumed.fitness == whole.fitness
    assert [h["fitness"] for h in resumed.history] == [h["fitness"] for h in whole.history]


def test_more_generations_continue_the_journal_and_equal_a_longer_run(tiny_factory, tmp_path):
    loaded = tiny_factory("llama")
    short = search(loaded, _space(generations=2), [Budget("bits", 3.0)], tmp_path / "s", eval_texts=8, eval_max_length=48, save_models=False)
    first = (tmp_path / "s" / "bits=3" / "journal.jsonl").read_text().splitlines()
    longer = search(loaded, _space(generations=4), [Budget("bits", 3.0)], tmp_path / "s", eval_texts=8, eval_max_length=48, save_models=False)
    lines = (tmp_path / "s" / "bits=3" / "journal.jsonl").read_text().splitlines()
    assert len(first) == 2 and len(lines) == 4 and lines[:2] == first  # continued, not restarted
    fresh = search(loaded, _space(generations=4), [Budget("bits", 3.0)], tmp_path / "f", eval_texts=8, eval_max_length=48, save_models=False)
    assert longer.front["budgets"]["bits=3"]["bits"] == fresh.front["budgets"]["bits=3"]["bits"]
    assert longer.front["budgets"]["bits=3"]["searched_calibration_fitness"] == fresh.front["budgets"]["bits=3"]["searched_calibration_fitness"]
    assert short.front["budgets"]["bits=3"]["searched_calibration_fitness"] >= longer.front["budgets"]["bits=3"]["searched_calibration_fitness"]
    again = search(loaded, _space(generations=2), [Budget("bits", 3.0)], tmp_path / "s", eval_texts=8, eval_max_length=48, save_models=False)
    assert again.front["budgets"]["bits=3"]["generations"] == 4  # fewer asked: the journal's longer result, said as such
    assert again.front["budgets"]["bits=3"]["bits"] == longer.front["budgets"]["bits=3"]["bits"]
    other = dataclasses.replace(_space(), levels=dataclasses.replace(_space().levels, group_size=16))
    with pytest.raises(ConfigError, match="another model or space"):
        search(loaded, other, [Budget("bits", 3.0)], tmp_path / "s", eval_texts=8, eval_max_length=48, save_models=False)


def test_budgets_parse_and_check():
    assert Budget.parse("bits=3.0") == Budget("bits", 3.0)
    with pytest.raises(ConfigError, match="did you mean 'bits'"):
        Budget.parse("bit=3")
    with pytest.raises(ConfigError, match="positive"):
        Budget.parse("bits=-1")
    with pytest.raises(ConfigError, match="not a number"):
        Budget.parse("bits=three")
    lv = QuantizationLevels(bits=(2, 4), group_size=32)
    costs, limit = unit_costs([(8, 64), (16, 64)], lv, Budget("bits", 3.0))
    assert costs == [[8 * 64 * 2, 8 * 64 * 4], [16 * 64 * 2, 16 * 64 * 4]] and limit == 3 * (8 + 16) * 64
    costs, limit = unit_costs([(8, 64)], lv, Budget("bytes", 400))
    assert costs[0][0] == 8 * (64 * 2 + 2 * 24) and limit == 3200  # codes + bf16 scale + uint8 zero per group


def test_search_space_file_errors_name_the_fix(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("slimformer_search: 1\nspace: {bitz: [2, 4]}\n")
    with pytest.raises(ConfigError, match="did you mean 'bits'"):
        SearchSpace.from_file(bad)
    bad.write_text("slimformer_search: 1\nsearch: {stages: [[1, 2], [2, 4]]}\n")
    with pytest.raises(ConfigError, match="keep no more"):
        SearchSpace.from_file(bad)
    bad.write_text("slimformer_search: 1\nspace: {bits: [9]}\n")
    with pytest.raises(ConfigError, match="not supported"):
        SearchSpace.from_file(bad)
    bad.write_text("slimformer_search: 1\nspace: {bits: [2, 4]}\ntune: {steps: 0}\n")  # the tuning step's own checks
    with pytest.raises(ConfigError, match="steps"):
        SearchSpace.from_file(bad)
    bad.write_text("slimformer_search: 1\nspace: {bits: [2, 4]}\ntune: {method: gptq}\n")
    with pytest.raises(ConfigError, match="tune is for scale-tuning"):
        SearchSpace.from_file(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        SearchSpace.from_file(tmp_path / "missing.yaml")


def _space(generations=3):
    return SearchSpace(QuantizationLevels(bits=(2, 3, 4, 8), group_size=32), EvolutionSettings(generations=generations, offspring=4, stages=((2, 1), (1, 2))), CAL)


def test_level_database_holds_every_level_and_resumes_identically(tiny_factory, tmp_path):
    loaded = tiny_factory("llama")
    before = {n: p.clone() for n, p in loaded.model.state_dict().items()}
    db = build_database(loaded, _space(), tmp_path / "db")
    assert all(torch.equal(before[n], p) for n, p in loaded.model.state_dict().items()), "the original is left unchanged"
    assert len(db.units) == 4 * 7
    for unit in db.units:
        errors = [db.errors[unit][str(b)] for b in db.level_bits]
        assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3, "more bits, less output error"
        module = db.module(unit, 3)
        assert module.bits == 3 and tuple(module.weight_shape) == db.shapes[unit]
    # An interrupted build (one layer missing, index incomplete) is finished to the same bytes.
    victim = db.folder / (db.units[5] + ".safetensors")
    data = victim.read_bytes()
    victim.unlink()
    index = json.loads((db.folder / "index.json").read_text())
    index["complete"] = False
    (db.folder / "index.json").write_text(json.dumps(index))
    again = build_database(loaded, _space(), tmp_path / "db")
    assert victim.read_bytes() == data and again.units == db.units


def test_search_writes_models_within_budget_and_a_front(tiny_factory, tmp_path):
    loaded = tiny_factory("llama")
    out = search(loaded, _space(), [Budget("bits", 3.0), Budget("bits", 2.5)], tmp_path / "s", eval_texts=8, eval_max_length=48)
    front = json.loads((tmp_path / "s" / "front.json").read_text())
    assert (tmp_path / "s" / "front.png").stat().st_size > 1000
    assert set(front["uniform"]) == {"2", "3", "4", "8"}
    for label, value in (("bits=3", 3.0), ("bits=2.5", 2.5)):
        entry = front["budgets"][label]
        assert entry["within_budget"]
        assert entry["searched"]["code_bits_per_weight"] <= value + 1e-9
        assert entry["dp"]["code_bits_per_weight"] <= value + 1e-9
        from slimformer.io.serialization import load_compressed

        model = load_compressed(tmp_path / "s" / label / "model")
        bits = {n: m.bits for n, m in model.model.named_modules() if hasattr(m, "bits") and n in entry["bits"]}
        assert bits == entry["bits"], "the saved model holds exactly the searched levels"
        steps = model.manifest["recipe"]["steps"]
        assert sorted(n for s in steps for n in s["include"]) == sorted(entry["bits"])
        v = entry["validation"]
        if "searched" in v:  # the evolution moved: the better of its start and result on unseen text is kept
            assert v["documents"] > 0 and v["kept"] == ("start" if v["searched"] > v["start"] else "searched")
            assert (entry["evolved"] is None) == (v["kept"] == "searched")
    assert out.front["budgets"]["bits=3"]["searched_calibration_fitness"] <= json.loads(
        (tmp_path / "s" / "bits=3" / "journal.jsonl").read_text().splitlines()[0])["fitness"] + 1e-12
    # Run again: everything is reused (database, sensitivities, journals), same front.
    again = search(loaded, _space(), [Budget("bits", 3.0), Budget("bits", 2.5)], tmp_path / "s", eval_texts=8, eval_max_length=48)
    assert again.front["budgets"]["bits=3"]["bits"] == front["budgets"]["bits=3"]["bits"]


def test_tuned_search_tunes_dp_and_searched_alike_and_saves_the_tuned_model(tiny_factory, tmp_path):
    from slimformer.io.serialization import load_compressed
    from slimformer.methods.quantization.modules import QuantizedLinear
    from slimformer.search.run import assemble

    loaded = tiny_factory("llama")
    tune = {"steps": 12, "lr": 0.02, "autocast": "float32"}
    space = dataclasses.replace(_space(), tune=tune)
    assert SearchSpace.from_dict(space.to_dict()) == space and "tune" not in _space().to_dict()
    search(loaded, space, [Budget("bits", 3.0)], tmp_path / "s", eval_texts=8, eval_max_length=48)
    entry = json.loads((tmp_path / "s" / "front.json").read_text())["budgets"]["bits=3"]
    for name in ("dp", "searched"):
        record = entry[f"{name}_tuned"]["tuning"]
        assert record["steps"] == 12 and record["loss_stored"] < record["loss_before"]
    model = load_compressed(tmp_path / "s" / "bits=3" / "model")
    steps = model.manifest["recipe"]["steps"]
    assert steps[-1]["method"] == "scale-tuning" and steps[-1]["steps"] == 12
    assert model.manifest["evaluation"]["quality"] == entry["searched_tuned"]["quality"]
    untuned = assemble(loaded, build_database(loaded, space, tmp_path / "s" / "levels"), entry["bits"])
    saved = {n: m for n, m in model.model.named_modules() if isinstance(m, QuantizedLinear)}
    plain = {n: m for n, m in untuned.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert saved.keys() == plain.keys()
    assert all(torch.equal(saved[n].qweight, plain[n].qweight) and saved[n].stored_bits() == plain[n].stored_bits() for n in saved)
    assert any(not torch.equal(saved[n].scales, plain[n].scales) for n in saved), "the saved model is the tuned one"
    # other tuning settings continue the same search (the candidates do not depend on them)
    again = search(loaded, dataclasses.replace(space, tune={**tune, "steps": 6}), [Budget("bits", 3.0)], tmp_path / "s", eval_texts=8, eval_max_length=48)
    assert again.front["budgets"]["bits=3"]["bits"] == entry["bits"] and again.front["budgets"]["bits=3"]["searched_tuned"]["tuning"]["steps"] == 6


def test_a_tuning_that_cannot_fit_is_refused_before_the_search_starts(tiny_factory, tmp_path, monkeypatch):
    from slimformer.methods.preflight import InsufficientMemoryError, estimate_steps_peak
    from slimformer.search.space import tuning_step

    loaded = tiny_factory("llama")
    space = dataclasses.replace(_space(), tune={"steps": 2, "batch_size": 16, "max_length": 48})
    need = estimate_steps_peak(loaded, [tuning_step(space.tune)], space.calibration).additional_bytes
    monkeypatch.setenv("SLIMFORMER_MEMORY_LIMIT", str(need - 1))
    with pytest.raises(InsufficientMemoryError, match="distillation.*calibration.batch_size") as err:
        search(loaded, space, [Budget("bits", 3.0)], tmp_path / "s", eval_texts=8, eval_max_length=48)
    assert "\n" not in str(err.value) and not (tmp_path / "s").exists()  # nothing built, nothing written


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "recipes" / "search").glob("*.yaml")), ids=lambda p: p.name)
def test_example_search_spaces_load_and_round_trip(path):
    space = SearchSpace.from_file(path)
    assert SearchSpace.from_dict(space.to_dict()) == space


def test_ray_workers_score_exactly_as_in_process(tiny_factory, tmp_path):
    import ray  # a test dependency: pip install -e '.[test]'

    from slimformer.methods.calibration import CompressionContext
    from slimformer.search.pool import RayPool

    loaded = tiny_factory("llama")
    db = build_database(loaded, _space(), tmp_path / "db")
    batches = CompressionContext(CAL).batches(loaded.tokenizer)[:2]
    reference = reference_outputs(loaded, batches)
    n = len(db.units)
    rng = random.Random(0)
    candidates = [[rng.randrange(4) for _ in range(n)] for _ in range(6)]
    local = LocalPool(loaded, db, batches, reference, threads=1)
    expected = local.score(candidates, 2)
    costs, limit = unit_costs([db.shapes[u] for u in db.units], _space().levels, Budget("bits", 3.0))
    start = dp_allocation(sensitivities(local, n, 4), costs, limit)
    settings = EvolutionSettings(generations=3, offspring=4, stages=((2, 1), (1, 2)), seed=1)
    local_result = evolve(local, costs, limit, start, settings)
    pool = RayPool(loaded, db, batches, reference, workers=2, address="local", threads=1)
    try:
        assert pool.score(candidates, 2) == expected
        ray_result = evolve(pool, costs, limit, start, settings)
    finally:
        pool.close()
    assert not ray.is_initialized()
    assert ray_result.levels == local_result.levels and ray_result.fitness == local_result.fitness


def test_evaluator_switches_only_changed_layers_and_restores_originals(tiny_factory, tmp_path):
    loaded = tiny_factory("bert")
    db = build_database(loaded, _space(), tmp_path / "db")
    batches = _batches(loaded)
    ev = Evaluator(loaded, db, batches, reference_outputs(loaded, batches))
    original = ev.score([-1] * len(db.units), 1)
    assert original == pytest.approx(0.0, abs=1e-6)
    low = ev.score([0] * len(db.units), 1)
    high = ev.score([3] * len(db.units), 1)
    assert low > high and abs(high) < 1e-4  # 8 bits: distortion at rounding level
    unit = db.units[0]
    ev.set_levels({unit: 1})
    assert torch.equal(ev.modules[unit].weight, db.weight(unit, 3))
    assert ev.score([-1] * len(db.units), 1) == original


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bf16_scoring_ranks_levels_as_float32_does_and_leaves_the_original_alone(tiny_factory, tmp_path, family):
    """Candidates scored in bfloat16 against the float32 original: the scores follow float32's
    within bf16 rounding (orders of magnitude below the gaps between levels), in the same order."""
    loaded = tiny_factory(family)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    db = build_database(loaded, _space(), tmp_path / "db")
    batches = _batches(loaded)
    reference = reference_outputs(loaded, batches)
    fp32 = Evaluator(loaded, db, batches, reference)
    bf16 = Evaluator(loaded, db, batches, reference, dtype="bfloat16")
    assert next(bf16.loaded.model.parameters()).dtype == torch.bfloat16 and next(loaded.model.parameters()).dtype == torch.float32
    n = len(db.units)
    a = [fp32.score([k] * n, 2) for k in range(4)]
    b = [bf16.score([k] * n, 2) for k in range(4)]
    assert a[0] > a[1] > a[2] > a[3] and b[0] > b[1] > b[2] > b[3]
    assert b[1] == pytest.approx(a[1], rel=0.05) and b[2] == pytest.approx(a[2], rel=0.05)
    assert bf16.score([-1] * n, 2) < 0.1 * a[2]  # bf16 rounding alone: far below a 4-bit level's distortion
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ConfigError, match="dtype: bfloat16"):
        EvolutionSettings(dtype="float16")


def _batches(loaded):
    from slimformer.methods.calibration import CompressionContext

    return CompressionContext(CAL).batches(loaded.tokenizer)


def test_cli_search_on_a_model_folder_and_its_bad_input(tmp_path, tiny_folder, run_cli):
    space = tmp_path / "space.yaml"
    space.write_text(
        "slimformer_search: 1\ncalibration: {n_samples: 16, max_length: 48, batch_size: 8}\n"
        "space: {bits: [2, 4, 8], group_size: 32}\nsearch: {generations: 2, offspring: 3, stages: [[2, 1], [1, 2]]}\n"
    )
    code, out, err = run_cli("search", tiny_folder, "--space", space, "--budget", "bits=3", "--out", tmp_path / "s", "--eval-texts", "24", "--quiet")
    assert code == 0, err
    assert "bits=3 EvoPress" in out and (tmp_path / "s" / "bits=3" / "model" / "model.safetensors").is_file()
    for args, problem in (
        (["--budget", "bitz=3"], "did you mean 'bits'"),
        (["--budget", "bits=0"], "must be a positive number"),
        (["--budget", "bits=3", "--workers", "0"], "--workers 0"),
    ):
        code, out, err = run_cli("search", tiny_folder, "--space", space, "--out", tmp_path / "bad", *args)
        assert code == 2 and err.startswith("slimformer: error: ") and problem in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("shared_width", [False, True])
def test_joint_space_removes_sublayers_within_a_byte_budget(tiny_factory, tmp_path, shared_width):
    from slimformer.io.serialization import load_compressed
    from slimformer.search.units import DROP, build_units, drop_groups

    loaded = tiny_factory("llama")
    levels = QuantizationLevels(bits=(2, 4, 8), group_size=32, drop=("attention", "mlp"), shared_width=shared_width)
    space = SearchSpace(levels, EvolutionSettings(generations=3, offspring=4, stages=((2, 1), (1, 2))), CAL)
    db = build_database(loaded, space, tmp_path / "db")
    units = build_units(loaded, db, levels)
    assert all(u.levels[0] == DROP for u in units)
    assert sorted(n for u in units for n in u.linears) == sorted(db.units)
    if shared_width:  # one unit per sub-layer, its linears sharing a width
        assert len(units) == 2 * 4 and drop_groups(units) == []
    else:  # one unit per linear; the 4 + 3 linears of each block's sub-layers are its drop groups
        assert len(units) == len(db.units) == 7 * 4
        assert sorted(len(g) for g in drop_groups(units)) == [3] * 4 + [4] * 4
    # A byte budget below the smallest all-2-bit model forces some sub-layers out.
    two_bit = sum(levels.stored_bits(*db.shapes[u], 2) for u in db.units) // 8
    label = f"bytes={two_bit * 0.8:g}"
    out = search(loaded, space, [Budget("bytes", two_bit * 0.8)], tmp_path / "s", eval_texts=8, eval_max_length=48)
    entry = out.front["budgets"][label]
    assert entry["within_budget"] and entry["searched"]["stored_bytes"] <= two_bit * 0.8
    removed = entry["removed_sublayers"]
    assert removed, "the budget cannot be met without removing sub-layers"
    model = load_compressed(tmp_path / "s" / label / "model")
    structure = model.manifest["structure"].get("blocks", {})
    blocks_gone = 4 - model.adapter.num_layers()
    assert sum(len(b.get("removed", [])) for b in structure.values()) + 2 * blocks_gone == len(removed)
    assert len(entry["bits"]) == len(db.units) - sum(len(u.linears) for u in units if f"{u.block}.{u.kind}" in removed)
    # The structure levels store nothing in the database: the bits-only space's database is
    # reused as it is (same fingerprint), while other widths or calibration make another one.
    from slimformer.search.database import database_key

    bits_only = SearchSpace(QuantizationLevels(bits=(2, 4, 8), group_size=32), space.evolution, CAL)
    assert database_key("m", space) == database_key("m", bits_only)
    assert build_database(loaded, bits_only, tmp_path / "db").index["key"] == db.index["key"]
    assert database_key("m", SearchSpace(QuantizationLevels(bits=(2, 4), group_size=32, drop=("mlp",)), space.evolution, CAL)) != database_key("m", space)


def test_a_joint_search_reuses_the_bits_only_searchs_probes_from_their_shared_database(tiny_factory, tmp_path, monkeypatch):
    """Two searches over one level database (the joint space's folder links the bits-only one's
    levels): the width probes are stored beside the database by what they change and the joint
    search scores only its removal probes; its sensitivities equal a fresh computation's."""
    import json
    import os

    import slimformer.search.run as run
    from slimformer.search.run import probe_key
    from slimformer.search.units import build_units

    scored = []

    class Counting(run.LocalPool):
        def score(self, candidates, n_batches):
            scored.append(len(candidates))
            return super().score(candidates, n_batches)

    monkeypatch.setattr(run, "LocalPool", Counting)
    loaded = tiny_factory("llama")
    evo = EvolutionSettings(generations=0, offspring=4, stages=((2, 1), (1, 2)))
    bits_only = SearchSpace(QuantizationLevels(bits=(2, 4), group_size=32), evo, CAL)
    joint = SearchSpace(QuantizationLevels(bits=(2, 4), group_size=32, drop=("attention", "mlp")), evo, CAL)
    search(loaded, bits_only, [Budget("bits", 3.0)], tmp_path / "a", eval_texts=4, eval_max_length=32, save_models=False)
    (tmp_path / "b").mkdir()
    os.symlink(tmp_path / "a" / "levels", tmp_path / "b" / "levels")
    probes = list((tmp_path / "a" / "levels").glob("probes-*.json"))
    assert len(probes) == 1
    widths = json.loads(probes[0].read_text())
    assert sorted(widths) == sorted(f"{u}@{b}" for u in build_database(loaded, bits_only, tmp_path / "a" / "levels").units for b in (2, 4))
    scored.clear()
    search(loaded, joint, [Budget("bits", 3.0)], tmp_path / "b", eval_texts=4, eval_max_length=32, save_models=False)
    linked = sum(scored)
    both = json.loads(probes[0].read_text())
    assert set(widths) <= set(both) and sorted(set(both) - set(widths)) == sorted(f"-model.layers.{b}.{k}" for b in range(4) for k in ("self_attn", "mlp"))
    # A fresh joint search (its own database) scores the 56 width probes the linked one reused,
    # and measures what was reused.
    scored.clear()
    search(loaded, joint, [Budget("bits", 3.0)], tmp_path / "c", eval_texts=4, eval_max_length=32, save_models=False)
    assert sum(scored) - linked == len(widths) == 56
    fresh = json.loads(next((tmp_path / "c" / "levels").glob("probes-*.json")).read_text())
    assert fresh.keys() == both.keys() and all(fresh[k] == pytest.approx(both[k], rel=1e-5, abs=1e-9) for k in fresh)
    sens_b = json.loads((tmp_path / "b" / "sensitivity.json").read_text())["sensitivity"]
    sens_c = json.loads((tmp_path / "c" / "sensitivity.json").read_text())["sensitivity"]
    assert [x for row in sens_b for x in row] == pytest.approx([x for row in sens_c for x in row], rel=1e-5, abs=1e-9)
    units = build_units(loaded, build_database(loaded, joint, tmp_path / "c" / "levels"), joint.levels)
    assert probe_key(units, tuple([-1] * len(units))) == "original"
    assert probe_key(units, tuple([0] + [-1] * (len(units) - 1))) == f"-{units[0].sublayer}"


def test_structure_only_space_removes_sublayers_and_keeps_the_rest_exactly(tiny_factory, tmp_path):
    """``bits: []`` with ``keep`` and ``drop``: a pure structure search under a parameter budget.
    Nothing is quantized (no level files), the kept layers are the original's bit for bit, the
    removed ones are gone from the saved model."""
    from slimformer.io.serialization import load_compressed
    from slimformer.search.units import DROP, KEEP, build_units, levels_for

    loaded = tiny_factory("llama")
    levels = QuantizationLevels(bits=(), drop=("attention", "mlp"), keep=True)
    space = SearchSpace(levels, EvolutionSettings(generations=3, offspring=4, stages=((2, 1), (1, 2))), CAL)
    db = build_database(loaded, space, tmp_path / "db")
    assert db.level_bits == () and not list((tmp_path / "db").glob("*.safetensors"))
    units = build_units(loaded, db, levels)
    assert all(u.levels == (DROP, KEEP) and u.keep_bits == 32 for u in units)
    # seeds: a start over the budget is not scored; one within it is scored against the DP start
    everything = levels_for(units, {(b, k) for b in range(4) for k in ("attention", "mlp")})
    three_mlps = levels_for(units, {(0, "mlp"), (1, "mlp"), (2, "mlp")})
    assert everything == [0] * len(units) and sum(three_mlps) == len(units) - 3
    out = search(loaded, space, [Budget("params", 0.5)], tmp_path / "s", eval_texts=8, eval_max_length=48,
                 seeds={"nothing-kept": everything, "three-mlps": three_mlps, "over": [1] * len(units)})
    entry = out.front["budgets"]["params=0.5"]
    starts = entry["starts"]
    assert starts["over"] is None and starts["nothing-kept"] >= 0 and starts["chosen"] in ("dp", "nothing-kept", "three-mlps")
    chosen = starts[starts["chosen"]]
    assert chosen == min(v for k, v in starts.items() if k != "chosen" and v is not None)
    assert entry["searched_calibration_fitness"] <= chosen + 1e-12  # evolution never ends worse than its start
    assert entry["within_budget"] and entry["searched"]["params_kept"] <= 0.5 and entry["searched"]["removed_sublayers"]
    assert set(entry["bits"].values()) == {KEEP} and entry["searched"]["code_bits_per_weight"] == pytest.approx(32 * entry["searched"]["params_kept"])
    model = load_compressed(tmp_path / "s" / "params=0.5" / "model")
    removed = set(entry["searched"]["removed_sublayers"])
    original = dict(loaded.model.named_parameters())
    kept = dict(model.model.named_parameters())
    assert sum(p.numel() for p in kept.values()) < sum(p.numel() for p in original.values())
    blocks = [i for i in range(4) if not {f"{i}.attention", f"{i}.mlp"} <= removed]  # a block without both sub-layers is gone
    assert model.adapter.num_layers() == len(blocks)
    for name, p in kept.items():  # every surviving weight is the original's, bit for bit
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            parts[2] = str(blocks[int(parts[2])])
            assert not any(f"{parts[2]}.{kind}" in removed and parts[3] == mod for kind, mod in (("attention", "self_attn"), ("mlp", "mlp")))
        assert torch.equal(p, original[".".join(parts)]), name


def test_nll_fitness_is_the_calibration_perplexity_and_drives_a_structure_search(tiny_factory, tmp_path):
    """``fitness: nll``: a candidate's score is its mean next-token negative log-likelihood on the
    calibration batches (Hugging Face's own loss on them), the criterion SLEB
    uses; a structure search with it ends no worse than its start; encoders are refused; the
    default (kl) leaves fingerprints as they were."""
    from slimformer.methods.calibration import CompressionContext
    from slimformer.search.fitness import ORIGINAL, negative_log_likelihood
    from slimformer.search.units import build_units

    loaded = tiny_factory("llama")
    levels = QuantizationLevels(bits=(), drop=("attention", "mlp"), keep=True)
    evo = EvolutionSettings(generations=3, offspring=4, stages=((2, 1), (1, 2)), fitness="nll")
    space = SearchSpace(levels, evo, CAL)
    batches = CompressionContext(CAL).batches(loaded.tokenizer)[:2]
    db = build_database(loaded, space, tmp_path / "db")
    units = build_units(loaded, db, levels)
    ev = Evaluator(loaded, db, batches, [], units=units, fitness="nll")
    total = count = 0.0
    for b in batches:
        s, n = negative_log_likelihood(loaded, b)
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        assert s / n == pytest.approx(float(loaded.model(**b, labels=labels).loss), rel=1e-4)
        total, count = total + s, count + n
    assert ev.score([ORIGINAL] * len(units), 2) == pytest.approx(total / count, rel=1e-6)
    assert ev.score([0] + [ORIGINAL] * (len(units) - 1), 2) != pytest.approx(total / count, rel=1e-6), "a removed sub-layer changes it"
    out = search(loaded, space, [Budget("params", 0.5)], tmp_path / "s", eval_texts=8, eval_max_length=48, save_models=False)
    entry = out.front["budgets"]["params=0.5"]
    assert entry["within_budget"] and entry["searched_calibration_fitness"] <= entry["history"][0]["fitness"] + 1e-12
    assert out.front["space"]["search"]["fitness"] == "nll"
    kl_space = dataclasses.replace(space, evolution=dataclasses.replace(evo, fitness="kl"))
    assert "fitness" not in kl_space.to_dict()["search"]
    with pytest.raises(ConfigError, match="fitness"):
        EvolutionSettings(fitness="ppl")
    with pytest.raises(ConfigError, match="causal language models"):
        search(tiny_factory("bert"), space, [Budget("params", 0.5)], tmp_path / "e", eval_texts=8, eval_max_length=48)


def test_keep_level_and_params_budget_costs(tiny_factory, tmp_path):
    from slimformer.search.units import KEEP, build_units, costs_of

    loaded = tiny_factory("llama")
    levels = QuantizationLevels(bits=(2, 4), group_size=32, keep=True)
    space = SearchSpace(levels, EvolutionSettings(generations=0), CAL)
    db = build_database(loaded, space, tmp_path / "db")
    units = build_units(loaded, db, levels)
    assert all(u.levels == (2, 4, KEEP) for u in units)
    costs, limit = costs_of(units, db, levels, Budget("bits", 8.0))
    n = [db.shapes[u.linears[0]][0] * db.shapes[u.linears[0]][1] for u in units]
    assert costs == [[2 * w, 4 * w, 32 * w] for w in n] and limit == 8 * sum(n)
    costs, limit = costs_of(units, db, levels, Budget("params", 0.75))
    assert costs == [[w, w, w] for w in n] and limit == int(0.75 * sum(n))
    with pytest.raises(ConfigError, match="at most 1"):
        Budget.parse("params=1.5")
    with pytest.raises(ConfigError, match="bits: \\[\\] only with keep"):
        QuantizationLevels(bits=(), drop=("mlp",))
    # a space without keep has the fingerprint it had before the keep level existed
    assert "keep" not in SearchSpace(QuantizationLevels()).to_dict()["space"]
    # nor one without droppable sub-layers the shared_width flag (nothing to share there)
    assert "shared_width" not in SearchSpace(QuantizationLevels()).to_dict()["space"]
    assert SearchSpace(QuantizationLevels(drop=("mlp",))).to_dict()["space"]["shared_width"] is False
    with pytest.raises(ConfigError, match="shared_width"):
        QuantizationLevels(drop=("mlp",), shared_width="yes")


def test_search_levels_may_use_any_packed_width():
    """5-, 6- and 7-bit levels: GPTQ packs them to exactly ceil(cols * bits / 8) bytes a row,
    they round-trip through their description, and each bit divides the Hessian-weighted
    error by about 4 (a uniform grid's rule, which --allocation-bound extrapolates with)."""
    from torch import nn

    from slimformer.methods.quantization.gptq import quantize_linear_gptq
    from slimformer.methods.quantization.modules import QuantizedLinear

    space = SearchSpace.from_dict({"slimformer_search": 1, "space": {"bits": [2, 3, 4, 5, 6, 8]}})
    assert space.levels.bits == (2, 3, 4, 5, 6, 8)
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    x = torch.randn(512, 128)
    hessian = x.t() @ x / 512
    errors = []
    for bits in (4, 5, 6, 7):
        q = quantize_linear_gptq(linear, hessian, bits, 64, False, damp=0.01)
        assert q.qweight.shape == (64, 128 * bits // 8)
        again = QuantizedLinear.from_description(q.describe())
        again.load_state_dict(q.state_dict())
        assert torch.equal(again.dequantized_weight(), q.dequantized_weight())
        d = (q.dequantized_weight() - linear.weight.detach()) @ x.t()
        errors.append(float(d.pow(2).sum() / (linear.weight.detach() @ x.t()).pow(2).sum()))
    assert all(2.5 < a / b < 6 for a, b in zip(errors, errors[1:]))


def test_clipped_levels_lower_the_low_widths_error_and_keep_their_own_database(tiny_factory, tmp_path):
    """``clip_search: true`` builds every level with GPTQ's clipping search: at 2 bits the summed
    Hessian-weighted output error of the layers falls; the option is part of the database's
    fingerprint (a plain space's fingerprint is what it was before the option existed)."""
    from slimformer.search.database import database_key

    loaded = tiny_factory("llama")
    plain = _space()
    clipped = dataclasses.replace(plain, levels=dataclasses.replace(plain.levels, clip_search=True))
    assert "clip_search" not in plain.to_dict()["space"] and clipped.to_dict()["space"]["clip_search"] is True
    assert database_key("m", plain) != database_key("m", clipped)
    a = build_database(loaded, plain, tmp_path / "plain")
    b = build_database(loaded, clipped, tmp_path / "clip")
    two = [(a.errors[u]["2"], b.errors[u]["2"]) for u in a.units]
    assert sum(y for _, y in two) < 0.95 * sum(x for x, _ in two)
    with pytest.raises(ConfigError, match="another model, space or calibration"):
        build_database(loaded, clipped, tmp_path / "plain")
    from slimformer.search.run import searched_recipe
    from slimformer.recipe import Recipe

    recipe = searched_recipe(clipped, {b.units[0]: 2, b.units[1]: 3}, "bits=2.5")
    assert [s.get("clip_search") for s in recipe["steps"]] == [True, True]
    assert all(step.clip_search for step in Recipe.from_dict(recipe).steps)
    with pytest.raises(ConfigError, match="GPTQ option"):
        QuantizationLevels(quantizer="rtn", clip_search=True)
    with pytest.raises(ConfigError, match="true or false"):
        QuantizationLevels(clip_search="yes")


def test_validation_text_is_calibration_text_the_search_never_scored(tiny_factory):
    from slimformer.methods.calibration import CompressionContext
    from slimformer.search.run import validation_batches

    loaded = tiny_factory("llama")
    ctx = CompressionContext(CAL)
    seen = {tuple(row[mask.bool()].tolist()) for b in ctx.batches(loaded.tokenizer) for row, mask in zip(b["input_ids"], b["attention_mask"])}
    fresh = [tuple(row[mask.bool()].tolist()) for b in validation_batches(loaded, ctx) for row, mask in zip(b["input_ids"], b["attention_mask"])]
    assert CAL.batch_size <= len(fresh) <= CAL.n_samples and not seen & set(fresh)


def test_validation_keeps_the_start_when_the_evolved_candidate_is_worse_on_unseen_text():
    from slimformer.search.run import validate

    class Judge:
        batches = [{"input_ids": torch.zeros(4, 8, dtype=torch.long)}] * 2

        def __init__(self, scores):
            self.scores = scores

        def score(self, levels, n_batches):
            return self.scores[tuple(levels)]

    start, evolved = [0, 1], [1, 0]
    worse = validate(Judge({(0, 1): 0.5, (1, 0): 0.6}), start, evolved, 2)
    assert worse["kept"] == "start" and worse["documents"] == 8
    assert validate(Judge({(0, 1): 0.5, (1, 0): 0.4}), start, evolved, 2)["kept"] == "searched"
    assert validate(None, start, evolved, 0)["kept"] == "searched"
    assert validate(Judge({}), start, start, 2)["kept"] == "searched"


def test_levels_of_several_group_sizes_are_priced_by_their_scales_and_searched_under_a_byte_budget(tiny_factory, tmp_path):
    """``group_size: [16, 32]`` makes every (width, group size) a level, ordered by stored bits
    per weight; a byte budget prices the finer groups' scales (a code-bit budget, blind to them,
    is refused); the saved model and its recipe hold each layer's width *and* group size."""
    from slimformer.io.serialization import load_compressed
    from slimformer.recipe import Recipe
    from slimformer.search.database import database_key

    lv = QuantizationLevels(bits=(2, 3, 4), group_size=[16, 32])
    assert lv.group_sizes == (16, 32)
    names = [lv.level_name(c) for c in lv.level_codes]
    assert names == ["2-bit g32", "2-bit g16", "3-bit g32", "3-bit g16", "4-bit g32", "4-bit g16"]  # 2 + 24/32 < 2 + 24/16 < 3 + 24/32
    per_weight = [lv.stored_bits(8, 64, c) / (8 * 64) for c in lv.level_codes]
    assert per_weight == sorted(per_weight) and per_weight[:2] == [2.75, 3.5]
    assert QuantizationLevels(group_size=[32]).group_size == 32  # one size is the plain space
    for bad in ([], [0], [16, 32, 64, 128, 256]):
        with pytest.raises(ConfigError, match="group_size"):
            QuantizationLevels(group_size=bad)
    space = SearchSpace(lv, EvolutionSettings(generations=3, offspring=4, stages=((2, 1), (1, 2))), CAL)
    assert database_key("m", space) != database_key("m", dataclasses.replace(space, levels=QuantizationLevels(bits=(2, 3, 4), group_size=32)))
    loaded = tiny_factory("llama")
    with pytest.raises(ConfigError, match="bytes budget"):
        search(loaded, space, [Budget("bits", 3.0)], tmp_path / "refused", eval_texts=8, eval_max_length=48)
    db = build_database(loaded, space, tmp_path / "s" / "levels")
    assert db.level_bits == lv.level_codes
    for code in db.level_bits:
        m = db.module(db.units[0], code)
        assert (m.bits, m.group_size) == (lv.width(code), lv.group(code))
    uniform3 = sum(lv.stored_bits(*db.shapes[u], 3) for u in db.units) // 8  # 3-bit g16 is code 3
    search(loaded, space, [Budget("bytes", uniform3)], tmp_path / "s", eval_texts=8, eval_max_length=48)
    front = json.loads((tmp_path / "s" / "front.json").read_text())
    assert set(front["level_names"].values()) == set(names)
    label = f"bytes={uniform3:g}"
    entry = front["budgets"][label]
    assert entry["within_budget"] and entry["searched"]["stored_bytes"] <= uniform3
    model = load_compressed(tmp_path / "s" / label / "model")
    layout = {n: (m.bits, m.group_size) for n, m in model.model.named_modules() if n in entry["bits"]}
    assert layout == {n: (lv.width(c), lv.group(c)) for n, c in entry["bits"].items()}
    steps = Recipe.from_dict(model.manifest["recipe"]).steps
    assert {(s.bits, s.group_size) for s in steps} == set(layout.values())


def test_quantease_levels_lower_the_error_of_the_gptq_levels_they_start_from(tiny_factory, tmp_path):
    """``quantizer: quantease`` refines each GPTQ level by coordinate descent: at the same damping
    and clipping, every layer's Hessian-weighted output error at 2 and 3 bits is at most GPTQ's
    and the sum falls; the sweeps are part of the fingerprint (not a GPTQ space's), and the
    searched recipe carries the levels' settings."""
    from slimformer.recipe import Recipe
    from slimformer.search.database import database_key
    from slimformer.search.run import searched_recipe

    loaded = tiny_factory("llama")
    gptq = _space()
    gptq = dataclasses.replace(gptq, levels=dataclasses.replace(gptq.levels, clip_search=True))
    qe = dataclasses.replace(gptq, levels=dataclasses.replace(gptq.levels, quantizer="quantease", passes=3))
    assert "passes" not in gptq.to_dict()["space"] and qe.to_dict()["space"]["passes"] == 3
    assert database_key("m", gptq) != database_key("m", qe)
    assert database_key("m", qe) != database_key("m", dataclasses.replace(qe, levels=dataclasses.replace(qe.levels, passes=2)))
    a = build_database(loaded, gptq, tmp_path / "gptq")
    b = build_database(loaded, qe, tmp_path / "qe")
    for width in ("2", "3"):
        pairs = [(a.errors[u][width], b.errors[u][width]) for u in a.units]
        assert all(y <= x * (1 + 1e-4) for x, y in pairs)
        assert sum(y for _, y in pairs) < 0.97 * sum(x for x, _ in pairs)
    recipe = searched_recipe(qe, {b.units[0]: 2, b.units[1]: 3}, "bits=2.5")
    assert [(s["method"], s["passes"], s["damp"], s["clip_search"]) for s in recipe["steps"]] == [("quantease", 3, 0.01, True)] * 2
    steps = Recipe.from_dict(recipe).steps
    assert all(step.passes == 3 and step.damp == 0.01 for step in steps)
    with pytest.raises(ConfigError, match="passes"):
        QuantizationLevels(quantizer="quantease", passes=-1)
    with pytest.raises(ConfigError, match="quantease"):
        QuantizationLevels(quantizer="awq")


def test_log_kl_fitness_is_the_mean_log_of_each_documents_kl_and_its_dp_probes_stay_plain_kl(tiny_factory, tmp_path):
    """``fitness: log-kl``: a candidate scores the mean over calibration documents of the log of
    each document's KL per token, the same as each document scored alone, without padding; the
    DP's single-layer probes of a log-kl search are plain KL (they are added up), so its
    sensitivities, probe cache and DP start equal a kl search's."""
    import math

    import torch.nn.functional as F

    from slimformer.search.units import build_units

    loaded = tiny_factory("llama")
    space = _space(generations=0)
    texts = [t for b in _batches(loaded)[:2] for t in loaded.tokenizer.batch_decode(b["input_ids"], skip_special_tokens=True)]
    texts = [t[: 20 + 7 * i] for i, t in enumerate(texts)]  # documents of different lengths: padded batches
    batches = [dict(loaded.tokenizer(texts[i : i + 4], padding=True, return_tensors="pt")) for i in range(0, 8, 4)]
    for b in batches:
        b.pop("token_type_ids", None)
    assert all(bool((b["attention_mask"] == 0).any()) for b in batches)
    db = build_database(loaded, space, tmp_path / "s-log" / "levels")
    units = build_units(loaded, db, space.levels)
    reference = reference_outputs(loaded, batches)
    ev = Evaluator(loaded, db, batches, reference, units=units, fitness="log-kl")
    levels = [k % 3 for k in range(len(units))]
    ev.set_levels(levels)
    logs = []
    with torch.no_grad():
        for b in batches:
            for ids, mask in zip(b["input_ids"], b["attention_mask"]):
                one = ids[mask.bool()].unsqueeze(0)
                lo = F.log_softmax(loaded.model(input_ids=one).logits.float()[0], -1)
                lc = F.log_softmax(ev.loaded.model(input_ids=one).logits.float()[0], -1)
                logs.append(math.log(float((lo.exp() * (lo - lc)).sum(-1).mean())))
    assert ev.score(levels, 2) == pytest.approx(sum(logs) / len(logs), abs=2e-3)
    plain = Evaluator(loaded, db, batches, reference, units=units, fitness="kl")
    assert ev.score(levels, 2, fitness="kl") == plain.score(levels, 2)
    assert ev.score(levels, 2) != pytest.approx(math.log(plain.score(levels, 2)), abs=1e-3), "not the log of the token mean"

    log_space = dataclasses.replace(space, evolution=dataclasses.replace(space.evolution, fitness="log-kl"))
    a = search(loaded, log_space, [Budget("bits", 3.0)], tmp_path / "s-log", eval_texts=8, eval_max_length=48, save_models=False)
    (tmp_path / "s-kl").mkdir()
    (tmp_path / "s-kl" / "levels").symlink_to(tmp_path / "s-log" / "levels")
    probes = sorted(p.name for p in (tmp_path / "s-log" / "levels").glob("probes-*.json"))
    b = search(loaded, space, [Budget("bits", 3.0)], tmp_path / "s-kl", eval_texts=8, eval_max_length=48, save_models=False)
    assert sorted(p.name for p in (tmp_path / "s-log" / "levels").glob("probes-*.json")) == probes, "the kl search found the log-kl search's probes"
    sens = [json.loads((tmp_path / s / "sensitivity.json").read_text())["sensitivity"] for s in ("s-log", "s-kl")]
    assert sens[0] == sens[1] and min(v for row in sens[0] for v in row) > -1e-4, "plain KL (about 0 at 8 bits), not logs (< -1)"
    assert a.front["budgets"]["bits=3"]["bits"] == b.front["budgets"]["bits=3"]["bits"], "the same DP start (no generations)"
    assert a.front["space"]["search"]["fitness"] == "log-kl" and "fitness" not in b.front["space"]["search"]
    assert a.front["budgets"]["bits=3"]["searched_calibration_fitness"] < 0 < b.front["budgets"]["bits=3"]["searched_calibration_fitness"]


def test_search_scores_on_batches_in_the_calibrations_draw_order(tiny_factory, tmp_path):
    """Probes and the first selection stages score on a prefix of the calibration batches, so the
    search batches the documents in their (shuffled) draw order: the first batch holds the first
    drawn documents, not the longest ones; the length-sorted batches of compression are unchanged;
    a search folder of the length-sorted batching is not resumed as this one."""
    from slimformer.methods.calibration import CompressionContext
    from slimformer.search.run import BATCHING

    loaded = tiny_factory("llama")
    cal = CalibrationSettings(n_samples=16, max_length=256, batch_size=4)
    ctx = CompressionContext(cal)
    texts = ctx.texts()
    drawn = ctx.batches_in_draw_order(loaded.tokenizer)
    sorted_ = ctx.batches(loaded.tokenizer)
    ids = loaded.tokenizer(texts, truncation=True, max_length=256)["input_ids"]
    lengths = [len(x) for x in ids]
    for r in range(4):  # the first batch: the first 4 documents drawn, in that order
        assert drawn[0]["input_ids"][r][drawn[0]["attention_mask"][r].bool()].tolist() == ids[r]
    assert sorted(lengths[:4], reverse=True) != sorted(lengths, reverse=True)[:4], "(this draw's first documents are not its longest)"
    first = [int(m.sum()) for m in sorted_[0]["attention_mask"]]
    assert first == sorted(lengths, reverse=True)[:4], "compression's batches stay longest first"
    assert sum(int(b["attention_mask"].sum()) for b in drawn) == sum(lengths), "the same tokens, batched otherwise"

    space = _space(generations=0)
    search(loaded, space, [Budget("bits", 3.0)], tmp_path / "s", eval_texts=8, eval_max_length=48, save_models=False)
    state = json.loads((tmp_path / "s" / "search.json").read_text())
    assert state["batching"] == BATCHING == 2
    state.pop("batching")  # a folder written before the draw-order batching
    (tmp_path / "s" / "search.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="batched their calibration in draw order"):
        search(loaded, space, [Budget("bits", 3.0)], tmp_path / "s", eval_texts=8, eval_max_length=48, save_models=False)
