"""BitStack: any-size compression by stacks of ~1-bit residual blocks.

Wang et al., 2024, "BitStack: Any-Size Compression of Large Language Models in Variable Memory
Environments". Each selected weight ``W`` (out, in) is first scaled per input channel by the
calibration activation norm ``s`` (in,) (``W s``: columns that see large inputs matter more),
then decomposed iteratively into residual blocks::

    R_0 = W diag(s)
    block_k = sign(R_k) ⊙ (u_k v_k^T)      u_k v_k^T: rank-``rank`` SVD of |R_k|
    R_{k+1} = R_k - block_k

so each block costs one bit per weight (the packed signs) plus ``rank * (out + in)`` bfloat16
factor entries, and ``W ~ (sum of the first n blocks) diag(s)^{-1}``.

The "any size" part: all layers' blocks are put in one model-wide order. Every layer's first
block comes first (the smallest model, as in the paper), then the rest, block ``k`` of a layer
always before block ``k+1``. ``order="level"`` follows the paper: stack level by stack level,
the layers within a level sorted by importance; ``order="greedy"`` interleaves levels, always
taking the available block with the highest importance per bit. A block's importance is the
reduction of its layer's relative output error ``||(W - W_k) X^T||^2 / ||W X^T||^2`` on the
calibration activations ``X`` (the paper measures perplexity instead, one forward pass per
layer and level). ``target_bits`` (average stored bits per weight over the selected linears) or
``target_megabytes`` (size of the saved weights file) then keeps exactly the longest prefix of
that order that fits; only the kept blocks are stored. :func:`truncate` shrinks an already
compressed model further along the same order.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, ModuleSelection, register_method
from slimformer.methods.calibration import blockwise
from slimformer.methods.quantization import grid
from slimformer.methods.quantization.modules import QuantizedModule, register_quantized_module, tensor_bits
from slimformer.methods.selection import select_modules
from slimformer.models.adapters import set_submodule

ORDERS = ("level", "greedy")
MEGABYTE = 1_000_000  # bytes


@dataclass
class BitStackConfig(MethodConfig, ModuleSelection):
    """BitStack settings: ``num_blocks`` residual blocks decomposed per layer (the most any
    layer can keep), ``rank`` of each block's magnitude approximation, ``target_bits`` (average
    stored bits per weight of the selected linears: signs, factors, scales) or
    ``target_megabytes`` (size of the saved weights file, 10^6 bytes; at most one of the two;
    neither keeps every block), ``order`` of the blocks (``level``: the paper's level-by-level
    order; ``greedy``: by importance per bit) and ``activation_scaling`` (scale the weight by
    the calibration activation norm before decomposing, as the paper does)."""

    name = "bitstack"
    family = "quantization"
    paper = "BitStack: Any-Size Compression of Large Language Models in Variable Memory Environments (Wang et al., 2024)"
    summary = "weights as stacks of 1-bit sign x low-rank residual blocks; keep the prefix of a model-wide block order that fits a size"
    requires_calibration = True

    num_blocks: int = 8
    rank: int = 16
    target_bits: float | None = None
    target_megabytes: float | None = None
    order: str = "level"
    activation_scaling: bool = True

    def __post_init__(self) -> None:
        self._validate_selection(allowed=("linear", "head"))
        if not is_int_at_least(self.num_blocks, 1):
            raise ConfigError(f"bitstack: num_blocks={self.num_blocks!r} must be a positive integer", "use e.g. num_blocks: 8")
        if not is_int_at_least(self.rank, 1):
            raise ConfigError(f"bitstack: rank={self.rank!r} must be a positive integer", "use e.g. rank: 16 (smaller for narrow models)")
        if self.target_bits is not None and self.target_megabytes is not None:
            raise ConfigError("bitstack: both target_bits and target_megabytes are given", "give one of them")
        for key in ("target_bits", "target_megabytes"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)):
                raise ConfigError(f"bitstack: {key}={value!r} must be a positive number", f"use e.g. {key}: 3")
        if self.order not in ORDERS:
            raise ConfigError(f"bitstack: order={self.order!r} is unknown", f"use order in {list(ORDERS)}")


# --------------------------------------------------------------------------------------------
# Decomposition
# --------------------------------------------------------------------------------------------


def activation_scale(sq_norm: torch.Tensor, count: int) -> torch.Tensor:
    """Per-input-channel scale (in,) from ``sum x_j^2`` (in,) over ``count`` tokens: the RMS of
    each channel, normalised to mean 1, floored at 1e-3 and rounded to bfloat16 (as stored)."""
    s = (sq_norm.float() / max(count, 1)).sqrt()
    s = s / s.mean().clamp(min=1e-12)
    return s.clamp(min=1e-3).to(torch.bfloat16).float()


def top_singular(A: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``r`` leading singular triplets of ``A`` (m, n) -> ``(U, S, V)``: U (m, r), S (r,),
    V (n, r), float32, from the eigenvectors of the smaller Gram matrix (float64)."""
    A64 = A.double()
    transpose = A64.shape[0] > A64.shape[1]
    if transpose:
        A64 = A64.t()
    L, Q = torch.linalg.eigh(A64 @ A64.t())
    L, Q = L.flip(0)[:r].clamp(min=0), Q.flip(1)[:, :r]
    S = L.sqrt()
    other = (A64.t() @ Q) / S.clamp(min=1e-300)
    U, V = (other, Q) if transpose else (Q, other)
    return U.float(), S.float(), V.float()


def decompose(weight: torch.Tensor, scale: torch.Tensor, num_blocks: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual blocks of ``weight`` (out, in) scaled by ``scale`` (in,) ->
    ``(signs, u, v)``: signs (n, out, in) bool (True = +1), u (n, out, r) and v (n, in, r)
    bfloat16, with ``weight ~ sum_k where(signs_k, 1, -1) * (u_k v_k^T) / scale``.

    Each residual is taken against the blocks as stored (bfloat16 factors), so later blocks
    also correct the rounding of earlier ones.
    """
    R = weight.detach().float() * scale.float().unsqueeze(0)
    out_features, in_features = R.shape
    r = min(rank, out_features, in_features)
    signs = torch.empty(num_blocks, out_features, in_features, dtype=torch.bool)
    us = torch.empty(num_blocks, out_features, r, dtype=torch.bfloat16)
    vs = torch.empty(num_blocks, in_features, r, dtype=torch.bfloat16)
    for k in range(num_blocks):
        positive = R >= 0
        U, S, V = top_singular(R.abs(), r)
        root = S.sqrt()
        us[k] = (U * root).to(torch.bfloat16)
        vs[k] = (V * root).to(torch.bfloat16)
        signs[k] = positive
        R = R - torch.where(positive, 1.0, -1.0) * (us[k].float() @ vs[k].float().t())
    return signs, us, vs


@register_quantized_module
class BitStackLinear(QuantizedModule):
    """A linear layer whose weight (out, in) is a stack of residual blocks, rebuilt at every
    forward pass from the stored form (nothing is cached).

    Stored: ``signs`` (n, out, ceil(in/8)) uint8 (1 bit per weight, rows packed as in
    :func:`grid.pack_codes`), ``u`` (n, out, r) and ``v`` (n, in, r) bfloat16, ``scale`` (in,)
    bfloat16 (the activation scale the weight was multiplied by), ``order`` (n,) int32 (each
    block's position in the model-wide order) and an optional float32 ``bias`` (out,).
    Input ``x`` (..., in) of any float dtype; output (..., out) in ``x.dtype``.
    """

    kernel = "bitstack-unpack"

    def __init__(self, in_features: int, out_features: int, num_blocks: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.register_buffer("signs", torch.zeros(num_blocks, out_features, grid.packed_row_bytes(in_features, 1), dtype=torch.uint8))
        self.register_buffer("u", torch.zeros(num_blocks, out_features, rank, dtype=torch.bfloat16))
        self.register_buffer("v", torch.zeros(num_blocks, in_features, rank, dtype=torch.bfloat16))
        self.register_buffer("scale", torch.ones(in_features, dtype=torch.bfloat16))
        self.register_buffer("order", torch.zeros(num_blocks, dtype=torch.int32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale: torch.Tensor, num_blocks: int, rank: int) -> "BitStackLinear":
        """Decompose ``linear``'s weight (out, in) scaled by ``scale`` (in,) into ``num_blocks`` blocks."""
        out_features, in_features = linear.weight.shape
        signs, u, v = decompose(linear.weight, scale, num_blocks, rank)
        module = cls(in_features, out_features, num_blocks, u.shape[-1], linear.bias is not None)
        module.signs.copy_(grid.pack_codes(signs.reshape(-1, in_features).to(torch.uint8), 1).reshape(module.signs.shape))
        module.u.copy_(u)
        module.v.copy_(v)
        module.scale.copy_(scale.to(torch.bfloat16))
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        module.compute_dtype = linear.weight.dtype
        return module

    @classmethod
    def from_description(cls, desc: dict) -> "BitStackLinear":
        return cls(desc["in_features"], desc["out_features"], desc["num_blocks"], desc["rank"], desc["bias"])

    def describe(self) -> dict:
        return {
            "type": "BitStackLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "num_blocks": self.num_blocks,
            "rank": self.rank,
            "bias": self.bias is not None,
            "kernel": self.kernel,
        }

    # ----- the stack ---------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.signs.shape[0]

    def block_bits(self) -> int:
        """Stored bits of one block (signs, factors and its order entry)."""
        return tensor_bits(self.signs[0], self.u[0], self.v[0], self.order[:1])

    def keep_blocks(self, n: int) -> None:
        """Keep only the first ``n`` (>= 1) blocks; the others are freed."""
        if not 1 <= n <= self.num_blocks:
            raise ValueError(f"can keep 1..{self.num_blocks} blocks, not {n}")
        for name in ("signs", "u", "v", "order"):
            self._buffers[name] = self._buffers[name][:n].clone()

    def scaled_weight(self, n: int | None = None) -> torch.Tensor:
        """Sum of the first ``n`` blocks (all by default): the scaled weight (out, in) float32."""
        n = self.num_blocks if n is None else n
        w = torch.zeros(self.out_features, self.in_features)
        for k in range(n):
            w += self.block(k)
        return w

    def block(self, k: int) -> torch.Tensor:
        """Block ``k`` (out, in) float32: its unpacked signs times ``u_k v_k^T``."""
        positive = grid.unpack_codes(self.signs[k], 1, self.in_features).bool()
        magnitude = self.u[k].float() @ self.v[k].float().t()
        return torch.where(positive, magnitude, -magnitude)

    # ----- the QuantizedModule interface -------------------------------------------------------
    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def dequantized_weight(self, n: int | None = None) -> torch.Tensor:
        """The float32 weight (out, in) of the first ``n`` blocks (all by default)."""
        return self.scaled_weight(n) / self.scale.float().unsqueeze(0)

    def stored_bits(self) -> int:
        return tensor_bits(self.signs, self.u, self.v, self.scale, self.order)

    def storage_key(self) -> torch.Tensor:
        return self.signs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, num_blocks={self.num_blocks}, rank={self.rank}"


# --------------------------------------------------------------------------------------------
# Importance, order and size
# --------------------------------------------------------------------------------------------


def relative_output_errors(module: BitStackLinear, weight: torch.Tensor, hessian: torch.Tensor) -> list[float]:
    """``E(k) = ||(W - W_k) X^T||^2 / ||W X^T||^2`` for k = 0..n blocks (E(0) = 1), from
    ``weight`` (out, in) and ``hessian`` (in, in) = X^T X (any positive scale)."""
    W = weight.detach().float()
    H = hessian.float()
    total = float(((W @ H) * W).sum().clamp(min=1e-30))
    scale = module.scale.float().unsqueeze(0)
    errors = [1.0]
    approx = torch.zeros_like(W)
    for k in range(module.num_blocks):
        approx += module.block(k) / scale
        R = W - approx
        errors.append(float(((R @ H) * R).sum()) / total)
    return errors


def universal_order(errors: dict[str, list[float]], block_bits: dict[str, int], order: str) -> list[tuple[str, int]]:
    """The model-wide block order ``[(layer, k), ...]``: every layer's block 0 first, then the
    others (block k of a layer always before k+1), by importance = error reduction per bit.

    ``errors[layer]``: E(0..n) from :func:`relative_output_errors`; ``block_bits[layer]``: bits
    of one of its blocks; ``order``: ``level`` (level by level) or ``greedy``.
    """
    names = sorted(errors)
    result = [(name, 0) for name in names]

    def gain(name: str, k: int) -> float:
        return (errors[name][k] - errors[name][k + 1]) / block_bits[name]

    if order == "level":
        depth = max(len(e) - 1 for e in errors.values())
        for k in range(1, depth):
            level = [name for name in names if k < len(errors[name]) - 1]
            result += [(name, k) for name in sorted(level, key=lambda n: -gain(n, k))]
        return result
    heap = [(-gain(name, 1), name, 1) for name in names if len(errors[name]) > 2]
    heapq.heapify(heap)
    while heap:
        _, name, k = heapq.heappop(heap)
        result.append((name, k))
        if k + 1 < len(errors[name]) - 1:
            heapq.heappush(heap, (-gain(name, k + 1), name, k + 1))
    return result


def _blocks_in_order(modules: dict[str, BitStackLinear]) -> list[tuple[int, str, int]]:
    entries = [(int(m.order[k]), name, k) for name, m in modules.items() for k in range(m.num_blocks)]
    return sorted(entries)


def _fit(modules: dict[str, BitStackLinear], budget_bits: float, fixed_bits: float, what: str, fix: str) -> dict[str, int]:
    """Blocks to keep per layer: the longest prefix of the stored order with
    ``fixed_bits + kept block bits <= budget_bits`` (at least each layer's first block)."""
    entries = _blocks_in_order(modules)
    minimum = fixed_bits + sum(m.block_bits() for m in modules.values())
    if minimum > budget_bits:
        raise ConfigError(f"bitstack: {what} is below the smallest stack (one block per layer)", fix.format(minimum=minimum))
    used = fixed_bits
    keep = {name: 0 for name in modules}
    for _, name, k in entries:
        cost = modules[name].block_bits()
        if used + cost > budget_bits:
            break
        used += cost
        keep[name] = k + 1
    return keep


def _megabyte_fixed_bits(model: nn.Module, modules: dict[str, BitStackLinear]) -> int:
    """Bits of the saved weights file that no block accounts for (other tensors, scales,
    biases, header), measured with the stacks as they are: dropping blocks only shortens the
    header, so the kept size never exceeds the target."""
    from slimformer.evaluate.cost import storage_bytes

    blocks = sum(m.block_bits() * m.num_blocks for m in modules.values())
    return 8 * storage_bytes(model) - blocks


def _kept_blocks(model: nn.Module, modules: dict[str, BitStackLinear], target_bits: float | None, target_megabytes: float | None) -> dict[str, int]:
    if target_bits is not None:
        weights = sum(m.in_features * m.out_features for m in modules.values())
        fixed = sum(tensor_bits(m.scale) for m in modules.values())
        return _fit(modules, target_bits * weights, fixed, f"target_bits={target_bits}",
                    f"raise target_bits to at least {{minimum:.0f}} bits / {weights} weights, or lower rank")
    if target_megabytes is not None:
        fixed = _megabyte_fixed_bits(model, modules)
        return _fit(modules, target_megabytes * MEGABYTE * 8, fixed, f"target_megabytes={target_megabytes}",
                    "raise target_megabytes to at least {minimum:.0f} bits / 8e6, or lower rank")
    return {name: m.num_blocks for name, m in modules.items()}


def _summary(modules: dict[str, BitStackLinear]) -> dict:
    weights = sum(m.in_features * m.out_features for m in modules.values())
    return {
        "kept_blocks": {name: m.num_blocks for name, m in sorted(modules.items())},
        "bits_per_weight": sum(m.stored_bits() for m in modules.values()) / weights,
    }


def truncate(loaded, target_bits: float | None = None, target_megabytes: float | None = None) -> dict:
    """Shrink a BitStack-compressed model in place by dropping trailing blocks along the stored
    order, to ``target_bits`` (average stored bits per weight of its BitStack layers) or
    ``target_megabytes`` (saved weights file); returns the kept blocks and bits per weight.
    A target above the current size keeps everything (blocks once dropped are gone)."""
    if (target_bits is None) == (target_megabytes is None):
        raise ConfigError("bitstack truncate: give exactly one of target_bits and target_megabytes", "e.g. truncate(model, target_bits=2.5)")
    modules = {n: m for n, m in loaded.model.named_modules() if isinstance(m, BitStackLinear)}
    if not modules:
        raise ConfigError("bitstack truncate: the model has no BitStack layers", "compress it with a bitstack step first")
    keep = _kept_blocks(loaded.model, modules, target_bits, target_megabytes)
    for name, m in modules.items():
        m.keep_blocks(keep[name])
    summary = _summary(modules)
    for record in loaded.applied:
        if (record.get("step") or {}).get("method") == "bitstack":
            record.update(summary, truncated={"target_bits": target_bits, "target_megabytes": target_megabytes})
    return summary


@register_method(BitStackConfig)
def apply_bitstack(loaded, config: BitStackConfig, ctx) -> dict:
    modules = select_modules(loaded, config, types=(nn.Linear,))
    errors: dict[str, list[float]] = {}
    stacks: dict[str, BitStackLinear] = {}
    for name, module, stats in blockwise(loaded, ctx, modules, hessian=True, desc="bitstack"):
        count = stats.count[name]
        if config.activation_scaling:
            scale = activation_scale(stats.sq_norm[name], count)
        else:
            scale = torch.ones(module.in_features)
        new = BitStackLinear.from_linear(module, scale, config.num_blocks, config.rank)
        errors[name] = relative_output_errors(new, module.weight, stats.hessian[name] / count)
        set_submodule(loaded.model, name, new)
        stacks[name] = new
    sequence = universal_order(errors, {n: m.block_bits() for n, m in stacks.items()}, config.order)
    for position, (name, k) in enumerate(sequence):
        stacks[name].order[k] = position
    keep = _kept_blocks(loaded.model, stacks, config.target_bits, config.target_megabytes)
    for name, m in stacks.items():
        m.keep_blocks(keep[name])
    return {
        "modules": sorted(stacks),
        "kernels": {name: m.kernel for name, m in stacks.items()},
        "relative_output_errors": {name: [round(e, 6) for e in errors[name]] for name in sorted(errors)},
        **_summary(stacks),
    }
