"""Decode speed of SmolLM2 with 25 % of its blocks removed, in the runtimes a user decodes with.

``structure.py report`` times greedy generation with Hugging Face ``generate`` (32 tokens, prompt
included, 5 rounds). This benchmark times the same 8-block removals (SLEB's set from
``structure_search_sleb.json`` and ShortGPT's, both physically removed) against the original,
per generated token after the prompt, in three runtimes: Hugging Face ``generate`` in float32
(the time of 65 new tokens less that of 1, over 64), and slimformer's ``TextGenerator`` (static
KV cache, compiled step) in float32 and in bfloat16 (its decode time over its decode steps).
Every (runtime, model) pair runs once per round, the order rotating, for ``--rounds`` rounds;
speed-ups are the original's median over the model's and the median of the per-round ratios.

At batch 1 much of a token's cost is reading the weights: the 8 removed blocks are 28.3 M of the
134.5 M parameters (the 28.3 M-parameter tied head is read every token), a parameter ratio of
1.27x; the per-block work besides the weights (norms, attention over the KV cache, per-operation
overhead) goes with the blocks too, and the head's share does not, so a runtime's speed-up can
land on either side of it.

    python benchmarks/structure_decode.py [--rounds 7] [--tokens 64]

Writes benchmarks/results/structure_decode.{md,json,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from slimformer.runtime.generation import GenerationConfig, TextGenerator
from slimformer.runtime.machine import describe_machine, machine_line
from slimformer.timing import steady_allocator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_files import figure, publish  # noqa: E402
from structure import N25, SEARCH_CAL, _apply, _replay, _searches, load_smollm2  # noqa: E402

ROOT = Path(__file__).resolve().parent
PROMPT = "Explain in a few sentences why the sky looks blue during the day and red at sunset."
RUNTIMES = ("hf generate fp32", "slimformer fp32", "slimformer bf16")


def models() -> dict:
    """The original and its two 8-block removals (each a fresh copy, blocks physically gone)."""
    original = load_smollm2()
    out = {"original": original}
    searches = _searches()
    if "sleb" not in searches:
        raise SystemExit("error: benchmarks/results/structure_search_sleb.json is missing; run `structure.py search sleb` first")
    sleb = copy.deepcopy(original)
    _replay(sleb, searches["sleb"]["removal_order"][:N25])
    out["sleb 8 blocks"] = sleb
    short = copy.deepcopy(original)
    _apply({"method": "shortgpt", "num_layers": N25}, SEARCH_CAL)(short)
    out["shortgpt 8 blocks"] = short
    return out


def parameters(loaded) -> int:
    return sum(p.numel() for p in loaded.model.parameters())


def timers(loaded, tokens: int) -> dict:
    """Per-token decode seconds of one call, for each runtime."""
    tok = loaded.tokenizer
    ids = tok([PROMPT], return_tensors="pt")
    model = loaded.model.eval()

    def hf() -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(**ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
            one = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(**ids, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, do_sample=False, pad_token_id=tok.pad_token_id)
            return (time.perf_counter() - t0 - one) / tokens

    config = GenerationConfig(max_new_tokens=tokens + 1, stop_at_eos=False)

    def ours(gen: TextGenerator):
        def run() -> float:
            stats = gen.generate(PROMPT, config).stats
            return stats.decode_s / max(stats.decode_steps, 1)
        return run

    return {RUNTIMES[0]: hf, RUNTIMES[1]: ours(TextGenerator(loaded, compile=True)),
            RUNTIMES[2]: ours(TextGenerator(loaded, dtype=torch.bfloat16, compile=True))}


def measure(rounds: int, tokens: int) -> dict:
    steady_allocator()
    torch.manual_seed(0)
    built = models()
    calls = {(runtime, name): fn for name, m in built.items() for runtime, fn in timers(m, tokens).items()}
    for fn in calls.values():  # warm-up (compilation) untimed
        fn()
    samples = {k: [] for k in calls}
    keys = list(calls)
    for r in range(rounds):
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            samples[k].append(calls[k]())
    p0 = parameters(built["original"])
    rows = []
    for runtime in RUNTIMES:
        base = samples[(runtime, "original")]
        for name, m in built.items():
            mine = samples[(runtime, name)]
            rows.append({"runtime": runtime, "model": name, "blocks": m.adapter.num_layers(), "parameters": parameters(m),
                         "parameter_ratio": parameters(m) / p0, "ms_per_token": 1000 * statistics.median(mine),
                         "speedup": statistics.median(base) / statistics.median(mine),
                         "speedup_per_round": statistics.median(b / x for b, x in zip(base, mine)),
                         "samples_ms": [1000 * x for x in mine]})
    return {"rows": rows, "bound": p0 / parameters(built["sleb 8 blocks"])}


def write(result: dict, out: Path, name: str) -> None:
    lines = [
        "# SmolLM2-135M-Instruct with 8 of 30 blocks removed: decode speed per runtime",
        "",
        f"Machine: {machine_line(result['machine'])}. Model: SmolLM2-135M-Instruct from its Q4_1 GGUF (linears on a 4-bit g32 "
        f"asymmetric grid, de-quantized to float32). Batch 1, greedy, {result['tokens']} tokens after the prompt "
        f"(\"{PROMPT}\"); medians of {result['rounds']} interleaved rounds (every runtime and model once per round, the order "
        "rotating). `x original`: the original's median over this row's in the same runtime; `per round`: the median of "
        f"the per-round ratios. Parameters read per token, the tied head included: {result['bound']:.3f}x fewer with 8 "
        "blocks removed; per-block work besides the weights (norms, attention, per-operation overhead) goes with the blocks "
        "too. Run took "
        f"{result['seconds'] / 60:.1f} min.",
        "",
        "| runtime | model | blocks | parameters | ms per token | x original | per round |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['runtime']} | {r['model']} | {r['blocks']} | {r['parameters'] / 1e6:.1f} M ({r['parameter_ratio']:.3f}) | "
                     f"{r['ms_per_token']:.2f} | {r['speedup']:.3f}x | {r['speedup_per_round']:.3f}x |")
    publish(out, name, "\n".join(lines) + "\n", result, plot)


def plot(result: dict, path: Path) -> None:
    rows = [r for r in result["rows"] if r["model"] != "original"]
    names = sorted({r["model"] for r in rows})
    width = 0.8 / len(names)
    with figure(path, (7, 3.6), result["machine"].get("cpu") or "CPU") as ax:
        for i, n in enumerate(names):
            mine = [next(r for r in rows if r["model"] == n and r["runtime"] == rt) for rt in RUNTIMES]
            ax.bar([j + i * width for j in range(len(RUNTIMES))], [r["speedup"] for r in mine], width, label=n)
        ax.axhline(result["bound"], color="k", ls="--", lw=1, label=f"parameter ratio {result['bound']:.2f}x")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(RUNTIMES))], RUNTIMES, fontsize=8)
        ax.set_ylabel("decode speed-up over the original")
        ax.set_ylim(0.9, max(result["bound"], max(r["speedup"] for r in rows)) + 0.08)
        ax.legend(fontsize=7)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--name", default="structure_decode")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.tokens < 1:
        print("error: --rounds and --tokens must be positive; pass e.g. --rounds 7 --tokens 64", file=sys.stderr)
        return 2
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    started = time.time()
    machine = describe_machine()
    result = measure(args.rounds, args.tokens)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result |= {"machine": machine, "rounds": args.rounds, "tokens": args.tokens, "seconds": time.time() - started,
               "sleb_order": json.loads((ROOT / "results" / "structure_search_sleb.json").read_text())["removal_order"][:N25]}
    write(result, Path(args.out), args.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
