"""The level database: every searched layer quantized once at every level, kept on disk.

EvoPress (Sieberling et al., 2024) assembles each candidate from per-layer, per-level
compressed weights computed once up front, so that scoring a candidate never recompresses.
Here each layer's levels are computed from the *original* model's calibration inputs (one pass
through depth with :func:`slimformer.methods.calibration.blockwise`, nothing replaced), with
GPTQ (or RTN) at each bit width, and stored in our packed format: one safetensors file per
layer under ``folder/`` holding ``<bits>.<buffer>`` tensors (packed codes, bfloat16 scales,
uint8 zero points) plus ``index.json`` (the space it was built for and each layer's
description). The database of a model with ``W`` weights at levels ``b_1..b_k`` takes about
``W * sum(b_i) / 8`` bytes plus scales: bounded, and reused by every later search with the same
model, space and calibration. Building is resumable: layers whose file exists are not redone.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimformer.errors import ConfigError
from slimformer.jsonfile import write_json
from slimformer.methods.calibration import CompressionContext, blockwise
from slimformer.methods.quantization.gptq import prepare_hessian, quantize_linear_gptq
from slimformer.methods.quantization.quantease import objective_hessian, quantize_linear_quantease, start_hessian
from slimformer.methods.quantization.modules import QuantizedLinear
from slimformer.methods.quantization.rtn import quantize_module_rtn
from slimformer.methods.selection import check_group_size, select_modules
from slimformer.search.space import SearchSpace

INDEX_NAME = "index.json"
DB_VERSION = 1


def _file_name(unit: str) -> str:
    return unit.replace("/", "_") + ".safetensors"


def database_key(source: str, space: SearchSpace) -> str:
    """A fingerprint of what the database depends on: the model, the quantized levels, the
    calibration. The structure levels (``drop``, ``keep``) store nothing here, so a joint space
    reuses the database of its bits-only space (whose fingerprint is unchanged: ``drop: []``)."""
    d = space.to_dict()
    levels = {k: v for k, v in d["space"].items() if k not in ("keep", "shared_width")} | {"drop": []}
    payload = json.dumps({"v": DB_VERSION, "source": source, "space": levels, "calibration": d["calibration"]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class LevelDatabase:
    """Per unit (a linear layer's qualified name) and level (bit width): its quantized layer.

    ``units``: names in model order; ``shapes[unit]``: (out, in); ``level_bits``: the widths
    (level codes when the space has several group sizes, see ``QuantizationLevels.level_codes``).
    ``module(unit, bits)`` rebuilds the packed ``QuantizedLinear``; ``weight(unit, bits)`` its
    dequantized float32 weight (out, in) (read from disk on demand, not cached).
    """

    def __init__(self, folder: Path, index: dict) -> None:
        self.folder = Path(folder)
        self.index = index
        self.units: list[str] = list(index["units"])
        self.shapes: dict[str, tuple[int, int]] = {u: tuple(index["shapes"][u]) for u in self.units}
        self.level_bits: tuple[int, ...] = tuple(index["bits"])
        self.descriptions: dict[str, dict[str, dict]] = index["descriptions"]
        self.errors: dict[str, dict[str, float]] = index.get("errors", {})

    def _tensors(self, unit: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.folder / _file_name(unit)))

    def module(self, unit: str, bits: int) -> QuantizedLinear:
        tensors = self._tensors(unit)
        desc = self.descriptions[unit][str(bits)]
        module = QuantizedLinear.from_description(desc)
        state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{bits}.")}
        if "bias" in tensors:
            state["bias"] = tensors["bias"]
        module.load_state_dict(state, strict=True)
        return module

    def weight(self, unit: str, bits: int) -> torch.Tensor:
        return self.module(unit, bits).dequantized_weight()

    def nbytes(self) -> int:
        if not self.level_bits:  # a structure-only database stores no layers
            return 0
        return sum(os.path.getsize(self.folder / _file_name(u)) for u in self.units)


def _relative_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """``||(W - Q) X||^2 / ||W X||^2`` through the input Hessian (or plain Frobenius without one)."""
    d = (weight.float() - quantized).double()
    if hessian is None:
        return float((d * d).sum() / (weight.double() ** 2).sum().clamp_min(1e-30))
    h = hessian.double()
    num = torch.einsum("oi,ij,oj->", d, h, d)
    den = torch.einsum("oi,ij,oj->", weight.double(), h, weight.double())
    return float(num / den.clamp_min(1e-30))


def build_database(loaded, space: SearchSpace, folder: str | os.PathLike, ctx: CompressionContext | None = None, progress: bool = False) -> LevelDatabase:
    """Quantize every selected layer of ``loaded`` (left unchanged) at every level into ``folder``.

    Reuses a complete database built for the same model, levels and calibration; finishes an
    interrupted one. Raises ``ConfigError`` when ``folder`` holds a database for something else.
    """
    folder = Path(folder)
    key = database_key(str(loaded.source), space)
    index_path = folder / INDEX_NAME
    old: dict = {}
    if index_path.is_file():
        old = json.loads(index_path.read_text())
        if old.get("key") != key:
            raise ConfigError(f"{folder} holds a level database for another model, space or calibration", "use another --out folder or delete that database")
        if old.get("complete"):
            return LevelDatabase(folder, old)
    lv = space.levels
    modules = select_modules(loaded, lv, types=(nn.Linear,))
    for group in lv.group_sizes:
        check_group_size("search space", modules, group)
    folder.mkdir(parents=True, exist_ok=True)
    units = list(modules)
    index = {"key": key, "version": DB_VERSION, "complete": False, "units": units, "bits": list(lv.level_codes),
             "shapes": {u: list(modules[u].weight.shape) for u in units}, "descriptions": {}, "errors": {}}
    ctx = ctx or CompressionContext(space.calibration, progress=progress)

    def store(name: str, module: nn.Linear, hessian: torch.Tensor | None) -> None:
        tensors: dict[str, torch.Tensor] = {}
        index["descriptions"][name], index["errors"][name] = {}, {}
        # one inverse-Hessian factor (and QuantEase objective) per layer, shared by all its levels
        prepared = objective = None
        if lv.quantizer == "gptq":
            prepared = prepare_hessian(hessian, act_order=True, damp=lv.damp)
        elif lv.quantizer == "quantease":
            prepared, objective = start_hessian(hessian, lv.damp), objective_hessian(hessian, lv.damp)
        for bits in lv.level_codes:  # a width, or a (width, group size) level code
            width, group = lv.width(bits), lv.group(bits)
            if lv.quantizer == "gptq":
                q = quantize_linear_gptq(module, prepared, width, group, lv.symmetric, damp=lv.damp, clip_search=lv.clip_search)
            elif lv.quantizer == "quantease":
                q = quantize_linear_quantease(module, hessian, width, group, lv.symmetric, lv.passes, lv.damp, lv.clip_search,
                                              prepared=prepared, objective=objective)
            else:
                q = quantize_module_rtn(module, width, group, lv.symmetric)
            for k, v in q.state_dict().items():
                if k == "bias":
                    tensors["bias"] = v.contiguous()
                else:
                    tensors[f"{bits}.{k}"] = v.contiguous()
            index["descriptions"][name][str(bits)] = q.describe()
            index["errors"][name][str(bits)] = _relative_error(module.weight.detach(), q.dequantized_weight(), hessian)
        tmp = folder / (_file_name(name) + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, folder / _file_name(name))

    done = {u for u in units if (folder / _file_name(u)).is_file()}
    for u in done:  # finished layers of an interrupted build: keep their records
        if u in old.get("descriptions", {}):
            index["descriptions"][u], index["errors"][u] = old["descriptions"][u], old["errors"].get(u, {})
    # a pure structure search (no widths) has nothing to quantize and needs no calibration pass
    todo = {u: m for u, m in modules.items() if lv.bits and (u not in done or u not in index["descriptions"])}
    if todo:
        if lv.quantizer in ("gptq", "quantease"):
            for name, module, stats in blockwise(loaded, ctx, todo, hessian=True, desc="level database"):
                store(name, module, stats.hessian[name] / stats.count[name])
                write_json(index_path, index)
        else:
            for name, module in todo.items():
                store(name, module, None)
    index["complete"] = True
    write_json(index_path, index)
    return LevelDatabase(folder, index)
