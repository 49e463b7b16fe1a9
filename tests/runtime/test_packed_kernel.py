"""slimformer's packed-code kernel (``torch.ops.slimformer.packed_linear``): the stored 4/8-bit
codes, bf16 scales and zero points give the dequantize reference's product within float32
rounding for every row count, layout and bias; layouts it cannot take are refused by name; the
compiled graph calls it and agrees with eager."""

import platform

import pytest
import torch

from conftest import random_gguf_linear, random_packed_linear
from slimformer import kernels




def test_the_kernel_builds_on_an_x86_cpu_with_avx2():
    """Where the CPU can run it, the build must succeed (no silent fallback on CI machines)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        assert not kernels.packed_linear_available() and kernels.unavailable_reason()
        return
    assert kernels.packed_linear_available(), kernels.unavailable_reason()


needs_kernel = pytest.mark.skipif(not kernels.packed_linear_available(), reason="no AVX2 CPU (asserted by the test above)")


@needs_kernel
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (4, 64, True), (8, None, True), (8, 32, False), (4, None, False)])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9])
def test_packed_kernel_equals_the_dequantized_product(bits, group_size, symmetric, rows):
    layer = random_packed_linear(bits, group_size, symmetric)
    assert "packed-fp32" in layer.available_kernels()
    layer.use_kernels("packed-fp32")
    x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(1))
    ref = x.double() @ layer.dequantized_weight().double().t() + layer.bias.double()
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    assert float((y.double() - ref).norm() / ref.norm()) < 2e-6
    # Leading dimensions and bf16 activations pass through like any linear.
    y3 = layer(x.reshape(1, rows, 192).bfloat16())
    assert y3.dtype == torch.bfloat16 and y3.shape == (1, rows, 96)


@needs_kernel
def test_without_bias_and_symmetric_zero_point_default():
    layer = random_packed_linear(4, 32, True, bias=False)
    layer.use_kernels("packed-fp32")
    x = torch.randn(2, 192)
    ref = x.double() @ layer.dequantized_weight().double().t()
    assert float((layer(x).double() - ref).norm() / ref.norm()) < 2e-6


def test_layouts_the_kernel_cannot_take_are_not_offered():
    assert not kernels.supports(3, 32, 192)  # 3-bit codes straddle bytes
    assert not kernels.supports(4, 16, 192)  # groups narrower than one 32-column step
    assert not kernels.supports(4, 64, 160)  # group size does not divide the width
    assert "packed-fp32" not in random_packed_linear(3, 32, False).available_kernels()
    assert "packed-fp32" not in random_packed_linear(4, 16, False).available_kernels()


@needs_kernel
def test_the_operator_refuses_a_bad_layout_with_a_message():
    layer = random_packed_linear(4, 32, False)
    with pytest.raises(RuntimeError, match="group size must be a multiple of 32"):
        kernels.packed_linear(torch.randn(1, 192), layer.qweight, layer.scales, layer.zeros, 4, 16, None)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.packed_linear(torch.randn(1, 192).double(), layer.qweight, layer.scales, layer.zeros, 4, 32, None)


@needs_kernel
@pytest.mark.parametrize("path,bits,group_size,symmetric", [("packed-fp32", 8, None, True), ("packed-q8a", 4, 32, False)])
def test_compiled_graph_calls_the_kernel_and_agrees_with_eager(path, bits, group_size, symmetric):
    layer = random_packed_linear(bits, group_size, symmetric)
    layer.use_kernels(path)

    def f(x):
        return torch.nn.functional.silu(layer(x)) * 2

    x = torch.randn(1, 192)
    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(x), f(x))


@needs_kernel
@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("rows", [1, 5])
def test_gguf_blocks_run_in_place_with_the_dequantized_numerics(gguf_type, rows):
    """GGUF's own blocks (fp16 scales; Q4_1's fp16 minima; Q4_0/Q8_0's fixed offsets) through the
    kernel equal ggml's dequantization times x within float32 rounding, and the planner offers it."""
    from slimformer.runtime import execution as ex

    g = torch.Generator().manual_seed(2)
    out, inp = 64, 128
    layer = random_gguf_linear(gguf_type, out, inp, g)
    x = torch.randn(rows, inp, generator=g)
    ref = x.double() @ layer.dequantized_weight().double().t() + layer.bias.double()
    y = layer.packed_forward(x)
    assert float((y.double() - ref).norm() / ref.norm()) < 2e-6
    assert "packed-fp32" in ex.candidate_paths(layer, torch.float32)


@needs_kernel
@pytest.mark.parametrize("layout", ["w4 g32", "w4 g64 sym", "w8 per-channel", "w8 g32", "w4 per-channel", "Q4_1", "Q8_0"])
def test_a_rows_output_does_not_depend_on_the_rows_beside_it(layout):
    """Lossless speculation: a verify step's rows must equal one-token steps bit for bit, so the
    float32 kernel computes each row by the same operations whatever the number of rows."""
    g = torch.Generator().manual_seed(4)
    if layout.startswith("Q"):
        layer = random_gguf_linear(layout, 40, 128, g)
        run = layer.packed_forward
    else:
        bits, rest = int(layout[1]), layout.split()[1:]
        group = None if rest[0] == "per-channel" else int(rest[0][1:])
        layer = random_packed_linear(bits, group, "sym" in rest, out=40)
        layer.use_kernels("packed-fp32")
        run = layer
    x = torch.randn(9, layer.in_features, generator=g)
    together = run(x)
    for rows in (1, 2, 3, 7):
        assert torch.equal(run(x[:rows]), together[:rows])
    assert torch.equal(torch.cat([run(x[i:i + 1]) for i in range(9)]), together)


def test_a_build_is_keyed_by_the_headers_its_source_includes(tmp_path):
    """The int8-activation kernels share q8_rounding.h: editing it must rebuild them (a new key),
    while a header the source does not include changes nothing."""
    source, header, other = tmp_path / "k.cpp", tmp_path / "shared.h", tmp_path / "unused.h"
    source.write_text('#include <vector>\n#include "shared.h"\nint f() { return g(); }\n')
    header.write_text("inline int g() { return 1; }\n")
    other.write_text("// nothing\n")
    before = kernels.library_key(source)
    other.write_text("// changed\n")
    assert kernels.library_key(source) == before
    header.write_text("inline int g() { return 2; }\n")
    assert kernels.library_key(source) != before
    shipped = kernels.SOURCE.with_name("q8_rounding.h")
    assert shipped.exists() and '#include "q8_rounding.h"' in kernels.SOURCE.read_text()
