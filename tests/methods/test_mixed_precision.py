"""Mixed precision: the allocation is the exact optimum under the budget, and the stored model
really has the widths and the average bits per weight that were allocated."""

import itertools
import random

import pytest

from slimformer.compress import compress
from slimformer.errors import ConfigError
from slimformer.evaluate.cost import quantized_linear_bits
from slimformer.methods import method_from_dict
from slimformer.methods.quantization.mixed_precision import allocate_bits, layer_bits
from slimformer.recipe import Recipe


def _brute_force(costs, sens, budget):
    best = float("inf")
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(costs[i][k] for i, k in enumerate(choice))
        value = sum(sens[i][k] for i, k in enumerate(choice))
        if cost <= budget and value < best:
            best = value
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_the_exact_optimum_within_budget(seed):
    rng = random.Random(seed)
    layers = rng.randint(3, 6)
    costs = [[rng.randint(1, 40) * 8 for _ in range(3)] for _ in range(layers)]
    sens = [[rng.random() for _ in range(3)] for _ in range(layers)]
    budget = int(sum(min(c) for c in costs) + rng.random() * (sum(max(c) for c in costs) - sum(min(c) for c in costs)))
    chosen = allocate_bits(costs, sens, budget)
    assert sum(costs[i][k] for i, k in enumerate(chosen)) <= budget
    assert sum(sens[i][k] for i, k in enumerate(chosen)) == pytest.approx(_brute_force(costs, sens, budget))


def test_coarse_budget_still_fits_and_impossible_budget_is_refused():
    costs = [[1001, 2003, 4007]] * 50
    sens = [[3.0, 2.0, 1.0]] * 50
    budget = 50 * 2500
    chosen = allocate_bits(costs, sens, budget, resolution=100)  # forces rounding costs up
    assert sum(costs[i][k] for i, k in enumerate(chosen)) <= budget
    with pytest.raises(ConfigError, match="budget"):
        allocate_bits(costs, sens, 50 * 1000)


def test_layer_bits_counts_what_is_stored():
    # 4-bit codes of a 64x128 weight: 64 bytes a row; g32 -> 4 groups of bf16 scale + uint8 zero.
    assert layer_bits(64, 128, 4, 32, symmetric=False) == 64 * (8 * 64 + 4 * 24)
    assert layer_bits(64, 128, 3, None, symmetric=True) == 64 * (8 * 48 + 16)


def test_model_meets_the_average_bits_budget_and_spends_it_on_sensitive_layers(tiny_factory, fast_calibration):
    tiny_bert = tiny_factory("bert")
    config = method_from_dict({"method": "mixed-precision", "target_bits": 3.2, "bit_options": [2, 4], "group_size": 32, "quantizer": "rtn", "sensitivity_samples": 8})
    compress(tiny_bert, Recipe(steps=[config], calibration=fast_calibration))
    record = tiny_bert.applied[-1]
    measured = quantized_linear_bits(tiny_bert.model)
    assert measured == pytest.approx(record["achieved_bits"])
    assert measured <= 3.2
    widths = set(record["bits"].values())
    assert widths == {2, 4}, "a budget between the two widths must mix them"
    # The layers kept at 4 bits are those whose 2-bit quantization hurt the output most per bit saved.
    sens = record["sensitivity"]
    gain = {n: sens[n]["2"] - sens[n]["4"] for n in sens}
    kept = [gain[n] for n, b in record["bits"].items() if b == 4]
    dropped = [gain[n] for n, b in record["bits"].items() if b == 2]
    assert sum(kept) / len(kept) > sum(dropped) / len(dropped)
    for name, bits in record["bits"].items():
        assert tiny_bert.model.get_submodule(name).bits == bits
