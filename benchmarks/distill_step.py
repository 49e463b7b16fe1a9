"""Where a distillation step's time goes: one step of width-slim's distillation of MiniLM at 50 %
of the block FLOPs (9 of 12 heads, MLP rounded to 64; no training before), timed in float32 and
under bfloat16 autocast, with SDPA or eager attention, the for-loop or the fused AdamW, in eval
mode (no dropout: how width-slim trains a loaded model) and in train mode (dropout on), with
every parameter trained or with the embeddings frozen; and what writing a checkpoint costs.

A step is what ``distill`` does: the student's forward, the ``mse+cos`` loss against the cached
teacher output, backward, gradient clipping, AdamW. The batch is 16 held-out ``stdlib-docs``
documents padded to 128 tokens; the learning rate is 1e-9 so the weights barely move between
rounds. Medians of ``--rounds`` interleaved rounds (each round times every variant once), after
two warm-up steps each; the machine heads the table.

    python benchmarks/distill_step.py [--rounds 7]

Writes benchmarks/results/distill_step.{md,json,png}.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from slimformer.compress import compress
from slimformer.data.text import TextSpec, load_texts
from slimformer.methods import CalibrationSettings, method_from_dict
from slimformer.methods.distill import adamw, distillation_loss, save_checkpoint
from slimformer.models.loading import load_model
from slimformer.recipe import Recipe
from slimformer.runtime.machine import describe_machine, machine_line

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_files import figure, publish  # noqa: E402

ROOT = Path(__file__).resolve().parent


def build():
    """The slimmed student, the batch and the teacher's output (batch, seq, dim)."""
    original = load_model()
    texts = load_texts(TextSpec(source="stdlib-docs", split="evaluation", n=16, seed=0))
    batch = dict(original.tokenizer(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    with torch.no_grad():
        target = original.model(**batch).last_hidden_state
    student = copy.deepcopy(original)
    step = method_from_dict({"method": "width-slim", "flops_ratio": 0.5, "head_ratio": 0.75, "round_to": 64})
    compress(student, Recipe(steps=[step], calibration=CalibrationSettings(source="stdlib-docs", n_samples=32, max_length=64, batch_size=8)))
    return student.model, batch, target


VARIANTS = [  # (autocast, attention, optimizer, mode, embeddings)
    *[(a, att, opt, "eval", "trained") for a in ("float32", "bfloat16") for att in ("sdpa", "eager") for opt in ("for-loop", "fused")],
    ("bfloat16", "eager", "fused", "eval", "frozen"),
    ("float32", "sdpa", "for-loop", "train", "trained"),
    ("bfloat16", "eager", "fused", "train", "trained"),
]
BEFORE = ("float32", "sdpa", "for-loop", "eval", "trained")  # width-slim's step before attention/optimizer were chosen


def variants(student, batch, target) -> dict:
    def make(autocast: str, attention: str, optimizer: str, mode: str, embeddings: str):
        params = [p for n, p in student.named_parameters() if not (embeddings == "frozen" and "embeddings" in n)]
        optim = adamw(params, lr=1e-9) if optimizer == "fused" else torch.optim.AdamW(params, lr=1e-9, weight_decay=0.0)

        def step():
            student.train(mode == "train")
            student.set_attn_implementation(attention)
            for p in student.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "bfloat16"):
                out = student(**batch).last_hidden_state
            loss = distillation_loss(out, target, batch["attention_mask"], "mse+cos")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
        return step, optim

    return {v: make(*v) for v in VARIANTS}


def measure(rounds: int) -> tuple[list[dict], dict]:
    student, batch, target = build()
    made = variants(student, batch, target)
    steps = {k: s for k, (s, _) in made.items()}
    for s in steps.values():
        s()
        s()
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for k, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times[BEFORE])
    rows = [{"autocast": a, "attention": att, "optimizer": opt, "mode": m, "embeddings": e, "ms": 1000 * statistics.median(v),
             "vs_before": base / statistics.median(v)} for (a, att, opt, m, e), v in times.items()]
    # what a checkpoint (student, AdamW state, sampler) costs to write, as distill writes it
    optim = made[BEFORE][1]
    writes = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(3):
            t0 = time.perf_counter()
            save_checkpoint(Path(tmp) / "c.ckpt", {"student": student.state_dict(), "optim": optim.state_dict()})
            writes.append(time.perf_counter() - t0)
        size = (Path(tmp) / "c.ckpt").stat().st_size
    return rows, {"ms": 1000 * statistics.median(writes), "bytes": size}


def write(result: dict, out: Path, name: str) -> None:
    ck = result["checkpoint"]
    best = min(result["rows"], key=lambda r: r["ms"] if (r["mode"], r["embeddings"]) == ("eval", "trained") else float("inf"))
    lines = [
        "# One distillation step of MiniLM at 50 % of the block FLOPs",
        "",
        f"Machine: {machine_line(result['machine'])}. Batch 16 x 128 tokens, loss `mse+cos`, AdamW; medians of "
        f"{result['rounds']} interleaved rounds. `x before`: the float32, SDPA, for-loop AdamW, eval-mode, all-parameters "
        "step (what width-slim ran before it measured the attention and fused AdamW) over this row's step. "
        "`distill` now trains with fused AdamW and, under `distill_attention: auto`, the faster attention of a timed "
        f"training pass on the first batch; on this machine the fastest all-parameters row is {best['autocast']} / "
        f"{best['attention']} / {best['optimizer']} ({best['vs_before']:.2f}x).",
        "",
        "| autocast | attention | AdamW | mode | embeddings | ms per step | x before |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['autocast']} | {r['attention']} | {r['optimizer']} | {r['mode']} | {r['embeddings']} | {r['ms']:.1f} | {r['vs_before']:.2f}x |")
    lines += ["", f"A checkpoint (student and AdamW state, {ck['bytes'] / 1e6:.0f} MB) takes {ck['ms']:.0f} ms to write: "
              f"every 25 steps (width-slim's `checkpoint_every` before) that was {ck['ms'] / 25:.1f} ms per step, every 200 (now) {ck['ms'] / 200:.1f} ms."]
    publish(out, name, "\n".join(lines) + "\n", result, plot)


def plot(result: dict, path: Path) -> None:
    rows = result["rows"]
    labels = [f"{r['autocast']}, {r['attention']}, {r['optimizer']}\n{r['mode']}, emb {r['embeddings']}" for r in rows]
    with figure(path, (7.5, 5), result["machine"].get("cpu") or "CPU") as ax:
        ax.barh(range(len(rows)), [r["ms"] for r in rows], color=["C0" if r["autocast"] == "float32" else "C1" for r in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("ms per distillation step (16 x 128 tokens)")
        ax.grid(axis="x", alpha=0.3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--name", default="distill_step")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        print("error: --rounds must be positive; pass e.g. --rounds 7", file=sys.stderr)
        return 2
    started = time.time()
    machine = describe_machine()
    rows, checkpoint = measure(args.rounds)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write({"machine": machine, "rounds": args.rounds, "rows": rows, "checkpoint": checkpoint, "seconds": time.time() - started}, Path(args.out), args.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
