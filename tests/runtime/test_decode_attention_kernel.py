"""slimformer's decode-attention kernel (``torch.ops.slimformer.decode_attention``): the matmul
form's numbers within float32 rounding (bf16 inputs: within bf16's), grouped-query heads, several
query tokens, boolean and additive masks; slots no query attends to are never read; a row with
every slot masked averages all values, as the matmul form does."""

import platform

import pytest
import torch

from slimformer.kernels import decode_attention as decode_kernel


def _matmul_form(query, key, value, mask, scale):
    """The fallback of runtime.attention: (B, Q, H, D)."""
    b, h, q, d = query.shape
    kv, slots = key.shape[1], key.shape[2]
    group = h // kv
    scores = torch.matmul(query.float().reshape(b, kv, group * q, d), key.float().transpose(-1, -2)) * scale
    scores = scores.view(b, kv, group, q, slots)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], torch.finfo(torch.float32).min) if mask.dtype == torch.bool else scores + mask[:, :, None]
    probs = torch.softmax(scores, dim=-1).view(b, kv, group * q, slots)
    return torch.matmul(probs, value.float()).view(b, h, q, d).transpose(1, 2)


def test_the_kernel_builds_on_an_x86_cpu_with_avx2():
    if platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        assert not decode_kernel.available() and decode_kernel.unavailable_reason()
        return
    assert decode_kernel.available(), decode_kernel.unavailable_reason()


needs_kernel = pytest.mark.skipif(not decode_kernel.available(), reason="no AVX2 CPU (asserted by the test above)")


def _inputs(b, h, kv, q, slots, d, dtype, seed=0, mask_kind="bool"):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, h, q, d, generator=g).to(dtype)
    key = torch.randn(b, kv, slots, d, generator=g).to(dtype)
    value = torch.randn(b, kv, slots, d, generator=g).to(dtype)
    allowed = torch.rand(b, 1, q, slots, generator=g) > 0.4
    allowed[..., 0] = True
    mask = {"bool": allowed, "additive": torch.where(allowed, 0.0, torch.finfo(torch.float32).min), "none": None}[mask_kind]
    return query, key, value, mask


SHAPES = [(1, 9, 3, 1, 256, 64), (2, 6, 2, 5, 70, 16), (3, 4, 4, 2, 33, 32), (1, 8, 1, 8, 19, 8)]
CASES = [(*shape, kind) for shape in SHAPES for kind in ("bool", "additive", "none") if kind != "none" or shape[3] == 1]  # several tokens come with a mask


@needs_kernel
@pytest.mark.parametrize("b,h,kv,q,slots,d,mask_kind", CASES)
def test_the_kernel_equals_the_matmul_form(b, h, kv, q, slots, d, mask_kind):
    query, key, value, mask = _inputs(b, h, kv, q, slots, d, torch.float32, seed=q + slots, mask_kind=mask_kind)
    got = decode_kernel.decode_attention(query, key, value, mask, d**-0.5)
    assert got.shape == (b, q, h, d) and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, _matmul_form(query, key, value, mask, d**-0.5), atol=2e-6, rtol=1e-5)


@needs_kernel
def test_bfloat16_inputs_give_the_float_result_rounded_once():
    query, key, value, mask = _inputs(2, 9, 3, 3, 100, 64, torch.bfloat16, seed=4)
    got = decode_kernel.decode_attention(query, key, value, mask, 0.125)
    assert got.dtype == torch.bfloat16
    exact = _matmul_form(query, key, value, mask, 0.125)  # float32 arithmetic on the bf16 inputs
    torch.testing.assert_close(got.float(), exact.to(torch.bfloat16).float(), atol=1e-2, rtol=8e-3)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start", [5, 8, 13, 16, 21])
def test_each_token_of_a_verify_step_gets_the_bits_of_a_one_token_step(start, dtype):
    """Speculative verification runs k + 1 tokens in one call; it is lossless only if token t's
    output is bit for bit that of the one-token step at its position (whatever slots the other
    tokens add to the call)."""
    g = torch.Generator().manual_seed(start)
    b, h, kv, q, slots, d = 2, 9, 3, 5, 48, 64
    query = torch.randn(b, h, q, d, generator=g).to(dtype)
    key = torch.randn(b, kv, slots, d, generator=g).to(dtype)
    value = torch.randn(b, kv, slots, d, generator=g).to(dtype)
    mask = torch.zeros(b, 1, q, slots, dtype=torch.bool)
    for t in range(q):
        mask[:, :, t, : start + t + 1] = True  # causal: token t sees the cache up to its own slot
    mask[1, :, :, :3] = False  # a left-padded row
    together = decode_kernel.decode_attention(query, key, value, mask, d**-0.5)
    for t in range(q):
        alone = decode_kernel.decode_attention(query[:, :, t:t + 1], key, value, mask[:, :, t:t + 1], d**-0.5)
        assert torch.equal(together[:, t:t + 1], alone)


@needs_kernel
def test_slots_no_query_attends_to_are_never_read():
    """The unused end of a static cache is skipped, not masked after the fact: NaN there (the
    matmul form would turn it into NaN outputs through 0 * NaN) leaves the result untouched."""
    query, key, value, _ = _inputs(1, 6, 2, 2, 64, 16, torch.float32, seed=7)
    mask = torch.zeros(1, 1, 2, 64, dtype=torch.bool)
    mask[..., :20] = True
    expected = decode_kernel.decode_attention(query, key, value, mask, 0.25)
    key[:, :, 20:] = float("nan")
    value[:, :, 20:] = float("nan")
    got = decode_kernel.decode_attention(query, key, value, mask, 0.25)
    assert torch.equal(got, expected) and torch.isfinite(got).all()


@needs_kernel
def test_a_row_with_every_slot_masked_averages_all_values_as_the_matmul_form_does():
    query, key, value, mask = _inputs(1, 4, 2, 2, 12, 8, torch.float32, seed=9)
    mask[0, 0, 1] = False
    got = decode_kernel.decode_attention(query, key, value, mask, 0.3)
    torch.testing.assert_close(got, _matmul_form(query, key, value, mask, 0.3), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got[0, 1, 0], value[0, 0].mean(0), atol=2e-6, rtol=1e-5)


@needs_kernel
def test_bad_inputs_are_refused_with_a_message():
    query, key, value, mask = _inputs(1, 6, 4, 1, 10, 16, torch.float32)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        decode_kernel.decode_attention(query, key, value, mask, 1.0)
    query, key, value, mask = _inputs(1, 4, 2, 1, 10, 12, torch.float32)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        decode_kernel.decode_attention(query, key, value, mask, 1.0)
    assert not decode_kernel.supports(query, key, value)


@needs_kernel
def test_compiled_graph_calls_the_kernel_and_agrees_with_eager():
    query, key, value, mask = _inputs(1, 6, 2, 1, 40, 16, torch.float32, seed=3)

    def f(q, k, v, m):
        return decode_kernel.decode_attention(q * 2, k, v, m, 0.25).sum(-1)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(query, key, value, mask), f(query, key, value, mask))


@needs_kernel
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_a_token_tree_row_equals_its_own_chain_bit_for_bit(kind):
    """A token tree's verify step lists the slots of every branch; a token of the second branch
    is masked from the first branch's slots, which lie between its context and its own. Its
    output must be the bits of the step that never held those slots (the accepted branch moved
    behind the root, as speculative decoding leaves the cache): the softmax denominator is summed
    over the token's own slots only."""
    g = torch.Generator().manual_seed(4)
    b, h, kv, d, context = 1, 6, 2, 16, 37
    # slots: context (37), root, branch A (3 tokens), branch B (2 tokens)
    key = torch.randn(b, kv, context + 6, d, generator=g)
    value = torch.randn(b, kv, context + 6, d, generator=g)
    query = torch.randn(b, h, 6, d, generator=g)
    tree = torch.zeros(6, 6, dtype=torch.bool)
    tree[:, 0] = True
    for i in range(3):
        tree[1 + i, 1:2 + i] = True
    for i in range(2):
        tree[4 + i, 4:5 + i] = True
    allowed = torch.cat([torch.ones(6, context, dtype=torch.bool), tree], dim=1)[None, None]
    mask = allowed if kind == "bool" else torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    out = decode_kernel.decode_attention(query, key, value, mask, 0.25)
    # The same tokens after the branch B was accepted: context, root, B's two tokens.
    keep = list(range(context + 1)) + [context + 4, context + 5]
    chain_q = query[:, :, [0, 4, 5]]
    causal = torch.ones(3, len(keep), dtype=torch.bool).tril(len(keep) - 3)[None, None]
    chain_mask = causal if kind == "bool" else torch.where(causal, 0.0, torch.finfo(torch.float32).min)
    chain = decode_kernel.decode_attention(chain_q, key[:, :, keep], value[:, :, keep], chain_mask, 0.25)
    assert torch.equal(out[:, [0, 4, 5]], chain)
    ref = _matmul_form(query, key, value, mask, 0.25)
    assert torch.allclose(out, ref, atol=1e-5)
