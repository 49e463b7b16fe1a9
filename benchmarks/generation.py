"""Generation speed on SmolLM2-135M-Instruct: Hugging Face ``generate`` against slimformer's
runtime (static cache, compiled decode step, packed 8/4-bit weights) with and without lossless
speculation, on held-out prompts of three kinds.

    python benchmarks/generation.py [--model smollm2] [--new-tokens 48] [--repeats 3]
        [--int4-folder FOLDER] [--llamacpp LABEL=FILE.gguf ...] [--configs NAME ...]
        [--extra-rows rows.json] [--no-compile] [--out benchmarks/results]

Prompt kinds: ``chat`` (questions through the chat template), ``summarise`` (summarise or
extract from a passage of the held-out split of pydoc-topics, given in the prompt) and ``code``
(continue a function from the held-out split of the standard-library sources). All runs are
greedy; one run of the script, every configuration interleaved prompt by prompt, medians over
repeats (after a short warm-up generation of every configuration). Reported per configuration: prefill and decode
tokens/s at batch 1 and 8, time to first token, peak resident memory; for speculation: the
acceptance rate, the speed-up over the same weights without speculation, and whether the
greedy outputs are identical.

Caveat: SmolLM2's linears were shipped as Q4_1 (4-bit, groups of 32, fp16 scale and minimum),
the embedding as Q8_0: the "original" already lies on a 4-bit grid, and our 4-bit rows re-round
those weights onto our own grid (integer zero points, bfloat16 scales).

``--llamacpp LABEL=FILE``: llama.cpp on a GGUF file, run by a worker process in the llama.cpp
venv (``benchmarks/llamacpp_worker.py``; llama.cpp never shares a process with torch) and
interleaved job by job with the torch runs, on the same prompt token ids (batch 1 only).
``--int4-folder``: a slimformer folder used as the 4-bit row (e.g. the GPTQ w4 g32 model whose
Q4_0 export ``benchmarks/gguf_export.py`` makes, so ours and llama.cpp run the same weights);
without it the 4-bit row is round-to-nearest w4 g32 asymmetric. The 8/4-bit rows are planned
(``PLAN``: decode through whichever path the planner times fastest here, e.g. slimformer's
packed-code kernel, or its int8-activation form ``packed-q8a``);
the table lists each row's decode paths. The fp32 and bf16 rows are planned by ``TextGenerator``
itself (an original model's plain linears: ``F.linear`` or slimformer's few-row dense kernel,
whichever times faster here), on its weight-sharing view: the HF rows run the untouched model.
``int8-float``: the 8-bit weights planned with
``int8_activations: keep`` (float activations only), for comparison. Wherever a planned row
rounds activations to int8 (``packed-q8a``), the cost in quality is measured teacher-forced on
held-out prose and code: KL of its next-token distribution to the same weights on float
activations, top-1 agreement, perplexity of both. ``gguf``: the source file's own quantized blocks
kept as they are (Q4_1 linears, Q8_0 head for SmolLM2), the very weights llama.cpp runs.

``--extra-rows FILE``: a JSON list of rows measured elsewhere (e.g. llama.cpp in its own
process) with at least ``config`` and ``decode_tps_b1``; they are added to the table, the JSON
and the plot, and their ratio to HF fp32 (measured here) is computed when they carry
``hf_fp32_decode_tps_b1`` from their own run or else against this run's figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from slimformer.data import TextSpec, load_texts  # noqa: E402
from slimformer.models import load_model  # noqa: E402
from slimformer.runtime import GenerationConfig, TextGenerator  # noqa: E402
from slimformer.runtime.generation import CACHE_LEN_MULTIPLE  # noqa: E402
from slimformer.runtime.speculative import SpeculationConfig  # noqa: E402

CHAT_QUESTIONS = (
    "What is the capital of France?",
    "Give three tips for staying focused while studying.",
    "Explain in two sentences why the sky is blue.",
    "What is the difference between a list and a tuple in Python?",
)
README_CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in one sentence.",
)


# ----- prompts ------------------------------------------------------------------------------------

def build_prompts(per_kind: int, split: str = "evaluation") -> dict[str, list[tuple[str, bool]]]:
    """``kind -> [(text, chat)]``: held-out passages and code (``split="evaluation"``), never used
    for tuning; ``split="calibration"`` gives prompts of the same kinds to tune settings on."""
    passages = [t for t in load_texts(TextSpec(source="pydoc-topics", split=split, n=40, seed=3)) if 500 < len(t) < 1400]
    code = [t for t in load_texts(TextSpec(source="stdlib-source", split=split, n=80, seed=3)) if t.lstrip().startswith("def ") and 300 < len(t)]
    instructions = (
        "Summarise the passage above in two sentences, reusing its wording.",
        "Extract the first three sentences of the passage above, word for word.",
    )
    n_summarise = max(per_kind, 2)  # one of each instruction
    summarise = [(f"{p}\n\n{instructions[i % 2]}", True) for i, p in enumerate(passages[:n_summarise])]
    code_prompts = []
    for snippet in code[:per_kind]:
        lines = snippet.splitlines()
        code_prompts.append(("\n".join(lines[: max(6, len(lines) // 2)]) + "\n", False))
    return {"chat": [(q, True) for q in CHAT_QUESTIONS[:per_kind]], "summarise": summarise, "code": code_prompts}


# ----- runners ------------------------------------------------------------------------------------

class _FirstTokenClock:
    """A ``generate`` streamer that notes when the first new token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # the first call carries the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run_hf(model, gen: TextGenerator, prompts: list[tuple[str, bool]], new_tokens: int) -> dict:
    """Hugging Face ``generate`` (dynamic cache, greedy) on a left-padded batch."""
    chat = prompts[0][1]
    ids, mask = gen.encode([p for p, _ in prompts], chat=chat)
    clock = _FirstTokenClock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=gen.tokenizer.pad_token_id, streamer=clock)
    end = time.perf_counter()
    first = clock.first or end
    batch = ids.shape[0]
    new = out[:, ids.shape[1]:]
    return {
        "ttft_s": first - start, "prefill_tps": int(mask.sum()) / (first - start),
        "decode_tps": batch * (new.shape[1] - 1) / (end - first) if end > first else float("nan"),
        "tokens": new.tolist(),
    }


def run_ours(gen: TextGenerator, prompts: list[tuple[str, bool]], new_tokens: int, speculation=None) -> dict:
    chat = prompts[0][1]
    config = GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False, speculation=speculation)
    result = gen.generate([p for p, _ in prompts], config, chat=chat)
    s = result.stats
    return {
        "ttft_s": s.ttft_s, "prefill_tps": s.prefill_tokens_per_s, "decode_tps": s.decode_tokens_per_s,
        "peak_rss_mb": s.peak_rss_mb, "tokens": result.tokens, "speculation": s.speculation,
    }


def quantized(base, bits: int):
    """A copy of ``base`` with round-to-nearest packed linears (8-bit per channel, or 4-bit g32
    asymmetric) and the tied embedding/head table at 8 bits per row."""
    from slimformer.compress import compress
    from slimformer.methods.quantization.rtn import RTNConfig
    from slimformer.recipe import recipe_from_steps

    model = copy.deepcopy(base)
    lin = RTNConfig(bits=8, group_size=None, symmetric=True) if bits == 8 else RTNConfig(bits=4, group_size=32, symmetric=False)
    emb = RTNConfig(bits=8, group_size=None, symmetric=True, targets=("embedding", "head"))
    compress(model, recipe_from_steps(lin, emb, name=f"rtn-w{bits}"))
    return model


def planned(loaded, **overrides):
    """``loaded`` with the execution planner's choice per layer on this machine (see ``PLAN``;
    ``overrides``: other plan settings, e.g. ``int8_activations="keep"``)."""
    from slimformer.runtime.planner import PlanSettings, plan_execution

    plan = plan_execution(loaded, PlanSettings(**{**PLAN, **overrides}))
    paths = sorted({(v["decode"], v["batch"]) for v in plan.layers.values()})
    print(f"planned {len(plan.layers)} layers in {plan.seconds:.1f} s: (decode, batch) paths {paths}", flush=True)
    return loaded


def weight_mb(model: torch.nn.Module) -> float:
    from slimformer.methods.quantization.modules import QuantizedModule
    from slimformer.runtime.execution import planned_forward_of

    seen, total = set(), 0
    for module in model.modules():
        tensors = list(module._parameters.values()) + list(module._buffers.values())
        if isinstance(module, QuantizedModule):
            tensors += list(getattr(module, "_runtime", {}).values())
        planned = planned_forward_of(module)
        if planned is not None:  # run-time copies the execution planner holds (e.g. a bf16 weight)
            tensors += planned.held_tensors()
        for t in tensors:
            if t is None or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**20


# ----- the run ------------------------------------------------------------------------------------

def machine() -> dict:
    name, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not name.strip(" x86_64"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {
        "cpu": name, "flags": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


class LlamaCppWorker:
    """A ``benchmarks/llamacpp_worker.py`` process in the llama.cpp venv, driven over pipes."""

    def __init__(self, python: str, threads: int) -> None:
        import subprocess

        self.threads = threads
        env = dict(os.environ)
        if os.environ.get("LLAMACPP_PYTHONPATH"):  # e.g. a llama_cpp package assembled from a build folder
            env["PYTHONPATH"] = os.environ["LLAMACPP_PYTHONPATH"]
        self.proc = subprocess.Popen([python, str(ROOT / "llamacpp_worker.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.version = None

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the llama.cpp worker exited (see its stderr above)")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def load(self, name: str, path: str) -> None:
        self.version = self.ask(op="load", name=name, path=path, threads=self.threads, n_ctx=2048).get("version")

    def close(self) -> None:
        try:
            self.ask(op="quit")
        except (RuntimeError, BrokenPipeError, json.JSONDecodeError):
            pass
        self.proc.wait(timeout=30)


def run_llamacpp(worker: LlamaCppWorker, name: str, gen: TextGenerator, prompts: list[tuple[str, bool]], new_tokens: int) -> dict:
    """llama.cpp on the same prompt token ids as ours (batch 1; greedy argmax)."""
    ids, _mask = gen.encode([prompts[0][0]], chat=prompts[0][1])
    reply = worker.ask(op="generate", name=name, ids=ids[0].tolist(), new_tokens=new_tokens)
    return {
        "ttft_s": reply["prefill_s"], "prefill_tps": ids.shape[1] / reply["prefill_s"],
        "decode_tps": (new_tokens - 1) / reply["decode_s"], "tokens": [reply["tokens"]], "peak_rss_mb": float("nan"),
    }


INT8 = "ours int8 (rtn w8, head 8)"
INT8_FLOAT = "ours int8 (rtn w8, head 8), float activations"
GGUF_KEPT = "ours Q4_1 blocks kept (source file, head Q8_0)"
PLAN = {"memory": "balanced", "activations": "float32", "decode_tokens": 1, "batch_tokens": 64, "split_tokens": 8, "repeats": 3}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3, help="measured passes (after a short warm-up of every configuration)")
    ap.add_argument("--per-kind", type=int, default=2, help="prompts per kind")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch (and llama.cpp) threads; default: torch's")
    ap.add_argument("--chat-tokens", type=int, default=48, help="new tokens of the README chat answers (0: skip them; see generation_chat.py)")
    ap.add_argument("--configs", nargs="+", default=None,
                    help="weight configurations to run (default: all): HF-fp32 HF-bf16 fp32 bf16 int8 int8-float int4 gguf "
                         "(gguf: the source file's own Q4_1/Q8_0 blocks kept, the same weights llama.cpp runs)")
    ap.add_argument("--spec-on", nargs="+", default=["ours fp32", INT8], help="configurations run with each speculation mode")
    ap.add_argument("--spec-modes", nargs="+", default=["prompt-lookup", "self", "draft"],
                    help="speculation modes: prompt-lookup, prompt-lookup-fixed (the fixed-width form, for comparison), self, draft")
    ap.add_argument("--exit-layer", type=int, default=8, help="blocks of the self-speculation draft")
    ap.add_argument("--int4-folder", default=None, help="slimformer folder used as the 4-bit row (default: rtn w4 g32)")
    ap.add_argument("--llamacpp", nargs="*", default=[], help="LABEL=FILE.gguf run by llama.cpp, interleaved")
    ap.add_argument("--llamacpp-python", default=os.environ.get("LLAMACPP_PYTHON", "/work/venvs/llamacpp/bin/python"))
    ap.add_argument("--no-batch8", action="store_true")
    ap.add_argument("--extra-rows", default=None, help="JSON list of rows measured in another process (llama.cpp)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--name", default="generation")
    ap.add_argument("--rewrite", action="store_true", help="only rewrite the table and plot from the saved JSON")
    ap.add_argument("--decode-from-log", default=None, help="with --rewrite: recompute decode tok/s from this run's log")
    ap.add_argument("--first-pass", type=int, default=1, help="with --decode-from-log: ignore earlier passes")
    ap.add_argument("--drop", nargs="*", default=[], help="with --decode-from-log: KIND:INDEX@PASS jobs to ignore (e.g. a compiling run)")
    args = ap.parse_args(argv)
    if args.rewrite:
        result = json.loads((Path(args.out) / f"{args.name}.json").read_text())
        if args.decode_from_log:
            decode_from_log(result, Path(args.decode_from_log), args.first_pass, args.drop)
            (Path(args.out) / f"{args.name}.json").write_text(json.dumps(result, indent=2, default=float))
        write(result, Path(args.out), args.name)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    compile_flag = False if args.no_compile else None
    started = time.time()
    loads = [os.getloadavg()]
    wanted = set(args.configs or ["HF-fp32", "HF-bf16", "fp32", "bf16", "int8", "int8-float", "int4", "gguf"])

    base = load_model(args.model)
    prompts = build_prompts(args.per_kind)
    if args.int4_folder:
        int4_name = "ours int4 (gptq w4 g32 sym, head Q8_0)"
        # The planner times each layer format for decode (1 row) and prefill-sized batches (64 rows);
        # inputs under 8 rows (a decode step, a speculative verify step) take the decode path.
        int4_model = load_model(args.int4_folder, execution=PLAN)
    else:
        int4_name = "ours int4 (rtn w4 g32, head 8)"
        int4_model = planned(quantized(base, 4)) if "int4" in wanted else None
    args.int4_name = int4_name
    variants: dict[str, TextGenerator] = {"ours fp32": TextGenerator(base, compile=compile_flag)}
    if "bf16" in wanted:
        variants["ours bf16"] = TextGenerator(base, dtype=torch.bfloat16, compile=compile_flag)
    if "int8" in wanted:
        variants[INT8] = TextGenerator(planned(quantized(base, 8)), compile=compile_flag)
    if "int8-float" in wanted:
        variants[INT8_FLOAT] = TextGenerator(planned(quantized(base, 8), int8_activations="keep"), compile=compile_flag)
    if int4_model is not None:
        variants[int4_name] = TextGenerator(int4_model, compile=compile_flag)
    if "gguf" in wanted and (args.model == "smollm2" or str(args.model).endswith(".gguf")):
        from slimformer.io.gguf_import import load_gguf
        from slimformer.models.gguf import smollm2_path

        source = smollm2_path() if args.model == "smollm2" else args.model
        variants[GGUF_KEPT] = TextGenerator(planned(load_gguf(source, keep_quantized=True)), compile=compile_flag)
    hf = {"HF generate fp32": base.model}
    if "HF-bf16" in wanted:
        hf["HF generate bf16"] = copy.deepcopy(base.model).to(torch.bfloat16)
    ref = variants["ours fp32"]
    worker = None
    llama: dict[str, str] = {}

    def start_llamacpp() -> None:
        """Start the llama.cpp worker and load its files (None when llama.cpp cannot be imported
        yet, e.g. still building: retried before each pass, and its rows cover the passes after)."""
        nonlocal worker
        if not args.llamacpp or worker is not None:
            return
        try:
            w = LlamaCppWorker(args.llamacpp_python, torch.get_num_threads())
            for item in args.llamacpp:
                label, path = item.split("=", 1)
                w.load(f"llama.cpp {label}", path)
                llama[f"llama.cpp {label}"] = path
        except (RuntimeError, OSError, json.JSONDecodeError) as exc:
            print(f"llama.cpp not available yet: {exc}", flush=True)
            llama.clear()
            return
        worker = w
        args.llamacpp_version = w.version
        args.llamacpp_from_pass = len(loads)

    args.llamacpp_version = None
    start_llamacpp()
    draft_model = variants[int4_name].loaded if int4_name in variants else None
    all_modes = {
        "prompt-lookup": lambda: SpeculationConfig("prompt-lookup"),
        # the fixed form (the default before drafts were sized by measured verify costs), for comparison
        "prompt-lookup-fixed (6 tokens from a 3-token match)": lambda: SpeculationConfig("prompt-lookup", adaptive=False),
        f"self (first {args.exit_layer} blocks)": lambda: SpeculationConfig("self", exit_layer=args.exit_layer, num_draft=3),
        "draft (int4 copy)": lambda: SpeculationConfig("draft", draft=draft_model, num_draft=4),
    }
    spec_modes = {k: v for k, v in all_modes.items() if k.split(" ")[0] in args.spec_modes and (draft_model or not k.startswith("draft"))}
    spec_targets = tuple(n for n in args.spec_on if n in variants)

    # Every (configuration, prompt) pair; all are run once per pass, interleaved.
    def make_jobs() -> list:
        jobs = []
        for kind, items in prompts.items():
            for i, item in enumerate(items):
                for name in list(hf) + list(variants) + list(llama):
                    jobs.append((name, None, kind, i, [item]))
                for name in spec_targets:
                    for mode in spec_modes:
                        if mode.startswith("self") and kind == "code":
                            continue
                        jobs.append((name, mode, kind, i, [item]))
        if not args.no_batch8:
            batch8 = [p for items in prompts.values() for p in items if p[1]][:8]
            batch8 = (batch8 * 8)[:8]
            for name in ["HF generate fp32"] + list(variants):
                jobs.append((name, None, "batch8", 0, batch8))
        return jobs

    jobs = make_jobs()

    def run(name, mode, items, n):
        if name in hf:
            out = run_hf(hf[name], ref, items, n)
            out["peak_rss_mb"] = float("nan")
            return out
        if name in llama:
            return run_llamacpp(worker, name, ref, items, n)
        return run_ours(variants[name], items, n, spec_modes[mode]() if mode else None)

    # Warm-up: every configuration once on a short generation (first-call allocations, compilation).
    seen = set()

    def warm_up() -> None:
        for name, mode, kind, i, items in jobs:
            # The compiled step is specialised to the static cache's length (prompt + new tokens,
            # rounded up to CACHE_LEN_MULTIPLE): warm up every length bucket the passes will use.
            width = ref.encode([items[0][0]], chat=items[0][1])[0].shape[1]
            bucket = -(-(width + args.new_tokens) // CACHE_LEN_MULTIPLE)
            if (name, mode, len(items), bucket) not in seen:
                seen.add((name, mode, len(items), bucket))
                t0 = time.time()
                run(name, mode, items, args.new_tokens)  # the very cache length the passes use
                print(f"warm-up {name} {mode or ''} batch {len(items)}: {time.time() - t0:.1f} s", flush=True)

    warm_up()
    args.fidelity = activation_fidelity(variants)
    chat_outputs = readme_chat(variants, args) if args.chat_tokens > 0 else []
    records: dict[tuple, list[dict]] = {}
    for rep in range(1, args.repeats + 1):
        if args.llamacpp and worker is None:
            start_llamacpp()
            if worker is not None:
                jobs = make_jobs()
                warm_up()
        for job in jobs:
            name, mode, kind, i, items = job
            out = run(name, mode, items, args.new_tokens)
            records.setdefault((name, mode, kind, i), []).append(out)
            print(f"[{rep}] {name:40s} {mode or '-':24s} {kind:9s} {i} decode {out['decode_tps']:.1f} tok/s", flush=True)
        loads.append(os.getloadavg())
        finish(args, records, prompts, variants, hf, loads, started, chat_outputs)
    if worker:
        worker.close()
    return 0


def decode_from_log(result: dict, log: Path, first_pass: int, drop: list[str] = ()) -> None:
    """Recompute the decode tok/s medians (batch 1), the ratios to HF fp32 and the speculation
    speed-ups from the per-job lines of the run's log, keeping passes >= ``first_pass`` (e.g. to
    drop a pass whose first long prompts included compiling the decode step for a new cache
    length). Acceptance, identity of outputs, prefill and TTFT stay as the run measured them."""
    import re

    med = statistics.median
    pat = re.compile(r"^\[(\d+)\] (.+?)\s{2,}(\S.*?)\s+(chat|summarise|code|batch8)\s+(\d+) decode ([\d.]+|nan) tok/s")
    runs: dict[tuple, list[float]] = {}
    for line in log.read_text().splitlines():
        m = pat.match(line)
        if m and int(m.group(1)) >= first_pass and f"{m.group(4)}:{m.group(5)}@{m.group(1)}" not in drop:
            name, mode = m.group(2).strip(), m.group(3).strip()
            runs.setdefault((name, None if mode == "-" else mode, m.group(4)), []).append(float(m.group(6)))
    known = {(r["weights"], None if r["speculation"] == "none" else r["speculation"]) for r in result["rows"]}
    for name, mode in sorted({(n, md) for (n, md, _k) in runs} - known, key=str):  # e.g. llama.cpp rows of later passes
        result["rows"].append({"config": name + (f" + {mode}" if mode else ""), "weights": name, "speculation": mode or "none",
                               "per_kind": {k: {} for (n, md, k) in runs if n == name and md == mode and k != "batch8"}})
    for row in result["rows"]:
        name, mode = row["weights"], None if row["speculation"] == "none" else row["speculation"]
        b1 = [v for (n, md, k), vs in runs.items() if n == name and md == mode and k != "batch8" for v in vs]
        if b1:
            row["decode_tps_b1"] = med(b1)
        for kind, entry in row.get("per_kind", {}).items():
            mine = runs.get((name, mode, kind))
            if mine:
                entry["decode_tps"] = med(mine)
                if mode and runs.get((name, None, kind)):
                    entry["speedup"] = entry["decode_tps"] / med(runs[(name, None, kind)])
    hf = next(r for r in result["rows"] if r["config"] == "HF generate fp32")["decode_tps_b1"]
    for row in result["rows"]:
        row["decode_vs_hf_fp32"] = row["decode_tps_b1"] / hf if row.get("decode_tps_b1") else None
    result["decode_passes"] = (f"decode figures recomputed from the run's log (passes >= {first_pass}"
                               + (f"; left out: {', '.join(drop)}, runs that included compiling the decode step for a new cache length" if drop else "") + ")")


def finish(args, records, prompts, variants, hf, loads, started, chat_outputs) -> None:
    rows = summarise(records, prompts, variants, hf)
    extra = json.loads(Path(args.extra_rows).read_text()) if args.extra_rows else []
    hf_fp32 = next(r for r in rows if r["config"] == "HF generate fp32")["decode_tps_b1"]
    for row in extra:
        row.setdefault("source", "extra rows (measured in another process)")
        ref_tps = row.get("hf_fp32_decode_tps_b1") or hf_fp32
        row["decode_vs_hf_fp32"] = row["decode_tps_b1"] / ref_tps if row.get("decode_tps_b1") else None
    result = {
        "machine": machine(), "load_average": loads, "model": args.model, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "compiled": {n: g.compile for n, g in variants.items()},
        "llama_cpp_version": getattr(args, "llamacpp_version", None), "passes_done": len(loads) - 1,
        "llama_cpp_from_pass": getattr(args, "llamacpp_from_pass", None),
        "rows": rows + extra, "readme_chat": chat_outputs, "seconds": time.time() - started,
        "decode_paths": {n: decode_paths(g.model) for n, g in variants.items()},
        "activation_fidelity": getattr(args, "fidelity", {}),
        "prompts": {k: [p[:200] for p, _ in v] for k, v in prompts.items()},
        "same_bits_pairs": [(o, l) for o, l in ((args.int4_name, "llama.cpp Q4_0 (our GPTQ export)"), (INT8, "llama.cpp Q8_0 (our RTN export)"),
                                                  (args.int4_name, "llama.cpp Q4_1 (source file)"),
                                                  (GGUF_KEPT, "llama.cpp Q4_1 (source file)"))],
    }
    write(result, Path(args.out), args.name)


def summarise(records, prompts, variants, hf) -> list[dict]:
    """One row per configuration: medians over prompts and repeats; speculation rows carry
    acceptance, identity of outputs with the same weights without speculation, speed-up per kind."""
    med = statistics.median
    names = list(hf) + list(variants)
    names += sorted({n for (n, _m, _k, _i) in records} - set(names))
    rows = []
    configs = sorted({(n, m) for (n, m, _k, _i) in records}, key=lambda c: (names.index(c[0]), c[1] or ""))
    for name, mode in configs:
        mine = {k: v for k, v in records.items() if k[0] == name and k[1] == mode}
        b1 = [r for k, runs in mine.items() if k[2] != "batch8" for r in runs]
        b8 = [r for k, runs in mine.items() if k[2] == "batch8" for r in runs]
        row = {
            "config": name + (f" + {mode}" if mode else ""), "weights": name, "speculation": mode or "none",
            "decode_tps_b1": med(r["decode_tps"] for r in b1) if b1 else None,
            "prefill_tps_b1": med(r["prefill_tps"] for r in b1) if b1 else None,
            "ttft_ms_b1": 1000 * med(r["ttft_s"] for r in b1) if b1 else None,
            "decode_tps_b8": med(r["decode_tps"] for r in b8) if b8 else None,
            "prefill_tps_b8": med(r["prefill_tps"] for r in b8) if b8 else None,
            "peak_rss_mb": max((r["peak_rss_mb"] for r in b1 + b8 if r["peak_rss_mb"] == r["peak_rss_mb"]), default=None),
        }
        if name in variants:
            row["weight_mb"] = weight_mb(variants[name].model)
        per_kind = {}
        for kind in prompts:
            runs = [(k, r) for k, rs in mine.items() if k[2] == kind for r in rs]
            if not runs:
                continue
            entry = {"decode_tps": med(r["decode_tps"] for _, r in runs)}
            if mode:
                plain = [r for k, rs in records.items() if k[0] == name and k[1] is None and k[2] == kind for r in rs]
                entry["speedup"] = entry["decode_tps"] / med(r["decode_tps"] for r in plain)
                entry["acceptance"] = med(r["speculation"]["acceptance_rate"] for _, r in runs)
                entry["identical"] = all(r["tokens"] == records[(name, None, kind, k[3])][0]["tokens"] for k, r in runs)
            per_kind[kind] = entry
        row["per_kind"] = per_kind
        rows.append(row)
    hf_fp32 = next(r for r in rows if r["config"] == "HF generate fp32")["decode_tps_b1"]
    for row in rows:
        row["decode_vs_hf_fp32"] = row["decode_tps_b1"] / hf_fp32 if row["decode_tps_b1"] else None
    return rows


def decode_paths(model: torch.nn.Module) -> dict[str, int]:
    """Planned linears per decode path (empty for an unplanned model)."""
    from collections import Counter

    from slimformer.runtime.execution import PlannedForward, planned_forward_of

    found = [planned_forward_of(m) for m in model.modules()]
    return dict(Counter(pf.decode for pf in found if isinstance(pf, PlannedForward)))


@torch.no_grad()
def activation_fidelity(variants: dict[str, TextGenerator], docs_per_source: int = 4, tokens: int = 192) -> dict:
    """For every variant whose plan rounds activations to int8 on the decode path (``packed-q8a``):
    teacher-forced next-token distributions on held-out prose (pydoc-topics) and code (standard
    library sources), every planned linear forced through its decode path, against the same stored
    weights dequantized to float32 (``unpack-fp32``): mean KL (nats/token), top-1 agreement, perplexity."""
    import torch.nn.functional as F

    from slimformer.runtime.execution import PATHS, PlannedForward, planned_forward_of

    texts = {
        "prose (pydoc-topics)": load_texts(TextSpec(source="pydoc-topics", split="evaluation", n=docs_per_source, min_chars=1500, seed=17)),
        "code (stdlib source)": load_texts(TextSpec(source="stdlib-source", split="evaluation", n=docs_per_source, min_chars=1500, seed=17)),
    }
    out: dict[str, dict] = {}
    for name, gen in variants.items():
        pfs = [pf for pf in (planned_forward_of(m) for m in gen.model.modules()) if isinstance(pf, PlannedForward)]
        if not any(PATHS[pf.decode].rounding == "int8-act" for pf in pfs):
            continue
        saved = [(pf.decode, pf.split_rows) for pf in pfs]
        per_text = {}
        try:
            for label, docs in texts.items():
                kl_sum = top1 = nll_f = nll_q = count = 0.0
                for doc in docs:
                    ids = gen.tokenizer(doc, return_tensors="pt").input_ids[:, :tokens]
                    logits = {}
                    for mode in ("float", "int8"):
                        for pf, (dec, _split) in zip(pfs, saved):
                            pf.decode = dec if mode == "int8" else "unpack-fp32"
                            pf.split_rows = 1 << 30  # every call takes the decode path
                        logits[mode] = gen.model(input_ids=ids).logits[0, :-1].float()
                    target = ids[0, 1:]
                    lf, lq = F.log_softmax(logits["float"], -1), F.log_softmax(logits["int8"], -1)
                    kl_sum += float((lf.exp() * (lf - lq)).sum())
                    top1 += float((lf.argmax(-1) == lq.argmax(-1)).sum())
                    nll_f += float(-lf.gather(1, target[:, None]).sum())
                    nll_q += float(-lq.gather(1, target[:, None]).sum())
                    count += target.numel()
                per_text[label] = {"tokens": int(count), "kl": kl_sum / count, "top1": top1 / count,
                                   "ppl_float": math.exp(nll_f / count), "ppl_int8": math.exp(nll_q / count)}
                print(f"int8 activations, {name}, {label}: KL {per_text[label]['kl']:.4f}, top-1 {per_text[label]['top1']:.1%}", flush=True)
        finally:
            for pf, (dec, split) in zip(pfs, saved):
                pf.decode, pf.split_rows = dec, split
        out[name] = per_text
    return out


def readme_chat(variants, args) -> list[dict]:
    """Greedy answers to the README's example chat prompts, original and 4-bit."""
    out = []
    for prompt in README_CHAT_PROMPTS:
        entry = {"prompt": prompt}
        for label, name in (("original", "ours fp32"), ("4-bit", args.int4_name)):
            if name not in variants:
                continue
            entry[label] = variants[name].generate(prompt, GenerationConfig(max_new_tokens=args.chat_tokens), chat=True).texts[0]
        if "4-bit" in entry:
            entry["same"] = entry["4-bit"] == entry["original"]
        entry["4-bit model"] = args.int4_name
        out.append(entry)
    return out


def _fmt(value, spec="{:.1f}") -> str:
    return "–" if value is None else spec.format(value)


def write(result: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=float))
    m = result["machine"]
    loads = result["load_average"]
    passes = ", ".join(f"{x[0]:.1f}" for x in loads)
    lines = [
        f"# Generation speed: {result['model']} (greedy, {result['new_tokens']} new tokens)",
        "",
        f"CPU: {m['cpu']}; flags: {', '.join(m['flags']) or 'none of avx512/amx'}; {m['threads']} threads; torch {m['torch']}"
        f"{'; llama.cpp (llama-cpp-python) ' + result['llama_cpp_version'] if result.get('llama_cpp_version') else ''}. "
        f"Load average (1 min) at the start and after each pass: {passes} on 2 cores shared with other engineers' jobs"
        f"{' (**taken under load**: absolute tokens/s are shares of a contended CPU; compare ratios, measured interleaved in one run)' if max(x[0] for x in loads) > 2.5 else ''}. "
        f"Decode step compiled: {', '.join(f'{k}: {v}' for k, v in result['compiled'].items()) if isinstance(result['compiled'], dict) else result['compiled']}. "
        f"Medians over prompts and {result.get('passes_done', result['repeats'])} interleaved passes"
        f"{' (llama.cpp rows from pass ' + str(result['llama_cpp_from_pass']) + ' on: its build finished during the run)' if (result.get('llama_cpp_from_pass') or 1) > 1 else ''}; "
        f"{result['seconds'] / 60:.0f} min{'; ' + result['decode_passes'] if result.get('decode_passes') else ''}.",
        "",
        "SmolLM2-135M-Instruct's linears were stored as Q4_1 (4-bit, g32, fp16 scale and minimum) and its embedding as Q8_0:",
        "the 'original' already lies on a 4-bit grid; our 4-bit rows re-round it to our own grid.",
        "",
        "| configuration | weights MB | decode tok/s b1 | × HF fp32 | prefill tok/s b1 | TTFT ms b1 | decode tok/s b8 | prefill tok/s b8 | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['config']} | {_fmt(r.get('weight_mb'), '{:.0f}')} | {_fmt(r.get('decode_tps_b1'))} | {_fmt(r.get('decode_vs_hf_fp32'), '{:.2f}×')} | "
            f"{_fmt(r.get('prefill_tps_b1'), '{:.0f}')} | {_fmt(r.get('ttft_ms_b1'), '{:.0f}')} | {_fmt(r.get('decode_tps_b8'))} | "
            f"{_fmt(r.get('prefill_tps_b8'), '{:.0f}')} | {_fmt(r.get('peak_rss_mb'), '{:.0f}')} |"
        )
    lines += ["", "## Speculation per prompt kind (greedy; speed-up over the same weights without speculation)", "",
              "| configuration | kind | acceptance | decode tok/s | speed-up | outputs identical |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r.get("speculation", "none") == "none":
            continue
        for kind, e in r.get("per_kind", {}).items():
            lines.append(f"| {r['config']} | {kind} | {e['acceptance']:.0%} | {e['decode_tps']:.1f} | {e['speedup']:.2f}× | {'yes' if e['identical'] else 'NO'} |")
    paths = {n: p for n, p in result.get("decode_paths", {}).items() if p}
    if paths:
        lines += ["", "Decode paths the planner chose on this machine (linears per path; packed-q8a rounds activations to int8 per 32 columns): "
                  + "; ".join(f"{n}: " + ", ".join(f"{p} ×{c}" for p, c in ps.items()) for n, ps in paths.items()) + "."]
    fid = result.get("activation_fidelity") or {}
    if fid:
        lines += ["", "## Int8 activations (packed-q8a) against float activations, same weights", "",
                  "Teacher-forced on held-out text (4 documents of each kind, their first 192 tokens), every linear through its decode path; "
                  "the reference runs the same stored weights dequantized to float32 (unpack-fp32).", "",
                  "| configuration | text | tokens | KL to float activations (nats/token) | top-1 agreement | ppl, float activations | ppl, int8 activations |",
                  "|---|---|---|---|---|---|---|"]
        for n, per_text in fid.items():
            for text, e in per_text.items():
                lines.append(f"| {n} | {text} | {e['tokens']} | {e['kl']:.4f} | {e['top1']:.1%} | {e['ppl_float']:.2f} | {e['ppl_int8']:.2f} |")
    by_name = {r["config"]: r for r in result["rows"]}
    pairs = [(o, l) for o, l in result.get("same_bits_pairs", []) if o in by_name and l in by_name]
    if pairs:
        lines += ["", "## Ours against llama.cpp at the same bits (decode tok/s, batch 1, same run)", "",
                  "| ours | llama.cpp | ours tok/s | llama.cpp tok/s | ours / llama.cpp |", "|---|---|---|---|---|"]
        for o, l in pairs:
            a, b = by_name[o]["decode_tps_b1"], by_name[l]["decode_tps_b1"]
            lines.append(f"| {o} | {l} | {a:.1f} | {b:.1f} | {a / b:.2f}× |")
    if result["readme_chat"]:
        lines += ["", f"## README chat prompts, greedy ({result['readme_chat'][0].get('4-bit model', '4-bit')} vs the original)", ""]
    for e in result["readme_chat"]:
        lines += [f"**{e['prompt']}**", "", f"- original: {e['original']!r}", f"- 4-bit: {e.get('4-bit')!r}",
                  f"- identical: {'yes' if e.get('same') else 'no'}", ""]
    write_with_prompts(lines, result["prompts"], out, name, result, plot)


def write_with_prompts(lines: list[str], prompts: dict[str, list[str]], out: Path, name: str, result: dict, plot_fn) -> None:
    """Append the prompts (first 120 characters) to ``lines``, write ``name``.md and its plot."""
    lines += ["", "Prompts (first 120 characters):", ""]
    for kind, ps in prompts.items():
        for p in ps:
            lines.append(f"- {kind}: `{p[:120].replace(chr(10), ' ').replace('`', '')}`")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot_fn(result, out / f"{name}.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("decode_tps_b1")]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    names = [r["config"] for r in rows]
    ax.barh(range(len(rows)), [r["decode_tps_b1"] for r in rows], color=["#999" if r["config"].startswith("HF") else "#3a7" for r in rows])
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens/s, batch 1 (median)")
    m = result["machine"]
    ax.set_title(f"{result['model']} on {m['cpu']} ({m['threads']} threads)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
