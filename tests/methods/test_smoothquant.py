"""SmoothQuant W8A8: smoothing moves activation outliers into the weights and lowers the
int8 layer's output error; the stored layer computes exactly the simulated W8A8 product."""

import torch

from slimformer.methods.quantization.smoothquant import smooth_layer, smoothing_factors, w8a8_output_error


def _outlier_inputs(n=512, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, :4] *= 40.0  # a few outlier channels, as after a transformer's LayerNorm
    return x


def test_smoothing_lowers_w8a8_error_on_outlier_channels():
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.05
    x = _outlier_inputs()
    absmax = x.abs().amax(0)
    plain = w8a8_output_error(x, w, torch.ones(128))
    half = w8a8_output_error(x, w, smoothing_factors(absmax, w, 0.5))
    s, alpha, sym = smooth_layer(w, absmax, x, None, 10)
    searched = w8a8_output_error(x, w, s, sym)
    assert half < 0.5 * plain
    assert searched <= half + 1e-9
    # Held-out inputs from the same distribution keep the gain (no overfitting to the samples).
    held_out = _outlier_inputs(seed=1)
    assert w8a8_output_error(held_out, w, s, sym) < 0.5 * w8a8_output_error(held_out, w, torch.ones(128))


def test_smoothquant_layer_computes_the_smoothed_int8_product(tiny_factory, fast_calibration):
    from slimformer.compress import compress
    from slimformer.methods import method_from_dict
    from slimformer.methods.quantization.modules import quantize_activations_per_token
    from slimformer.recipe import Recipe

    loaded = tiny_factory("llama")
    compress(loaded, Recipe(steps=[method_from_dict({"method": "smoothquant", "n_grid": 4})], calibration=fast_calibration))
    record = loaded.applied[-1]
    assert set(record["kernels"].values()) == {"int8-dynamic"}
    name = record["modules"][0]
    layer = loaded.model.get_submodule(name)
    x = torch.randn(7, layer.in_features)
    xq, sx, offset = quantize_activations_per_token(x / layer.input_scale.float(), layer.act_symmetric)
    xd = (xq.float() if offset is None else xq.float() + offset) * sx
    w_scaled = (layer.codes().float() - 128) * layer.scales.float()
    ref = xd @ w_scaled.t()
    assert torch.allclose(layer(x), ref, rtol=1e-4, atol=1e-4)
