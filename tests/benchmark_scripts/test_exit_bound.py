"""The early-exit bound of benchmarks/exit_bound.py: never above the true optimum, and attained."""

import itertools

import pytest
import torch


@pytest.fixture(scope="module")
def eb(load_benchmark):
    return load_benchmark("exit_bound")


@pytest.mark.parametrize("seed,floor", [(0, 0.9), (1, 0.8), (2, 0.95), (3, 0.7)])
def test_the_bound_lies_below_every_assignment_meeting_the_floor_and_the_found_one_meets_it(eb, seed, floor):
    g = torch.Generator().manual_seed(seed)
    n, exits = 6, 4
    cos = torch.cat([torch.rand(n, exits - 1, generator=g).sort(1).values, torch.ones(n, 1)], 1)
    result = eb.oracle(cos, floor)
    optimum = min(sum(k + 1 for k in pick) / n for pick in itertools.product(range(exits), repeat=n)
                  if sum(float(cos[i, k]) for i, k in enumerate(pick)) / n >= floor)
    assert result["blocks_lower"] <= optimum + 1e-9  # a bound: no assignment does better
    assert result["blocks"] >= optimum - 1e-9 and result["cos"] >= floor  # an assignment that exists
    assert result["speedup_bound"] == pytest.approx(exits / result["blocks_lower"])
