"""The search entry point: level database -> DP start -> EvoPress per budget -> models, front, plot.

    result = search(loaded, SearchSpace.from_file("recipes/search/bits.yaml"),
                    [Budget("bits", 3.0), Budget("bits", 2.5)], "runs/search")

The output folder is the search's working folder and its result:

- ``levels/``: the level database (reused by later searches with the same model, space and
  calibration);
- ``sensitivity.json``: single-unit sensitivities (the DP's input);
- ``<budget>/journal.jsonl``: one line per generation (resume after a kill);
- ``<budget>/model/``: the best model, saved like any compressed model; its recipe lists the
  per-layer choices as one step per bit width (re-appliable with ``slimformer compress``);
- ``pareto/journal.jsonl`` and ``pareto/<i>-bits=<b>/model/`` (with ``pareto=True``): the NSGA-II
  front over all costs (:mod:`slimformer.search.nsga2`), a few of its members re-measured on
  held-out text and saved;
- ``front.json`` and ``front.png``: held-out quality against cost for every uniform level, the DP
  allocation and the searched model at each budget (and the NSGA-II front).

A search interrupted at any point resumes from what its folder holds when run again with the
same arguments, and ends with the same result.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from slimformer.data import TextSpec, load_texts
from slimformer.errors import ConfigError
from slimformer.jsonfile import write_json
from slimformer.methods.calibration import CompressionContext
from slimformer.methods.preflight import check_fits, estimate_steps_peak
from slimformer.models.adapters import set_submodule
from slimformer.models.loading import max_positions
from slimformer.search.database import LevelDatabase, build_database, database_key
from slimformer.search.evolution import dp_allocation, evolve, sensitivities, total_cost
from slimformer.search.fitness import Evaluator, reference_outputs
from slimformer.search.nsga2 import pareto_search, spread
from slimformer.search.pool import LocalPool, RayPool
from slimformer.search.space import Budget, SearchSpace, tuning_step
from slimformer.search.units import DROP, KEEP, Unit, build_units, costs_of, drop_groups, removed_sublayers

STATE_NAME = "search.json"


@dataclass
class SearchOutcome:
    folder: Path
    front: dict
    seconds: float


BATCHING = 2  # 1: length-sorted scoring batches; 2: in the calibration's draw order (probes and journals of 1 are not reused)


def _search_identity(space: dict | None, source: str | None, batching: int | None = 1) -> tuple:
    """What makes two searches the same one: the model, the space except the number of
    generations (more of them continue the journal; fewer end at its last parent), and how the
    calibration documents are batched for scoring (a state file without it: length-sorted)."""
    if not space:
        return (None, source, batching)
    search = {k: v for k, v in (space.get("search") or {}).items() if k != "generations"}
    # the tuning after the search changes no candidate: a rerun with other tuning settings
    # continues the same search
    return ({**{k: v for k, v in space.items() if k != "tune"}, "search": search}, source, batching)


def _check_folder(out: Path, space: SearchSpace, source: str, force: bool) -> None:
    state = out / STATE_NAME
    if state.is_file():
        saved = json.loads(state.read_text())
        same = (_search_identity(saved.get("space"), saved.get("source"), saved.get("batching", 1))
                == _search_identity(space.to_dict(), source, BATCHING))
        if not same and not force:
            raise ConfigError(f"{out} holds a search with another model or space, or one written before searches batched their calibration in draw order",
                              "choose another --out, or pass --force to start over there")
        if not same:
            import shutil

            shutil.rmtree(out)
    elif out.exists() and any(p.name != "levels" for p in out.iterdir()) and not force:
        # a folder holding only ``levels`` (another search's level database, copied or linked) is a new search
        raise ConfigError(f"output folder {out} exists and is not a search folder", "choose another --out or pass --force")


def _held_out_quality(original, evaluator: Evaluator, levels: list[int], texts: list[str], max_length: int, n_queries: int) -> dict:
    evaluator.set_levels(levels)
    return _quality(original, evaluator.loaded, texts, max_length, n_queries)


def _quality(original, model, texts: list[str], max_length: int, n_queries: int) -> dict:
    from slimformer.evaluate.quality import causal_quality, encoder_quality

    if original.kind == "causal-lm":
        return causal_quality(original, model, texts, max_length, 8)
    return encoder_quality(original, model, texts, n_queries, max_length, 32)


def _distortion_of(q: dict) -> float:
    return q["kl_divergence"] if "kl_divergence" in q else 1.0 - q["embedding_cosine_mean"]


def searched_recipe(space: SearchSpace, bits_of: dict[str, int], label: str, removed: list[tuple[int, str]] = ()) -> dict:
    """A recipe that re-creates the searched choice: one quantizer step per bit width, listing its
    layers (and the removed sub-layers, noted in the description)."""
    lv = space.levels
    steps = []
    for bits in sorted(set(bits_of.values()) - {KEEP}):  # one step per level (width, group size)
        names = sorted(n for n, b in bits_of.items() if b == bits)
        step = {"method": lv.quantizer, "version": 1, "bits": lv.width(bits), "group_size": lv.group(bits), "symmetric": lv.symmetric,
                "targets": list(lv.targets), "include": names, "exclude": []}
        if lv.quantizer == "gptq" and lv.clip_search:
            step["clip_search"] = True  # the levels were built with it
        if lv.quantizer == "quantease":  # its levels' settings, whatever the method's defaults
            step.update({"passes": lv.passes, "damp": lv.damp, "clip_search": lv.clip_search})
        steps.append(step)
    gone = ", ".join(f"block {b} {k}" for b, k in sorted(removed))
    return {"slimformer_recipe": 1, "name": f"{space.name}-{label}", "description": f"EvoPress search under {label}" + (f"; removed: {gone}" if gone else ""),
            "calibration": space.to_dict()["calibration"], "steps": steps}


def assemble(loaded, db: LevelDatabase, bits_of: dict[str, int], removed: list[tuple[int, str]] = ()):
    """A copy of ``loaded`` whose searched layers are the database's packed layers at ``bits_of``
    and whose ``removed`` (block, "attention" | "mlp") sub-layers are physically removed."""
    model = copy.copy(loaded)
    model.model = copy.deepcopy(loaded.model)
    model.applied = list(loaded.applied)
    for unit, bits in bits_of.items():
        if bits != KEEP:  # a kept layer stays the original's
            set_submodule(model.model, unit, db.module(unit, bits))
    adapter = model.adapter
    for block, kind in sorted(removed, reverse=True):  # from the last block: indices stay valid when a block goes
        adapter.remove_sublayer(block, kind)
    return model


def choice(units: list[Unit], levels: list[int]) -> tuple[dict[str, int], list[tuple[int, str]]]:
    """Per searched linear its width (``KEEP``: its original weights), and the removed (block,
    kind) sub-layers, of a candidate."""
    gone = removed_sublayers(units, levels)
    bits_of: dict[str, int] = {}
    removed: list[tuple[int, str]] = []
    for unit, level in zip(units, levels):
        if unit.sublayer is not None and unit.sublayer in gone:  # the whole drop group goes
            if (unit.block, unit.kind) not in removed:
                removed.append((unit.block, unit.kind))
        else:
            bits_of.update({name: unit.levels[level] for name in unit.linears})
    return bits_of, removed


def search(loaded, space: SearchSpace, budgets: list[Budget], out_dir: str | os.PathLike, ray: str | None = None,
           workers: int = 2, eval_source: str = "stdlib-docs", eval_texts: int = 64, eval_max_length: int = 256,
           force: bool = False, progress: bool = False, save_models: bool = True, pareto: bool = False,
           seeds: dict[str, list[int] | Callable[[list[Unit]], list[int]]] | None = None) -> SearchOutcome:
    """Search each budget's best per-layer levels (and with ``pareto`` the NSGA-II front over all
    costs); write models, ``front.json`` and ``front.png``.

    ``seeds``: other starting candidates by name: level indices per unit, or a function of the
    search's units that returns them (e.g. ``lambda units: levels_for(units, removed)`` with
    another method's removal set, see :func:`~slimformer.search.units.levels_for`); per budget,
    those within it are scored with the DP allocation on the last stage's batches and the best
    of them starts the evolution (EvoPress can only improve on its start)."""
    if not budgets and not pareto:
        raise ConfigError("no budget given", "pass at least one --budget, e.g. --budget bits=3.0, or --pareto for the whole front")
    t0 = time.perf_counter()
    if space.evolution.fitness == "nll" and loaded.kind != "causal-lm":
        raise ConfigError(f"search: fitness nll is for causal language models, not a {loaded.kind}", "use fitness: kl (1 - cosine for encoders)")
    out = Path(out_dir)
    source = str(loaded.source)
    _check_folder(out, space, source, force)
    if space.tune:
        _check_tuning_fits(loaded, space)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / STATE_NAME, {"space": space.to_dict(), "source": source, "batching": BATCHING, "complete": False})
    ctx = CompressionContext(space.calibration, progress=progress)
    ctx.max_positions = max_positions(loaded)
    db = build_database(loaded, space, out / "levels", ctx, progress)
    batches = ctx.batches_in_draw_order(loaded.tokenizer)  # any prefix a random sample: probes and first stages score on one
    needed = max(space.evolution.stages[-1][1], space.pareto.batches if pareto else 1)
    if len(batches) < needed:
        raise ConfigError(
            f"the calibration text gives {len(batches)} batches but the last search stage scores on {needed}",
            f"raise calibration.n_samples to at least {needed * space.calibration.batch_size} or lower the stages' batch counts",
        )
    batches = batches[:needed]
    fitness = space.evolution.fitness
    reference = reference_outputs(loaded, batches) if fitness in ("kl", "log-kl") else []
    threads = torch.get_num_threads() if ray is None else 1
    units = build_units(loaded, db, space.levels)
    dtype = space.evolution.dtype
    pool = (LocalPool(loaded, db, batches, reference, threads=threads, units=units, dtype=dtype, fitness=fitness) if ray is None
            else RayPool(loaded, db, batches, reference, workers, ray, threads=threads, units=units, dtype=dtype, fitness=fitness))
    shapes = {u: db.shapes[u] for u in db.units}
    groups = drop_groups(units)
    try:
        sens_path = out / "sensitivity.json"
        if sens_path.is_file():
            sens = json.loads(sens_path.read_text())["sensitivity"]
        else:
            keep = [{k for k, w in enumerate(u.levels) if w == KEEP} for u in units]
            n_probe = space.evolution.stages[0][1]
            probes_path = db.folder / f"probes-{_probes_key(source, space, n_probe)}.json"
            cache = json.loads(probes_path.read_text()) if probes_path.is_file() else {}
            sens = sensitivities(pool, [len(u.levels) for u in units], n_batches=n_probe, progress=progress, original=keep, groups=groups,
                                 cache=cache, key_of=lambda c: probe_key(units, c),
                                 fitness=None if probe_fitness(fitness) == fitness else probe_fitness(fitness))
            write_json(probes_path, cache, sort_keys=True)
            _write_json(sens_path, {"units": [u.name for u in units], "levels": [list(u.levels) for u in units], "sensitivity": sens})
        seeds = {n: s(units) if callable(s) else list(s) for n, s in (seeds or {}).items()}
        results = {}
        for budget in budgets:
            costs, limit = costs_of(units, db, space.levels, budget)
            dp = dp_allocation(sens, costs, limit, groups)
            folder = out / budget.label
            folder.mkdir(exist_ok=True)
            start, starts = _best_start(pool, dp, seeds, costs, limit, space.evolution.stages[-1][1])
            evo = evolve(pool, costs, limit, start, space.evolution, journal=folder / "journal.jsonl", progress=progress, groups=groups)
            results[budget.label] = {"budget": budget, "costs": costs, "limit": limit, "dp": dp, "evo": evo, "starts": starts, "start": start}
        if pareto:
            (out / "pareto").mkdir(exist_ok=True)
            # stored bits when levels differ in group size (code bits would not see their scales)
            bit_costs, _ = costs_of(units, db, space.levels, Budget("bytes" if space.levels.mixed_group_sizes else "bits", 1.0))
            pareto_result = pareto_search(pool, bit_costs, space.pareto, journal=out / "pareto" / "journal.jsonl", progress=progress,
                                          groups=groups)
    finally:
        pool.close()
    # one float32 evaluator (the pool's own when it is one) for the validation and the held-out check,
    # whatever the candidates were scored in: no further copy of the model
    checker = pool.evaluator if isinstance(pool, LocalPool) and dtype == "float32" else Evaluator(loaded, db, batches, reference, units=units)
    if results:
        validation = validation_batches(loaded, ctx)
        if validation:
            checker.use_batches(validation, reference_outputs(loaded, validation) if fitness in ("kl", "log-kl") else [], fitness)
        for r in results.values():
            r["validation"] = validate(checker if validation else None, r["start"], r["evo"].levels, len(validation))

    texts = load_texts(TextSpec(source=eval_source, split="evaluation", n=eval_texts))
    n_queries = max(1, min(16, len(texts) // 4))
    n_weights = sum(r * c for r, c in shapes.values())
    keep_bits = {n: u.keep_bits for u in units for n in u.linears}

    def point(levels: list[int]) -> dict:
        q = _held_out_quality(loaded, checker, levels, texts, eval_max_length, n_queries)
        bits_of, removed = choice(units, levels)
        width = {n: keep_bits[n] if b == KEEP else space.levels.width(b) for n, b in bits_of.items()}
        code_bits = sum(shapes[n][0] * shapes[n][1] * b for n, b in width.items()) / n_weights
        stored = sum(shapes[n][0] * shapes[n][1] * keep_bits[n] if b == KEEP else space.levels.stored_bits(*shapes[n], b) for n, b in bits_of.items())
        return {"code_bits_per_weight": code_bits, "stored_bits_per_weight": stored / n_weights, "stored_bytes": stored // 8,
                "params_kept": sum(shapes[n][0] * shapes[n][1] for n in bits_of) / n_weights,
                "removed_sublayers": [f"{b}.{k}" for b, k in removed], "distortion": _distortion_of(q), "quality": q}

    front: dict = {"model": source, "kind": loaded.kind, "space": space.to_dict(), "held_out": {"source": eval_source, "texts": len(texts), "max_length": eval_max_length},
                   "database_bytes": db.nbytes(), "uniform": {}, "budgets": {}}
    for bits in db.level_bits:
        front["uniform"][str(bits)] = point([u.levels.index(bits) for u in units])
    if space.levels.mixed_group_sizes:  # level codes, by name
        front["level_names"] = {str(b): space.levels.level_name(b) for b in db.level_bits}
    for label, r in results.items():
        evo = r["evo"]
        start_kept = r["validation"]["kept"] == "start"
        kept = r["start"] if start_kept else evo.levels
        bits_of, removed = choice(units, kept)
        entry = {
            "budget": label, "dp": point(r["dp"]), "searched": point(kept),
            "dp_calibration_fitness": None,
            "searched_calibration_fitness": (evo.history[0]["fitness"] if evo.history else None) if start_kept else evo.fitness,
            "validation": r["validation"], "evolved": {**point(evo.levels), "calibration_fitness": evo.fitness} if start_kept else None,
            "within_budget": total_cost(kept, r["costs"]) <= r["limit"] and total_cost(r["dp"], r["costs"]) <= r["limit"],
            "generations": evo.generations, "history": evo.history, "bits": bits_of, "removed_sublayers": [f"{b}.{k}" for b, k in removed],
            "starts": r["starts"], "dp_bits": choice(units, r["dp"])[0],
        }
        front["budgets"][label] = entry
        tuned = None  # the searched model, scale-tuned
        if space.tune is not None:
            # both the DP allocation and the searched model, with the same settings: the comparison stays like with like
            def tuned_entry(levels: list[int]):
                model = assemble(loaded, db, *choice(units, levels))
                record = tune_scales(loaded, model, space, progress)
                q = _quality(loaded, model, texts, eval_max_length, n_queries)
                return model, {"distortion": _distortion_of(q), "quality": q, "tuning": record}

            tuned, entry["dp_tuned"] = tuned_entry(r["dp"])
            if kept == r["dp"]:  # the validation kept the start: the same model, tuned once
                entry["searched_tuned"] = entry["dp_tuned"]
            else:
                tuned = None  # the DP's tuned copy is not kept
                tuned, entry["searched_tuned"] = tuned_entry(kept)
        if save_models:
            _save_searched(loaded, db, space, units, kept, label, entry["searched_tuned" if tuned is not None else "searched"], out / label / "model", tuned)
    if pareto:
        members = []
        for i, member in enumerate(spread(pareto_result.front, space.pareto.points)):
            p = point(member["levels"])
            label = f"{i}-bits={p['code_bits_per_weight']:.3f}"
            members.append({**p, "label": label, "levels": member["levels"], "calibration_fitness": member["fitness"]})
            if save_models:
                _save_searched(loaded, db, space, units, member["levels"], label, p, out / "pareto" / label / "model")
        front["pareto"] = {"settings": space.pareto.__dict__, "front_size": len(pareto_result.front), "evaluated": pareto_result.evaluated,
                           "history": pareto_result.history, "calibration_front": [{"code_bits_per_weight": m["cost"] / n_weights, "fitness": m["fitness"]} for m in pareto_result.front],
                           "members": members}
    front["seconds"] = time.perf_counter() - t0
    _write_json(out / "front.json", front)
    plot_front(front, out / "front.png")
    _write_json(out / STATE_NAME, {"space": space.to_dict(), "source": source, "batching": BATCHING, "complete": True})
    return SearchOutcome(out, front, front["seconds"])


def validation_batches(loaded, ctx: CompressionContext) -> list[dict]:
    """Batches of calibration-split documents the search never scored: the draw of twice the
    calibration's documents (same source and seed) less the calibration's own, at most as many
    as those (a text file of the user's with too few documents is topped up from the built-in mix,
    as calibration is). Empty when fewer than one batch of documents is left."""
    s = ctx.calibration
    used = set(ctx.texts())
    more = load_texts(TextSpec(source=s.source, split="calibration", n=2 * s.n_samples, seed=s.seed))
    fresh = list(dict.fromkeys(t for t in more if t not in used))[: s.n_samples]
    return ctx.tokenize(loaded.tokenizer, fresh) if len(fresh) >= s.batch_size else []


def validate(judge: Evaluator | None, start: list[int], searched: list[int], n_batches: int) -> dict:
    """Which of the evolution's start and its result is kept: the result unless it scores worse
    than its start on ``judge``'s validation batches (text the search never saw; the evolution
    only ever compares candidates on its calibration batches, which it can overfit)."""
    if judge is None or not n_batches:
        return {"kept": "searched", "reason": "no validation text left beside the calibration text"}
    if searched == start:
        return {"kept": "searched", "reason": "the evolution kept its start"}
    scores = {"start": judge.score(start, n_batches), "searched": judge.score(searched, n_batches)}
    kept = "start" if scores["searched"] > scores["start"] else "searched"
    return {"kept": kept, "batches": n_batches, "documents": sum(int(b["input_ids"].shape[0]) for b in judge.batches[:n_batches]), **scores}


def _best_start(pool, dp: list[int], seeds: dict[str, list[int]], costs: list[list[int]], limit: int, n_batches: int) -> tuple[list[int], dict]:
    """The DP allocation or the best seed within the budget (scored on ``n_batches``), and what
    each candidate start scored (``None``: over the budget, not scored)."""
    names = ["dp"] + [n for n, s in seeds.items() if total_cost(s, costs) <= limit]
    if len(names) == 1:
        return dp, {"chosen": "dp", **{n: None for n in seeds}}
    candidates = [dp] + [seeds[n] for n in names[1:]]
    scores = pool.score(candidates, n_batches)
    best = min(range(len(names)), key=lambda i: (scores[i], i))
    return candidates[best], {"chosen": names[best], **{n: None for n in seeds}, **dict(zip(names, scores))}


def _check_tuning_fits(loaded, space: SearchSpace) -> None:
    """Refuse, before any search work, a ``tune`` section whose training cannot fit in memory
    (the memory pre-flight of a recipe of that one step: the tuned copy, its float32 codes and a
    training step's activations on the tuning's own batches)."""
    check_fits(estimate_steps_peak(loaded, [tuning_step(space.tune)], space.calibration))


def tune_scales(loaded, model, space: SearchSpace, progress: bool = False) -> dict:
    """Apply the space's scale tuning to ``model`` (an assembled candidate) in place, with the
    original ``loaded`` as the teacher; returns the step's record."""
    from slimformer.methods import apply_method

    ctx = CompressionContext(space.calibration, progress=progress)
    ctx.teacher = loaded.model
    return apply_method(model, tuning_step(space.tune), ctx)["scale_tuning"]


def _save_searched(loaded, db: LevelDatabase, space: SearchSpace, units: list[Unit], levels: list[int], label: str, measured: dict, folder: Path,
                   tuned=None) -> None:
    """Save the candidate ``levels`` like any compressed model, with a re-appliable recipe;
    ``tuned``: that candidate already assembled and scale-tuned (the recipe then ends with the
    tuning step)."""
    from slimformer.io.serialization import quantized_modules, save_compressed

    bits_of, removed = choice(units, levels)
    model = tuned if tuned is not None else assemble(loaded, db, bits_of, removed)
    quantized = quantized_modules(model.model)
    model.applied.append({"step": {"method": "search", "budget": label}, "bits": bits_of, "removed_sublayers": [f"{b}.{k}" for b, k in removed],
                          "kernels": {n: m.kernel for n, m in quantized.items()}})
    model.recipe = searched_recipe(space, bits_of, label, removed)
    if tuned is not None:
        model.applied.append({"step": dict(space.tune), "scale_tuning": measured["tuning"]})
        model.recipe["steps"].append(dict(space.tune))
    save_compressed(model, folder, evaluation={"kind": loaded.kind, "quality": measured["quality"]}, force=True)


def plot_front(front: dict, path: Path) -> None:
    """Held-out distortion against average code bits: uniform levels, DP, searched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    structure_only = not front["space"]["space"].get("bits")  # bits: [] -- which sub-layers to remove
    # levels that differ in group size differ in scales too: stored bits then
    x = "params_kept" if structure_only else ("stored_bits_per_weight" if front.get("level_names") else "code_bits_per_weight")
    uni = sorted(front["uniform"].values(), key=lambda p: p[x])
    ax.plot([p[x] for p in uni], [p["distortion"] for p in uni], "o--", color="grey", label="uniform")
    base = (front.get("baseline") or {}).get("uniform") or {}  # another space's uniform setting (benchmarks/search.py --baseline-space)
    if base:
        pts = sorted(base.values(), key=lambda p: p[x])
        ax.plot([p[x] for p in pts], [p["distortion"] for p in pts], "D", color="black", mfc="none",
                label=f"uniform, {front['baseline']['space']['space']['quantizer']} levels (baseline)")
    for name, style in (("dp", "s"), ("searched", "*")):
        pts = sorted((b[name] for b in front["budgets"].values()), key=lambda p: p[x])
        ax.plot([p[x] for p in pts], [p["distortion"] for p in pts], style + "-", ms=9 if style == "*" else 6,
                label="DP allocation" if name == "dp" else "EvoPress search")
    if base or front["space"]["space"].get("quantizer", "gptq") != "gptq":
        ax.lines[0].set_label(f"uniform, {front['space']['space']['quantizer']} levels")
    for name, style in (("dp_tuned", "s"), ("searched_tuned", "*")):
        untuned = name.removesuffix("_tuned")
        pts = sorted((b[untuned][x], b[name]["distortion"]) for b in front["budgets"].values() if name in b)  # the untuned model's cost
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style + ":", mfc="none", ms=9 if style == "*" else 6,
                    label=("DP allocation" if untuned == "dp" else "EvoPress search") + ", scales tuned")
    members = (front.get("pareto") or {}).get("members") or []
    if members:
        ax.plot([p[x] for p in members], [p["distortion"] for p in members], "^:", color="C3", label="NSGA-II front")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of the searched weights kept" if structure_only else
                  ("stored bits per weight, scales included" if x == "stored_bits_per_weight" else "average code bits per weight") + " (searched layers)")
    ax.set_ylabel("KL to original (held-out)" if front["kind"] == "causal-lm" else "1 - mean cosine (held-out)")
    ax.set_title(f"search front: {Path(front['model']).name}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def probe_key(units: list[Unit], levels: tuple[int, ...]) -> str:
    """What a sensitivity probe changes, independent of how the space cuts the model into units:
    ``-SUBLAYER`` for a removed sub-layer, ``LINEAR@BITS`` for a linear at a width (a unit at its
    original weights or ``KEEP`` changes nothing); ``original`` when nothing changes."""
    parts = {f"-{s}" for s in removed_sublayers(units, list(levels))}
    for unit, k in zip(units, levels):
        if k >= 0 and unit.levels[k] not in (DROP, KEEP):
            parts.update(f"{name}@{unit.levels[k]}" for name in unit.linears)
    return ";".join(sorted(parts)) or "original"


def probe_fitness(fitness: str) -> str:
    """What the DP's single-layer probes are scored by: the search's fitness where it adds over
    layers (``kl``, ``nll``), plain KL for ``log-kl`` (a sum of logs is no additive estimate)."""
    return "kl" if fitness == "log-kl" else fitness


def _probes_key(source: str, space: SearchSpace, n_batches: int) -> str:
    """What a probe's score depends on beyond the level database (its folder's own key): the
    database, the calibration batches it is scored on, the scoring dtype and the fitness."""
    payload = json.dumps({"v": BATCHING, "database": database_key(source, space), "calibration": space.to_dict()["calibration"], "batches": n_batches,
                          "dtype": space.evolution.dtype, "fitness": probe_fitness(space.evolution.fitness)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _write_json(path: Path, data: dict) -> None:
    write_json(path, data, default=_default)


def _default(o):
    if isinstance(o, Budget):
        return o.label
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(type(o).__name__)
