"""One-pass calibration: the statistics and the compressed model are those of the old
prefix-rerun path (kept here only as a reference), block forwards grow linearly with depth,
and spilling the cached activations to disk changes nothing."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from slimformer.methods.calibration import (
    CalibrationSettings,
    CompressionContext,
    InputStatistics,
    blockwise,
    run_batches,
    stages_of_block,
)
from slimformer.methods.quantization.gptq import quantize_linear_gptq
from slimformer.models.adapters import set_submodule

CALIB = dict(n_samples=12, max_length=40, batch_size=4)


def reference_blockwise(loaded, ctx, selected, hessian, sequential=False, keep_samples=0):
    """The previous implementation: every layer group re-runs the model prefix on every batch."""
    adapter = loaded.adapter
    batches = ctx.batches(loaded.tokenizer)
    remaining = dict(selected)
    groups = []
    for i in range(adapter.num_layers()):
        prefix = adapter.block_prefix(i) + "."
        names = [n for n in remaining if n.startswith(prefix)]
        for n in names:
            remaining.pop(n)
        if names:
            block = adapter.blocks()[i]
            stages = stages_of_block(loaded.model, block, names, batches[0]) if sequential else [names]
            groups.extend((block, stage) for stage in stages)
    if remaining:
        groups.append((None, list(remaining)))
    for stop_after, names in groups:
        stats = InputStatistics({n: loaded.model.get_submodule(n) for n in names}, hessian=hessian, keep_samples=keep_samples)
        with stats:
            run_batches(loaded.model, batches, stop_after=stop_after, on_batch=stats.set_batch)
        for n in names:
            yield n, loaded.model.get_submodule(n), stats


def _selected(loaded, head: bool):
    modules = dict(loaded.adapter.linear_layers())
    h = loaded.adapter.head()
    if head and h is not None and h[1].weight is not loaded.model.get_input_embeddings().weight:
        modules[h[0]] = h[1]
    return modules


def _gptq_run(loaded, generator):
    """Quantize every yielded layer with 3-bit GPTQ; return the Hessians and statistics seen."""
    seen = {}
    for name, module, stats in generator:
        H = stats.hessian[name] / stats.count[name]
        seen[name] = (H.clone(), stats.count[name], stats.absmax[name].clone(), stats.samples.get(name))
        new = quantize_linear_gptq(module, H, 3, 16, symmetric=False)
        set_submodule(loaded.model, name, new)
    return seen


def _output(loaded, batch):
    with torch.no_grad():
        out = loaded.model(**batch)
    return out.last_hidden_state if loaded.kind == "encoder" else out.logits


@pytest.mark.parametrize("sequential", [True, False])
def test_one_pass_matches_prefix_rerun(tiny, sequential):
    head = tiny.kind == "causal-lm"
    ref_model = copy.deepcopy(tiny)
    ctx = CompressionContext(CalibrationSettings(**CALIB))
    ref_ctx = CompressionContext(CalibrationSettings(**CALIB))
    keep = 7
    got = _gptq_run(tiny, blockwise(tiny, ctx, _selected(tiny, head), hessian=True, desc="t", sequential=sequential, keep_samples=keep))
    want = _gptq_run(ref_model, reference_blockwise(ref_model, ref_ctx, _selected(ref_model, head), hessian=True, sequential=sequential, keep_samples=keep))
    assert list(got) == list(want)  # same layers in the same order
    for name in want:
        H, count, absmax, samples = got[name]
        H_ref, count_ref, absmax_ref, samples_ref = want[name]
        assert count == count_ref
        torch.testing.assert_close(H, H_ref, rtol=1e-4, atol=1e-5 * float(H_ref.abs().max()))
        torch.testing.assert_close(absmax, absmax_ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(samples, samples_ref, rtol=1e-4, atol=1e-5)
    batch = ctx.batches(tiny.tokenizer)[0]
    out, ref = _output(tiny, batch), _output(ref_model, batch)
    # the quantized models agree to float rounding (a code may flip at a rounding tie)
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()


def _count_block_calls(loaded, run):
    counts = [0] * loaded.adapter.num_layers()
    handles = [b.register_forward_pre_hook(lambda *_a, i=i: counts.__setitem__(i, counts[i] + 1)) for i, b in enumerate(loaded.adapter.blocks())]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return counts


def test_block_forwards_are_linear_in_depth(tiny_factory):
    from slimformer.models.loading import from_module
    from slimformer.models.tiny import tiny_config, tiny_tokenizer
    import transformers

    totals = {}
    for depth in (4, 8):
        config = tiny_config("llama")
        config.num_hidden_layers = depth
        torch.manual_seed(0)
        loaded = from_module(transformers.AutoModelForCausalLM.from_config(config), tiny_tokenizer())
        ctx = CompressionContext(CalibrationSettings(**CALIB))
        n_batches = len(ctx.batches(loaded.tokenizer))
        counts = _count_block_calls(loaded, lambda: _gptq_run(loaded, blockwise(loaded, ctx, _selected(loaded, False), True, "t", sequential=True)))
        # per block: 4 stages x batches + one advancing pass; block 0 also runs once to learn its
        # output type and once to find its stages (the other blocks reuse them); the last block
        # is not advanced (nothing after it)
        per_block = 4 * n_batches + n_batches
        assert counts[0] == per_block + 2
        assert counts[1:-1] == [per_block] * (depth - 2)
        assert counts[-1] == per_block - n_batches
        totals[depth] = sum(counts)
    assert totals[8] - totals[4] == 4 * 5 * n_batches  # each extra block costs the same


def test_finished_stages_are_replayed_not_recomputed(tiny_factory, monkeypatch):
    """True-sequential GPTQ runs each linear layer once per batch to collect its statistics and
    once more (compressed) to record its output; later stages and the advancing pass replay the
    recorded outputs. Without room for the recordings (spilled activations) every stage re-runs
    the block up to its layers, and the result is bit-identical."""
    import torch.nn.functional as F

    calls = {"n": 0}
    real_linear = F.linear

    def counting_linear(*args, **kwargs):
        calls["n"] += 1
        return real_linear(*args, **kwargs)

    loaded = tiny_factory("llama")
    other = copy.deepcopy(loaded)
    depth = loaded.adapter.num_layers()
    ctx = CompressionContext(CalibrationSettings(**CALIB, offload="memory"))
    nb = len(ctx.batches(loaded.tokenizer))
    per_block = len(loaded.adapter.linear_layers(0))
    assert per_block == 7  # q, k, v, o, gate, up, down in four stages
    monkeypatch.setattr(F, "linear", counting_linear)
    got = _gptq_run(loaded, blockwise(loaded, ctx, _selected(loaded, False), True, "t", sequential=True))
    replayed = calls["n"]
    calls["n"] = 0
    spilled = CompressionContext(CalibrationSettings(**CALIB, offload="disk"))
    want = _gptq_run(other, blockwise(other, spilled, _selected(other, False), True, "t", sequential=True))
    rerun = calls["n"]
    monkeypatch.setattr(F, "linear", real_linear)
    # statistics + recording, per block; block 0 also runs whole once to learn its output type
    # and once to find its stages
    assert replayed == depth * 2 * per_block * nb + 2 * per_block
    # re-running: stages see 3, 4, 6 and 7 layers, and the advancing pass all 7 (not after the last block)
    assert rerun == depth * ((3 + 4 + 6 + 7) * nb + per_block * nb) - per_block * nb + 2 * per_block
    for name in want:
        assert torch.equal(got[name][0], want[name][0]), name
    batch = ctx.batches(loaded.tokenizer)[0]
    assert torch.equal(_output(loaded, batch), _output(other, batch))


def test_spilled_activations_give_identical_results(tiny_factory, tmp_path):
    loaded = tiny_factory("qwen2")
    other = copy.deepcopy(loaded)
    in_memory = CompressionContext(CalibrationSettings(**CALIB, offload="memory"))
    on_disk = CompressionContext(CalibrationSettings(**CALIB, offload="disk"))
    on_disk.work_dir = tmp_path
    files_seen = []

    def watching(gen):
        for item in gen:
            files_seen.append(sum(len(f) for _, _, f in os.walk(tmp_path)))
            yield item

    got = _gptq_run(other, watching(blockwise(other, on_disk, _selected(other, True), True, "t", sequential=True)))
    want = _gptq_run(loaded, blockwise(loaded, in_memory, _selected(loaded, True), True, "t", sequential=True))
    n_batches = len(in_memory.batches(loaded.tokenizer))
    assert max(files_seen) == n_batches  # one file per batch, no more
    assert list(tmp_path.iterdir()) == []  # the spill folder is removed afterwards
    for name in want:
        assert torch.equal(got[name][0], want[name][0]), name
    batch = in_memory.batches(loaded.tokenizer)[0]
    assert torch.equal(_output(loaded, batch), _output(other, batch))


def test_auto_offload_spills_over_the_budget(tiny_factory, tmp_path):
    from slimformer.methods.calibration import activation_bytes, open_activation_store

    loaded = tiny_factory("llama")
    ctx = CompressionContext(CalibrationSettings(**CALIB))
    ctx.work_dir = tmp_path
    need = activation_bytes(loaded, ctx.batches(loaded.tokenizer))
    ctx.activation_budget = need
    assert not open_activation_store(loaded, ctx, ctx.batches(loaded.tokenizer)).spilled
    ctx.activation_budget = need - 1
    store = open_activation_store(loaded, ctx, ctx.batches(loaded.tokenizer))
    assert store.spilled
    store.close()
    with pytest.raises(ValueError, match="offload"):
        CalibrationSettings(offload="gpu")
