"""Codebook formats (NF4, FP4, VPTQ): the levels are what the papers define, each method's search
or second-order step lowers the error it targets, the packed forms round-trip bit for bit and
the modules compute what their codes stand for."""

import pytest
import torch
import torch.nn.functional as F

from slimformer.errors import ConfigError
from slimformer.methods import method_from_dict
from slimformer.methods.quantization import grid
from slimformer.methods.quantization.codebook_modules import LUTEmbedding, LUTLinear, VQLinear, byte_table
from slimformer.methods.quantization.float4 import NF4_OFFSET, fp_levels, normal_float_levels, quantize_fp4, quantize_nf4
from slimformer.methods.quantization.modules import module_from_description
from slimformer.methods.quantization.vptq import vptq_quantize, weighted_kmeans


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return 10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()).item()


def _gaussian(rows=128, cols=256, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _correlated_inputs(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    return (torch.randn(n, d, generator=g) @ mix) * torch.linspace(0.2, 3.0, d)


def _lut_weight(codes, lut, scales):
    rows, cols = codes.shape
    g = cols // scales.shape[1]
    return lut[codes.long()] * scales.float().repeat_interleave(g, dim=1)


def _vq_weight(codebooks, indices, scales, shape):
    w = sum(c[i] for c, i in zip(codebooks, indices)).reshape(shape)
    return w if scales is None else w * scales.unsqueeze(1)


# ----- levels ---------------------------------------------------------------------------------


def test_nf4_levels_are_normal_quantiles():
    levels = normal_float_levels(4)
    assert levels.shape == (16,) and torch.all(levels[1:] > levels[:-1])
    assert levels[0] == -1 and levels[-1] == 1 and (levels == 0).sum() == 1
    z = torch.special.ndtri(torch.tensor(NF4_OFFSET, dtype=torch.float64))
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1]) / z
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1]) / z
    assert torch.allclose(levels[levels > 0], positive.flip(0).float())
    assert torch.allclose(levels[levels < 0], negative.float())
    # Both halves are quantiles of the same normal: mirrored, the negative side's extremes match.
    assert torch.allclose(-levels[0], levels[-1]) and torch.allclose(-levels[1], levels[-2], atol=0.03)
    # The table QLoRA/bitsandbytes ship.
    assert torch.allclose(levels[[1, 8, 14]], torch.tensor([-0.6961928, 0.0795803, 0.7229568]), atol=1e-6)


def test_fp4_levels_follow_the_float_layout():
    e2m1 = fp_levels("e2m1")
    assert e2m1[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert torch.equal(e2m1[8:], -e2m1[:8])  # sign bit
    assert fp_levels("e1m2")[:8].tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5]  # uniform: int-like
    assert fp_levels("e3m0")[:8].tolist() == [0, 0.25, 0.5, 1, 2, 4, 8, 16]  # powers of two


# ----- fidelity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [64, None])
def test_nf4_beats_int4_absmax_on_gaussian_weights(group_size):
    w = _gaussian()
    codes, lut, scales = quantize_nf4(w, group_size)
    nf4 = sqnr_db(w, _lut_weight(codes, lut, scales))
    int4 = sqnr_db(w, grid.fake_quantize(w, 4, group_size, symmetric=True))
    assert nf4 > int4 + 1.0
    assert nf4 > 19.5
    assert int(codes.max()) <= 15


@pytest.mark.parametrize("weighted", [False, True])
def test_fp4_exponent_bias_search_beats_fp4_without(weighted):
    w = _gaussian(64, 128)
    X = _correlated_inputs()
    H = X.t() @ X / X.shape[0] if weighted else None

    def error(search):
        codes, lut, scales, info = quantize_fp4(w, None, ("e2m1",), search, H)
        d = w - _lut_weight(codes, lut, scales)
        return (X @ d.t()).pow(2).mean() if weighted else d.pow(2).mean(), scales, info

    searched, scales, info = error(3)
    plain, _, _ = error(0)
    assert searched < 0.85 * plain
    assert info["shift"].max() > 0
    # Per-channel scales are pure powers of two (the exponent bias), exact in bfloat16.
    assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)
    assert torch.equal(scales.to(torch.bfloat16).float(), scales)


def test_fp4_format_search_never_loses_to_a_fixed_format():
    w = _gaussian(64, 128) ** 3  # heavy tails: a wider-range format can win
    errors = {}
    for formats in (("e2m1",), ("e1m2",), ("e3m0",), ("e2m1", "e1m2", "e3m0")):
        codes, lut, scales, info = quantize_fp4(w, 32, formats, 2)
        errors[formats] = (w - _lut_weight(codes, lut, scales.float())).pow(2).sum().item()
    assert errors[("e2m1", "e1m2", "e3m0")] <= min(errors.values()) * (1 + 1e-6)


def test_vq_residual_stage_beats_one_stage():
    w = _gaussian(64, 128)
    one = _vq_weight(*vptq_quantize(w, None, 4, (64,), kmeans_iters=8), w.shape)
    two = _vq_weight(*vptq_quantize(w, None, 4, (64, 16), kmeans_iters=8), w.shape)
    assert sqnr_db(w, two) > sqnr_db(w, one) + 2.0


@pytest.mark.parametrize("sizes", [(256,), (64, 16)])
def test_vptq_output_error_below_plain_kmeans_vq(sizes):
    X = _correlated_inputs()
    H = X.t() @ X / X.shape[0]
    w = _gaussian(64, 128, seed=1)
    plain = _vq_weight(*vptq_quantize(w, H, 4, sizes, kmeans_iters=8, hessian_weighted=False, error_feedback=False), w.shape)
    vptq = _vq_weight(*vptq_quantize(w, H, 4, sizes, kmeans_iters=8), w.shape)
    err_plain = (X @ (w - plain).t()).pow(2).mean()
    err_vptq = (X @ (w - vptq).t()).pow(2).mean()
    assert err_vptq < 0.85 * err_plain


def test_weighted_kmeans_is_deterministic_and_lowers_the_weighted_error():
    from slimformer.methods.quantization.vptq import nearest_centroids

    x = _gaussian(1024, 2)
    weights = torch.ones_like(x)
    weights[:, 1] = 0.01  # the first coordinate matters 100x more
    assert torch.equal(weighted_kmeans(x, weights, 8, 5, seed=3), weighted_kmeans(x, weights, 8, 5, seed=3))

    def weighted_error(c):
        return (weights * (x - c[nearest_centroids(x, c, weights)]).pow(2)).sum()

    plain = weighted_kmeans(x, torch.ones_like(x), 8, 10)
    assert weighted_error(weighted_kmeans(x, weights, 8, 10)) < 0.8 * weighted_error(plain)


# ----- packed storage and execution -----------------------------------------------------------


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 64), (2, None)])
def test_lut_linear_round_trips_and_computes_its_weight(bits, group_size):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2**bits, (48, 128), generator=g, dtype=torch.uint8)
    lut = torch.randn(2**bits, generator=g)
    scales = torch.rand(48, grid.num_groups(128, group_size), generator=g) + 0.5
    bias = torch.randn(48, generator=g)
    q = LUTLinear.from_codes(codes, lut, scales, group_size, bias)
    assert torch.equal(q.codes(), codes)
    assert q.qweight.shape == (48, -(-128 * bits // 8)) and q.qweight.dtype == torch.uint8
    assert set(q.state_dict()) == {"qweight", "lut", "scales", "bias"}
    assert q.stored_bits() == 48 * 128 * bits + 16 * scales.numel() + 32 * 2**bits
    deq = q.dequantized_weight()
    assert torch.equal(deq, _lut_weight(codes, lut, scales.to(torch.bfloat16)))
    x = torch.randn(3, 5, 128, generator=g)
    assert torch.equal(q(x), F.linear(x, deq, bias))
    again = module_from_description(q.describe())
    again.load_state_dict(q.state_dict())
    assert torch.equal(again(x), q(x))
    q.set_compute_dtype(torch.bfloat16)
    y = q(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    ref = F.linear(x, deq, bias)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_byte_table_expands_every_byte_as_unpack_does():
    lut = torch.arange(16, dtype=torch.float32)
    table = byte_table(lut, 4, torch.float32)
    packed = torch.arange(256, dtype=torch.uint8).reshape(1, 256)
    assert torch.equal(table[packed.long()].reshape(1, -1), grid.unpack_codes(packed, 4, 512).float())


def test_lut_embedding_gathers_rows():
    w = _gaussian(100, 64)
    codes, lut, scales = quantize_nf4(w, 32)
    emb = LUTEmbedding.from_codes(codes, lut, scales, 32)
    ids = torch.tensor([[0, 5, 99], [3, 3, 7]])
    assert torch.equal(emb(ids), emb.dequantized_weight()[ids])


@pytest.mark.parametrize("sizes,row_scale", [((256,), True), ((16, 4), False)])
def test_vq_linear_round_trips_and_computes_its_weight(sizes, row_scale):
    w = _gaussian(32, 64)
    codebooks, indices, scales = vptq_quantize(w, None, 4, sizes, kmeans_iters=3, row_scale=row_scale)
    q = VQLinear.from_indices(codebooks, indices, scales, None)
    for s in range(len(sizes)):
        assert torch.equal(q.indices(s).long(), indices[s])
    assert torch.equal(q.dequantized_weight(), _vq_weight(codebooks, indices, scales, w.shape))
    index_bits = sum(int(k).bit_length() - 1 for k in sizes) * 32 * 64 // 4
    assert q.stored_bits() == index_bits + sum(16 * 4 * k for k in sizes) + (16 * 32 if row_scale else 0)
    x = torch.randn(7, 64)
    assert torch.equal(q(x), F.linear(x, q.dequantized_weight()))
    again = module_from_description(q.describe())
    again.load_state_dict(q.state_dict())
    assert torch.equal(again(x), q(x))
    q.set_compute_dtype(torch.bfloat16)
    y = q(x.to(torch.bfloat16)).float()
    ref = F.linear(x, q.dequantized_weight())
    assert ((y - ref).norm() / ref.norm()).item() < 2e-2


def test_configs_reject_bad_settings():
    assert method_from_dict({"method": "vptq", "vector_dim": 8, "codebook_size": 256, "residual_codebook_size": 256}).bits == 2.0
    assert method_from_dict({"method": "nf4"}).bits == 4
    with pytest.raises(ConfigError, match="power of two"):
        method_from_dict({"method": "vptq", "codebook_size": 100})
    with pytest.raises(ConfigError, match="formats"):
        method_from_dict({"method": "fp4", "formats": ["e4m3"]})
    with pytest.raises(ConfigError, match="unknown target"):
        method_from_dict({"method": "vptq", "targets": ["embedding"]})
