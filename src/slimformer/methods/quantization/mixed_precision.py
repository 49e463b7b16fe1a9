"""Mixed precision per layer under a bit budget: measured sensitivity, exact allocation.

Each selected linear layer gets its own bit width so that the average stored bits per weight
(codes + bfloat16 scales + uint8 zero points, exactly what is saved) stays within
``target_bits``, and the summed sensitivity is minimal. As in the layer-wise PTQ allocation of
OHQ (Huang et al., 2024, "On-Chip Hardware-Aware Quantization for Mixed Precision Neural
Networks") and MC-MoE (Huang et al., 2024, "Mixture Compressor for Mixture-of-Experts LLMs
Gains More"), the allocation is an integer program over per-layer choices; with additive
per-layer costs and sensitivities it is a multiple-choice knapsack, solved exactly here by
dynamic programming over the bit budget.

Sensitivity of layer ``l`` at ``b`` bits: the distortion of the model's final output on
calibration text when only that layer is round-to-nearest quantized to ``b`` bits (encoders:
``1 - cosine`` of the pooled embeddings; causal LMs: ``KL(original || quantized)`` of the
next-token distributions). The chosen widths are then applied with GPTQ (default) or RTN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, ModuleSelection, register_method
from slimformer.methods.calibration import blockwise
from slimformer.methods.quantization import grid
from slimformer.methods.quantization.gptq import quantize_linear_gptq
from slimformer.methods.quantization.rtn import quantize_module_rtn
from slimformer.methods.selection import check_group_size, select_modules
from slimformer.models.adapters import set_submodule

SCALE_BITS = 16  # bfloat16 scale per group
ZERO_BITS = 8  # uint8 zero point per group (asymmetric grids)


@dataclass
class MixedPrecisionConfig(MethodConfig, ModuleSelection):
    """``target_bits``: average stored bits per weight over the selected linears (codes, scales
    and zero points included); ``bit_options``: widths a layer may get; ``group_size`` and
    ``symmetric``: the grid of every layer; ``quantizer``: ``gptq`` or ``rtn`` for the final
    weights; ``sensitivity_samples``: calibration documents used to measure sensitivities."""

    name = "mixed-precision"
    family = "quantization"
    paper = "OHQ: On-chip Hardware-aware Quantization (Huang et al., 2024); MC-MoE (Huang et al., 2024): sensitivity-driven bit allocation by integer programming"
    summary = "per-layer bit widths from measured sensitivities, exact allocation under an average bits-per-weight budget"
    requires_calibration = True

    target_bits: float = 3.5
    bit_options: tuple[int, ...] = (2, 3, 4, 8)
    group_size: int | None = 64
    symmetric: bool = False
    quantizer: str = "gptq"
    sensitivity_samples: int = 32

    def __post_init__(self) -> None:
        self._validate_selection()
        if "embedding" in self.targets:
            raise ConfigError("mixed-precision: the allocation covers linear layers", "quantize the embedding in a separate rtn step")
        if isinstance(self.bit_options, int) or not self.bit_options:
            raise ConfigError(f"mixed-precision: bit_options={self.bit_options!r} must be a non-empty list", "use e.g. bit_options: [2, 3, 4, 8]")
        self.bit_options = tuple(sorted(set(self.bit_options)))
        bad = [b for b in self.bit_options if isinstance(b, bool) or b not in grid.SUPPORTED_BITS]
        if bad:
            raise ConfigError(f"mixed-precision: bit option {bad[0]!r} is not supported", f"use widths from {list(grid.SUPPORTED_BITS)}")
        if isinstance(self.target_bits, bool) or not isinstance(self.target_bits, (int, float)) or self.target_bits <= 0:
            raise ConfigError(f"mixed-precision: target_bits={self.target_bits!r} must be a positive number", "use e.g. target_bits: 3.5")
        if self.group_size is not None and not is_int_at_least(self.group_size, 1):
            raise ConfigError(f"mixed-precision: group_size={self.group_size!r} must be a positive integer or null", "use e.g. group_size: 64")
        if self.quantizer not in ("gptq", "rtn"):
            raise ConfigError(f"mixed-precision: quantizer={self.quantizer!r} is not supported", "use quantizer: gptq or rtn")
        if not is_int_at_least(self.sensitivity_samples, 1):
            raise ConfigError(f"mixed-precision: sensitivity_samples={self.sensitivity_samples!r} must be a positive integer", "use e.g. sensitivity_samples: 32")


def layer_bits(rows: int, cols: int, bits: int, group_size: int | None, symmetric: bool) -> int:
    """Stored bits of a (rows, cols) weight at ``bits`` bits: packed codes (whole bytes per row,
    as stored) plus one bfloat16 scale and, if asymmetric, one uint8 zero point per group."""
    groups = grid.num_groups(cols, group_size)
    per_group = SCALE_BITS + (0 if symmetric else ZERO_BITS)
    return rows * (8 * grid.packed_row_bytes(cols, bits) + groups * per_group)


def allocate_bits(costs: list[list[int]], sensitivity: list[list[float]], budget: int, resolution: int = 200_000) -> list[int]:
    """Exact minimum-sensitivity choice of one option per layer with total cost <= ``budget``.

    ``costs[l][k]`` (stored bits) and ``sensitivity[l][k]`` of option ``k`` for layer ``l``.
    Multiple-choice knapsack by dynamic programming over the budget. Costs are expressed in
    units of their greatest common divisor; if the budget is still more than ``resolution``
    units, costs are rounded *up* to a coarser unit, so the returned choice always fits the true
    budget (and is exactly optimal whenever no rounding was needed). Returns the chosen option
    index per layer; raises ``ConfigError`` when even the cheapest choices do not fit.
    """
    cheapest = sum(min(c) for c in costs)
    if cheapest > budget:
        raise ConfigError(
            f"mixed-precision: the budget of {budget} bits is below the smallest model ({cheapest} bits)",
            "raise target_bits or add a lower width to bit_options",
        )
    unit = 0
    for row in costs:
        for c in row:
            unit = math.gcd(unit, int(c))
    unit = max(unit, 1)
    if budget // unit > resolution:
        unit = math.ceil(budget / resolution)
    units = [[math.ceil(c / unit) for c in row] for row in costs]
    cap = budget // unit
    inf = float("inf")
    # best[u] = minimal sensitivity using exactly <= u units so far; choice[l][u] = option taken.
    best = torch.full((cap + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for row_units, row_sens in zip(units, sensitivity):
        new = torch.full_like(best, inf)
        pick = torch.full((cap + 1,), -1, dtype=torch.int64)
        for k, (u, s) in enumerate(zip(row_units, row_sens)):
            if u > cap:
                continue
            cand = torch.full_like(best, inf)
            cand[u:] = best[: cap + 1 - u] + float(s)
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.full_like(pick, k), pick)
        best = new
        choices.append(pick)
    if not torch.isfinite(best).any():
        raise ConfigError("mixed-precision: no allocation fits the budget after rounding", "raise target_bits slightly")
    u = int(torch.argmin(best))
    chosen: list[int] = []
    for layer in range(len(costs) - 1, -1, -1):
        k = int(choices[layer][u])
        chosen.append(k)
        u -= units[layer][k]
    return chosen[::-1]


@torch.no_grad()
def _model_outputs(loaded, batches: list[dict]) -> list[torch.Tensor]:
    """Per batch: pooled L2-normalised embeddings (batch, dim) or log-probabilities (tokens, vocab)."""
    from slimformer.models.pooling import pool

    outs = []
    for batch in batches:
        if loaded.kind == "causal-lm":
            logits = loaded.model(**batch, use_cache=False).logits.float()
            mask = batch["attention_mask"].bool()
            outs.append(torch.log_softmax(logits[mask], dim=-1))
        else:
            hidden = loaded.model(**batch).last_hidden_state.float()
            outs.append(torch.nn.functional.normalize(pool(hidden, batch["attention_mask"], loaded.pooling), dim=-1))
    return outs


def _distortion(kind: str, reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    total = n = 0.0
    for ref, out in zip(reference, outputs):
        if kind == "causal-lm":
            total += float((ref.exp() * (ref - out)).sum())
            n += ref.shape[0]
        else:
            total += float((1.0 - (ref * out).sum(-1)).sum())
            n += ref.shape[0]
    return total / max(n, 1.0)


@torch.no_grad()
def measure_sensitivity(loaded, modules: dict[str, nn.Linear], bit_options: tuple[int, ...], group_size: int | None, symmetric: bool, batches: list[dict], progress: bool = False) -> dict[str, dict[int, float]]:
    """Output distortion on ``batches`` when only one layer is RTN-quantized, per layer and width."""
    reference = _model_outputs(loaded, batches)
    result: dict[str, dict[int, float]] = {}
    bar = tqdm(total=len(modules) * len(bit_options), desc="sensitivity", disable=not progress, unit="probe")
    try:
        for name, module in modules.items():
            original = module.weight.data
            result[name] = {}
            for bits in bit_options:
                module.weight.data = grid.fake_quantize(original.float(), bits, group_size, symmetric).to(original.dtype)
                result[name][bits] = _distortion(loaded.kind, reference, _model_outputs(loaded, batches))
                bar.update(1)
            module.weight.data = original
    finally:
        bar.close()
    return result


@register_method(MixedPrecisionConfig)
def apply_mixed_precision(loaded, config: MixedPrecisionConfig, ctx) -> dict:
    modules = select_modules(loaded, config, types=(nn.Linear,))
    check_group_size(config.name, modules, config.group_size)
    names = list(modules)
    batches = ctx.batches(loaded.tokenizer)
    per_batch = batches[0]["input_ids"].shape[0]
    probe = batches[: max(1, math.ceil(config.sensitivity_samples / per_batch))]
    sens = measure_sensitivity(loaded, modules, config.bit_options, config.group_size, config.symmetric, probe, ctx.progress)
    costs = [[layer_bits(*modules[n].weight.shape, b, config.group_size, config.symmetric) for b in config.bit_options] for n in names]
    n_weights = sum(modules[n].weight.numel() for n in names)
    budget = int(math.floor(config.target_bits * n_weights))
    chosen = allocate_bits(costs, [[sens[n][b] for b in config.bit_options] for n in names], budget)
    bits_of = {n: config.bit_options[k] for n, k in zip(names, chosen)}
    used = sum(costs[i][k] for i, k in enumerate(chosen))

    kernels: dict[str, str] = {}
    if config.quantizer == "rtn":
        for name, module in modules.items():
            new = quantize_module_rtn(module, bits_of[name], config.group_size, config.symmetric)
            set_submodule(loaded.model, name, new)
            kernels[name] = new.kernel
    else:
        for name, module, stats in blockwise(loaded, ctx, modules, hessian=True, desc="mixed-precision gptq"):
            new = quantize_linear_gptq(module, stats.hessian[name] / stats.count[name], bits_of[name], config.group_size, config.symmetric)
            set_submodule(loaded.model, name, new)
            kernels[name] = new.kernel
    return {
        "modules": sorted(modules),
        "kernels": kernels,
        "bits": bits_of,
        "target_bits": config.target_bits,
        "achieved_bits": used / n_weights,
        "sensitivity": {n: {str(b): v for b, v in sens[n].items()} for n in names},
    }
