"""llama.cpp side of benchmarks/gguf_export.py; runs in the llama.cpp venv (no torch here).

Makes llama.cpp's own requantizations of the source (``llama_model_quantize`` with
``allow_requantize``), then, for every file: perplexity, KL to the source file's distributions
and top-1 agreement on the held-out token sequences of ``tokens.json``; for our files, the match
of llama.cpp's logits with slimformer's (``<name>.logits.npy``); decode tokens/s (greedy,
interleaved rounds, medians). Writes ``llamacpp.json`` in the work folder.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

import llama_cpp

FTYPES = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}
CHAT_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France? Answer in two sentences and name one famous landmark there.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def requantize(source: Path, out: Path, gguf_type: str, threads: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[gguf_type]
    params.allow_requantize = True
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed for {gguf_type} ({rc})")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def cpu() -> dict:
    info = {"model": "unknown", "flags": [], "threads": os.cpu_count()}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            info["model"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["flags"] = sorted(f for f in flags if f in {"avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx_vnni"})
            break
    return info


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--texts", type=int, default=None, help="use only the first N sequences of each kind")
    p.add_argument("--max-tokens", type=int, default=None, help="truncate each sequence to N tokens")
    p.add_argument("--only", nargs="*", default=None, help="measure only these files (the source is always measured)")
    args = p.parse_args()
    work, source = Path(args.work), Path(args.source)
    prep = json.loads((work / "prepare.json").read_text())
    tokens = json.loads((work / "tokens.json").read_text())
    tokens["eval"] = {k: [ids[: args.max_tokens] for ids in v[: args.texts]] for k, v in tokens["eval"].items()}
    files: dict[str, tuple[Path, str]] = {"source (Q4_1 file)": (source, "original file")}
    for name, v in prep["variants"].items():
        files[name] = (Path(v["file"]), "slimformer")
    for gguf_type in ("Q8_0", "Q4_0", "Q4_1"):
        out = work / f"llama-quantize-{gguf_type}.gguf"
        if not out.exists():
            requantize(source, out, gguf_type, args.threads)
        files[f"llama.cpp-{gguf_type}"] = (out, "llama-quantize --allow-requantize")
    if args.only:
        files = {k: v for k, v in files.items() if k in args.only or k == "source (Q4_1 file)"}
    print("files:", {k: str(v[0]) for k, v in files.items()}, flush=True)

    def load(path: Path, logits_all: bool) -> llama_cpp.Llama:
        return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=args.threads, logits_all=logits_all, verbose=False)

    # ----- quality: every file against the source file's own distributions ---------------------
    models = {name: load(path, True) for name, (path, _) in files.items()}
    ref_name = "source (Q4_1 file)"
    acc = {name: {"kl": {}, "nll": {}, "top1": [0, 0]} for name in models}
    for kind, seqs in tokens["eval"].items():
        for ids in seqs:
            ref = log_softmax(logits(models[ref_name], ids))[:-1]
            target = np.array(ids[1:])
            p_ref = np.exp(ref)
            for name, llm in models.items():
                lp = ref if name == ref_name else log_softmax(logits(llm, ids))[:-1]
                kl = (p_ref * (ref - lp)).sum(-1)
                nll = -lp[np.arange(len(target)), target]
                a = acc[name]
                a["kl"].setdefault(kind, []).extend(kl.tolist())
                a["nll"].setdefault(kind, []).extend(nll.tolist())
                a["top1"][0] += int((lp.argmax(-1) == ref.argmax(-1)).sum())
                a["top1"][1] += len(target)
        print(f"quality: {kind} done", flush=True)
    rows = {}
    for name, a in acc.items():
        all_kl = [x for v in a["kl"].values() for x in v]
        rows[name] = {
            "made_by": files[name][1],
            "file": str(files[name][0]),
            "size_mb": files[name][0].stat().st_size / 1e6,
            "quality": {
                "kl_mean": float(np.mean(all_kl)),
                "kl": {k: float(np.mean(v)) for k, v in a["kl"].items()},
                "ppl": {k: float(np.exp(np.mean(v))) for k, v in a["nll"].items()},
                "top1": a["top1"][0] / max(1, a["top1"][1]),
            },
        }
    # ----- our files against our model's own logits ---------------------------------------------
    match = {}
    for name in [n for n in prep["variants"] if n in models]:
        ours = np.load(work / f"{name}.logits.npy")
        diffs, agree, count = [], 0, 0
        for i, ids in enumerate(tokens["check"]):
            lc = logits(models[name], ids)
            d = np.abs(lc - ours[i][: len(ids)])
            diffs.append(d)
            agree += int((lc.argmax(-1) == ours[i][: len(ids)].argmax(-1)).sum())
            count += len(ids)
        alld = np.concatenate([d.reshape(-1) for d in diffs])
        match[name] = {"max_abs": float(alld.max()), "mean_abs": float(alld.mean()), "top1": agree / count}
    # the source file against the float evaluation of its exact weights (our kept model)
    if "ours-kept-Q4_1" in models:
        ours = np.load(work / "ours-kept-Q4_1.logits.npy")
        diffs = [np.abs(logits(models[ref_name], ids) - ours[i][: len(ids)]).reshape(-1) for i, ids in enumerate(tokens["check"])]
        allr = np.concatenate(diffs)
        match["source (Q4_1 file) vs its own weights in float"] = {"max_abs": float(allr.max()), "mean_abs": float(allr.mean()),
                                                                  "top1": match["ours-kept-Q4_1"]["top1"]}
    n_tokens = sum(len(ids) - 1 for seqs in tokens["eval"].values() for ids in seqs)
    per_kind = {k: sum(len(ids) - 1 for ids in seqs) for k, seqs in tokens["eval"].items()}
    del models
    # ----- decode speed ---------------------------------------------------------------------
    speed_models = {name: load(path, False) for name, (path, _) in files.items()}
    prompt = speed_models[ref_name].tokenize(CHAT_PROMPT.encode(), add_bos=False, special=True)
    decode = {name: [] for name in speed_models}
    prefill = {name: [] for name in speed_models}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name, llm in speed_models.items():
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            t1 = time.perf_counter()
            for _ in range(args.new_tokens):
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                llm.eval([tok])
            t2 = time.perf_counter()
            prefill[name].append(len(prompt) / (t1 - t0))
            decode[name].append(args.new_tokens / (t2 - t1))
    load_after = os.getloadavg()
    for name in rows:
        rows[name]["decode_tps"] = statistics.median(decode[name])
        rows[name]["decode_tps_all"] = decode[name]
        rows[name]["prefill_tps"] = statistics.median(prefill[name])
    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu(), "threads": args.threads, "rounds": args.rounds, "new_tokens": args.new_tokens, "prompt_tokens": len(prompt),
        "llama_cpp_version": llama_cpp.__version__, "loadavg_before": [round(x, 1) for x in load_before],
        "loadavg_after": [round(x, 1) for x in load_after], "n_tokens": n_tokens, "tokens_per_kind": per_kind,
        "rows": rows, "logit_match": match,
    }
    (work / "llamacpp.json").write_text(json.dumps(out, indent=2))
    print("done", flush=True)


if __name__ == "__main__":
    main()
