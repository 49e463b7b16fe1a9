"""Search units: what one entry of a candidate sets.

A bits-only space has one unit per searched linear layer, whose levels are the space's widths.
A joint space (``drop: [attention, mlp]``) keeps one unit per linear, and the linears of a
droppable sub-layer get level 0, ``DROP``: the sub-layer removed. They form a *drop group*
(:func:`drop_groups`): the sub-layer is removed when any of them is at ``DROP`` (its other
linears then cost nothing in the saved model), and the search moves the group to and from
``DROP`` together, so its candidates stay consistent (all or none at ``DROP``). With
``shared_width: true`` (and always for ``bits: []``) a sub-layer is one unit instead, its
linears sharing one width. With ``keep: true`` the last level of every unit is ``KEEP``: its
original weights, not quantized. Costs are additive over units (``DROP`` costs nothing), so
the DP (over drop groups as whole items, :func:`~slimformer.search.evolution.dp_allocation`) and
the budget-preserving mutation apply.
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
    ``keep_bits``: bits per weight of the original weights (the cost of ``KEEP``);
    ``sublayer``: the qualified name of the sub-layer module ``DROP`` removes (None if the unit
    cannot be removed)."""

    name: str
    linears: tuple[str, ...]
    levels: tuple[int, ...]
    block: int | None = None
    kind: str | None = None
    keep_bits: int = 32
    sublayer: str | None = None


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
            droppable = kind in space.drop
            levels = ((DROP,) if droppable else ()) + tuple(db.level_bits) + keep
            sublayer = roots[0] if droppable else None
            if space.shared_width or not db.level_bits:
                units.append(Unit(roots[0], linears, levels, i, kind, element_bits(linears[0]), sublayer))
            else:
                units += [Unit(name, (name,), levels, i, kind, element_bits(name), sublayer) for name in linears]
    units += [Unit(u, (u,), tuple(db.level_bits) + keep, keep_bits=element_bits(u)) for u in db.units if u not in claimed]
    if not db.level_bits and any(len(u.levels) < 2 for u in units):
        raise ConfigError("search space: with bits: [] every searched layer must be removable", "add its sub-layer kind to drop: or give bits")
    return units


def drop_groups(units: list[Unit]) -> list[tuple[int, ...]]:
    """The indices of the units that remove one sub-layer together (in unit order), for every
    sub-layer split over several units; a sub-layer that is one unit needs no group."""
    by_sublayer: dict[str, list[int]] = {}
    for i, unit in enumerate(units):
        if unit.sublayer is not None:
            by_sublayer.setdefault(unit.sublayer, []).append(i)
    return [tuple(g) for g in by_sublayer.values() if len(g) > 1]


def removed_sublayers(units: list[Unit], levels: list[int]) -> set[str]:
    """The sub-layer modules a candidate removes: those with any unit at ``DROP`` (a negative
    level, the original weights of a sensitivity probe, removes nothing)."""
    return {u.sublayer for u, level in zip(units, levels) if level >= 0 and u.levels[level] == DROP}


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
