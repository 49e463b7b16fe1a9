"""Quality of a compressed model against its original, on held-out text.

Encoders / embedding models: cosine similarity of pooled embeddings (mean and worst) and
retrieval agreement (overlap of each query's top-10 neighbours among the passages).
Causal LMs: perplexity, KL divergence of next-token distributions (original || compressed),
and top-1 agreement of the next-token predictions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimformer.models.loading import LoadedModel
from slimformer.models.pooling import pool  # noqa: F401  (re-exported: evaluate.quality.pool)


def _tokenize(loaded: LoadedModel, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    from slimformer.models.loading import max_positions

    max_length = min(max_length, max_positions(loaded) or max_length)
    batch = dict(loaded.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    return batch


@torch.no_grad()
def encode(loaded: LoadedModel, texts: list[str], max_length: int = 128, batch_size: int = 32, progress: bool = False, desc: str = "encode") -> torch.Tensor:
    """Sentence embeddings (n, dim) float32, L2-normalised, pooled as the model's pooling says.

    Texts are batched by length (longest first) so each batch is padded as little as possible
    (``embed`` then buckets what padding remains); rows come back in the order of ``texts``."""
    from slimformer.models.batching import length_order, restore_order
    from slimformer.models.loading import max_positions

    if not texts:
        return torch.zeros(0, loaded.model.config.hidden_size)
    limit = min(max_length, max_positions(loaded) or max_length)
    # tokenized once: the lengths order the batches, and each batch is padded from these ids
    encoded = loaded.tokenizer(list(texts), truncation=True, max_length=limit)
    encoded.pop("token_type_ids", None)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    order = length_order(lengths) if getattr(loaded, "bucketing", True) else list(range(len(texts)))
    out = []
    for i in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
        rows = order[i : i + batch_size]
        batch = dict(loaded.tokenizer.pad({key: [values[r] for r in rows] for key, values in encoded.items()}, return_tensors="pt"))
        out.append(F.normalize(loaded.embed(batch), dim=-1))
    return restore_order(torch.cat(out), order)


def first_sentence(text: str) -> str:
    line = text.strip().split("\n\n")[0].replace("\n", " ")
    head = line.split(". ")[0]
    return head if len(head) > 20 else line


def topk_overlap(queries_a: torch.Tensor, passages_a: torch.Tensor, queries_b: torch.Tensor, passages_b: torch.Tensor, k: int = 10) -> float:
    """Mean over queries of |top-k(a) ∩ top-k(b)| / k; embeddings (n, dim) L2-normalised."""
    k = min(k, passages_a.shape[0])
    ta = (queries_a @ passages_a.t()).topk(k, dim=1).indices
    tb = (queries_b @ passages_b.t()).topk(k, dim=1).indices
    hits = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ta, tb)]
    return float(sum(hits) / len(hits))


def encoder_reference(original: LoadedModel, texts: list[str], n_queries: int, max_length: int, batch_size: int, progress: bool = False) -> dict:
    """The original's query (n_queries, dim) and passage (n - n_queries, dim) embeddings."""
    queries = [first_sentence(t) for t in texts[:n_queries]]
    return {
        "q": encode(original, queries, max_length, batch_size, progress, "original queries"),
        "p": encode(original, texts[n_queries:], max_length, batch_size, progress, "original passages"),
    }


def encoder_quality(original: LoadedModel, compressed: LoadedModel, texts: list[str], n_queries: int, max_length: int, batch_size: int, progress: bool = False, reference: dict | None = None) -> dict:
    """Embedding fidelity of ``compressed`` to ``original`` on ``texts`` (the first ``n_queries``
    are turned into queries, the rest are passages). ``reference``: the original's embeddings
    from :func:`encoder_reference`, when already computed."""
    queries = [first_sentence(t) for t in texts[:n_queries]]
    passages = texts[n_queries:]
    if reference is None:
        reference = encoder_reference(original, texts, n_queries, max_length, batch_size, progress)
    q = encode(compressed, queries, max_length, batch_size, progress, "compressed queries")
    p = encode(compressed, passages, max_length, batch_size, progress, "compressed passages")
    cos = torch.cat([(q * reference["q"]).sum(-1), (p * reference["p"]).sum(-1)])
    return {
        "embedding_cosine_mean": float(cos.mean()),
        "embedding_cosine_min": float(cos.min()),
        "retrieval_agreement_at_10": topk_overlap(reference["q"], reference["p"], q, p, k=10),
        "n_texts": len(texts),
        "n_queries": n_queries,
    }


@torch.no_grad()
def _next_token_logprobs(loaded: LoadedModel, batch: dict) -> torch.Tensor:
    return F.log_softmax(loaded.model(**batch, use_cache=False).logits.float(), dim=-1)


@torch.no_grad()
def document_kl(original: LoadedModel, models: dict, texts: list[str], max_length: int, batch_size: int = 8) -> tuple[dict[str, list[float]], list[int]]:
    """KL(original || model) summed over each document's next-token positions, for every model
    of ``models`` ({name: LoadedModel}), and each document's count of those positions: the
    original runs once per batch. Divide sums by counts for KL per token; resample documents
    (paired: the same for every model) for intervals."""
    sums: dict[str, list[float]] = {name: [] for name in models}
    counts: list[int] = []
    for i in range(0, len(texts), batch_size):
        batch = _tokenize(original, texts[i : i + batch_size], max_length)
        valid = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).bool()
        lo = _next_token_logprobs(original, batch)[:, :-1]
        for name, m in models.items():
            per_token = (lo.exp() * (lo - _next_token_logprobs(m, batch)[:, :-1])).sum(-1)
            sums[name] += [float(per_token[r][valid[r]].sum()) for r in range(per_token.shape[0])]
        counts += valid.sum(1).tolist()
    return sums, counts


def causal_quality(original: LoadedModel, compressed: LoadedModel, texts: list[str], max_length: int, batch_size: int, progress: bool = False) -> dict:
    """Perplexity of both models, KL(original || compressed) per token, and top-1 agreement."""
    nll_o = nll_c = kl = agree = 0.0
    count = 0
    for i in tqdm(range(0, len(texts), batch_size), desc="causal-lm quality", disable=not progress, unit="batch"):
        batch = _tokenize(original, texts[i : i + batch_size], max_length)
        lo = _next_token_logprobs(original, batch)[:, :-1]
        lc = _next_token_logprobs(compressed, batch)[:, :-1]
        target = batch["input_ids"][:, 1:]
        valid = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).bool()
        lo, lc, target = lo[valid], lc[valid], target[valid]
        nll_o += float(-lo.gather(-1, target.unsqueeze(-1)).sum())
        nll_c += float(-lc.gather(-1, target.unsqueeze(-1)).sum())
        kl += float((lo.exp() * (lo - lc)).sum())
        agree += float((lo.argmax(-1) == lc.argmax(-1)).sum())
        count += int(valid.sum())
    return {
        "perplexity": math.exp(nll_c / count),
        "perplexity_original": math.exp(nll_o / count),
        "kl_divergence": kl / count,
        "top1_agreement": agree / count,
        "n_tokens": count,
    }
