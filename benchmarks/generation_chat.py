"""Greedy answers of SmolLM2-135M-Instruct to the README's example chat prompts: the original
against 4-bit models made by slimformer, all through slimformer's decode loop (eager, float32
activations, every weight dequantized exactly per call: no bf16 rounding of weights or
activations, so any difference comes from the 4-bit weights alone).

    python benchmarks/generation_chat.py [--int4-folder FOLDER] [--new-tokens 48]

4-bit models:

- ``kept Q4_1``: the source GGUF loaded with every quantized tensor kept as it is
  (``load_gguf(..., keep_quantized=True)``: GGUF Q4_1 block modules for the linears, Q8_0 for the
  embedding/head; 4-bit in memory). These are the original's own weights, so equal answers are
  expected: the check is that slimformer's packed modules compute them exactly;
- ``GPTQ Q4_0``: ``--int4-folder``, GPTQ 4-bit symmetric g32 re-quantization of the source
  (the model ``benchmarks/gguf_export.py`` exports as Q4_0), a real further compression.

Caveat: the source's linears are Q4_1 (4-bit, g32, fp16 scale and minimum) and its embedding
Q8_0, so the "original" already lies on a 4-bit grid.
Writes ``benchmarks/results/generation_chat.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from slimformer.io.gguf_import import load_gguf  # noqa: E402
from slimformer.methods.quantization.modules import QuantizedLinear  # noqa: E402
from slimformer.models import load_model  # noqa: E402
from slimformer.models.gguf import smollm2_path  # noqa: E402
from slimformer.runtime import GenerationConfig, TextGenerator  # noqa: E402

README_CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in one sentence.",
)


def exact(loaded):
    """Every 4-bit linear through its exact float32 per-call dequantization ("unpack")."""
    for module in loaded.model.modules():
        if isinstance(module, QuantizedLinear):
            module.use_kernels("unpack")
    return loaded


def packed_mb(model: torch.nn.Module) -> float:
    """Bytes of all parameters and buffers (each tensor once), MB."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--int4-folder", default="/tmp/slimformer_gguf_export/ours-gptq-folder")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    started = time.time()
    models = {"original (float32 dequantized source)": load_model("smollm2")}
    models["kept Q4_1 (source's 4-bit codes kept)"] = load_gguf(smollm2_path(), keep_quantized=True)
    if args.int4_folder and Path(args.int4_folder).exists():
        models["GPTQ Q4_0 (w4 g32 symmetric)"] = exact(load_model(args.int4_folder, execution="off"))
    gens = {name: TextGenerator(m, compile=False) for name, m in models.items()}
    answers = []
    for prompt in README_CHAT_PROMPTS:
        entry = {"prompt": prompt, "answers": {}, "tokens": {}}
        for name, gen in gens.items():
            r = gen.generate(prompt, GenerationConfig(max_new_tokens=args.new_tokens), chat=True)
            entry["answers"][name] = r.texts[0]
            entry["tokens"][name] = r.tokens[0]
        answers.append(entry)
    names = list(gens)
    result = {
        "models": {n: {"weights_mb": packed_mb(m.model)} for n, m in models.items()},
        "new_tokens": args.new_tokens, "answers": answers, "seconds": time.time() - started, "loadavg": os.getloadavg(),
        "identical": {n: sum(e["tokens"][n] == e["tokens"][names[0]] for e in answers) for n in names[1:]},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generation_chat.json").write_text(json.dumps(result, indent=2))
    lines = ["# README chat prompts: greedy answers, original vs 4-bit SmolLM2-135M-Instruct (slimformer)", "",
             "The source's linears are Q4_1 (4-bit, g32, fp16 scale and minimum) and its embedding Q8_0: the 'original' already lies on a "
             "4-bit g32 grid. All models run slimformer's decode loop eagerly with exact float32 dequantization per call. "
             f"Greedy, up to {args.new_tokens} new tokens, stops at EOS.", "",
             "| model | weights MB in memory | answers identical to the original (token for token) |", "|---|---|---|"]
    for n in names:
        same = "–" if n == names[0] else f"{result['identical'][n]} of {len(answers)}"
        lines.append(f"| {n} | {result['models'][n]['weights_mb']:.0f} | {same} |")
    lines.append("")
    for e in answers:
        lines += [f"**{e['prompt']}**", ""]
        for n in names:
            lines.append(f"- {n}: {e['answers'][n]!r}")
        lines.append("")
    (out / "generation_chat.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
