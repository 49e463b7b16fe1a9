"""Compiling a model with dynamic settings: the runs of blocks between reduction and exit points
are compiled graphs, checked one by one against eager, and the dynamic runtime calls them."""

import re

import pytest
import torch
from conftest import sample_batch

import slimformer.runtime.compile as comp
from slimformer.methods import TokenPruningConfig
from slimformer.methods.dynamic import install_token_pruning
from slimformer.methods.dynamic.runtime import DynamicEncoder, DynamicSettings, ExitHeads, block_segments

TEXTS = ("def foo(x): return x + 1", "A short docstring.\n\nWith a second paragraph about nothing, and more words to prune away.",
         "tiny", "another text of middling length for the batch")


def test_segments_end_after_every_reducer_and_exit_and_cover_each_block_once():
    settings = DynamicSettings(exits=ExitHeads([0, 2], 8), reducers={1: [object()]})
    assert block_segments(settings, 6) == [(0, 1), (1, 2), (2, 3), (3, 6)]
    assert block_segments(DynamicSettings(), 6) == [(0, 6)]
    assert block_segments(settings, 6, every_block=True) == [(i, i + 1) for i in range(6)]


class _Counter:
    """A dynamo backend that runs the captured graph as it is and counts the graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _pruned(tiny_factory):
    model = tiny_factory("bert")
    install_token_pruning(model, TokenPruningConfig(keep_ratio=0.5, layers=(0,), schedule="constant"))
    return model, sample_batch(model, TEXTS)


def test_compiled_segments_agree_with_eager_and_are_what_the_runtime_runs(tiny_factory):
    model, batch = _pruned(tiny_factory)
    eager, eager_stats = DynamicEncoder(model).embed(batch, return_stats=True)
    backend = _Counter()
    report = comp.compile_model(model, batch, repeats=1, keep_if_slower=True, backend=backend, dynamic=False)
    spans = block_segments(model.dynamic, model.adapter.num_layers())
    assert report.compiled and len(spans) == 2 and set(model.dynamic.compiled) == set(spans)
    assert report.max_abs_diff <= 1e-5 and "forward" not in model.model.__dict__
    assert backend.graphs >= len(spans)  # every segment was captured as a graph
    calls = {span: 0 for span in spans}
    for span, segment in list(model.dynamic.compiled.items()):
        def counted(hidden, mask, span=span, segment=segment):
            calls[span] += 1
            return segment(hidden, mask)
        model.dynamic.compiled[span] = counted
    out, stats = DynamicEncoder(model).embed(batch, return_stats=True)
    assert all(n > 0 for n in calls.values())
    assert torch.allclose(out, eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(stats.layers_run, eager_stats.layers_run) and stats.tokens_per_layer == eager_stats.tokens_per_layer
    comp.uncompile_model(model)
    assert model.dynamic.compiled == {}


def test_a_segment_that_disagrees_with_eager_is_not_installed(tiny_factory, monkeypatch):
    """A 1% error in one float32 segment is refused, even though it is checked on the segment's
    own input rather than end to end."""
    model, batch = _pruned(tiny_factory)
    real_compile = torch.compile

    def off_by_one_percent(fn, **kwargs):
        compiled = real_compile(fn, **{**kwargs, "backend": "eager"})
        return lambda hidden, mask: compiled(hidden, mask) * 1.01

    monkeypatch.setattr(comp.torch, "compile", off_by_one_percent)
    report = comp.compile_model(model, batch, repeats=1, keep_if_slower=True, dynamic=False)
    assert not report.compiled and re.search(r"compiled blocks \d\.\.\d differ from eager by 0\.01 ", report.reason)
    assert model.dynamic.compiled == {}


def test_a_compiled_segment_that_fails_later_runs_eagerly(tiny_factory):
    model, batch = _pruned(tiny_factory)
    eager = DynamicEncoder(model).embed(batch)
    assert comp.compile_model(model, batch, repeats=1, keep_if_slower=True, backend="eager", dynamic=False).compiled
    DynamicEncoder(model).embed(batch)
    assert comp.compile_fallbacks(model) == []

    def boom(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    for segment in model.dynamic.compiled.values():
        segment.compiled = boom
    with pytest.warns(UserWarning, match="running eagerly"):
        again = DynamicEncoder(model).embed(batch)
    assert torch.allclose(again, eager, atol=1e-6, rtol=1e-6)
    # what a benchmark checks before it labels a timing "compiled"
    assert comp.compile_fallbacks(model) == ["RuntimeError: no C++ compiler"] * len(model.dynamic.compiled)


def test_each_segment_of_each_model_keeps_its_own_graphs(tiny_factory):
    """Dynamo caches graphs per code object: every segment gets its own, so two compiled models'
    segments do not pile their graphs into one cache (scanned at each call, capped by the
    recompile limit)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    codes = []
    for _ in range(2):
        model, batch = _pruned(tiny_factory)
        assert comp.compile_model(model, batch, repeats=1, keep_if_slower=True, backend="eager", dynamic=False).compiled
        model.embed(batch)
        codes += [segment.eager.__code__ for segment in model.dynamic.compiled.values()]
    assert len(codes) == 4 and len({id(c) for c in codes}) == 4
    assert sorted({c.co_name for c in codes}) == ["blocks_0_to_0", "blocks_1_to_3"]
    assert all(1 <= len(_debug_get_cache_entry_list(c)) <= 2 for c in codes)  # its own bucket shapes only
