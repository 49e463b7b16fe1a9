"""What glibc's allocator does to measured speed: all-MiniLM-L6-v2 timed in fresh processes under
glibc's default malloc and under slimformer's steady allocator (``slimformer.timing.
steady_allocator``: no ``mmap`` per large block, no trimming of the heap), alternating.

By default glibc serves a block above its (dynamic) mmap threshold by a fresh ``mmap`` and gives
the top of the heap back once more than the trim threshold is free, so a model whose activations
are large pays page faults on calls that a model with smaller activations does not. A speed-up
measured against a float32 original is then partly a page-fault saving that a long-running
server (or any process whose heap is already large) does not see. Every slimformer timing now
runs under the steady allocator; this benchmark measures how much the default one moved the
numbers, so that the result files measured before the change can be read with it.

Workloads (held-out ``stdlib-docs`` documents): the evaluate batch of 32 x 128 tokens and a
16 x 128 batch; the whole held-out corpus (320 documents, batches of 32 padded to their longest).
Variants: the float32 original, a bfloat16 cast, and the 50 %-FLOPs width architecture of the
structure benchmark (9 of 12 heads, MLP 512; its first heads and neurons, float32: the speed does
not depend on which are kept). Each process times every variant in interleaved rounds (medians
after two warm-up rounds); ``--pairs`` pairs of processes alternate default / steady.

    python benchmarks/allocator.py [--pairs 3] [--rounds 7]

Writes benchmarks/results/allocator.{md,json,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
VARIANTS = ("float32", "bfloat16 cast", "width 50% float32")
WORKLOADS = ("32x128", "16x128", "corpus (320 documents)")


def child(mode: str, rounds: int) -> dict:
    import torch

    from slimformer.data.text import TextSpec, load_texts
    from slimformer.models.adapters import ArchitectureAdapter
    from slimformer.models.loading import load_model
    from slimformer.timing import steady_allocator

    allocator = steady_allocator() if mode == "steady" else "glibc default"
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    original = load_model()
    models = {"float32": original.model, "bfloat16 cast": copy.deepcopy(original.model).to(torch.bfloat16)}
    slim = copy.deepcopy(original.model)
    adapter = ArchitectureAdapter(slim)
    for b in range(adapter.num_layers()):
        adapter.keep_heads(b, list(range(9)), list(range(9)))
        adapter.keep_neurons(b, list(range(512)))
    models["width 50% float32"] = slim
    texts = load_texts(TextSpec(source="stdlib-docs", split="evaluation", n=320, seed=0))

    def encode(batch_texts, fixed: bool) -> dict:
        b = dict(original.tokenizer(batch_texts, padding="max_length" if fixed else True, truncation=True, max_length=128, return_tensors="pt"))
        b.pop("token_type_ids", None)
        return b

    workloads = {"32x128": [encode(texts[:32], True)], "16x128": [encode(texts[:16], True)],
                 "corpus (320 documents)": [encode(texts[i:i + 32], False) for i in range(0, len(texts), 32)]}
    out: dict = {"mode": mode, "allocator": allocator, "ms": {}}
    with torch.no_grad():
        for w, batches in workloads.items():
            samples = {v: [] for v in models}
            names = list(models)
            for r in range(rounds + 2):
                shift = r % len(names)
                for v in names[shift:] + names[:shift]:
                    t0 = time.perf_counter()
                    for b in batches:
                        models[v](**b)
                    if r >= 2:
                        samples[v].append(time.perf_counter() - t0)
            out["ms"][w] = {v: 1000 * statistics.median(s) for v, s in samples.items()}
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def render(result: dict) -> str:
    m = result["machine"]
    L = ["# glibc's default allocator against the steady one (all-MiniLM-L6-v2)", "",
         f"- Machine: {m}; {result['threads']} threads; run {result['started']} UTC, {result['minutes']:.1f} min.",
         f"- {result['pairs']} pairs of fresh processes, alternating default / steady; each process times every variant in "
         f"{result['rounds']} interleaved rounds after two warm-up rounds (median); the table gives the median over the processes of each mode.",
         "- steady = `slimformer.timing.steady_allocator()`: `mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, 2**31-1)`; "
         "what every slimformer timing runs under since this benchmark was added.",
         f"- Peak resident memory of a process: default {result['max_rss_mb']['default']:.0f} MB, steady {result['max_rss_mb']['steady']:.0f} MB.", "",
         "| workload | variant | default ms | steady ms | default / steady | speed-up over float32, default | speed-up over float32, steady |",
         "|---|---|---|---|---|---|---|"]
    for w in WORKLOADS:
        d, s = result["ms"]["default"][w], result["ms"]["steady"][w]
        for v in VARIANTS:
            L.append(f"| {w} | {v} | {d[v]:.1f} | {s[v]:.1f} | {d[v] / s[v]:.2f} | {d['float32'] / d[v]:.2f}× | {s['float32'] / s[v]:.2f}× |")
    return "\n".join(L) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(13, 4))
    for ax, w in zip(axes, WORKLOADS):
        xs = range(len(VARIANTS))
        for k, (mode, off) in enumerate((("default", -0.2), ("steady", 0.2))):
            ax.bar([x + off for x in xs], [result["ms"][mode][w][v] for v in VARIANTS], width=0.4, label=f"glibc {mode}")
        ax.set_xticks(list(xs), [v.replace(" ", "\n", 1) for v in VARIANTS], fontsize=8)
        ax.set_title(w)
        ax.set_ylabel("ms (median)")
    axes[0].legend()
    fig.suptitle("MiniLM latency under glibc's default and the steady allocator (fresh processes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--child", choices=("default", "steady"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rounds)))
        return
    from slimformer.runtime.machine import describe_machine, machine_line

    import datetime as dt
    started, t0 = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    runs = {"default": [], "steady": []}
    for i in range(args.pairs):
        for mode in ("default", "steady") if i % 2 == 0 else ("steady", "default"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--rounds", str(args.rounds)], capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"pair {i + 1}/{args.pairs} {mode}: " + "; ".join(f"{w} " + ", ".join(f"{v} {ms:.0f}" for v, ms in d.items())
                                                                 for w, d in runs[mode][-1]["ms"].items()), flush=True)
    result = {"started": started.strftime("%Y-%m-%d %H:%M"), "minutes": (time.perf_counter() - t0) / 60, "pairs": args.pairs, "rounds": args.rounds,
              "threads": int(os.environ.get("BENCH_THREADS", "2")), "machine": machine_line(describe_machine(ceilings=False)), "runs": runs,
              "ms": {mode: {w: {v: statistics.median(r["ms"][w][v] for r in rs) for v in VARIANTS} for w in WORKLOADS} for mode, rs in runs.items()},
              "max_rss_mb": {mode: max(r["max_rss_mb"] for r in rs) for mode, rs in runs.items()}}
    sys.path.insert(0, str(ROOT))
    from results_files import publish

    publish(RESULTS, "allocator", render(result), result, plot)


if __name__ == "__main__":
    main()
