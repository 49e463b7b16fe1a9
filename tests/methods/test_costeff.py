"""COST-EFF joint training: every exit's distillation loss falls, the slimmed matrices have the
configured shapes, an interrupted run resumes to the same loss trajectory, and the trained
multi-exit model survives save/load."""

import copy

import pytest
import torch

from slimformer.compress import compress
from slimformer.errors import ConfigError
from slimformer.io import load_compressed, save_compressed
from slimformer.methods import CalibrationSettings, CostEffConfig
from slimformer.methods.dynamic import costeff as costeff_module
from slimformer.recipe import Recipe

CAL = CalibrationSettings(n_samples=24, max_length=32, batch_size=8)


def _run(loaded, **fields):
    compress(loaded, Recipe(steps=[CostEffConfig(**fields)], calibration=CAL))
    return loaded.applied[-1]


@pytest.fixture(scope="module")
def trained(_tiny_models):
    bert = copy.deepcopy(_tiny_models["bert"])
    record = _run(bert, flops_ratio=0.5, head_ratio=0.5, steps=30, lr=1e-3, exit_lr=3e-3, confidence_steps=50)
    return bert, record


def test_joint_training_lowers_every_exit_s_loss(trained):
    bert, record = trained
    before, after = record["training"]["loss_before"], record["training"]["loss_after"]
    exits = [f"exit{layer}" for layer in bert.dynamic.exits.layers]
    assert exits and set(exits) <= set(before)
    for term in exits + ["final"]:
        assert after[term] < before[term], (term, before[term], after[term])
    # the final embedding keeps (here: regains) its quality on the held-back rows, too
    assert record["training"]["held_back_after"]["final"] < record["training"]["held_back_before"]["final"]


def test_slimmed_matrices_have_the_configured_shapes(trained, _tiny_models):
    bert, record = trained
    original = _tiny_models["bert"]
    hd = original.adapter.head_dim()
    for i in range(bert.adapter.num_layers()):
        n_q, _ = original.adapter.attention_heads(i)
        heads_kept = record["width"]["heads"][str(i)][0]
        assert heads_kept == max(1, round(0.5 * n_q))
        assert bert.adapter.attention_heads(i)[0] == heads_kept
        ins, out = bert.adapter.mlp_linears(i)
        width = record["width"]["mlp_widths"][str(i)]
        assert out.weight.shape[1] == width and all(m.weight.shape[0] == width for m in ins)
        assert width < original.adapter.mlp_linears(i)[1].weight.shape[1]
        o_proj = bert.adapter.attention_linears(bert.adapter.attention(i))[1]
        assert o_proj.weight.shape[1] == heads_kept * hd
    assert record["width"]["block_flops_ratio"] < 0.6


def test_costeff_model_saves_and_loads_exactly(trained, tmp_path):
    bert, _ = trained
    batch = dict(bert.tokenizer(["A short text.", "A longer text about nothing in particular, twice."], padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    save_compressed(bert, tmp_path / "m")
    again = load_compressed(tmp_path / "m")
    again.tokenizer = bert.tokenizer
    assert torch.equal(again.embed(batch), bert.embed(batch))


def test_resume_equals_uninterrupted(tiny_factory, tmp_path, monkeypatch):
    fields = dict(flops_ratio=0.75, steps=6, lr=1e-3, seed=3, checkpoint_every=3, confidence_steps=5)
    straight = tiny_factory("bert")
    ref = _run(straight, **fields, checkpoint=str(tmp_path / "a.ckpt"))["training"]
    real = costeff_module.total_loss
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # training step 5: after the checkpoint at step 3
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(costeff_module, "total_loss", failing)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_factory("bert"), **fields, checkpoint=str(tmp_path / "b.ckpt"))
    monkeypatch.setattr(costeff_module, "total_loss", real)
    resumed_model = tiny_factory("bert")
    resumed = _run(resumed_model, **fields, checkpoint=str(tmp_path / "b.ckpt"))["training"]
    assert resumed["resumed_at"] == 3
    assert len(resumed["history"]) == len(ref["history"]) == 6
    assert resumed["history"] == pytest.approx(ref["history"], rel=1e-5, abs=1e-7)
    for a, b in zip(resumed_model.model.state_dict().values(), straight.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_bfloat16_autocast_trains_in_bfloat16_and_keeps_float32_weights(tiny_factory):
    fields = dict(flops_ratio=0.75, steps=12, lr=1e-3, exit_lr=3e-3, seed=1, confidence_steps=5)
    plain = _run(tiny_factory("bert"), **fields)["training"]
    low_model = tiny_factory("bert")
    low = _run(low_model, **fields, autocast="bfloat16")["training"]
    assert low["autocast"] == "bfloat16" and plain["autocast"] == "float32"
    # the same run, its products rounded to bfloat16: close to the float32 losses but not equal
    assert low["history"][0] == pytest.approx(plain["history"][0], rel=0.05)
    assert low["history"] != plain["history"]
    exits = [t for t in low["loss_before"] if t.startswith("exit")]
    assert exits and all(low["loss_after"][t] < low["loss_before"][t] for t in exits), (low["loss_before"], low["loss_after"])
    assert all(p.dtype == torch.float32 for p in low_model.model.parameters())


@pytest.mark.parametrize("bad", [{"flops_ratio": 0}, {"backbone": "lora"}, {"rule": "confidence"}, {"steps": -1}, {"exit_weighting": "cubic"}, {"autocast": "float16"}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        CostEffConfig(**bad)
