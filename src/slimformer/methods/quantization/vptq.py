"""VPTQ: vector post-training quantization with second-order error feedback.

Liu et al., 2024, "VPTQ: Extreme Low-bit Vector Post-Training Quantization for Large Language
Models". The weight (out, in) of each linear layer, each row divided by its RMS (a bfloat16 scale
per row), is cut along the input dimension into vectors of ``vector_dim`` columns. A codebook of
``codebook_size`` centroids is learned by k-means in which every coordinate is weighted by the
diagonal of the layer's input Hessian ``H = sum x x^T`` (and by the row's squared scale); an
optional residual codebook (``residual_codebook_size``) is learned the same way on what the first
stage leaves. Vectors are then assigned GPTQ-style, ``vector_dim`` columns at a time from left to
right: with ``U`` the upper Cholesky factor of ``H^-1`` and ``A = U_bb^-1`` for the current
column block, each row's vector takes the centroid (then residual centroid) nearest in the metric
``||(w - c) A||`` (the exact second-order cost of the block given the columns after it may still
move), and the block's error ``(W_b - Q_b) A`` is spread over the remaining columns through
``U_b,rest`` (lazily, ``block_size`` columns at a time). Outlier handling and codebook fine-tuning
of the paper are left out.

Bits per weight: ``log2(codebook_size)/vector_dim`` per stage, plus the codebooks
(K x vector_dim bfloat16 each, stored per layer and counted in ``stored_bits``) and 16 bits per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import MethodConfig, ModuleSelection, register_method
from slimformer.methods.calibration import blockwise
from slimformer.methods.quantization.codebook_modules import VQLinear
from slimformer.methods.quantization.gptq import prepare_hessian
from slimformer.methods.selection import select_modules
from slimformer.models.adapters import set_submodule

_CHUNK = 4096  # vectors per distance computation (bounds the (chunk, K) score matrix)
MAX_POINTS_PER_CENTROID = 256  # k-means sample size per centroid (faiss's default)


def nearest_centroids(x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Index (N,) int64 of the centroid (K, d) nearest each vector of ``x`` (N, d).

    ``weights`` (N, d): per-coordinate weights of the squared distance (None: Euclidean).
    """
    out = torch.empty(x.shape[0], dtype=torch.long)
    if weights is None:  # ||c||^2 - 2 x.c, as one matmul of (N, d+1) by (d+1, K)
        lhs = torch.cat([torch.ones_like(x[:, :1]), x], 1)
        rhs = torch.cat([(centroids * centroids).sum(1, keepdim=True), -2 * centroids], 1).t().contiguous()
    else:  # sum_j w_j c_j^2 - 2 sum_j w_j x_j c_j, as one matmul of (N, 2d) by (2d, K)
        lhs = torch.cat([weights, weights * x], 1)
        rhs = torch.cat([centroids * centroids, -2 * centroids], 1).t().contiguous()
    for i in range(0, x.shape[0], _CHUNK):
        out[i : i + _CHUNK] = (lhs[i : i + _CHUNK] @ rhs).argmin(1)
    return out


def weighted_kmeans(x: torch.Tensor, weights: torch.Tensor, k: int, iters: int, seed: int = 0) -> torch.Tensor:
    """Centroids (k, d) of ``x`` (N, d) minimising ``sum_n sum_j weights[n, j] (x[n, j] - c[j])^2``.

    Initialised from ``k`` vectors drawn with ``seed`` (deterministic); a centroid left without
    vectors keeps its place. Each iteration: batched nearest-centroid search, weighted means.
    Beyond ``MAX_POINTS_PER_CENTROID * k`` vectors, the iterations run on a seeded sample of
    that many (as faiss does by default); the caller assigns every vector afterwards.
    """
    g = torch.Generator().manual_seed(seed)
    if x.shape[0] > MAX_POINTS_PER_CENTROID * k:
        keep = torch.randperm(x.shape[0], generator=g)[: MAX_POINTS_PER_CENTROID * k]
        x, weights = x[keep], weights[keep]
    n, d = x.shape
    start = torch.randperm(n, generator=g)[:k] if n >= k else torch.randint(n, (k,), generator=g)
    c = x[start].clone()
    wx = weights * x
    for _ in range(iters):
        idx = nearest_centroids(x, c, weights)
        num = torch.zeros(k, d).index_add_(0, idx, wx)
        den = torch.zeros(k, d).index_add_(0, idx, weights)
        c = torch.where(den > 0, num / den.clamp_min(1e-30), c)
    return c


def vptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    vector_dim: int,
    codebook_sizes: tuple[int, ...],
    kmeans_iters: int = 10,
    damp: float = 0.01,
    block_size: int = 128,
    row_scale: bool = True,
    seed: int = 0,
    hessian_weighted: bool = True,
    error_feedback: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """Vector-quantize ``weight`` (out, in) given ``hessian`` (in, in) = sum of x x^T (or None).

    ``hessian_weighted``: weight k-means by the Hessian diagonal; ``error_feedback``: assign
    block by block with inverse-Hessian error propagation (both need ``hessian``; turning both
    off gives plain k-means VQ). Returns ``(codebooks [(K_s, d)] bfloat16-exact float32,
    indices [(out, in/d) int64], scales (out,) float32 or None)``.
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    d = vector_dim
    nvec = cols // d
    if hessian is None:
        hessian_weighted = error_feedback = False
        hdiag = None
    else:
        hdiag = torch.diag(hessian).float()  # the diagonal is all the weighting reads
        dead = hdiag == 0
        hdiag = hdiag.masked_fill(dead, 1.0)
        W[:, dead] = 0.0
    scales = None
    if row_scale:
        rms = W.pow(2).mean(1).sqrt()
        scales = torch.where(rms > 0, rms, torch.ones_like(rms)).to(torch.bfloat16).float()
        W = W / scales.unsqueeze(1)
    h = hdiag if hessian_weighted else torch.ones(cols)
    h = h / h.mean()
    row_w = scales.pow(2) / scales.pow(2).mean() if scales is not None else torch.ones(rows)
    weights = (row_w.view(rows, 1, 1) * h.view(1, nvec, d)).reshape(-1, d)
    target = W.reshape(-1, d)
    codebooks: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    for s, k in enumerate(codebook_sizes):
        c = weighted_kmeans(target, weights, k, kmeans_iters, seed + s).to(torch.bfloat16).float()
        idx = nearest_centroids(target, c, weights)
        target = target - c[idx]
        codebooks.append(c)
        indices.append(idx.reshape(rows, nvec))
    if not error_feedback:
        return codebooks, indices, scales

    U = prepare_hessian(hessian, act_order=False, damp=damp).hinv  # built only now: not held through the k-means
    blocks = torch.arange(nvec) * d
    diag_blocks = torch.stack([U[b : b + d, b : b + d] for b in blocks.tolist()])
    A = torch.linalg.inv(diag_blocks)  # (nvec, d, d): A_j = U_jj^-1, upper triangular
    indices = [torch.zeros(rows, nvec, dtype=torch.long) for _ in codebook_sizes]
    block_size = d * max(1, block_size // d)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(0, i2 - i1, d):
            j = (i1 + i) // d
            a = A[j]
            w = W1[:, i : i + d]
            q = torch.zeros_like(w)
            for s, c in enumerate(codebooks):
                idx = nearest_centroids((w - q) @ a, c @ a)
                indices[s][:, j] = idx
                q = q + c[idx]
            err = (w - q) @ a
            W1[:, i + d :] -= err @ U1[i : i + d, i + d :]
            Err1[:, i : i + d] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return codebooks, indices, scales


@dataclass
class VPTQConfig(MethodConfig, ModuleSelection):
    """VPTQ settings: ``vector_dim`` (columns per vector), ``codebook_size`` (centroids of the
    first stage; a power of two up to 256), ``residual_codebook_size`` (second stage on the
    residual; 0 = none), ``kmeans_iters``, ``damp`` (relative Hessian damping), ``block_size``
    (columns per lazy error update), ``row_scale`` (a bfloat16 RMS scale per output row) and
    ``seed`` (k-means initialisation). ``bits`` (read-only) is the nominal index bits per weight,
    ``sum log2(K_s) / vector_dim``; codebooks and row scales add to it (reported per layer)."""

    name = "vptq"
    family = "quantization"
    paper = "VPTQ: Extreme Low-bit Vector Post-Training Quantization for Large Language Models (Liu et al., 2024)"
    summary = "vector quantization: Hessian-weighted k-means codebooks (+ residual stage), second-order assignment"
    requires_calibration = True

    vector_dim: int = 4
    codebook_size: int = 256
    residual_codebook_size: int = 0
    kmeans_iters: int = 10
    damp: float = 0.01
    block_size: int = 128
    row_scale: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self._validate_selection(allowed=("linear", "head"))
        if not (is_int_at_least(self.vector_dim, 1) and self.vector_dim <= 16):
            raise ConfigError(f"vptq: vector_dim={self.vector_dim!r} must be an integer in 1..16", "use e.g. vector_dim: 4")
        for key, allow_zero in (("codebook_size", False), ("residual_codebook_size", True)):
            k = getattr(self, key)
            ok = is_int_at_least(k, 0) and ((allow_zero and k == 0) or (2 <= k <= 256 and k & (k - 1) == 0))
            if not ok:
                raise ConfigError(f"vptq: {key}={k!r} must be a power of two in 2..256" + (" or 0" if allow_zero else ""), f"use e.g. {key}: 256")
        if not is_int_at_least(self.kmeans_iters, 1):
            raise ConfigError(f"vptq: kmeans_iters={self.kmeans_iters!r} must be a positive integer", "use e.g. kmeans_iters: 10")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise ConfigError(f"vptq: damp={self.damp!r} must be in (0, 1)", "use e.g. damp: 0.01")
        if not is_int_at_least(self.block_size, 1):
            raise ConfigError(f"vptq: block_size={self.block_size!r} must be a positive integer", "use e.g. block_size: 128")
        if not is_int_at_least(self.seed, 0):
            raise ConfigError(f"vptq: seed={self.seed!r} must be a non-negative integer", "use e.g. seed: 0")

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return (self.codebook_size,) + ((self.residual_codebook_size,) if self.residual_codebook_size else ())

    @property
    def bits(self) -> float:
        """Nominal index bits per weight (codebooks and row scales come on top)."""
        return sum(math.log2(k) for k in self.codebook_sizes) / self.vector_dim


@register_method(VPTQConfig)
def apply_vptq(loaded, config: VPTQConfig, ctx) -> dict:
    modules = select_modules(loaded, config, types=(torch.nn.Linear,))
    for name, module in modules.items():
        if module.weight.shape[1] % config.vector_dim:
            raise ConfigError(
                f"vptq: vector_dim {config.vector_dim} does not divide the width {module.weight.shape[1]} of {name}",
                "choose a vector_dim that divides every selected layer's input width (e.g. 4 or 8), or exclude that layer",
            )
    kernels: dict[str, str] = {}
    bits: dict[str, float] = {}
    stored = weights = 0
    for name, module, stats in blockwise(loaded, ctx, modules, hessian=True, desc="vptq"):
        H = stats.hessian[name] / stats.count[name]
        codebooks, indices, scales = vptq_quantize(
            module.weight, H, config.vector_dim, config.codebook_sizes, config.kmeans_iters, config.damp, config.block_size, config.row_scale, config.seed
        )
        new = VQLinear.from_indices(codebooks, indices, scales, module.bias)
        new.set_compute_dtype(module.weight.dtype)
        set_submodule(loaded.model, name, new)
        kernels[name] = new.kernel
        rows, cols = new.weight_shape
        bits[name] = round(new.stored_bits() / (rows * cols), 4)
        stored += new.stored_bits()
        weights += rows * cols
    return {"modules": sorted(modules), "kernels": kernels, "bits_per_weight": bits, "mean_bits_per_weight": round(stored / weights, 4)}


__all__ = ["VPTQConfig", "nearest_centroids", "vptq_quantize", "weighted_kmeans"]
