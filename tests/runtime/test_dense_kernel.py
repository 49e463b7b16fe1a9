"""slimformer's few-row dense kernel (``torch.ops.slimformer.dense_linear``, the ``dense-kernel``
path of plain linears): float32 products of float32 or bfloat16 weights within float32 rounding of
the float64 reference, a row's output independent of the rows beside it (lossless speculation),
bad layouts refused with a message; the planner offers it only for few rows, never as a batch path;
``TextGenerator`` plans an original model's view and leaves the model itself untouched, and its
greedy tokens stay those of Hugging Face ``generate``."""

import pytest
import torch
from torch import nn

from slimformer.kernels import dense_linear as dk
from slimformer.models.tiny import tiny_model
from slimformer.runtime import GenerationConfig, TextGenerator
from slimformer.runtime import execution as ex
from slimformer.runtime.planner import PlanSettings, measure_format

needs_kernel = pytest.mark.skipif(not dk.available(), reason="no AVX2 CPU (asserted by test_packed_kernel)")


def test_the_dense_kernel_builds_wherever_the_packed_kernels_do():
    from slimformer import kernels

    assert dk.available() == kernels.packed_linear_available(), dk.unavailable_reason()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,inp,out", [(1, 576, 96), (3, 577, 13), (7, 40, 5), (2, 7, 3), (16, 256, 64)])
def test_products_are_within_float32_rounding_of_the_float64_reference(dtype, rows, inp, out):
    g = torch.Generator().manual_seed(rows * inp + out)
    x = torch.randn(rows, inp, generator=g)
    w = torch.randn(out, inp, generator=g).to(dtype)
    b = torch.randn(out, generator=g)
    y = dk.dense_linear(x, w, b)
    ref = x.double() @ w.double().t() + b.double()
    assert y.dtype == torch.float32 and y.shape == (rows, out)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-6
    # a row's output does not depend on the rows passed with it: bit for bit
    alone = torch.cat([dk.dense_linear(x[i:i + 1], w, b) for i in range(rows)])
    assert torch.equal(alone, y)


@needs_kernel
def test_bf16_activations_come_back_in_bf16_and_leading_dims_are_kept():
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    w = torch.randn(32, 64).to(torch.bfloat16)
    y = dk.dense_linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 32)
    ref = x.float() @ w.float().t()
    assert torch.allclose(y.float(), ref, rtol=1e-2, atol=1e-2)


@needs_kernel
def test_bad_layouts_are_refused_with_a_message():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="x has 8 columns but weight has 9"):
        torch.ops.slimformer.dense_linear(x, torch.randn(4, 9), None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.slimformer.dense_linear(x, torch.randn(4, 8).half(), None)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.slimformer.dense_linear(x, torch.randn(4, 8), torch.randn(3))


@needs_kernel
def test_the_planner_offers_it_for_few_rows_only():
    layer = nn.Linear(64, 48)
    assert "dense-kernel" in ex.candidate_paths(layer, torch.float32)
    measured = measure_format(layer, torch.float32, PlanSettings(repeats=1, batch_tokens=64, cache=False))["paths"]
    assert measured["dense-kernel"]["ok"] and measured["dense-kernel"]["rel_error"] < 1e-6
    assert measured["dense-kernel"]["batch_s"] is None  # never timed (null in the plan's JSON), never chosen for batches
    assert measured["native"]["batch_s"] < float("inf")
    # installed as the decode path, inputs above its row limit take the batch path
    planned = ex.install_planned_forward(layer, "dense-kernel", "native", split_rows=32)
    calls = []
    original_run = planned.run
    planned.run = lambda path, x: calls.append(path) or original_run(path, x)
    for rows in (1, ex.PATHS["dense-kernel"].max_rows, ex.PATHS["dense-kernel"].max_rows + 1, 40):
        layer(torch.randn(rows, 64))
    assert calls == ["dense-kernel", "dense-kernel", "native", "native"]
    # a split moved after installation (the benchmark sends every call down the decode path so):
    # the cap still holds for the few-row path, and a path without one takes every row count
    planned.split_rows = 1 << 30
    layer(torch.randn(40, 64))
    assert calls[-1] == "native"
    other = ex.install_planned_forward(nn.Linear(64, 48), "dequant-fp32", "native", split_rows=32)
    other.split_rows = 1 << 30
    seen = []
    original_other = other.run
    other.run = lambda path, x: seen.append(path) or original_other(path, x)
    other.module(torch.randn(40, 64))
    assert seen == ["dequant-fp32"]


@needs_kernel
def test_the_generator_plans_an_original_on_its_view_and_greedy_tokens_stay_hf_generate(monkeypatch):
    monkeypatch.setenv("SLIMFORMER_PLANNER", "1")
    loaded = tiny_model("llama", seed=0)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    gen = TextGenerator(loaded, compile=False, execution={"repeats": 1, "cache": False})
    assert gen.execution is not None and gen.model is not loaded.model
    paths = {v["decode"] for v in gen.execution.layers.values()}
    assert paths <= {"native", "dense-kernel"}
    planned = [m for m in gen.model.modules() if ex.planned_forward_of(m) is not None]
    assert len(planned) == len(gen.execution.layers) - sum(v["decode"] == v["batch"] == "native" for v in gen.execution.layers.values())
    assert not any(ex.planned_forward_of(m) is not None for m in loaded.model.modules())  # the original is untouched
    # force the kernel on every layer: tokens are still Hugging Face's greedy ones
    for m in gen.model.modules():
        if isinstance(m, nn.Linear):
            ex.install_planned_forward(m, "dense-kernel", "native", split_rows=32)
    ids, mask = gen.encode(["def foo(x): return"])
    ours = gen.generate_ids(ids, mask, GenerationConfig(max_new_tokens=12, stop_at_eos=False)).tokens
    with torch.no_grad():
        hf = loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert ours == hf[:, ids.shape[1]:].tolist()
    assert TextGenerator(loaded, compile=False, execution="off").execution is None
