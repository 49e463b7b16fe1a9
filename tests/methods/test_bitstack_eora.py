"""BitStack: residual blocks lower the error one after another, and the kept size is the longest
prefix of the block order that fits the target. EoRA: the eigenspace low-rank compensation
lowers the layer output error below both the compressed layer and a plain SVD of the error;
both survive save/load bit for bit."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import model_output, sample_batch
from torch import nn

from slimformer.compress import compress
from slimformer.errors import ConfigError
from slimformer.evaluate.cost import quantized_linear_bits, storage_bytes
from slimformer.io import load_compressed, save_compressed
from slimformer.io.serialization import quantized_modules
from slimformer.methods import method_from_dict
from slimformer.methods.quantization.bitstack import BitStackLinear, decompose, truncate
from slimformer.methods.quantization.eora import LowRankCompensated, eora_factors, plain_svd_factors
from slimformer.methods.quantization.rtn import quantize_module_rtn
from slimformer.recipe import Recipe


def _correlated_inputs(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    return (torch.randn(n, d, generator=g) @ mix) * torch.linspace(0.2, 3.0, d)


def _compress(loaded, steps, calibration):
    return compress(loaded, Recipe(steps=[method_from_dict(s) for s in steps], calibration=calibration))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ----- BitStack ---------------------------------------------------------------------------------


def test_bitstack_blocks_lower_the_weight_error_one_after_another():
    torch.manual_seed(0)
    W = torch.randn(48, 96)
    scale = torch.linspace(0.5, 2.0, 96).to(torch.bfloat16).float()
    signs, u, v = decompose(W, scale, num_blocks=6, rank=3)
    assert signs.shape == (6, 48, 96) and u.shape == (6, 48, 3) and v.shape == (6, 96, 3)
    approx = torch.zeros_like(W)
    errors = [W.norm().item()]
    for k in range(6):
        approx += torch.where(signs[k], 1.0, -1.0) * (u[k].float() @ v[k].float().t()) / scale
        errors.append((W - approx).norm().item())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.35 * errors[0]


@pytest.fixture(scope="module")
def bitstack_llama(_tiny_models, fast_calibration):
    loaded = copy.deepcopy(_tiny_models["llama"])
    reference = model_output(loaded, sample_batch(loaded))
    _compress(loaded, [{"method": "bitstack", "num_blocks": 5, "rank": 2}], fast_calibration)
    return loaded, reference


def _bitstack_layers(loaded):
    return {n: m for n, m in loaded.model.named_modules() if isinstance(m, BitStackLinear)}


def test_bitstack_model_error_falls_as_blocks_are_added(bitstack_llama):
    full, reference = bitstack_llama
    batch = sample_batch(full)
    errors = []
    for n in range(1, 6):
        model = copy.deepcopy(full)
        for m in _bitstack_layers(model).values():
            m.keep_blocks(n)
        errors.append(_rel(model_output(model, batch), reference))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    record = full.applied[-1]["relative_output_errors"]
    assert all(all(b < a for a, b in zip(e, e[1:])) for e in record.values())


def test_bitstack_kernel_rebuilds_the_weight_from_the_packed_form(bitstack_llama):
    full, _ = bitstack_llama
    name, m = next(iter(_bitstack_layers(full).items()))
    assert m.kernel == "bitstack-unpack" and m.runtime_nbytes() == 0
    assert m.signs.dtype == torch.uint8 and m.signs.shape == (5, m.out_features, -(-m.in_features // 8))
    x = torch.randn(3, m.in_features)
    assert torch.allclose(m(x), x @ m.dequantized_weight().t(), atol=1e-5)
    m2 = copy.deepcopy(m)
    m2.signs.zero_()  # every sign -1: the output must change, so forward reads the packed signs
    assert not torch.allclose(m2(x), m(x))
    assert m.stored_bits() == 8 * (m.signs.numel() + 2 * m.u.numel() + 2 * m.v.numel() + 2 * m.scale.numel() + 4 * m.order.numel())


@pytest.mark.parametrize("target_bits", [3.3, 5.0, 7.5])
def test_bitstack_keeps_the_longest_prefix_that_fits_target_bits(bitstack_llama, target_bits):
    full, _ = bitstack_llama
    order = sorted((int(m.order[k]), n, k, m.block_bits()) for n, m in _bitstack_layers(full).items() for k in range(m.num_blocks))
    assert [k for _, _, k, _ in order[: len(_bitstack_layers(full))]] == [0] * len(_bitstack_layers(full)), "first blocks first"
    model = copy.deepcopy(full)
    summary = truncate(model, target_bits=target_bits)
    layers = _bitstack_layers(model)
    weights = sum(m.in_features * m.out_features for m in layers.values())
    used = sum(m.stored_bits() for m in layers.values())
    assert used <= target_bits * weights
    assert summary["bits_per_weight"] == pytest.approx(used / weights)
    kept = {(n, k) for n, m in layers.items() for k in range(m.num_blocks)}
    dropped = [(n, k, bits) for _, n, k, bits in order if (n, k) not in kept]
    assert [(n, k) for _, n, k, _ in order[: len(kept)]] == sorted(kept, key=lambda e: int(full.model.get_submodule(e[0]).order[e[1]])), "a prefix of the order"
    if dropped:
        assert used + dropped[0][2] > target_bits * weights, "the next block would have fitted"
        assert target_bits * weights - used < max(b for *_, b in order)


def test_bitstack_target_bits_through_the_recipe_matches_truncation(_tiny_models, bitstack_llama, fast_calibration):
    full, _ = bitstack_llama
    direct = copy.deepcopy(_tiny_models["llama"])
    _compress(direct, [{"method": "bitstack", "num_blocks": 5, "rank": 2, "target_bits": 4.0}], fast_calibration)
    truncated = copy.deepcopy(full)
    truncate(truncated, target_bits=4.0)
    assert {n: m.num_blocks for n, m in _bitstack_layers(direct).items()} == {n: m.num_blocks for n, m in _bitstack_layers(truncated).items()}
    assert quantized_linear_bits(direct.model) <= 4.0


def test_bitstack_target_megabytes_bounds_the_saved_file(bitstack_llama, tmp_path):
    full, _ = bitstack_llama
    model = copy.deepcopy(full)
    target = (storage_bytes(full.model) - 20_000) / 1e6
    truncate(model, target_megabytes=target)
    folder = save_compressed(model, tmp_path / "mb")
    size = (folder / "model.safetensors").stat().st_size
    assert size <= target * 1e6
    assert size > target * 1e6 - max(m.block_bits() for m in _bitstack_layers(full).values()) / 8 - 512
    with pytest.raises(ConfigError, match="smallest stack"):
        truncate(copy.deepcopy(full), target_megabytes=0.01)


def test_bitstack_save_load_is_bit_exact_and_keeps_the_order(bitstack_llama, tmp_path):
    full, _ = bitstack_llama
    model = copy.deepcopy(full)
    truncate(model, target_bits=5.0)
    batch = sample_batch(model)
    again = load_compressed(save_compressed(model, tmp_path / "bs"))
    assert torch.equal(model_output(again, batch), model_output(model, batch))
    truncate(again, target_bits=3.5)
    truncate(model, target_bits=3.5)
    assert torch.equal(model_output(again, batch), model_output(model, batch))


# ----- EoRA -------------------------------------------------------------------------------------


def test_eora_lowers_the_output_error_below_rtn_and_plain_svd():
    torch.manual_seed(0)
    X = _correlated_inputs()
    linear = nn.Linear(128, 64)
    W = linear.weight.detach().clone()
    rtn = quantize_module_rtn(linear, 3, 32, False)
    delta = W - rtn.dequantized_weight()
    H = X.t() @ X / X.shape[0]
    reference = linear(X)
    with torch.no_grad():
        err_rtn = (rtn(X) - reference).pow(2).sum()
        for rank in (4, 16):
            A, B = eora_factors(delta, H, rank)
            A0, B0 = plain_svd_factors(delta, rank)
            eora = LowRankCompensated.from_factors(rtn, A, B)
            err_eora = (eora(X) - reference).pow(2).sum()
            err_svd = (rtn(X) + X @ A0.t() @ B0.t() - reference).pow(2).sum()
            assert err_eora < 0.9 * err_svd < 0.9 * err_rtn, (rank, err_eora, err_svd, err_rtn)
            quantized = LowRankCompensated.from_factors(rtn, A, B, factor_bits=4)
            assert quantized.factor_bits_stored() < eora.factor_bits_stored()
            assert (quantized(X) - reference).pow(2).sum() < err_rtn
    assert eora.kernel == f"{rtn.kernel}+lowrank"
    assert eora.stored_bits() == rtn.stored_bits() + 16 * 16 * (64 + 128)
    assert torch.allclose(eora.dequantized_weight(), rtn.dequantized_weight() + eora.lora_b.float() @ eora.lora_a.float())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eora_after_rtn_through_compress_save_load(tiny_factory, family, fast_calibration, tmp_path):
    base = tiny_factory(family)
    batch = sample_batch(base)
    reference = model_output(base, batch)
    rtn_only = _compress(tiny_factory(family), [{"method": "rtn", "bits": 3, "group_size": 32}], fast_calibration)
    loaded = _compress(tiny_factory(family), [{"method": "rtn", "bits": 3, "group_size": 32}, {"method": "eora", "rank": 8}], fast_calibration)
    record = loaded.applied[-1]
    assert record["modules"] and all(k == rtn_only.model.get_submodule(n).kernel + "+lowrank" for n, k in record["kernels"].items())
    assert _rel(model_output(loaded, batch), reference) < _rel(model_output(rtn_only, batch), reference)
    outer = quantized_modules(loaded.model)
    assert all(isinstance(outer[n], LowRankCompensated) for n in record["modules"])
    assert not any(n.endswith(".inner") for n in outer), "the nested module belongs to its parent"
    bits = quantized_linear_bits(loaded.model)
    assert bits == pytest.approx(quantized_linear_bits(rtn_only.model) + 16 * 8 * sum(m.in_features + m.out_features for m in outer.values()) / sum(m.in_features * m.out_features for m in outer.values()))
    folder = save_compressed(loaded, tmp_path / "eora")
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["modules"][record["modules"][0]]
    assert entry["type"] == "LowRankCompensated" and entry["inner"]["type"] == "QuantizedLinear"
    again = load_compressed(folder)
    assert torch.equal(model_output(again, batch), model_output(loaded, batch))


def test_eora_compensates_a_pruned_linear(tiny_factory, fast_calibration, tmp_path):
    base = tiny_factory("bert")
    batch = sample_batch(base)
    reference = model_output(base, batch)
    pruned = _compress(tiny_factory("bert"), [{"method": "magnitude", "sparsity": 0.5}], fast_calibration)
    loaded = _compress(tiny_factory("bert"), [{"method": "magnitude", "sparsity": 0.5}, {"method": "eora", "rank": 8, "factor_bits": 8}], fast_calibration)
    assert set(loaded.applied[-1]["kernels"].values()) == {"dense+lowrank"}
    assert _rel(model_output(loaded, batch), reference) < _rel(model_output(pruned, batch), reference)
    again = load_compressed(save_compressed(loaded, tmp_path / "pruned"))
    assert torch.equal(model_output(again, batch), model_output(loaded, batch))


def test_eora_refuses_what_it_cannot_compensate(tiny_factory, fast_calibration, tmp_path):
    with pytest.raises(ConfigError, match="no error to compensate"):
        _compress(tiny_factory("llama"), [{"method": "eora"}], fast_calibration)
    with pytest.raises(ConfigError, match="dropped blocks"):
        _compress(tiny_factory("llama"), [{"method": "rtn", "bits": 4, "group_size": 32}, {"method": "shortgpt", "num_layers": 1}, {"method": "eora"}], fast_calibration)
    quantized = _compress(tiny_factory("llama"), [{"method": "rtn", "bits": 4, "group_size": 32}], fast_calibration)
    again = load_compressed(save_compressed(quantized, tmp_path / "q"))
    with pytest.raises(ConfigError, match="no original weight"):
        _compress(again, [{"method": "eora"}], fast_calibration)
    with pytest.raises(ConfigError, match="one of them"):
        method_from_dict({"method": "eora", "rank": 4, "rank_fraction": 0.1})
