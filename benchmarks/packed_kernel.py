"""Few-row linears on this CPU: slimformer's packed-code kernel against torch's paths.

One decode step of SmolLM2-135M streams its 210 linears (30 blocks of q, k, v, o, gate, up,
down; 576 wide, 1536 in the MLP) and the 49152 x 576 head once, for 1 row (decoding) or a few
(a speculative verify step). This script builds linears of exactly those shapes (random codes
and scales: speed does not depend on the values) and times, per row count, one pass over all of
them through each path, interleaved round by round (medians of ``--rounds``):

- ``fp32``: ``F.linear`` on a float32 weight (4 bytes per weight);
- ``bf16``: ``F.linear`` on a bfloat16 weight with bfloat16 activations (2 bytes);
- ``int8pack``: torch's ``_weight_int8pack_mm`` on 8-bit per-channel codes (bf16 activations);
- ``int4pack``: torch's ``_weight_int4pack_mm_for_cpu`` on 4-bit g32 codes (bf16 activations);
- ``packed-fp32 w8`` / ``packed-fp32 w4``: slimformer's kernel on the stored 8-bit per-channel /
  4-bit g32 asymmetric codes, float32 arithmetic;
- ``dense-kernel fp32`` / ``dense-kernel bf16``: slimformer's few-row dense kernel
  (``kernels/dense_linear.cpp``) on the float32 / bfloat16 weight, float32 activations and
  arithmetic (the ``dense-kernel`` path the planner offers plain linears);
- ``packed-q8a w8`` / ``packed-q8a w4``: the same codes, the activations
  rounded to int8 per 32 columns and multiplied in by integer dot products (llama.cpp's scheme):
  AVX-512 VNNI where the CPU has it, and then also its AVX2 form (``(AVX2 form)`` rows), which
  CPUs without VNNI run;
- ``packed-q8a-tiles w8`` / ``w4`` (CPUs with AVX-512 VNNI): the same numbers from a copy of the
  codes in 16-channel tiles (``kernels/q8a_tiles.cpp``), one weight load shared by every row; its
  bytes are the copy's (codes plus float32 scales and offsets).

Each path goes through ``QuantizedLinear.compute`` (or ``F.linear``), so per-call overheads count.
Reported: milliseconds per pass, achieved weight bytes per second, and the ratio to fp32 and to
bf16 measured in the same rounds; the machine (CPU model, flags, threads, load, matmul ceilings)
heads the table.

    python benchmarks/packed_kernel.py [--rows 1 2 4 7] [--rounds 7] [--threads N]

Writes benchmarks/results/packed_kernel.{md,json,png}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimformer import kernels
from slimformer.kernels import dense_linear as dense_kernel
from slimformer.kernels import q8a_tiles
from slimformer.methods.quantization import QuantizedLinear, grid
from slimformer.runtime.machine import describe_machine, machine_line

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_files import figure, publish  # noqa: E402

ROOT = Path(__file__).resolve().parent
HIDDEN, MLP, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP)] * LAYERS + [(VOCAB, HIDDEN)]


def _layer(out: int, inp: int, bits: int, group_size: int | None, kernel_list: tuple[str, ...], g: torch.Generator) -> QuantizedLinear:
    groups = 1 if group_size is None else inp // group_size
    codes = torch.randint(0, 2**bits, (out, inp), generator=g, dtype=torch.uint8)
    scale = torch.rand(out, groups, generator=g) * 0.01 + 1e-3
    zero = torch.randint(0, 2**bits, (out, groups), generator=g)
    m = QuantizedLinear.from_codes(codes, scale, zero, bits, group_size, bits == 8, None)
    available = m.available_kernels()
    m.use_kernels(*[k for k in kernel_list if k in available] or ["unpack"])
    return m


def build() -> dict[str, list]:
    g = torch.Generator().manual_seed(0)
    w8 = [_layer(o, i, 8, None, ("packed-fp32", "int8pack", "packed-q8a"), g) for o, i in SHAPES]
    w4 = [_layer(o, i, 4, 32, ("packed-fp32", "int4pack", "packed-q8a"), g) for o, i in SHAPES]
    fp32 = [m.dequantized_weight() for m in w8]
    return {"w8": w8, "w4": w4, "fp32": fp32, "bf16": [w.bfloat16() for w in fp32]}


def paths(layers: dict) -> dict[str, tuple]:
    """name -> (bytes per pass, function of the input rows (x32, x16) by width)."""
    out = {
        "fp32": (sum(w.numel() * 4 for w in layers["fp32"]), lambda xs: [F.linear(xs[w.shape[1]][0], w) for w in layers["fp32"]]),
        "bf16": (sum(w.numel() * 2 for w in layers["bf16"]), lambda xs: [F.linear(xs[w.shape[1]][1], w) for w in layers["bf16"]]),
    }
    stored = {k: sum(m.stored_bits() // 8 for m in layers[k]) for k in ("w8", "w4")}
    if "int8pack" in layers["w8"][0]._ready:
        out["int8pack"] = (stored["w8"], lambda xs: [m.compute(xs[m.in_features][1], "int8pack") for m in layers["w8"]])
    if "int4pack" in layers["w4"][0]._ready:
        out["int4pack"] = (stored["w4"], lambda xs: [m.compute(xs[m.in_features][1], "int4pack") for m in layers["w4"]])
    if kernels.packed_linear_available():
        out["packed-fp32 w8"] = (stored["w8"], lambda xs: [m.compute(xs[m.in_features][0], "packed-fp32") for m in layers["w8"]])
        out["packed-fp32 w4"] = (stored["w4"], lambda xs: [m.compute(xs[m.in_features][0], "packed-fp32") for m in layers["w4"]])
    if dense_kernel.available():
        out["dense-kernel fp32"] = (sum(w.numel() * 4 for w in layers["fp32"]),
                                    lambda xs: [dense_kernel.dense_linear(xs[w.shape[1]][0], w) for w in layers["fp32"]])
        out["dense-kernel bf16"] = (sum(w.numel() * 2 for w in layers["bf16"]),
                                    lambda xs: [dense_kernel.dense_linear(xs[w.shape[1]][0], w) for w in layers["bf16"]])
    if kernels.int8_activations_available():
        out["packed-q8a w8"] = (stored["w8"], lambda xs: [m.compute(xs[m.in_features][0], "packed-q8a") for m in layers["w8"]])
        out["packed-q8a w4"] = (stored["w4"], lambda xs: [m.compute(xs[m.in_features][0], "packed-q8a") for m in layers["w4"]])
    if kernels.has_vnni():  # the AVX2 form too, which CPUs without VNNI run
        def avx2(m, x):
            group = grid.effective_group_size(m.in_features, m.group_size)
            return kernels.packed_linear_q8a(x, m.qweight, m.scales, m.zeros, m.bits, group, None, portable=True)

        out["packed-q8a w8 (AVX2 form)"] = (stored["w8"], lambda xs: [avx2(m, xs[m.in_features][0]) for m in layers["w8"]])
        out["packed-q8a w4 (AVX2 form)"] = (stored["w4"], lambda xs: [avx2(m, xs[m.in_features][0]) for m in layers["w4"]])
    if q8a_tiles.available():
        for key in ("w8", "w4"):
            tiled = []
            for m in layers[key]:
                lay = m.packed_layout()
                tiled.append((m.in_features, q8a_tiles.pack(lay["qweight"], lay["scales"], lay["zeros"], lay["bits"], lay["group_size"], m.in_features)))
            out[f"packed-q8a-tiles {key}"] = (sum(t.nbytes() for _, t in tiled),
                                              lambda xs, tiled=tiled: [q8a_tiles.linear(xs[width][0], t) for width, t in tiled])
    return out


def measure(rows_list: list[int], rounds: int) -> list[dict]:
    layers = build()
    table = paths(layers)
    results = []
    g = torch.Generator().manual_seed(1)
    for rows in rows_list:
        xs = {}
        for width in (HIDDEN, MLP):
            x = torch.randn(rows, width, generator=g)
            xs[width] = (x, x.bfloat16())
        times: dict[str, list[float]] = {name: [] for name in table}
        with torch.no_grad():
            for name, (_b, fn) in table.items():  # warm-up
                fn(xs)
            for _ in range(rounds):
                for name, (_b, fn) in table.items():
                    t0 = time.perf_counter()
                    fn(xs)
                    times[name].append(time.perf_counter() - t0)
        # Ratios per round (same round, adjacent runs), then the median.
        for name, (nbytes, _fn) in table.items():
            med = statistics.median(times[name])
            results.append({
                "rows": rows, "path": name, "ms": med * 1e3, "weight_mb": nbytes / 2**20,
                "gb_per_s": nbytes / med / 1e9,
                "vs_fp32": statistics.median(a / b for a, b in zip(times["fp32"], times[name])),
                "vs_bf16": statistics.median(a / b for a, b in zip(times["bf16"], times[name])),
            })
            print(f"rows {rows} {name:16s} {med * 1e3:7.1f} ms  {nbytes / med / 1e9:5.1f} GB/s", flush=True)
    return results


def write(result: dict, out: Path, name: str) -> None:
    lines = [
        "# Few-row linears: slimformer's packed and dense kernels against torch's paths",
        "",
        f"Machine: {machine_line(result['machine'])}. One pass over SmolLM2-135M's 210 linears and its head "
        f"(random codes of the real shapes), medians of {result['rounds']} interleaved rounds; ratios per round. "
        f"Kernel: {result['kernel']}.",
        "",
        "| rows | path | weights MB read | ms per pass | GB/s | × fp32 | × bf16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['rows']} | {r['path']} | {r['weight_mb']:.0f} | {r['ms']:.1f} | {r['gb_per_s']:.1f} | {r['vs_fp32']:.2f}× | {r['vs_bf16']:.2f}× |")
    publish(out, name, "\n".join(lines) + "\n", result, plot)


def plot(result: dict, path: Path) -> None:
    names = list(dict.fromkeys(r["path"] for r in result["rows"]))
    with figure(path, (7, 4), result["machine"].get("cpu") or "CPU") as ax:
        for name in names:
            pts = [(r["rows"], r["ms"]) for r in result["rows"] if r["path"] == name]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("rows (tokens) per call")
        ax.set_ylabel("ms per pass over SmolLM2's linears + head")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 7])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--name", default="packed_kernel")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(r < 1 for r in args.rows) or args.rounds < 1:
        print("error: --rows and --rounds must be positive; pass e.g. --rows 1 4 --rounds 5", file=sys.stderr)
        return 2
    started = time.time()
    machine = describe_machine()
    kernel = "available" if kernels.packed_linear_available() else f"unavailable ({kernels.unavailable_reason()})"
    rows = measure(args.rows, args.rounds)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write({"machine": machine, "rounds": args.rounds, "kernel": kernel, "rows": rows, "seconds": time.time() - started},
          Path(args.out), args.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
