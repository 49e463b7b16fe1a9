"""Packed modules: the CPU kernel paths compute what the stored codes stand for."""

import pytest
import torch
from torch import nn

from slimformer.methods.quantization import QuantizedLinear, choose_kernel, quantize_module_rtn
from slimformer.methods.quantization.modules import QuantizedEmbedding


@pytest.mark.parametrize(
    "bits,group_size,symmetric,kernel",
    [
        (8, None, True, "int8pack"),
        (8, None, False, "int8pack"),
        (4, 64, False, "int4pack"),
        (4, 32, True, "int4pack"),
        (4, 128, False, "int4pack"),
        (8, 64, True, "unpack"),
        (3, 64, False, "unpack"),
        (2, 32, True, "unpack"),
    ],
)
def test_kernel_output_matches_the_dequantized_weight(bits, group_size, symmetric, kernel):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    q = quantize_module_rtn(linear, bits, group_size, symmetric)
    assert q.kernel == kernel
    x = torch.randn(5, 7, 256)
    ref = torch.nn.functional.linear(x, q.dequantized_weight(), linear.bias)
    y = q(x)
    assert y.shape == (5, 7, 96) and y.dtype == torch.float32
    if kernel == "unpack":
        assert torch.equal(y, ref)
    else:
        # Kernels take bfloat16 activations: agreement to bfloat16 precision.
        rel = ((y - ref).norm() / ref.norm()).item()
        assert rel < 1e-2


def test_kernel_choice_respects_kernel_constraints():
    assert choose_kernel(8, None, 384, 384) == "int8pack"
    assert choose_kernel(8, None, 40, 384) == "unpack"  # the int8 kernel needs in % 16 == 0
    assert choose_kernel(4, 64, 384, 1536) == "int4pack"
    assert choose_kernel(4, 64, 384, 40) == "unpack"  # the int4 kernel needs out % 16 == 0
    assert choose_kernel(4, 16, 384, 384) == "unpack"  # group sizes 32..256 only
    assert choose_kernel(4, None, 384, 384) == "unpack"  # per-channel 384 is no kernel group size
    assert choose_kernel(3, 64, 384, 384) == "unpack"


def test_quantized_embedding_gathers_dequantized_rows():
    torch.manual_seed(0)
    emb = nn.Embedding(100, 48)
    for bits in (8, 4, 3):
        q = quantize_module_rtn(emb, bits, None, symmetric=bits == 8)
        assert isinstance(q, QuantizedEmbedding)
        ids = torch.tensor([[0, 5, 99], [3, 3, 7]])
        assert torch.equal(q(ids), q.dequantized_weight()[ids])
        assert q.qweight.numel() == 100 * -(-48 * bits // 8)


def test_state_dict_holds_only_the_packed_form():
    q = quantize_module_rtn(nn.Linear(128, 64), 4, 64, False)
    keys = set(q.state_dict())
    assert keys == {"qweight", "scales", "zeros", "bias"}
    assert q.state_dict()["qweight"].dtype == torch.uint8
    assert q.state_dict()["qweight"].shape == (64, 64)
    assert q.state_dict()["scales"].dtype == torch.bfloat16


def test_reloading_buffers_rebuilds_the_runtime_form():
    torch.manual_seed(0)
    src = quantize_module_rtn(nn.Linear(128, 64), 4, 32, False)
    dst = QuantizedLinear(128, 64, 4, 32, False, bias=True)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(dst(x), src(x))


@pytest.mark.parametrize("symmetric", [True, False])
def test_w8a8_matches_int8_activation_reference_exactly(symmetric):
    """The int8-dynamic path equals an explicit per-token int8 quantization of the input times
    the int8 weight, accumulated exactly in integers, then rescaled."""
    from slimformer.methods.quantization.modules import quantize_activations_per_token

    torch.manual_seed(0)
    linear = nn.Linear(96, 48)  # odd widths: _int_mm has no width constraint on CPU
    q = quantize_module_rtn(linear, 8, None, symmetric, act_bits=8)
    assert q.kernel == "int8-dynamic"
    x = torch.randn(4, 9, 96)
    xq, sx, _ = quantize_activations_per_token(x.reshape(-1, 96))
    assert xq.dtype == torch.int8 and xq.abs().max() <= 127
    assert torch.all((xq.float() * sx - x.reshape(-1, 96)).abs() <= sx / 2 + 1e-6)  # within half a step
    acc = xq.to(torch.int64) @ (q.codes().to(torch.int64) - 128).t()
    ref = acc.double() * sx.double() * q.scales[:, 0].double() + linear.bias.double()
    if not symmetric:  # the zero point's offset (128 - zp) * s is applied to the float input's row sums
        offset = (128 - q.zero_points()[:, 0].double()) * q.scales[:, 0].double()
        ref = ref + x.reshape(-1, 96).double().sum(-1, keepdim=True) * offset
    ref = ref.float().reshape(4, 9, 48)
    y = q(x)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    # Quality against the float layer: SQNR of W8A8 well above 30 dB on Gaussian inputs.
    fp = linear(x)
    sqnr = 10 * torch.log10(fp.pow(2).mean() / (y - fp).pow(2).mean())
    assert sqnr > 30


def test_w8a8_is_chosen_only_when_asked_and_survives_reload():
    assert choose_kernel(8, None, 384, 384, act_bits=8) == "int8-dynamic"
    assert choose_kernel(8, 64, 384, 384, act_bits=8) == "unpack"
    src = quantize_module_rtn(nn.Linear(64, 32), 8, None, True, act_bits=8)
    dst = QuantizedLinear.from_description(src.describe())
    dst.load_state_dict(src.state_dict())
    assert dst.kernel == "int8-dynamic"
    x = torch.randn(5, 64)
    assert torch.equal(dst(x), src(x))


def test_unpack_path_keeps_only_packed_codes_in_memory():
    q = quantize_module_rtn(nn.Linear(256, 128), 3, 64, False)
    assert q.kernel == "unpack"
    assert q.runtime_nbytes() == 0  # no float copy of the weight is held between calls
    assert q.qweight.numel() == 128 * 96  # 3 bits x 256 columns = 96 bytes a row


def test_asymmetric_activation_grid_is_exact_and_finer_for_one_sided_inputs():
    from slimformer.methods.quantization.modules import quantize_activations_per_token

    torch.manual_seed(0)
    x = torch.nn.functional.gelu(torch.randn(64, 128) * 2)  # one-sided, like an MLP's hidden layer
    sym_codes, sym_scale, _ = quantize_activations_per_token(x, symmetric=True)
    codes, scale, offset = quantize_activations_per_token(x, symmetric=False)
    assert codes.dtype == torch.int8
    x_sym = sym_codes.float() * sym_scale
    x_asym = (codes.float() + offset) * scale
    assert torch.all((x_asym - x).abs() <= scale / 2 + 1e-6)
    assert (x_asym - x).pow(2).mean() < 0.5 * (x_sym - x).pow(2).mean()
    # The layer with asymmetric activations equals its integer reference.
    linear = nn.Linear(128, 40)
    q = quantize_module_rtn(linear, 8, None, True, act_bits=8)
    q.act_symmetric = False
    ref = x_asym.double() @ q.dequantized_weight().double().t() + linear.bias.double()
    assert torch.allclose(q(x).double(), ref, rtol=1e-4, atol=1e-4)


def test_int8_weight_only_agrees_for_few_and_many_tokens():
    """Few tokens go through _weight_int8pack_mm, many through the bf16-widened weight: both
    compute the stored weight's product to bfloat16 precision."""
    from slimformer.methods.quantization.modules import INT8_UNPACK_MIN_TOKENS

    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    q = quantize_module_rtn(linear, 8, None, False)
    assert q.kernel == "int8pack"
    for tokens in (3, INT8_UNPACK_MIN_TOKENS + 5):
        x = torch.randn(tokens, 128)
        ref = torch.nn.functional.linear(x, q.dequantized_weight(), linear.bias)
        assert ((q(x) - ref).norm() / ref.norm()).item() < 1e-2


def test_fused_w8a8_helpers_equal_their_eager_definitions():
    """The compiled (fused) quantize and rescale steps compute exactly what the eager code does."""
    from slimformer.methods.quantization.modules import (
        fused_quantize_activations,
        fused_rescale,
        quantize_activations_per_token,
        rescale_int8_product,
    )

    torch.manual_seed(0)
    x = torch.randn(70, 48).to(torch.bfloat16)
    for symmetric in (True, False):
        got, want = fused_quantize_activations(x, symmetric), quantize_activations_per_token(x, symmetric)
        assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1], rtol=1e-6)
    acc = torch.randint(-50000, 50000, (70, 24), dtype=torch.int32)
    args = (acc, torch.rand(24), torch.rand(70, 1), torch.rand(70, 1), torch.randn(24), torch.randn(70, 1), torch.randn(24), torch.randn(24), torch.bfloat16)
    assert torch.allclose(fused_rescale(*args).float(), rescale_int8_product(*args).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("w_symmetric,a_symmetric", [(True, True), (False, False)])
def test_w8a8_float_paths_compute_the_integer_product(w_symmetric, a_symmetric):
    """w8a8-fp32 and w8a8-bf16 multiply the same int8 codes as _int_mm on the float units: fp32
    equals the exact integer reference to float32 rounding, bf16 to its output's bf16 rounding;
    both hold only the int8 codes (1 byte per weight) and per-row vectors."""
    torch.manual_seed(1)
    linear = nn.Linear(96, 40)
    q = quantize_module_rtn(linear, 8, None, w_symmetric, act_bits=8)
    q.act_symmetric = a_symmetric
    x = torch.randn(2, 7, 96)
    from slimformer.methods.quantization.modules import quantize_activations_per_token

    xq, sx, offset = quantize_activations_per_token(x.reshape(-1, 96), a_symmetric)
    xd = (xq.double() + (0.0 if offset is None else offset.double())) * sx.double()
    w_codes = q.codes().double() - 128  # int8 codes; asymmetric weights add (128 - zp) * s on the float input's row sums
    ref = xd @ (w_codes * q.scales[:, :1].double()).t() + linear.bias.double()
    if not w_symmetric:
        ref = ref + x.reshape(-1, 96).double().sum(-1, keepdim=True) * ((128 - q.zero_points()[:, 0].double()) * q.scales[:, 0].double())
    ref = ref.reshape(2, 7, 40)
    q.use_kernels("w8a8-fp32")
    assert torch.allclose(q(x).double(), ref, rtol=1e-5, atol=1e-5)
    q.use_kernels("w8a8-bf16")
    assert q.runtime_nbytes() == 96 * 40 + 40 * (10 if w_symmetric else 14)  # codes; scales (bf16 + f32), row sums (+ offsets, f32)
    err = ((q(x).double() - ref).norm() / ref.norm()).item()
    assert err < 2 ** -8  # the bf16 GEMM output's rounding, no more


def test_fused_w8a8_float_product_equals_its_eager_definition():
    from slimformer.methods.quantization.modules import fused_w8a8_float_product, w8a8_float_product

    torch.manual_seed(0)
    x = torch.randn(33, 64).to(torch.bfloat16)
    w = torch.randint(-127, 128, (24, 64), dtype=torch.int8)
    ws = torch.rand(24) * 0.01
    rowsum = w.float().sum(1) * ws
    for symmetric, w_offset, gemm in ((True, None, torch.bfloat16), (False, torch.randn(24), torch.float32)):
        args = (x, w, gemm, ws, rowsum, w_offset, torch.randn(24), symmetric, torch.float32)
        assert torch.allclose(fused_w8a8_float_product(*args), w8a8_float_product(*args), rtol=1e-5, atol=1e-5)


def test_a_fused_function_compiles_every_variant_instead_of_falling_back_to_eager():
    """Dynamo's default of 8 graphs per function was reached by the planner timing three W8A8
    shapes in two dtypes; each later variant then ran eagerly (logged once, no error)."""
    import io
    import logging

    import torch._dynamo

    from slimformer.methods.quantization.modules import FUSED_GRAPHS, _Fused

    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"

    def shifted(x, how: str, dtype: torch.dtype):  # a string and a dtype: both guarded as constants
        return (x * 2 if how == "double" else x + 1 if how == "plus" else x - 1 if how == "minus" else -x).to(dtype)

    fused, log = _Fused(shifted), io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        with torch._dynamo.config.patch(**{name: 8}):  # Dynamo's default, whatever ran before
            x = torch.randn(5, 3)
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                for how in ("double", "plus", "minus", "negate"):  # 12 static variants
                    assert torch.equal(fused(x, how, dtype), shifted(x, how, dtype))
            assert getattr(torch._dynamo.config, name) >= FUSED_GRAPHS
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
    assert "recompile_limit" not in log.getvalue() and "cache_size_limit" not in log.getvalue()


@pytest.mark.parametrize("w_symmetric,a_symmetric", [(True, True), (False, False), (True, False)])
def test_onednn_int8_path_gives_the_int_mm_result_bit_for_bit(w_symmetric, a_symmetric):
    """int8-onednn (oneDNN's quantized linear on a weight prepacked once) computes the same
    integer product as int8-dynamic (torch._int_mm), so outputs are identical; a copy of the
    layer (the prepacked weight cannot be copied) lays it out again and agrees too."""
    import copy
    import platform

    from slimformer.kernels import onednn_int8

    if platform.machine().lower() in ("x86_64", "amd64"):
        assert onednn_int8.available(), "oneDNN's int8 linear should run on every x86-64 CPU torch supports"
    elif not onednn_int8.available():
        pytest.skip("oneDNN int8 linear not in this PyTorch build (non-x86 CPU)")
    torch.manual_seed(2)
    q = quantize_module_rtn(nn.Linear(96, 40), 8, None, w_symmetric, act_bits=8)
    q.act_symmetric = a_symmetric
    assert "int8-onednn" in q.available_kernels()
    q.use_kernels("int8-dynamic", "int8-onednn")
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, 11, 96) * 4).to(dtype)
        assert torch.equal(q.compute(x, "int8-onednn"), q.compute(x, "int8-dynamic"))
    # 1 byte per weight for the prepacked form, beside the int8 codes and the per-row vectors
    assert q.runtime_nbytes() == 2 * 96 * 40 + 40 * (10 if w_symmetric else 14)
    clone = copy.deepcopy(q)
    x = torch.randn(5, 96)
    assert torch.equal(clone.compute(x, "int8-onednn"), q.compute(x, "int8-onednn"))
    # alone, the path holds only its prepacked copy (1 byte per weight, as the planner counts it)
    ref = q.compute(x, "int8-dynamic")
    q.use_kernels("int8-onednn")
    assert q.runtime_nbytes() == 96 * 40 + 40 * (10 if w_symmetric else 14)
    assert torch.equal(q(x), ref)


def test_onednn_int8_path_compiles_as_one_operator():
    """Under torch.compile (dynamic shapes, weights not frozen) the oneDNN product is one opaque
    operator: the compiled layer equals the eager one for two row counts."""
    from slimformer.kernels import onednn_int8

    if not onednn_int8.available():
        pytest.skip("oneDNN int8 linear not in this PyTorch build")
    torch.manual_seed(3)
    q = quantize_module_rtn(nn.Linear(64, 48), 8, None, True, act_bits=8)
    q.use_kernels("int8-onednn")
    compiled = torch.compile(q, dynamic=True)
    with torch.no_grad():
        for rows in (7, 30):
            x = torch.randn(rows, 64)
            assert torch.equal(compiled(x), q(x))
