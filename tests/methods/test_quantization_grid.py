"""Uniform grids and bit packing: exact round trips, error bounded by the step, SQNR."""

import pytest
import torch

from slimformer.methods.quantization import grid


def sqnr_db(w: torch.Tensor, deq: torch.Tensor) -> float:
    return (10 * torch.log10(w.pow(2).sum() / (w - deq).pow(2).sum())).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("cols", [7, 64, 100])
def test_pack_unpack_round_trip_is_exact(bits, cols):
    torch.manual_seed(bits * cols)
    codes = torch.randint(0, 2**bits, (13, cols), dtype=torch.uint8)
    packed = grid.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (13, -(-cols * bits // 8)), "each code must take exactly `bits` bits"
    assert torch.equal(grid.unpack_codes(packed, bits, cols), codes)


def test_four_bit_codes_take_half_a_byte():
    codes = torch.randint(0, 16, (384, 1536), dtype=torch.uint8)
    assert grid.pack_codes(codes, 4).numel() == 384 * 1536 // 2


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16, 64])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_is_bounded_by_the_step(bits, group_size, symmetric):
    torch.manual_seed(0)
    w = torch.randn(48, 128) * torch.rand(48, 1) * 3
    scale, zero = grid.grid_params(w, bits, group_size, symmetric)
    codes = grid.quantize_codes(w, scale, zero, bits)
    assert int(codes.max()) <= 2**bits - 1
    deq = grid.dequantize_codes(codes, scale, zero)
    g = 128 if group_size is None else group_size
    step = scale.repeat_interleave(g, dim=1)
    # Symmetric grids cover [-absmax, absmax] exactly: half a step. Asymmetric grids round the
    # zero point to an integer, which can shift the range by half a step: one step.
    bound = step * (0.5 if symmetric else 1.0) * (1 + 1e-3)
    assert torch.all((w - deq).abs() <= bound)
    # Zero is exactly representable (pruned weights stay zero after quantization).
    z = torch.zeros(4, 128)
    s0, z0 = grid.grid_params(torch.randn(4, 128), bits, group_size, symmetric)
    assert torch.equal(grid.dequantize_codes(grid.quantize_codes(z, s0, z0, bits), s0, z0), z)


@pytest.mark.parametrize("bits,min_db", [(8, 40.0), (4, 17.0), (3, 11.0), (2, 4.0)])
def test_sqnr_on_random_and_real_weights(bits, min_db, minilm):
    torch.manual_seed(1)
    random_w = torch.randn(256, 384)
    real_w = minilm.model.encoder.layer[0].attention.self.query.weight.detach()
    for w in (random_w, real_w):
        deq = grid.fake_quantize(w, bits, 64, symmetric=False)
        assert sqnr_db(w, deq) > min_db
    # More bits, less error: each extra bit buys roughly 6 dB.
    assert sqnr_db(real_w, grid.fake_quantize(real_w, 4, 64, False)) > sqnr_db(real_w, grid.fake_quantize(real_w, 3, 64, False)) + 4


def test_group_wise_beats_per_channel():
    torch.manual_seed(2)
    w = torch.randn(64, 256) * torch.linspace(0.1, 4, 256)  # columns of very different ranges
    assert sqnr_db(w, grid.fake_quantize(w, 4, 32, False)) > sqnr_db(w, grid.fake_quantize(w, 4, None, False))


def test_a_group_size_that_does_not_divide_a_width_is_refused_with_sizes_that_do():
    """SmolLM2's widths (576, 1536) take no group of 128: the fix names the sizes that divide all."""
    import pytest
    from torch import nn

    from slimformer.errors import ConfigError
    from slimformer.methods.selection import check_group_size

    modules = {"q_proj": nn.Linear(576, 576), "down_proj": nn.Linear(1536, 576)}
    check_group_size("gptq", modules, 192)  # divides both
    with pytest.raises(ConfigError) as err:
        check_group_size("gptq", modules, 128)
    assert "does not divide the width 576 of q_proj" in str(err.value)
    assert "here: 16, 32, 64, 96, 192" in err.value.fix
