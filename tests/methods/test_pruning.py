"""Pruning masks: N:M exact, sparsity exactly as requested, Wanda weighs by activations."""

import copy

import pytest
import torch

from slimformer.compress import compress
from slimformer.errors import ConfigError
from slimformer.methods import MagnitudeConfig, WandaConfig
from slimformer.methods.pruning.masks import nm_mask, unstructured_mask
from slimformer.recipe import Recipe


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_exactly_n_of_every_m_and_the_largest(n, m):
    torch.manual_seed(0)
    scores = torch.rand(16, 64)
    mask = nm_mask(scores, n, m)
    assert torch.all(mask.reshape(16, -1, m).sum(-1) == n)
    groups = scores.reshape(16, -1, m)
    kept_min = torch.where(mask.reshape(16, -1, m), groups, torch.inf).amin(-1)
    dropped_max = torch.where(~mask.reshape(16, -1, m), groups, -torch.inf).amax(-1)
    assert torch.all(kept_min >= dropped_max)


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("per_row", [True, False])
def test_unstructured_sparsity_equals_request(sparsity, per_row):
    scores = torch.rand(32, 40)
    mask = unstructured_mask(scores, sparsity, per_row)
    assert int((~mask).sum()) == round(sparsity * scores.numel())


def test_wanda_keeps_weights_on_loud_inputs_that_magnitude_drops(tiny_factory, fast_calibration):
    base = tiny_factory("llama")
    linear_name = "model.layers.0.mlp.down_proj"
    # Make input feature 3 of this layer 100x louder (scale the up_proj row that produces it):
    # magnitude pruning does not see activations, Wanda's |W| * ||X|| score does.
    with torch.no_grad():
        base.model.get_submodule("model.layers.0.mlp.up_proj").weight[3] *= 100
    mag, wanda = copy.deepcopy(base), copy.deepcopy(base)
    compress(mag, Recipe(steps=[MagnitudeConfig(sparsity=0.5)], calibration=fast_calibration))
    compress(wanda, Recipe(steps=[WandaConfig(sparsity=0.5)], calibration=fast_calibration))
    col_mag = mag.model.get_submodule(linear_name).weight[:, 3]
    col_wanda = wanda.model.get_submodule(linear_name).weight[:, 3]
    assert (col_mag != 0).float().mean() < 0.75  # magnitude: about half of the column goes
    assert (col_wanda != 0).float().mean() > 0.9  # Wanda: the loud column survives


@pytest.mark.parametrize("kwargs", [{"sparsity": 1.0}, {"sparsity": -0.1}, {"sparsity": 0.3, "pattern": "2:4"}, {"pattern": "4:2"}, {"pattern": "two of four"}])
def test_invalid_pruning_settings_are_rejected(kwargs):
    with pytest.raises(ConfigError):
        MagnitudeConfig(**kwargs)


def test_tied_weights_are_never_changed_on_one_side_only(tiny_factory):
    from slimformer.methods import RTNConfig

    model = tiny_factory("qwen2")  # embedding tied to lm_head
    before = model.model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ConfigError, match="tied"):
        compress(model, Recipe(steps=[MagnitudeConfig(sparsity=0.5, targets=("head",))]))
    with pytest.raises(ConfigError, match="does not select"):
        compress(model, Recipe(steps=[RTNConfig(bits=8, group_size=None, targets=("embedding",))]))
    assert torch.equal(model.model.model.embed_tokens.weight, before)


def test_calibration_longer_than_the_position_limit_is_clamped(tiny_factory):
    from slimformer.methods import CalibrationSettings

    model = tiny_factory("bert")  # 256 positions
    calibration = CalibrationSettings(n_samples=4, max_length=2048, batch_size=4)
    compress(model, Recipe(steps=[WandaConfig(sparsity=0.5)], calibration=calibration))
    assert model.applied[-1]["sparsity"]
