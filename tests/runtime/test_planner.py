"""The execution planner: its choice never changes outputs beyond the path's documented rounding,
other machines' cached measurements are ignored, the memory policy holds (measured bytes), and
a planned model saves exactly what was stored."""

import json

import pytest
import torch
from conftest import model_output, sample_batch
from torch import nn

import slimformer
from slimformer.compress import compress
from slimformer.evaluate.cost import resident_bytes
from slimformer.io import save_compressed
from slimformer.methods import RTNConfig
from slimformer.methods.quantization import QuantizedLinear
from slimformer.methods.quantization.rtn import quantize_module_rtn
from slimformer.recipe import Recipe
from slimformer.runtime import execution as ex
from slimformer.runtime.machine import signature
from slimformer.runtime.planner import (
    BF16_BOUND,
    EXACT_BOUND,
    MEMORY_LIMITS,
    PlanCache,
    PlanSettings,
    held_bytes_per_weight,
    measure_format,
    plan_execution,
    plan_table,
    reference_output,
    remove_plan,
)

QUICK = {"batch_tokens": 64, "decode_tokens": 1, "repeats": 1}


def _settings(tmp_path, **kw):
    return PlanSettings(cache_dir=str(tmp_path / "plans"), **{**QUICK, **kw})


def _quantized(tiny_factory, bits=4, family="bert"):
    model = tiny_factory(family)
    compress(model, Recipe(steps=[RTNConfig(bits=bits, group_size=32 if bits == 4 else None, symmetric=bits == 8)]))
    return model


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("bits,act_bits,int8_activations", [(4, None, "auto"), (8, None, "auto"), (8, 8, "auto"), (8, 8, "keep"), (3, None, "auto")])
def test_every_candidate_path_matches_the_dequantize_reference(tmp_path, bits, act_bits, int8_activations):
    torch.manual_seed(0)
    q = quantize_module_rtn(nn.Linear(128, 96), bits, 32 if bits != 8 else None, bits == 8, act_bits=act_bits)
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float32, torch.bfloat16):
        measured = measure_format(q, dtype, _settings(tmp_path, int8_activations=int8_activations))["paths"]
        if dtype == torch.float32:
            measured_f32 = measured
        assert measured, "no candidate path"
        expected = set(ex.candidate_paths(q, dtype, int8_activations))
        assert set(measured) == expected
        for path, r in measured.items():
            assert r["ok"], (path, r)
            exact = ex.PATHS[path].rounding == "exact" and dtype == torch.float32
            assert r["rel_error"] <= (EXACT_BOUND if exact else BF16_BOUND)
            assert r["decode_s"] > 0
            # a few-row path is not timed at a batch's rows: null there (strict JSON), never chosen
            assert r["batch_s"] > 0 if r["batch_s"] is not None else 0 < (ex.PATHS[path].max_rows or 0) < _settings(tmp_path).batch_tokens
    if act_bits == 8:
        assert "w8a8-fp32" in measured and "int8-dynamic" in measured
        skipping = {p for p in measured if ex.skips_int8_activations(q, p)}
        if int8_activations == "keep":  # only paths that quantize the activations, as an int8 deployment does
            assert not skipping
        else:  # the same int8 weights on float activations: int8pack, widening, cached copies
            assert {"int8pack", "int8-widen-fp32", "dequant-bf16"} <= skipping
            # their parity was judged against the product without the activation rounding,
            # which differs from the W8A8 product by more than the exact bound
            gap = _rel(reference_output(q, x, int8_activations=False), reference_output(q, x))
            assert gap > 10 * EXACT_BOUND
            assert measured_f32["int8-widen-fp32"]["rel_error"] <= EXACT_BOUND
    # The layer is left as it was found: its capability-chosen kernel, no planned forward.
    assert ex.planned_forward_of(q) is None


def test_planned_model_agrees_with_reference_within_each_chosen_path(tiny_factory, tmp_path):
    model = _quantized(tiny_factory, bits=4)
    batch = sample_batch(model)
    before = model_output(model, batch)
    plan = plan_execution(model, _settings(tmp_path, activations="float32"))
    assert plan.activations == "float32" and plan.layers
    for name, layer in plan.layers.items():
        module = model.model.get_submodule(name)
        x = torch.randn(40, module.in_features)
        for regime, rows in (("decode", 3), ("batch", 40)):
            path = layer[regime]
            y = module(x[:rows])
            bound = EXACT_BOUND if ex.PATHS[path].rounding == "exact" else BF16_BOUND
            assert _rel(y, reference_output(module, x[:rows])) <= bound, (name, path)
    after = model_output(model, batch)
    # bf16-rounding paths move outputs by bf16 rounding at most, never more.
    assert _rel(after, before) < 0.05
    remove_plan(model)
    assert torch.equal(model_output(model, batch), before)
    assert all(ex.planned_forward_of(m) is None for m in model.model.modules())


def test_second_plan_is_read_from_the_cache_and_other_machines_are_ignored(tiny_factory, tmp_path):
    settings = _settings(tmp_path)
    model = _quantized(tiny_factory)
    first = plan_execution(model, settings)
    assert first.measured_formats > 0 and first.cached_formats == 0
    again = plan_execution(_quantized(tiny_factory), settings)
    assert again.measured_formats == 0 and again.cached_formats == first.measured_formats
    assert {n: (l["decode"], l["batch"]) for n, l in again.layers.items()} == {n: (l["decode"], l["batch"]) for n, l in first.layers.items()}
    # The same file, recorded on another machine: ignored, everything is timed again.
    path = PlanCache(tmp_path / "plans", signature()).path
    # strict JSON: a path not timed in a regime is null, never Infinity (which JSON has not)
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the plan cache"))
    json.dumps(first.summary(), allow_nan=False)
    data["signature"] = {**data["signature"], "cpu": "Some Other CPU", "flags": ["amx_tile", "avx512_bf16"]}
    for entry in data["entries"].values():  # and with absurd timings that would change the choice
        for r in entry["paths"].values():
            if "batch_s" in r:
                r["batch_s"] = r["decode_s"] = 1.0
    path.write_text(json.dumps(data))
    assert PlanCache(tmp_path / "plans", signature()).ignored
    third = plan_execution(_quantized(tiny_factory), settings)
    assert third.cache_ignored and third.measured_formats == first.measured_formats and third.cached_formats == 0
    assert json.loads(path.read_text())["signature"] == signature()  # replaced by this machine's


@pytest.mark.parametrize("memory", ["packed", "balanced", "fast"])
def test_memory_policy_is_honoured_in_measured_bytes(tiny_factory, tmp_path, memory):
    model = _quantized(tiny_factory, bits=4)
    base = resident_bytes(model.model)
    plan = plan_execution(model, _settings(tmp_path, memory=memory, activations="float32"))
    extra = 0
    for name, layer in plan.layers.items():
        module = model.model.get_submodule(name)
        if not isinstance(module, QuantizedLinear):
            continue
        stored = module.stored_bits() / 8 / (module.in_features * module.out_features)
        held = held_bytes_per_weight(module)
        assert held == pytest.approx(layer["held_bytes_per_weight"], abs=1e-3)
        assert held - stored <= MEMORY_LIMITS[memory] + 0.1, (name, layer)  # + scales/offsets of a kernel form
        if memory != "fast":
            assert "dequant-fp32" not in (layer["decode"], layer["batch"])
        extra += (held - stored) * module.in_features * module.out_features
    assert resident_bytes(model.model) - base <= extra + 1024  # the report counts every byte held


def test_bf16_activations_are_undone_for_saving_and_the_folder_loads_planned(tiny_factory, tmp_path, monkeypatch):
    model = _quantized(tiny_factory, bits=4)
    batch = sample_batch(model)
    stored_out = model_output(model, batch)
    plan = plan_execution(model, _settings(tmp_path, activations="bfloat16"))
    assert plan.activations == "bfloat16"
    assert all(m.weight.dtype == torch.bfloat16 for m in model.model.modules() if isinstance(m, nn.LayerNorm))
    planned_out = model_output(model, batch)
    assert _rel(planned_out, stored_out) < 0.05
    folder = save_compressed(model, tmp_path / "m")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["dtype"] == "float32"  # the recipe's dtype, not the planner's
    assert manifest["execution"]["activations"] == "bfloat16" and manifest["execution"]["layers"]
    assert torch.equal(model_output(model, batch), planned_out)  # planned again after saving
    monkeypatch.setenv("SLIMFORMER_PLANNER", "0")  # the off switch: capability-chosen kernels
    plain = slimformer.load(folder)
    assert plain.execution is None and torch.equal(model_output(plain, batch), stored_out)
    monkeypatch.setenv("SLIMFORMER_PLANNER", "1")
    again = slimformer.load(folder, execution={**QUICK, "activations": "bfloat16", "cache_dir": str(tmp_path / "plans")})
    assert again.execution is not None and again.execution.measured_formats == 0  # cached
    assert torch.equal(model_output(again, batch), planned_out)


def test_plain_bf16_linears_run_widened_under_float32_activations(tiny_factory, tmp_path):
    from slimformer.methods.quantization.cast import cast_model

    model = tiny_factory("llama")
    cast_model(model.model, torch.bfloat16)
    batch = sample_batch(model)
    ref = model_output(model, batch)
    plan = plan_execution(model, _settings(tmp_path, activations="float32", memory="balanced"))
    assert plan.activations == "float32"
    lin = [m for m in model.model.modules() if isinstance(m, nn.Linear)]
    assert all(m.weight.dtype == torch.bfloat16 for m in lin)  # 2 bytes a weight kept under balanced
    out = model_output(model, batch)
    assert out.dtype == torch.float32 and _rel(out, ref) < 0.05
    remove_plan(model)
    assert all(p.dtype == torch.bfloat16 for p in model.model.parameters())


# ----- no work on padding ------------------------------------------------------------------------

def test_length_buckets_cover_every_row_once_and_cut_padding():
    from slimformer.models.batching import length_buckets

    lengths = [128, 9, 12, 120, 30, 7, 125, 31]
    buckets = length_buckets(lengths, call_cost=16)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in buckets)
    assert padded < 0.6 * len(lengths) * max(lengths)
    assert length_buckets([50] * 6, call_cost=16) == [list(range(6))]  # equal lengths: one pass


def test_bucketed_embeddings_equal_the_padded_computation(tiny_factory):
    from slimformer.evaluate.quality import encode

    model = tiny_factory("bert")
    texts = ["short", "a much longer text " * 8, "mid length text here", "x " * 40, "tiny", "another sentence of words"]
    batch = dict(model.tokenizer(texts, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    bucketed = model.embed(batch)
    model.bucketing = False
    padded = model.embed(batch)
    assert torch.allclose(bucketed, padded, rtol=1e-5, atol=1e-5)
    e_padded = encode(model, texts, batch_size=4)
    model.bucketing = True
    e_sorted = encode(model, texts, batch_size=4)
    assert torch.allclose(e_sorted, e_padded, rtol=1e-5, atol=1e-5)


def test_dynamic_runner_buckets_with_the_same_outputs_and_fewer_flops(tiny_factory):
    from slimformer.methods.dynamic.runtime import DynamicEncoder

    model = tiny_factory("bert")
    texts = ["short", "a much longer text " * 8, "mid length text here", "tiny"]
    batch = dict(model.tokenizer(texts, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    emb, stats = DynamicEncoder(model).embed(batch, return_stats=True)
    model.bucketing = False
    emb_p, stats_p = DynamicEncoder(model).embed(batch, return_stats=True)
    assert torch.allclose(emb, emb_p, rtol=1e-5, atol=1e-5)
    assert torch.equal(stats.layers_run, stats_p.layers_run)
    assert stats.rows_per_layer == stats_p.rows_per_layer
    assert stats.tokens_per_layer == pytest.approx(stats_p.tokens_per_layer)
    assert stats.flops < 0.8 * stats_p.flops


# ----- whole-model compilation -------------------------------------------------------------------

def test_compiled_forward_agrees_with_eager_and_falls_back(tiny_factory):
    """Installation, agreement check and eager fallback, with dynamo's ``eager`` backend (graph
    capture only: Inductor's C++ code generation takes minutes on this shared machine; run by
    hand on a tiny BERT it agreed with eager to 7e-7)."""
    from slimformer.runtime.compile import _CompiledForward, compile_model, uncompile_model

    model = tiny_factory("bert")
    batch = sample_batch(model)
    eager = model_output(model, batch)
    report = compile_model(model, batch, repeats=1, keep_if_slower=True, backend="eager", dynamic=False)
    assert report.compiled and report.compile_seconds > 0 and report.max_abs_diff <= 1e-5
    assert isinstance(model.model.forward, _CompiledForward)
    assert torch.allclose(model_output(model, batch), eager, atol=1e-5, rtol=1e-5)

    def boom(*args, **kwargs):  # a compiler failure at a later call: eager takes over
        raise RuntimeError("no C++ compiler")

    model.model.forward.compiled = boom
    with pytest.warns(UserWarning, match="running eagerly"):
        again = model_output(model, batch)
    assert torch.equal(again, eager) and model.model.forward.failed
    uncompile_model(model)
    assert "forward" not in model.model.__dict__


def test_compile_is_kept_only_when_the_median_interleaved_ratio_is_above_one(tiny_factory, monkeypatch):
    """The keep decision is the median of per-round eager/compiled ratios of interleaved
    rounds (a load change between two blocks of timings cannot decide it)."""
    import slimformer.runtime.compile as comp

    calls = []

    def eager_then_compiled(first, second, repeats):
        calls.append(repeats)
        return 1.0, 1.0, ratio

    monkeypatch.setattr(comp, "interleaved_times", eager_then_compiled)
    model = tiny_factory("bert")
    batch = sample_batch(model)
    ratio = 0.97
    report = comp.compile_model(model, batch, backend="eager", dynamic=False)
    assert not report.compiled and "0.97x" in report.reason and "forward" not in model.model.__dict__
    ratio = 1.05
    report = comp.compile_model(model, batch, backend="eager", dynamic=False)
    assert report.compiled and report.speedup == 1.05 and calls == [5, 5]
    comp.uncompile_model(model)

    order = []
    a = lambda: order.append("a")  # noqa: E731
    b = lambda: order.append("b")  # noqa: E731
    monkeypatch.undo()
    comp.interleaved_times(a, b, 4)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then alternating order


def test_tied_weights_stay_tied_through_an_activation_switch_and_back(tiny_factory, tmp_path):
    from slimformer.methods.quantization.cast import cast_model

    model = tiny_factory("qwen2")  # tied embedding and head
    cast_model(model.model, torch.bfloat16)
    emb, head = model.model.get_input_embeddings(), model.model.get_output_embeddings()
    assert emb.weight is head.weight
    plan_execution(model, _settings(tmp_path, activations="float32", memory="fast"))
    assert emb.weight is head.weight and emb.weight.dtype == torch.float32
    remove_plan(model)
    assert emb.weight is head.weight and emb.weight.dtype == torch.bfloat16
    plan_execution(model, _settings(tmp_path, activations="float32", memory="balanced"))
    assert emb.weight is head.weight
    batch = sample_batch(model)
    assert model_output(model, batch).dtype == torch.float32
    remove_plan(model)
    assert emb.weight is head.weight and emb.weight.dtype == torch.bfloat16


def test_a_planned_layer_traces_in_one_graph_and_still_rebuilds_when_eager():
    """torch.compile(fullgraph=True) of a planned layer (the compiled decode step traces through
    it) gives the eager result; eager calls still rebuild the forms after an in-place write."""
    torch.manual_seed(0)
    q = quantize_module_rtn(nn.Linear(128, 96), 4, 32, False)
    planned = ex.install_planned_forward(q, "dequant-bf16-widen", "unpack-fp32", 8)
    x = torch.randn(1, 3, 128)
    compiled = torch.compile(lambda t: q(t), fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), q(x))
        before = q(x)
        q.storage_key().add_(1)  # an in-place write of the stored codes
        after = q(x)
    assert planned.version == ex.weight_version(q)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, planned.run("unpack-fp32", x), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("batch_when_traced", [False, True])
def test_a_dynamic_shape_graph_takes_the_batch_path_without_guarding_on_the_row_count(batch_when_traced):
    """A whole encoder compiled with dynamic shapes (runtime.compile) sets ``batch_when_traced``:
    then row counts on both sides of ``split_rows`` share one graph, computed by the batch path;
    without it the comparison guards and a new bucket shape recompiles."""
    torch.manual_seed(0)
    q = quantize_module_rtn(nn.Linear(64, 32), 4, 32, False)
    planned = ex.install_planned_forward(q, "unpack-fp32", "dequant-fp32", 8)
    planned.batch_when_traced = batch_when_traced
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(lambda t: q(t), backend=backend, dynamic=True)
    with torch.no_grad():
        for rows in (16, 4, 12, 3):  # above and below split_rows=8
            x = torch.randn(rows, 64)
            expected = planned.run("dequant-fp32" if batch_when_traced or rows >= 8 else "unpack-fp32", x)
            torch.testing.assert_close(compiled(x), expected)
    assert len(frames) == (1 if batch_when_traced else 2)


def test_decode_timing_streams_over_independent_copies_of_the_layer(tmp_path):
    """Decode runs go over copies that share no storage with the layer or each other (so each call
    reads its weights from memory, as in a decode step), at most MAX_STREAM_COPIES of them, and
    every copy computes what the layer computes."""
    from slimformer.runtime.planner import MAX_STREAM_COPIES, STREAM_BYTES, _stream_copies

    torch.manual_seed(0)
    q = quantize_module_rtn(nn.Linear(128, 96), 8, None, True)
    pf = ex.PlannedForward(q, "unpack-fp32", "unpack-fp32", 8, also=("dequant-fp32",))
    copies = _stream_copies(pf)
    per_copy = q.qweight.numel() + q.scales.numel() * 2 + pf.nbytes() + q.runtime_nbytes()
    assert len(copies) == min(MAX_STREAM_COPIES, -(-STREAM_BYTES // per_copy))
    assert copies[0] is pf
    ptrs = {c.module.qweight.data_ptr() for c in copies} | {c.forms["fp32"].data_ptr() for c in copies}
    assert len(ptrs) == 2 * len(copies)
    x = torch.randn(1, 128)
    for c in copies[1:]:
        assert torch.equal(c.run("dequant-fp32", x), pf.run("dequant-fp32", x))
        assert ex.planned_forward_of(c.module) is None


def test_inductor_with_freezing_compiles_a_bf16_model_that_agrees_within_bf16_rounding(tiny_factory):
    """The real path of ``make demo``: Inductor with frozen weights on a bf16 model. The compiled
    output agrees with eager within ``agreement_tolerance(bfloat16)`` and is as close to the
    float32 model as eager is (fused kernels round elsewhere, not worse)."""
    from slimformer.methods.quantization.cast import cast_model
    from slimformer.runtime.compile import agreement_tolerance, compile_model, uncompile_model

    model = tiny_factory("bert")
    batch = sample_batch(model)
    exact = model_output(model, batch)
    cast_model(model.model, torch.bfloat16)
    eager = model_output(model, batch).float()
    assert model.execution is None  # not planned with memory: fast, so not frozen unless asked
    report = compile_model(model, batch, repeats=1, keep_if_slower=True, freezing=True)
    assert report.compiled and report.frozen, report.reason
    with torch.profiler.profile() as prof:
        compiled = model_output(model, batch).float()
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # oneDNN bf16 (AVX-512 BF16 / AMX): prepacked linears
        assert any("mkldnn::_linear_pointwise" in e.key for e in prof.key_averages())
    assert agreement_tolerance(torch.bfloat16) == 2.0**-5 and agreement_tolerance(torch.float32) == 1e-3
    assert 0 < report.max_abs_diff and (compiled - eager).norm() <= 2.0**-5 * eager.norm()
    assert (compiled - exact).norm() <= 1.25 * (eager - exact).norm()  # no less accurate than eager
    uncompile_model(model)


@pytest.mark.parametrize("dtype, error", [(torch.float32, 1.01), (torch.bfloat16, 1.05)])
def test_a_compiled_forward_that_disagrees_beyond_its_dtype_s_rounding_is_not_installed(tiny_factory, monkeypatch, dtype, error):
    """A 1% error in a float32 model, a 5% error in a bf16 one: refused."""
    import slimformer.runtime.compile as comp
    from slimformer.methods.quantization.cast import cast_model

    model = tiny_factory("bert")
    cast_model(model.model, dtype)
    batch = sample_batch(model)
    real_compile = torch.compile

    def off_by_one_percent(fn, **kwargs):
        compiled = real_compile(fn, **{**kwargs, "backend": "eager"})

        def run(*args, **kw):
            out = compiled(*args, **kw)
            out.last_hidden_state.mul_(error)
            return out
        return run

    monkeypatch.setattr(comp.torch, "compile", off_by_one_percent)
    report = comp.compile_model(model, batch, repeats=1, keep_if_slower=True, dynamic=False)
    assert not report.compiled and "differs from eager" in report.reason and "forward" not in model.model.__dict__


def test_weights_are_frozen_by_default_only_under_memory_fast():
    """Frozen weights hold oneDNN's packed copies beside the model's own: the default freezes only
    what the user planned with ``memory: fast``."""
    from types import SimpleNamespace

    from slimformer.runtime.compile import freezes

    def planned(memory):
        return SimpleNamespace(execution=SimpleNamespace(settings=SimpleNamespace(memory=memory)))

    assert freezes(planned("fast"), None, "inductor")
    assert not freezes(planned("balanced"), None, "inductor") and not freezes(planned("packed"), None, "inductor")
    assert not freezes(SimpleNamespace(execution=None), None, "inductor")
    assert freezes(planned("balanced"), True, "inductor") and not freezes(planned("fast"), False, "inductor")
    assert not freezes(planned("fast"), True, "aot_eager")  # graph capture only: nothing to freeze


def _quantized_with_table(tiny_factory, table_bits=8):
    model = tiny_factory("bert")
    compress(model, Recipe(steps=[RTNConfig(bits=4, group_size=32), RTNConfig(bits=table_bits, group_size=None, symmetric=True, targets=["embedding"])]))
    return model


def test_a_dense_embedding_table_gives_the_same_bits_and_its_bytes_are_counted(tiny_factory, tmp_path, monkeypatch):
    from slimformer.runtime import planner

    model = _quantized_with_table(tiny_factory)
    tables = planner.planned_embeddings(model.model)
    assert len(tables) == 1
    (name, table), = tables.items()
    # Whatever this machine measures, make the dense table the faster one: the planner must then
    # install it (under balanced, bf16 activations), and it must change no output bit.
    real = planner.measure_embedding
    def dense_faster(module, settings):
        m = real(module, settings)
        return {**m, "batch_s": {"gather-dequant": 2.0, "dense": 1.0}}
    monkeypatch.setattr(planner, "measure_embedding", dense_faster)
    batch = sample_batch(model)
    plan = plan_execution(model, _settings(tmp_path, activations="bfloat16", workload="batch", widths=False))
    entry = plan.embeddings[name]
    assert entry["measured"]["identical"] and entry["path"] == "dense"
    planned = ex.planned_forward_of(table)
    assert isinstance(planned, ex.PlannedEmbedding) and planned.table.dtype == torch.bfloat16
    ids = torch.arange(table.num_embeddings).reshape(-1, 8)
    assert torch.equal(table(ids), type(table).forward(table, ids))  # bit-identical rows
    weights = table.num_embeddings * table.embedding_dim
    assert planned.nbytes() == 2 * weights
    assert entry["held_bytes_per_weight"] == pytest.approx((table.stored_bits() // 8 + 2 * weights) / weights, abs=1e-3)
    with_table = model_output(model, batch)
    resident = resident_bytes(model.model)
    ex.remove_planned_forward(table)  # the same plan without the dense table
    assert torch.equal(model_output(model, batch), with_table)
    assert resident - resident_bytes(model.model) == 2 * weights
    # Under packed the table is never dense; a decode workload does not plan tables at all.
    packed = plan_execution(model, _settings(tmp_path, memory="packed", activations="bfloat16", workload="batch", widths=False))
    assert packed.embeddings[name]["path"] == "gather-dequant" and ex.planned_forward_of(table) is None
    assert packed.embeddings[name]["measured"] is None and "exceeds memory: packed" in plan_table(packed.summary())
    decode = plan_execution(model, _settings(tmp_path, activations="bfloat16", workload="decode", widths=False))
    assert decode.embeddings == {} and ex.planned_forward_of(table) is None
    remove_plan(model)
    assert all(ex.planned_forward_of(m) is None for m in model.model.modules())


def test_a_dense_table_is_kept_only_when_identical_within_policy_and_clearly_faster():
    from slimformer.runtime.planner import choose_embedding

    fast = {"identical": True, "batch_s": {"gather-dequant": 1.0, "dense": 0.5}, "dense_bytes_per_weight": 2}
    assert choose_embedding(fast, "balanced") == "dense"
    assert choose_embedding(fast, "packed") == "gather-dequant"
    assert choose_embedding({**fast, "identical": False}, "balanced") == "gather-dequant"
    assert choose_embedding({**fast, "batch_s": {"gather-dequant": 1.0, "dense": 0.95}}, "balanced") == "gather-dequant"
    assert choose_embedding({**fast, "dense_bytes_per_weight": 4}, "balanced") == "gather-dequant"
    assert choose_embedding({**fast, "dense_bytes_per_weight": 4}, "fast") == "dense"


def test_input_scaled_w8a8_layers_pass_the_exact_parity_check(tiny_factory, tmp_path):
    from slimformer.methods.quantization.awq import AWQLinear
    from slimformer.methods.quantization.smoothquant import SmoothQuantConfig

    model = tiny_factory("bert")
    compress(model, Recipe(steps=[SmoothQuantConfig(alpha=0.5)]))
    layer = next(m for m in model.model.modules() if isinstance(m, AWQLinear) and m.act_bits == 8)
    assert not torch.all(layer.input_scale == 1), "a smoothing scale must be in play"
    measured = measure_format(layer, torch.float32, _settings(tmp_path))["paths"]
    for path, r in measured.items():
        assert r["ok"], (path, r)
        if ex.PATHS[path].rounding == "exact":
            assert r["rel_error"] <= EXACT_BOUND, (path, r)


def test_int8_activations_setting_decides_whether_w8a8_layers_may_skip_their_activation_rounding(tiny_factory, tmp_path):
    from slimformer.errors import ConfigError

    model = tiny_factory("bert")
    compress(model, Recipe(steps=[RTNConfig(bits=8, group_size=None, symmetric=True, activations="int8")]))
    batch = sample_batch(model)
    w8a8 = model_output(model, batch)
    kept = plan_execution(model, _settings(tmp_path, int8_activations="keep", activations="float32"))
    assert kept.summary()["int8_activations_skipped"] == {"decode": 0, "batch": 0}
    assert all(all(layer["int8_activations"].values()) for layer in kept.layers.values() if "int8_activations" in layer)
    remove_plan(model)
    auto = plan_execution(model, _settings(tmp_path, activations="float32"))
    skipped = auto.summary()["int8_activations_skipped"]
    w8a8_layers = [layer for layer in auto.layers.values() if "int8_activations" in layer]
    assert w8a8_layers
    for regime in ("decode", "batch"):  # the count is what the chosen paths do
        assert skipped[regime] == sum(layer[regime] not in ex.W8A8_KERNELS for layer in w8a8_layers)
    # whichever paths were chosen, the output stays within float32 rounding of the W8A8 model
    # plus the activation rounding the skipped layers leave out (never further than int8 codes)
    planned = model_output(model, batch)
    assert _rel(planned, w8a8) < 0.05
    with pytest.raises(ConfigError, match="int8_activations"):
        PlanSettings(int8_activations="drop")


def test_the_decode_path_is_chosen_on_one_token_and_verify_step_times_together():
    """A path a little slower on one row but much faster on a verify step's rows wins the decode
    side; without verify timings (``verify_tokens=0``) the one-row time alone decides; the run-time
    forms of the pair still have to fit the memory policy."""
    from slimformer.errors import ConfigError
    from slimformer.runtime.planner import choose_paths

    layer = quantize_module_rtn(nn.Linear(64, 32), 8, None, True)
    measured = {"paths": {
        "packed-q8a": {"ok": True, "decode_s": 1.0, "verify_s": 3.0, "batch_s": 5.0},
        "packed-q8a-tiles": {"ok": True, "decode_s": 1.1, "verify_s": 1.3, "batch_s": None},  # not timed at a batch's rows
        "unpack-bf16": {"ok": True, "decode_s": 9.0, "verify_s": 9.5, "batch_s": 1.1},
        "dequant-bf16": {"ok": True, "decode_s": 4.0, "verify_s": 4.2, "batch_s": 1.0},
    }}
    assert choose_paths(measured, layer, "balanced", "decode") == ("packed-q8a-tiles", "unpack-bf16")  # tiles + bf16 copy: 3.25 B/weight
    assert choose_paths(measured, layer, "fast", "decode") == ("packed-q8a-tiles", "dequant-bf16")
    one_row = {"paths": {p: {k: v for k, v in r.items() if k != "verify_s"} for p, r in measured["paths"].items()}}
    assert choose_paths(one_row, layer, "balanced", "decode") == ("packed-q8a", "dequant-bf16")
    # an encoder never verifies: its choice is the one-row and batch times only
    assert choose_paths(measured, layer, "balanced", "batch") == choose_paths(one_row, layer, "balanced", "batch") == ("packed-q8a", "dequant-bf16")
    # a prefill a little slower against every decode step a lot faster: generation takes the tiles
    close = {"paths": {**measured["paths"], "packed-q8a": {"ok": True, "decode_s": 1.0, "verify_s": 2.0, "batch_s": 5.0},
                       "unpack-bf16": {"ok": True, "decode_s": 9.0, "verify_s": 9.5, "batch_s": 1.6}}}
    assert choose_paths(close, layer, "balanced", "batch") == ("packed-q8a", "dequant-bf16")
    assert choose_paths(close, layer, "balanced", "decode") == ("packed-q8a-tiles", "unpack-bf16")
    with pytest.raises(ConfigError, match="verify_tokens"):
        PlanSettings(verify_tokens=-1)
    assert PlanSettings(verify_tokens=0).verify_tokens == 0
