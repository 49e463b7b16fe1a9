"""Cost of a model: bytes on disk, bits per weight, parameters, memory, latency.

All figures are measured, not estimated: bytes are those of the safetensors serialization
(exactly what ``save_compressed`` writes for the weights), resident bytes are those of every
tensor the model holds at run time (stored buffers plus run-time forms such as dequantized or
kernel-packed weights), the activation peak is the growth of the process's peak resident set
during one forward pass, and latency is the median of repeated timed runs after warm-up,
interleaved between the models compared so that drift hits both alike.
"""

from __future__ import annotations

from typing import Callable

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from slimformer.io.serialization import SAFETENSORS_METADATA, quantized_modules, unique_state_dict
from slimformer.runtime.execution import planned_nbytes
from slimformer.timing import interleaved_medians, steady_allocator


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights serialized as safetensors (tied tensors once): exactly the
    size of the ``model.safetensors`` that ``save_compressed`` writes."""
    tensors, _ = unique_state_dict(model)
    return len(safetensors_bytes(tensors, metadata=SAFETENSORS_METADATA))


def logical_parameters(model: nn.Module) -> int:
    """Number of weights the model computes with: a quantized (out, in) layer counts out*in
    (+ bias), as the float layer it replaces would."""
    qmods = quantized_modules(model)
    count = 0
    skip_prefixes = tuple(n + "." for n in qmods)
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=True):
        if name.startswith(skip_prefixes) or id(p) in seen:
            continue
        seen.add(id(p))
        count += p.numel()
    counted: set[int] = set()
    for m in qmods.values():
        bias = getattr(m, "bias", None)
        if isinstance(bias, torch.Tensor):
            count += bias.numel()
        key = id(m.storage_key())
        if key in counted:  # a tied embedding/head pair: one table
            continue
        counted.add(key)
        if hasattr(m, "logical_parameters"):  # e.g. a low-rank pair of linears: what it holds
            count += m.logical_parameters()
            continue
        rows, cols = m.weight_shape
        count += rows * cols
    return count


def quantized_linear_bits(model: nn.Module) -> float | None:
    """Stored bits per weight of the quantized linear layers (codes, scales, zero points,
    codebooks, low-rank factors; not biases), or None when no linear is quantized."""
    bits = weights = 0
    for m in quantized_modules(model).values():
        if not hasattr(m, "in_features"):
            continue
        bits += m.stored_bits()
        weights += m.in_features * m.out_features
    return bits / weights if weights else None


def resident_bytes(model: nn.Module) -> int:
    """Bytes of all tensors the model holds at run time (parameters, buffers, run-time forms)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    for m in quantized_modules(model).values():
        total += m.runtime_nbytes()
    for m in model.modules():  # dense copies the execution planner holds (planned layers)
        total += planned_nbytes(m)
    return total


def _read_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def activation_peak_bytes(fn: Callable[[], object]) -> int | None:
    """Growth of the peak resident set (VmHWM) while ``fn`` runs, in bytes; ``None`` where the
    kernel offers no way to reset the peak (non-Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    before = _read_status("VmRSS")
    fn()
    peak = _read_status("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before)


def interleaved_latency(fns: dict[str, Callable[[], object]], repeats: int = 10, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds after ``warmup``
    untimed rounds (:func:`slimformer.timing.interleaved_medians`), under the steady allocator."""
    steady_allocator()
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    return interleaved_medians(fns, repeats, warmup=False)


def model_cost(model: nn.Module) -> dict:
    """Static cost figures of one model (no forward pass)."""
    stored = storage_bytes(model)
    params = logical_parameters(model)
    return {
        "storage_bytes": stored,
        "parameters": params,
        "bits_per_weight": 8 * stored / params,
        "quantized_linear_bits_per_weight": quantized_linear_bits(model),
        "resident_bytes": resident_bytes(model),
    }


@torch.no_grad()
def compare_cost(original: nn.Module, compressed: nn.Module, run_original: Callable[[], object], run_compressed: Callable[[], object], batch_shape: list[int], repeats: int = 10, warmup: int = 3) -> dict:
    """Cost of ``compressed`` and ``original`` measured in the same run, with ratios.

    ``run_original`` / ``run_compressed``: one inference of the fixed latency batch of shape
    ``batch_shape`` (batch, seq) through each model. Ratios are compressed / original for sizes
    and original / compressed for speed (``speedup``).
    """
    a = model_cost(original)
    b = model_cost(compressed)
    run_o, run_c = run_original, run_compressed
    run_o()
    peak_o = activation_peak_bytes(run_o)
    run_c()
    peak_c = activation_peak_bytes(run_c)
    lat = interleaved_latency({"original": run_o, "compressed": run_c}, repeats, warmup) if compressed is not original else None
    if lat is None:
        t = interleaved_latency({"model": run_o}, repeats, warmup)["model"]
        lat = {"original": t, "compressed": t}
    out = {
        "original": {**a, "activation_peak_bytes": peak_o, "latency_s": lat["original"]},
        "compressed": {**b, "activation_peak_bytes": peak_c, "latency_s": lat["compressed"]},
        "size_ratio": b["storage_bytes"] / a["storage_bytes"],
        "parameter_ratio": b["parameters"] / a["parameters"],
        "resident_ratio": b["resident_bytes"] / a["resident_bytes"],
        "speedup": lat["original"] / lat["compressed"],
        "latency_batch": list(batch_shape),
    }
    if peak_o is not None and peak_c is not None:
        out["peak_memory_ratio"] = (b["resident_bytes"] + peak_c) / (a["resident_bytes"] + peak_o)
    return out
