"""KV-cache bitstreams (CacheGen-style): every element within half its channel's delta step, the
stream's bytes are what is stored, smooth caches code smaller than noise, and a decoded cache
serves the model."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from slimformer.errors import ConfigError
from slimformer.runtime.kv import kv_cache
from slimformer.runtime.kv.bitstream import BitstreamConfig, cache_layers, decode_kv, encode_kv, max_abs_error


def _layers(n: int, smooth: bool, seed: int = 0, num_layers: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_layers):
        if smooth:
            k = torch.randn(1, 2, n, 16, generator=g).cumsum(2) * 0.05 + torch.randn(1, 2, 1, 16, generator=g) * 4
        else:
            k = torch.randn(1, 2, n, 16, generator=g)
        out.append((k, torch.randn(1, 2, n, 16, generator=g) * 0.5))
    return out


@pytest.mark.parametrize("bits,chunk,n", [(4, 16, 200), (2, 8, 37), (3, 1, 50), (6, 64, 20), (4, 16, 300)])
def test_round_trip_within_the_delta_step(bits, chunk, n):
    layers = _layers(n, smooth=True)
    data = encode_kv(layers, BitstreamConfig(bits=bits, chunk=chunk))
    decoded = decode_kv(data)
    for (k, v), (k2, v2), (bk, bv) in zip(layers, decoded, max_abs_error(layers, data)):
        assert k2.shape == k.shape and v2.dtype == v.dtype
        assert ((k - k2).abs() <= bk + 1e-6).all() and ((v - v2).abs() <= bv + 1e-6).all()
        assert bk.max() > 0


def test_layer_sensitivity_gives_the_first_layers_finer_steps():
    layers = [_layers(120, smooth=False, seed=1, num_layers=1)[0]] * 3
    data = encode_kv(layers, BitstreamConfig(bits=3, early_fraction=0.3, early_extra_bits=2))
    bounds = max_abs_error(layers, data)
    assert torch.allclose(bounds[0][0] * 5, bounds[1][0], rtol=0.01)  # 5 vs 3 bits: 15 vs 3 steps a side
    assert torch.equal(bounds[1][0], bounds[2][0])


def test_locality_gives_finer_steps_and_coding_stays_near_the_bits():
    """Deltas to a chunk's anchor span far less than the values do, so at the same bits a smooth
    cache's step is much finer than quantizing its values directly; the coded size stays within
    the delta bits plus the anchors' share (peaked symbols code below their bit width)."""
    n = 512
    smooth, noise = _layers(n, smooth=True), _layers(n, smooth=False)
    cfg = BitstreamConfig(bits=4, early_extra_bits=0)
    elements = sum(k.numel() + v.numel() for k, v in noise)
    noise_bits = 8 * len(encode_kv(noise, cfg)) / elements
    assert noise_bits < 4 + 8 / cfg.chunk + 0.1
    keys = [(k, k) for k, _ in smooth]
    data = encode_kv(keys, cfg)
    for (k, _), (bound, _) in zip(keys, max_abs_error(keys, data)):
        direct = (k.amax(2, keepdim=True) - k.amin(2, keepdim=True)) / 15 / 2  # half a step of 4-bit values
        assert (bound / direct).median() < 0.75


@torch.no_grad()
def test_decoded_cache_serves_the_model(tiny_factory):
    """A real prefill cache, coded at 8 bits, continues with logits close to the full cache's; a
    compressed KVCache's kept entries code too."""
    loaded = tiny_factory("llama")
    model = loaded.model.eval()
    ids = torch.randint(3, 500, (1, 48), generator=torch.Generator().manual_seed(0))
    full = DynamicCache(config=model.config)
    model(ids[:, :40], cache=full)
    data = encode_kv(cache_layers(full), BitstreamConfig(bits=8, early_extra_bits=0))
    restored = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(decode_kv(data)):
        restored.update(k, v, i)
    pos = torch.arange(40, 48).unsqueeze(0)
    ref = model(ids[:, 40:], cache=full, position_ids=pos).logits
    out = model(ids[:, 40:], cache=restored, position_ids=pos).logits
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    cache = kv_cache(loaded, {"method": "knorm", "ratio": 0.5, "bits": 4, "group": 8, "window": 4})
    with cache.attach(loaded):
        model(ids, cache=cache)
    layers = cache_layers(cache)
    assert layers[0][0].shape[2] == 24
    assert all(k.shape == k2.shape for (k, _), (k2, _) in zip(layers, decode_kv(encode_kv(layers))))


def test_bad_settings_and_bad_bytes():
    for bad in ({"bits": 1}, {"bits": 8, "early_extra_bits": 1}, {"chunk": 0}, {"anchor_bits": 9}, {"early_fraction": 2}):
        with pytest.raises(ConfigError):
            BitstreamConfig(**bad)
    with pytest.raises(ConfigError, match="magic"):
        decode_kv(b"not a stream at all")


def test_an_outlier_coarsens_only_its_own_step_block():
    layers = _layers(256, smooth=True, num_layers=1)
    k, v = layers[0]
    k = k.clone()
    k[0, 0, 5, 3] += 50.0  # one outlier in the first 128-token block of one channel
    data = encode_kv([(k, v)], BitstreamConfig(bits=4, step_tokens=128))
    (bound, _), = max_abs_error([(k, v)], data)
    (k2, _), = decode_kv(data)
    assert ((k - k2).abs() <= bound + 1e-6).all()
    assert bound[0, 0, :128, 3].max() > 10 * bound[0, 0, 128:, 3].max()
