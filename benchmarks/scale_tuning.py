"""Benchmark scale tuning (PV-Tuning's P step) on the models of a finished search, or on the
one-shot models of several recipes.

With ``--run`` and ``--budget``: takes a search folder written by ``benchmarks/search.py`` (its
``front.json``, level database and, when measured, the baseline's uniform levels), assembles the
uniform baseline setting at the budget's bytes, the DP allocation and the searched model. With
``--recipe`` (repeatable): each recipe's steps (a trailing ``scale-tuning`` step left out) make a
one-shot model from the original, with the recipe's calibration. Either way each model is
measured on held-out text before and after ``scale-tuning`` (the same settings for all), and a
table, JSON and plot are written: KL per token to the original on held-out sources, with 95 %
intervals from resampling whole documents (paired).

    python benchmarks/scale_tuning.py --run runs/bench-search-smollm2-quantease-drawn --budget bytes=4.47898e+07 \\
        --search-results search_smollm2_quantease_drawn_amd --stem scale_tuning_smollm2_amd
    python benchmarks/scale_tuning.py --recipe recipes/gptq-w3g64-scale-tuning.yaml --recipe recipes/awq-w3g64-scale-tuning.yaml \\
        --recipe recipes/hqq-w3g64-scale-tuning.yaml --stem scale_tuning_quantizers_smollm2_amd

Writes ``benchmarks/results/<stem>.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from slimformer.compress import compress
from slimformer.data import TextSpec, load_texts
from slimformer.errors import ConfigError
from slimformer.evaluate.quality import document_kl
from slimformer.methods import CalibrationSettings, CompressionContext, apply_method, method_from_dict
from slimformer.methods.quantization.scale_tuning import tunable_layers
from slimformer.models import load_model
from slimformer.recipe import Recipe
from slimformer.search.fitness import _open as open_database
from slimformer.search.run import assemble

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_files import bootstrap_indices, cpu_info, paired_ratio  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = 2000


def models_of(loaded, run: Path, front: dict, budget: str) -> dict:
    """{name: model} for the budget: the baseline's uniform setting of equal bytes (when the search
    measured one), the DP allocation and the searched model."""
    entry = front["budgets"][budget]
    db = open_database(str(run / "levels"))
    out = {}
    base = front.get("baseline")
    if base and budget.startswith("bytes="):
        limit = float(budget.split("=")[1])
        same = [b for b, p in base["uniform"].items() if abs(p["stored_bytes"] - limit) <= 0.001 * limit]
        if same:
            bdb = open_database(str(run / "baseline-levels"))
            quantizer = base["space"].get("space", {}).get("quantizer", "baseline").replace("gptq", "GPTQ")
            out[f"uniform {base['level_names'][same[0]]} ({quantizer})"] = assemble(loaded, bdb, {u: int(same[0]) for u in bdb.units})
    out["DP allocation"] = assemble(loaded, db, entry["dp_bits"])
    out["searched"] = assemble(loaded, db, entry["bits"])
    return out


def one_shot_recipes(paths: list[str]) -> dict[str, Recipe]:
    """{name: recipe without a trailing scale-tuning step} of each recipe file (ConfigError for a
    file that is not a recipe, or one with nothing to apply before the tuning)."""
    out = {}
    for path in paths:
        recipe = Recipe.from_file(path)
        steps = list(recipe.steps)
        if steps and steps[-1].name == "scale-tuning":
            steps = steps[:-1]
        if not steps:
            raise ConfigError(f"{path}: the recipe has no one-shot step before its tuning", "give a recipe that quantizes, e.g. recipes/gptq-w3g64-scale-tuning.yaml")
        name = recipe.name.removesuffix("-scale-tuning")
        if name in out:
            raise ConfigError(f"{path}: a second recipe named {recipe.name!r}", "give each recipe once")
        out[name] = dataclasses.replace(recipe, steps=steps)
    return out


def models_of_recipes(loaded, recipes: dict[str, Recipe]) -> dict:
    """{name: the recipe's one-shot model}, each made from a copy of the original."""
    out = {}
    for name, recipe in recipes.items():
        t0 = time.perf_counter()
        model = copy.deepcopy(loaded)
        compress(model, recipe, progress=sys.stderr.isatty())
        print(name, f"one-shot {time.perf_counter() - t0:.0f} s", flush=True)
        out[name] = model
    return out


def stored_bytes(model) -> int:
    return sum(m.stored_bits() for m in tunable_layers(model.model).values()) // 8


def measure(loaded, models: dict, sources: dict[str, list[str]], max_length: int) -> dict:
    out = {}
    for source, texts in sources.items():
        sums, counts = document_kl(loaded, models, texts, max_length, 8)
        out[source] = {"sums": sums, "counts": counts}
    return out


def ratio_interval(a: list[float], b: list[float], counts: list[int], gen: torch.Generator) -> dict:
    """sum(a) / sum(b) (per-token KL of two models on the same documents) with a 95 % interval
    from resampling documents."""
    return paired_ratio(a, b, bootstrap_indices(len(counts), gen, BOOTSTRAP))


def _brief(step: dict) -> dict:
    """A recipe step's settings without its bookkeeping (version, layer selection left at all)."""
    return {k: v for k, v in step.items() if k not in ("version", "include", "exclude") and not (k == "targets" and v == ["linear"])}


def markdown(result: dict) -> str:
    s = result["settings"]
    cpu = result["machine"]
    what = (f"the models of a search: {result['run']}, {result['budget']}" if result["run"] else
            "one-shot quantizers: " + ", ".join(f"{n} (`{json.dumps([_brief(st) for st in r['steps']])}`, calibration n_samples {r['calibration']['n_samples']}, "
                                                f"max_length {r['calibration']['max_length']})" for n, r in result["recipes"].items()))
    lines = [f"# Scale tuning (PV-Tuning's P step) on {what}", "",
             f"CPU: {cpu['model']}, {cpu['threads']} threads; flags: {', '.join(cpu['flags'])}; torch {cpu['torch']}; load before {cpu['loadavg']}.",
             "SmolLM2-135M-Instruct from its Q4_1 GGUF: the original's linears already lie on a 4-bit g32 asymmetric grid.",
             f"Tuning: `{json.dumps(s['step'])}`, calibration {s['calibration']} (the `mix` calibration split; never the evaluation split). "
             "Only the group scales (as a gain per scale) and the norm weights train; the codes and zero points stay bit for bit, so the stored bytes do not change.",
             f"Held-out: evaluation splits, {s['eval_texts']} documents per source, <= {s['eval_max_length']} tokens, float32; KL(original || model) per token. "
             f"Brackets: a ratio with a 95 % interval from {BOOTSTRAP} paired resamples of whole documents.", "",
             "| model | stored bytes | tuning (s) | " + " | ".join(f"`{src}` before | after (after / before)" for src in result["sources"]) + " |",
             "|---|---:|---:|" + "---:|---:|" * len(result["sources"])]
    for name, m in result["models"].items():
        cells = []
        for src in result["sources"]:
            r = m["sources"][src]
            x = r["after_over_before"]
            cells.append(f"{r['before']:.4f} | {r['after']:.4f} ({x['ratio']:.3f}x, {x['low']:.3f}-{x['high']:.3f})")
        lines.append(f"| {name} | {m['stored_bytes']:,} | {m['seconds']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "Calibration KL of the tuning (its own batches, float32): " + "; ".join(
        f"{name}: {m['record']['loss_before']:.4f} -> {m['record']['loss_stored']:.4f} stored (median scale change {100 * m['record']['median_abs_scale_change']:.2f} %)"
        for name, m in result["models"].items()), ""]
    for line in result["lines"]:
        lines.append(f"- {line}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(result["sources"])
    names = list(result["models"])
    fig, axes = plt.subplots(1, len(sources), figsize=(5 * len(sources), 4), squeeze=False)
    for ax, src in zip(axes[0], sources):
        before = [result["models"][n]["sources"][src]["before"] for n in names]
        after = [result["models"][n]["sources"][src]["after"] for n in names]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], before, width=0.4, label="one-shot")
        ax.bar([i + 0.2 for i in x], after, width=0.4, label="scales tuned")
        ax.set_xticks(list(x), [n.replace(" (", "\n(") for n in names], fontsize=7)
        ax.set_title(f"held-out {src}")
        ax.set_ylabel("KL to the original per token")
        if names[0].startswith("uniform"):
            ax.axhline(0.7 * before[0], color="gray", linestyle="--", linewidth=1, label="0.70x uniform one-shot")
        ax.legend(fontsize=7)
    fig.suptitle(f"Scale tuning at {result['budget']} (same stored bytes)" if result["budget"] else "Scale tuning of one-shot models (each its own stored bytes)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--run", default=None, help="a search folder of benchmarks/search.py (runs/bench-search-<label>)")
    ap.add_argument("--search-results", default=None,
                    help="benchmarks/results/<stem>.json of that search (its front also holds the baseline's uniform settings); default: the folder's front.json")
    ap.add_argument("--budget", default=None, help="with --run: one budget of that search, as its front.json names it, e.g. bytes=4.47898e+07")
    ap.add_argument("--recipe", action="append", default=None,
                    help="instead of --run: a recipe file whose steps (a trailing scale-tuning step left out) make a one-shot model; repeatable")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-samples", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--source", action="append", default=None,
                    help="held-out sources (default: the search's and package-docs, never calibrated on; with --recipe: stdlib-docs, package-docs, notices)")
    ap.add_argument("--eval-texts", type=int, default=64)
    ap.add_argument("--eval-max-length", type=int, default=256)
    ap.add_argument("--only", action="append", default=None, help="tune only these of the models (by their table name, e.g. 'DP allocation')")
    ap.add_argument("--stem", default="scale_tuning")
    args = ap.parse_args()
    if (args.run is None) == (args.recipe is None):
        print("error: give either --run FOLDER --budget B (a search's models) or --recipe FILE (one-shot models), not both or neither", file=sys.stderr)
        return 2
    front, recipes = None, None
    if args.run is not None:
        run = Path(args.run)
        if args.budget is None:
            print("error: --run needs --budget, e.g. --budget bytes=4.47898e+07", file=sys.stderr)
            return 2
        if not (run / "front.json").is_file():
            print(f"error: {run} holds no front.json; give a finished search folder of benchmarks/search.py", file=sys.stderr)
            return 2
        front = json.loads((RESULTS / f"{args.search_results}.json").read_text())["front"] if args.search_results else json.loads((run / "front.json").read_text())
        if args.budget not in front["budgets"]:
            print(f"error: the search has no budget {args.budget!r}; choose one of {sorted(front['budgets'])}", file=sys.stderr)
            return 2
    else:
        try:
            recipes = one_shot_recipes(args.recipe)
        except (ConfigError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    info = cpu_info()
    loaded = load_model(args.model)
    models = models_of(loaded, run, front, args.budget) if front is not None else models_of_recipes(loaded, recipes)
    if args.only:
        unknown = sorted(set(args.only) - set(models))
        if unknown:
            print(f"error: no model {unknown[0]!r} at this budget; choose among {sorted(models)}", file=sys.stderr)
            return 2
        models = {k: v for k, v in models.items() if k in args.only}
    names = args.source or ([front["held_out"]["source"], "package-docs"] if front is not None else ["stdlib-docs", "package-docs", "notices"])
    sources = {s: load_texts(TextSpec(source=s, split="evaluation", n=args.eval_texts)) for s in names}
    step = {"method": "scale-tuning", "steps": args.steps, "lr": args.lr}
    calibration = CalibrationSettings(n_samples=args.n_samples, max_length=args.max_length, batch_size=args.batch_size)
    before = measure(loaded, models, sources, args.eval_max_length)
    result = {"run": str(run) if front is not None else None, "budget": args.budget, "machine": info, "sources": names,
              "recipes": {n: r.to_dict() for n, r in recipes.items()} if recipes else None,
              "settings": {"step": step, "calibration": {"n_samples": args.n_samples, "max_length": args.max_length, "batch_size": args.batch_size},
                           "eval_texts": args.eval_texts, "eval_max_length": args.eval_max_length}, "models": {}}
    for name, model in models.items():
        ctx = CompressionContext(calibration, progress=sys.stderr.isatty())
        ctx.teacher = loaded.model
        bytes_before = stored_bytes(model)
        t0 = time.perf_counter()
        record = apply_method(model, method_from_dict(step), ctx)["scale_tuning"]
        seconds = time.perf_counter() - t0
        assert stored_bytes(model) == bytes_before, "scale tuning must not change the stored bytes"
        result["models"][name] = {"stored_bytes": bytes_before, "seconds": seconds, "record": record, "sources": {}}
        print(name, f"{seconds:.0f} s", {k: round(v, 4) for k, v in record.items() if k.startswith("loss_")}, flush=True)
    after = measure(loaded, models, sources, args.eval_max_length)
    gen = torch.Generator().manual_seed(0)
    for name in models:
        for src in names:
            b, a = before[src], after[src]
            n = sum(b["counts"])
            result["models"][name]["sources"][src] = {"before": sum(b["sums"][name]) / n, "after": sum(a["sums"][name]) / n,
                                                      "after_over_before": ratio_interval(a["sums"][name], b["sums"][name], b["counts"], gen)}
    lines = []
    held = names[0]
    uniform = next((n for n in models if n.startswith("uniform")), None)
    for src in names if {"searched", "DP allocation"} <= set(models) else ():
        a = after[src]
        x = ratio_interval(a["sums"]["searched"], a["sums"]["DP allocation"], a["counts"], gen)
        lines.append(f"`{src}`, both tuned: searched / DP allocation {x['ratio']:.3f}x ({x['low']:.3f}-{x['high']:.3f})")
    if uniform:
        u = result["models"][uniform]["sources"][held]["before"]
        for name in [n for n in ("DP allocation", "searched") if n in models]:
            r = result["models"][name]["sources"][held]
            lines.append(f"`{held}`: {name} tuned {r['after']:.4f} = {r['after'] / u:.3f}x the one-shot {uniform} ({u:.4f}); "
                         f"tuned uniform: {result['models'][uniform]['sources'][held]['after'] / u:.3f}x")
    if recipes:  # every one-shot start against the first recipe's, both tuned
        first = next(iter(models))
        for name in list(models)[1:]:
            for src in names:
                a = after[src]
                x = ratio_interval(a["sums"][name], a["sums"][first], a["counts"], gen)
                lines.append(f"`{src}`, both tuned: {name} / {first} {x['ratio']:.3f}x ({x['low']:.3f}-{x['high']:.3f})")
    result["lines"] = lines
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.stem}.json").write_text(json.dumps({**result, "per_document": {"before": before, "after": after}}, indent=1, default=str))
    plot(result, RESULTS / f"{args.stem}.png")
    (RESULTS / f"{args.stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
