"""Does quality hold on text unlike the calibration text? The default 4-bit recipe on MiniLM.

For each calibration setting, compress a fresh copy of the embedded all-MiniLM-L6-v2 with the
default 4-bit recipe (``recipes/gptq-w4g32-v8-emb8.yaml``: 4-bit GPTQ g32 linears, 8-bit attention
value projections, 8-bit embedding table; rows name their group size and whether the value
projections keep 8 bits) and measure embedding fidelity to the fp32 original (mean cosine,
worst cosine, top-10 retrieval agreement) on three held-out sets:

- ``stdlib-docs`` evaluation split: the standard held-out split (docstrings);
- ``package-docs`` evaluation split: the second held-out source, of a different kind: READMEs
  and long descriptions of the installed Python packages (prose for people, Markdown/rST,
  changelogs). This kind is never part of any calibration setting below; the numbers on it are
  the ones reported, never used to choose a setting;
- ``package-docs`` calibration split ("dev"): the same kind, other documents (split by hash),
  the only set used to compare settings while choosing the default.

Writes ``benchmarks/results/calibration_transfer.{md,json,png}``.

    python benchmarks/calibration_transfer.py                  # all settings
    python benchmarks/calibration_transfer.py --only g32       # settings whose name contains 'g32' (repeatable)
    python benchmarks/calibration_transfer.py --replot         # .md/.png from the .json
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from slimformer.compress import compress
from slimformer.data import TextSpec, load_texts
from slimformer.data.text import CALIBRATION_MIX, TRANSFER_SOURCE
from slimformer.evaluate.cost import storage_bytes
from slimformer.evaluate.quality import encoder_quality, encoder_reference
from slimformer.models import load_model
from slimformer.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_RECIPE = ROOT / "recipes" / "gptq-w4g32-v8-emb8.yaml"
EVAL_SETS = {
    "stdlib-docs (standard held-out split)": ("stdlib-docs", "evaluation"),
    f"{TRANSFER_SOURCE} (held-out, other kind)": (TRANSFER_SOURCE, "evaluation"),
    f"{TRANSFER_SOURCE} dev (calibration split, for choosing)": (TRANSFER_SOURCE, "calibration"),
}
N_TEXTS, N_QUERIES, MAX_LENGTH = 320, 64, 128
TARGET = {"embedding_cosine_mean": 0.985, "retrieval_agreement_at_10": 0.88}

# (name, calibration overrides, gptq overrides): every setting keeps the recipe's size.
# (name, calibration overrides, gptq-step overrides); "value8": False drops the recipe's step
# that keeps the attention value projections at 8 bits (every other linear layer is 4-bit GPTQ).
G64 = {"group_size": 64, "value8": False}
G32 = {"value8": False}
SETTINGS = [
    ("g64, calibration stdlib-docs, 128 samples (default before stop 8)", {"source": "stdlib-docs", "n_samples": 128}, G64),
    ("g64, mix, 128 samples (default in stop 8-9)", {"n_samples": 128}, G64),
    ("g64, mix, 512 samples (default in stop 10; the smaller variant gptq-w4g64-emb8 now)", {}, G64),
    ("g32 + value 8-bit, mix, 512 samples (default recipe now)", {}, {}),
    # other candidates, compared on the dev set only
    ("g32, mix, 512 samples", {}, G32),
    ("g32, mix, 128 samples", {"n_samples": 128}, G32),
    ("g64 + value 8-bit, mix, 512 samples", {}, {"group_size": 64}),
    ("g64, mix, 512 samples x 256 tokens", {"n_samples": 512, "max_length": 256}, G64),
    ("g64, mix, 1024 samples", {"n_samples": 1024}, G64),
    ("g64, mix, damp 0.05", {"n_samples": 128}, {**G64, "damp": 0.05}),
    ("g64, mix, 128 samples, bias correction", {"n_samples": 128}, {**G64, "bias_correction": True}),
    ("g64, mix, 512 samples, bias correction", {"n_samples": 512}, {**G64, "bias_correction": True}),
    ("g64, mix, 512 samples, clip search", {"n_samples": 512}, {**G64, "clip_search": True}),
]


def _recipe(calibration: dict, gptq: dict) -> Recipe:
    data = Recipe.from_file(DEFAULT_RECIPE).to_dict()
    data["calibration"].update(calibration)
    gptq = dict(gptq)
    if not gptq.pop("value8", True):
        data["steps"] = [s for s in data["steps"] if not s.get("include")]
    next(s for s in data["steps"] if s["method"] == "gptq").update(gptq)
    return Recipe.from_dict(data)


def _cpu() -> dict:
    info = {"model": platform.processor() or "unknown", "flags": []}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and info["model"] in ("unknown", ""):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = sorted(flags & {"avx512_vnni", "avx512_bf16", "amx_tile", "avx2"})
                break
    except OSError:
        pass
    return info


def run(only: list[str] | None) -> dict:
    torch.manual_seed(0)
    original = load_model()
    sets = {}
    for label, (source, split) in EVAL_SETS.items():
        texts = load_texts(TextSpec(source=source, split=split, n=N_TEXTS, seed=0))
        n_queries = min(N_QUERIES, len(texts) // 4)
        sets[label] = (texts, n_queries, encoder_reference(original, texts, n_queries, MAX_LENGTH, 32))
    rows = []
    for name, calibration, gptq in SETTINGS:
        if only and not any(part in name for part in only):
            continue
        recipe = _recipe(calibration, gptq)
        t0 = time.perf_counter()
        model = compress(copy.deepcopy(original), recipe)
        seconds = time.perf_counter() - t0
        row = {
            "setting": name,
            "calibration": recipe.to_dict()["calibration"],
            "steps": recipe.to_dict()["steps"],
            "size_ratio": storage_bytes(model.model) / storage_bytes(original.model),
            "compress_seconds": round(seconds, 1),
            "quality": {},
        }
        for label, (texts, n_queries, reference) in sets.items():
            q = encoder_quality(original, model, texts, n_queries, MAX_LENGTH, 32, reference=reference)
            row["quality"][label] = {k: q[k] for k in ("embedding_cosine_mean", "embedding_cosine_min", "retrieval_agreement_at_10", "n_texts", "n_queries")}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (embedded default)",
        "recipe": str(DEFAULT_RECIPE.relative_to(ROOT)),
        "calibration_mix": CALIBRATION_MIX,
        "eval_sets": {k: list(v) for k, v in EVAL_SETS.items()},
        "target_on_other_kind": TARGET,
        "cpu": _cpu(),
        "loadavg": os.getloadavg(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    labels = list(EVAL_SETS)
    other = labels[1]
    lines = [
        "# Calibration transfer: the default 4-bit recipe on MiniLM, on text unlike the calibration text",
        "",
        f"Model: {result['model']}; recipe `{result['recipe']}` (4-bit GPTQ linears in groups of 32 with activation "
        "order, attention value projections at 8 bits, 8-bit embedding table; each row names its group size and "
        "whether the value projections keep 8 bits; rows not re-run this session were measured with the code of their "
        "date). Quality = fidelity to the fp32 original: mean / worst embedding cosine and top-10 retrieval "
        f"agreement (first sentences of {N_QUERIES} texts, or of a quarter of them when fewer, as queries; the other texts as passages, up to {MAX_LENGTH} tokens).",
        "",
        f"- **Standard held-out split**: `stdlib-docs` evaluation split (docstrings; never calibrated on).",
        f"- **Other kind (held out)**: `{TRANSFER_SOURCE}` evaluation split: READMEs / long descriptions of the installed "
        "Python packages (prose for people, Markdown/rST, changelogs). This kind is in no calibration setting; "
        f"the target is mean cos >= {TARGET['embedding_cosine_mean']} and top-10 >= {TARGET['retrieval_agreement_at_10']} on it.",
        f"- **Dev**: `{TRANSFER_SOURCE}` calibration split (other documents of that kind): the only set looked at to choose a setting. "
        "The default was chosen for its dev cosine per byte (0.9915 at size 0.220; groups of 32 alone 0.9882 at 0.216; "
        "8-bit value and output projections 0.9936 at 0.224 in a separate run); its dev top-10 (0.877 here, 0.881 in a "
        "separate run) is within that metric's noise of 0.88. A 4-bit embedding table (groups of 32, size 0.167) cost "
        "0.002 cos and 0.01-0.03 top-10 on dev, so the table stays at 8 bits.",
        "- **Precision of top-10**: on the other kind it is measured on 36 queries x 10 passages = 360 entries, so one entry "
        "is 0.0028; re-runs of one setting after unrelated code changes moved it by up to 0.02 (mean cos by 0.0003).",
        "- **Calibration mix** (new default, `source: mix`): "
        + ", ".join(f"{name} {share:.0%}" for name, share in result["calibration_mix"])
        + ", half short (< 600 characters) and half long documents.",
        "",
        f"| setting | size ratio | {labels[0]}: cos mean / worst / top-10 | {other}: cos mean / worst / top-10 | dev: cos mean / top-10 | target met |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        q = r["quality"]
        o = q[other]
        met = o["embedding_cosine_mean"] >= TARGET["embedding_cosine_mean"] and o["retrieval_agreement_at_10"] >= TARGET["retrieval_agreement_at_10"]
        cell = lambda d: f"{d['embedding_cosine_mean']:.4f} / {d['embedding_cosine_min']:.4f} / {d['retrieval_agreement_at_10']:.3f}"  # noqa: E731
        lines.append(
            f"| {r['setting']} | {r['size_ratio']:.3f} | {cell(q[labels[0]])} | {cell(o)} | "
            f"{q[labels[2]]['embedding_cosine_mean']:.4f} / {q[labels[2]]['retrieval_agreement_at_10']:.3f} | {'yes' if met else 'no'} |"
        )
    n = {label: result["rows"][0]["quality"][label]["n_texts"] for label in labels} if result["rows"] else {}
    lines += [
        "",
        "Texts per set: " + ", ".join(f"{k}: {v}" for k, v in n.items()) + ".",
        f"CPU: {result['cpu']['model']} (flags: {', '.join(result['cpu']['flags']) or 'none of avx512_vnni/avx512_bf16/amx_tile'}); "
        f"load average {', '.join(f'{x:.1f}' for x in result['loadavg'])} (shared machine; no speed figures here); "
        f"torch {result['torch']}; {result['date']}.",
        "",
        "![quality on each held-out set](calibration_transfer.png)",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(EVAL_SETS)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(result["rows"]))
    for ax, key, title in zip(axes, ("embedding_cosine_mean", "retrieval_agreement_at_10"), ("mean embedding cosine", "top-10 retrieval agreement")):
        for i, r in enumerate(result["rows"]):
            ys = [r["quality"][label][key] for label in labels]
            ax.bar([x + i * width for x in range(len(labels))], ys, width, label=r["setting"])
        ax.axhline(TARGET[key], color="tab:red", linestyle="--", linewidth=1, label="target on the other kind")
        ax.set_xticks([x + width * (len(result["rows"]) - 1) / 2 for x in range(len(labels))])
        ax.set_xticklabels(["standard\n(stdlib-docs)", "other kind\n(package-docs)", "dev\n(package-docs)"], fontsize=8)
        ax.set_ylim(min(0.7 if "agreement" in key else 0.95, *(r["quality"][label][key] - 0.01 for r in result["rows"] for label in labels)), 1.0)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("MiniLM, default 4-bit recipe: quality on held-out text by calibration setting", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="run only settings whose name contains this (repeatable); other rows are kept")
    parser.add_argument("--replot", action="store_true")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / "calibration_transfer.json"
    if args.replot:
        result = json.loads(json_path.read_text())
    else:
        result = run(args.only)
        if args.only and json_path.is_file():  # merge: keep the other settings' rows
            old = json.loads(json_path.read_text())
            names = {r["setting"] for r in result["rows"]}
            order = {name: i for i, (name, _, _) in enumerate(SETTINGS)}
            rows = [r for r in old["rows"] if r["setting"] not in names] + result["rows"]
            result["rows"] = sorted(rows, key=lambda r: order.get(r["setting"], len(order)))
        json_path.write_text(json.dumps(result, indent=2))
    (RESULTS / "calibration_transfer.md").write_text(markdown(result))
    plot(result, RESULTS / "calibration_transfer.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
