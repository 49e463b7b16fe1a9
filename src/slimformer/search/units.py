"""Search units: what one entry of a candidate sets.

A bits-only space has one unit per searched linear layer, whose levels are the space's widths.
A joint space (``drop: [attention, mlp]``) has one unit per attention and per MLP sub-layer of
each block: its linears share one width, and level 0 is ``DROP``, the sub-layer removed. With
``keep: true`` the last level of every unit is ``KEEP``: its original weights, not quantized.
Costs are additive over units, so the DP and the budget-preserving mutation apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimformer.errors import ConfigError
from slimformer.search.space import Budget, QuantizationLevels, unit_costs

DROP = 0  # the "width" of a removed sub-layer
KEEP = 32  # the "width" of a layer that keeps its original weights (costed at their element bits)


@dataclass(frozen=True)
class Unit:
    """``name``: a linear's or a sub-layer's qualified name; ``linears``: the database units it
    sets; ``levels``: the width of each level (``DROP`` = removed); ``block``/``kind``: the
    block index and ``"attention"``/``"mlp"`` of a droppable sub-layer (else None);
    ``keep_bits``: bits per weight of the original weights (the cost of ``KEEP``)."""

    name: str
    linears: tuple[str, ...]
    levels: tuple[int, ...]
    block: int | None = None
    kind: str | None = None
    keep_bits: int = 32


def build_units(loaded, db, space: QuantizationLevels) -> list[Unit]:
    """The units of ``space`` over the database's linears, in model order."""
    keep = (KEEP,) if space.keep else ()

    def element_bits(name: str) -> int:
        return loaded.model.get_submodule(name).weight.element_size() * 8

    if not space.drop:
        return [Unit(u, (u,), tuple(db.level_bits) + keep, keep_bits=element_bits(u)) for u in db.units]
    adapter = loaded.adapter
    if adapter.spec.family == "bert":
        raise ConfigError("search space: dropping sub-layers is searched on pre-norm decoders (Llama, Qwen2, GPT-2)", "leave out drop: for encoders")
    names = adapter.qualified_names()
    units: list[Unit] = []
    claimed: set[str] = set()
    for i in range(adapter.num_layers()):
        for kind in ("attention", "mlp"):
            roots = [names[id(adapter.attention(i))]] if kind == "attention" else [names[id(m)] for m in adapter.mlp(i)]
            linears = tuple(u for u in db.units if any(u.startswith(r + ".") for r in roots))
            if not linears:
                continue
            claimed.update(linears)
            levels = ((DROP,) if kind in space.drop else ()) + tuple(db.level_bits) + keep
            units.append(Unit(roots[0], linears, levels, i, kind, element_bits(linears[0])))
    units += [Unit(u, (u,), tuple(db.level_bits) + keep, keep_bits=element_bits(u)) for u in db.units if u not in claimed]
    if not db.level_bits and any(len(u.levels) < 2 for u in units):
        raise ConfigError("search space: with bits: [] every searched layer must be removable", "add its sub-layer kind to drop: or give bits")
    return units


def costs_of(units: list[Unit], db, space: QuantizationLevels, budget: Budget) -> tuple[list[list[int]], int]:
    """Integer cost of every unit at every level and the budget (see :func:`space.unit_costs`);
    a removed sub-layer costs nothing, and ``bits`` budgets count its weights in the total; a
    kept original layer costs its weights at ``keep_bits`` (``bits``, ``bytes``) or its weights
    (``params``)."""
    shapes = [db.shapes[u] for u in db.units]
    per_linear, limit = unit_costs(shapes, space, budget)
    index = {u: i for i, u in enumerate(db.units)}
    pos = {b: k for k, b in enumerate(db.level_bits)}

    def kept(unit: Unit, name: str) -> int:
        rows, cols = db.shapes[name]
        return rows * cols * (1 if budget.kind == "params" else unit.keep_bits)

    costs = []
    for unit in units:
        costs.append([0 if bits == DROP else sum(kept(unit, l) if bits == KEEP else per_linear[index[l]][pos[bits]] for l in unit.linears)
                      for bits in unit.levels])
    return costs, limit


def levels_for(units: list[Unit], removed: set[tuple[int, str]] = frozenset(), bits: dict[str, int] | None = None) -> list[int]:
    """A candidate in level indices: the (block, kind) sub-layers in ``removed`` at ``DROP``,
    linears named in ``bits`` at that width (a unit takes its first linear's), every other unit
    at its highest level (``KEEP`` where the space has it)."""
    out = []
    for unit in units:
        if (unit.block, unit.kind) in removed:
            if DROP not in unit.levels:
                raise ConfigError(f"{unit.name} cannot be removed in this search space", "add its kind to drop:")
            out.append(unit.levels.index(DROP))
        elif bits and unit.linears[0] in bits:
            out.append(unit.levels.index(bits[unit.linears[0]]))
        else:
            out.append(len(unit.levels) - 1)
    return out
