"""Benchmark every compression method on a reference causal LM (default ``ref-small``).

The foundation benchmark's causal-LM table: for each setting, compress a fresh copy of the
reference model (trained here by ``benchmarks/reference_models.py``), evaluate it against the
original on held-out text (perplexity, KL divergence of next-token distributions, top-1
agreement, bytes, latency ratio in one ``evaluate`` call), save, reload and check that the
logits are bit-exact.

    python benchmarks/reference_models.py build ref-small   # once (cached)
    python benchmarks/causal_lm_methods.py                   # writes results/causal_lm_methods_ref-small.{md,json,png}
    python benchmarks/causal_lm_methods.py --model ref-tiny --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compression_methods as cm  # noqa: E402
import reference_models as rm  # noqa: E402

from slimformer.evaluate import EvalSettings  # noqa: E402
from slimformer.models import load_model  # noqa: E402

CALIBRATION = {"n_samples": 128, "max_length": 256}
HEAD8 = {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True, "targets": ["embedding", "head"]}


def _rtn(bits, group_size):
    return {"method": "rtn", "bits": bits, "group_size": group_size, "symmetric": False}


def _gptq(bits, group_size):
    return {"method": "gptq", "bits": bits, "group_size": group_size, "act_order": True}


SETTINGS: list[tuple[str, str, list[dict]]] = [
    ("rtn w8 per-channel", "quantization", [{"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}]),
    ("rtn w8 per-channel + emb/head8", "quantization", [{"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}, HEAD8]),
    ("rtn w4 g32", "quantization", [_rtn(4, 32)]),
    ("rtn w4 g64", "quantization", [_rtn(4, 64)]),
    ("gptq w4 g32", "quantization", [_gptq(4, 32)]),
    ("gptq w4 g64", "quantization", [_gptq(4, 64)]),
    ("gptq w4 g64 + emb/head8", "quantization", [_gptq(4, 64), HEAD8]),
    ("rtn w3 g64", "quantization", [_rtn(3, 64)]),
    ("gptq w3 g64", "quantization", [_gptq(3, 64)]),
    ("rtn w2 g64", "quantization", [_rtn(2, 64)]),
    ("gptq w2 g32", "quantization", [_gptq(2, 32)]),
    ("magnitude 50%", "pruning", [{"method": "magnitude", "sparsity": 0.5}]),
    ("wanda 50%", "pruning", [{"method": "wanda", "sparsity": 0.5}]),
    ("wanda 2:4", "pruning", [{"method": "wanda", "pattern": "2:4"}]),
    ("shortgpt 1 layer", "structure", [{"method": "shortgpt", "num_layers": 1}]),
    ("shortgpt 2 layers", "structure", [{"method": "shortgpt", "num_layers": 2}]),
    ("shortgpt 1 layer + gptq w4 g64", "structure + quantization", [{"method": "shortgpt", "num_layers": 1}, _gptq(4, 64)]),
]
QUICK = ("rtn w4 g64", "gptq w4 g64", "shortgpt 1 layer")


def table_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['name']} | {r['family']} | failed: {r['error']} |" + " |" * 10
    ev = r["evaluation"]
    q, c = ev["quality"], ev["cost"]
    lin = c["compressed"]["quantized_linear_bits_per_weight"]
    cells = [
        r["name"], r["family"],
        f"{c['compressed']['bits_per_weight']:.2f}",
        "32 (float)" if lin is None else f"{lin:.2f}",
        f"{r['disk']['model_safetensors_bytes'] / 1e6:.2f}",
        f"{r['disk']['size_ratio']:.3f}",
        f"{q['perplexity']:.2f}",
        f"{q['perplexity'] / q['perplexity_original'] - 1:+.1%}",
        f"{q['kl_divergence']:.4f}",
        f"{q['top1_agreement']:.3f}",
        f"{c['speedup']:.2f}×",
        cm.kernels_text(ev["kernels"]),
        "yes" if r["round_trip"]["bit_exact"] else "**NO**",
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(meta: dict, rows: list[dict]) -> str:
    s, report, orig = meta["eval_settings"], meta["training_report"], meta.get("original") or {}
    ok = [r for r in rows if "error" not in r]
    ppl0 = ok[0]["evaluation"]["quality"]["perplexity_original"] if ok else float("nan")
    lines = [
        f"# Compression methods on the reference causal LM `{meta['model']}`",
        "",
        f"- **Model**: `{meta['model']}`, a LlamaForCausalLM trained here by `benchmarks/reference_models.py` "
        f"({report['parameters']:,} parameters, {report['spec']['num_layers']} layers, width {report['spec']['hidden_size']}, "
        f"{report['spec']['num_heads']} query heads over {report['spec']['num_kv_heads']} KV heads, tied embeddings; "
        f"held-out perplexity {report['held_out_perplexity']:.1f} at training, unigram {report['unigram_perplexity']:.1f}); "
        f"{orig.get('storage_bytes', 0) / 1e6:.2f} MB as fp32 safetensors.",
        f"- **Evaluation**: {s['n_texts']} held-out documents (evaluation split of `{s['source']}`, never trained or calibrated on), "
        f"up to {s['max_length']} tokens each; perplexity of the original on them: **{ppl0:.2f}**. KL = mean over tokens of "
        "KL(original ‖ compressed) of the next-token distributions; top-1 = share of tokens where both predict the same next token. "
        f"Latency: prefill of a fixed {s['latency_batch']}×{s['latency_tokens']}-token batch, median of {s['latency_repeats']} "
        f"after {s['latency_warmup']} warm-up, interleaved with the original in the same call; speedup = original / compressed.",
        f"- **Calibration**: {CALIBRATION['n_samples']} documents of the calibration split, up to {CALIBRATION['max_length']} tokens.",
        "- **Size** is the real `model.safetensors` written by `save_compressed`. The embedding table is tied to the output head in "
        "this model: quantizing only the linears leaves it shared in fp32; `emb/head8` quantizes the tied table once to 8 bits "
        "(row-wise), stored once and used both as the embedding (gather-dequant) and as the head (int8 kernel).",
        "- Pruned models are stored dense (size ratio 1.0). `dequant` layers are dequantized to float32 at load.",
        f"- Machine: {meta['machine']['cpu_count']} CPU cores, torch {meta['versions']['torch']}; run {meta['started']} (UTC), "
        f"{meta['total_seconds'] / 60:.1f} minutes" + (" — quick smoke test." if meta["quick"] else "."),
        "",
        "| setting | family | bits/weight | linear bits/weight | size MB | size ratio | perplexity | Δ perplexity | KL | top-1 agreement | speedup | execution | round trip bit-exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if orig:
        lines.append(f"| fp32 original | – | 32.00 | 32 (float) | {orig['storage_bytes'] / 1e6:.2f} | 1.000 | {ppl0:.2f} | – | 0 | 1.000 | 1.00× | float | – |")
    lines += [table_row(r) for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(10, 6.5))
    for r in ok:
        q = r["evaluation"]["quality"]
        ax.scatter([r["disk"]["size_ratio"]], [q["perplexity"]], c=cm.FAMILY_COLORS.get(r["family"], "tab:gray"), s=36, zorder=3)
    if ok:
        ppl0 = ok[0]["evaluation"]["quality"]["perplexity_original"]
        ax.scatter([1.0], [ppl0], marker="*", s=220, c="tab:red", zorder=4, label="fp32 original")
        ax.set_yscale("log")
    ax.figure.tight_layout()
    cm._place_labels(ax, [(r["disk"]["size_ratio"], r["evaluation"]["quality"]["perplexity"], r["name"]) for r in ok], 6.5)
    for fam, color in cm.FAMILY_COLORS.items():
        ax.scatter([], [], c=color, label=fam)
    ax.set_xlabel("size on disk / fp32 original")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"{model}: perplexity against size, one point per setting")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    cm._atomic_write(path, lambda p: fig.savefig(p, dpi=130, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ref-small", choices=sorted(rm.SPECS))
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK}, smaller evaluation; writes *_quick.*")
    parser.add_argument("--out-dir", type=Path, default=cm.RESULTS_DIR)
    args = parser.parse_args(argv)
    import transformers

    folder = rm.model_dir(args.model)
    if not (folder / "training_report.json").is_file():
        print(f"error: {args.model} is not built; run 'python benchmarks/reference_models.py build {args.model}' first", file=sys.stderr)
        return 2
    stem = f"causal_lm_methods_{args.model}" + ("_quick" if args.quick else "")
    settings = EvalSettings(n_texts=64, n_queries=8, latency_repeats=3) if args.quick else EvalSettings(n_texts=320, latency_batch=16)
    chosen = [s for s in SETTINGS if not args.quick or s[0] in QUICK]
    start = time.perf_counter()
    original = load_model(folder)
    rt_batch = cm.round_trip_batch(original.tokenizer)
    meta = {
        "model": args.model, "quick": args.quick,
        "started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "eval_settings": dataclasses.asdict(settings), "calibration": CALIBRATION,
        "training_report": {k: v for k, v in json.loads((folder / "training_report.json").read_text()).items() if k != "loss_curve_every_10_steps"},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "original": None, "total_seconds": 0.0,
    }
    rows = []
    for i, (name, family, steps) in enumerate(chosen, 1):
        try:
            r = cm.run_setting(original, name, family, steps, settings, rt_batch, calibration=CALIBRATION)
        except Exception as exc:
            traceback.print_exc()
            r = {"name": name, "family": family, "steps": steps, "error": f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")}
            cm.log(f"[{i}/{len(chosen)}] {name}: FAILED")
        else:
            if meta["original"] is None:
                meta["original"] = {k: r["evaluation"]["cost"]["original"][k] for k in ("storage_bytes", "parameters", "latency_s")}
            q = r["evaluation"]["quality"]
            cm.log(f"[{i}/{len(chosen)}] {name}: ppl {q['perplexity']:.2f} (orig {q['perplexity_original']:.2f}), KL {q['kl_divergence']:.4f}, "
                   f"top-1 {q['top1_agreement']:.3f}, size {r['disk']['size_ratio']:.3f}, speedup {r['evaluation']['cost']['speedup']:.2f}x")
        rows.append(r)
    meta["total_seconds"] = time.perf_counter() - start
    cm.write_text_atomic(args.out_dir / f"{stem}.md", markdown(meta, rows))
    cm.write_text_atomic(args.out_dir / f"{stem}.json", json.dumps({"meta": meta, "results": rows}, indent=2, default=str) + "\n")
    plot(rows, args.out_dir / f"{stem}.png", args.model)
    cm.log(f"wrote {args.out_dir}/{stem}.{{md,json,png}}")
    return 1 if any("error" in r or not r["round_trip"]["bit_exact"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
