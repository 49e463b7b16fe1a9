"""Dynamic inference on all-MiniLM-L6-v2: early exit, token merging, token pruning, and their
combination with bf16 / int8 weights.

Each knob is swept; every row is measured against the fp32 original in one process: embedding
cosine (mean, worst) and retrieval agreement@10 on held-out text, blocks run per input, real
tokens entering each block, estimated FLOPs, and two latency ratios — the fixed 32x128 batch of
``evaluate`` and the whole mixed-length held-out corpus (320 documents of natural length up to
128 tokens, batches of 32), both medians of interleaved runs after warm-up.

    python benchmarks/dynamic_inference.py          # writes results/dynamic_inference.{md,json,png}
    python benchmarks/dynamic_inference.py --quick  # a smoke test, *_quick.*
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compression_methods as cm  # noqa: E402

from slimformer.compress import compress  # noqa: E402
from slimformer.data import TextSpec, load_texts  # noqa: E402
from slimformer.evaluate import EvalSettings, evaluate  # noqa: E402
from slimformer.evaluate.cost import interleaved_latency  # noqa: E402
from slimformer.evaluate.quality import _tokenize  # noqa: E402
from slimformer.methods.dynamic import set_exit_rule  # noqa: E402
from slimformer.models import load_model  # noqa: E402
from slimformer.recipe import Recipe  # noqa: E402
from slimformer.runtime.machine import describe_machine, machine_line  # noqa: E402

CALIBRATION = {"n_samples": 512, "max_length": 128}
THRESHOLDS = (0.95, 0.92, 0.9, 0.85)


def corpus_batches(loaded, settings: EvalSettings) -> list[dict]:
    texts = load_texts(TextSpec(source=settings.source, split="evaluation", n=settings.n_texts, seed=settings.seed))
    return [_tokenize(loaded, texts[i : i + 32], settings.max_length) for i in range(0, len(texts), 32)]


def corpus_speedup(original, model, batches, repeats: int) -> float:
    run = lambda m: (lambda: [m.embed(b) for b in batches])  # noqa: E731
    lat = interleaved_latency({"o": run(original), "c": run(model)}, repeats=repeats, warmup=1)
    return lat["o"] / lat["c"]


def steps_for(name: str) -> list[dict]:
    """Static/token steps of a variant name such as 'bf16+tome8'."""
    steps: list[dict] = []
    for part in name.split("+"):
        if part == "bf16":
            steps.append({"method": "cast", "dtype": "bfloat16"})
        elif part == "int8":
            steps.append({"method": "rtn", "bits": 8, "group_size": None, "symmetric": True, "targets": ["linear", "embedding"]})
        elif part == "w8a8":  # SmoothQuant W8A8 on the int8 units; MLP output projections W8 weight-only; emb 8-bit
            steps.append({"method": "smoothquant", "exclude": ["*.layer.*[0-9].output.dense"]})
            steps.append({"method": "rtn", "bits": 8, "group_size": None, "symmetric": True, "targets": ["linear", "embedding"]})
        elif part.startswith("tomeP"):
            steps.append({"method": "tome", "r": int(part[5:]), "proportional_attention": True})
        elif part.startswith("tome"):
            steps.append({"method": "tome", "r": int(part[4:]), "proportional_attention": False})
        elif part.startswith("prune"):
            steps.append({"method": "token-pruning", "keep_ratio": int(part[5:]) / 100, "layers": [1, 3], "score": "cls"})
        elif part != "fp32":
            raise ValueError(part)
    return steps


def measure(original, model, name, family, settings, batches, cache, repeats, extra=None) -> dict:
    result = evaluate(original, model, settings, cache=cache)
    q, c = result["quality"], result["cost"]
    dyn = q.get("dynamic") or {}
    row = {
        "name": name, "family": family,
        "cos_mean": q["embedding_cosine_mean"], "cos_min": q["embedding_cosine_min"], "agree10": q["retrieval_agreement_at_10"],
        "speedup_fixed": c["speedup"], "speedup_corpus": corpus_speedup(original, model, batches, repeats),
        "mean_layers": dyn.get("mean_layers_run", float(model.adapter.num_layers())),
        "flops_ratio": dyn.get("flops_ratio", 1.0),
        "tokens_per_block": dyn.get("mean_tokens_entering_block"),
        "size_ratio": c["size_ratio"],
        **(extra or {}),
    }
    cm.log(f"{name}: cos {row['cos_mean']:.4f} (worst {row['cos_min']:.3f}) top10 {row['agree10']:.3f} "
           f"layers {row['mean_layers']:.2f} flops {row['flops_ratio']:.2f} speedup fixed {row['speedup_fixed']:.2f}x corpus {row['speedup_corpus']:.2f}x")
    return row


def sweep(original, base_name: str, family: str, settings, batches, cache, repeats, exits: bool, thresholds) -> list[dict]:
    steps = steps_for(base_name)
    model = copy.deepcopy(original)
    if steps:
        compress(model, Recipe.from_dict({"slimformer_recipe": 1, "steps": steps, "calibration": CALIBRATION}))
    rows = []
    if not exits:
        return [measure(original, model, base_name, family, settings, batches, cache, repeats)]
    compress(model, Recipe.from_dict({"slimformer_recipe": 1, "steps": [{"method": "early-exit", "threshold": 2.0}], "calibration": CALIBRATION}))
    fidelity = model.applied[-1]["exit_fidelity"]
    for t in thresholds:
        set_exit_rule(model, "similarity", t)
        rows.append(measure(original, model, f"{base_name}+exit@{t}", family, settings, batches, cache, repeats, {"threshold": t, "exit_fidelity": fidelity}))
    return rows


def w8a8_rows(original, settings, batches, cache, repeats, thresholds) -> list[dict]:
    rows = sweep(original, "w8a8+bf16", "static", settings, batches, cache, repeats, False, ())
    rows += sweep(original, "w8a8+bf16", "combined", settings, batches, cache, repeats, True, thresholds[:2])
    for combo in ("w8a8+bf16+prune70", "w8a8+bf16+tome4"):
        rows += sweep(original, combo, "combined", settings, batches, cache, repeats, False, ())
    rows += sweep(original, "w8a8+bf16+prune70", "combined", settings, batches, cache, repeats, True, thresholds[:2])
    return rows


def _merge_rows(args, original, settings, batches, cache, repeats, thresholds, start) -> int:
    """Measure the W8A8 rows or the ``--rows`` variants (each against fp32 in this run) and
    merge them into the existing table."""
    stem = "dynamic_inference" + ("_quick" if args.quick else "")
    previous = json.loads((args.out_dir / f"{stem}.json").read_text())
    if args.rows:
        new = []
        for name in args.rows.split(","):
            base, _, exit_at = name.partition("+exit@")
            family = "combined" if "+" in base else "token pruning" if base.startswith("prune") else "token merging"
            rows = sweep(original, base, family, settings, batches, cache, repeats, bool(exit_at), (float(exit_at),) if exit_at else ())
            new += rows
    else:
        new = w8a8_rows(original, settings, batches, cache, repeats, thresholds)
    names = {r["name"] for r in new}
    rows = [r for r in previous["results"] if r["name"] not in names] + new
    meta = dict(previous["meta"])
    if args.rows:  # rows re-run on (possibly) another machine: say which, and on what
        meta["rows_rerun"] = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "rows": sorted(names),
                              "minutes": (time.perf_counter() - start) / 60, "machine": describe_machine()}
    else:
        meta["w8a8_rows_added"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
        meta["w8a8_minutes"] = (time.perf_counter() - start) / 60
    cm.write_text_atomic(args.out_dir / f"{stem}.md", markdown(meta, rows))
    cm.write_text_atomic(args.out_dir / f"{stem}.json", json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    plot(rows, args.out_dir / f"{stem}.png")
    return 0


def markdown(meta, rows) -> str:
    s = meta["eval_settings"]
    lines = [
        "# Dynamic inference on all-MiniLM-L6-v2",
        "",
        f"- Held-out evaluation: {s['n_texts']} documents of the evaluation split of `{s['source']}` (natural lengths, up to "
        f"{s['max_length']} tokens), the first {s['n_queries']} as queries for top-10 agreement. Calibration (exit training, "
        f"{CALIBRATION['n_samples']} documents) never sees them.",
        "- **speedup fixed**: the `evaluate` batch of 32×128 tokens; **speedup corpus**: encoding the whole mixed-length "
        "held-out corpus in batches of 32 (each run by `embed` as length buckets, the fp32 original too), both as fp32 latency / variant latency, medians of "
        "interleaved runs in this process. Layers = mean blocks run per input (6 = no exit); FLOPs = estimated block FLOPs actually "
        "run / full model on the same padded batches.",
        "- Exits: one linear exit per block 0–4, trained by self-distillation (cosine to the model's own final embedding, backbone "
        "frozen), with token reduction and the cast already active; rule = MuE similarity of consecutive exits ≥ threshold.",
        (f"- Machine: {machine_line(meta['machine'])}; run {meta['started']} UTC, {meta['minutes']:.1f} min" if meta.get("machine") else
         f"- Machine: 2 CPU cores, torch {meta['torch']}; run {meta['started']} UTC, {meta['minutes']:.1f} min")
        + (" — quick smoke test." if meta["quick"] else "."),
        *([f"- The w8a8 rows (SmoothQuant W8A8 linears on the int8 units, MLP output projections int8 weight-only, 8-bit "
           f"embeddings, bf16 elsewhere) were added on {meta['w8a8_rows_added']} UTC in a separate run ({meta['w8a8_minutes']:.1f} min), "
           "each still measured against fp32 in its own run."] if meta.get("w8a8_rows_added") else []),
        *([f"- Rows {', '.join(meta['rows_rerun']['rows'])} re-run on {meta['rows_rerun']['date']} UTC ({meta['rows_rerun']['minutes']:.1f} min) "
           f"on {machine_line(meta['rows_rerun']['machine'])}, with the execution planner's paths and length-bucketed batches; each "
           "still against fp32 in that run. The other rows come from the run above (another machine)."] if meta.get("rows_rerun") else []),
        "",
        "| variant | family | cos mean | cos worst | top-10 agreement | layers run | FLOPs ratio | speedup fixed | speedup corpus |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['family']} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | {r['agree10']:.3f} | {r['mean_layers']:.2f} | "
            f"{r['flops_ratio']:.2f} | {r['speedup_fixed']:.2f}× | {r['speedup_corpus']:.2f}× |"
        )
    lines += ["", "Best variant per quality floor (by corpus speedup):", ""]
    for floor in (0.99, 0.98, 0.97, 0.95):
        ok = [r for r in rows if r["cos_mean"] >= floor]
        if ok:
            best = max(ok, key=lambda r: r["speedup_corpus"])
            lines.append(f"- cos ≥ {floor}: **{best['name']}** — {best['speedup_corpus']:.2f}× corpus, {best['speedup_fixed']:.2f}× fixed batch, cos {best['cos_mean']:.4f}")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 7))
    colors = {"early exit": "tab:blue", "token merging": "tab:orange", "token pruning": "tab:brown", "combined": "tab:purple", "static": "tab:green"}
    for fam, color in colors.items():
        pts = [r for r in rows if r["family"] == fam]
        if pts:
            ax.scatter([r["speedup_corpus"] for r in pts], [r["cos_mean"] for r in pts], c=color, label=fam, s=30, zorder=3)
    xs = sorted(rows, key=lambda r: -r["cos_mean"])
    front, best = [], 0.0
    for r in xs:
        if r["speedup_corpus"] > best:
            front.append(r)
            best = r["speedup_corpus"]
    ax.plot([r["speedup_corpus"] for r in front], [r["cos_mean"] for r in front], "k--", lw=0.8, label="Pareto front")
    ax.scatter([1.0], [1.0], marker="*", s=200, c="tab:red", label="fp32 original", zorder=4)
    fig.tight_layout()
    cm._place_labels(ax, [(r["speedup_corpus"], r["cos_mean"], r["name"]) for r in front], 6.5)
    ax.set_xlabel("speedup on the mixed-length held-out corpus (fp32 latency / variant latency)")
    ax.set_ylabel("mean embedding cosine to the fp32 original")
    ax.set_title("all-MiniLM-L6-v2: quality against measured speed, dynamic and combined")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    cm._atomic_write(path, lambda p: fig.savefig(p, dpi=130, format="png"))
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=cm.RESULTS_DIR)
    parser.add_argument("--rows", default=None,
                        help="comma-separated variant names (e.g. w8a8+bf16+prune50) to run and merge into the existing table")
    parser.add_argument("--only-w8a8", action="store_true",
                        help="run only the W8A8 rows and merge them into the existing table (other rows keep their run's figures)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    settings = EvalSettings(n_texts=96, n_queries=16, latency_repeats=3) if args.quick else EvalSettings(latency_repeats=7)
    repeats = 2 if args.quick else 3
    original = load_model()
    batches = corpus_batches(original, settings)
    cache: dict = {}
    rows: list[dict] = []
    thresholds = THRESHOLDS[1:4] if args.quick else THRESHOLDS
    if args.only_w8a8 or args.rows:
        return _merge_rows(args, original, settings, batches, cache, repeats, thresholds, start)
    rows += sweep(original, "fp32", "early exit", settings, batches, cache, repeats, True, thresholds)
    for name in (("tome8",) if args.quick else ("tome4", "tome8", "tomeP8")):
        rows += sweep(original, name, "token merging", settings, batches, cache, repeats, False, ())
    for k in ((70,) if args.quick else (70,)):
        rows += sweep(original, f"prune{k}", "token pruning", settings, batches, cache, repeats, False, ())
    rows += sweep(original, "bf16", "static", settings, batches, cache, repeats, False, ())
    rows += sweep(original, "bf16", "combined", settings, batches, cache, repeats, True, thresholds[:2])
    rows += w8a8_rows(original, settings, batches, cache, repeats, thresholds)
    combos = ("bf16+tome8",)
    for combo in combos:
        rows += sweep(original, combo, "combined", settings, batches, cache, repeats, False, ())
        rows += sweep(original, combo, "combined", settings, batches, cache, repeats, True, thresholds[:2])
    meta = {
        "quick": args.quick, "started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "minutes": (time.perf_counter() - start) / 60, "torch": torch.__version__, "machine": describe_machine(),
        "eval_settings": dataclasses.asdict(settings), "calibration": CALIBRATION,
    }
    stem = "dynamic_inference" + ("_quick" if args.quick else "")
    cm.write_text_atomic(args.out_dir / f"{stem}.md", markdown(meta, rows))
    cm.write_text_atomic(args.out_dir / f"{stem}.json", json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    plot(rows, args.out_dir / f"{stem}.png")
    cm.log(f"wrote {args.out_dir}/{stem}.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
