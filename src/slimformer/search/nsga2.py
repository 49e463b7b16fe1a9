"""Multi-objective search: the whole quality-against-cost front in one run (NSGA-II via Optuna).

Deb et al., 2002, "A fast and elitist multiobjective genetic algorithm: NSGA-II", through
Optuna's ``NSGAIISampler`` driven by ask/tell. A candidate gives every unit a level (a
categorical parameter per unit); its two objectives, both minimised, are the calibration
fitness (KL to the original, or 1 - cosine for encoders, as EvoPress's) and the cost (code bits
or stored bits of the searched layers). Where EvoPress answers "the best model under this
budget", this answers "the best model at every budget" at once.

Each generation's ``population`` candidates are asked together and scored as one batch by the
evaluator pool (in-process or Ray actors), so a generation parallelises across workers. The
first generation holds every uniform setting (all units at level k) plus random candidates.

Drop groups (the linears of one removable sub-layer, see :mod:`slimformer.search.units`): the
sampler draws every unit freely, so a candidate may put one member of a group at level 0
(removed) and the others at widths. It is repaired before it is scored or costed: the sub-layer
is removed, so every member goes to level 0 (its other linears cost nothing, as in the saved
model). The sampler keeps the drawn levels as the trial's genes; the score, the cost and the
front belong to the repaired candidate.

Reproducible and resumable: the sampler is re-seeded from ``(seed, generation)`` at the start of
every generation, and each finished generation is appended to a JSONL journal (levels, scores).
A resumed run rebuilds the study from the journal and continues at the next generation, ending
with the same front as an uninterrupted run; a generation cut by a kill is redone whole.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.search.journal import append_record as _append
from slimformer.search.journal import read_records as _read_journal

GENERATION_KEY = "NSGAIISampler:generation"


@dataclass
class ParetoSettings:
    """``population``: candidates per generation; ``generations``; ``batches``: calibration
    batches each candidate is scored on; ``points``: front members re-measured on held-out text
    (spread over the cost range) and saved; ``seed``."""

    population: int = 16
    generations: int = 20
    batches: int = 2
    points: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("population", 2), ("generations", 1), ("batches", 1), ("points", 1)):
            v = getattr(self, name)
            if not is_int_at_least(v, low):
                raise ConfigError(f"pareto: {name}={v!r} must be an integer >= {low}", f"write e.g. {name}: {max(low, 4)}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"pareto: seed={self.seed!r} must be an integer", "write e.g. seed: 0")


@dataclass
class ParetoResult:
    """``front``: the non-dominated candidates, by increasing cost, each
    ``{"levels", "fitness", "cost"}``; ``evaluated``: every distinct candidate scored."""

    front: list[dict]
    generations: int
    evaluated: int
    history: list[dict] = field(default_factory=list)  # per generation: front size, best fitness at lowest cost


def non_dominated(points: list[dict]) -> list[dict]:
    """The points no other point beats on both ``fitness`` and ``cost`` (ties kept once), by cost."""
    out: list[dict] = []
    for p in sorted(points, key=lambda p: (p["cost"], p["fitness"], p["levels"])):
        if out and p["fitness"] >= out[-1]["fitness"]:
            continue
        out.append(p)
    return out


def repaired(levels: list[int], groups: list[tuple[int, ...]] = ()) -> tuple[int, ...]:
    """``levels`` with every drop group that has a member at level 0 (removed) wholly at 0."""
    out = list(levels)
    for group in groups:
        if any(out[u] == 0 for u in group):
            for u in group:
                out[u] = 0
    return tuple(out)


def pareto_search(pool, costs: list[list[int]], settings: ParetoSettings, journal: str | os.PathLike | None = None,
                  progress: bool = False, groups: list[tuple[int, ...]] = ()) -> ParetoResult:
    """Run NSGA-II over per-unit levels; ``costs[u][k]``: the cost of unit ``u`` at level ``k``;
    ``pool.score(candidates, n_batches)`` returns their fitness; ``groups``: drop groups (unit
    indices whose level 0 removes one sub-layer together), candidates :func:`repaired` over them.
    Resumes from ``journal``."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n_units = len(costs)
    dists = {f"u{u:04d}": CategoricalDistribution(list(range(len(costs[u])))) for u in range(n_units)}
    jpath = Path(journal) if journal is not None else None
    records = _read_journal(jpath) if jpath is not None else []
    if records and records[0].get("units") != [len(c) for c in costs]:
        raise ValueError("the journal belongs to a search over other units")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-feature notices
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=_sampler(settings, 0))
    seen: dict[tuple[int, ...], float] = {}
    history: list[dict] = []
    for rec in records:  # rebuild the study exactly as the finished generations left it
        for levels, fit in zip(rec["levels"], rec["fitness"]):
            _add(study, levels, fit, rec["generation"], dists, costs, groups)
            seen[repaired(levels, groups)] = fit
        history.append(rec["summary"])
    first = records[-1]["generation"] + 1 if records else 0
    for g in range(1, first):  # the parent populations, cached in order as the live run cached them
        study.sampler.get_parent_population(study, g)
    bar = tqdm(total=settings.generations, initial=min(first, settings.generations), desc="nsga-ii", disable=not progress, unit="gen")
    try:
        for gen in range(first, settings.generations):
            study.sampler = _sampler(settings, gen)
            fixed: list[list[int]] = []
            if gen == 0:  # every uniform setting (all units at level k) starts in the population
                n_levels = max(len(c) for c in costs)
                fixed = [[min(k, len(costs[u]) - 1) for u in range(n_units)] for k in range(n_levels)][: settings.population]
            trials = [study.ask(dists) for _ in range(settings.population - len(fixed))]
            # Recorded in trial-number order (asked trials exist first, the fixed ones are added after
            # scoring), so a resumed study numbers its trials exactly as the uninterrupted one did.
            asked = [[t.params[f"u{u:04d}"] for u in range(n_units)] for t in trials]
            cands = asked + fixed
            phenotypes = [repaired(c, groups) for c in cands]  # what is scored and costed
            todo = [c for c in dict.fromkeys(phenotypes) if c not in seen]
            for c, s in zip(todo, pool.score([list(c) for c in todo], settings.batches)):
                seen[c] = float(s)
            fits = [seen[c] for c in phenotypes]
            for t, c, f in zip(trials, phenotypes, fits):
                study.tell(t, [f, _cost(list(c), costs)])
            for c, f in zip(fixed, fits[len(asked):]):
                _add(study, c, f, gen, dists, costs, groups)
            front = non_dominated([{"levels": list(k), "fitness": v, "cost": _cost(list(k), costs)} for k, v in seen.items()])
            summary = {"generation": gen, "front_size": len(front), "evaluated": len(seen), "best_fitness": front[-1]["fitness"] if front else None}
            history.append(summary)
            if jpath is not None:
                record = {"generation": gen, "levels": cands, "fitness": fits, "summary": summary}
                if gen == 0:
                    record["units"] = [len(c) for c in costs]
                _append(jpath, record)
            bar.update(1)
            bar.set_postfix(front=len(front), evaluated=len(seen))
    finally:
        bar.close()
    front = non_dominated([{"levels": list(k), "fitness": v, "cost": _cost(list(k), costs)} for k, v in seen.items()])
    return ParetoResult(front, settings.generations, len(seen), history)


def spread(front: list[dict], n: int) -> list[dict]:
    """Up to ``n`` members of ``front`` spread evenly over its cost range (ends included)."""
    if len(front) <= n:
        return list(front)
    lo, hi = front[0]["cost"], front[-1]["cost"]
    picked: list[dict] = []
    for i in range(n):
        target = lo + (hi - lo) * i / (n - 1)
        best = min((p for p in front if p not in picked), key=lambda p: abs(p["cost"] - target))
        picked.append(best)
    return sorted(picked, key=lambda p: p["cost"])


def _add(study, levels: list[int], fitness: float, generation: int, dists: dict, costs: list[list[int]],
         groups: list[tuple[int, ...]] = ()) -> None:
    """Add a scored candidate to ``study`` as a finished trial of ``generation`` (its genes
    ``levels``, its cost that of the repaired candidate)."""
    import optuna

    study.add_trial(optuna.trial.create_trial(
        params={f"u{u:04d}": k for u, k in enumerate(levels)}, distributions=dists, values=[fitness, _cost(list(repaired(levels, groups)), costs)],
        system_attrs={GENERATION_KEY: generation},
    ))


def _cost(levels: list[int], costs: list[list[int]]) -> int:
    return sum(costs[u][k] for u, k in enumerate(levels))


def _sampler(settings: ParetoSettings, generation: int):
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.samplers.NSGAIISampler(population_size=settings.population, seed=settings.seed * 1_000_003 + generation)
