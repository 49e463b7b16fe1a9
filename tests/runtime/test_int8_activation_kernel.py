"""slimformer's int8-activation kernel (``torch.ops.slimformer.packed_linear_q8a``, the
``packed-q8a`` path): the activations rounded to int8 per block of 32 columns, then exactly the
product of the dequantized weight and those rounded activations (float32 rounding only); a row's
output does not depend on the rows beside it (what lossless speculation needs); the error against
the float product stays within the planner's bound; ``int8_activations: keep`` keeps it out."""

from pathlib import Path

import pytest
import torch

from conftest import random_gguf_linear, random_packed_linear
from slimformer import kernels
from slimformer.methods.quantization import grid
from slimformer.runtime import execution as ex
from slimformer.runtime.planner import INT8_ACT_BOUND


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())




def _rounded(x: torch.Tensor) -> torch.Tensor:
    """x (rows, in) rounded to int8 per block of 32 columns (symmetric, scale max|x| / 127), float64."""
    blocks = x.double().reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    codes = torch.round(blocks * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))).clamp(-127, 127)
    return (codes * (amax / 127.0)).reshape(x.shape)


def test_the_int8_activation_kernel_is_there_wherever_the_kernels_build_and_uses_vnni_where_the_cpu_has_it():
    """Every CPU that builds the kernels (x86-64 with AVX2, asserted in test_packed_kernel) offers the
    path; the AVX-512 VNNI form is used exactly where the CPU reports it (no silent fallback)."""
    assert kernels.int8_activations_available() == kernels.packed_linear_available()
    assert ("packed-q8a" in random_packed_linear(8, None, True).available_kernels()) == kernels.packed_linear_available()
    assert kernels.has_vnni() == ({"avx512_vnni", "avx512bw", "avx512vl"} <= _cpu_flags() and kernels.packed_linear_available())


needs_vnni = pytest.mark.skipif(not kernels.int8_activations_available(), reason="no AVX2 CPU (asserted by test_packed_kernel)")
FORMS = [False, True]  # the CPU's form (VNNI where it has it), the AVX2 form forced


def _q8a(layer, x, portable):
    group = grid.effective_group_size(layer.in_features, layer.group_size)
    return kernels.packed_linear_q8a(x, layer.qweight, layer.scales, layer.zeros, layer.bits, group, layer.bias, portable=portable)


@needs_vnni
@pytest.mark.parametrize("bits,group_size,symmetric,inp", [
    (4, 32, False, 192), (4, 32, True, 224), (4, 64, False, 192), (4, 128, False, 256), (4, None, True, 256),
    (8, None, True, 192), (8, 32, False, 224), (8, 64, True, 192), (8, 128, False, 256)])
@pytest.mark.parametrize("rows", [1, 3, 5, 9])
@pytest.mark.parametrize("portable", FORMS)
def test_the_product_is_the_dequantized_weight_times_the_int8_rounded_activations(bits, group_size, symmetric, inp, rows, portable):
    """Widths that end in a partial 64-byte step (224 columns at 4 and 8 bits, 192 at 4 bits) and
    every group shape the kernel takes, in both forms; x has an outlier column, as LLM activations do."""
    layer = random_packed_linear(bits, group_size, symmetric, inp=inp)
    layer.use_kernels("packed-q8a")
    x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(1))
    x[:, 5] *= 30
    w = layer.dequantized_weight().double()
    y = _q8a(layer, x, portable)
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    if not portable:  # the layer's own path is the CPU's form
        assert torch.equal(layer(x), y)
    exact_rounded = _rounded(x) @ w.t() + layer.bias.double()
    assert float((y.double() - exact_rounded).norm() / exact_rounded.norm()) < 2e-6
    # Against the float product: the activations' int8 rounding, within the planner's bound.
    exact = x.double() @ w.t() + layer.bias.double()
    assert 1e-4 < float((y.double() - exact).norm() / exact.norm()) < INT8_ACT_BOUND


@needs_vnni
@pytest.mark.parametrize("bits,group_size,inp", [(4, 32, 192), (4, 128, 256), (8, None, 192), (8, 32, 224)])
@pytest.mark.parametrize("portable", FORMS)
def test_a_row_gives_the_same_bits_alone_and_beside_other_rows(bits, group_size, inp, portable):
    """Speculative verification runs several rows through the decode path; its greedy output equals
    plain decoding only if each row's numbers are those of the one-row call."""
    layer = random_packed_linear(bits, group_size, False, inp=inp)
    x = torch.randn(7, inp, generator=torch.Generator().manual_seed(3))
    together = _q8a(layer, x, portable)
    alone = torch.cat([_q8a(layer, x[i:i + 1], portable) for i in range(7)])
    assert torch.equal(together, alone)


@needs_vnni
@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_take_int8_activations_as_ggml_does(gguf_type):
    g = torch.Generator().manual_seed(2)
    out, inp = 64, 160
    layer = random_gguf_linear(gguf_type, out, inp, g)
    x = torch.randn(3, inp, generator=g)
    ref = _rounded(x) @ layer.dequantized_weight().double().t() + layer.bias.double()
    y = layer.packed_forward(x, int8_activations=True)
    assert float((y.double() - ref).norm() / ref.norm()) < 2e-6
    portable = kernels.packed_linear_q8a(x, layer.qweight, layer.scales, None, layer.bits, 32, layer.bias, mins=layer.mins, portable=True)
    assert float((portable.double() - ref).norm() / ref.norm()) < 2e-6
    assert "packed-q8a" in ex.candidate_paths(layer, torch.float32)
    assert "packed-q8a" not in ex.candidate_paths(layer, torch.float32, int8_activations="keep")
    # the AVX2 form is a path of its own here (which form is faster is timed, not assumed)
    assert torch.equal(layer.packed_forward(x, int8_activations=True, portable=True), portable)
    assert "packed-q8a-avx2" in ex.candidate_paths(layer, torch.float32)
    assert "packed-q8a-avx2" not in ex.candidate_paths(layer, torch.float32, int8_activations="keep")
    planned = ex.install_planned_forward(layer, "packed-q8a-avx2", "packed-fp32", split_rows=8)
    assert torch.equal(layer(x), portable) and planned.decode == "packed-q8a-avx2"
    ex.remove_planned_forward(layer)


@needs_vnni
def test_keep_leaves_weight_only_layers_on_float_activations():
    layer = random_packed_linear(4, 32, False)
    assert "packed-q8a" in ex.candidate_paths(layer, torch.float32)
    kept = ex.candidate_paths(layer, torch.float32, int8_activations="keep")
    assert "packed-q8a" not in kept and "packed-q8a-avx2" not in kept and "packed-fp32" in kept
    # both forms of the int8-activation kernel are offered where the CPU has VNNI, each exactly its form
    assert "packed-q8a-avx2" in ex.candidate_paths(layer, torch.float32)
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(3))
    layer.use_kernels("packed-fp32", "packed-q8a", "packed-q8a-avx2")
    assert torch.equal(layer.compute(x, "packed-q8a-avx2"), _q8a(layer, x, portable=True))
    assert torch.equal(layer.compute(x, "packed-q8a"), _q8a(layer, x, portable=False))
    # A W8A8 layer's alternatives to its per-token int8 rounding are float activations, not a second rounding.
    w8a8 = random_packed_linear(8, None, True)
    w8a8 = type(w8a8).from_codes(w8a8.codes(), w8a8.scales.float(), w8a8.zero_points(), 8, None, True, w8a8.bias, act_bits=8)
    assert ex.is_w8a8(w8a8) and "packed-fp32" in ex.candidate_paths(w8a8, torch.float32)
    assert "packed-q8a" not in ex.candidate_paths(w8a8, torch.float32)


def test_layouts_the_int8_activation_kernel_cannot_take_are_not_offered():
    assert not kernels.supports_int8_activations(8, 96, 192)  # a group neither within nor a multiple of a 64-column step
    assert not kernels.supports_int8_activations(4, 192, 384)  # a multiple of 64 but not of the 128-column 4-bit step
    assert kernels.supports_int8_activations(4, 64, 192) and kernels.supports_int8_activations(8, 192, 384)
    if kernels.int8_activations_available():
        assert "packed-q8a" not in random_packed_linear(8, 96, False).available_kernels()
        layer = random_packed_linear(8, 96, False)
        with pytest.raises(RuntimeError, match="group size must be 32, 64 or a multiple of 64"):
            kernels.packed_linear_q8a(torch.randn(1, 192), layer.qweight, layer.scales, layer.zeros, 8, 96, None)
