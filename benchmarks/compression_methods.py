"""Benchmark every compression method at several settings on the real all-MiniLM-L6-v2.

For each setting: compress a fresh copy of the embedded default model, evaluate it against the
fp32 original on the held-out evaluation split (quality, size, latency measured in one
``evaluate`` call), save it with ``save_compressed`` into a temporary folder, measure the real
bytes of ``model.safetensors``, load the folder back and check that its ``last_hidden_state`` on
a small batch equals the in-memory compressed model's bit for bit.

Writes ``benchmarks/results/compression_methods.{md,json,png}`` (``--quick``: a 3-setting smoke
test with a smaller evaluation, written to ``compression_methods_quick.{md,json,png}`` so it
never overwrites the full table).

    python benchmarks/compression_methods.py            # full run (10-20 minutes on 2 busy cores)
    python benchmarks/compression_methods.py --quick    # smoke test (1-3 minutes)
    python benchmarks/compression_methods.py --replot   # redo .md/.png from the .json only
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from slimformer.compress import compress
from slimformer.data import TextSpec, load_texts
from slimformer.evaluate import EvalSettings, evaluate
from slimformer.io import load_compressed, save_compressed
from slimformer.models import load_model
from slimformer.recipe import Recipe

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL_LABEL = "sentence-transformers/all-MiniLM-L6-v2 (embedded default model)"
CALIBRATION = {"n_samples": 128}

EMB8 = {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True, "targets": ["embedding"]}


def _rtn(bits: int, group_size: int | None) -> dict:
    return {"method": "rtn", "bits": bits, "group_size": group_size, "symmetric": False, "targets": ["linear"]}


def _gptq(bits: int, group_size: int | None) -> dict:
    return {"method": "gptq", "bits": bits, "group_size": group_size, "act_order": True}


# (name, family, steps): one table row each, in this order.
SETTINGS: list[tuple[str, str, list[dict]]] = [
    ("rtn w8 per-channel + emb8", "quantization",
     [{"method": "rtn", "bits": 8, "group_size": None, "symmetric": True, "targets": ["linear", "embedding"]}]),
    ("rtn w4 g128 + emb8", "quantization", [_rtn(4, 128), EMB8]),
    ("rtn w4 g64 + emb8", "quantization", [_rtn(4, 64), EMB8]),
    ("gptq w4 g128 + emb8", "quantization", [_gptq(4, 128), EMB8]),
    ("gptq w4 g64 + emb8", "quantization", [_gptq(4, 64), EMB8]),
    ("gptq w4 g32 + emb8", "quantization", [_gptq(4, 32), EMB8]),
    ("rtn w3 g64 + emb8", "quantization", [_rtn(3, 64), EMB8]),
    ("gptq w3 g64 + emb8", "quantization", [_gptq(3, 64), EMB8]),
    ("rtn w2 g64 + emb8", "quantization", [_rtn(2, 64), EMB8]),
    ("gptq w2 g32 + emb8", "quantization", [_gptq(2, 32), EMB8]),
    ("magnitude 50%", "pruning", [{"method": "magnitude", "sparsity": 0.5}]),
    ("wanda 50%", "pruning", [{"method": "wanda", "sparsity": 0.5}]),
    ("magnitude 2:4", "pruning", [{"method": "magnitude", "pattern": "2:4"}]),
    ("wanda 2:4", "pruning", [{"method": "wanda", "pattern": "2:4"}]),
    ("wanda 4:8", "pruning", [{"method": "wanda", "pattern": "4:8"}]),
    ("shortgpt 1 layer", "structure", [{"method": "shortgpt", "num_layers": 1}]),
    ("shortgpt 2 layers", "structure", [{"method": "shortgpt", "num_layers": 2}]),
    ("shortgpt 1 layer + gptq w4 g64 + emb8", "structure + quantization",
     [{"method": "shortgpt", "num_layers": 1}, _gptq(4, 64), EMB8]),
]
QUICK_SETTINGS = ("rtn w8 per-channel + emb8", "wanda 2:4", "shortgpt 1 layer + gptq w4 g64 + emb8")

FAMILY_COLORS = {
    "quantization": "tab:blue",
    "pruning": "tab:orange",
    "structure": "tab:green",
    "structure + quantization": "tab:purple",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then ``os.replace`` it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    _atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# One setting
# --------------------------------------------------------------------------------------------


def round_trip_batch(tokenizer) -> dict:
    """A small fixed batch of held-out texts (4 x up to 64 tokens, padded) for the round trip."""
    texts = load_texts(TextSpec(source="stdlib-docs", split="evaluation", n=4, seed=1234))
    batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    return batch


@torch.no_grad()
def hidden(loaded, batch: dict) -> torch.Tensor:
    """The model's output on ``batch``: last hidden state (encoders) or logits (causal LMs)."""
    if loaded.kind == "causal-lm":
        return loaded.model(**batch, use_cache=False).logits
    return loaded.model(**batch).last_hidden_state


def run_setting(original, name: str, family: str, steps: list[dict], settings: EvalSettings, rt_batch: dict,
                calibration: dict | None = None, cache: dict | None = None) -> dict:
    recipe = Recipe.from_dict(
        {"slimformer_recipe": 1, "name": slug(name), "steps": steps, "calibration": dict(calibration or CALIBRATION)},
        origin=f"setting {name!r}",
    )
    model = copy.deepcopy(original)
    t0 = time.perf_counter()
    compress(model, recipe)
    compress_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = evaluate(original, model, settings, cache=cache)
    eval_s = time.perf_counter() - t0

    original_bytes = result["cost"]["original"]["storage_bytes"]
    with tempfile.TemporaryDirectory(prefix="slimformer-bench-") as tmp:
        folder = Path(tmp) / "model"
        save_compressed(model, folder, evaluation=result)
        disk_bytes = (folder / "model.safetensors").stat().st_size
        folder_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        again = load_compressed(folder)
        h_mem = hidden(model, rt_batch)
        h_disk = hidden(again, rt_batch)
        bit_exact = bool(h_mem.shape == h_disk.shape and torch.equal(h_mem, h_disk))
        max_abs_diff = float((h_mem - h_disk).abs().max()) if h_mem.shape == h_disk.shape else float("inf")
        loaded_layers = again.config.num_hidden_layers
        del again

    applied = []
    for rec in model.applied:
        entry = {"step": rec.get("step"), "seconds": rec.get("seconds")}
        if "sparsity" in rec:
            sp = list(rec["sparsity"].values())
            entry["mean_layer_sparsity"] = sum(sp) / len(sp) if sp else None
        for key in ("dropped_layers", "block_influence", "layers_before", "layers_after"):
            if key in rec:
                entry[key] = rec[key]
        if "modules" in rec:
            entry["n_modules"] = len(rec["modules"])
        applied.append(entry)

    return {
        "name": name,
        "family": family,
        "recipe": recipe.to_dict(),
        "compress_seconds": compress_s,
        "evaluate_seconds": eval_s,
        "applied": applied,
        "disk": {
            "model_safetensors_bytes": disk_bytes,
            "folder_bytes": folder_bytes,
            "original_storage_bytes": original_bytes,
            "size_ratio": disk_bytes / original_bytes,
        },
        "round_trip": {"bit_exact": bit_exact, "max_abs_diff": max_abs_diff, "batch_shape": list(rt_batch["input_ids"].shape),
                       "num_hidden_layers_loaded": loaded_layers},
        "evaluation": result,
    }


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def _f(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def kernels_text(kernels: dict) -> str:
    return ", ".join(f"{k}×{v}" for k, v in sorted(kernels.items())) or "float"


def table_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['name']} | {r['family']} | failed: {r['error']} |" + " |" * 11
    ev = r["evaluation"]
    q, c = ev["quality"], ev["cost"]
    lin = c["compressed"]["quantized_linear_bits_per_weight"]
    cells = [
        r["name"],
        r["family"],
        _f(c["compressed"]["bits_per_weight"], ".2f"),
        "32 (float)" if lin is None else f"{lin:.2f}",
        f"{r['disk']['model_safetensors_bytes'] / 1e6:.2f}",
        f"{r['disk']['size_ratio']:.3f}",
        f"{q['embedding_cosine_mean']:.4f}",
        f"{q['embedding_cosine_min']:.4f}",
        f"{q['retrieval_agreement_at_10']:.3f}",
        f"{c['speedup']:.2f}×",
        kernels_text(ev["kernels"]),
        "yes" if r["round_trip"]["bit_exact"] else f"**NO** (max diff {r['round_trip']['max_abs_diff']:.2e})",
        f"{r['compress_seconds']:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(meta: dict, rows: list[dict]) -> str:
    s = meta["eval_settings"]
    orig = meta.get("original") or {}
    lines = [
        "# Compression methods on all-MiniLM-L6-v2",
        "",
        f"- **Model**: {MODEL_LABEL}, {orig.get('parameters', '?'):,} weights, "
        f"{orig.get('storage_bytes', 0) / 1e6:.2f} MB as fp32 safetensors.",
        f"- **Machine**: {meta['machine']['cpu_count']} CPU cores ({meta['machine']['cpu_model']}), "
        f"torch {meta['versions']['torch']} with {meta['machine']['torch_threads']} threads"
        f"{' (' + meta['machine']['torch_cpu_capability'] + ' kernels)' if meta['machine'].get('torch_cpu_capability') else ''}, "
        f"transformers {meta['versions']['transformers']}, Python {meta['versions']['python']}.",
        f"- **Evaluation**: held-out split of the Python standard library docstrings (`{s['source']}`, never used for "
        f"calibration), {s['n_texts']} texts of up to {s['max_length']} tokens, the first {s['n_queries']} turned into "
        f"queries (first sentence) for top-10 retrieval agreement; cosine is between L2-normalised mean-pooled embeddings "
        f"of the compressed and the fp32 model (mean and worst over all texts). Latency: a fixed batch of "
        f"{s['latency_batch']}×{s['latency_tokens']} tokens, median of {s['latency_repeats']} runs after "
        f"{s['latency_warmup']} warm-up runs, original and compressed interleaved in the same `evaluate` call; "
        f"speedup = original latency / compressed latency.",
        f"- **Calibration** (GPTQ, Wanda, ShortGPT): {CALIBRATION['n_samples']} documents of the calibration split, "
        f"up to 128 tokens each.",
        "- **Size on disk** is the real size of `model.safetensors` written by `save_compressed` (MB = 10^6 bytes); "
        "size ratio = that / the fp32 model's safetensors bytes. Bits/weight = 8 × stored bytes / logical weights "
        "(whole model, embeddings and LayerNorms included); linear bits/weight counts the quantized linear layers only "
        "(codes + bfloat16 scales + zero points).",
        "- **Pruned models are stored dense** (zeros included), so their size ratio is 1.0: slimformer has no sparse "
        "storage format (and no sparse kernel) yet.",
        "- **Execution paths**: `int8pack` / `int4pack` = packed weights run through PyTorch's CPU low-bit matmul "
        "kernels (bfloat16 activations); `dequant` = no kernel for that width/layout, the layer is dequantized to "
        "float32 at load (smaller on disk only, not in memory); `gather-dequant` = embedding rows dequantized as "
        "they are looked up; `float` = ordinary float32 layers.",
        "- **Round-trip bit-exact**: the folder was loaded back with `load_compressed` and its `last_hidden_state` on "
        "a 4-text batch compared with the in-memory compressed model's with `torch.equal`.",
    ]
    lat = [r["evaluation"]["cost"]["original"]["latency_s"] for r in rows if "error" not in r]
    if lat and max(lat) / min(lat) > 1.3:
        lines.append(
            f"- **Latency noise**: the machine's speed drifted during the run — the fp32 original's median latency on the "
            f"same batch ranged from {min(lat):.2f} s to {max(lat):.2f} s between settings ({max(lat) / min(lat):.1f}×). "
            "Original and compressed are interleaved, but a drift inside one `evaluate` call still skews its speedup by "
            "tens of percent, so the speedup column is indicative only (the per-setting latencies are in the JSON); "
            "compress seconds drift alike."
        )
    lines += [
        f"- Run {meta['started']} (UTC), {meta['total_seconds'] / 60:.1f} minutes in all"
        + (" — **quick smoke test** (reduced evaluation, 3 settings)." if meta["quick"] else "."),
        "",
        "| setting | method family | bits/weight | linear bits/weight | size on disk (MB) | size ratio | cos mean | cos worst "
        "| top-10 agreement | speedup | execution paths | round-trip bit-exact | compress s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if orig:
        lines.append(
            f"| fp32 original (reference) | – | {8 * orig['storage_bytes'] / orig['parameters']:.2f} | 32 (float) | "
            f"{orig['storage_bytes'] / 1e6:.2f} | 1.000 | 1.0000 | 1.0000 | 1.000 | 1.00× | float | – | – |"
        )
    lines += [table_row(r) for r in rows]
    return "\n".join(lines) + "\n"


def _place_labels(ax, points: list[tuple[float, float, str]], fontsize: float) -> None:
    """Label each point just right of it, pushing labels down (in display space) until no two
    labels overlap; a moved label gets a thin leader line to its point."""
    fig = ax.figure
    to_pt = 72.0 / fig.dpi
    line_h = fontsize * 1.35
    placed: list[tuple[float, float, float]] = []  # (x_left, y, width) in points
    for x, y, text in sorted(points, key=lambda p: -p[1]):
        px, py = (v * to_pt for v in ax.transData.transform((x, y)))
        width = 0.56 * fontsize * len(text)
        ly = py
        while any(abs(ly - oy) < line_h and px < ox + ow + 4 and ox < px + width + 4 for ox, oy, ow in placed):
            ly -= line_h / 2
        placed.append((px, ly, width))
        moved = abs(ly - py) > 1.5
        ax.annotate(
            text, (x, y), textcoords="offset points", xytext=(5, ly - py - fontsize * 0.35), fontsize=fontsize,
            arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5", "shrinkA": 0, "shrinkB": 2} if moved else None,
        )


def plot(rows: list[dict], path: Path, quick: bool) -> None:
    """Mean embedding cosine against size ratio, one point per setting, coloured by family; the
    right panel zooms into the crowded low-bit quantization corner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    ok = [r for r in rows if "error" not in r]
    pts = [(r["disk"]["size_ratio"], r["evaluation"]["quality"]["embedding_cosine_mean"], r["name"], r["family"]) for r in ok]
    # Zoom box: the quantized points (size ratio < 0.5) with high cosine, if there are several.
    zoom = [p for p in pts if p[0] < 0.5 and p[1] >= 0.9]
    box = None
    if len(zoom) >= 3:
        x0, x1 = min(p[0] for p in zoom), max(p[0] for p in zoom)
        y0 = min(p[1] for p in zoom)
        pad = 0.1 * (x1 - x0) + 0.005
        box = (x0 - pad, x1 + 4 * pad, y0 - 0.01, 1.004)
    fig, axes = plt.subplots(1, 2 if box else 1, figsize=(16 if box else 11, 7), squeeze=False,
                             gridspec_kw={"width_ratios": [1.25, 1]} if box else None)
    title = "all-MiniLM-L6-v2: quality against size, one point per setting" + (" (quick smoke test)" if quick else "")
    ys = [p[1] for p in pts] + [1.0]
    for k, ax in enumerate(axes[0]):
        in_zoom = k == 1
        seen: set[str] = set()
        for x, y, _name, fam in pts:
            ax.scatter([x], [y], c=FAMILY_COLORS.get(fam, "tab:gray"), s=36, zorder=3, label=None if fam in seen else fam)
            seen.add(fam)
        ax.scatter([1.0], [1.0], marker="*", s=220, c="tab:red", zorder=4, label="fp32 original (1.0, 1.0)")
        if in_zoom:
            ax.set_xlim(box[0], box[1])
            ax.set_ylim(box[2], box[3])
            ax.set_title("zoom: quantized settings with cosine ≥ 0.9", fontsize=10)
        else:
            ax.set_xlim(0, 1.15)
            ax.set_ylim(min(ys) - 0.03, 1.015)
            ax.set_title(title, fontsize=10)
            if box:
                ax.add_patch(Rectangle((box[0], box[2]), box[1] - box[0], box[3] - box[2], fill=False, ls="--", lw=0.8, ec="0.4", zorder=2))
        ax.set_xlabel("size on disk / fp32 original (model.safetensors bytes)")
        ax.set_ylabel("mean embedding cosine to the fp32 original (held-out)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    for k, ax in enumerate(axes[0]):
        if k == 0 and box:
            labels = [(x, y, n) for x, y, n, _ in pts if not (box[0] <= x <= box[1] and box[2] <= y <= box[3])]
        else:
            labels = [(x, y, n) for x, y, n, _ in pts if (k == 0 or (box[0] <= x <= box[1] and box[2] <= y <= box[3]))]
        _place_labels(ax, labels, 7 if k == 1 else 6.5)
    axes[0][-1].legend(loc="lower right", fontsize=8)
    _atomic_write(path, lambda p: fig.savefig(p, dpi=130, format="png"))
    plt.close(fig)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_outputs(out_dir: Path, stem: str, meta: dict, rows: list[dict], quick: bool) -> None:
    write_text_atomic(out_dir / f"{stem}.md", markdown(meta, rows))
    write_text_atomic(out_dir / f"{stem}.json", json.dumps({"meta": meta, "results": rows}, indent=2, default=str) + "\n")
    plot(rows, out_dir / f"{stem}.png", quick)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 3 settings, smaller evaluation; writes compression_methods_quick.*")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help=f"where to write the results (default {RESULTS_DIR})")
    parser.add_argument("--replot", action="store_true",
                        help="rewrite the .md and .png from the existing .json without running anything")
    args = parser.parse_args(argv)
    stem = "compression_methods_quick" if args.quick else "compression_methods"
    if args.replot:
        data = json.loads((args.out_dir / f"{stem}.json").read_text())
        write_text_atomic(args.out_dir / f"{stem}.md", markdown(data["meta"], data["results"]))
        plot(data["results"], args.out_dir / f"{stem}.png", args.quick)
        log(f"rewrote {args.out_dir}/{stem}.{{md,png}} from {stem}.json")
        return 0

    import transformers

    start = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    if args.quick:
        settings = EvalSettings(n_texts=80, n_queries=16, latency_repeats=3)
        chosen = [s for s in SETTINGS if s[0] in QUICK_SETTINGS]
    else:
        settings = EvalSettings()
        chosen = list(SETTINGS)

    log(f"loading the embedded all-MiniLM-L6-v2 (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    original = load_model()
    assert original.kind == "encoder", original.kind
    # Warm the text caches (parsing the stdlib docstrings) so no compress time includes it.
    load_texts(TextSpec(source="stdlib-docs", split="calibration", n=CALIBRATION["n_samples"], seed=0))
    rt_batch = round_trip_batch(original.tokenizer)

    import dataclasses

    meta = {
        "model": MODEL_LABEL,
        "quick": args.quick,
        "started": started,
        "eval_settings": dataclasses.asdict(settings),
        "calibration": dict(CALIBRATION),
        "machine": {"cpu_count": os.cpu_count(), "cpu_model": _cpu_model(), "torch_threads": torch.get_num_threads(),
                    "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "original": None,
        "total_seconds": 0.0,
    }

    rows: list[dict] = []
    cache: dict = {}
    for i, (name, family, steps) in enumerate(chosen, 1):
        t0 = time.perf_counter()
        try:
            r = run_setting(original, name, family, steps, settings, rt_batch, cache=cache)
        except Exception as exc:  # keep going: one broken setting must not lose the others
            traceback.print_exc()
            r = {"name": name, "family": family, "steps": steps, "error": f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")}
            log(f"[{i}/{len(chosen)}] {name}: FAILED ({r['error']})")
        else:
            if meta["original"] is None:
                o = r["evaluation"]["cost"]["original"]
                meta["original"] = {"storage_bytes": o["storage_bytes"], "parameters": o["parameters"],
                                    "resident_bytes": o["resident_bytes"], "latency_s": o["latency_s"]}
            q, c = r["evaluation"]["quality"], r["evaluation"]["cost"]
            log(
                f"[{i}/{len(chosen)}] {name}: cos {q['embedding_cosine_mean']:.4f} (worst {q['embedding_cosine_min']:.4f}), "
                f"top-10 {q['retrieval_agreement_at_10']:.3f}, size {r['disk']['size_ratio']:.3f}, "
                f"{c['compressed']['bits_per_weight']:.2f} bits/weight, speedup {c['speedup']:.2f}x, "
                f"{kernels_text(r['evaluation']['kernels'])}, round trip {'bit-exact' if r['round_trip']['bit_exact'] else 'NOT bit-exact'}, "
                f"compress {r['compress_seconds']:.1f}s, total {time.perf_counter() - t0:.1f}s"
            )
        rows.append(r)

    meta["total_seconds"] = time.perf_counter() - start
    write_outputs(args.out_dir, stem, meta, rows, args.quick)
    log(f"wrote {args.out_dir}/{stem}.{{md,json,png}} in {meta['total_seconds'] / 60:.1f} minutes")
    failed = [r["name"] for r in rows if "error" in r]
    inexact = [r["name"] for r in rows if "error" not in r and not r["round_trip"]["bit_exact"]]
    if failed:
        log(f"FAILED settings: {failed}")
    if inexact:
        log(f"round trip NOT bit-exact: {inexact}")
    return 1 if failed or inexact else 0


if __name__ == "__main__":
    sys.exit(main())
