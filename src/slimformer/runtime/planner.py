"""The execution planner: for every compressed layer, the fastest way *on this machine* to compute
the numbers it stores, under a memory policy.

For each distinct layer format (type, bits, group size, shape, ...) and each activation dtype
the model may run in (float32, bfloat16):

1. the candidate paths (:mod:`slimformer.runtime.execution`) are filtered by capability (ops
   that exist, layouts a kernel accepts); a W8A8 layer also offers its weight-only paths (its
   int8 weights on float activations) unless ``int8_activations`` is ``keep``;
2. each is checked against the dequantize reference (float64 product of the dequantized weight;
   for W8A8 paths, of the quantized activations) on a probe input: relative error at most
   ``EXACT_BOUND`` for exact paths, ``BF16_BOUND`` for paths that round to bfloat16 and
   ``INT8_ACT_BOUND`` for paths that round float activations to int8 per 32 columns;
3. the survivors are timed, interleaved, on few rows (``decode_tokens``: decoding), on the rows
   of a speculative verify step (``verify_tokens``) and on many rows (``batch_tokens``:
   batches, prefill); the minimum of ``repeats`` runs is kept (the
   least disturbed by other processes on a shared machine). A decode step streams every
   layer's weights from memory, back to back, so decode runs go over enough independent copies
   of the layer (``STREAM_BYTES`` of run-time forms per round) that each call finds its weights
   out of the caches and the threads awake; the time per call is kept. A layer timed alone, its
   weights cache-hot, would hide what its bytes cost;
4. per layer, the pair (decode path, batch path) with the lowest sum of normalised times (the
   decode path's one-token and verify times each count, so a path whose cost grows little with
   the rows of a verify step can win over one a little faster on one row; for the ``decode``
   workload the batch time, a prompt's prefill, counts half; for the ``batch`` workload of
   encoders the verify time does not count) whose
   run-time forms fit the memory policy is chosen: ``packed`` (at most 1 byte per weight beyond
   the stored buffers: int8/int4 kernel forms, no dense copy), ``balanced`` (default: at most 2
   bytes per weight, i.e. a bfloat16 copy, never a float32 one), ``fast`` (anything);
5. the activation dtype of the whole model is the one whose chosen layers take the least time
   for the workload (``batch`` for encoders, ``decode`` for causal LMs), among those allowed
   (``activations: auto`` allows both; ``stored`` keeps the dtype the recipe produced).

For encoders (the ``batch`` workload), each quantized embedding table is also offered as a dense
table in the activation dtype, dequantized once (bit-identical rows, 2 bytes per weight in
bfloat16: allowed from ``balanced`` on, a float32 table only under ``fast``); it is kept when it
gathers a batch at least 10 % faster than the stored table's gather-then-dequantize. Decoding
gathers one row per step, so causal LMs keep their tables packed.

Measurements are cached on disk (``$SLIMFORMER_PLAN_CACHE``, else
``$XDG_CACHE_HOME/slimformer/plans``, else ``~/.cache/slimformer/plans``) in one file per
machine signature (CPU model, flags, torch version and kernel level, threads); a file whose
recorded signature differs from this machine's is ignored, so a second load on the same
machine plans without timing anything. ``SLIMFORMER_PLANNER=0`` turns planning off (every
layer keeps its capability-chosen kernel); :func:`remove_plan` takes a plan off a model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimformer import kernels as kernels_lib
from slimformer.kernels import dense_linear as dense_kernel
from slimformer.kernels import q8a_tiles
from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.quantization.modules import QuantizedLinear, QuantizedModule, quantize_activations_per_token
from slimformer.runtime import execution as ex
from slimformer.runtime.machine import signature
from slimformer.timing import steady_allocator
from slimformer.runtime.measurements import PlanCache, default_cache_dir

MEMORY_LIMITS = {"packed": 1.0, "balanced": 2.0, "fast": math.inf}  # run-time bytes per weight
ACTIVATIONS = ("auto", "float32", "bfloat16", "stored")
INT8_ACTIVATIONS = ("auto", "keep")
ATTENTION = ("auto", "sdpa")
WORKLOADS = ("batch", "decode")
EXACT_BOUND = 1e-4
BF16_BOUND = 2e-2
INT8_ACT_BOUND = 2.5e-2  # int8 activations per 32 columns: ~1 % on Gaussian probes, ~1.5 % with an outlier
BOUNDS = {"bf16": BF16_BOUND, "int8-act": INT8_ACT_BOUND}
# The paths this version knows, in the key of every cached measurement: a version that adds a
# path measures again instead of reusing a cache that never timed it.
PATHS_KEY = ",".join(sorted(ex.PATHS))
STREAM_BYTES = 64 << 20  # run-time forms touched per timing round: more than the last-level cache
MAX_STREAM_COPIES = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PlanSettings:
    """``memory``: ``packed`` | ``balanced`` | ``fast`` (see the module docstring);
    ``activations``: ``auto`` (the faster of float32 and bfloat16 for models whose recipe
    quantized layers or cast to bf16; float32 for float32-only models) | ``float32`` |
    ``bfloat16`` | ``stored`` (the dtype the recipe produced); ``workload``: the
    regime that decides the activation dtype (``batch`` or ``decode``; None: batch for
    encoders, decode for causal LMs); ``decode_tokens``/``batch_tokens``: rows timed for each
    regime; ``verify_tokens``: rows of a speculative verify step, at which the few-row paths are
    timed too (0: not); ``split_tokens``: inputs with fewer rows take the decode path; ``repeats``: timed
    runs per path (after one warm-up); ``cache``: read and write the on-disk cache;
    ``cache_dir``: where (None: the default location); ``widths``: for encoders, also choose
    the width each batch runs at by measurement (:mod:`slimformer.runtime.alignment`) for
    inputs of up to ``widths_max_length`` tokens, and ``attention``: ``auto`` (encoders run the
    AMX tile attention kernel, on length buckets or on packed rows, where ``embed`` of a
    mixed-length batch is measured at least 5 % faster than with SDPA,
    :mod:`slimformer.runtime.tile_attention`) | ``sdpa`` (leave attention and bucketing alone).
    ``int8_activations``: for W8A8 layers, ``auto``
    also times their weight-only paths (the same int8 weights on float activations: the
    per-token int8 rounding skipped, taken only where measured faster; the plan counts such
    layers), and lets weight-only 4/8-bit layers round their activations to int8 per 32 columns
    where that is faster (``packed-q8a``: integer dot products, AVX-512 VNNI or AVX2, as llama.cpp's
    CPU kernels; ~1 % relative error per product) | ``keep`` (activations as the recipe left
    them: W8A8 layers quantize, weight-only layers do not)."""

    memory: str = "balanced"
    activations: str = "auto"
    int8_activations: str = "auto"
    workload: str | None = None
    decode_tokens: int = 1
    verify_tokens: int = 7
    batch_tokens: int = 1024
    split_tokens: int = 32
    repeats: int = 3
    cache: bool = True
    cache_dir: str | None = None
    widths: bool = True
    widths_max_length: int = 128
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.memory not in MEMORY_LIMITS:
            raise ConfigError(f"execution memory={self.memory!r} is not a memory policy", f"use one of {list(MEMORY_LIMITS)}")
        if self.activations not in ACTIVATIONS:
            raise ConfigError(f"execution activations={self.activations!r} is not supported", f"use one of {list(ACTIVATIONS)}")
        if self.int8_activations not in INT8_ACTIVATIONS:
            raise ConfigError(f"execution int8_activations={self.int8_activations!r} is not supported", f"use one of {list(INT8_ACTIVATIONS)}")
        if self.attention not in ATTENTION:
            raise ConfigError(f"execution attention={self.attention!r} is not supported", f"use one of {list(ATTENTION)}")
        if self.workload is not None and self.workload not in WORKLOADS:
            raise ConfigError(f"execution workload={self.workload!r} is not supported", f"use one of {list(WORKLOADS)}")
        for name in ("decode_tokens", "batch_tokens", "split_tokens", "repeats", "widths_max_length"):
            if not is_int_at_least(getattr(self, name), 1):
                raise ConfigError(f"execution {name}={getattr(self, name)!r} must be a positive integer", f"pass e.g. {name}=8")
        if not is_int_at_least(self.verify_tokens, 0):
            raise ConfigError(f"execution verify_tokens={self.verify_tokens!r} must be a non-negative integer", "pass e.g. verify_tokens=7 (0: not timed)")


def planner_enabled() -> bool:
    """False when ``SLIMFORMER_PLANNER=0`` (the off switch: capability-chosen kernels only)."""
    return os.environ.get("SLIMFORMER_PLANNER", "1") != "0"


def as_plan_settings(value: Any) -> PlanSettings | None:
    """``None``/``"off"``/``False`` -> None (no planning); ``"auto"``/``True`` -> defaults; a
    memory policy name; a dict of :class:`PlanSettings` fields; or a ``PlanSettings``."""
    if value is None or value is False or value == "off":
        return None
    if value is True or value == "auto":
        return PlanSettings()
    if isinstance(value, PlanSettings):
        return value
    if isinstance(value, str):
        return PlanSettings(memory=value)
    if isinstance(value, dict):
        unknown = set(value) - set(PlanSettings.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown execution setting {sorted(unknown)[0]!r}", f"use {sorted(PlanSettings.__dataclass_fields__)}")
        return PlanSettings(**value)
    raise ConfigError(f"execution={value!r} is not understood", "pass 'auto', 'off', a memory policy or a dict of planner settings")




# ----- layers and their formats ------------------------------------------------------------------

def planned_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers the planner plans: outermost linear ``QuantizedModule``s and plain
    ``nn.Linear`` layers outside them (embedding tables: :func:`planned_embeddings`)."""
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedModule)]
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if any(name.startswith(q + ".") for q in quantized):
            continue
        if ex.is_linear_like(m):
            out[name] = m
    return out


def planned_embeddings(model: nn.Module) -> dict[str, nn.Module]:
    """Outermost quantized embedding tables (``QuantizedModule``s with ``num_embeddings``)."""
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedModule)]
    return {n: m for n, m in model.named_modules()
            if isinstance(m, QuantizedModule) and hasattr(m, "num_embeddings") and not any(n.startswith(q + ".") for q in quantized)}


def format_of(module: nn.Module) -> dict:
    """The layer's format: what decides its paths and their speed (not its values)."""
    if isinstance(module, QuantizedModule):
        desc = {k: v for k, v in module.describe().items() if k != "kernel"}
        desc.pop("kernel", None)
        if isinstance(desc.get("inner"), dict):
            desc["inner"] = {k: v for k, v in desc["inner"].items() if k != "kernel"}
        return desc
    return {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features, "bias": module.bias is not None, "dtype": str(module.weight.dtype).replace("torch.", "")}


def _weights(module: nn.Module) -> int:
    return module.in_features * module.out_features


def _stored_nbytes(module: nn.Module) -> int:
    if isinstance(module, QuantizedModule):
        return module.stored_bits() // 8
    return module.weight.numel() * module.weight.element_size()


def _held_bytes(module: nn.Module, planned_bytes: int) -> int:
    """Stored buffers + kernel forms + ``planned_bytes`` of a dispatcher's dense copies."""
    runtime = module.runtime_nbytes() if isinstance(module, QuantizedModule) else 0
    return _stored_nbytes(module) + runtime + planned_bytes


def held_bytes_per_weight(module: nn.Module) -> float:
    """Measured bytes the layer holds per weight: stored buffers, kernel forms, planned copies."""
    return _held_bytes(module, ex.planned_nbytes(module)) / _weights(module)


def _probe_input(module: nn.Module, rows: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, module.in_features, generator=g).to(dtype)


@torch.no_grad()
def reference_output(module: nn.Module, x: torch.Tensor, int8_activations: bool = True) -> torch.Tensor:
    """The dequantize reference (rows, out) float64 of ``module`` on ``x`` (rows, in); a W8A8
    layer's per-token int8 activation rounding included unless ``int8_activations`` is False."""
    w = module.dequantized_weight() if isinstance(module, QuantizedModule) else module.weight
    xd = x.float()
    if ex.is_w8a8(module) and int8_activations:
        input_scale = getattr(module, "input_scale", None)
        if input_scale is not None:  # AWQ/SmoothQuant layers quantize x / s and hold W diag(s)
            xd = xd * (1.0 / input_scale.float())
            w = w * input_scale.float()
        codes, scale, offset = quantize_activations_per_token(xd, module.act_symmetric)
        xd = (codes.double() + (0.0 if offset is None else offset.double())) * scale.double()
    bias = getattr(module, "bias", None)
    y = xd.double() @ w.double().t()
    return y if bias is None else y + bias.double()


@contextlib.contextmanager
def _as_dtype(module: nn.Module, dtype: torch.dtype):
    """The module as it runs under ``dtype`` activations (temporarily)."""
    if isinstance(module, QuantizedModule):
        old = module.compute_dtype
        module.set_compute_dtype(dtype)
        try:
            yield module
        finally:
            module.set_compute_dtype(old)
        return
    wdt = torch.bfloat16 if (module.weight.dtype == torch.bfloat16 or dtype == torch.bfloat16) else torch.float32
    probe = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    probe.weight = nn.Parameter(module.weight.detach().to(wdt), requires_grad=False)
    if module.bias is not None:
        probe.bias = nn.Parameter(module.bias.detach().to(wdt), requires_grad=False)
    yield probe


def _stream_copies(pf: ex.PlannedForward) -> list[ex.PlannedForward]:
    """``pf`` and independent copies of its layer (all paths ready), enough that one round over
    them touches ``STREAM_BYTES`` of run-time forms (at most ``MAX_STREAM_COPIES``)."""
    m = pf.module
    per_copy = _held_bytes(m, pf.nbytes())
    copies = [pf]
    for _ in range(min(MAX_STREAM_COPIES, math.ceil(STREAM_BYTES / max(per_copy, 1))) - 1):
        c = copy.deepcopy(m)
        for attr in ("forward", "_slimformer_execution"):  # a plan installed on the original
            c.__dict__.pop(attr, None)
        copies.append(ex.PlannedForward(c, pf.decode, pf.batch, pf.split_rows, also=pf.also))
    return copies


@torch.no_grad()
def measure_format(module: nn.Module, act_dtype: torch.dtype, settings: PlanSettings) -> dict:
    """Parity and timings of every candidate path of ``module`` under ``act_dtype`` activations:
    ``{"paths": {path: {"rel_error", "bound", "ok", "decode_s", "verify_s", "batch_s"}}}`` (``verify_s``
    only when ``settings.verify_tokens``)."""
    with _as_dtype(module, act_dtype) as m:
        paths = ex.candidate_paths(m, act_dtype, settings.int8_activations)
        saved = ex.planned_forward_of(m)
        kernel_before = m.kernel if isinstance(m, QuantizedLinear) else None
        ready_before = getattr(m, "_ready", None)
        pf = ex.PlannedForward(m, paths[0], paths[0], settings.split_tokens, also=tuple(paths))
        try:
            x = _probe_input(m, 16, act_dtype, seed=1)
            ref = reference_output(m, x)
            ref_float = reference_output(m, x, int8_activations=False) if any(ex.skips_int8_activations(m, p) for p in paths) else None
            result: dict[str, dict] = {}
            for p in paths:
                try:
                    y = pf.run(p, x).double()
                    r = ref_float if ex.skips_int8_activations(m, p) else ref
                    err = float((y - r).norm() / r.norm().clamp_min(1e-30))
                except (RuntimeError, ValueError, NotImplementedError) as exc:
                    result[p] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
                    continue
                rounding = ex.PATHS[p].rounding
                bound = EXACT_BOUND if rounding == "exact" and act_dtype == torch.float32 else BOUNDS.get(rounding, BF16_BOUND)
                result[p] = {"rel_error": err, "bound": bound, "ok": bool(err <= bound)}
            ok = [p for p in paths if result[p]["ok"]]
            regimes = [("decode_s", settings.decode_tokens), ("batch_s", settings.batch_tokens)]
            if settings.verify_tokens:
                regimes.insert(1, ("verify_s", settings.verify_tokens))
            for regime, rows in regimes:
                xr = _probe_input(m, rows, act_dtype, seed=2)
                timed = [p for p in ok if (ex.PATHS[p].max_rows or rows) >= rows]
                best = {p: math.inf for p in ok}
                runners = _stream_copies(pf) if regime != "batch_s" and ok else [pf]
                for round_ in range(settings.repeats + 1):
                    for p in timed:
                        t0 = time.perf_counter()
                        for r in runners:
                            r.run(p, xr)
                        dt = (time.perf_counter() - t0) / len(runners)
                        if round_:  # round 0 warms up
                            best[p] = min(best[p], dt)
                for p in ok:  # a few-row path not timed on more rows than it takes: None (JSON null), never chosen
                    result[p][regime] = best[p] if math.isfinite(best[p]) else None
        finally:
            if isinstance(m, QuantizedLinear):
                m.use_kernels(*(ready_before or (kernel_before,)))
            if saved is not None:
                saved.build()
    return {"paths": result}


@torch.no_grad()
def measure_embedding(module: nn.Module, settings: PlanSettings) -> dict:
    """The stored table's own gather-then-dequantize against a dense table in the module's
    compute dtype (dequantized once), on ``batch_tokens`` random ids: outputs compared for
    bit equality, times as in :func:`measure_format`."""
    ids = torch.randint(0, module.num_embeddings, (settings.batch_tokens,), generator=torch.Generator().manual_seed(3))
    dense = ex.PlannedEmbedding(module)
    runners = {"gather-dequant": lambda: type(module).forward(module, ids), "dense": lambda: dense(ids)}
    identical = bool(torch.equal(runners["gather-dequant"](), runners["dense"]()))
    best = {p: math.inf for p in runners}
    for round_ in range(settings.repeats + 1):
        for p, run in runners.items():
            t0 = time.perf_counter()
            run()
            if round_:
                best[p] = min(best[p], time.perf_counter() - t0)
    return {"identical": identical, "batch_s": best, "dense_bytes_per_weight": dense.table.element_size()}


def choose_embedding(measured: dict, memory: str, min_gain: float = 0.1) -> str:
    """``dense`` when its table fits ``memory``, it gave the same bits and it saved at least
    ``min_gain`` of the gather time; else ``gather-dequant``."""
    t = measured["batch_s"]
    fits = measured["dense_bytes_per_weight"] <= MEMORY_LIMITS[memory]
    return "dense" if fits and measured["identical"] and t["dense"] <= (1 - min_gain) * t["gather-dequant"] else "gather-dequant"


# How much each timed regime counts in a layer's path choice, per workload: encoders (``batch``)
# never run a verify step; text generation (``decode``) runs one prefill, then a step per token.
REGIME_WEIGHTS = {"batch": {"decode_s": 1.0, "verify_s": 0.0, "batch_s": 1.0},
                  "decode": {"decode_s": 1.0, "verify_s": 1.0, "batch_s": 0.5}}


def seconds(timings: dict, regime: str) -> float:
    """A path's measured time in ``regime`` (``decode_s``, ``verify_s``, ``batch_s``); inf where
    it was not timed there (a few-row path at a batch's rows; null in the plan's JSON)."""
    value = timings.get(regime)
    return math.inf if value is None else float(value)


def choose_paths(measured: dict, module: nn.Module, memory: str, workload: str = "batch") -> tuple[str, str] | None:
    """The (decode, batch) pair with the lowest sum of normalised times whose run-time forms fit
    ``memory``; None when no path passed its parity check. The regimes weigh as
    ``REGIME_WEIGHTS[workload]`` says: for text generation (``decode``) the one-token and verify
    times fully and the batch (prefill) time half; for encoders (``batch``) the verify time not
    at all."""
    w = REGIME_WEIGHTS[workload]
    paths = {p: r for p, r in measured["paths"].items() if r.get("ok") and "batch_s" in r}
    if not paths:
        return None
    best_d = min(seconds(r, "decode_s") for r in paths.values())
    best_v = min((seconds(r, "verify_s") for r in paths.values()), default=math.inf)
    best_b = min(seconds(r, "batch_s") for r in paths.values())
    limit = MEMORY_LIMITS[memory]
    choice, score = None, math.inf
    for d, rd in paths.items():
        for b, rb in paths.items():
            if ex.form_bytes(module, (d, b)) > limit:
                continue
            s = w["decode_s"] * seconds(rd, "decode_s") / max(best_d, 1e-12) + w["batch_s"] * seconds(rb, "batch_s") / max(best_b, 1e-12)
            if w["verify_s"] and "verify_s" in rd and math.isfinite(best_v):
                s += w["verify_s"] * seconds(rd, "verify_s") / max(best_v, 1e-12)
            if s < score:
                choice, score = (d, b), s
    return choice


# ----- the whole model ---------------------------------------------------------------------------

@dataclass
class ExecutionPlan:
    """What the planner decided for one model on this machine, and what it measured.

    ``layers[name]``: ``format`` (an id into ``formats``), ``decode``/``batch`` paths,
    ``held_bytes_per_weight`` (measured); ``formats[id]``: the format and, per activation dtype,
    every candidate's parity error and times; ``activation_seconds``: the summed layer times of
    the workload per allowed activation dtype (None where some layer had no path in it)."""

    signature: dict
    settings: PlanSettings
    activations: str
    stored_dtype: str
    workload: str
    formats: dict[str, dict] = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)
    activation_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    measured_formats: int = 0
    cached_formats: int = 0
    cache_ignored: bool = False
    cache_file: str | None = None
    widths: dict | None = None
    attention: dict | None = None
    embeddings: dict[str, dict] = field(default_factory=dict)
    _undo: list = field(default_factory=list, repr=False)

    def counts(self) -> dict[str, int]:
        """How many layers take each path (``decode|batch`` when they differ)."""
        out: dict[str, int] = {}
        for layer in self.layers.values():
            label = layer["batch"] if layer["decode"] == layer["batch"] else f"{layer['decode']}|{layer['batch']}"
            out[label] = out.get(label, 0) + 1
        return out

    def int8_activations_skipped(self) -> dict[str, int]:
        """W8A8 layers whose chosen path runs on float activations, per regime (``decode``,
        ``batch``): their per-token int8 rounding was measured slower here and is skipped."""
        out = {"decode": 0, "batch": 0}
        for layer in self.layers.values():
            kept = layer.get("int8_activations")
            if kept:
                for regime in out:
                    out[regime] += not kept[layer[regime]]
        return out

    def summary(self) -> dict:
        """JSON-ready: the machine, the settings, the activation dtype, every layer's paths and
        what the alternatives of its format measured."""
        return {
            "machine": self.signature,
            "settings": asdict(self.settings),
            "activations": self.activations,
            "stored_dtype": self.stored_dtype,
            "workload": self.workload,
            "activation_seconds": self.activation_seconds,
            "paths": self.counts(),
            "int8_activations_skipped": self.int8_activations_skipped(),
            "planning_seconds": round(self.seconds, 3),
            "measured_formats": self.measured_formats,
            "cached_formats": self.cached_formats,
            "widths": self.widths,
            "attention": self.attention,
            "embeddings": self.embeddings,
            "layers": self.layers,
            "formats": self.formats,
        }


def _model_float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def switch_activations(model: nn.Module, dtype: torch.dtype, memory: str) -> list:
    """Run ``model`` with ``dtype`` activations: float parameters and persistent buffers cast,
    quantized layers told to compute in ``dtype``. Plain bfloat16 linear weights stay bfloat16
    under float32 activations unless ``memory`` is ``fast`` (the planner widens them per call).
    Returns the undo record for :func:`restore_activations` (the original tensors, so ties and
    values come back exactly; tied tensors stay tied)."""
    undo: list = []
    cast: dict[int, torch.Tensor] = {}
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedModule)]
    for name, module in model.named_modules():
        if any(name.startswith(q + ".") for q in quantized):
            continue
        if isinstance(module, QuantizedModule):
            undo.append(("compute", module, module.compute_dtype))
            module.set_compute_dtype(dtype)
            continue
        keep_linear = isinstance(module, nn.Linear) and dtype == torch.float32 and memory != "fast"
        for kind, table in (("param", module._parameters), ("buffer", module._buffers)):
            for key, t in list(table.items()):
                if t is None or not t.is_floating_point() or t.dtype == dtype or (keep_linear and id(t) not in cast):
                    continue  # (a linear weight tied to a table cast before it follows the table: ties hold)
                if kind == "buffer" and key in module._non_persistent_buffers_set:
                    continue
                undo.append((kind, module, key, t))
                if id(t) not in cast:
                    new = t.detach().to(dtype)
                    cast[id(t)] = nn.Parameter(new, requires_grad=False) if kind == "param" else new
                table[key] = cast[id(t)]
    return undo


def restore_activations(undo: list) -> None:
    """Undo :func:`switch_activations` (the stored tensors come back exactly)."""
    for entry in reversed(undo):
        if entry[0] == "compute":
            entry[1].set_compute_dtype(entry[2])
            continue
        kind, module, key, original = entry
        (module._parameters if kind == "param" else module._buffers)[key] = original


def plan_execution(loaded, settings: PlanSettings | None = None, progress: bool = False) -> ExecutionPlan:
    """Plan (and install) the execution of ``loaded`` on this machine; see the module docstring.

    Replaces an earlier plan. Returns the :class:`ExecutionPlan` (also kept as
    ``loaded.execution``)."""
    settings = settings or PlanSettings()
    remove_plan(loaded)
    steady_allocator()  # measure the kernels as a long-running process would run them
    t0 = time.perf_counter()
    model = loaded.model
    sig = signature()
    cache = PlanCache(Path(settings.cache_dir) if settings.cache_dir else default_cache_dir(), sig) if settings.cache else None
    stored = _model_float_dtype(model)
    workload = settings.workload or ("batch" if getattr(loaded, "kind", "encoder") == "encoder" else "decode")
    if settings.activations == "auto":
        # bfloat16 activations are allowed where the recipe already gave up float32 numerics:
        # a bf16-cast model or one with quantized layers; a float32-only model keeps float32.
        lowp = stored == torch.bfloat16 or any(isinstance(m, QuantizedModule) for m in model.modules())
        allowed = [torch.float32, torch.bfloat16] if lowp else [torch.float32]
    elif settings.activations == "stored":
        allowed = [stored if stored in (torch.float32, torch.bfloat16) else torch.float32]
    else:
        allowed = [DTYPES[settings.activations]]
    layers = planned_layers(model)
    plan = ExecutionPlan(sig, settings, "", str(stored).replace("torch.", ""), workload)
    if cache is not None:
        plan.cache_ignored = cache.ignored
        plan.cache_file = str(cache.path)
    format_ids: dict[str, str] = {}
    layer_fid: dict[str, str] = {}  # taken before any cast changes a plain layer's dtype
    choices: dict[torch.dtype, dict[str, tuple[str, str]]] = {d: {} for d in allowed}
    totals: dict[torch.dtype, float] = {d: 0.0 for d in allowed}
    regime = "batch_s" if workload == "batch" else "decode_s"
    with torch.no_grad():
        for name, module in layers.items():
            fmt = format_of(module)
            fkey = json.dumps(fmt, sort_keys=True)
            if fkey not in format_ids:
                fid = f"f{len(format_ids)}"
                format_ids[fkey] = fid
                plan.formats[fid] = {"format": fmt, "layers": 0, "measured": {}}
            fid = format_ids[fkey]
            layer_fid[name] = fid
            entry = plan.formats[fid]
            entry["layers"] += 1
            for dtype in allowed:
                dname = str(dtype).replace("torch.", "")
                if dname not in entry["measured"]:
                    ckey = (f"{fkey}|act={dname}|decode={settings.decode_tokens}|verify={settings.verify_tokens}|batch={settings.batch_tokens}"
                            f"|split={settings.split_tokens}|kernels={kernels_lib.version()},{dense_kernel.version()},{q8a_tiles.version()}|paths={PATHS_KEY}"
                            + f"|int8act={settings.int8_activations}")
                    measured = cache.get(ckey) if cache is not None else None
                    if measured is None:
                        measured = measure_format(module, dtype, settings)
                        plan.measured_formats += 1
                        if cache is not None:
                            cache.put(ckey, measured)
                    else:
                        plan.cached_formats += 1
                    entry["measured"][dname] = measured
                pair = choose_paths(entry["measured"][dname], module, settings.memory, workload)
                if pair is None:
                    totals[dtype] = math.inf
                    continue
                choices[dtype][name] = pair
                side = pair[1] if regime == "batch_s" else pair[0]
                totals[dtype] += seconds(entry["measured"][dname]["paths"][side], regime)
    feasible = [d for d in allowed if math.isfinite(totals[d])] or [torch.float32]
    act = min(feasible, key=lambda d: totals[d])
    plan.activation_seconds = {str(d).replace("torch.", ""): totals[d] if math.isfinite(totals[d]) else None for d in allowed}
    plan.activations = str(act).replace("torch.", "")
    if act != stored:
        plan._undo = switch_activations(model, act, settings.memory)
    for name, module in layers.items():
        fid = layer_fid[name]
        pair = choices.get(act, {}).get(name)
        if pair is None:
            plan.layers[name] = {"format": fid, "decode": "native", "batch": "native", "note": "no path passed its parity check"}
            continue
        if pair != ("native", "native") or isinstance(module, QuantizedModule):
            ex.install_planned_forward(module, pair[0], pair[1], settings.split_tokens)
        plan.layers[name] = {"format": fid, "decode": pair[0], "batch": pair[1], "held_bytes_per_weight": round(held_bytes_per_weight(module), 4)}
        if ex.is_w8a8(module):
            plan.layers[name]["int8_activations"] = {p: not ex.skips_int8_activations(module, p) for p in dict.fromkeys(pair)}
    if workload == "batch":  # a decode step gathers one row: a dense table would only cost memory
        with torch.no_grad():
            for name, module in planned_embeddings(model).items():
                stored_per_weight = round(module.stored_bits() // 8 / (module.num_embeddings * module.embedding_dim), 4)
                dense_size = torch.empty(0, dtype=module.compute_dtype).element_size()
                if dense_size > MEMORY_LIMITS[settings.memory]:  # could never be kept: not built, not timed
                    plan.embeddings[name] = {"path": "gather-dequant", "measured": None, "held_bytes_per_weight": stored_per_weight,
                                             "note": f"a dense {plan.activations} table ({dense_size} bytes per entry) exceeds memory: {settings.memory}"}
                    continue
                fkey = json.dumps(format_of(module), sort_keys=True)
                ckey = f"{fkey}|act={plan.activations}|embedding|batch={settings.batch_tokens}"
                measured = cache.get(ckey) if cache is not None else None
                if measured is None:
                    measured = measure_embedding(module, settings)
                    if cache is not None:
                        cache.put(ckey, measured)
                path = choose_embedding(measured, settings.memory)
                held = 0
                if path == "dense":
                    held = ex.install_planned_embedding(module).nbytes()
                plan.embeddings[name] = {"path": path, "measured": measured,
                                         "held_bytes_per_weight": round((module.stored_bits() // 8 + held) / (module.num_embeddings * module.embedding_dim), 4)}
    if cache is not None:
        cache.save()
    if settings.attention == "auto" and getattr(loaded, "kind", None) == "encoder":  # before widths: they depend on it
        from slimformer.runtime.tile_attention import choose_attention

        plan.attention = choose_attention(loaded, max_length=settings.widths_max_length, repeats=settings.repeats, cache=settings.cache,
                                          cache_dir=settings.cache_dir)
    if settings.widths and getattr(loaded, "kind", None) == "encoder":
        from slimformer.runtime.alignment import align_widths

        found = align_widths(loaded, max_length=settings.widths_max_length, repeats=settings.repeats, cache=settings.cache, cache_dir=settings.cache_dir)
        plan.widths = {"moved": {str(k): v for k, v in found["moved"].items()}, "max_length": found["max_length"], "cached": found["cached"],
                       "seconds": round(found["seconds"], 2)}
    plan.seconds = time.perf_counter() - t0
    loaded.execution = plan
    return plan


def remove_plan(loaded) -> None:
    """Take ``loaded``'s plan off: class forwards, capability-chosen kernels, stored dtypes."""
    plan = getattr(loaded, "execution", None)
    for module in loaded.model.modules():
        ex.remove_planned_forward(module)
    if plan is not None and plan._undo:
        restore_activations(plan._undo)
        plan._undo = []
    loaded.execution = None
    if plan is not None and plan.widths is not None:
        loaded.padded_widths = None
    if plan is not None and plan.attention is not None:
        from slimformer.runtime.tile_attention import restore_attention

        restore_attention(loaded.model)
        loaded.packing = False


@contextlib.contextmanager
def stored_form(loaded):
    """The model with its stored dtypes while the block runs (for saving), planned again after."""
    plan = getattr(loaded, "execution", None)
    if plan is None or not plan._undo:
        yield loaded
        return
    restore_activations(plan._undo)
    try:
        yield loaded
    finally:
        plan._undo = switch_activations(loaded.model, DTYPES[plan.activations], plan.settings.memory)
        for module in loaded.model.modules():
            planned = ex.planned_forward_of(module)
            if planned is not None:
                planned.build()


def plan_table(summary: dict) -> str:
    """Markdown: per format, the paths measured on this machine and the layers' choices."""
    lines = [
        f"activations: {summary['activations']} (stored {summary['stored_dtype']}; summed layer time of the {summary['workload']} workload per dtype: "
        + ", ".join(f"{k} {v * 1e3:.1f} ms" if v is not None else f"{k} – (a layer had no path)" for k, v in summary["activation_seconds"].items()) + ")",
        "",
        "| format | layers | activations | path | rel. error | decode ms | verify ms | batch ms | chosen |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    chosen: dict[str, set] = {}
    for layer in summary["layers"].values():
        chosen.setdefault(layer["format"], set()).update({("decode", layer["decode"]), ("batch", layer["batch"])})
    for fid, entry in summary["formats"].items():
        fmt = entry["format"]
        label = f"{fmt.get('type')} {fmt.get('in_features')}→{fmt.get('out_features')}" + (f" {fmt['bits']}b g{fmt.get('group_size')}" if "bits" in fmt else "") + (" W8A8" if fmt.get("act_bits") == 8 else "")
        for dname, measured in entry["measured"].items():
            for p, r in measured["paths"].items():
                picked = [reg for reg, q in chosen.get(fid, set()) if q == p] if dname == summary["activations"] else []
                err = f"{r['rel_error']:.1e}" if "rel_error" in r else r.get("error", "–")
                d, v, b = (f"{seconds(r, reg) * 1e3:.{k}f}" if math.isfinite(seconds(r, reg)) else "–"
                           for reg, k in (("decode_s", 3), ("verify_s", 3), ("batch_s", 2)))
                lines.append(f"| {label} | {entry['layers']} | {dname} | {p} | {err}{'' if r.get('ok') else ' ✗'} | {d} | {v} | {b} | {', '.join(sorted(picked))} |")
    for name, entry in (summary.get("embeddings") or {}).items():
        m = entry["measured"]
        if m is None:
            lines.append(f"| embedding table `{name}` | 1 | {summary['activations']} | gather-dequant | 0 | – | – | – | batch ({entry['note']}) |")
            continue
        for p, t in m["batch_s"].items():
            err = ("0 (same bits)" if m["identical"] else "differs ✗") if p == "dense" else "0"
            lines.append(f"| embedding table `{name}` | 1 | {summary['activations']} | {p} | {err} | – | – | {t * 1e3:.2f} | {'batch' if p == entry['path'] else ''} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "ExecutionPlan",
    "PlanCache",
    "PlanSettings",
    "as_plan_settings",
    "choose_embedding",
    "choose_paths",
    "measure_embedding",
    "measure_format",
    "plan_execution",
    "plan_table",
    "planned_embeddings",
    "planned_layers",
    "planner_enabled",
    "remove_plan",
    "stored_form",
]
