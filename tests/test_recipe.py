"""Recipes: versioned, type-tagged, validated; the example recipes in the repo all load."""

from pathlib import Path

import pytest

from slimformer.errors import ConfigError
from slimformer.methods import GPTQConfig, RTNConfig, method_from_dict, registered_methods
from slimformer.recipe import Recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.*"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_example_recipes_load_and_round_trip(path):
    recipe = Recipe.from_file(path)
    again = Recipe.from_dict(recipe.to_dict())
    assert again.to_dict() == recipe.to_dict()


def test_there_are_example_recipes():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("name", list(registered_methods()))
def test_every_method_config_round_trips_with_type_tag_and_version(name):
    config = registered_methods()[name].config_type()
    data = config.to_dict()
    assert data["method"] == name and data["version"] == config.version
    assert method_from_dict(data) == config
    assert config.paper and config.summary


@pytest.mark.parametrize(
    "step,match",
    [
        ({"method": "rtn", "bits": 5}, "bits=5"),
        ({"method": "rtn", "group_size": 0}, "group_size"),
        ({"method": "rtn", "targets": ["attention"]}, "unknown target"),
        ({"method": "rtn", "bitz": 4}, "unknown setting"),
        ({"method": "rtn", "bits": "four"}, "integer"),
        ({"method": "gptq", "damp": 2.0}, "damp"),
        ({"method": "gptq", "targets": ["embedding"]}, "embedding"),
        ({"method": "shortgpt", "num_layers": 0}, "num_layers"),
        ({"method": "wanda", "sparsity": 1.5}, r"\[0, 1\)"),
        ({"method": "fusegpt", "layers": [2, 2]}, "repeats"),
        ({"method": "fusegpt", "rank": 0}, "rank"),
        ({"method": "fusegpt", "validation": 1.0}, "validation"),
        ({"method": "width-slim", "select": "random"}, "select"),
        ({"method": "costeff", "width_select": "random"}, "width_select"),
        ({"method": "prune-everything"}, "unknown method"),
        ({"bits": 4}, "no 'method'"),
    ],
)
def test_invalid_steps_are_one_line_errors(step, match):
    with pytest.raises(ConfigError, match=match) as info:
        method_from_dict(step)
    assert "\n" not in str(info.value) and ";" in str(info.value)


@pytest.mark.parametrize(
    "data,match",
    [
        ({"steps": [{"method": "rtn"}]}, "slimformer_recipe"),
        ({"slimformer_recipe": 99, "steps": [{"method": "rtn"}]}, "version"),
        ({"slimformer_recipe": 1, "steps": []}, "no steps"),
        ({"slimformer_recipe": 1, "steps": {"method": "rtn"}}, "must be a list"),
        ({"slimformer_recipe": 1, "stepz": []}, "unknown key"),
        ({"slimformer_recipe": 1, "steps": [{"method": "rtn"}], "calibration": {"n_samples": -1}}, "n_samples"),
        ([1, 2], "not a mapping"),
    ],
)
def test_malformed_recipes_are_rejected(data, match):
    with pytest.raises(ConfigError, match=match):
        Recipe.from_dict(data)


def test_malformed_yaml_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("slimformer_recipe: 1\nsteps: [ {method: rtn\n")
    with pytest.raises(ConfigError, match="malformed"):
        Recipe.from_file(path)


def test_python_api_configs_validate_on_construction():
    with pytest.raises(ConfigError):
        RTNConfig(bits=5)
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        GPTQConfig(damp=0)


def test_unquoted_nm_pattern_gets_a_hint():
    data = Recipe.from_dict  # YAML turns `pattern: 2:4` into the integer 124 (base 60)
    with pytest.raises(ConfigError, match="quotes"):
        data({"slimformer_recipe": 1, "steps": [{"method": "wanda", "pattern": 124}]})


@pytest.mark.parametrize("source", [None, 5, "wikipedia", "missing-file.txt"])
def test_calibration_source_is_validated_up_front(source):
    with pytest.raises(ConfigError):
        Recipe.from_dict({"slimformer_recipe": 1, "steps": [{"method": "rtn"}], "calibration": {"source": source}})
