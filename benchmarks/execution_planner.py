"""Execution planner benchmark: what the planner chose on this machine and what it bought.

On MiniLM: fp32 (Hugging Face), a plain bf16 cast (also compiled with frozen weights), and
compressed models (8-bit W8A8 of recipes/w8a8-smoothquant.yaml, 8-bit weights with bf16
activations of recipes/w8-bf16.yaml, the 4-bit demo recipe) each run with their
capability-chosen kernels ("unplanned"), with the execution planner's choice (memory balanced,
and fast), and compiled (balanced; fast with frozen weights), on the fixed 32x128 batch and on the whole mixed-length held-out
corpus (batches of 32, padded to the longest vs. sorted by length and bucketed). Every latency
is a median of interleaved runs in this one process; the machine (CPU, flags, load) and the
measured matmul ceilings are recorded, and each variant's achieved FLOP/s is reported against
the fp32 and bf16 ceilings.

    python benchmarks/execution_planner.py [--repeats 5] [--quick]

Writes benchmarks/results/execution_planner[_NAME].{md,json,png}.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import slimformer
from slimformer.data import TextSpec, load_texts
from slimformer.evaluate import EvalSettings
from slimformer.evaluate.harness import latency_batch
from slimformer.methods.dynamic.token_pruning import describe_rates
from slimformer.evaluate.quality import _tokenize
from slimformer.methods.quantization.cast import cast_model
from slimformer.io.serialization import kernel_summary
from slimformer.kernels import tile_attention as tile_kernel
from slimformer.dynamo import allow_graphs
from slimformer.runtime.compile import compile_fallbacks, compile_model
from slimformer.runtime.machine import describe_machine, machine_line
from slimformer.runtime.alignment import align_widths
from slimformer.runtime.planner import PlanSettings, plan_execution, plan_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_files import compile_fallback_lines  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EMB8 = {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True, "targets": ["embedding"]}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _x(v) -> str:
    return "–" if v is None else f"{v:.2f}×"


def encoder_flops(batch: dict, config) -> float:
    """Multiply-adds x2 of the encoder blocks on the real (unpadded) tokens of ``batch``."""
    d, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    lengths = batch["attention_mask"].sum(1).double()
    return float(n * (2 * lengths * (4 * d * d + 2 * d * f) + 4 * lengths * lengths * d).sum())


def _attention(row: dict, form: str = "AMX") -> str:
    """The attention column: SDPA, or the tile kernel in the form this run's CPU built
    (``kernels.tile_attention.FORM``: AMX tiles, or AVX512-BF16 on CPUs without AMX)."""
    return {"slimformer_tile": tile_kernel.form_label(form), "sdpa": "SDPA"}.get(row.get("attention"), row.get("attention") or "–")


def attention_lines(out: dict) -> list[str]:
    """What each plan measured for the encoder's attention (embed of a mixed-length batch: SDPA,
    tile kernel, tile kernel on packed rows)."""
    lines = []
    for name, summary in out["plans"].items():
        found = (summary or {}).get("attention")
        if not found or ", compiled" in name:
            continue
        if found.get("seconds") is None:
            lines.append(f"- {name}: attention left on SDPA ({found.get('reason')})")
            continue
        times = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in found["seconds"].items())
        chosen = _attention({"attention": found["chosen"]}, out.get("attention_form", "AMX")) + (", packed rows" if found.get("packing") else "")
        lines.append(f"- {name}: {chosen} chosen{' (cached)' if found.get('cached') else ''}; embed of 32 rows of 8-128 tokens: {times}")
    return lines


def corpus_line(out: dict, floor: float = 0.999, asked: float = 6.0) -> str:
    """A whole-corpus line of the planner issue: the fastest variant at mean cos >= floor."""
    rows = [r for r in out["rows"] if r["cos_mean"] >= floor and r.get("corpus_bucketed_speedup")]
    if not rows:
        return f"- whole corpus at cos ≥ {floor}: no variant timed"
    best = max(rows, key=lambda r: r["corpus_bucketed_speedup"])
    return (f"- whole corpus (bucketed, vs fp32 padded) at mean cos ≥ {floor}: best **{best['corpus_bucketed_speedup']:.2f}×** "
            f"({best['variant']}, cos {best['cos_mean']:.4f}); the issue asks ≥ {asked:g}×: {'met' if best['corpus_bucketed_speedup'] >= asked else 'NOT met'} in this run")


def pruning_lines(out: dict) -> list[str]:
    """What the token-pruning rate search chose for the cos >= 0.99 line, and the hand-set rows."""
    info = out.get("pruning")
    if not info:
        return []
    found = info["found"]
    chosen = describe_rates(found) + ("" if found["layers"] else " (no move kept the calibration cosine and saved 2 % of the measured time)")
    return ["", f"Token pruning for the cos ≥ 0.99 line (`token-pruning`, length-aware, fused, candidates after blocks 1–4, keep floor 30 %; the rate searched on "
            f"{info['calibration']['n_samples']} `{info['calibration']['source']}` calibration texts, never on this corpus, at target cos {info['target_cos']}, "
            f"measured time as the cost, on the planned bf16 model, whose rows the dynamic runtime packs): {chosen}; calibration cos {found['calibration_cos']:.4f}, "
            f"{found['flops_ratio']:.0%} of the block FLOPs, {info['seconds']:.0f} s of search."]


def markdown(out: dict) -> str:
    """The results table (rendered from the JSON this benchmark writes)."""
    c = out["machine"]["ceilings"]
    lines = [
        "# Execution planner on all-MiniLM-L6-v2",
        "",
        f"- Machine: {machine_line(out['machine'])}.",
        f"- Load average during the timed rounds: {', '.join(f'{x:.1f}' for x in out['load_during_timing'])} (the machine is shared: absolute times are slow and noisy; ratios are interleaved medians of {out['repeats']} rounds in one process).",
        f"- fixed = the evaluate batch {out['fixed_batch']}; corpus = {out['corpus_texts']} held-out texts ({out['corpus_real_tokens']} real tokens), batches of 32 padded to their longest ({out['corpus_padded_positions']} positions) vs. sorted by length and bucketed (or, where the plan chose packed rows, every batch's real tokens packed into one row: 'packed' in the attention column). Speedups are against fp32 on the padded corpus / fixed batch.",
        f"- GFLOP/s = block FLOPs of the real tokens / latency, against the ceilings above (fp32 {c['fp32_flops'] / 1e9:.3g}, bf16 {c['bf16_flops'] / 1e9:.3g}{', int8 %.3g' % (c['int8_ops'] / 1e9) if 'int8_ops' in c else ''} G/s).",
        f"- 'unplanned' = the capability-chosen kernels; 'planned (balanced)' = the planner's choice with at most 2 bytes/weight of run-time copies; 'planned (fast)' = no memory limit. Run took {out['seconds'] / 60:.1f} min.",
        (f"- 'measured widths' and every planned model: each batch (bucket) runs at the width this machine's block runs fastest per row, a few masked columns wider "
         f"(`slimformer.runtime.alignment`, part of the plan for encoders): {len(out['widths']['moved'])} of 128 widths move, e.g. "
         + ", ".join(f"{k}→{v}" for k, v in list(out['widths']['moved'].items())[-6:]) + "." if out.get("widths") else "- no batch widths measured in this run."),
        "",
        "| variant | size | cos mean | cos worst | resident MB | fixed ms | fixed × | fixed GFLOP/s | corpus padded × | corpus bucketed × | activations | attention | execution |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out['rows']:
        ex = ", ".join(f"{k}×{v}" for k, v in sorted(r["execution"].items()))
        lines.append(
            f"| {r['variant']} | {r['size_ratio']:.3f} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | {r['resident_mb']:.1f} | {r['fixed_s'] * 1e3:.0f} | "
            f"{r['fixed_speedup']:.2f}× | {r['fixed_gflops']:.1f} | {_x(r['corpus_padded_speedup'])} | {_x(r['corpus_bucketed_speedup'])} | {r['activations'] or '–'} | {_attention(r, out.get('attention_form', 'AMX'))}{', packed' if r.get('packing') else ''} | {ex} |"
        )
    best_plain = max((r for r in out["rows"] if r["variant"] in ("fp32", "bf16 cast")), key=lambda r: r["fixed_speedup"])
    best_compiled = next((r for r in out["rows"] if r["variant"] == "bf16 cast, compiled (frozen)"), None)
    lines += ["", "- 'compiled' = that model's forward compiled by Inductor (`slimformer.runtime.compile`), kept only if it agrees with eager within its dtype's rounding and is faster; "
              "'(frozen)' = weights frozen into the graph, so oneDNN prepacks the bf16 linears: done by default only under `memory: fast`, because the packed copies are held beside the model's own "
              "(the resident MB column does not see them; measured in fresh processes on the 4-bit demo model: +74 MB against an unfrozen compile, ~7 bytes per linear weight): "
              + "; ".join(f"{k}: {'kept' if v['compiled'] else 'not kept (' + str(v['reason']) + ')'}, {v['speedup_over_eager']:.2f}× over eager, compile {v['compile_s']:.0f} s" for k, v in out.get('compiled', {}).items()) + "."]
    lines += compile_fallback_lines(out["rows"], "variant")
    lines += ["", "## Done-when lines of the planner issue (fixed 32×128 batch, this run; planned models)", ""]
    for r in out['rows']:
        if ", planned (" not in r["variant"]:
            continue
        verdict = "not slower" if r["fixed_speedup"] >= best_plain["fixed_speedup"] * 0.97 else "SLOWER"
        skipped = (out["plans"].get(r["variant"]) or {}).get("int8_activations_skipped")
        w8a8_layers = sum(1 for layer in (out["plans"].get(r["variant"]) or {}).get("layers", {}).values() if "int8_activations" in layer)
        lines.append(f"- {r['variant']}: {r['fixed_speedup']:.2f}× fp32 (size {r['size_ratio']:.3f}, cos {r['cos_mean']:.4f}); {verdict} than the faster of fp32 and a plain bf16 cast ({best_plain['variant']}, {best_plain['fixed_speedup']:.2f}×; 3% noise allowance)"
                     + (f"; a bf16 cast compiled with frozen weights: {best_compiled['fixed_speedup']:.2f}×" if best_compiled else "")
                     + (f"; int8 activations skipped on {skipped['batch']} of {w8a8_layers} W8A8 layers for batches, {skipped['decode']} for decoding (measured slower here than float activations on the same int8 weights)"
                        if w8a8_layers else "")
                     + ("; the user's choice `int8_activations: keep`, not the default" if "int8 activations kept" in r["variant"] else ""))
    lines += [corpus_line(out), corpus_line(out, 0.99, 10.0) + " (with token pruning or exits allowed)", *pruning_lines(out)]
    lines += ["", "Attention chosen by measurement (`slimformer.runtime.tile_attention`, part of the plan for encoders):", "", *attention_lines(out), ""]
    lines += ["- Compiled models trace the corpus's bucket shapes symbolically (dynamic shapes; planned layers take their batch path inside the graph, so no guard on the row count); the recompile limit is raised to 64 because all compiled models here share one code object; the warm-up pass absorbs the compiles."]
    for name, summary in out['plans'].items():
        if ", compiled" in name:
            continue
        lines += ["", f"## {name}: paths measured on this machine", "", plan_table(summary)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--texts", type=int, default=320)
    parser.add_argument("--plan-tokens", type=int, default=1024, help="rows the planner times for the batch regime")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fixed-rows", type=int, default=32, help="rows of the fixed batch (x128 tokens); 32 = the evaluate batch")
    parser.add_argument("--rtn-w8a8", action="store_true",
                        help="build the 8-bit W8A8 model with rtn (activations: int8, same layout and paths as the smoothquant recipe, "
                             "no calibration; its quality is rtn's, not smoothquant's)")
    parser.add_argument("--skip-unplanned-w8a8", action="store_true", help="do not time the W8A8 model on its capability-chosen _int_mm path")
    parser.add_argument("--memories", default="balanced,fast", help="memory policies to plan with")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled (Inductor, frozen weights) variants")
    parser.add_argument("--pruning-target", type=float, default=0.99,
                        help="calibration cosine the token-pruning rate search keeps for the cos >= 0.99 row (0: no pruning row)")
    parser.add_argument("--name", default="", help="suffix of the result files (execution_planner_NAME.*), e.g. the machine")
    parser.add_argument("--lean-corpus", action="store_true",
                        help="corpus timings only for fp32 (padded and bucketed) and the planned models (bucketed): a saturated machine")
    args = parser.parse_args()
    t_start = time.time()
    # Every compiled MiniLM here shares one code object (transformers' forward wrapper), and
    # dynamo's recompile limit counts graphs per code object: with seven compiled models in one
    # process the default 8 would send later bucket shapes to eager. One model alone stays far below.
    allow_graphs(64)
    machine = describe_machine()
    log(machine_line(machine))
    settings = EvalSettings(n_texts=args.texts, n_queries=min(64, args.texts // 4))
    original = slimformer.load("default", execution="off")
    calib = {"source": "stdlib-docs", "n_samples": 32 if args.quick else 128, "max_length": 128}
    w8a8_label, w8a8_recipe = "w8a8 (recipes/w8a8-smoothquant.yaml)", slimformer.Recipe.from_file(Path(__file__).resolve().parents[1] / "recipes" / "w8a8-smoothquant.yaml")
    if args.rtn_w8a8:
        w8a8_label = "w8a8 (rtn W8A8 + W8 MLP-down + emb8 + bf16: the smoothquant recipe's layout)"
        w8a8_recipe = slimformer.Recipe.from_dict({"slimformer_recipe": 1, "name": "rtn-w8a8-emb8-bf16", "calibration": calib, "steps": [
            {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True, "activations": "int8", "exclude": ["*.layer.*[0-9].output.dense"]},
            {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True, "targets": ["linear", "embedding"]},
            {"method": "cast", "dtype": "bfloat16"}]})
    recipes = {
        w8a8_label: w8a8_recipe,
        "8-bit weights, bf16 activations (recipes/w8-bf16.yaml)": slimformer.Recipe.from_file(Path(__file__).resolve().parents[1] / "recipes" / "w8-bf16.yaml"),
        "4-bit demo (recipes/gptq-w4g32-v8-emb8.yaml)": slimformer.Recipe.from_file(Path(__file__).resolve().parents[1] / "recipes" / "gptq-w4g32-v8-emb8.yaml"),
    }
    if args.quick:  # no GPTQ: the demo's layout with rtn codes
        del recipes["4-bit demo (recipes/gptq-w4g32-v8-emb8.yaml)"]
        recipes["4-bit, the demo's layout with rtn codes (quick)"] = slimformer.Recipe.from_dict({"slimformer_recipe": 1, "name": "rtn-w4g32-emb8", "calibration": calib,
                                                                                                  "steps": [{"method": "rtn", "bits": 4, "group_size": 32}, EMB8]})
    variants: dict[str, slimformer.LoadedModel] = {"fp32": original}
    bf16 = copy.deepcopy(original)
    cast_model(bf16.model, torch.bfloat16)
    variants["bf16 cast"] = bf16
    plans = {}
    compiled_reports = {}
    widths_info: dict = {}
    fixed = latency_batch(original, settings)
    fixed = {k: (v[: args.fixed_rows] if isinstance(v, torch.Tensor) else v) for k, v in fixed.items()}

    def add_compiled(label: str, model, freezing=None) -> str:
        """``model`` compiled (Inductor; weights frozen under memory: fast) on the fixed batch, if
        it agrees and pays; returns the variant's name (``label``, compiled, and frozen or not)."""
        report = compile_model(model, fixed, freezing=freezing)
        label = f"{label}, compiled" + (" (frozen)" if report.frozen else "")
        compiled_reports[label] = {"compiled": report.compiled, "frozen": report.frozen, "compile_s": report.compile_seconds, "speedup_over_eager": report.speedup,
                                   "reason": report.reason}
        log(f"compiled {label}: {compiled_reports[label]}")
        if report.compiled:
            variants[label] = model
        return label

    if not args.no_compile:
        bf16c = copy.deepcopy(original)
        cast_model(bf16c.model, torch.bfloat16)
        add_compiled("bf16 cast", bf16c, freezing=True)
        # the same, each batch run at the width the machine's block runs fastest per row
        # (slimformer.runtime.alignment; the planned models below get it from the planner)
        bf16w = copy.deepcopy(original)
        cast_model(bf16w.model, torch.bfloat16)
        found = align_widths(bf16w, max_length=128)
        widths_info.update({"moved": {str(k): v for k, v in found["moved"].items()}, "seconds": found["seconds"], "cached": found["cached"]})
        log(f"batch widths: {len(found['moved'])} of 128 run wider ({found['seconds']:.1f} s, cached {found['cached']})")
        add_compiled("bf16 cast, measured widths", bf16w, freezing=True)
    # the cast under the planner: no quantized layers, so what it adds is the encoder's attention
    # kernel (AMX tiles where measured faster than SDPA) and the batch widths
    for compiled in (False, True) if not args.no_compile else (False,):
        bf16p = copy.deepcopy(original)
        cast_model(bf16p.model, torch.bfloat16)
        plan = plan_execution(bf16p, PlanSettings(memory="fast", batch_tokens=args.plan_tokens, repeats=2 if args.quick else 3))
        log(f"planned bf16 cast: attention {plan.attention and plan.attention['chosen']}")
        if compiled:
            plans[add_compiled("bf16 cast, planned", bf16p, freezing=True)] = plan.summary()
        else:
            variants["bf16 cast, planned"] = bf16p
            plans["bf16 cast, planned"] = plan.summary()
    pruning_info: dict = {}
    if args.pruning_target and not args.no_compile:
        # the planned cast with token pruning whose rates are searched on calibration text of
        # several kinds (never on the corpus below) at the 0.99 floor: the dynamic runtime
        # packs its rows like the unpruned plan's
        pruned = copy.deepcopy(original)
        cast_model(pruned.model, torch.bfloat16)
        plan = plan_execution(pruned, PlanSettings(memory="fast", batch_tokens=args.plan_tokens, repeats=2 if args.quick else 3))
        calibration = {"source": "mix", "n_samples": 64 if args.quick else 256, "max_length": 128}
        t0 = time.time()
        slimformer.compress(pruned, slimformer.Recipe.from_dict({"slimformer_recipe": 1, "name": "token-pruning-searched", "calibration": calibration, "steps": [
            {"method": "token-pruning", "layers": [1, 2, 3, 4], "keep_ratio": 0.3, "target_cos": args.pruning_target, "schedule": "length", "min_tokens": 32, "fuse": True}]}))
        found = pruned.applied[-1]
        pruning_info = {"target_cos": args.pruning_target, "calibration": calibration, "seconds": time.time() - t0,
                        "found": {k: found[k] for k in ("layers", "keep_ratios", "calibration_cos", "flops_ratio")}}
        log(f"token pruning searched at {args.pruning_target}: {pruning_info}")
        plans[add_compiled(f"bf16 cast, planned + token pruning searched at cos {args.pruning_target:g}", pruned, freezing=True)] = plan.summary()
    for label, recipe in recipes.items():
        log(f"compressing {label}")
        model = copy.deepcopy(original)
        slimformer.compress(model, recipe)
        if not (args.skip_unplanned_w8a8 and label == w8a8_label):
            variants[f"{label}, unplanned"] = model
        for memory in args.memories.split(","):
            planned = copy.deepcopy(model)
            t0 = time.time()
            plan = plan_execution(planned, PlanSettings(memory=memory, batch_tokens=args.plan_tokens, repeats=2 if args.quick else 3))
            log(f"planned {label} memory={memory} in {time.time() - t0:.1f}s: {plan.activations}, {plan.counts()}")
            variants[f"{label}, planned ({memory})"] = planned
            plans[f"{label}, planned ({memory})"] = plan.summary()
            if label == w8a8_label and memory == "balanced":  # what keeping the int8 activations costs here
                kept = copy.deepcopy(model)
                plan_k = plan_execution(kept, PlanSettings(memory=memory, batch_tokens=args.plan_tokens, repeats=2 if args.quick else 3, int8_activations="keep"))
                log(f"planned {label} memory={memory}, int8 activations kept: {plan_k.activations}, {plan_k.counts()}")
                variants[f"{label}, planned ({memory}, int8 activations kept)"] = kept
                plans[f"{label}, planned ({memory}, int8 activations kept)"] = plan_k.summary()
            if not args.no_compile:
                again = copy.deepcopy(model)
                plan_execution(again, PlanSettings(memory=memory, batch_tokens=args.plan_tokens, repeats=2 if args.quick else 3))
                name = add_compiled(f"{label}, planned ({memory})", again)
                plans[name] = plans[f"{label}, planned ({memory})"]
    texts = load_texts(TextSpec(source=settings.source, split="evaluation", n=settings.n_texts, seed=settings.seed))
    padded_batches = [_tokenize(original, texts[i : i + 32], 128) for i in range(0, len(texts), 32)]
    lengths = [len(x) for x in original.tokenizer(texts, truncation=True, max_length=128)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    sorted_batches = [_tokenize(original, [texts[j] for j in order[i : i + 32]], 128) for i in range(0, len(texts), 32)]
    fixed_flops = encoder_flops(fixed, original.model.config)

    def fixed_run(m):
        return lambda: m.embed(fixed)

    def corpus_run(m, batches, bucketing):
        def run():
            m.bucketing = bucketing
            try:
                for b in batches:
                    m.embed(b)
            finally:
                m.bucketing = True
        return run

    fns = {}
    for name, m in variants.items():
        fns[(name, "fixed")] = fixed_run(m)
        if not args.lean_corpus or name == "fp32":
            fns[(name, "corpus padded")] = corpus_run(m, padded_batches, False)
        if not args.lean_corpus or name == "fp32" or "planned" in name:
            fns[(name, "corpus bucketed")] = corpus_run(m, sorted_batches, True)
    log("warm-up")
    with torch.no_grad():
        for fn in fns.values():
            fn()
        times = {k: [] for k in fns}
        loads = []
        for r in range(args.repeats):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
            loads.append(os.getloadavg()[0])
            log(f"round {r + 1}/{args.repeats} load {loads[-1]:.1f}")
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = {"fixed": med[("fp32", "fixed")], "corpus": med[("fp32", "corpus padded")]}
    # Quality of each variant against fp32 on the held-out corpus (embedding cosine).
    from slimformer.evaluate.quality import encode

    base = encode(original, texts)
    rows = []
    for name, m in variants.items():
        emb = base if m is original else encode(m, texts)
        cos = (emb * base).sum(-1)
        c = m.model if name != "fp32" else original.model
        from slimformer.evaluate.cost import resident_bytes, storage_bytes

        rows.append({
            "variant": name,
            "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "size_ratio": storage_bytes(c) / storage_bytes(original.model),
            "resident_mb": resident_bytes(c) / 1e6,
            "fixed_s": med[(name, "fixed")], "fixed_speedup": ref["fixed"] / med[(name, "fixed")],
            "fixed_gflops": fixed_flops / med[(name, "fixed")] / 1e9,
            "corpus_padded_s": med.get((name, "corpus padded")), "corpus_padded_speedup": ref["corpus"] / med[(name, "corpus padded")] if (name, "corpus padded") in med else None,
            "corpus_bucketed_s": med.get((name, "corpus bucketed")), "corpus_bucketed_speedup": ref["corpus"] / med[(name, "corpus bucketed")] if (name, "corpus bucketed") in med else None,
            "execution": (plans.get(name) or {}).get("paths") or ({"float": 1} if "unplanned" not in name else kernel_summary(c)),
            "activations": (plans.get(name) or {}).get("activations"),
            "attention": getattr(c.config, "_attn_implementation", None),
            "packing": bool(getattr(m, "packing", False)),
            # a "compiled" row whose compiled forward met a compiler error on some batch ran eagerly from there
            "compile_fallbacks": compile_fallbacks(m),
        })
    out = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine, "load_during_timing": loads, "repeats": args.repeats, "attention_form": tile_kernel.FORM,
        "fixed_batch": list(fixed["input_ids"].shape), "corpus_texts": len(texts),
        "corpus_real_tokens": int(sum(lengths)), "corpus_padded_positions": int(sum(b["input_ids"].numel() for b in padded_batches)),
        "rows": rows, "plans": plans, "compiled": compiled_reports, "widths": widths_info, "pruning": pruning_info, "seconds": time.time() - t_start,
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = ("_quick" if args.quick else "") + (f"_{args.name}" if args.name else "")
    (RESULTS / f"execution_planner{suffix}.json").write_text(json.dumps(out, indent=1, default=str))
    (RESULTS / f"execution_planner{suffix}.md").write_text(markdown(out))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [r["variant"] for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.27 for x in xs], [r["fixed_speedup"] for r in rows], 0.27, label="fixed 32x128")
    ax.bar(list(xs), [r["corpus_padded_speedup"] or 0 for r in rows], 0.27, label="corpus, padded")
    ax.bar([x + 0.27 for x in xs], [r["corpus_bucketed_speedup"] or 0 for r in rows], 0.27, label="corpus, bucketed")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("speed vs fp32")
    ax.set_title(f"execution planner, {machine.get('cpu')}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"execution_planner{suffix}.png", dpi=110)
    log(f"wrote {RESULTS / f'execution_planner{suffix}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
