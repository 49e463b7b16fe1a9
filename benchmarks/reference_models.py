"""Reference causal language models trained here, offline, from text every machine has.

Random-initialised models have nothing to lose, so a method that destroys a model looks as good
as one that preserves it. These are small but real Llama-architecture LMs (RMSNorm, RoPE, SwiGLU,
grouped-query attention) trained on the Python standard library's docstrings, the language
reference (pydoc topics) and the standard library's source, with a byte-level BPE tokenizer
trained on the same training split. The training split is the calibration split of
``slimformer.data`` and the held-out split its evaluation split (fixed by a hash of each
document): compression benchmarks calibrate on text of the training distribution, as GPTQ-style
methods usually do, and evaluate on text these models never saw.

    python benchmarks/reference_models.py build ref-tiny      # ~1.8M parameters, minutes
    python benchmarks/reference_models.py build ref-small     # ~6.3M parameters, about an hour
    python benchmarks/reference_models.py path ref-small      # where the checkpoint is cached
    python benchmarks/reference_models.py sample ref-small    # greedy continuations of docstring openings

Checkpoints are cached under ``$XDG_CACHE_HOME/slimformer/reference-models/NAME`` (default
``~/.cache``), saved with ``save_pretrained`` so any loader opens them, rebuilt only when missing or
with ``--force``. Training is deterministic for a seed (data order and initialisation) and
resumes from its last checkpoint if interrupted. A ``training_report.json`` is written beside the
checkpoint and copied to ``benchmarks/results/reference_models/NAME/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from slimformer.data import documents, split_of

RESULTS = Path(__file__).parent / "results" / "reference_models"
SOURCES = ("stdlib-docs", "pydoc-topics", "stdlib-source")


@dataclass(frozen=True)
class ReferenceSpec:
    """Architecture and training budget of one reference model."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    context: int
    train_tokens: int
    batch_size: int
    lr: float
    vocab_size: int = 8192
    warmup_steps: int = 50
    seed: int = 0
    checkpoint_every: int = 50


SPECS = {
    "ref-tiny": ReferenceSpec("ref-tiny", 128, 4, 4, 2, 352, 256, train_tokens=600_000, batch_size=16, lr=3e-3),
    "ref-small": ReferenceSpec("ref-small", 256, 6, 8, 2, 704, 512, train_tokens=6_000_000, batch_size=8, lr=2e-3),
}


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "slimformer" / "reference-models"


def model_dir(name: str) -> Path:
    return cache_root() / name


# ---------------------------------------------------------------------------------------------
# Corpus and tokenizer
# ---------------------------------------------------------------------------------------------


def corpus(split: str) -> list[str]:
    """Documents of every source in ``split`` ("calibration" = training, "evaluation" = held out)."""
    return [d for source in SOURCES for d in documents(source) if split_of(d) == split]


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    return fast


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents tokenized and joined with ``</s>`` (1-D int64)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def unigram_perplexity(train: torch.Tensor, held_out: torch.Tensor, vocab_size: int) -> float:
    """Perplexity on ``held_out`` of an add-one-smoothed unigram model fitted on ``train``."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1
    logp = torch.log(counts / counts.sum())
    return math.exp(-float(logp[held_out].mean()))


# ---------------------------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------------------------


def build_model(spec: ReferenceSpec, tokenizer):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.context,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(spec.seed)
    return transformers.LlamaForCausalLM(config)


def lr_at(step: int, total: int, spec: ReferenceSpec) -> float:
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, total - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_order(n_sequences: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Deterministic data order: seeded shuffles of the training sequences, epoch after epoch."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(n_sequences))
        rng.shuffle(epoch)
        order.extend(epoch)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


@torch.no_grad()
def held_out_loss(model, stream: torch.Tensor, context: int, max_tokens: int = 200_000, batch_size: int = 8) -> float:
    model.eval()
    n = min(len(stream) - 1, max_tokens) // context
    seqs = stream[: n * context + 1]
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        idx = range(i, min(n, i + batch_size))
        x = torch.stack([seqs[j * context : (j + 1) * context] for j in idx])
        y = torch.stack([seqs[j * context + 1 : (j + 1) * context + 1] for j in idx])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=x, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        total += float(loss)
        count += y.numel()
    model.train()
    return total / count


def build(
    name: str | ReferenceSpec,
    force: bool = False,
    max_steps: int | None = None,
    quiet: bool = False,
    texts: tuple[list[str], list[str]] | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train (or resume training) a reference model and cache it; returns its folder.

    ``name``: a key of ``SPECS`` or a spec; ``texts``: (training, held-out) documents instead
    of the built-in corpus (tests); ``stop_after``: stop after that many steps as if
    interrupted, leaving the checkpoint to resume from (tests).
    """
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    spec = SPECS[name] if isinstance(name, str) else name
    name = spec.name
    out = model_dir(name)
    if (out / "training_report.json").is_file() and not force:
        return out
    work = out.parent / f".{name}.work"
    if force and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t_start = time.time()

    train_texts, held_texts = texts if texts is not None else (corpus("calibration"), corpus("evaluation"))
    if (work / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(work)
    else:
        tokenizer = train_tokenizer(train_texts, spec.vocab_size, work)
    train = token_stream(tokenizer, train_texts)
    held = token_stream(tokenizer, held_texts)

    seq = spec.context + 1
    n_sequences = (len(train) - 1) // spec.context
    steps = spec.train_tokens // (spec.batch_size * spec.context)
    if max_steps is not None:
        steps = min(steps, max_steps)
    order = batch_order(n_sequences, steps, spec.batch_size, spec.seed)

    model = build_model(spec, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    start_step, elapsed, losses = 0, 0.0, []
    ckpt = work / "checkpoint.safetensors"
    if ckpt.is_file():  # resume
        state = json.loads((work / "checkpoint.json").read_text())
        model.load_state_dict(load_file(str(ckpt)), strict=False)
        model.tie_weights()
        optimizer.load_state_dict(torch.load(work / "optimizer.pt", weights_only=True))
        start_step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
    model.train()
    bar = tqdm(total=steps, initial=start_step, desc=f"train {name}", unit="step", disable=quiet)
    t0 = time.time()
    for step in range(start_step, steps):
        idx = order[step]
        batch = torch.stack([train[j * spec.context : j * spec.context + seq] for j in idx])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, spec)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(round(loss.item(), 4))
        done = step + 1
        tokens_per_s = (done - start_step) * spec.batch_size * spec.context / max(1e-9, time.time() - t0)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_per_s:.0f}")
        bar.update(1)
        if done % spec.checkpoint_every == 0 or done == steps:
            tmp = work / "checkpoint.tmp"
            save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(tmp))
            torch.save(optimizer.state_dict(), work / "optimizer.tmp")
            os.replace(work / "optimizer.tmp", work / "optimizer.pt")
            os.replace(tmp, ckpt)
            (work / "checkpoint.json").write_text(json.dumps({"step": done, "elapsed": elapsed + time.time() - t0, "losses": losses}))
        if stop_after is not None and done >= stop_after and done < steps:
            bar.close()
            return work
    bar.close()
    elapsed += time.time() - t0

    eval_loss = held_out_loss(model, held, spec.context)
    train_loss = float(sum(losses[-20:]) / max(1, len(losses[-20:])))
    report = {
        "name": name,
        "architecture": "LlamaForCausalLM",
        "spec": dataclasses.asdict(spec),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "tokens_seen": steps * spec.batch_size * spec.context,
        "train_corpus_tokens": int(len(train)),
        "held_out_tokens": int(min(len(held) - 1, 200_000) // spec.context * spec.context),
        "train_wall_seconds": round(elapsed, 1),
        "build_wall_seconds": round(time.time() - t_start, 1),
        "train_loss_last20": round(train_loss, 4),
        "held_out_loss": round(eval_loss, 4),
        "held_out_perplexity": round(math.exp(eval_loss), 3),
        "unigram_perplexity": round(unigram_perplexity(train, held, len(tokenizer)), 3),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loss_curve_every_10_steps": losses[::10],
    }
    report["perplexity_ratio_to_unigram"] = round(report["held_out_perplexity"] / report["unigram_perplexity"], 4)

    final = out.parent / f".{name}.final"
    if final.exists():
        shutil.rmtree(final)
    final.mkdir(parents=True)
    model.eval()
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    (final / "training_report.json").write_text(json.dumps(report, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(final, out)
    shutil.rmtree(work, ignore_errors=True)
    if name in SPECS and texts is None:
        RESULTS.joinpath(name).mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "training_report.json", RESULTS / name / "training_report.json")
    return out


OPENINGS = (
    "Return the number of",
    "Create a new",
    "This module provides",
    "def __init__(self,",
    "Raise ValueError if",
)


def sample(name: str, max_new_tokens: int = 40) -> list[tuple[str, str]]:
    """Greedy continuations of a few docstring openings."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = model_dir(name)
    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    out = []
    for opening in OPENINGS:
        ids = tok(opening, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append((opening, tok.decode(gen[0, ids.shape[1] :])))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train and cache a reference model")
    b.add_argument("name", choices=sorted(SPECS))
    b.add_argument("--force", action="store_true", help="retrain even if cached")
    b.add_argument("--max-steps", type=int, default=None, help="stop early (smoke tests)")
    b.add_argument("--quiet", action="store_true")
    p = sub.add_parser("path", help="print the cached folder")
    p.add_argument("name", choices=sorted(SPECS))
    s = sub.add_parser("sample", help="greedy continuations of docstring openings")
    s.add_argument("name", choices=sorted(SPECS))
    args = parser.parse_args(argv)
    if args.command == "build":
        folder = build(args.name, force=args.force, max_steps=args.max_steps, quiet=args.quiet)
        print(folder)
        print((folder / "training_report.json").read_text())
    elif args.command == "path":
        print(model_dir(args.name))
    else:
        if not (model_dir(args.name) / "training_report.json").is_file():
            print(f"error: {args.name} is not built; run 'build {args.name}' first", file=sys.stderr)
            return 2
        for opening, continuation in sample(args.name):
            print(f"{opening!r} -> {continuation!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
