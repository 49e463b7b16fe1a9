"""Peers for benchmarks/kv_cache.py, run in their own virtual environment (/work/venvs/kvpress:
torch 2.13.0 CPU, kvpress 0.5.5, transformers 5.2, optimum-quanto, hqq):

    /work/venvs/kvpress/bin/python benchmarks/kv_cache_peers.py INPUTS.json OUT.json

Set up (kvpress pins transformers<5.3, so never in the project's venv):

    python3 -m venv /work/venvs/kvpress
    /work/venvs/kvpress/bin/pip install torch==2.13.0          # the CPU build, first
    echo torch==2.13.0 > /tmp/c.txt
    /work/venvs/kvpress/bin/pip install -c /tmp/c.txt kvpress==0.5.5 "transformers<5.3" optimum-quanto hqq

INPUTS.json (written by kv_cache.py) holds the model folder, the token ids of the perplexity
documents and pass-key cases, and the compression ratios. Every kvpress press is driven the way
its own forward hook drives it, not through kvpress's pipeline: the context is prefilled once
per case with hooks recording each attention layer's input hidden states, rotary embeddings,
keys and values; then for each press, ``press.compress(module, hidden_states, keys, values,
None, kwargs)`` is called per layer exactly as ``BasePress.forward_hook`` calls it after the
layer's prefill attention (the prefill's outputs do not depend on the press, so this equals
prefilling under ``with press(model):``; checked on a short input at start-up), and the question
plus 8 greedy tokens (or the teacher-forced continuation) run over the compressed cache.
transformers' QuantizedCache (quanto and HQQ backends) is filled the same way, through its own
``update``. Bytes: presses keep full-precision entries, so their byte ratio is the fraction of
entries kept (ThinK zeroes key channels without removing them: no bytes saved); QuantizedCache
bytes count codes at nbits plus a 16-bit scale and zero per group of q_group_size, and the
16-bit residual window.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import QuantizedCache


def load(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    return model


@torch.no_grad()
def record(model, ids, previous=None):
    """Per layer: hidden states into attention, position embeddings, keys and values. With
    ``previous`` = (ids, rec) the longest common token prefix is reused and only the rest is run."""
    common = 0
    cache = DynamicCache()
    if previous is not None:
        a, b = previous[0][0], ids[0]
        m = min(len(a), len(b)) - 1
        diff = (a[:m] != b[:m]).nonzero()
        common = int(diff[0]) if len(diff) else m
        for i, r in previous[1].items():
            cache.update(r["keys"][:, :, :common], r["values"][:, :, :common], i)
    rec = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def pre(module, args, kwargs, i=i):
            rec.setdefault(i, {})["hidden"] = kwargs["hidden_states"]
            rec[i]["pos"] = kwargs["position_embeddings"]
        hooks.append(layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        pos = torch.arange(common, ids.shape[1]).unsqueeze(0)
        out = model(ids[:, common:], past_key_values=cache, position_ids=pos, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    for i, layer in enumerate(cache.layers):
        rec[i]["keys"], rec[i]["values"] = layer.keys, layer.values
        if common:
            p = previous[1][i]
            rec[i]["hidden"] = torch.cat([p["hidden"][:, :common], rec[i]["hidden"]], 1)
            rec[i]["pos"] = tuple(torch.cat([x[:, :common], y], 1) for x, y in zip(p["pos"], rec[i]["pos"]))
    return rec, out.logits[:, -1].float()


@torch.no_grad()
def pressed_cache(model, press, rec, n):
    press.post_init_from_model(model)
    cache = DynamicCache()
    for i, layer in enumerate(model.model.layers):
        module = layer.self_attn
        r = rec[i]
        cache.update(r["keys"], r["values"], i)
        kwargs = {"hidden_states": r["hidden"], "position_embeddings": r["pos"], "past_key_values": cache,
                  "cache_position": torch.arange(n)}
        k, v = r["keys"], r["values"]
        for p in getattr(press, "presses", [press]):  # a ComposedPress chains its presses' hooks
            k, v = p.compress(module, r["hidden"], k, v, None, kwargs)
            cache.layers[i].keys, cache.layers[i].values = k, v
    return cache


@torch.no_grad()
def quantized_cache(model, backend, bits, rec):
    cache = QuantizedCache(backend=backend, config=model.config, nbits=bits, q_group_size=64, residual_length=128)
    for i in range(len(model.model.layers)):
        cache.update(rec[i]["keys"], rec[i]["values"], i)
    return cache


def cache_ratio(cache, n, spec):
    """Full 16-bit bytes over held bytes, per the module docstring."""
    if spec["kind"] == "quantized":
        # after a prefill longer than residual_length every entry is quantized (the decoded
        # tokens then sit in the residual window; not counted, in the peer's favour)
        return 16 / (spec["bits"] + 2 * 16 / 64)
    kept = sum(l.keys.shape[2] for l in cache.layers) / len(cache.layers)
    return n / kept


def run(model, cache, ids, start):
    pos = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    return model(ids, past_key_values=cache, position_ids=pos, use_cache=True)


@torch.no_grad()
def greedy(model, cache, n, q, new_tokens):
    out = run(model, cache, q, n)
    pos, toks = n + q.shape[1], []
    for _ in range(new_tokens):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(int(nxt))
        out = run(model, cache, nxt, pos)
        pos += 1
    return toks


def presses(ratio):
    from kvpress import (ComposedPress, ExpectedAttentionPress, KnormPress, PyramidKVPress, SnapKVPress,
                         StreamingLLMPress, ThinKPress, TOVAPress)
    return {
        "kvpress StreamingLLM": StreamingLLMPress(compression_ratio=ratio),
        "kvpress SnapKV": SnapKVPress(compression_ratio=ratio),
        "kvpress TOVA": TOVAPress(compression_ratio=ratio),
        "kvpress Knorm": KnormPress(compression_ratio=ratio),
        "kvpress ExpectedAttention": ExpectedAttentionPress(compression_ratio=ratio),
        "kvpress PyramidKV": PyramidKVPress(compression_ratio=ratio),
        "kvpress SnapKV+ThinK(0.5)": ComposedPress([SnapKVPress(compression_ratio=ratio), ThinKPress(key_channel_compression_ratio=0.5)]),
    }


def methods(targets):
    out = {}
    for t in targets:
        for name, press in presses(1 - 1 / t).items():
            out[f"{name} @{t}x"] = {"kind": "press", "press": press, "target": t}
    for backend in ("quanto", "hqq"):
        for bits in (4, 2):
            out[f"QuantizedCache {backend} {bits}-bit"] = {"kind": "quantized", "backend": backend, "bits": bits, "target": None}
    return out


def build(model, spec, rec, n):
    if spec["kind"] == "press":
        return pressed_cache(model, spec["press"], rec, n)
    return quantized_cache(model, spec["backend"], spec["bits"], rec)


def main(inputs_path, out_path):
    inputs = json.loads(open(inputs_path).read())
    torch.manual_seed(0)
    model = load(inputs["model"])
    specs = methods(inputs["targets"])
    results = {"versions": {}, "ppl": {}, "passkey": {}}
    import kvpress, transformers
    results["versions"] = {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5", "transformers": transformers.__version__, "torch": torch.__version__}
    # check: replay equals prefilling under the press (short input)
    from kvpress import SnapKVPress
    ids = torch.tensor([inputs["ppl"][0]["prefix"][:300]])
    press = SnapKVPress(compression_ratio=0.5)
    with press(model):
        real = DynamicCache()
        model(ids, past_key_values=real, use_cache=True)
    rec, _ = record(model, ids)
    rep = pressed_cache(model, press, rec, ids.shape[1])
    results["replay_check_max_abs_diff"] = max(float((a.keys - b.keys).abs().max()) for a, b in zip(real.layers, rep.layers))
    for name, spec in specs.items():
        results["ppl"][name] = {"nll": [], "kl": [], "ratio": []}
        results["passkey"][name] = {"correct": 0, "ratio": []}
    for key in ("full",):
        results["ppl"][key] = {"nll": [], "kl": [], "ratio": []}
        results["passkey"][key] = {"correct": 0, "ratio": []}
    t0 = time.time()
    reuse = os.environ.get("KV_REUSE_PPL") == "1" and os.path.exists(out_path)
    if reuse:  # keep a finished perplexity stage, rerun the pass key
        results["ppl"] = json.loads(open(out_path).read())["ppl"]
    for doc in inputs["ppl"] if not reuse else []:
        prefix, cont = torch.tensor([doc["prefix"]]), torch.tensor([doc["continuation"]])
        rec, last = record(model, prefix)
        n = prefix.shape[1]
        ref = None
        for name, spec in {"full": None, **specs}.items():
            if spec is None:
                cache = DynamicCache()
                for i in range(len(rec)):
                    cache.update(rec[i]["keys"], rec[i]["values"], i)
                ratio = 1.0
            else:
                cache = build(model, spec, rec, n)
                ratio = cache_ratio(cache, n, spec)
            logits = run(model, cache, cont, n).logits.float()
            logp = torch.cat([last.unsqueeze(1), logits[:, :-1]], 1).log_softmax(-1)
            nll = float(-logp.gather(-1, cont.unsqueeze(-1)).mean())
            ref = logp if ref is None else ref
            r = results["ppl"][name]
            r["nll"].append(nll); r["kl"].append(float((ref.exp() * (ref - logp)).sum(-1).mean())); r["ratio"].append(ratio)
        print(f"ppl doc done {time.time() - t0:.0f}s", flush=True)
        json.dump(results, open(out_path, "w"), indent=1)
    previous = None
    for ci, case in enumerate(inputs["passkey"]):
        ctx, q = torch.tensor([case["context"]]), torch.tensor([case["question"]])
        rec, _ = record(model, ctx, previous)
        previous = (ctx, rec)
        n = ctx.shape[1]
        for name, spec in {"full": None, **specs}.items():
            if spec is not None and not (spec.get("target") == 8 and any(k in name for k in ("SnapKV @", "TOVA", "Knorm", "StreamingLLM", "ExpectedAttention"))) \
                    and name not in ("QuantizedCache quanto 4-bit", "QuantizedCache quanto 2-bit", "QuantizedCache hqq 2-bit"):
                continue  # pass key on a subset (time)
            if spec is None:
                cache = DynamicCache()
                for i in range(len(rec)):
                    cache.update(rec[i]["keys"], rec[i]["values"], i)
                ratio = 1.0
            else:
                cache = build(model, spec, rec, n)
                ratio = cache_ratio(cache, n, spec)
            text = inputs_tok_decode(inputs, greedy(model, cache, n, q, 8))
            results["passkey"][name]["correct"] += int(case["answer"] in text)
            results["passkey"][name]["ratio"].append(ratio)
        results["passkey_cases_done"] = ci + 1
        print(f"passkey case {ci + 1} done {time.time() - t0:.0f}s", flush=True)
        json.dump(results, open(out_path, "w"), indent=1)


_TOK = None


def inputs_tok_decode(inputs, ids):
    global _TOK
    if _TOK is None:
        from transformers import AutoTokenizer
        _TOK = AutoTokenizer.from_pretrained(inputs["model"])
    return _TOK.decode(ids)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
