"""How often prompt lookup's drafted token is the model's own, by how many context tokens its
source agrees with: the measurement behind ``slimformer.runtime.speculative.LOOKUP_PRIOR``.

    python benchmarks/lookup_acceptance.py [--split calibration] [--weights fp32 int8]
        [--per-kind 8] [--new-tokens 48] [--name lookup_acceptance]

Each prompt of ``benchmarks/generation.py``'s kinds (from the *calibration* split by default: the
prior is set from it, never from the evaluation prompts the speed benchmarks report) is answered
by plain greedy decoding (no timing). The greedy output is then replayed: at every position the
lookup index proposes up to 6 tokens from the longest earlier match of the context's end (any
length from 1), and each proposed token is compared with the output, in order, until the first
miss. A token whose source agrees with ``L`` context tokens (the match, plus the tokens of the
draft before it) counts towards ``L``. Writes ``NAME.md``, ``NAME.json`` and ``NAME.png`` to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

from generation import build_prompts, planned, quantized  # noqa: E402

from slimformer.models import load_model  # noqa: E402
from slimformer.runtime import GenerationConfig, TextGenerator  # noqa: E402
from slimformer.runtime.speculative import LOOKUP_PRIOR, LookupIndex  # noqa: E402

NGRAM, DRAFT, TOP = 16, 6, 12  # agreement lengths above TOP are pooled


def replay(context: list[int], output: list[int], counts: dict[int, list[int]]) -> None:
    """Count, per agreement length, the drafted tokens compared with ``output`` and those equal."""
    ctx, index = list(context) + output[:1], LookupIndex(NGRAM)
    for t in range(1, len(output)):
        draft, match = index.proposal(ctx, DRAFT, 1)
        for j, token in enumerate(draft[: len(output) - t]):
            entry = counts.setdefault(min(match + j, TOP), [0, 0])
            entry[1] += 1
            if token != output[t + j]:
                break
            entry[0] += 1
        ctx.append(output[t])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="calibration", choices=("calibration", "evaluation"))
    ap.add_argument("--weights", nargs="+", default=["fp32", "int8"], choices=("fp32", "int8"))
    ap.add_argument("--per-kind", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="lookup_acceptance")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    base = load_model("smollm2")
    prompts = build_prompts(args.per_kind, split=args.split)
    counts: dict[str, dict[int, list[int]]] = {"copying kinds (summarise/extract, code)": {}, "chat": {}}
    for weights in args.weights:
        gen = TextGenerator(base) if weights == "fp32" else TextGenerator(planned(quantized(base, 8)))
        for kind, items in prompts.items():
            group = counts["chat" if kind == "chat" else "copying kinds (summarise/extract, code)"]
            for text, chat in items:
                ids, mask = gen.encode([text], chat=chat)
                out = gen.generate([text], GenerationConfig(max_new_tokens=args.new_tokens, stop_at_eos=False), chat=chat).tokens[0]
                replay(ids[0][mask[0].bool()].tolist(), out, group)
                print(f"{weights} {kind}: {len(out)} tokens", flush=True)
    result = {
        "split": args.split, "weights": args.weights, "per_kind": args.per_kind, "new_tokens": args.new_tokens, "draft": DRAFT,
        "counts": {g: {str(k): v for k, v in sorted(c.items())} for g, c in counts.items()},
        "prior": list(LOOKUP_PRIOR), "seconds": time.time() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Prompt lookup: acceptance by agreement length (SmolLM2-135M-Instruct, {args.split} prompts, {', '.join(args.weights)})", "",
        f"Greedy outputs of {args.new_tokens} tokens replayed through the lookup index (drafts of up to {DRAFT} from any match, "
        f"compared in order until the first miss); 'L' = context tokens the drafted token's source agrees with "
        f"({TOP} = {TOP} or more). The prior in `slimformer.runtime.speculative.LOOKUP_PRIOR` is read from the first group.", "",
        "| L | " + " | ".join(counts) + " | prior |", "|---|" + "---|" * (len(counts) + 1)]
    for length in range(1, TOP + 1):
        cells = []
        for c in counts.values():
            ok, seen = c.get(length, (0, 0))
            cells.append(f"{ok / seen:.0%} ({ok}/{seen})" if seen else "–")
        lines.append(f"| {length} | " + " | ".join(cells) + f" | {LOOKUP_PRIOR[min(length, len(LOOKUP_PRIOR)) - 1]:.0%} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, c in counts.items():
        xs = [k for k in range(1, TOP + 1) if c.get(k, (0, 0))[1]]
        ax.plot(xs, [c[k][0] / c[k][1] for k in xs], marker="o", label=label)
    ax.plot(range(1, TOP + 1), [LOOKUP_PRIOR[min(k, len(LOOKUP_PRIOR)) - 1] for k in range(1, TOP + 1)], "k--", label="prior")
    ax.set_xlabel("context tokens the source agrees with")
    ax.set_ylabel("drafted token accepted")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"{args.name}.png", dpi=110)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
