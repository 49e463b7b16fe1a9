"""The tile attention kernel (AMX, or its AVX512-BF16 form) against SDPA, its fallback, and the planner's measured choice."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import bert_with_heads_of_32
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from slimformer.errors import ConfigError
from slimformer.kernels import tile_attention as kernel
from slimformer.runtime.compile import _CompiledForward, compile_fallbacks
from slimformer.runtime.planner import PlanSettings, plan_execution, remove_plan
from slimformer.runtime.tile_attention import NAME, tile_attention_forward


def _needs_kernel():
    reason = kernel.LIBRARY.cpu_reason()
    if reason is None:  # an AMX CPU, or one with AVX512-BF16: the kernel's form must build and run here
        assert kernel.available(), kernel.unavailable_reason()
    else:
        pytest.skip(f"no tile attention kernel on this CPU: {reason}")


def test_the_amx_form_is_taken_where_the_cpu_has_tiles_and_the_avx512_form_elsewhere():
    if kernel._cpu_supports() is None:
        assert kernel.LIBRARY is kernel.AMX_LIBRARY and kernel.FORM == "AMX"
    else:
        assert kernel.LIBRARY is kernel.AVX512_LIBRARY and kernel.FORM == "AVX512-BF16"
        assert "-mamx-tile" not in kernel.FLAGS_AVX512 and "-DSLIMFORMER_TILE_EMULATION" in kernel.FLAGS_AVX512


def _heads(g, b, h, lq, lk, d):
    """(batch, heads, positions, dim) bf16 views of (batch, positions, heads, dim) tensors, as
    transformers' attention layers hand them over (unit stride along dim only)."""
    q = torch.randn(b, lq, h, d, generator=g).to(torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(b, lk, h, d, generator=g).to(torch.bfloat16).transpose(1, 2) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("b,h,lq,lk,d", [(2, 3, 5, 5, 32), (3, 4, 37, 37, 32), (2, 2, 16, 70, 64), (1, 2, 130, 130, 32), (1, 2, 20, 40, 96), (1, 1, 17, 33, 128)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "per-query", "key-bias"])
def test_tile_attention_matches_sdpa_to_bf16_rounding(b, h, lq, lk, d, mask_kind):
    """Against a float32 reference the kernel's error is that of SDPA's own bf16 computation
    (probabilities rounded to bf16), for tails off the 16/32 blocks, head size 64, padding masks
    (keys after a row's length never computed) and masks that differ per query."""
    _needs_kernel()
    g = torch.Generator().manual_seed(lq * 7 + lk)
    q, k, v = _heads(g, b, h, lq, lk, d)
    lengths = torch.randint(1, lk + 1, (b,), generator=g)
    lengths[0] = lk
    allowed = (torch.arange(lk)[None, :] < lengths[:, None])[:, None, None, :].expand(b, 1, lq, lk)
    if mask_kind == "per-query":
        allowed = allowed & (torch.rand(b, 1, lq, lk, generator=g) > 0.3)
        allowed[..., 0] = True
    # key-bias: one additive row per batch row, the same for every query (merged tokens' log sizes)
    sizes = 1 + 3 * torch.rand(b, lk, generator=g)
    key_bias = sizes.log().masked_fill(~allowed[:, 0, 0, :], float("-inf"))[:, None, None, :]
    mask = {"none": None, "bool": allowed, "per-query": allowed,
            "additive": torch.zeros(b, 1, lq, lk).masked_fill(~allowed, float("-inf")), "key-bias": key_bias}[mask_kind]
    ref_mask = None if mask is None else key_bias.expand(b, 1, lq, lk) if mask_kind == "key-bias" else allowed
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=ref_mask).transpose(1, 2)
    bf16_mask = ref_mask if ref_mask is None or ref_mask.dtype == torch.bool else ref_mask.to(q.dtype)
    sdpa_bf16 = F.scaled_dot_product_attention(q, k, v, attn_mask=bf16_mask).transpose(1, 2)
    out = kernel.tile_attention(q, k, v, mask, d**-0.5)
    assert out.shape == (b, lq, h, d) and out.dtype == torch.bfloat16
    err = (out.float() - reference).abs()
    bound = max(2 * (sdpa_bf16.float() - reference).abs().max().item(), 2**-7)
    assert err.max().item() <= bound
    assert err.mean().item() <= 2 * (sdpa_bf16.float() - reference).abs().mean().item() + 1e-4


def test_a_row_with_every_key_masked_gives_zeros_and_others_are_untouched():
    _needs_kernel()
    g = torch.Generator().manual_seed(5)
    q, k, v = _heads(g, 2, 2, 20, 20, 32)
    allowed = torch.ones(2, 1, 20, 20, dtype=torch.bool)
    allowed[1, :, 3, :] = False  # query 3 of row 1 may attend to nothing
    allowed[0] = False  # row 0: nothing at all
    out = kernel.tile_attention(q, k, v, allowed, 32**-0.5)
    assert torch.equal(out[1, 3], torch.zeros_like(out[1, 3])) and torch.equal(out[0], torch.zeros_like(out[0]))
    reference = F.scaled_dot_product_attention(q[1:], k[1:], v[1:]).transpose(1, 2)[0]
    keep = [i for i in range(20) if i != 3]
    torch.testing.assert_close(out[1, keep].float(), reference[keep].float(), atol=2**-6, rtol=0)


def test_inputs_the_kernel_does_not_take_go_to_sdpa_unchanged():
    """float32 heads, head size 16, dropout in training: transformers' SDPA function, bit for bit."""
    g = torch.Generator().manual_seed(1)
    layer = torch.nn.Module()
    layer.is_causal = False
    for dtype, d in ((torch.float32, 32), (torch.bfloat16, 16)):
        q, k, v = (t.to(dtype) for t in _heads(g, 2, 2, 9, 9, d))
        mask = torch.ones(2, 1, 9, 9, dtype=torch.bool)
        mask[1, ..., 6:] = False
        out, weights = tile_attention_forward(layer, q, k, v, mask, scaling=d**-0.5)
        expected, _ = sdpa_attention_forward(layer, q, k, v, mask, scaling=d**-0.5)
        assert weights is None and torch.equal(out, expected)
    causal = torch.nn.Module()
    causal.is_causal = True  # no mask on a causal layer: SDPA's own causal path, not the kernel
    q, k, v = _heads(g, 1, 2, 6, 6, 32)
    out, _ = tile_attention_forward(causal, q, k, v, None)
    assert torch.equal(out, sdpa_attention_forward(causal, q, k, v, None)[0])


def _padded_batch(loaded):
    texts = ["a b c", "the quick brown fox jumps over the lazy dog " * 4, "x " * 40, "one two"]
    return dict(loaded.tokenizer(texts, padding=True, return_tensors="pt"))


def test_a_bert_on_the_kernel_gives_the_sdpa_embeddings_and_compiles():
    """Sentence embeddings of a padded batch (rows of 3-80 tokens) agree with SDPA's to bf16
    rounding, eager and under torch.compile (the kernel is one opaque operator there)."""
    _needs_kernel()
    loaded = bert_with_heads_of_32()
    batch = _padded_batch(loaded)
    loaded.bucketing = False
    with torch.no_grad():
        expected = loaded.embed(batch)
        loaded.model.set_attn_implementation(NAME)
        got = loaded.embed(batch)
        loaded.model.forward = torch.compile(loaded.model.forward, dynamic=True)
        compiled = loaded.embed(batch)
    assert F.cosine_similarity(got, expected).min().item() > 0.999
    torch.testing.assert_close(compiled, got, atol=2e-2, rtol=0)


def test_the_planner_chooses_attention_by_measurement_and_undoes_it(tmp_path):
    """With attention=auto the plan records embed's time on a mixed-length batch with SDPA, the
    tile kernel and the tile kernel on packed rows (or why the kernel was not timed), runs the
    fastest if it beats SDPA by 5 %, and remove_plan restores SDPA and bucketing; a second plan
    reads the timings from the cache. attention=sdpa leaves it alone."""
    loaded = bert_with_heads_of_32()
    settings = PlanSettings(memory="fast", activations="bfloat16", repeats=1, cache_dir=str(tmp_path), widths=False)
    plan = plan_execution(loaded, settings)
    found = plan.summary()["attention"]
    if kernel.available():
        times = found["seconds"]
        assert set(times) == {"sdpa", "tiles", "tiles, packed"}
        best = min(times, key=times.get)
        switched = best != "sdpa" and times[best] <= 0.95 * times["sdpa"]
        assert found["chosen"] == (NAME if switched else "sdpa") == loaded.model.config._attn_implementation
        assert found["packing"] == loaded.packing == (switched and best == "tiles, packed")
        assert not found["cached"]
    else:
        assert found["chosen"] == "sdpa" and found["seconds"] is None and "unavailable" in found["reason"]
    remove_plan(loaded)
    assert loaded.model.config._attn_implementation == "sdpa" and not loaded.packing
    again = plan_execution(loaded, settings)
    assert again.attention["cached"] == kernel.available() and again.attention["chosen"] == found["chosen"]
    remove_plan(loaded)
    left = plan_execution(copy.deepcopy(loaded), PlanSettings(attention="sdpa", widths=False, cache_dir=str(tmp_path)))
    assert left.attention is None
    with pytest.raises(ConfigError, match="attention"):
        PlanSettings(attention="flash")


def test_pack_rows_keeps_the_real_tokens_and_unpack_puts_them_back():
    from slimformer.models.batching import pack_rows, unpack_rows

    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [13, 0, 0, 0, 0]])
    mask = (ids > 0).long()
    types = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 1, 1], [1, 0, 0, 0, 0]])
    inputs, index = pack_rows({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0]]
    assert inputs["token_type_ids"].tolist() == [[0, 1, 1, 0, 0, 0, 1, 1, 1]]
    assert inputs["cu_seq_lens_q"].tolist() == inputs["cu_seq_lens_k"].tolist() == [0, 3, 8, 9]
    back = unpack_rows(inputs["input_ids"][0], index, tuple(ids.shape))
    assert torch.equal(back, ids)


def test_packed_sequences_attend_only_to_themselves():
    """Packed rows (cu_seq_lens) give each sequence's own attention: on the kernel where it runs,
    and through SDPA with a block-diagonal mask where it does not (float32 here)."""
    g = torch.Generator().manual_seed(3)
    layer = torch.nn.Module()
    layer.is_causal, layer.training = False, False
    lengths = [5, 17, 1, 40]
    cu = torch.tensor([0, 5, 22, 23, 63])
    for dtype in (torch.float32, torch.bfloat16):
        if dtype == torch.bfloat16 and not kernel.available():
            continue
        q, k, v = (t.to(dtype) for t in _heads(g, 1, 2, 63, 63, 32))
        out, _ = tile_attention_forward(layer, q, k, v, None, scaling=32**-0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
        assert out.shape == (1, 63, 2, 32)
        for a, n in zip(cu[:-1].tolist(), lengths):
            alone = F.scaled_dot_product_attention(q[:, :, a:a + n].float(), k[:, :, a:a + n].float(), v[:, :, a:a + n].float()).transpose(1, 2)
            tol = 2e-6 if dtype == torch.float32 else 2**-6
            torch.testing.assert_close(out[:, a:a + n].float(), alone, atol=tol, rtol=0)


def test_a_bert_embeds_packed_rows_as_it_embeds_the_padded_batch():
    _needs_kernel()
    loaded = bert_with_heads_of_32()
    batch = _padded_batch(loaded)
    loaded.model.set_attn_implementation(NAME)
    with torch.no_grad():
        bucketed = loaded.embed(batch)
        loaded.packing = True
        packed = loaded.embed(batch)
        eager_forward = loaded.model.forward
        loaded.model.forward = _CompiledForward(torch.compile(eager_forward, dynamic=True), eager_forward)
        compiled = loaded.embed(batch)  # transformers builds no (tokens, tokens) mask under the compiler either
        assert compile_fallbacks(loaded) == []
        loaded.model.forward = eager_forward
        loaded.model.set_attn_implementation("sdpa")  # packing needs attention that keeps sequences apart: ignored here
        plain = loaded.embed(batch)
    assert F.cosine_similarity(packed, bucketed).min().item() > 0.9995
    torch.testing.assert_close(compiled, packed, atol=2e-2, rtol=0)
    assert F.cosine_similarity(plain, bucketed).min().item() > 0.9995


def test_the_report_names_the_attention_the_plan_chose():
    from slimformer.evaluate.report import _execution

    plan = {"machine": {"cpu": "X"}, "settings": {"memory": "fast"}, "activations": "bfloat16", "attention": {"chosen": NAME, "packing": True}}
    assert _execution({"execution": plan}, {}).endswith("bfloat16 activations; attention on AMX tiles, packed rows")
    plan["attention"] = {"chosen": NAME, "packing": False, "form": "AVX512-BF16"}
    assert _execution({"execution": plan}, {}).endswith("bfloat16 activations; attention on the tile kernel (AVX512-BF16)")
    plan["attention"] = {"chosen": "sdpa", "packing": False}
    assert _execution({"execution": plan}, {}).endswith("bfloat16 activations")


def test_interleaved_medians_rotates_the_order_and_runs_each_setup_untimed():
    from slimformer.timing import interleaved_medians

    order = []
    calls = {k: (lambda k=k: order.append(k)) for k in "abc"}
    times = interleaved_medians(calls, 2, setup={"b": lambda: order.append("setup b")})
    assert set(times) == {"a", "b", "c"} and all(t >= 0 for t in times.values())
    assert order == ["a", "setup b", "b", "c",  # warm-up round
                     "setup b", "b", "c", "a", "c", "a", "setup b", "b"]  # rotated rounds
