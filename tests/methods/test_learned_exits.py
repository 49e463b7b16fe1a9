"""Learned-confidence exits: a threshold of the ``predicted`` rule is the expected cosine of what
exits, on held-out text of another kind; inputs that exit never run the later blocks."""

import copy

import pytest
import torch
import torch.nn.functional as F

from slimformer.compress import compress
from slimformer.data import TextSpec, load_texts
from slimformer.errors import ConfigError
from slimformer.methods import CalibrationSettings, EarlyExitConfig
from slimformer.methods.dynamic import set_exit_rule
from slimformer.recipe import Recipe

CAL = CalibrationSettings(n_samples=96, max_length=48, batch_size=16)


def _held_out(loaded, source="package-docs", n=48):
    texts = load_texts(TextSpec(source=source, split="evaluation", n=n))
    batch = dict(loaded.tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    return batch


@pytest.fixture(scope="module")
def trained(_tiny_models):
    """(original, the same tiny BERT with exits and learned confidence)."""
    original = copy.deepcopy(_tiny_models["bert"])
    bert = copy.deepcopy(original)
    compress(bert, Recipe(steps=[EarlyExitConfig(rule="predicted", threshold=0.9, train_steps=60)], calibration=CAL))
    return original, bert


def test_predicted_cosine_threshold_holds_on_held_out_text(trained):
    original, bert = trained
    summary = bert.applied[-1]["confidence"]
    assert set(summary) == set(bert.dynamic.exits.layers)
    n_layers = bert.adapter.num_layers()
    exited_somewhere = False
    for source in ("package-docs", "notices"):
        batch = _held_out(bert, source)
        full = original.embed(batch)
        for t in (0.85, 0.9, 0.95, 0.98):
            set_exit_rule(bert, "predicted", t)
            out, stats = bert.embed(batch, return_stats=True)
            cos = float(F.cosine_similarity(out, full, dim=-1).mean())
            assert cos >= t - 0.03, (source, t, cos)
            exited_somewhere |= bool((stats.layers_run < n_layers).any())
    assert exited_somewhere, "no input exited early at any threshold: the check above would be vacuous"


def test_a_lower_threshold_never_runs_more_blocks(trained):
    _, bert = trained
    batch = _held_out(bert)
    runs = []
    for t in (0.99, 0.95, 0.9, 0.8):
        set_exit_rule(bert, "predicted", t)
        runs.append(bert.embed(batch, return_stats=True)[1].layers_run)
    for a, b in zip(runs, runs[1:]):
        assert torch.all(b <= a)


def test_predicted_exit_skips_the_later_blocks(trained):
    _, bert = trained
    set_exit_rule(bert, "predicted", -2.0)  # every input's prediction clears it at the first exit
    calls = {i: 0 for i in range(bert.adapter.num_layers())}
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1)) for i, b in enumerate(bert.adapter.blocks())]
    try:
        _, stats = bert.embed(_held_out(bert), return_stats=True)
    finally:
        for h in handles:
            h.remove()
    first = bert.dynamic.exits.layers[0]
    assert torch.all(stats.layers_run == first + 1)
    assert all(calls[i] > 0 for i in range(first + 1))
    assert all(calls[i] == 0 for i in range(first + 1, bert.adapter.num_layers()))


def test_predicted_rule_needs_learned_confidence(tiny_factory, fast_calibration):
    bert = tiny_factory("bert")
    compress(bert, Recipe(steps=[EarlyExitConfig(threshold=0.9, train_steps=5)], calibration=fast_calibration))
    try:
        set_exit_rule(bert, "predicted", 0.9)
    except ConfigError as exc:
        assert "learned confidence" in str(exc)
    else:
        raise AssertionError("the predicted rule was accepted without confidence heads")
    set_exit_rule(bert, "patience", 0.9, 2)  # the other rules stay available for comparison
