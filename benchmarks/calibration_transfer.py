"""Does quality hold on text unlike the calibration text? The default 4-bit recipe on MiniLM.

For each calibration setting, compress a fresh copy of the embedded all-MiniLM-L6-v2 with the
default 4-bit recipe (``recipes/gptq-w4g64-emb8.yaml``: 4-bit GPTQ g64 linears + 8-bit embedding
table, size ratio ~0.21) and measure embedding fidelity to the fp32 original (mean cosine,
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
    python benchmarks/calibration_transfer.py --only mix       # settings whose name contains 'mix'
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
DEFAULT_RECIPE = ROOT / "recipes" / "gptq-w4g64-emb8.yaml"
EVAL_SETS = {
    "stdlib-docs (standard held-out split)": ("stdlib-docs", "evaluation"),
    f"{TRANSFER_SOURCE} (held-out, other kind)": (TRANSFER_SOURCE, "evaluation"),
    f"{TRANSFER_SOURCE} dev (calibration split, for choosing)": (TRANSFER_SOURCE, "calibration"),
}
N_TEXTS, N_QUERIES, MAX_LENGTH = 320, 64, 128
TARGET = {"embedding_cosine_mean": 0.985, "retrieval_agreement_at_10": 0.88}

# (name, calibration overrides, gptq overrides): every setting keeps the recipe's size.
SETTINGS = [
    ("calibration stdlib-docs, 128 samples (default before stop 8)", {"source": "stdlib-docs", "n_samples": 128}, {}),
    ("mix, 128 samples (default until now)", {"n_samples": 128}, {}),
    ("mix, 512 samples (default recipe now: best on dev)", {}, {}),
    # other candidates, compared on the dev set only (same size: every setting keeps bits and groups)
    ("mix, 512 samples x 256 tokens", {"n_samples": 512, "max_length": 256}, {}),
    ("mix, 1024 samples", {"n_samples": 1024}, {}),
    ("mix, damp 0.05", {"n_samples": 128}, {"damp": 0.05}),
    ("mix, 128 samples, bias correction", {"n_samples": 128}, {"bias_correction": True}),
    ("mix, 512 samples, bias correction", {"n_samples": 512}, {"bias_correction": True}),
]


def _recipe(calibration: dict, gptq: dict) -> Recipe:
    data = Recipe.from_file(DEFAULT_RECIPE).to_dict()
    data["calibration"].update(calibration)
    data["steps"][0].update(gptq)
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


def run(only: str | None) -> dict:
    torch.manual_seed(0)
    original = load_model()
    sets = {}
    for label, (source, split) in EVAL_SETS.items():
        texts = load_texts(TextSpec(source=source, split=split, n=N_TEXTS, seed=0))
        n_queries = min(N_QUERIES, len(texts) // 4)
        sets[label] = (texts, n_queries, encoder_reference(original, texts, n_queries, MAX_LENGTH, 32))
    rows = []
    for name, calibration, gptq in SETTINGS:
        if only and only not in name:
            continue
        recipe = _recipe(calibration, gptq)
        t0 = time.perf_counter()
        model = compress(copy.deepcopy(original), recipe)
        seconds = time.perf_counter() - t0
        row = {
            "setting": name,
            "calibration": recipe.to_dict()["calibration"],
            "gptq": recipe.to_dict()["steps"][0],
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
        f"Model: {result['model']}; recipe `{result['recipe']}` (4-bit GPTQ g64 linears with activation order, 8-bit "
        "embedding table). Quality = fidelity to the fp32 original: mean / worst embedding cosine and top-10 retrieval "
        f"agreement (first sentences of {N_QUERIES} texts, or of a quarter of them when fewer, as queries; the other texts as passages, up to {MAX_LENGTH} tokens).",
        "",
        f"- **Standard held-out split**: `stdlib-docs` evaluation split (docstrings; never calibrated on).",
        f"- **Other kind (held out)**: `{TRANSFER_SOURCE}` evaluation split: READMEs / long descriptions of the installed "
        "Python packages (prose for people, Markdown/rST, changelogs). This kind is in no calibration setting; "
        f"the target is mean cos >= {TARGET['embedding_cosine_mean']} and top-10 >= {TARGET['retrieval_agreement_at_10']} on it.",
        f"- **Dev**: `{TRANSFER_SOURCE}` calibration split (other documents of that kind): the only set looked at to choose a setting.",
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
    parser.add_argument("--only", default=None)
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
            result["rows"] = [r for r in old["rows"] if r["setting"] not in names] + result["rows"]
        json_path.write_text(json.dumps(result, indent=2))
    (RESULTS / "calibration_transfer.md").write_text(markdown(result))
    plot(result, RESULTS / "calibration_transfer.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
