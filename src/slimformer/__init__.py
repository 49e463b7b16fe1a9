"""slimformer: make transformer models smaller and faster, and measure what each saving costs.

Python API::

    import slimformer
    original = slimformer.load("default")                  # or a folder / hub id
    model = slimformer.load("default")
    recipe = slimformer.Recipe.from_file("recipes/gptq-w4g32-v8-emb8.yaml")
    slimformer.compress(model, recipe)
    result = slimformer.evaluate(original, model)
    slimformer.save(model, "out/minilm-w4", evaluation=result)
    again = slimformer.load("out/minilm-w4")               # bit-exact outputs
"""

__version__ = "0.1.0"

from slimformer.compress import compress  # noqa: E402
from slimformer.errors import ConfigError, ModelLoadError, OutputExistsError, SlimformerError, UnsupportedArchitectureError  # noqa: E402
from slimformer.evaluate import EvalSettings, evaluate  # noqa: E402
from slimformer.io import load_compressed, save_compressed  # noqa: E402
from slimformer.methods import CalibrationSettings, registered_methods  # noqa: E402
from slimformer.models import LoadedModel, load_model  # noqa: E402
from slimformer.recipe import Recipe, recipe_from_steps  # noqa: E402

load = load_model
save = save_compressed

__all__ = [
    "CalibrationSettings",
    "ConfigError",
    "EvalSettings",
    "LoadedModel",
    "ModelLoadError",
    "OutputExistsError",
    "Recipe",
    "SlimformerError",
    "UnsupportedArchitectureError",
    "__version__",
    "compress",
    "evaluate",
    "load",
    "load_compressed",
    "load_model",
    "recipe_from_steps",
    "registered_methods",
    "save",
    "save_compressed",
]
