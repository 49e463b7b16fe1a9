"""Long-input evaluation of KV-cache compression, each method against the full cache in one run.

- ``continuation_quality``: perplexity and KL of a continuation given a compressed prefix
  (teacher-forced, one chunk, positions passed explicitly);
- ``passkey_cases`` / ``passkey_accuracy``: a 5-digit pass key hidden at several depths of
  filler text, the context prefilled into the cache (compressed there), then the question and
  ``new_tokens`` greedy tokens decoded over the compressed cache;
- ``decode_speed``: tokens/s and KV bytes of greedy decoding after a prefill of a given length.

Prefill is shared: ``record_prefill`` runs the full-cache prefill once and keeps each layer's
keys, values and (post-rotary) queries; ``replay`` writes them into a fresh compressed cache
through the same ``update`` path the forward uses. This is exact: during prefill every layer
attends over the uncompressed prefix (compression writes back after attention), so the hidden
states, keys, values and queries of the prefill do not depend on the method.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from slimformer.models.adapters import ArchitectureAdapter
from slimformer.runtime.kv import KVCache, kv_cache
from slimformer.runtime.kv.base import token_information


@dataclass
class Prefill:
    """Per-layer ``keys``/``values`` ``(b, h, n, d)`` and ``queries`` ``(b, hq, n, d)`` of a
    prefill, the logits of its last position ``(b, vocab)``, the token ids ``(b, n)``, each
    token's self-information ``(b, n)`` and the final hidden states ``(b, n, hidden)``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    queries: list[torch.Tensor]
    last_logits: torch.Tensor
    input_ids: torch.Tensor
    mass: list[torch.Tensor] | None = None  # accumulated attention per layer (computed once, on demand)
    information: torch.Tensor | None = None
    hiddens: torch.Tensor | None = None  # final hidden states (to resume a shared prefix)


@torch.no_grad()
def record_prefill(model, input_ids: torch.Tensor, previous: Prefill | None = None) -> Prefill:
    """Run ``input_ids`` ``(1, n)`` through ``model`` once, capturing every layer's cache inputs.

    With ``previous``, the longest common prefix of token ids is reused from it and only the rest
    is run (positions continue), so cases that share a prefix pay for it once."""
    recorder = KVCache(kv_config_recorder(), model.config.num_hidden_layers)
    common = 0
    if previous is not None:
        a, b = previous.input_ids[0], input_ids[0]
        m = min(len(a), len(b)) - 1
        diff = (a[:m] != b[:m]).nonzero()
        common = int(diff[0]) if len(diff) else m
    if common > 0:
        for layer, k, v, q in zip(recorder.layers, previous.keys, previous.values, previous.queries):
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k[:, :, :common], v[:, :, :common]
            layer.recent_queries = q[:, :, :common]
            layer.seen = common
    pos = torch.arange(common, input_ids.shape[1]).unsqueeze(0)
    adapter = ArchitectureAdapter(model)
    final: list[torch.Tensor] = []
    grab = adapter.base().register_forward_hook(lambda m, a, out: final.append(out[0] if isinstance(out, tuple) else out.last_hidden_state))
    try:
        with recorder.attach(model):
            out = model(input_ids[:, common:], cache=recorder, position_ids=pos, use_cache=True, logits_to_keep=1)
    finally:
        grab.remove()
    hidden = final[0]
    resumed = previous is not None and common > 0
    head = adapter.head()[1]
    before = head(previous.hiddens[:, common - 1]).float().log_softmax(-1) if resumed else None
    info = token_information(head, hidden, input_ids[:, common:], before)
    if resumed:
        info = torch.cat([previous.information[:, :common], info], dim=1)
    hiddens = hidden if not resumed else torch.cat([previous.hiddens[:, :common], hidden], dim=1)
    return Prefill(
        [l.keys for l in recorder.layers], [l.values for l in recorder.layers],
        [l.recent_queries for l in recorder.layers], out.logits[:, -1].float(), input_ids,
        information=info, hiddens=hiddens,
    )


def kv_config_recorder():
    from slimformer.runtime.kv.base import KVConfig

    class _Recorder(KVConfig):  # keeps everything at model precision and every query
        name = "recorder"
        query_window = 1 << 30

    return _Recorder(fp_dtype="model")


@torch.no_grad()
def replay(model, spec, prefill: Prefill):
    """A compressed cache holding ``prefill`` as if it had been built in the forward."""
    cache = kv_cache(model, spec) if spec is not None else None
    if cache is None:
        cache = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(zip(prefill.keys, prefill.values)):
            cache.update(k, v, i)
        return cache
    scaling = [getattr(a, "scaling", None) for a in _attentions(model)]
    if cache.config.accumulates and prefill.mass is None:
        from slimformer.runtime.kv.base import attention_mass

        prefill.mass = [attention_mass(q, k, s).sum(2) for q, k, s in zip(prefill.queries, prefill.keys, scaling)]
    for i, layer in enumerate(cache.layers):
        layer.scaling = scaling[i]
        layer.pending_queries = prefill.queries[i]
        if cache.config.accumulates:
            layer.precomputed_mass = prefill.mass[i].clone()
        layer.update(prefill.keys[i], prefill.values[i])
    if cache.config.needs_information:
        cache.end_forward(prefill.information, prefill.last_logits.log_softmax(-1))
    return cache


def _attentions(model):
    adapter = ArchitectureAdapter(model)
    return [adapter.attention(i) for i in range(adapter.num_layers())]


def kv_bytes(cache, element_size: int = 2) -> tuple[int, int]:
    """``(measured bytes, bytes of the same tokens in a full cache at element_size bytes)``."""
    if isinstance(cache, KVCache):
        seen = cache.seen_tokens
        full = 0
        for layer in cache.layers:
            b, h, _, d = layer.keys.shape
            full += 2 * b * h * seen * d * element_size
        return cache.nbytes, full
    total = sum(l.keys.numel() * element_size + l.values.numel() * element_size for l in cache.layers)
    return total, total


def _run(model, cache, ids: torch.Tensor, start: int):
    pos = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    if isinstance(cache, KVCache):
        with cache.attach(model):
            return model(ids, cache=cache, position_ids=pos, use_cache=True)
    return model(ids, cache=cache, position_ids=pos, use_cache=True)


@torch.no_grad()
def continuation_quality(model, specs: dict, prefix: torch.Tensor, continuation: torch.Tensor) -> dict:
    """NLL/perplexity of ``continuation`` ``(1, m)`` after ``prefix`` ``(1, n)`` and the KL from the
    full cache's next-token distributions, for every ``specs`` entry (name -> recipe step; the
    full cache is added as ``"full"``)."""
    prefill = record_prefill(model, prefix)
    results = {}
    ref_logp = None
    for name, spec in {"full": None, **specs}.items():
        cache = replay(model, spec, prefill)
        measured, full = kv_bytes(cache)
        logits = _run(model, cache, continuation, prefix.shape[1]).logits.float()
        logits = torch.cat([prefill.last_logits.unsqueeze(1), logits[:, :-1]], dim=1)
        logp = logits.log_softmax(-1)
        nll = -logp.gather(-1, continuation.unsqueeze(-1)).squeeze(-1).mean().item()
        if ref_logp is None:
            ref_logp = logp
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
        results[name] = {"nll": nll, "ppl": float(torch.tensor(nll).exp()), "kl": kl, "kv_bytes": measured, "full_bytes_16bit": full,
                         "ratio": full / max(measured, 1)}
    return results


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_cases(tokenizer, n_cases: int, length: int, seed: int = 0) -> list[dict]:
    """``n_cases`` pass-key prompts of about ``length`` tokens, the key at evenly spread depths."""
    rng = random.Random(seed)
    per = len(tokenizer(FILLER)["input_ids"])
    repeats = max(1, (length - 60) // per)
    cases = []
    for i in range(n_cases):
        key = str(rng.randint(10000, 99999))
        depth = (i + 0.5) / n_cases
        cut = int(repeats * depth)
        context = (
            "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
            + FILLER * cut + f"The pass key is {key}. Remember it. {key} is the pass key. " + FILLER * (repeats - cut)
        )
        cases.append({"context": context, "question": "\nWhat is the pass key? The pass key is", "answer": key, "depth": depth})
    return cases


@torch.no_grad()
def answer(model, cache, context_len: int, question_ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy decode after a prefilled ``cache``: the question ``(1, q)`` then ``new_tokens`` tokens."""
    out = _run(model, cache, question_ids, context_len)
    pos = context_len + question_ids.shape[1]
    tokens = []
    for _ in range(new_tokens):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        out = _run(model, cache, nxt, pos)
        pos += 1
    return tokens


@torch.no_grad()
def passkey_accuracy(model, tokenizer, specs: dict, cases: list[dict], new_tokens: int = 8, progress=None) -> dict:
    """Fraction of ``cases`` whose key appears in the decoded answer, per spec (and ``"full"``),
    with the measured KV bytes ratio; the context is prefilled once per case and replayed."""
    results = {name: {"correct": 0, "ratio": []} for name in {"full": None, **specs}}
    for case in (progress(cases) if progress else cases):
        ctx = tokenizer(case["context"], return_tensors="pt")["input_ids"]
        q = tokenizer(case["question"], return_tensors="pt", add_special_tokens=False)["input_ids"]
        prefill = record_prefill(model, ctx)
        for name, spec in {"full": None, **specs}.items():
            cache = replay(model, spec, prefill)
            measured, full = kv_bytes(cache)
            text = tokenizer.decode(answer(model, cache, ctx.shape[1], q, new_tokens))
            results[name]["correct"] += int(case["answer"] in text)
            results[name]["ratio"].append(full / max(measured, 1))
    for r in results.values():
        r["accuracy"] = r["correct"] / len(cases)
        r["ratio"] = sum(r["ratio"]) / len(r["ratio"])
    return results


@torch.no_grad()
def decode_speed(model, spec, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Greedy decode ``new_tokens`` after prefilling ``prompt`` ``(1, n)`` (through the real
    forward, compression included): decode tokens/s (prefill excluded) and KV bytes held."""
    cache = kv_cache(model, spec) if spec is not None else DynamicCache(config=model.config)
    n = prompt.shape[1]
    out = _run(model, cache, prompt, 0)
    nxt = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for i in range(new_tokens):
        out = _run(model, cache, nxt, n + i)
        nxt = out.logits[:, -1:].argmax(-1)
    elapsed = time.perf_counter() - start
    measured, full = kv_bytes(cache, element_size=prompt.new_empty(0, dtype=model.dtype).element_size()) if spec is None else kv_bytes(cache)
    return {"tokens_per_s": new_tokens / elapsed, "kv_bytes": measured}
