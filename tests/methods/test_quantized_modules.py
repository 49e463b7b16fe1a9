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
        (8, 64, True, "dequant"),
        (3, 64, False, "dequant"),
        (2, 32, True, "dequant"),
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
    if kernel == "dequant":
        assert torch.equal(y, ref)
    else:
        # Kernels take bfloat16 activations: agreement to bfloat16 precision.
        rel = ((y - ref).norm() / ref.norm()).item()
        assert rel < 1e-2


def test_kernel_choice_respects_kernel_constraints():
    assert choose_kernel(8, None, 384, 384) == "int8pack"
    assert choose_kernel(8, None, 40, 384) == "dequant"  # the int8 kernel needs in % 16 == 0
    assert choose_kernel(4, 64, 384, 1536) == "int4pack"
    assert choose_kernel(4, 64, 384, 40) == "dequant"  # the int4 kernel needs out % 16 == 0
    assert choose_kernel(4, 16, 384, 384) == "dequant"  # group sizes 32..256 only
    assert choose_kernel(4, None, 384, 384) == "dequant"  # per-channel 384 is no kernel group size
    assert choose_kernel(3, 64, 384, 384) == "dequant"


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
