"""Reports: a markdown table and a PNG plot of quality against size for compressed folders."""

from __future__ import annotations

from pathlib import Path

from slimformer.errors import ModelLoadError
from slimformer.models.loading import MANIFEST_NAME


def find_runs(path: Path) -> list[Path]:
    """The compressed folders at ``path``: itself if it holds a manifest, else its sub-folders."""
    if (path / MANIFEST_NAME).is_file():
        return [path]
    if not path.is_dir():
        raise ModelLoadError(f"report folder {path} does not exist", "pass a folder written by slimformer compress, or a folder of them")
    runs = sorted(p for p in path.iterdir() if (p / MANIFEST_NAME).is_file())
    if not runs:
        raise ModelLoadError(f"{path} holds no slimformer manifest", "pass a folder written by slimformer compress, or a folder of them")
    return runs


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def row_of(name: str, manifest: dict) -> dict:
    ev = manifest.get("evaluation") or {}
    q = ev.get("quality") or {}
    c = ev.get("cost") or {}
    comp = c.get("compressed") or {}
    recipe = manifest.get("recipe") or {}
    return {
        "name": name,
        "kind": manifest.get("kind"),
        "recipe": recipe.get("name", "–"),
        "mb": comp.get("storage_bytes", 0) / 1e6 if comp else None,
        "size_ratio": c.get("size_ratio"),
        "bpw": comp.get("bits_per_weight"),
        "linear_bpw": comp.get("quantized_linear_bits_per_weight"),
        "cos_mean": q.get("embedding_cosine_mean"),
        "cos_min": q.get("embedding_cosine_min"),
        "agree10": q.get("retrieval_agreement_at_10"),
        "ppl": q.get("perplexity"),
        "ppl_orig": q.get("perplexity_original"),
        "kl": q.get("kl_divergence"),
        "top1": q.get("top1_agreement"),
        "speedup": c.get("speedup"),
        "kernels": _execution(manifest, q, ev.get("compile")),
        "other": _other_kind(ev.get("transfer")),
    }


def _other_kind(transfer: dict | None) -> str:
    """Quality on the second held-out source (text of another kind), flagged when far below."""
    if not transfer:
        return "–"
    if "quality" not in transfer:
        return f"{transfer.get('source')}: skipped"
    q = transfer["quality"]
    if "embedding_cosine_mean" in q:
        text = f"{q['embedding_cosine_mean']:.4f} / {q['retrieval_agreement_at_10']:.3f}"
    else:
        text = f"ppl {q['perplexity']:.3f} (orig {q['perplexity_original']:.3f})"
    return text + (" ⚠ large gap" if transfer.get("large_gap") else "")


def _execution(manifest: dict, quality: dict, compiled: dict | None = None) -> str:
    text = ", ".join(f"{k}×{v}" for k, v in sorted((manifest.get("kernels") or {}).items())) or "float"
    if manifest.get("dtype") and manifest["dtype"] != "float32":
        text += f" ({manifest['dtype']})"
    plan = manifest.get("execution")
    if plan:
        text += f"; planned on {plan['machine'].get('cpu')} ({plan['settings'].get('memory')}), {plan['activations']} activations"
        attention = plan.get("attention") or {}
        if attention.get("chosen") == "slimformer_tile":
            from slimformer.kernels.tile_attention import form_label

            text += f"; attention on {form_label(attention.get('form', 'AMX'))}" + (", packed rows" if attention.get("packing") else "")
    if compiled:
        if compiled.get("compiled"):
            text += (f"; timed compiled ({compiled['backend']}: {compiled['speedup']:.2f}× over eager, "
                     f"compile {compiled['compile_seconds']:.0f} s, max diff {compiled['max_abs_diff']:.1e})")
        else:
            text += f"; timed eager (compiling was tried: {compiled.get('reason')})"
    dyn = quality.get("dynamic")
    if dyn:
        text += f"; dynamic: {dyn['mean_layers_run']:.2f} blocks/input, FLOPs ×{dyn['flops_ratio']:.2f}"
    return text


def markdown_table(rows: list[dict]) -> str:
    """Markdown table of report rows (encoders and causal LMs get their own quality columns)."""
    lines: list[str] = []
    enc = [r for r in rows if r["kind"] == "encoder"]
    dec = [r for r in rows if r["kind"] != "encoder"]
    if enc:
        lines += [
            "| model | recipe | size MB | size ratio | bits/weight | linear bits/weight | cos mean | cos worst | top-10 agreement | other-kind text: cos / top-10 | speedup | execution |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in enc:
            lines.append(
                f"| {r['name']} | {r['recipe']} | {_fmt(r['mb'], '.2f')} | {_fmt(r['size_ratio'], '.3f')} | {_fmt(r['bpw'], '.2f')} | "
                f"{_fmt(r['linear_bpw'], '.2f')} | {_fmt(r['cos_mean'], '.4f')} | {_fmt(r['cos_min'], '.4f')} | {_fmt(r['agree10'], '.3f')} | "
                f"{r['other']} | {_fmt(r['speedup'], '.2f')}× | {r['kernels']} |"
            )
    if dec:
        if lines:
            lines.append("")
        lines += [
            "| model | recipe | size MB | size ratio | bits/weight | linear bits/weight | perplexity | original ppl | KL | top-1 agreement | other-kind text | speedup | execution |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in dec:
            lines.append(
                f"| {r['name']} | {r['recipe']} | {_fmt(r['mb'], '.2f')} | {_fmt(r['size_ratio'], '.3f')} | {_fmt(r['bpw'], '.2f')} | "
                f"{_fmt(r['linear_bpw'], '.2f')} | {_fmt(r['ppl'], '.3f')} | {_fmt(r['ppl_orig'], '.3f')} | {_fmt(r['kl'], '.4f')} | "
                f"{_fmt(r['top1'], '.3f')} | {r['other']} | {_fmt(r['speedup'], '.2f')}× | {r['kernels']} |"
            )
    lines.append("")
    lines.append(
        "other-kind text: quality on held-out package documentation (READMEs of installed packages), a kind of text "
        "kept out of the default calibration mix; ⚠ marks a gap to the first held-out source above 0.01 cosine, "
        "0.05 top-10 agreement or 5% perplexity."
    )
    lines.append(
        "execution: int8-dynamic = W8A8, int8 weights x per-token int8 activations on the int8 matrix units (torch._int_mm); "
        "int8-onednn = the same integer product through oneDNN on a weight prepacked for this CPU; "
        "int8pack / int4pack = packed weights through PyTorch's CPU low-bit kernels (int8 widened to bf16 for large batches); "
        "unpack / lut-unpack / vq-unpack / bitstack-unpack = no kernel for this format: the packed weight stays in memory and "
        "each call unpacks that layer only; +lowrank = an EoRA correction added; "
        "gather-dequant = embedding rows dequantized as they are looked up; dense-bfloat16 / dense-float32 = the planner "
        "keeps that table dequantized once in the activation dtype (the same rows, gathered faster). "
        "Planned (the execution planner timed the alternatives on the machine named; decode|batch where they differ): "
        "dequant-bf16 / dequant-fp32 = dequantized once into a cached bf16 / fp32 weight; dequant-bf16-widen = that bf16 copy "
        "widened per call for an fp32 GEMM; unpack-fp32 = dequantized per call in fp32; int8-widen-fp32/bf16 = int8 weights "
        "widened per call; w8a8-fp32/bf16 = W8A8 codes multiplied on the float units; packed-fp32 = the stored 4/8-bit codes "
        "read in place by slimformer's kernel, float32 arithmetic; packed-q8a = the same codes with the activations rounded to "
        "int8 per 32 columns by the run time (integer dot products on AVX-512 VNNI or AVX2, as llama.cpp; execution int8_activations: "
        "keep prevents it); packed-q8a-avx2 = its AVX2 form, timed against the VNNI form on a CPU that has both; widen-fp32 / native-bf16 = a plain bf16 "
        "linear widened per call / run in bf16; dense-kernel = a plain float32 or bf16 linear read in place by slimformer's "
        "few-row kernel (inputs of at most 7 rows). A W8A8 layer planned to a weight-only path runs its int8 weights on float "
        "activations: the per-token int8 rounding was measured slower on this machine and is skipped (execution "
        "int8_activations: keep prevents it)."
    )
    return "\n".join(lines) + "\n"


def plot_tradeoff(rows: list[dict], path: Path, title: str = "quality against size") -> None:
    """Scatter of quality (embedding cosine, or perplexity for causal LMs) against size ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    enc = [r for r in rows if r["kind"] == "encoder" and r["size_ratio"] is not None and r["cos_mean"] is not None]
    dec = [r for r in rows if r["kind"] != "encoder" and r["size_ratio"] is not None and r["ppl"] is not None]
    panels = [p for p in (("encoder", enc), ("causal-lm", dec)) if p[1]]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)), 4.8), squeeze=False)
    for ax, (kind, rs) in zip(axes[0], panels):
        xs = [r["size_ratio"] for r in rs]
        ys = [r["cos_mean"] if kind == "encoder" else r["ppl"] for r in rs]
        ax.scatter(xs, ys, c="tab:blue", zorder=3)
        for r, x, y in zip(rs, xs, ys):
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ref = 1.0 if kind == "encoder" else rs[0]["ppl_orig"]
        ax.scatter([1.0], [ref], marker="*", s=140, c="tab:red", zorder=4, label="original (fp32)")
        ax.set_xlabel("size on disk / original")
        ax.set_ylabel("mean embedding cosine to original" if kind == "encoder" else "perplexity (held-out)")
        ax.set_title(f"{title} ({kind})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if kind == "encoder" else "upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
