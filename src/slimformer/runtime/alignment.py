"""Batch widths chosen by measurement: a few masked columns more where the attention kernel is
faster.

A batch of encoder inputs runs at the width of its longest row. The time of a block is not
proportional to that width: CPU attention kernels work in blocks of query/key positions, and off
their block size they can be several times slower. Measured on a 2-core Xeon with AMX (bfloat16,
32 rows, MiniLM's 12 heads of 32): ``scaled_dot_product_attention`` took 7.3 ms at 124 positions
and 3.1 ms at 128, 3.7 ms at 68 and 1.1 ms at 64. Running such a batch four columns wider, the
extra columns masked, gives the same outputs in less time.

:func:`measure_widths` times one of the model's own blocks (its planned or quantized layers and
its attention implementation included) at every width up to ``max_length``, per row, with about
``tokens`` positions per call, and picks for each width ``w`` the width in ``[w, w + slack]``
that is fastest per row, if it is at least ``min_gain`` (10 %) faster than ``w`` itself: the
real effects are 20-60 %, a sweep's noise a few per cent. Timings are
cached on disk per machine signature (beside the planner's, ``widths-<signature>.json``), so the sweep runs once per machine,
model shape and dtype. Nothing is assumed about which widths are fast: on a machine where every
width costs its share, the table is the identity.

:func:`align_widths` measures and installs the table as ``loaded.padded_widths``, which
``embed`` and the dynamic runtime use for every batch, bucket and reduced width
(:mod:`slimformer.models.batching`).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from slimformer.errors import ConfigError
from slimformer.models.adapters import attention_implementation
from slimformer.runtime.machine import signature
from slimformer.runtime.measurements import PlanCache, default_cache_dir


def block_key(loaded, block: torch.nn.Module, max_length: int, tokens: int) -> str:
    """What the timings depend on besides the machine: the block's modules, the shapes and dtypes
    of their parameters and buffers (packed codes included), and the planned paths."""
    from slimformer.runtime.execution import planned_forward_of

    tensors = sorted((name, tuple(t.shape), str(t.dtype)) for name, t in [*block.named_parameters(), *block.named_buffers()])
    modules = []
    for name, m in block.named_modules():
        planned = planned_forward_of(m)
        modules.append((name, type(m).__name__, (planned.decode, planned.batch) if planned is not None else None))
    attn = attention_implementation(loaded.model)
    return json.dumps({"widths": 2, "modules": modules, "tensors": tensors, "attn": attn, "max_length": max_length, "tokens": tokens})


def block_call(loaded, block: torch.nn.Module, width: int, tokens: int):
    """A call of ``block`` on random hidden states (rows, width, dim) with a padding mask, rows
    chosen so the call holds about ``tokens`` positions; returns (call, rows)."""
    from transformers.masking_utils import create_bidirectional_mask

    config = loaded.model.config
    rows = max(1, round(tokens / width))
    dtype = next((p.dtype for p in block.parameters() if p.is_floating_point()), torch.float32)
    hidden = torch.randn(rows, width, config.hidden_size, generator=torch.Generator().manual_seed(width)).to(dtype)
    attention_mask = torch.ones(rows, width, dtype=torch.long)
    if width > 1:
        attention_mask[-1, -1] = 0  # a padded batch, as buckets are: the kernel sees a mask
    mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
    return (lambda: block(hidden, attention_mask=mask)), rows


@torch.no_grad()
def measure_widths(loaded, max_length: int = 128, tokens: int = 512, slack: int = 32, min_gain: float = 0.1,
                   repeats: int = 3, cache: bool = True, cache_dir: str | None = None, progress: bool = False) -> dict:
    """Per-row seconds of one block at widths 1..``max_length`` and the run width chosen for
    each (see the module docstring). Returns ``widths`` (index = longest row, value = width to
    run at; index 0 unused), ``seconds_per_row`` (median of ``repeats`` sweeps, index = width),
    ``moved`` (widths that run wider), ``seconds`` (sweep time, 0 when cached), ``cached``.
    ``cache``/``cache_dir``: the planner's on-disk cache (None: its default location)."""
    if loaded.kind != "encoder":
        raise ConfigError(f"batch widths are measured for encoders; this model is a {loaded.kind}", "use it on an encoder model")
    for name, value, low in (("max_length", max_length, 1), ("tokens", tokens, 1), ("slack", slack, 0), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"batch widths: {name}={value!r} must be an integer >= {low}", f"pass e.g. {name}=32")
    positions = getattr(loaded.model.config, "max_position_embeddings", None)
    max_length = min(max_length, positions) if positions else max_length
    block = loaded.adapter.blocks()[0]
    store = PlanCache(Path(cache_dir) if cache_dir else default_cache_dir(), signature(), prefix="widths") if cache else None
    key = block_key(loaded, block, max_length, tokens)
    found = store.get(key) if store is not None else None
    t0 = time.perf_counter()
    if found is None:
        calls = {w: block_call(loaded, block, w, tokens) for w in range(1, max_length + 1)}
        from tqdm.auto import tqdm

        samples: dict[int, list[float]] = {w: [] for w in calls}
        for call, _ in calls.values():  # warm-up: first-call allocations and kernel selection
            call()
        with tqdm(total=repeats * len(calls), desc="batch widths", unit="width", disable=not progress) as bar:
            for _ in range(repeats):  # sweeps interleave the widths: slow drifts hit all alike
                for w, (call, rows) in calls.items():
                    start = time.perf_counter()
                    call()
                    samples[w].append((time.perf_counter() - start) / rows)
                    bar.update(1)
        per_row = [0.0] + [statistics.median(samples[w]) for w in range(1, max_length + 1)]
        if store is not None:
            store.put(key, {"seconds_per_row": per_row})
            store.save()
    else:
        per_row = list(found["seconds_per_row"])
    widths = choose_widths(per_row, slack, min_gain)
    moved = {w: v for w, v in enumerate(widths) if v != w}
    return {"widths": widths, "seconds_per_row": per_row, "moved": moved, "seconds": time.perf_counter() - t0 if found is None else 0.0,
            "cached": found is not None, "max_length": max_length, "tokens": tokens, "slack": slack, "min_gain": min_gain}


def choose_widths(seconds_per_row: list[float], slack: int, min_gain: float) -> tuple[int, ...]:
    """For each width ``w`` (index), the width in ``[w, w + slack]`` with the least time per row,
    kept only if it saves at least ``min_gain`` of ``w``'s own time; else ``w``."""
    n = len(seconds_per_row) - 1
    out = [0]
    for w in range(1, n + 1):
        best = min(range(w, min(n, w + slack) + 1), key=lambda v: (seconds_per_row[v], v))
        out.append(best if seconds_per_row[best] <= (1 - min_gain) * seconds_per_row[w] else w)
    return tuple(out)


def align_widths(loaded, **kwargs) -> dict:
    """Measure (:func:`measure_widths`, same arguments) and install ``loaded.padded_widths``."""
    found = measure_widths(loaded, **kwargs)
    loaded.padded_widths = found["widths"]
    return found


