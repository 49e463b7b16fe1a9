"""Benchmark scripts are not a package: tests load them as modules by file name."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def _load(name: str, module_name: str | None = None):
    """``benchmarks/<name>.py`` imported as a module (registered as ``module_name``, default ``name``)."""
    module_name = module_name or name
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_benchmark():
    """A function: ``load_benchmark("exit_bound")`` -> the module of ``benchmarks/exit_bound.py``."""
    return _load
