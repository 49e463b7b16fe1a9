"""One call that measures a compressed model against its original: quality and cost."""

from __future__ import annotations

import dataclasses

from slimformer.data import TextSpec, load_texts
from slimformer.errors import ConfigError
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


def check_comparable(original: LoadedModel, compressed: LoadedModel) -> None:
    """Raise ``ConfigError`` unless the two models can be compared output for output."""
    a, b = original.model.config, compressed.model.config
    checks = [("kind", original.kind, compressed.kind), ("hidden size", a.hidden_size, b.hidden_size), ("vocabulary", a.vocab_size, b.vocab_size)]
    for what, x, y in checks:
        if x != y:
            raise ConfigError(f"cannot compare the models: their {what} differs ({x} vs {y})", "evaluate a compressed model against the model it was made from")


def inference(loaded: LoadedModel, batch: dict):
    """One timed inference of ``batch``: embeddings for encoders (through the dynamic runtime
    when the model has one), logits for causal LMs."""
    if loaded.kind == "encoder":
        return lambda: loaded.embed(batch)
    return lambda: loaded.model(**batch)


def dynamic_statistics(loaded: LoadedModel, texts: list[str], settings: EvalSettings) -> dict:
    """Blocks run per input, real tokens entering each block, and estimated FLOPs relative to
    running every block on every token, over the evaluation texts."""
    from slimformer.evaluate.quality import _tokenize

    layers: list[int] = []
    flops = full = 0.0
    blocks = loaded.adapter.num_layers()
    tokens = [0.0] * blocks
    dim = loaded.model.config.hidden_size
    ffn = getattr(loaded.model.config, "intermediate_size", 4 * dim)
    for i in range(0, len(texts), settings.batch_size):
        batch = _tokenize(loaded, texts[i : i + settings.batch_size], settings.max_length)
        _, stats = loaded.embed(batch, return_stats=True)
        layers += stats.layers_run.tolist()
        for block, (t, r) in enumerate(zip(stats.tokens_per_layer, stats.rows_per_layer)):
            tokens[block] += t * r
        flops += stats.flops
        T = batch["input_ids"].shape[1]
        full += blocks * batch["input_ids"].shape[0] * (2 * T * (4 * dim * dim + 2 * dim * ffn) + 4 * T * T * dim)
    n = len(layers)
    return {
        "mean_layers_run": sum(layers) / n,
        "layers_run_histogram": {str(k): layers.count(k) for k in sorted(set(layers))},
        "mean_tokens_entering_block": [t / n for t in tokens],
        "flops_ratio": flops / full if full else None,
        "layers_run_per_input": layers,
    }


def plan_for_evaluation(original: LoadedModel, compressed: LoadedModel, execution="auto") -> None:
    """Plan ``compressed``'s execution on this machine before it is measured (unless it is
    planned already, is the original itself, or planning is off)."""
    from slimformer.runtime.planner import as_plan_settings, plan_execution, planner_enabled

    settings = as_plan_settings(execution)
    if settings is None or not planner_enabled() or compressed is original or compressed.execution is not None:
        return
    plan_execution(compressed, settings)


def evaluate(original: LoadedModel, compressed: LoadedModel, settings: EvalSettings | None = None, progress: bool = False, cache: dict | None = None, execution="auto") -> dict:
    """Quality of ``compressed`` against ``original`` on held-out text, and both models' cost
    measured in the same run. Returns a JSON-ready dict with ``quality``, ``cost``, ``kernels``
    (execution path counts) and the ``settings`` used.

    ``cache``: a dict kept by the caller across calls with the same ``original`` (e.g. a sweep);
    the original's reference embeddings are computed once and kept there. ``execution``: the
    execution planner's settings for ``compressed`` (see ``slimformer.load``; ``"off"``: the
    capability-chosen kernels); the plan (paths per layer and what the alternatives measured
    on this machine) is returned under ``execution``.
    """
    settings = settings or EvalSettings()
    check_comparable(original, compressed)
    plan_for_evaluation(original, compressed, execution)
    texts = load_texts(TextSpec(source=settings.source, split="evaluation", n=settings.n_texts, seed=settings.seed))
    if compressed.kind == "encoder" and len(texts) <= settings.n_queries + 10:
        raise ConfigError(
            f"the evaluation text has only {len(texts)} held-out documents, too few for {settings.n_queries} queries and their passages",
            "use a larger text source or fewer evaluation texts (--eval-texts)",
        )
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
    cost = compare_cost(
        original.model, compressed.model, inference(original, batch), inference(compressed, batch),
        list(batch["input_ids"].shape), settings.latency_repeats, settings.latency_warmup,
    )
    if compressed.kind == "encoder" and compressed.dynamic is not None and compressed.dynamic.active():
        quality["dynamic"] = dynamic_statistics(compressed, texts, settings)
    return {
        "kind": compressed.kind,
        "quality": quality,
        "cost": cost,
        "kernels": kernel_summary(compressed.model),
        "execution": compressed.execution.summary() if compressed.execution is not None else None,
        "settings": dataclasses.asdict(settings),
    }
