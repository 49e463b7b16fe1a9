"""Prompt lookup against plain greedy decoding on SmolLM2-135M-Instruct, one thread, interleaved:
acceptance, decode tokens/s, speed-up and identity of the outputs per prompt kind.

    OMP_NUM_THREADS=1 python benchmarks/generation_speculation.py [--split evaluation]
        [--variants default] [--per-kind 4] [--passes 2] [--new-tokens 48] [--name NAME]
    python benchmarks/generation_speculation.py --bound-from NAME   # no timing: the oracle bound
        # of any copying drafter on NAME's plain outputs, appended to NAME.json/.md

Prompts are those of ``benchmarks/generation.py`` (chat questions; summarise or extract a
passage of pydoc-topics given in the prompt; continue a function of the standard library), from
the ``evaluation`` split by default. Settings are chosen with ``--split calibration`` (prompts of
the same kinds from the other split, never the reported ones) and several ``--variants``.

Every prompt runs plain and with each variant, one after the other, in every pass (after a
warm-up of every configuration at every cache length the passes use, which compiles the decode
and verify steps); tokens/s are medians over prompts and passes; the speed-up of a kind is the
median of the per-run ratios to the plain run of the same prompt in the same pass. Outputs are
identical when every speculative run's tokens equal the plain run's. Writes ``NAME.md``,
``NAME.json`` and ``NAME.png`` to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

from generation import build_prompts, machine, write_with_prompts  # noqa: E402

from slimformer.models import load_model  # noqa: E402
from slimformer.runtime import GenerationConfig, TextGenerator  # noqa: E402
from slimformer.runtime.generation import CACHE_LEN_MULTIPLE  # noqa: E402
from slimformer.runtime.speculative import SpeculationConfig  # noqa: E402

VARIANTS = {
    "default": {},  # the library's defaults (num_draft 6, ngram 16; up to 3 drafts per step as a token tree, sized by measured verify cost)
    "fixed": {"adaptive": False},  # the fixed form: 6 tokens whenever a 3-token match is found
    "single": {"branches": 1},  # one draft per step (no token trees)
    "k2": {"num_draft": 2},
    "k3": {"num_draft": 3},
    "k4": {"num_draft": 4},
    "k8": {"num_draft": 8},
    "min3": {"min_ngram": 3},
    "min1": {"min_ngram": 1},
    "min2": {"min_ngram": 2},
    "adaptive8": {"num_draft": 8, "adaptive": True},
    "before": {"num_draft": 6, "ngram": 3, "min_ngram": 1, "adaptive": False},  # the settings of the first benchmark run
}


def run(gen: TextGenerator, prompt: tuple[str, bool], new_tokens: int, spec: SpeculationConfig | None) -> dict:
    config = GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False, speculation=spec)
    result = gen.generate(prompt[0], config, chat=prompt[1])
    s = result.stats
    return {"decode_tps": s.decode_tokens_per_s, "decode_s": s.decode_s, "decode_steps": s.decode_steps, "prompt_tokens": s.prompt_tokens,
            "tokens": result.tokens[0], "speculation": s.speculation}


def reach(context: list[int], output: list[int], t: int, num_draft: int | None, match: int = 0) -> int:
    """The most draft tokens a copying drafter could have accepted at output position ``t``:
    the longest agreement of ``output[t:]`` with a span copied from the context seen so far
    (``context`` + ``output[:t]``), at most ``num_draft`` long (None: any), starting at any
    position (``match`` 0) or only right after an earlier occurrence of the last ``match``
    tokens (what an n-gram lookup can find, with a perfect choice among its matches)."""
    seen = context + output[:t]
    want = output[t:] if num_draft is None else output[t : t + num_draft]
    tail = seen[len(seen) - match :] if match else []
    best = 0
    for j in range(match, len(seen)):
        if match and seen[j - match : j] != tail:
            continue
        n = 0
        while n < len(want) and j + n < len(seen) and seen[j + n] == want[n]:
            n += 1
        best = max(best, n)
    return best


def lookup_bound(context: list[int], output: list[int], num_draft: int | None, match: int = 0) -> int:
    """Fewest decode forwards in which any copying drafter (prompt lookup with a perfect choice
    of what to copy, from the prompt or the output so far) could produce ``output`` after
    ``context``: the first token comes from the prefill, and a forward at position ``t`` emits
    between 1 and ``reach(t) + 1`` tokens. Exact minimum (breadth-first over positions)."""
    forwards, lo, hi = 0, 1, 1  # the positions reachable in `forwards` forwards: lo..hi
    while hi < len(output):
        farthest = max(p + 1 + reach(context, output, p, num_draft, match) for p in range(lo, hi + 1))
        forwards, lo, hi = forwards + 1, hi + 1, min(farthest, len(output))
    return forwards


def bound_from(name: str, out: Path, model: str) -> int:
    """Add to ``name``.json/.md the oracle bound of prompt lookup on its prompts: from the plain
    (greedy) runs' tokens, the fewest forwards any copying drafter could need (``lookup_bound``)."""
    path = out / f"{name}.json"
    result = json.loads(path.read_text())
    stored = result["prompts"]
    per_kind = max(len(stored.get("chat", [])), len(stored.get("summarise", [])) + len(stored.get("extract", [])), len(stored.get("code", [])))
    built = build_prompts(per_kind, split=result["split"])
    candidates = [p for v in built.values() for p in v]
    gen = TextGenerator(load_model(model))
    ids = {}
    for kind, texts in stored.items():
        for i, head in enumerate(texts):
            text, chat = next(p for p in candidates if p[0][:200] == head)
            ids[(kind, i)] = gen.encode([text], chat=chat)[0][0].tolist()
    plain = {(r["kind"], r["prompt"]): r["tokens"] for r in result["runs"] if r["config"] == "plain"}
    bound = {}
    for kind in stored:
        keys = [k for k in plain if k[0] == kind]
        new = sum(len(plain[k]) - 1 for k in keys)
        per = {}
        for label, k, match in (("k6", 6, 0), ("unbounded", None, 0), ("k6_after1", 6, 1), ("k6_after2", 6, 2), ("k6_after3", 6, 3)):
            forwards = sum(lookup_bound(ids[key], plain[key], k, match) for key in keys)
            per[label] = new / forwards
        bound[kind] = per | {"prompts": len(keys)}
    result["oracle_bound"] = bound
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=float))
    os.replace(tmp, path)
    md = out / f"{name}.md"
    lines = md.read_text().rstrip("\n").split("\n")
    cut = next((i for i, line in enumerate(lines) if line.startswith("## Oracle bound")), len(lines))
    kept = lines[:cut]
    while kept and not kept[-1].strip():
        kept.pop()
    lines = kept + ["", "## Oracle bound of any copying drafter", "",
                           "From each prompt's plain greedy output: the fewest decode forwards in which a drafter that copies "
                           "from the prompt or the output so far could produce it, choosing perfectly what to copy at every step "
                           "(any earlier position, no n-gram rule), a forward emitting its accepted draft plus one token. "
                           "Tokens per forward is an upper bound on prompt lookup's speed-up even if a verify step cost no "
                           "more than a one-token step; with the measured verify cost it is lower still.", "",
                           "The last three columns restrict the copy to what an n-gram lookup can find: a span right after an earlier "
                           "occurrence of the last 1, 2 or 3 tokens (the library's default needs 3), still choosing perfectly among those.", "",
                           "| kind | prompts | drafts of 6 | drafts of any length | after a 1-token match | after a 2-token match | after a 3-token match |",
                           "|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {b['prompts']} | {b['k6']:.2f} | {b['unbounded']:.2f} | {b['k6_after1']:.2f} | {b['k6_after2']:.2f} | {b['k6_after3']:.2f} |" for k, b in bound.items()]
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, md)
    for k, b in bound.items():
        print(k, b, flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--split", default="evaluation", choices=("evaluation", "calibration"))
    ap.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    ap.add_argument("--kinds", nargs="+", default=["chat", "summarise", "extract", "code"])
    ap.add_argument("--per-kind", type=int, default=6, help="prompts per kind (summarise and extract share them: half each)")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", default="fp32", choices=("fp32", "int8", "bf16"),
                    help="int8: rtn w8 per channel (head 8-bit), planned: decode through the packed-code kernel")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--name", default="generation_speculation")
    ap.add_argument("--bound-from", default=None, metavar="NAME",
                    help="no timing: add the oracle bound of any copying drafter to results NAME.json/.md from its plain runs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.bound_from:
        return bound_from(args.bound_from, Path(args.out), args.model)
    started = time.time()
    loads = [os.getloadavg()]
    base = load_model(args.model)
    if args.weights == "int8":
        from generation import planned, quantized

        base = planned(quantized(base, 8))
    # bf16: the dequantized weights cast to bfloat16 (the fastest GEMMs on CPUs with AMX)
    gen = TextGenerator(base, dtype=torch.bfloat16 if args.weights == "bf16" else None)
    built = build_prompts(args.per_kind, split=args.split)
    # generation.py's "summarise" kind alternates two instructions: paraphrase, and copy word for word
    built["extract"] = [p for p in built["summarise"] if p[0].endswith("word for word.")]
    built["summarise"] = [p for p in built["summarise"] if not p[0].endswith("word for word.")]
    prompts = {k: v for k, v in built.items() if k in args.kinds}
    configs = {"plain": None} | {v: SpeculationConfig("prompt-lookup", **VARIANTS[v]) for v in args.variants}

    # Warm-up: each configuration once per cache length the passes use (compiles the steps).
    seen = set()
    for kind, items in prompts.items():
        for item in items:
            width = gen.encode([item[0]], chat=item[1])[0].shape[1]
            for name, spec in configs.items():
                needed = width + args.new_tokens + ((spec.num_draft + 2) if spec else 0)
                key = (name, -(-needed // CACHE_LEN_MULTIPLE))
                if key not in seen:
                    seen.add(key)
                    t0 = time.time()
                    run(gen, item, args.new_tokens, spec)
                    print(f"warm-up {name} ({kind}, cache bucket {key[1]}): {time.time() - t0:.1f} s", flush=True)
    loads.append(os.getloadavg())

    records = []
    for rep in range(1, args.passes + 1):
        for kind, items in prompts.items():
            for i, item in enumerate(items):
                plain = None
                for name, spec in configs.items():
                    out = run(gen, item, args.new_tokens, spec)
                    out.update(config=name, kind=kind, prompt=i, rep=rep)
                    if spec is None:
                        plain = out
                    else:
                        out["speedup"] = out["decode_tps"] / plain["decode_tps"]
                        out["identical"] = out["tokens"] == plain["tokens"]
                        # what one verify step cost, in one-token steps of the plain run of this prompt
                        one = plain["decode_s"] / plain["decode_steps"]
                        st = out["speculation"]
                        verifies = st["verify_steps"] - st["plain_steps"]
                        out["verify_cost"] = (out["decode_s"] - st["plain_steps"] * one) / (verifies * one) if verifies else None
                    records.append(out)
                    extra = f" x{out['speedup']:.2f} acc {out['speculation']['acceptance_rate']:.0%}" if spec else ""
                    print(f"[{rep}] {kind:9s} {i} {name:10s} {out['decode_tps']:.2f} tok/s{extra}", flush=True)
        loads.append(os.getloadavg())
    result = summarise(records, prompts, configs, args)
    result.update(machine=machine(), load_average=loads, seconds=time.time() - started)
    write(result, Path(args.out), args.name)
    return 0


def summarise(records: list[dict], prompts: dict, configs: dict, args) -> dict:
    med = statistics.median
    rows = []
    groups = {k: (k,) for k in prompts}
    if "summarise" in prompts and "extract" in prompts:
        groups["summarise+extract"] = ("summarise", "extract")
    for kind, members in groups.items():
        plain = [r for r in records if r["kind"] in members and r["config"] == "plain"]
        for name, spec in configs.items():
            if spec is None:
                continue
            mine = [r for r in records if r["kind"] in members and r["config"] == name]
            stats = [r["speculation"] for r in mine]
            drafted, accepted = sum(s["drafted"] for s in stats), sum(s["accepted"] for s in stats)
            rows.append({
                "kind": kind, "variant": name, "settings": {k: getattr(spec, k) for k in ("num_draft", "ngram", "min_ngram", "adaptive", "branches")},
                "runs": len(mine), "prompts": sum(len(prompts[m]) for m in members),
                "plain_tps": med(r["decode_tps"] for r in plain), "lookup_tps": med(r["decode_tps"] for r in mine),
                "speedup": med(r["speedup"] for r in mine),
                "speedup_min": min(r["speedup"] for r in mine), "speedup_max": max(r["speedup"] for r in mine),
                "acceptance": accepted / drafted if drafted else 0.0,
                "tokens_per_step": med((len(r["tokens"]) - 1) / max(r["speculation"]["verify_steps"], 1) for r in mine),
                "plain_step_share": sum(s["plain_steps"] for s in stats) / max(sum(s["verify_steps"] for s in stats), 1),
                "tree_step_share": sum(s.get("tree_steps", 0) for s in stats) / max(sum(s["verify_steps"] for s in stats), 1),
                "identical": all(r["identical"] for r in mine),
                "verify_cost": med([r["verify_cost"] for r in mine if r["verify_cost"] is not None] or [float("nan")]),
                "per_prompt_speedup": [med(r["speedup"] for r in mine if (r["kind"], r["prompt"]) == (m, i)) for m in members for i in range(len(prompts[m]))],
            })
    return {
        "model": args.model, "weights": args.weights, "split": args.split, "new_tokens": args.new_tokens, "passes": args.passes, "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows, "compiled": True,
        "prompts": {k: [p[:200] for p, _ in v] for k, v in prompts.items()},
        "runs": records,
    }


def write(result: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=float))
    m = result["machine"]
    loads = ", ".join(f"{x[0]:.2f}" for x in result["load_average"])
    lines = [
        f"# Prompt lookup vs plain greedy: {result['model']} ({result['split']} prompts, {result['new_tokens']} new tokens)",
        "",
        f"CPU: {m['cpu']}; flags: {', '.join(m['flags']) or 'none of avx512/amx'}; {result['threads']} thread{'s' if result['threads'] > 1 else ''} "
        f"(torch.set_num_threads; OMP_NUM_THREADS={result['omp_num_threads']} at start); torch {m['torch']}. Load average (1 min) at the start, after the warm-up "
        f"and after each pass: {loads}" + (" (2 cores shared with other jobs: above 2 the timings are disturbed)" if max(x[0] for x in result["load_average"]) > 2 else "")
        + ". Decode and verify steps compiled; "
        f"{result['passes']} interleaved passes (each prompt: plain, then each variant), after a warm-up; {result['seconds'] / 60:.0f} min.",
        "",
        "Speed-up: median over prompts and passes of (prompt-lookup tokens/s) / (plain tokens/s of the same prompt in the same pass). "
        "Acceptance: accepted / drafted tokens. Tokens per step: new tokens per forward of the model (median). "
        "Plain steps: share of steps with no draft (no match of >= min_ngram tokens). Tree steps: share of steps that verified several drafts at once. "
        "Verify cost: time of one verify step in one-token steps of the plain run of the same prompt (median; from the runs' decode times).",
        "",
        "SmolLM2-135M-Instruct's linears were stored as Q4_1 (4-bit g32) and its embedding as Q8_0; "
        + {"fp32": "these runs use the dequantized fp32 weights.",
           "bf16": "these runs use the dequantized weights cast to bfloat16 (weights and activations). A verify step scores several tokens "
                   "in one forward, a plain step one: in bf16 their roundings differ, so a near-tie can resolve differently and the "
                   "outputs need not be identical to plain greedy (in fp32 they are).",
           }.get(result.get("weights", "fp32"),
                 "these runs use 8-bit round-to-nearest weights (per channel, head 8-bit), decoded through slimformer's packed-code kernel."),
        "",
        "| kind | variant | settings | acceptance | tokens/step | plain steps | tree steps | verify cost | plain tok/s | lookup tok/s | speed-up (min–max) | outputs identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        s = r["settings"]
        trees = f", {s['branches']} drafts" if s.get("adaptive") and s.get("branches", 1) > 1 else ""
        settings = f"k={s['num_draft']}, n={s['min_ngram']}..{s['ngram']}{', adaptive' if s['adaptive'] else ''}{trees}"
        lines.append(f"| {r['kind']} | {r['variant']} | {settings} | {r['acceptance']:.0%} | {r['tokens_per_step']:.2f} | {r['plain_step_share']:.0%} | "
                     f"{r.get('tree_step_share', 0.0):.0%} | {r['verify_cost']:.2f} | "
                     f"{r['plain_tps']:.2f} | {r['lookup_tps']:.2f} | **{r['speedup']:.2f}×** ({r['speedup_min']:.2f}–{r['speedup_max']:.2f}) | "
                     f"{'yes' if r['identical'] else 'NO'} ({r['runs']} runs) |")
    lines += ["", "Per-prompt speed-ups (median over passes):", ""]
    for r in result["rows"]:
        lines.append(f"- {r['kind']} / {r['variant']}: " + ", ".join(f"{x:.2f}×" for x in r["per_prompt_speedup"]))
    write_with_prompts(lines, result["prompts"], out, name, result, plot)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        xs, ys, lo, hi = [], [], [], []
        for i, k in enumerate(kinds):
            r = next((r for r in rows if r["kind"] == k and r["variant"] == v), None)
            if r:
                xs.append(i + j * width)
                ys.append(r["speedup"])
                lo.append(r["speedup"] - r["speedup_min"])
                hi.append(r["speedup_max"] - r["speedup"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=v)
    ax.axhline(1.0, color="#666", lw=0.8)
    ax.axhline(1.5, color="#c33", lw=0.8, ls="--", label="1.5× goal")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(kinds))], kinds)
    ax.set_ylabel("decode speed-up over plain greedy")
    m = result["machine"]
    ax.set_title(f"prompt lookup, {result['model']}, {result['split']} prompts; {m['cpu']}, {result['threads']} thread", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
