"""One call that measures a compressed model against its original: quality and cost."""

from __future__ import annotations

import dataclasses

from slimformer.data import TextSpec, load_texts
from slimformer.evaluate.cost import compare_cost
from slimformer.evaluate.quality import causal_quality, encoder_quality, encoder_reference
from slimformer.evaluate.settings import EvalSettings
from slimformer.io.serialization import kernel_summary
from slimformer.models.loading import LoadedModel


def latency_batch(loaded: LoadedModel, settings: EvalSettings) -> dict:
    """The fixed batch timed for latency: ``latency_batch`` held-out texts of exactly
    ``latency_tokens`` tokens (batch, seq)."""
    texts = load_texts(TextSpec(source=settings.source, split="evaluation", n=settings.latency_batch, seed=settings.seed + 1, min_chars=600))
    texts = (texts * settings.latency_batch)[: settings.latency_batch]
    batch = dict(loaded.tokenizer(texts, padding="max_length", truncation=True, max_length=settings.latency_tokens, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    if loaded.kind == "causal-lm":
        batch["use_cache"] = False
    return batch


def evaluate(original: LoadedModel, compressed: LoadedModel, settings: EvalSettings | None = None, progress: bool = False, cache: dict | None = None) -> dict:
    """Quality of ``compressed`` against ``original`` on held-out text, and both models' cost
    measured in the same run. Returns a JSON-ready dict with ``quality``, ``cost``, ``kernels``
    (execution path counts) and the ``settings`` used.

    ``cache``: a dict kept by the caller across calls with the same ``original`` (e.g. a sweep);
    the original's reference embeddings are computed once and kept there.
    """
    settings = settings or EvalSettings()
    texts = load_texts(TextSpec(source=settings.source, split="evaluation", n=settings.n_texts, seed=settings.seed))
    if compressed.kind == "encoder":
        key = ("encoder-reference", id(original.model), settings)
        reference = cache.get(key) if cache is not None else None
        if reference is None:
            reference = encoder_reference(original, texts, settings.n_queries, settings.max_length, settings.batch_size, progress)
            if cache is not None:
                cache[key] = reference
        quality = encoder_quality(original, compressed, texts, settings.n_queries, settings.max_length, settings.batch_size, progress, reference)
    else:
        quality = causal_quality(original, compressed, texts, settings.max_length, min(settings.batch_size, 8), progress)
    batch = latency_batch(original, settings)
    cost = compare_cost(original.model, compressed.model, batch, settings.latency_repeats, settings.latency_warmup)
    return {
        "kind": compressed.kind,
        "quality": quality,
        "cost": cost,
        "kernels": kernel_summary(compressed.model),
        "settings": dataclasses.asdict(settings),
    }
