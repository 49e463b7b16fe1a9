"""The decode-step attention (grouped heads folded into the query axis) against SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimformer.runtime.attention import MAX_DECODE_QUERIES, decode_attention
from slimformer.runtime.generation import TextGenerator


def _reference(query, key, value, mask):
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("form", ["kernel", "matmul"])
@pytest.mark.parametrize("q", [1, 3, MAX_DECODE_QUERIES + 1])
@pytest.mark.parametrize("boolean", [False, True])
def test_decode_attention_equals_sdpa_with_repeated_heads(q, boolean, form, monkeypatch):
    """Both forms of the decode attention: slimformer's kernel (where it builds: every x86 CPU
    with AVX2, asserted in test_decode_attention_kernel) and the matmul form it falls back to."""
    from slimformer.kernels import decode_attention as decode_kernel

    if form == "kernel":
        if not decode_kernel.available():
            pytest.skip(f"decode-attention kernel not built here: {decode_kernel.unavailable_reason()}")
    else:
        monkeypatch.setattr(decode_kernel, "loaded", lambda: False)
    g = torch.Generator().manual_seed(q)
    b, heads, kv_heads, slots, d = 2, 6, 2, 40, 16
    query = torch.randn(b, heads, q, d, generator=g)
    key = torch.randn(b, kv_heads, slots, d, generator=g)
    value = torch.randn(b, kv_heads, slots, d, generator=g)
    allowed = torch.rand(b, 1, q, slots, generator=g) > 0.3
    allowed[..., 0] = True
    mask = allowed if boolean else torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    layer = torch.nn.Module()  # what transformers' SDPA path (longer inputs) reads from the layer
    layer.num_key_value_groups, layer.is_causal = heads // kv_heads, True
    out, weights = decode_attention(layer, query, key, value, mask, scaling=d**-0.5)
    assert weights is None and out.shape == (b, q, heads, d)
    torch.testing.assert_close(out, _reference(query, key, value, allowed), atol=2e-6, rtol=1e-5)


def test_a_decode_attention_view_shares_the_weights_and_gives_the_same_logits(tiny_factory):
    loaded = tiny_factory("llama")
    model = loaded.model.eval()
    view = TextGenerator(loaded, compile=False).model
    assert view is not model and view.config._attn_implementation == "slimformer_decode"
    assert model.config._attn_implementation != "slimformer_decode"  # the user's model is untouched
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(model.parameters(), view.parameters()))
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :-1], use_cache=True)
        past = getattr(out, "cache", None) or out.past_key_values
        step = view(input_ids=ids[:, -1:], cache=past, use_cache=True).logits  # one query: the matmul form
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-4)


def test_a_decode_attention_view_keeps_a_2d_padding_mask(tiny_factory):
    """Called as a user would, with a 2-D padding mask (left-padded row), the switched view gives
    the original's logits on the real tokens: transformers builds masks only for attention names
    its mask interface knows, so the decode attention registers SDPA's mask builder."""
    import copy

    from slimformer.runtime.attention import use_decode_attention

    model = tiny_factory("llama").model.eval()
    view = copy.deepcopy(model)
    assert use_decode_attention(view)
    ids = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = view(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1, 3:], expected[1, 3:], atol=1e-5, rtol=1e-4)
