"""Search of per-layer compression levels under a budget (EvoPress), locally or on Ray."""

from slimformer.search.database import LevelDatabase, build_database
from slimformer.search.evolution import dp_allocation, evolve, mutate
from slimformer.search.run import SearchOutcome, search
from slimformer.search.space import Budget, EvolutionSettings, QuantizationLevels, SearchSpace

__all__ = [
    "Budget",
    "EvolutionSettings",
    "LevelDatabase",
    "QuantizationLevels",
    "SearchOutcome",
    "SearchSpace",
    "build_database",
    "dp_allocation",
    "evolve",
    "mutate",
    "search",
]
