"""EvoPress: (1 + lambda) evolutionary search of per-layer levels under a budget, and the DP baseline.

Sieberling et al., 2024, "EvoPress: Towards Optimal Dynamic Model Compression via Evolutionary
Search". A candidate gives every unit a level. Each generation, ``offspring`` children of the
parent are made by *level-switch mutation* (one unit goes a level down, another a level up;
1..``max_switches`` switches; a switch is kept only if the total cost stays within the budget,
so no candidate ever exceeds it), then selected in stages: all children are scored on a few
calibration batches, the best go on to more batches, and so on; the parent is scored on the
same batches, and the best child replaces it only if it scores lower on the last stage.

Every generation is appended to a journal (the parent, its fitness and the random generator's
state), so a killed search resumes from its last finished generation and ends exactly where an
uninterrupted one would.

The starting parent is the DP allocation (:func:`dp_allocation`): per-unit sensitivities measured
one unit at a time (every other unit keeps its original weight), combined by the exact
multiple-choice knapsack of :func:`slimformer.methods.quantization.mixed_precision.allocate_bits`.
With ``generations: 0`` the search returns that allocation.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from slimformer.methods.quantization.mixed_precision import allocate_bits
from slimformer.search.fitness import ORIGINAL
from slimformer.search.journal import append_record as _append
from slimformer.search.journal import read_records as _read_journal
from slimformer.search.space import EvolutionSettings


def total_cost(levels: list[int], costs: list[list[int]]) -> int:
    return sum(costs[u][k] for u, k in enumerate(levels))


def _move(levels: list[int], unit: int, up: bool, costs: list[list[int]], group_of: dict[int, tuple[int, ...]]) -> int:
    """Move ``unit`` one level up or down in place and return the change in cost. A unit of a
    drop group (level 0 = the sub-layer removed) leaves or enters level 0 with its whole group."""
    group = group_of.get(unit)
    if group is not None and (levels[unit] == 0 if up else levels[unit] == 1):
        target = 1 if up else 0
        delta = sum(costs[m][target] - costs[m][levels[m]] for m in group)
        for m in group:
            levels[m] = target
        return delta
    new = levels[unit] + (1 if up else -1)
    delta = costs[unit][new] - costs[unit][levels[unit]]
    levels[unit] = new
    return delta


def mutate(parent: list[int], costs: list[list[int]], budget: int, rng: random.Random, max_switches: int, tries: int = 64,
           groups: list[tuple[int, ...]] = ()) -> list[int]:
    """A child of ``parent`` by budget-preserving level switches: each switch raises one unit by
    one level and lowers other units, chosen at random, one level each until the cost is back
    within ``budget`` (one of them when units are of equal size, as in EvoPress).

    Units differ in size (an MLP sub-layer holds three times an attention one's weights), so a
    switch may need several lowered units to pay for one raised, and may leave part of the
    budget unused; the child then spends it by raising random units one level while they fit.
    Trading one unit for one could never change how many units are dropped, and so never reach
    e.g. "one MLP kept, three attention sub-layers dropped instead".

    ``groups``: drop groups (:func:`~slimformer.search.units.drop_groups`), units whose level 0
    removes one sub-layer together: lowering one of them from its lowest width removes the
    sub-layer (every member goes to 0 and frees its cost) and raising one from 0 restores it
    (every member at its lowest width), so a child is consistent when its parent is. Without
    groups the random draws are those of the plain mutation."""
    group_of = {u: g for g in groups for u in g}
    child = list(parent)
    cost = total_cost(child, costs)
    n_units = len(child)
    if n_units < 2:
        return child
    for _ in range(rng.randint(1, max_switches)):
        for _ in range(tries):
            up = rng.randrange(n_units)
            if child[up] == len(costs[up]) - 1:
                continue
            trial = list(child)
            new_cost = cost + _move(trial, up, True, costs, group_of)
            tied = group_of.get(up, (up,))
            for down in rng.sample(range(n_units), n_units):
                if new_cost <= budget:
                    break
                if down != up and down not in tied and trial[down] > 0:
                    new_cost += _move(trial, down, False, costs, group_of)
            if new_cost <= budget:
                child, cost = trial, new_cost
                break
    for u in rng.sample(range(n_units), n_units):
        if child[u] < len(costs[u]) - 1:
            trial = list(child)
            step = _move(trial, u, True, costs, group_of)
            if cost + step <= budget:
                child = trial
                cost += step
    return child


def uniform_levels(n_units: int, level: int) -> list[int]:
    return [level] * n_units


def sensitivities(pool, level_counts: list[int] | int, n_levels: int | None = None, n_batches: int = 1, progress: bool = False,
                  original: list[set[int]] | None = None, groups: list[tuple[int, ...]] = (),
                  cache: dict[str, float] | None = None, key_of: Callable[[tuple[int, ...]], str] | None = None,
                  fitness: str | None = None) -> list[list[float]]:
    """Per unit and level: the distortion when only that unit is at that level (others original).

    ``level_counts``: the number of levels of each unit (or a unit count, with ``n_levels`` each).
    ``original``: per unit, the levels that leave it as in the original (e.g. ``KEEP``): those
    candidates all equal the original model, which is scored once for them. ``groups``: drop
    groups; level 0 of a member is probed with its whole group at 0 (the sub-layer removed),
    one probe per group. ``cache`` with ``key_of``: scores of probes from earlier searches by
    what a probe changes (``key_of(candidate)``, e.g. "this linear at 3 bits"), reused instead of
    scored; the new probes' scores are added to it. ``fitness``: what the pool scores the probes
    by when not its own (the DP adds the probes' scores, so they must be additive: ``kl``)."""
    if isinstance(level_counts, int):
        level_counts = [n_levels] * level_counts
    original = original or [set() for _ in level_counts]
    group_of = {u: g for g in groups for u in g}

    def probe(u: int, k: int) -> tuple[int, ...]:
        c = [ORIGINAL] * len(level_counts)
        if k not in original[u]:
            for m in (group_of.get(u, (u,)) if k == 0 else (u,)):
                c[m] = k
        return tuple(c)

    distinct = list(dict.fromkeys(probe(u, k) for u, n in enumerate(level_counts) for k in range(n)))
    caching = cache is not None and key_of is not None
    score_of = {c: cache[key_of(c)] for c in distinct if key_of(c) in cache} if caching else {}
    todo = [c for c in distinct if c not in score_of]
    chunk = max(1, 4 * getattr(pool, "workers", 1))
    for i in tqdm(range(0, len(todo), chunk), desc="sensitivity probes", disable=not progress, unit="chunk"):
        part = todo[i : i + chunk]
        scores = pool.score([list(c) for c in part], n_batches) if fitness is None else pool.score([list(c) for c in part], n_batches, fitness)
        for c, s in zip(part, scores):
            score_of[c] = s
            if caching:
                cache[key_of(c)] = s
    return [[score_of[probe(u, k)] for k in range(n)] for u, n in enumerate(level_counts)]


def dp_allocation(sens: list[list[float]], costs: list[list[int]], budget: int, groups: list[tuple[int, ...]] = ()) -> list[int]:
    """The exact minimum of summed single-unit sensitivities under the budget (multiple-choice knapsack).

    A drop group (``groups``) is one item of the knapsack: its options are the group removed
    (level 0 for every member: no cost, the sensitivity of the removal, which every member's
    level 0 holds) and every combination of its members' other levels that no other combination
    beats in both cost and summed sensitivity; so the additive optimum decides at once which
    sub-layers to remove and what widths the freed bytes buy elsewhere."""
    if not groups:
        return allocate_bits(costs, sens, budget)
    grouped = {u for g in groups for u in g}
    items: list[tuple[tuple[int, ...], list[tuple[int, ...]]]] = []  # (units, options as level tuples)
    for g in groups:
        # the group's non-dominated width combinations, one member at a time (exact: a
        # dominated partial combination stays dominated whatever the later members add), so a
        # large group (many experts' linears in one MLP) never enumerates the whole product
        front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
        for m in g:
            merged = sorted(((c + costs[m][k], s + sens[m][k], levels + (k,)) for c, s, levels in front for k in range(1, len(costs[m]))),
                            key=lambda x: (x[0], x[1]))
            front, best = [], math.inf
            for c, s, levels in merged:  # keep what no cheaper combination beats
                if s < best:
                    front.append((c, s, levels))
                    best = s
        items.append((g, [(0,) * len(g)] + [levels for _, _, levels in front]))
    items += [((u,), [(k,) for k in range(len(costs[u]))]) for u in range(len(costs)) if u not in grouped]
    item_costs = [[sum(costs[m][k] for m, k in zip(units, option)) for option in options] for units, options in items]
    item_sens = [[sens[units[0]][0] if not any(option) else sum(sens[m][k] for m, k in zip(units, option)) for option in options] for units, options in items]
    chosen = allocate_bits(item_costs, item_sens, budget)
    out = [0] * len(costs)
    for (units, options), pick in zip(items, chosen):
        for m, k in zip(units, options[pick]):
            out[m] = k
    return out


@dataclass
class EvolutionResult:
    levels: list[int]
    fitness: float
    generations: int
    history: list[dict] = field(default_factory=list)  # per generation: best fitness so far, evaluations


def evolve(pool, costs: list[list[int]], budget: int, start: list[int], settings: EvolutionSettings,
           journal: str | os.PathLike | None = None, progress: bool = False,
           on_generation: Callable[[int, EvolutionResult], None] | None = None, groups: list[tuple[int, ...]] = ()) -> EvolutionResult:
    """Run EvoPress from ``start`` (which must fit ``budget``); resume from ``journal`` if it has
    records. ``groups``: drop groups, moved together by :func:`mutate`."""
    if total_cost(start, costs) > budget:
        raise ValueError("the starting candidate exceeds the budget")
    rng = random.Random(settings.seed)
    stages = settings.stages
    final_batches = stages[-1][1]
    parent = list(start)
    history: list[dict] = []
    first = 0
    cache: dict[tuple[tuple[int, ...], int], float] = {}
    jpath = Path(journal) if journal is not None else None
    records = _read_journal(jpath) if jpath else []
    if records and records[0].get("start") != list(start):
        raise ValueError("the journal belongs to a search with another starting point")
    if records:
        last = records[-1]
        parent = list(last["parent"])
        state = last["rng"]
        rng.setstate((state[0], tuple(state[1]), state[2]))
        history = [{"generation": r["generation"], "fitness": r["fitness"], "evaluations": r["evaluations"]} for r in records]
        first = last["generation"] + 1
    fitness = records[-1]["fitness"] if records else _score_cached(pool, cache, [parent], final_batches)[0]
    evaluations = records[-1]["evaluations"] if records else 1
    bar = tqdm(total=settings.generations, initial=min(first, settings.generations), desc="evopress", disable=not progress, unit="gen")
    try:
        for gen in range(first, settings.generations):
            seen = {tuple(parent)}
            children: list[list[int]] = []
            for _ in range(settings.offspring * 4):
                if len(children) == settings.offspring:
                    break
                child = mutate(parent, costs, budget, rng, settings.max_switches, groups=groups)
                if tuple(child) not in seen:
                    seen.add(tuple(child))
                    children.append(child)
            parent_score = fitness
            for keep, n_batches in stages:
                if not children:
                    break
                scores = _score_cached(pool, cache, children + [parent], n_batches)
                evaluations += len(children)
                parent_score = scores[-1]
                order = sorted(range(len(children)), key=lambda i: (scores[i], i))[:keep]
                children = [children[i] for i in order]
                child_scores = [scores[i] for i in order]
            if children and child_scores[0] < parent_score:
                parent, fitness = children[0], child_scores[0]
            else:
                fitness = parent_score
            history.append({"generation": gen, "fitness": fitness, "evaluations": evaluations})
            if jpath is not None:
                state = rng.getstate()
                _append(jpath, {"generation": gen, "parent": parent, "fitness": fitness, "evaluations": evaluations,
                                "start": list(start) if gen == 0 else None, "rng": [state[0], list(state[1]), state[2]]})
            bar.update(1)
            bar.set_postfix(best=f"{fitness:.5f}")
            if on_generation is not None:
                on_generation(gen, EvolutionResult(parent, fitness, gen + 1, history))
    finally:
        bar.close()
    return EvolutionResult(parent, fitness, max(settings.generations, first), history)  # a longer journal: its generations


def _score_cached(pool, cache: dict, candidates: list[list[int]], n_batches: int) -> list[float]:
    """Scores are a pure function of (levels, batches): never score the same candidate twice."""
    keys = [(tuple(c), n_batches) for c in candidates]
    missing = [i for i, k in enumerate(keys) if k not in cache]
    todo: list[int] = []
    for i in missing:  # candidates repeated inside one call are scored once
        if keys[i] not in (keys[j] for j in todo):
            todo.append(i)
    if todo:
        for i, s in zip(todo, pool.score([candidates[i] for i in todo], n_batches)):
            cache[keys[i]] = s
    return [cache[k] for k in keys]
