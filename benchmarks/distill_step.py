"""Where a distillation step's time goes: one step of width-slim's distillation of MiniLM at 50 %
of the block FLOPs (9 of 12 heads, MLP rounded to 64; no training before), timed in float32 and
under bfloat16 autocast, in eval mode (no dropout: how width-slim trains a loaded model) and in
train mode (dropout on), with every parameter trained or with the embeddings frozen.

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
import time
from pathlib import Path

import torch

from slimformer.compress import compress
from slimformer.data.text import TextSpec, load_texts
from slimformer.methods import CalibrationSettings, method_from_dict
from slimformer.methods.structure.distill import distillation_loss
from slimformer.models.loading import load_model
from slimformer.recipe import Recipe
from slimformer.runtime.machine import describe_machine, machine_line

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_files import publish  # noqa: E402

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


def variants(student, batch, target) -> dict:
    def make(autocast: bool, train: bool, freeze: bool):
        params = [p for n, p in student.named_parameters() if not (freeze and "embeddings" in n)]
        optim = torch.optim.AdamW(params, lr=1e-9)

        def step():
            student.train(train)
            for p in student.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = student(**batch).last_hidden_state
            loss = distillation_loss(out, target, batch["attention_mask"], "mse+cos")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
        return step

    return {(("bfloat16" if a else "float32"), ("train" if t else "eval"), ("frozen" if f else "trained")): make(a, t, f)
            for a in (False, True) for t in (False, True) for f in (False, True)}


def measure(rounds: int) -> list[dict]:
    student, batch, target = build()
    steps = variants(student, batch, target)
    for s in steps.values():
        s()
        s()
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for k, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times[("float32", "eval", "trained")])
    return [{"autocast": a, "mode": m, "embeddings": e, "ms": 1000 * statistics.median(v), "vs_width_slim": base / statistics.median(v)}
            for (a, m, e), v in times.items()]


def write(result: dict, out: Path, name: str) -> None:
    lines = [
        "# One distillation step of MiniLM at 50 % of the block FLOPs",
        "",
        f"Machine: {machine_line(result['machine'])}. Batch 16 x 128 tokens, loss `mse+cos`, AdamW; medians of "
        f"{result['rounds']} interleaved rounds. `x width-slim`: the float32, eval-mode, all-parameters step (what "
        "width-slim runs on a loaded model) over this row's step.",
        "",
        "| autocast | mode | embeddings | ms per step | x width-slim |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['autocast']} | {r['mode']} | {r['embeddings']} | {r['ms']:.1f} | {r['vs_width_slim']:.2f}x |")
    publish(out, name, "\n".join(lines) + "\n", result, plot)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [f"{r['autocast']}\n{r['mode']}, emb {r['embeddings']}" for r in rows]
    ax.barh(range(len(rows)), [r["ms"] for r in rows], color=["C0" if r["autocast"] == "float32" else "C1" for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per distillation step (16 x 128 tokens)")
    ax.set_title(result["machine"].get("cpu") or "CPU", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    rows = measure(args.rounds)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write({"machine": machine, "rounds": args.rounds, "rows": rows, "seconds": time.time() - started}, Path(args.out), args.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
