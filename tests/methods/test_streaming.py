"""Streamed weights: blocks stay in the safetensors file until calibration reaches them, at most
one float block is in memory at a time, and the result is bit-identical to compressing the
fully loaded model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimformer.compress import compress
from slimformer.methods.streaming import is_streamed, load_streamed
from slimformer.recipe import Recipe


def _recipe(method: dict) -> Recipe:
    return Recipe.from_dict({"slimformer_recipe": 1, "name": "s", "calibration": {"n_samples": 8, "max_length": 32, "batch_size": 4}, "steps": [method]})


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_streamed_gptq_is_bit_identical_and_holds_one_float_block(tiny_factory, tmp_path, family):
    loaded = tiny_factory(family)
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    streamed = load_streamed(tmp_path)
    streamed.tokenizer = loaded.tokenizer
    adapter = streamed.adapter
    blocks = list(adapter.blocks())
    assert all(p.is_meta for b in blocks for p in b.parameters())
    outside = [(n, p) for n, p in streamed.model.named_parameters() if not any(p is q for b in blocks for q in b.parameters())]
    head = adapter.head()
    # in memory: everything outside the blocks except an untied output head (loaded at the end)
    assert [n for n, p in outside if p.is_meta] == ([head[0] + ".weight"] if family == "llama" else [])

    seen, alive = [], []
    weights = streamed.streamed_weights
    original = weights.materialize
    float_linears = {n: m for n, m in streamed.model.named_modules() if isinstance(m, nn.Linear) and any(n.startswith(adapter.block_prefix(i) + ".") for i in range(len(blocks)))}

    def watching(prefix, module):
        if any(module is b for b in blocks) and any(p.is_meta for p in module.parameters()):  # a block load, not a repeat
            float_blocks = [i for i, b in enumerate(blocks) if any(isinstance(m, nn.Linear) and not m.weight.is_meta for m in b.modules())]
            seen.append(float_blocks)
            # the float layers replaced so far hold no tensor (the step's selection still names them)
            alive.append(sum(1 for m in float_linears.values() if m.weight is not None and not m.weight.is_meta))
        return original(prefix, module)

    weights.materialize = watching
    recipe = _recipe({"method": "gptq", "bits": 4, "group_size": 16})
    compress(streamed, recipe)
    compress(loaded, recipe)
    # before loading a block, no other block holds float linears (earlier ones are quantized)
    assert len(seen) == len(blocks) and all(f == [] for f in seen)
    assert alive == [0] * len(blocks)
    assert not is_streamed(streamed.model)
    a, b = streamed.model.state_dict(), loaded.model.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_step_that_needs_the_whole_model_loads_it_first(tiny_factory, tmp_path):
    loaded = tiny_factory("llama")
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    streamed = load_streamed(tmp_path)
    compress(streamed, _recipe({"method": "rtn", "bits": 8, "group_size": None}))
    compress(loaded, _recipe({"method": "rtn", "bits": 8, "group_size": None}))
    a, b = streamed.model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_streaming_refuses_a_folder_without_safetensors(tmp_path):
    from slimformer.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="safetensors"):
        load_streamed(tmp_path)
