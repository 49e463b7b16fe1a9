"""Calibration windows: long documents give several samples instead of their first window only."""

import pytest
import torch

from slimformer.errors import ConfigError
from slimformer.methods import CalibrationSettings, CompressionContext


def _samples(batches):
    """Each batch row's valid token ids, as tuples."""
    return [tuple(ids[mask.bool()].tolist()) for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"])]


def _expected(tokenizer, texts, max_length, windows):
    """The windows built by hand (a BERT tokenizer): the document's tokens cut into pieces of what
    a window holds besides [CLS] and [SEP], each wrapped in them; later pieces under a quarter
    window dropped."""
    body = max_length - 2
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = [ids[i : i + body] for i in range(0, max(len(ids), 1), body)][:windows]
        for k, piece in enumerate(pieces):
            full = [tokenizer.cls_token_id, *piece, tokenizer.sep_token_id]
            if k == 0 or len(full) >= max_length // 4:
                out.append(tuple(full))
    return out


@pytest.mark.parametrize("windows", [2, 5])
def test_windows_cover_long_documents_in_order(minilm, windows):
    tok = minilm.tokenizer
    texts = ["alpha beta gamma delta " * 40, "a short one", "one two three four five six seven " * 9]
    settings = CalibrationSettings(n_samples=3, max_length=32, batch_size=4, windows=windows)
    ctx = CompressionContext(settings)
    got = _samples(ctx.tokenize(tok, texts))
    want = _expected(tok, texts, 32, windows)
    assert sorted(got) == sorted(want)
    assert len(got) > len(texts)  # long documents gave more than one sample
    # the documents' first windows are exactly what truncation alone gives
    first = _samples(CompressionContext(CalibrationSettings(n_samples=3, max_length=32, batch_size=4)).tokenize(tok, texts))
    assert set(first) <= set(got)
    lengths = [len(s) for s in got]
    assert lengths == sorted(lengths, reverse=True)  # batched longest first
    assert all(b["input_ids"].shape == b["attention_mask"].shape and "token_type_ids" not in b for b in ctx.tokenize(tok, texts))


def test_a_short_tail_window_is_dropped(minilm):
    tok = minilm.tokenizer
    body = 30  # max_length 32 less [CLS] and [SEP]
    ids = tok("word " * 200, add_special_tokens=False)["input_ids"]
    text = tok.decode(ids[: body + 3])  # a second window of 3 tokens + 2 special tokens: under a quarter of 32
    got = _samples(CompressionContext(CalibrationSettings(max_length=32, windows=4)).tokenize(tok, [text]))
    assert len(got) == 1 and len(got[0]) == 32


def test_windows_must_be_a_positive_integer():
    with pytest.raises(ConfigError, match="windows"):
        CalibrationSettings(windows=0)
    with pytest.raises(ConfigError, match="windows"):
        CalibrationSettings(windows=1.5)


def test_windows_reach_the_compression_batches(minilm):
    ctx = CompressionContext(CalibrationSettings(source="stdlib-docs", n_samples=8, max_length=32, batch_size=4, windows=3))
    one = CompressionContext(CalibrationSettings(source="stdlib-docs", n_samples=8, max_length=32, batch_size=4))
    n = sum(len(b["input_ids"]) for b in ctx.batches(minilm.tokenizer))
    tokens = sum(int(b["attention_mask"].sum()) for b in ctx.batches(minilm.tokenizer))
    assert n > 8 and tokens > sum(int(b["attention_mask"].sum()) for b in one.batches(minilm.tokenizer))
    assert torch.is_tensor(ctx.batches(minilm.tokenizer)[0]["input_ids"])


def test_windows_of_a_tokenizer_without_special_tokens_tile_the_document(tiny_factory):
    tok = tiny_factory("llama").tokenizer
    text = "Return the sum of the arguments, a number or a list of numbers. " * 20
    ids = tok(text)["input_ids"]
    got = _samples(CompressionContext(CalibrationSettings(max_length=24, windows=100)).tokenize(tok, [text]))
    pieces = [ids[i : i + 24] for i in range(0, len(ids), 24)]
    want = [tuple(p) for k, p in enumerate(pieces) if k == 0 or len(p) >= 6]
    assert sorted(got) == sorted(want) and len(got) > 3
