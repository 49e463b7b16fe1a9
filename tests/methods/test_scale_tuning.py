"""Scale tuning (PV-Tuning's P step): only the group scales (and norms) move, the codes and zero
points stay bit for bit, the stored bytes stay the same, the calibration KL to the original falls,
and the result saves and loads exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import model_output, sample_batch

from slimformer.compress import compress
from slimformer.errors import ConfigError
from slimformer.io import load_compressed, save_compressed
from slimformer.methods import CompressionContext, apply_method, method_from_dict
from slimformer.methods.quantization.modules import QuantizedLinear
from slimformer.methods.quantization.scale_tuning import ScaleTunedLinear, norm_parameters, trainable_scales
from slimformer.recipe import Recipe

QUANTIZE = {"method": "rtn", "bits": 3, "group_size": 16}
TUNE = {"method": "scale-tuning", "steps": 25, "lr": 0.002, "autocast": "float32"}
HQQ = {"method": "hqq", "bits": 3, "group_size": 16}  # real (fixed-point) zero points
AWQ = {"method": "awq", "bits": 3, "group_size": 16}  # input scaling 1/s before the packed product


def _packed(loaded) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantizedLinear)}


def _compressed(factory, steps, calibration, family="llama"):
    loaded = factory(family)
    compress(loaded, Recipe(steps=[method_from_dict(s) for s in steps], calibration=calibration))
    return loaded


@pytest.mark.parametrize("family", ["llama", "bert"])  # KL of next-token distributions; MSE + cosine of embeddings
def test_only_the_scales_move_and_the_calibration_loss_falls(tiny_factory, fast_calibration, tmp_path, family):
    plain = _compressed(tiny_factory, [QUANTIZE], fast_calibration, family)
    tuned = _compressed(tiny_factory, [QUANTIZE, TUNE], fast_calibration, family)
    record = tuned.applied[-1]["scale_tuning"]
    assert record["loss"] == ("kl" if family == "llama" else "mse+cos") and record["kept"] == "tuned"
    a, b = _packed(plain), _packed(tuned)
    assert a.keys() == b.keys() and record["layers"] == len(a)
    changed = 0
    for name in a:
        assert torch.equal(a[name].qweight, b[name].qweight), f"{name}: codes changed"
        assert torch.equal(a[name].zeros, b[name].zeros), f"{name}: zero points changed"
        assert b[name].scales.dtype == torch.bfloat16 and b[name].stored_bits() == a[name].stored_bits()
        changed += int((a[name].scales != b[name].scales).sum())
    assert 0 < changed <= record["scales"]
    # the loss went down in training and stays down once the scales are stored in bfloat16
    assert record["loss_after"] < 0.9 * record["loss_before"]
    assert record["loss_stored"] < 0.9 * record["loss_before"]
    # norms trained, the embedding table untouched
    assert any(not torch.equal(p, q) for p, q in zip(norm_parameters(plain.model), norm_parameters(tuned.model)))
    assert torch.equal(plain.model.get_input_embeddings().weight, tuned.model.get_input_embeddings().weight)
    batch = sample_batch(tuned)
    again = load_compressed(save_compressed(tuned, tmp_path / "tuned"))
    assert torch.equal(model_output(again, batch), model_output(tuned, batch))


def test_norms_stay_when_not_asked(tiny_factory, fast_calibration):
    plain = _compressed(tiny_factory, [QUANTIZE], fast_calibration)
    tuned = _compressed(tiny_factory, [QUANTIZE, TUNE | {"norms": False, "steps": 5}], fast_calibration)
    assert all(torch.equal(p, q) for p, q in zip(norm_parameters(plain.model), norm_parameters(tuned.model)))
    assert tuned.applied[-1]["scale_tuning"]["norm_parameters"] == 0


def test_a_tuning_that_raises_the_loss_keeps_the_one_shot_model(tiny_factory, fast_calibration):
    plain = _compressed(tiny_factory, [QUANTIZE], fast_calibration, "bert")
    # steps of 2 % on every scale of a model already close to its original: the loss rises
    tuned = _compressed(tiny_factory, [QUANTIZE, TUNE | {"lr": 0.02}], fast_calibration, "bert")
    record = tuned.applied[-1]["scale_tuning"]
    assert record["loss_after"] > record["loss_before"] and record["kept"].startswith("one-shot")
    a, b = _packed(plain), _packed(tuned)
    assert all(torch.equal(a[n].scales, b[n].scales) for n in a)
    assert all(torch.equal(p, q) for p, q in zip(norm_parameters(plain.model), norm_parameters(tuned.model)))
    batch = sample_batch(tuned)
    assert torch.equal(model_output(plain, batch), model_output(tuned, batch))


@pytest.mark.parametrize("quantizer", [QUANTIZE, HQQ, AWQ], ids=["rtn", "hqq", "awq"])
def test_stand_in_computes_the_packed_layer_and_an_error_restores_it(tiny_factory, fast_calibration, quantizer):
    loaded = _compressed(tiny_factory, [quantizer], fast_calibration)
    packed = _packed(loaded)
    x = torch.randn(3, 5, next(iter(packed.values())).in_features)
    name, layer = next(iter(packed.items()))
    scales = layer.scales.clone()
    with pytest.raises(RuntimeError, match="stop"):
        with trainable_scales(loaded.model) as stand_ins:
            assert stand_ins.keys() == packed.keys()
            for n, s in stand_ins.items():  # gain 0: each packed layer's function (AWQ's 1/s, HQQ's real zeros)
                assert isinstance(loaded.model.get_submodule(n), ScaleTunedLinear)
                x = torch.randn(3, 5, packed[n].in_features)
                torch.testing.assert_close(s(x), packed[n](x), rtol=1e-5, atol=1e-5)
            with torch.no_grad():
                stand_ins[name].gain.fill_(0.5)
            raise RuntimeError("stop")
    assert loaded.model.get_submodule(name) is layer and torch.equal(layer.scales, scales)


@pytest.mark.parametrize("quantizer", [HQQ, AWQ], ids=["hqq", "awq"])
def test_hqq_and_awq_layers_tune_with_their_codes_zeros_and_input_scales_kept(tiny_factory, fast_calibration, quantizer):
    plain = _compressed(tiny_factory, [quantizer], fast_calibration)
    tuned = _compressed(tiny_factory, [quantizer, TUNE], fast_calibration)
    record = tuned.applied[-1]["scale_tuning"]
    a, b = _packed(plain), _packed(tuned)
    assert record["kept"] == "tuned" and record["layers"] == len(a) > 0
    assert {type(m) for m in b.values()} == {type(m) for m in a.values()} and type(next(iter(a.values()))).__name__ != "QuantizedLinear"
    for name in a:
        assert torch.equal(a[name].qweight, b[name].qweight) and torch.equal(a[name].zeros, b[name].zeros)
        assert torch.equal(getattr(a[name], "input_scale", torch.ones(1)), getattr(b[name], "input_scale", torch.ones(1)))
        assert b[name].stored_bits() == a[name].stored_bits()
    assert record["loss_stored"] < 0.9 * record["loss_before"]


def test_refuses_a_model_without_packed_layers_and_a_missing_teacher(tiny_factory, fast_calibration):
    with pytest.raises(ConfigError, match="no packed uniform-grid"):
        compress(tiny_factory("llama"), Recipe(steps=[method_from_dict(TUNE)], calibration=fast_calibration))
    # W8A8 layers: their activation rounding depends on the run-time path, so they are not tuned
    with pytest.raises(ConfigError, match="with float activations"):
        compress(tiny_factory("llama"), Recipe(steps=[method_from_dict({"method": "smoothquant", "alpha": 0.5}), method_from_dict(TUNE)], calibration=fast_calibration))
    loaded = _compressed(tiny_factory, [QUANTIZE], fast_calibration)
    with pytest.raises(ConfigError, match="no original model"):
        apply_method(loaded, method_from_dict(TUNE), CompressionContext(fast_calibration))


@pytest.mark.parametrize("bad,match", [({"steps": 0}, "steps"), ({"lr": 2.0}, "lr"), ({"n_samples": 0}, "n_samples"), ({"autocast": "fp16"}, "autocast")])
def test_bad_settings_are_one_line_errors(bad, match):
    with pytest.raises(ConfigError, match=match) as info:
        method_from_dict(TUNE | bad)
    assert "\n" not in str(info.value)
