"""What a search may choose, and what it must fit in.

A *search space* (``SearchSpace``) is read from a YAML/JSON file::

    slimformer_search: 1
    name: smollm2-bits
    calibration: {source: mixed, n_samples: 32, max_length: 256}
    space: {quantizer: gptq, bits: [2, 3, 4, 8], group_size: 64, symmetric: false}
    search: {generations: 100, offspring: 16, stages: [[4, 1], [2, 2], [1, 4]], seed: 0}

Every selected linear layer is one *unit*; its *levels* are the bit widths in ``space.bits``
(index 0 = fewest bits). With ``drop: [attention, mlp]`` the space is joint: every linear of a
droppable sub-layer keeps its own width and gets one more level below the fewest bits, the
sub-layer removed, which its linears take together (a sub-layer is removed when any of its
linears is at that level; it then costs nothing). With ``shared_width: true`` the joint space is
coarser: each attention and each MLP sub-layer is one unit whose linears share one width. With ``keep: true`` every
unit has one more level above the most bits: its original weights, not quantized (costed at
their element size, 32 bits for float32). ``bits: []`` with ``keep: true`` and ``drop`` is a
pure structure search: which sub-layers to remove, the rest left as they are.

A *budget* (``Budget``) bounds the summed cost of the chosen levels:
``bits`` = average bits of the integer codes per weight over the units (the group scales and
zero points are the same at every level and are reported separately), ``bytes`` = stored
bytes of the units including their scales and zero points, or ``params`` = the fraction of the
units' weights kept (removed sub-layers count nothing, every other level its weights).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.search.nsga2 import ParetoSettings
from slimformer.methods import CalibrationSettings
from slimformer.methods.base import ModuleSelection, method_from_dict
from slimformer.methods.quantization import grid

SPACE_VERSION = 1
BUDGET_KINDS = ("bits", "bytes", "params")
_TOP_KEYS = ("slimformer_search", "name", "description", "calibration", "space", "search", "pareto", "tune")
SCALE_BITS = 16  # bfloat16 scale per group, as stored
ZERO_BITS = 8  # uint8 zero point per group (asymmetric grids)
LEVEL_GROUP_STEP = 16  # level code = width + LEVEL_GROUP_STEP * (index of its group size)
MAX_GROUP_SIZES = 4
QUANTIZERS = ("gptq", "rtn", "quantease")


def _closest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


@dataclass
class QuantizationLevels(ModuleSelection):
    """Per-layer quantization levels: ``bits`` (the widths a layer may get), the grid
    (``group_size``, ``symmetric``; ``group_size`` may list several sizes, e.g. ``[64, 192]``:
    then every (width, group size) pair is a level, so that a layer may buy fewer scales with
    coarser groups and spend the bytes on more bits elsewhere; such spaces are searched under a
    ``bytes`` budget, which counts the scales), the ``quantizer`` that fills the level database
    (``gptq``: second-order compensation on the original model's calibration inputs; ``rtn``;
    ``quantease``: GPTQ's solution refined by ``passes`` sweeps of QuantEase's coordinate descent
    on the same inputs, group scales refitted, ``damp`` also its objective's ridge), GPTQ's
    ``damp`` and ``clip_search`` (each group's range shrunk to the clipping that minimises
    its Hessian-weighted rounding error before GPTQ runs; helps most at 2-3 bits), the sub-layers
    that may be removed (``drop``), whether the linears of a droppable sub-layer share one width
    (``shared_width``; default: each its own), and whether a layer may keep its original weights
    (``keep``)."""

    name = "search space"
    bits: tuple[int, ...] = (2, 3, 4, 8)
    group_size: int | None | tuple[int, ...] = 64
    symmetric: bool = False
    quantizer: str = "gptq"
    damp: float = 0.01
    clip_search: bool = False
    passes: int = 4
    drop: tuple[str, ...] = ()
    shared_width: bool = False
    keep: bool = False

    def __post_init__(self) -> None:
        self._validate_selection(allowed=("linear", "head"))
        if isinstance(self.drop, str):
            self.drop = (self.drop,)
        if not isinstance(self.drop, (list, tuple)) or any(d not in ("attention", "mlp") for d in self.drop):
            raise ConfigError(f"search space: drop={self.drop!r} must list sub-layers to consider removing", "write e.g. drop: [attention, mlp] (or leave it out)")
        self.drop = tuple(dict.fromkeys(self.drop))
        if not isinstance(self.shared_width, bool):
            raise ConfigError(f"search space: shared_width={self.shared_width!r} must be true or false", "write shared_width: true for one width per sub-layer (leave it out for one per linear)")
        if not isinstance(self.keep, bool):
            raise ConfigError(f"search space: keep={self.keep!r} must be true or false", "write keep: true to let layers keep their original weights")
        if isinstance(self.bits, int) or self.bits is None or (not self.bits and not (self.keep and self.drop)):
            raise ConfigError(f"search space: bits={self.bits!r} must be a non-empty list", "write e.g. bits: [2, 3, 4, 8] (bits: [] only with keep: true and drop: [...], a pure structure search)")
        bad = [b for b in self.bits if isinstance(b, bool) or b not in grid.PACKED_BITS]
        if bad:
            raise ConfigError(f"search space: bit width {bad[0]!r} is not supported", f"use widths from {list(grid.PACKED_BITS)}")
        self.bits = tuple(sorted(set(self.bits)))
        if isinstance(self.group_size, (list, tuple)):
            sizes = tuple(dict.fromkeys(self.group_size))
            if not sizes or len(sizes) > MAX_GROUP_SIZES or not all(is_int_at_least(g, 1) for g in sizes):
                raise ConfigError(f"search space: group_size={list(self.group_size)!r} must list 1 to {MAX_GROUP_SIZES} positive integers",
                                  "write e.g. group_size: [64, 192] (or one size: group_size: 64)")
            self.group_size = sizes[0] if len(sizes) == 1 else sizes  # one size: the same space (and fingerprint) as a plain size
        elif self.group_size is not None and not is_int_at_least(self.group_size, 1):
            raise ConfigError(f"search space: group_size={self.group_size!r} must be a positive integer or null", "write e.g. group_size: 64")
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"search space: quantizer={self.quantizer!r} is not supported", f"use quantizer: {', '.join(QUANTIZERS)}")
        if not is_int_at_least(self.passes, 0):
            raise ConfigError(f"search space: passes={self.passes!r} must be an integer >= 0", "write e.g. passes: 4 (QuantEase sweeps)")
        if not 0 < self.damp < 1:
            raise ConfigError(f"search space: damp={self.damp!r} must be in (0, 1)", "use e.g. damp: 0.01")
        if not isinstance(self.clip_search, bool):
            raise ConfigError(f"search space: clip_search={self.clip_search!r} must be true or false", "write clip_search: true to search each group's clipping range")
        if self.clip_search and self.quantizer == "rtn":
            raise ConfigError("search space: clip_search is a GPTQ option", "use quantizer: gptq (or quantease) with clip_search: true, or leave clip_search out")

    # ----- levels: one per width, or per (width, group size) -------------------------------------
    # A level is named by an integer *code*: the width itself when the space has one group size
    # (so single-size databases, journals and recipes are what they always were), else
    # ``width + LEVEL_GROUP_STEP * k`` for the k-th group size (widths are at most 8, and
    # ``units.KEEP`` = 32 is never a code since widths are at least 2).

    @property
    def group_sizes(self) -> tuple[int | None, ...]:
        return self.group_size if isinstance(self.group_size, tuple) else (self.group_size,)

    @property
    def mixed_group_sizes(self) -> bool:
        """Levels differ in group size (and so in scales): codes are not widths."""
        return len(self.group_sizes) > 1

    @property
    def level_codes(self) -> tuple[int, ...]:
        """The level codes in order of stored bits per weight (the mutation moves a unit one level
        up or down and expects its cost to rise or fall)."""
        if not self.mixed_group_sizes:
            return self.bits
        per_group = SCALE_BITS + (0 if self.symmetric else ZERO_BITS)
        codes = [b + LEVEL_GROUP_STEP * k for k in range(len(self.group_sizes)) for b in self.bits]
        return tuple(sorted(codes, key=lambda c: (self.width(c) + per_group / self.group(c), c)))

    def width(self, code: int) -> int:
        """The bit width of level ``code``."""
        return code % LEVEL_GROUP_STEP

    def group(self, code: int) -> int | None:
        """The group size of level ``code``."""
        return self.group_sizes[code // LEVEL_GROUP_STEP]

    def level_name(self, code: int) -> str:
        """``3-bit``, or ``3-bit g192`` when the space has several group sizes."""
        return f"{self.width(code)}-bit" + (f" g{self.group(code)}" if self.mixed_group_sizes else "")

    def overhead_bits(self, rows: int, cols: int, code: int | None = None) -> int:
        """Bits of the group scales and zero points of a (rows, cols) layer at level ``code`` (the
        same at every level when the space has one group size)."""
        per_group = SCALE_BITS + (0 if self.symmetric else ZERO_BITS)
        group = self.group_sizes[0] if code is None else self.group(code)
        return rows * grid.num_groups(cols, group) * per_group

    def stored_bits(self, rows: int, cols: int, bits: int) -> int:
        """Stored bits of a (rows, cols) layer at level ``bits`` (a width, or a level code):
        packed codes (whole bytes per row) + overhead."""
        return rows * 8 * grid.packed_row_bytes(cols, self.width(bits)) + self.overhead_bits(rows, cols, bits)


FITNESSES = ("kl", "nll", "log-kl")
SCORING_DTYPES = ("float32", "bfloat16")


@dataclass
class EvolutionSettings:
    """EvoPress's (1 + lambda) evolution: ``generations``; ``offspring`` (lambda) per generation;
    ``stages``: multi-step selection as ``[[keep, batches], ...]``: all offspring are scored on
    the first stage's number of calibration batches, the best ``keep`` go on to the next stage's
    (more) batches, and so on; the parent is re-scored at every stage on the same tokens;
    ``max_switches``: level switches per mutation (1..max, uniformly); ``seed``;
    ``dtype``: what candidates are scored in (``float32``, or ``bfloat16``: the searched weights
    and activations in bf16 against the float32 original's outputs, several times faster where
    the CPU has bf16 matrix units; the held-out check of the result stays float32);
    ``fitness``: ``kl`` (EvoPress's: KL to the original's next-token distributions, or 1 - cosine
    for encoders) or ``nll`` (causal LMs: the candidate's mean negative log-likelihood of the
    calibration text's next tokens, the perplexity criterion of SLEB and BlockPruner) or
    ``log-kl`` (ours: the mean over documents of the log of each document's KL, so that every
    document's relative change counts alike and the worst-predicted kind of text does not rule
    the search; the DP's sensitivities stay plain KL, which adds; see
    :mod:`slimformer.search.fitness`)."""

    generations: int = 50
    offspring: int = 16
    stages: tuple[tuple[int, int], ...] = ((4, 1), (2, 2), (1, 4))
    max_switches: int = 3
    seed: int = 0
    dtype: str = "float32"
    fitness: str = "kl"

    def __post_init__(self) -> None:
        if not is_int_at_least(self.generations, 0):
            raise ConfigError(f"search: generations={self.generations!r} must be an integer >= 0", "write e.g. generations: 50")
        for name in ("offspring", "max_switches"):
            if not is_int_at_least(getattr(self, name), 1):
                raise ConfigError(f"search: {name}={getattr(self, name)!r} must be a positive integer", f"write e.g. {name}: 8")
        try:
            stages = tuple((int(k), int(b)) for k, b in self.stages)
        except (TypeError, ValueError):
            raise ConfigError(f"search: stages={self.stages!r} must be a list of [keep, batches] pairs", "write e.g. stages: [[4, 1], [1, 4]]") from None
        if not stages or any(k < 1 or b < 1 for k, b in stages):
            raise ConfigError(f"search: stages={self.stages!r} needs positive [keep, batches] pairs", "write e.g. stages: [[4, 1], [1, 4]]")
        if any(b2 < b1 or k2 > k1 for (k1, b1), (k2, b2) in zip(stages, stages[1:])):
            raise ConfigError("search: each stage must keep no more candidates on no fewer batches than the one before", "write e.g. stages: [[4, 1], [2, 2], [1, 4]]")
        if stages[-1][0] != 1:
            raise ConfigError("search: the last stage must keep 1 candidate", "end stages with [1, batches]")
        self.stages = stages
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"search: seed={self.seed!r} must be an integer", "write e.g. seed: 0")
        if self.dtype not in SCORING_DTYPES:
            raise ConfigError(f"search: dtype={self.dtype!r} is not a scoring dtype", f"write one of {list(SCORING_DTYPES)}, e.g. dtype: bfloat16")
        if self.fitness not in FITNESSES:
            raise ConfigError(f"search: fitness={self.fitness!r} is unknown", f"write one of {list(FITNESSES)}, e.g. fitness: kl")


@dataclass
class SearchSpace:
    """A whole search: the levels, the calibration text, the evolution settings."""

    levels: QuantizationLevels = field(default_factory=QuantizationLevels)
    evolution: EvolutionSettings = field(default_factory=EvolutionSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    name: str = "search"
    description: str = ""
    pareto: ParetoSettings = field(default_factory=ParetoSettings)
    # settings of a scale-tuning step (methods/quantization/scale_tuning.py) applied to each
    # budget's DP allocation and searched model after the search; None: no tuning
    tune: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.tune is not None:
            self.tune = tuning_step(self.tune).to_dict()

    def _search_dict(self) -> dict[str, Any]:
        d = {**dataclasses.asdict(self.evolution), "stages": [list(s) for s in self.evolution.stages]}
        if d["fitness"] == "kl":
            del d["fitness"]  # the default: fingerprints of searches from before the option unchanged
        return d

    def to_dict(self) -> dict[str, Any]:
        lv = dataclasses.asdict(self.levels)
        if not lv["keep"]:
            del lv["keep"]  # a space without the keep level has the same fingerprint as before it existed
        if not lv["clip_search"]:
            del lv["clip_search"]  # likewise: databases built before the option keep their fingerprint
        if lv["quantizer"] != "quantease":
            del lv["passes"]  # QuantEase's sweeps: nothing for the other quantizers (their fingerprints unchanged)
        if not lv["drop"]:
            del lv["shared_width"]  # nothing to share without droppable sub-layers: bits-only fingerprints unchanged
        return {
            "slimformer_search": SPACE_VERSION,
            "name": self.name,
            "description": self.description,
            "calibration": dataclasses.asdict(self.calibration),
            "space": {k: list(v) if isinstance(v, tuple) else v for k, v in lv.items()},
            "search": self._search_dict(),
            "pareto": dataclasses.asdict(self.pareto),
            **({"tune": dict(self.tune)} if self.tune is not None else {}),  # absent: fingerprints of untuned searches unchanged
        }

    @classmethod
    def from_dict(cls, data: Any, origin: str = "search space") -> "SearchSpace":
        if not isinstance(data, dict):
            raise ConfigError(f"{origin} is not a mapping", "write it as a YAML/JSON mapping with 'slimformer_search' and 'space'")
        if data.get("slimformer_search") != SPACE_VERSION:
            raise ConfigError(f"{origin} has no 'slimformer_search: {SPACE_VERSION}' version key", f"add 'slimformer_search: {SPACE_VERSION}' at the top")
        for key in data:
            if key not in _TOP_KEYS:
                raise ConfigError(f"{origin}: unknown key {key!r}{_closest(key, _TOP_KEYS)}", f"use only {list(_TOP_KEYS)}")
        parts = {}
        for key, klass in (("space", QuantizationLevels), ("search", EvolutionSettings), ("calibration", CalibrationSettings), ("pareto", ParetoSettings)):
            section = data.get(key) or {}
            if not isinstance(section, dict):
                raise ConfigError(f"{origin}: '{key}' must be a mapping", f"write e.g. {key}: {{...}}")
            names = [f.name for f in dataclasses.fields(klass)]
            for k in section:
                if k not in names:
                    raise ConfigError(f"{origin}: unknown {key} setting {k!r}{_closest(k, names)}", f"use only {names}")
            try:
                parts[key] = klass(**section)
            except TypeError as e:
                raise ConfigError(f"{origin}: bad {key} settings ({e})", f"use only {names}") from None
        tune = data.get("tune")
        if tune is not None and not isinstance(tune, dict):
            raise ConfigError(f"{origin}: 'tune' must be a mapping of scale-tuning settings", "write e.g. tune: {steps: 100}")
        return cls(parts["space"], parts["search"], parts["calibration"], name=str(data.get("name", "search")), description=str(data.get("description", "")),
                   pareto=parts["pareto"], tune=tune)

    @classmethod
    def from_file(cls, path: str | Path) -> "SearchSpace":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"search space file {p} does not exist", "pass an existing .yaml or .json file to --space")
        try:
            text = p.read_text(encoding="utf-8")
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"search space file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({str(e).splitlines()[0]})", "fix the syntax") from None
        return cls.from_dict(data, origin=str(p))


def tuning_step(settings: dict[str, Any]):
    """The scale-tuning step of a space's ``tune`` settings (validated; ``method`` may be left out)."""
    step = {"method": "scale-tuning", **settings}
    if step["method"] != "scale-tuning":
        raise ConfigError(f"search space: tune is for scale-tuning, not {step['method']!r}", "leave method out of tune, or write method: scale-tuning")
    return method_from_dict(step)


@dataclass(frozen=True)
class Budget:
    """An upper bound on the chosen levels' cost: ``kind`` ``bits`` (average code bits per
    weight) or ``bytes`` (stored bytes of the searched layers, scales and zero points included)."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ConfigError(f"unknown budget {self.kind!r}{_closest(self.kind, BUDGET_KINDS)}", f"use one of {list(BUDGET_KINDS)}, e.g. --budget bits=3.0")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value) or self.value <= 0:
            raise ConfigError(f"budget {self.kind}={self.value!r} must be a positive number", "write e.g. --budget bits=3.0")
        if self.kind == "params" and self.value > 1:
            raise ConfigError(f"budget params={self.value!r} is the fraction of the weights kept and must be at most 1", "write e.g. --budget params=0.75 (25% removed)")

    @classmethod
    def parse(cls, text: str) -> "Budget":
        kind, sep, value = text.partition("=")
        if not sep:
            raise ConfigError(f"budget {text!r} is not KIND=VALUE", "write e.g. --budget bits=3.0 or --budget bytes=40e6")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"budget value {value!r} is not a number", "write e.g. --budget bits=3.0") from None
        return cls(kind.strip(), number)

    @property
    def label(self) -> str:
        return f"{self.kind}={self.value:g}"


def unit_costs(shapes: list[tuple[int, int]], levels: QuantizationLevels, budget: Budget) -> tuple[list[list[int]], int]:
    """Integer cost of each unit at each level, and the budget, in the same units.

    ``bits``: code bits (rows * cols * b); the budget is ``value * total weights``.
    ``bytes``: stored bits (packed codes + scales + zero points); the budget is ``8 * value``.
    ``params``: weights (rows * cols at every width); the budget is ``value * total weights``.
    """
    codes = levels.level_codes
    if budget.kind == "bits" and levels.mixed_group_sizes:
        raise ConfigError(f"budget {budget.label} counts code bits only, and this space's levels differ in group size (their scales)",
                          "use a bytes budget, e.g. --budget bytes=<the stored bytes of the uniform setting to match>")
    if budget.kind == "params":
        return [[r * c for _ in codes] for r, c in shapes], int(math.floor(budget.value * sum(r * c for r, c in shapes) + 1e-9))
    if budget.kind == "bits":
        costs = [[r * c * levels.width(b) for b in codes] for r, c in shapes]
        return costs, int(math.floor(budget.value * sum(r * c for r, c in shapes) + 1e-9))
    costs = [[levels.stored_bits(r, c, b) for b in codes] for r, c in shapes]
    return costs, int(math.floor(8 * budget.value))
