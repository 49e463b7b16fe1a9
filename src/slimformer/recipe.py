"""Recipes: a versioned, type-tagged chain of methods plus calibration settings (YAML or JSON).

    slimformer_recipe: 1
    name: gptq-w4g32-emb8
    calibration: {source: mix, n_samples: 512, max_length: 128}
    steps:
      - {method: gptq, bits: 4, group_size: 32}
      - {method: rtn, bits: 8, group_size: null, targets: [embedding]}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimformer.errors import ConfigError, did_you_mean
from slimformer.methods import CalibrationSettings, MethodConfig, method_from_dict

RECIPE_VERSION = 1
_TOP_KEYS = {"slimformer_recipe", "name", "description", "calibration", "steps"}


@dataclass
class Recipe:
    """An ordered list of method configs, applied in order, with shared calibration settings."""

    steps: list[MethodConfig]
    name: str = "recipe"
    description: str = ""
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)

    def __post_init__(self) -> None:
        if not self.steps:
            raise ConfigError(f"recipe {self.name!r} has no steps", "add at least one step under 'steps:'")

    def to_dict(self) -> dict[str, Any]:
        return {
            "slimformer_recipe": RECIPE_VERSION,
            "name": self.name,
            "description": self.description,
            "calibration": dataclasses.asdict(self.calibration),
            "steps": [s.to_dict() for s in self.steps],
        }

    @classmethod
    def from_dict(cls, data: Any, origin: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise ConfigError(f"{origin} is not a mapping", "write the recipe as a YAML/JSON mapping with 'slimformer_recipe' and 'steps'")
        version = data.get("slimformer_recipe")
        if version is None:
            raise ConfigError(f"{origin} has no 'slimformer_recipe' version key", f"add 'slimformer_recipe: {RECIPE_VERSION}' at the top")
        if version != RECIPE_VERSION:
            raise ConfigError(f"{origin} has version {version!r}, this slimformer reads {RECIPE_VERSION}", "update the recipe to the current format")
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            raise ConfigError(f"{origin} has unknown key {unknown[0]!r}{did_you_mean(unknown[0], _TOP_KEYS)}", f"valid top-level keys are {sorted(_TOP_KEYS)}")
        steps = data.get("steps")
        if not isinstance(steps, list):
            raise ConfigError(f"{origin}: 'steps' must be a list", "write steps as a list of {method: NAME, ...} mappings")
        calib = data.get("calibration") or {}
        if not isinstance(calib, dict):
            raise ConfigError(f"{origin}: 'calibration' must be a mapping", "write e.g. calibration: {n_samples: 128}")
        fields = {f.name for f in dataclasses.fields(CalibrationSettings)}
        bad = sorted(set(calib) - fields)
        if bad:
            raise ConfigError(f"{origin}: unknown calibration setting {bad[0]!r}{did_you_mean(bad[0], fields)}", f"valid settings are {sorted(fields)}")
        return cls(
            steps=[method_from_dict(s) for s in steps],
            name=str(data.get("name", "recipe")),
            description=str(data.get("description", "")),
            calibration=CalibrationSettings(**calib),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist", "pass an existing .yaml/.yml/.json recipe (see recipes/)")
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"recipe {path} is malformed ({first})", "fix the YAML/JSON syntax") from exc
        return cls.from_dict(data, origin=f"recipe {path}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def recipe_from_steps(*steps: MethodConfig, name: str = "recipe", calibration: CalibrationSettings | None = None) -> Recipe:
    """Convenience constructor for the Python API."""
    return Recipe(steps=list(steps), name=name, calibration=calibration or CalibrationSettings())
