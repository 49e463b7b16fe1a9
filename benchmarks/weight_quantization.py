"""Weight quantization side by side: slimformer's methods and the peer tools, in one process.

On the embedded all-MiniLM-L6-v2 (encoder) and on a reference causal LM (``--model ref-small``),
at 8, 4, 3 and 2 bits (and the 3.5 / 2.5 bits-per-weight budgets of mixed precision), every
setting is built from a fresh copy of the fp32 model and measured with the same functions on
the same held-out texts: quality against fp32 (encoders: mean/worst embedding cosine and
top-10 neighbour agreement; causal LMs: perplexity, KL, top-1 agreement), size as a fraction
of the fp32 safetensors file (ours: the real ``model.safetensors`` written by
``save_compressed``; peers: what the tool itself saves), stored bits per weight of the linear
layers, and the speed ratio fp32 latency / variant latency on a fixed 32x128 batch, measured
interleaved with the fp32 model in the same run (median of several runs). Our rows are also
saved, loaded back and checked bit-exact; their per-layer execution path is listed.

Peers come from ``benchmarks/peers.py`` (install them with
``pip install -c constraints.txt -e '.[peers]'``); a peer that cannot run here is listed with
the reason. Writes ``benchmarks/results/weight_quantization_<model>.{md,json,png}``.

    python benchmarks/weight_quantization.py                    # MiniLM, ours + peers
    python benchmarks/weight_quantization.py --model ref-small  # reference causal LM
    python benchmarks/weight_quantization.py --quick            # small smoke run (_quick files)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compression_methods as cm  # noqa: E402
import peers as peer_tools  # noqa: E402

from slimformer.evaluate import EvalSettings  # noqa: E402
from slimformer.models import load_model  # noqa: E402
from slimformer.runtime.machine import describe_machine, machine_line  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"

EMB8 = {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True, "targets": ["embedding"]}
W8_ALL = {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True, "targets": ["linear", "embedding"]}
BF16 = {"method": "cast", "dtype": "bfloat16"}
MLP_DOWN = "*.layer.*[0-9].output.dense"  # BERT's MLP output projection (not attention.output.dense)


def _q(method: str, bits: int, group_size: int | None, **extra) -> dict:
    return {"method": method, "bits": bits, "group_size": group_size, **extra}


# (name, nominal bits, steps). Encoders keep the embedding table at 8 bits (row-wise) in every
# low-bit row, so "size" is the whole model; the linears' bits/weight is its own column.
ENCODER_SETTINGS: list[tuple[str, float, list[dict]]] = [
    ("rtn w8 + emb8 (weight-only)", 8, [W8_ALL]),
    ("rtn w8 + emb8, bf16 activations", 8, [W8_ALL, BF16]),
    ("smoothquant W8A8 + emb8 + bf16", 8, [{"method": "smoothquant"}, EMB8, BF16]),
    ("smoothquant W8A8 (MLP down W8A16) + emb8 + bf16", 8,
     [{"method": "smoothquant", "exclude": [MLP_DOWN]}, W8_ALL, BF16]),
    ("rtn w4 g64 + emb8", 4, [_q("rtn", 4, 64), EMB8]),
    ("hqq w4 g64 + emb8", 4, [_q("hqq", 4, 64), EMB8]),
    ("nf4 g64 + emb8", 4, [{"method": "nf4", "group_size": 64}, EMB8]),
    ("awq w4 g64 + emb8", 4, [_q("awq", 4, 64), EMB8]),
    ("gptq w4 g64 + emb8", 4, [_q("gptq", 4, 64), EMB8]),
    ("gptq w4 g64 + emb8 + bf16", 4, [_q("gptq", 4, 64), EMB8, BF16]),
    ("mixed precision 3.5 b/w (gptq) + emb8", 3.5, [{"method": "mixed-precision", "target_bits": 3.5}, EMB8]),
    ("awq w3 g64 + emb8", 3, [_q("awq", 3, 64), EMB8]),
    ("gptq w3 g64 + emb8", 3, [_q("gptq", 3, 64), EMB8]),
    ("mixed precision 2.5 b/w (gptq g128) + emb8", 2.5,
     [{"method": "mixed-precision", "target_bits": 2.5, "group_size": 128}, EMB8]),
    ("gptq w2 g64 + emb8", 2, [_q("gptq", 2, 64), EMB8]),
    ("vptq d4 k256 (2 b/w) + emb8", 2, [{"method": "vptq", "vector_dim": 4, "codebook_size": 256}, EMB8]),
]

CAUSAL_SETTINGS: list[tuple[str, float, list[dict]]] = [
    ("rtn w8", 8, [_q("rtn", 8, None, symmetric=True)]),
    ("smoothquant W8A8", 8, [{"method": "smoothquant"}]),
    ("rtn w4 g64", 4, [_q("rtn", 4, 64)]),
    ("hqq w4 g64", 4, [_q("hqq", 4, 64)]),
    ("nf4 g64", 4, [{"method": "nf4", "group_size": 64}]),
    ("awq w4 g64", 4, [_q("awq", 4, 64)]),
    ("gptq w4 g64", 4, [_q("gptq", 4, 64)]),
    ("mixed precision 3.5 b/w (gptq)", 3.5, [{"method": "mixed-precision", "target_bits": 3.5}]),
    ("awq w3 g64", 3, [_q("awq", 3, 64)]),
    ("gptq w3 g64", 3, [_q("gptq", 3, 64)]),
    ("mixed precision 2.5 b/w (gptq)", 2.5, [{"method": "mixed-precision", "target_bits": 2.5}]),
    ("gptq w2 g64", 2, [_q("gptq", 2, 64)]),
    ("gptq w2 g32", 2, [_q("gptq", 2, 32)]),
]

QUICK = {"rtn w8 + emb8 (weight-only)", "gptq w4 g64 + emb8", "rtn w4 g64", "gptq w4 g64"}
QUICK_PEERS = ("hqq 4-bit", "torchao int4")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def our_row(original, name: str, bits: float, steps: list[dict], settings: EvalSettings, rt_batch: dict, cache: dict) -> dict:
    """Compress, evaluate, save, reload and check one of our settings; a table row."""
    r = cm.run_setting(original, name, "quantization", steps, settings, rt_batch, cache=cache)
    ev = r["evaluation"]
    kernels: dict[str, int] = {}
    for rec in ev.get("applied", []) or []:
        for k in (rec.get("kernels") or {}).values():
            kernels[k] = kernels.get(k, 0) + 1
    return {
        "name": name, "tool": "slimformer", "version": None, "bits": bits,
        "quality": ev["quality"],
        "size_fraction": r["disk"]["size_ratio"],
        "size_bytes": r["disk"]["model_safetensors_bytes"],
        "linear_bits": ev["cost"]["compressed"].get("quantized_linear_bits_per_weight"),
        "speedup": ev["cost"]["speedup"],
        "latency_s": ev["cost"]["compressed"]["latency_s"],
        "latency_original_s": ev["cost"]["original"]["latency_s"],
        "activations": (ev.get("execution") or {}).get("activations"),
        "kernels": ev.get("kernels") or kernels,
        "bit_exact_round_trip": r["round_trip"]["bit_exact"],
        "build_seconds": r["compress_seconds"],
        "recipe": r["recipe"],
    }


def _latency_flops(original, settings: EvalSettings) -> float:
    """Encoder block FLOPs (multiply-adds x2) of the full-length latency batch."""
    c = original.model.config
    t, n = settings.latency_tokens, settings.latency_batch
    d, f = c.hidden_size, c.intermediate_size
    return float(c.num_hidden_layers * n * (2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d))


def _f(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def markdown(meta: dict, rows: list[dict]) -> str:
    kind = meta["kind"]
    lines = [f"# Weight quantization side by side: {meta['model']}", "",
             f"Measured {meta['date']} on {meta['cpu']} ({meta['threads']} threads), torch {meta['torch']}. "
             f"Quality on {meta['n_texts']} held-out texts (never used for calibration); speed = fp32 latency / variant latency "
             f"on a {meta['latency_batch']} batch, interleaved in the same run, median of {meta['repeats']}. Ours: size = the saved "
             "model.safetensors / fp32 file; every row saved, reloaded and compared bit for bit. Peers: size = what the tool saves."]
    if meta.get("machine"):
        mach = meta["machine"]
        lines += ["", f"Machine: {machine_line(mach)}. Our rows run the execution planner's paths for this machine (memory: balanced); "
                  f"'execution' lists them (decode|batch where they differ) and the activation dtype it chose; GFLOP/s = encoder FLOPs of "
                  f"the latency batch / latency, against the ceilings above."]
    if meta.get("merged"):
        m = meta["merged"]
        lines += ["", f"Rows re-run on {m['date']} in a separate run (each still against fp32 in that run): {', '.join(m['rows'])}."]
        if m.get("machine"):
            lines += ["", f"That run's machine: {machine_line(m['machine'])}. Its rows run the execution planner's paths for that machine "
                      "(memory: balanced; 'execution' lists them, decode|batch where they differ, and the activation dtype); GFLOP/s = "
                      "encoder FLOPs of the latency batch / latency. The other rows come from the first run's machine."]
    lines += [""]
    if kind == "encoder":
        head = "| bits | setting | tool | size | linear bits/w | cos mean | cos worst | top-10 | speed | execution / note |"
    else:
        head = "| bits | setting | tool | size | linear bits/w | ppl (fp32) | Δppl | KL | top-1 | speed | execution / note |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (-r["bits"], r["tool"] != "slimformer")):
        tool = "**slimformer**" if r["tool"] == "slimformer" else f"{r['tool']} {r.get('version') or ''}"
        if "quality" not in r:
            reason = r.get("skipped") or r.get("error") or "not run"
            n = 7 if kind == "encoder" else 8
            lines.append(f"| {r['bits']:g} | {r['name']} | {tool} |" + " – |" * n + f" {reason} |")
            continue
        q = r["quality"]
        if r["tool"] == "slimformer":
            note = ", ".join(f"{k} ×{v}" for k, v in sorted(r.get("kernels", {}).items()))
            if r.get("activations"):
                note += f"; {r['activations']} activations"
            if r.get("latency_s") and meta.get("latency_flops"):
                note += f"; {meta['latency_flops'] / r['latency_s'] / 1e9:.1f} GFLOP/s (fp32 {meta['latency_flops'] / r['latency_original_s'] / 1e9:.1f})"
            if not r.get("bit_exact_round_trip", True):
                note += " (ROUND TRIP NOT BIT-EXACT)"
        else:
            note = r.get("notes", "")
        if kind == "encoder":
            qc = [_f(q["embedding_cosine_mean"], ".4f"), _f(q["embedding_cosine_min"], ".4f"), _f(q["retrieval_agreement_at_10"], ".3f")]
        else:
            inc = q["perplexity"] / q["perplexity_original"] - 1
            qc = [f"{q['perplexity']:.2f} ({q['perplexity_original']:.2f})", f"{100 * inc:+.2f}%", _f(q["kl_divergence"], ".4f"), _f(q["top1_agreement"], ".3f")]
        lines.append(f"| {r['bits']:g} | {r['name']} | {tool} | {_f(r['size_fraction'], '.3f')} | {_f(r['linear_bits'], '.2f')} | "
                     + " | ".join(qc) + f" | {r['speedup']:.2f}× | {note} |")
    lines += ["", *verdicts(kind, rows)]
    return "\n".join(lines) + "\n"


def verdicts(kind: str, rows: list[dict]) -> list[str]:
    """The issue's targets, checked on this run's rows."""
    ok = [r for r in rows if "quality" in r]
    ours = [r for r in ok if r["tool"] == "slimformer"]
    peers = [r for r in ok if r["tool"] != "slimformer"]
    out = ["## Targets", ""]
    if kind == "encoder":
        def best(cands, key="embedding_cosine_mean"):
            return max(cands, key=lambda r: r["quality"][key], default=None)

        c = best([r for r in ours if r["size_fraction"] <= 0.21])
        if c:
            q = c["quality"]
            out.append(f"- size <= 0.21: best {c['name']}: size {c['size_fraction']:.3f}, cos {q['embedding_cosine_mean']:.4f} (>= 0.985), "
                       f"top-10 {q['retrieval_agreement_at_10']:.3f} (>= 0.88): {'MET' if q['embedding_cosine_mean'] >= 0.985 and q['retrieval_agreement_at_10'] >= 0.88 else 'NOT MET'}")
        for budget, need in ((3.5, 0.95), (2.5, 0.85)):
            c = best([r for r in ours if r["linear_bits"] is not None and r["linear_bits"] <= budget])
            if c:
                v = c["quality"]["embedding_cosine_mean"]
                out.append(f"- linears <= {budget} bits/weight: best {c['name']} ({c['linear_bits']:.3f} b/w): cos {v:.4f} (>= {need}): {'MET' if v >= need else 'NOT MET'}")
        eight = [r for r in ours if r["bits"] == 8 and r["size_fraction"] <= 0.26 and r["quality"]["embedding_cosine_mean"] >= 0.9995]
        c = max(eight, key=lambda r: r["speedup"], default=None)
        if c:
            out.append(f"- 8-bit, size <= 0.26, cos >= 0.9995: fastest {c['name']}: cos {c['quality']['embedding_cosine_mean']:.4f}, "
                       f"{c['speedup']:.2f}× (>= 3×): {'MET' if c['speedup'] >= 3 else 'NOT MET'}")
        else:
            out.append("- 8-bit, size <= 0.26, cos >= 0.9995: no row reaches it: NOT MET")
        for b in (8, 4, 3, 2):
            p = best([r for r in peers if r["bits"] == b])
            o = best([r for r in ours if r["bits"] == b])
            if p and o:
                out.append(f"- {b} bits: best peer {p['name']} cos {p['quality']['embedding_cosine_mean']:.4f} / top-10 {p['quality']['retrieval_agreement_at_10']:.3f}; "
                           f"ours {o['name']} cos {o['quality']['embedding_cosine_mean']:.4f} / top-10 {o['quality']['retrieval_agreement_at_10']:.3f}")
    else:
        def inc(r):
            return r["quality"]["perplexity"] / r["quality"]["perplexity_original"] - 1

        for b in (8, 4, 3, 2):
            p_rows = [r for r in peers if r["bits"] == b]
            o_rows = [r for r in ours if r["bits"] == b]
            if not (p_rows and o_rows):
                continue
            # "Best" by KL(fp32 || variant): held-out perplexity moves by +-0.1% by chance at these
            # fidelities (a quantized model can score lower than fp32), KL does not.
            p = min(p_rows, key=lambda r: r["quality"]["kl_divergence"])
            o = min(o_rows, key=lambda r: r["quality"]["kl_divergence"])
            kl_p, kl_o = p["quality"]["kl_divergence"], o["quality"]["kl_divergence"]
            if inc(p) > 0:
                ratio = inc(o) / inc(p)
                verdict = f"= {ratio:.2f} of the peer's increase (target <= 0.70): {'MET' if ratio <= 0.70 else 'NOT MET'}"
            else:
                verdict = "(the peer's perplexity did not rise: the ppl ratio is undefined, compare KL)"
            out.append(f"- {b} bits: best peer {p['name']} ({_f(p['linear_bits'], '.2f')} b/w) Δppl {100 * inc(p):+.2f}%, KL {kl_p:.4f}; "
                       f"ours {o['name']} ({_f(o['linear_bits'], '.2f')} b/w) Δppl {100 * inc(o):+.2f}%, KL {kl_o:.4f} {verdict}; "
                       f"KL ratio {kl_o / kl_p if kl_p > 0 else float('nan'):.2f}")
    return out


def plot(meta: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = meta["kind"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        if "quality" not in r or r.get("linear_bits") is None:
            continue
        q = r["quality"]
        y = q["embedding_cosine_mean"] if kind == "encoder" else 100 * (q["perplexity"] / q["perplexity_original"] - 1)
        ours = r["tool"] == "slimformer"
        ax.scatter(r["linear_bits"], y, marker="o" if ours else "x", color="tab:blue" if ours else "tab:red", s=40 if ours else 30)
        ax.annotate(r["name"] if ours else f"{r['tool']}: {r['name']}", (r["linear_bits"], y), fontsize=6, alpha=0.8,
                    xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("stored bits per weight of the linear layers")
    if kind == "encoder":
        ax.set_ylabel("mean embedding cosine to fp32 (higher is better)")
        ax.set_ylim(max(0.0, ax.get_ylim()[0]), 1.001)
    else:
        ax.set_ylabel("perplexity increase over fp32, % (lower is better)")
        ax.set_yscale("symlog", linthresh=1)
    ax.set_title(f"{meta['model']}: slimformer (o) vs peers (x)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' (all-MiniLM-L6-v2) or a reference LM name (ref-small)")
    parser.add_argument("--quick", action="store_true", help="a few settings, small evaluation, *_quick outputs")
    parser.add_argument("--only", default=None, help="comma-separated substrings: run only settings whose name contains one")
    parser.add_argument("--no-peers", action="store_true", help="run only slimformer's settings")
    parser.add_argument("--n-texts", type=int, default=None)
    parser.add_argument("--merge", action="store_true",
                        help="replace the rows of this run in the existing table (same names), keep the others")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    if args.model == "default":
        original, label = load_model(), "sentence-transformers/all-MiniLM-L6-v2"
    else:
        import reference_models as rm

        folder = rm.model_dir(args.model)
        if not (folder / "config.json").is_file():
            print(f"error: {args.model} is not built; run 'python benchmarks/reference_models.py build {args.model}' first", file=sys.stderr)
            return 2
        original, label = load_model(folder), f"reference causal LM {args.model}"
    kind = original.kind
    n_texts = args.n_texts or (64 if args.quick else (320 if kind == "encoder" else 160))
    settings = EvalSettings(n_texts=n_texts, n_queries=min(64, n_texts // 4), latency_repeats=3 if args.quick else 7)
    ours = ENCODER_SETTINGS if kind == "encoder" else CAUSAL_SETTINGS
    theirs = list(peer_tools.PEERS)
    if args.quick:
        ours = [s for s in ours if s[0] in QUICK]
        theirs = [p for p in theirs if p.name.startswith(QUICK_PEERS)]
    if args.only:
        keys = [k.strip() for k in args.only.split(",")]
        ours = [s for s in ours if any(k in s[0] for k in keys)]
        theirs = [p for p in theirs if any(k in p.name for k in keys)]
    if args.no_peers:
        theirs = []

    rt_batch = cm.round_trip_batch(original.tokenizer)
    calib = peer_tools.calibration_batches(original)
    cache: dict = {}
    rows: list[dict] = []
    machine = describe_machine()
    log(machine_line(machine))
    t_start = time.perf_counter()
    for name, bits, steps in ours:
        log(f"slimformer: {name}")
        try:
            rows.append(our_row(original, name, bits, steps, settings, rt_batch, cache))
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the table
            traceback.print_exc()
            rows.append({"name": name, "tool": "slimformer", "bits": bits, "error": f"{type(exc).__name__}: {exc}"[:300]})
    for setting in theirs:
        log(f"peer: {setting.name}")
        row = peer_tools.run_peer(setting, original, settings, calib, cache)
        if row["bits"] == 32:
            continue
        rows.append(row)
    meta = {
        "model": label, "kind": kind, "date": _dt.date.today().isoformat(), "cpu": cm._cpu_model(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "n_texts": n_texts, "latency_batch": f"{settings.latency_batch}x{settings.latency_tokens}",
        "repeats": settings.latency_repeats, "seconds": round(time.perf_counter() - t_start, 1),
        "machine": machine, "latency_flops": _latency_flops(original, settings) if kind == "encoder" else None,
    }
    stem = f"weight_quantization_{'minilm' if kind == 'encoder' else args.model}" + ("_quick" if args.quick else "")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    if args.merge and (RESULTS_DIR / f"{stem}.json").is_file():
        previous = json.loads((RESULTS_DIR / f"{stem}.json").read_text())
        names = {r["name"] for r in rows}
        configured = {n for n, _, _ in (ENCODER_SETTINGS if kind == "encoder" else CAUSAL_SETTINGS)} | {p.name for p in peer_tools.PEERS}
        rows = [r for r in previous["rows"] if r["name"] not in names and r["name"] in configured] + rows
        meta = {**previous["meta"], "merged": {"date": meta["date"], "rows": sorted(names), "seconds": meta["seconds"], "machine": machine},
                "latency_flops": meta["latency_flops"]}
    cm.write_text_atomic(RESULTS_DIR / f"{stem}.json", json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    cm.write_text_atomic(RESULTS_DIR / f"{stem}.md", markdown(meta, rows))
    plot(meta, rows, RESULTS_DIR / f"{stem}.png")
    print(markdown(meta, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
