"""The dynamic runtime on packed rows: every real token of a batch in one row, token reducers
applied per text, exits removing whole texts, merged tokens' sizes as a per-key attention bias.
Packed and bucketed runs of the same model give the same embeddings (the bucketed path is the
reference); float32 runs through the SDPA fallback with a block-diagonal mask on every CPU, bf16
through the AMX kernel where the CPU has it."""

import pytest
import torch
import torch.nn.functional as F
from conftest import bert_with_heads_of_32

import slimformer.runtime.compile as comp
from slimformer.kernels import tile_attention as kernel
from slimformer.methods import TokenMergingConfig, TokenPruningConfig
from slimformer.methods.dynamic import install_token_merging, install_token_pruning
from slimformer.methods.dynamic.rules import SimilarityRule
from slimformer.methods.dynamic.runtime import DynamicEncoder, DynamicSettings, ExitHeads, pack_state, pool, pool_packed, unpack_state
from slimformer.runtime.tile_attention import NAME, tile_attention_forward

TEXTS = ["a b c", "the quick brown fox jumps over the lazy dog " * 4, "x y " * 30, "one two three four five six seven eight",
         "return the sum of the items " * 6]


def _bert(dtype=torch.float32):
    loaded = bert_with_heads_of_32(dtype, layers=4)
    loaded.model.set_attn_implementation(NAME)  # keeps packed sequences apart (SDPA fallback off the kernel)
    return loaded


def _both(loaded, batch):
    """(bucketed, packed) embeddings and run statistics of one batch."""
    with torch.no_grad():
        loaded.packing = False
        bucketed = DynamicEncoder(loaded).embed(batch, return_stats=True)
        loaded.packing = True
        packed = DynamicEncoder(loaded).embed(batch, return_stats=True)
    return bucketed, packed


def _batch(loaded):
    return dict(loaded.tokenizer(TEXTS, padding=True, return_tensors="pt"))


def test_unpack_and_pack_state_are_inverse_and_drop_what_a_reducer_emptied():
    cu = torch.tensor([0, 3, 8, 9])
    hidden = torch.arange(9 * 2, dtype=torch.float32).view(1, 9, 2)
    sizes = torch.tensor([1.0, 1, 1, 1, 2, 1, 1, 1, 1])
    protect = torch.tensor([True, False, False, True, False, False, False, False, True])
    h, s, p = unpack_state(hidden, sizes, protect, cu)
    assert h.shape == (3, 5, 2) and s.tolist() == [[1, 1, 1, 0, 0], [1, 2, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert torch.equal(h[1, 1], hidden[0, 4]) and float(h[0, 4].abs().sum()) == 0.0
    h2, s2, p2, cu2 = pack_state(h, s, p)
    assert torch.equal(h2, hidden) and torch.equal(s2, sizes) and torch.equal(p2, protect) and torch.equal(cu2, cu)
    s[1, 2] = 0  # a reducer dropped one token of text 1
    h3, s3, _, cu3 = pack_state(h, s, p)
    assert cu3.tolist() == [0, 3, 7, 8] and torch.equal(h3[0, 5], hidden[0, 6])
    # pooled per text as the padded rows are
    assert torch.allclose(pool_packed(hidden, sizes, cu, "mean"), pool(h, torch.tensor([[1.0, 1, 1, 0, 0], [1, 2, 1, 1, 1], [1, 0, 0, 0, 0]]), "mean"))
    assert torch.equal(pool_packed(hidden, sizes, cu, "cls"), hidden[0, [0, 3, 8]])


@pytest.mark.parametrize("setting", ["prune-length", "prune-length-fused", "merge"])
def test_packed_dynamic_runs_give_the_bucketed_embeddings(setting):
    """Length-aware pruning (plain and fused: merged sizes become a per-key bias) and ToMe do not
    depend on a text's batch-mates, so packing changes nothing but the summation order; the
    statistics count each text's own tokens (no padding)."""
    loaded = _bert()
    if setting == "merge":
        install_token_merging(loaded, TokenMergingConfig(r=4, layers=(0, 1)))
    else:
        install_token_pruning(loaded, TokenPruningConfig(keep_ratio=0.5, layers=(0, 2), schedule="length", min_tokens=8,
                                                         fuse=setting.endswith("fused")))
    batch = _batch(loaded)
    (bucketed, b_stats), (packed, p_stats) = _both(loaded, batch)
    assert torch.allclose(packed, bucketed, atol=2e-5, rtol=0), float((packed - bucketed).abs().max())
    assert torch.equal(p_stats.layers_run, b_stats.layers_run)
    assert p_stats.tokens_per_layer == pytest.approx(b_stats.tokens_per_layer)
    lengths = batch["attention_mask"].sum(1)
    assert p_stats.tokens_per_layer[0] == pytest.approx(float(lengths.float().mean()))
    assert p_stats.tokens_per_layer[-1] < p_stats.tokens_per_layer[0]  # tokens really left
    assert p_stats.flops < b_stats.flops  # the bucketed run computes some padding; packed none


def test_without_proportional_attention_the_fused_token_gets_no_bias():
    loaded = _bert()
    install_token_pruning(loaded, TokenPruningConfig(keep_ratio=0.5, layers=(0,), schedule="length", min_tokens=8, fuse=True))
    loaded.dynamic.proportional_attention = False
    (bucketed, _), (packed, _) = _both(loaded, _batch(loaded))
    assert torch.allclose(packed, bucketed, atol=2e-5, rtol=0)
    loaded.dynamic.proportional_attention = True
    with torch.no_grad():
        biased = DynamicEncoder(loaded).embed(_batch(loaded))
    assert not torch.allclose(biased, packed, atol=1e-4)  # the bias is really applied when asked


def test_exited_texts_leave_the_packed_row():
    """A rule that sends the short texts (0 and 3) out at the first exit: their embeddings are
    that exit's, the rest run on, and nothing of the exited texts is computed later."""
    loaded = _bert()
    dim = loaded.model.config.hidden_size
    heads = ExitHeads([1], dim)

    class ShortTextsExit:
        def decide(self, layer, output, state):
            return state["tokens"] < 30

    loaded.dynamic = DynamicSettings(exits=heads, rule=ShortTextsExit())
    batch = _batch(loaded)
    (bucketed, b_stats), (packed, p_stats) = _both(loaded, batch)
    assert p_stats.layers_run.tolist() == [2, 4, 4, 2, 4] == b_stats.layers_run.tolist()
    assert p_stats.rows_per_layer == [5, 5, 3, 3]
    assert torch.allclose(packed, bucketed, atol=2e-5, rtol=0)
    loaded.dynamic = DynamicSettings(exits=heads, rule=SimilarityRule(2.0))  # never exits
    with torch.no_grad():
        loaded.packing = True
        full = DynamicEncoder(loaded).embed(batch)
    assert not torch.allclose(full[0], packed[0], atol=1e-4) and torch.allclose(full[1], packed[1], atol=2e-5)


def test_packed_segments_compile_and_receive_the_sequence_boundaries():
    loaded = _bert()
    install_token_pruning(loaded, TokenPruningConfig(keep_ratio=0.5, layers=(1,), schedule="length", min_tokens=8, fuse=True))
    loaded.packing = True
    batch = _batch(loaded)
    with torch.no_grad():
        eager = DynamicEncoder(loaded).embed(batch)
    report = comp.compile_model(loaded, batch, repeats=1, keep_if_slower=True, backend="aot_eager", dynamic=False)
    assert report.compiled and report.max_abs_diff <= 1e-5
    seen = []
    for span, segment in list(loaded.dynamic.compiled.items()):
        def spy(hidden, mask, cu_seq_lens=None, segment=segment):
            seen.append((hidden.shape[0], None if cu_seq_lens is None else cu_seq_lens.tolist(), mask is not None))
            return segment(hidden, mask, cu_seq_lens)
        loaded.dynamic.compiled[span] = spy
    with torch.no_grad():
        out = DynamicEncoder(loaded).embed(batch)
    assert torch.allclose(out, eager, atol=1e-5)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert seen[0] == (1, [0] + torch.tensor(lengths).cumsum(0).tolist(), False)  # one row, every text's own tokens
    assert seen[1][0] == 1 and seen[1][1][-1] < sum(lengths) and seen[1][2]  # after pruning: fewer tokens, fused sizes as a bias
    comp.uncompile_model(loaded)


def test_packed_key_bias_on_the_kernel_and_the_fallback_match_per_sequence_attention():
    """A per-key bias on packed rows: each sequence's attention with its own keys' bias, on the
    tile kernel (bf16, where the CPU has AMX or AVX512-BF16) and on the SDPA fallback (float32)."""
    g = torch.Generator().manual_seed(4)
    layer = torch.nn.Module()
    layer.is_causal, layer.training = False, False
    cu = torch.tensor([0, 5, 22, 23, 63])
    bias = (1 + 3 * torch.rand(63, generator=g)).log()
    for dtype in (torch.float32, torch.bfloat16):
        if dtype == torch.bfloat16:
            if kernel.LIBRARY.cpu_reason() is not None:
                continue  # no tile kernel here (no AMX, no AVX512-BF16): the float32 fallback above is what runs
            assert kernel.available(), kernel.unavailable_reason()
        q, k, v = (torch.randn(1, 63, 2, 32, generator=g).to(dtype).transpose(1, 2) for _ in range(3))
        out, _ = tile_attention_forward(layer, q, k, v, bias.to(dtype)[None, None, None, :], scaling=32**-0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone = F.scaled_dot_product_attention(q[:, :, a:b].float(), k[:, :, a:b].float(), v[:, :, a:b].float(),
                                                   attn_mask=bias.to(dtype).float()[a:b][None, None, None, :]).transpose(1, 2)
            tol = 2e-6 if dtype == torch.float32 else 2**-6
            torch.testing.assert_close(out[:, a:b].float(), alone, atol=tol, rtol=0)
    with pytest.raises(ValueError, match="additive bias per key"):
        tile_attention_forward(layer, q, k, v, torch.ones(1, 1, 63, 63, dtype=torch.bool), cu_seq_lens_q=cu, cu_seq_lens_k=cu)


def test_bf16_packed_pruning_on_the_kernel_agrees_with_bucketed():
    if kernel.LIBRARY.cpu_reason() is not None:
        pytest.skip(f"no tile attention kernel on this CPU: {kernel.LIBRARY.cpu_reason()}")
    assert kernel.available(), kernel.unavailable_reason()
    loaded = _bert(torch.bfloat16)
    install_token_pruning(loaded, TokenPruningConfig(keep_ratio=0.5, layers=(0, 2), schedule="length", min_tokens=8, fuse=True))
    (bucketed, _), (packed, _) = _both(loaded, _batch(loaded))
    assert F.cosine_similarity(packed, bucketed).min().item() > 0.999
