"""The channel-tiled int8-activation kernel (``torch.ops.slimformer.q8a_tiles_linear``, the
``packed-q8a-tiles`` path): from a tiled copy of the stored codes it computes the product of the
dequantized weight and the activations rounded to int8 per 32 columns, as ``packed-q8a`` does
(float32 rounding apart); a row's output does not depend on the rows beside it; the copy holds the
bytes it declares; the planner offers, dispatches and accounts for it."""

from pathlib import Path

import pytest
import torch

from conftest import random_gguf_linear, random_packed_linear
from slimformer import kernels
from slimformer.kernels import q8a_tiles
from slimformer.methods.quantization import grid
from slimformer.runtime import execution as ex


def _has_vnni_flags() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return {"avx512_vnni", "avx512bw", "avx512vl", "avx512f"} <= set(line.split(":", 1)[-1].split())


def test_the_tiled_kernel_is_there_exactly_where_the_cpu_has_vnni():
    """No silent absence: where the CPU reports AVX-512 VNNI (and the kernels build) it loads;
    elsewhere it says why not and the path is not offered."""
    assert q8a_tiles.available() == (_has_vnni_flags() and kernels.packed_linear_available())
    if not q8a_tiles.available():
        assert q8a_tiles.unavailable_reason()
        assert "packed-q8a-tiles" not in ex.candidate_paths(random_packed_linear(8, None, True), torch.float32)


needs_tiles = pytest.mark.skipif(not q8a_tiles.available(), reason="the CPU lacks AVX-512 VNNI (asserted above)")


def _rounded(x: torch.Tensor) -> torch.Tensor:
    """x (rows, in) rounded to int8 per block of 32 columns (symmetric, scale max|x| / 127), float64."""
    blocks = x.double().reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    codes = torch.round(blocks * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))).clamp(-127, 127)
    return (codes * (amax / 127.0)).reshape(x.shape)


def _tiles(layer):
    layout = layer.packed_layout()
    return q8a_tiles.pack(layout["qweight"], layout["scales"], layout["zeros"], layout["bits"], layout["group_size"], layer.in_features,
                          mins=layout["mins"])


@needs_tiles
@pytest.mark.parametrize("bits,group_size,symmetric,out,inp", [
    (4, 32, False, 96, 192), (4, 64, True, 90, 192), (4, None, False, 48, 160), (4, 128, False, 40, 256),
    (8, None, True, 96, 192), (8, 32, False, 100, 224), (8, 64, True, 96, 192), (8, 96, False, 17, 192)])
@pytest.mark.parametrize("rows", [1, 3, 8, 11])
def test_the_product_is_the_dequantized_weight_times_the_int8_rounded_activations(bits, group_size, symmetric, out, inp, rows):
    """Out features not a multiple of the 16-channel tile (90, 100, 17), every group shape (32
    columns up to the whole row), and more rows than one pass takes (11 > 8); x has an outlier
    column, as LLM activations do. Against packed-q8a on the same codes: the same roundings."""
    layer = random_packed_linear(bits, group_size, symmetric, out=out, inp=inp)
    x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(1))
    x[:, 5] *= 30
    y = q8a_tiles.linear(x, _tiles(layer), layer.bias)
    assert y.dtype == torch.float32 and y.shape == (rows, out)
    exact_rounded = _rounded(x) @ layer.dequantized_weight().double().t() + layer.bias.double()
    assert float((y.double() - exact_rounded).norm() / exact_rounded.norm()) < 2e-6
    if kernels.supports_int8_activations(bits, grid.effective_group_size(inp, group_size), inp):
        ref = kernels.packed_linear_q8a(x, layer.qweight, layer.scales, layer.zeros, bits, grid.effective_group_size(inp, group_size), layer.bias)
        assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5


@needs_tiles
@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, None), (8, 64)])
def test_a_row_gives_the_same_bits_alone_and_beside_other_rows(bits, group_size):
    """Speculative verification runs up to 8 rows through the decode path; its greedy output equals
    plain decoding only if each row's numbers are those of the one-row call (also past 8 rows)."""
    layer = random_packed_linear(bits, group_size, False, inp=256)
    tiles = _tiles(layer)
    x = torch.randn(13, 256, generator=torch.Generator().manual_seed(3))
    together = q8a_tiles.linear(x, tiles, layer.bias)
    alone = torch.cat([q8a_tiles.linear(x[i:i + 1], tiles, layer.bias) for i in range(13)])
    assert torch.equal(together, alone)
    for width in (2, 5, 8):
        assert torch.equal(q8a_tiles.linear(x[:width], tiles, layer.bias), alone[:width])


@needs_tiles
@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_tile_with_their_implicit_zero_points_and_minima(gguf_type):
    g = torch.Generator().manual_seed(2)
    layer = random_gguf_linear(gguf_type, 40, 160, g)
    x = torch.randn(3, 160, generator=g)
    ref = _rounded(x) @ layer.dequantized_weight().double().t() + layer.bias.double()
    assert "packed-q8a-tiles" in ex.candidate_paths(layer, torch.float32)
    assert "packed-q8a-tiles" not in ex.candidate_paths(layer, torch.float32, int8_activations="keep")
    planned = ex.install_planned_forward(layer, "packed-q8a-tiles", "packed-fp32", split_rows=8)
    try:
        y = layer(x)
        assert float((y.double() - ref).norm() / ref.norm()) < 2e-6
        # the copy: one byte per code (Q8_0) or per two codes (4-bit), two float32 per channel and
        # group, the 40 channels padded to 48 (three 16-channel tiles)
        assert planned.nbytes() == 48 * 160 * (8 if gguf_type == "Q8_0" else 4) // 8 + 2 * 4 * 48 * 5
        assert layer(torch.randn(12, 160, generator=g)).shape == (12, 40)  # past split_rows: the batch path
    finally:
        ex.remove_planned_forward(layer)


@needs_tiles
def test_the_planned_path_rebuilds_its_copy_when_the_stored_codes_change():
    layer = random_packed_linear(8, None, True)
    assert "packed-q8a-tiles" in ex.candidate_paths(layer, torch.float32)
    ex.install_planned_forward(layer, "packed-q8a-tiles", "unpack-bf16", split_rows=8)
    x = torch.randn(2, layer.in_features, generator=torch.Generator().manual_seed(4))
    before = layer(x)
    other = random_packed_linear(8, None, True, seed=5)
    layer.load_state_dict(other.state_dict())
    after = layer(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, q8a_tiles.linear(x, _tiles(other), other.bias))
    ex.remove_planned_forward(layer)


def test_layouts_that_cannot_be_tiled_are_refused_with_the_reason():
    assert not q8a_tiles.supports(8, 48, 192) and not q8a_tiles.supports(4, 32, 200) and not q8a_tiles.supports(3, 32, 192)
    layer = random_packed_linear(8, 48, False)
    if q8a_tiles.available():
        assert "packed-q8a-tiles" not in ex.candidate_paths(layer, torch.float32)
    with pytest.raises(ValueError, match="multiples of 32"):
        _tiles(layer)
