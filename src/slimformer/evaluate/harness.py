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


def evaluate(original: LoadedModel, compressed: LoadedModel, settings: EvalSettings | None = None, progress: bool = False, cache: dict | None = None, execution="auto", compile: bool | str = False) -> dict:
    """Quality of ``compressed`` against ``original`` on held-out text, and both models' cost
    measured in the same run. Returns a JSON-ready dict with ``quality``, ``cost``, ``kernels``
    (execution path counts) and the ``settings`` used.

    ``cache``: a dict kept by the caller across calls with the same ``original`` (e.g. a sweep);
    the original's reference embeddings are computed once and kept there. ``execution``: the
    execution planner's settings for ``compressed`` (see ``slimformer.load``; ``"off"``: the
    capability-chosen kernels); the plan (paths per layer and what the alternatives measured
    on this machine) is returned under ``execution``. ``compile``: also time ``compressed``
    compiled (``True``/``"inductor"``: ``torch.compile`` with Inductor; ``"aot_eager"``: graph
    capture only) — it is compiled on the latency batch after the quality measurement, kept for
    the timing only if its output agrees with eager and it is faster, and taken off again; what
    happened (compile seconds, eager and compiled medians, largest difference) is returned under
    ``compile``. The original is always timed as loaded (eager).
    """
    settings = settings or EvalSettings()
    backend = _compile_backend(compile)
    check_comparable(original, compressed)
    plan_for_evaluation(original, compressed, execution)
    texts = load_texts(TextSpec(source=settings.source, split="evaluation", n=settings.n_texts, seed=settings.seed))
    if compressed.kind == "encoder" and len(texts) <= settings.n_queries + 10:
        raise ConfigError(
            f"the evaluation text has only {len(texts)} held-out documents, too few for {settings.n_queries} queries and their passages",
            "use a larger text source or fewer evaluation texts (--eval-texts)",
        )
    quality = _quality_on(original, compressed, texts, settings, settings.n_queries, progress, cache)
    transfer = transfer_quality(original, compressed, settings, quality, progress, cache)
    batch = latency_batch(original, settings)
    compiled = _compile_for_timing(compressed, batch, backend) if backend and compressed is not original else None
    try:
        cost = compare_cost(
            original.model, compressed.model, inference(original, batch), inference(compressed, batch),
            list(batch["input_ids"].shape), settings.latency_repeats, settings.latency_warmup,
        )
    finally:
        if compiled is not None:
            from slimformer.runtime.compile import uncompile_model

            uncompile_model(compressed)
    if _runs_dynamic(compressed):
        quality["dynamic"] = dynamic_statistics(compressed, texts, settings)
    return {
        "kind": compressed.kind,
        "quality": quality,
        "cost": cost,
        "kernels": kernel_summary(compressed.model),
        "execution": compressed.execution.summary() if compressed.execution is not None else None,
        "settings": dataclasses.asdict(settings),
        **({"transfer": transfer} if transfer is not None else {}),
        **({"compile": compiled} if compiled is not None else {}),
    }


def _runs_dynamic(loaded: LoadedModel) -> bool:
    """An encoder whose blocks run through the dynamic runtime (early exit, token reduction)."""
    return loaded.kind == "encoder" and loaded.dynamic is not None and loaded.dynamic.active()


def _compile_backend(compile: bool | str | None) -> str | None:
    """``evaluate``'s ``compile`` argument as a ``torch.compile`` backend (None: no compiling)."""
    if not compile:
        return None
    backend = "inductor" if compile is True else str(compile)
    if backend not in ("inductor", "aot_eager"):
        raise ConfigError(f"compile={compile!r} is not a compiler backend", "use True ('inductor') or 'aot_eager'")
    return backend


def _compile_for_timing(compressed: LoadedModel, batch: dict, backend: str) -> dict:
    """Compile ``compressed`` on the latency ``batch`` with ``backend`` (see :func:`evaluate`);
    the :class:`~slimformer.runtime.compile.CompileReport` as a dict with its ``speedup`` over eager."""
    from slimformer.runtime.compile import compile_model

    # a model with dynamic settings gets its runs of blocks between reduction / exit points compiled
    report = compile_model(compressed, batch, backend=backend)
    return {**dataclasses.asdict(report), "backend": backend, "speedup": report.speedup if report.compiled else None}


def _quality_on(original: LoadedModel, compressed: LoadedModel, texts: list[str], settings: EvalSettings, n_queries: int, progress: bool, cache: dict | None) -> dict:
    if compressed.kind == "encoder":
        key = ("encoder-reference", id(original.model), settings, n_queries, tuple(hash(t) for t in texts))
        reference = cache.get(key) if cache is not None else None
        if reference is None:
            reference = encoder_reference(original, texts, n_queries, settings.max_length, settings.batch_size, progress)
            if cache is not None:
                cache[key] = reference
        return encoder_quality(original, compressed, texts, n_queries, settings.max_length, settings.batch_size, progress, reference)
    return causal_quality(original, compressed, texts, settings.max_length, min(settings.batch_size, 8), progress)


# A gap between the two held-out sources larger than this is flagged in the report and manifest.
GAP_LIMITS = {"embedding_cosine_mean": 0.01, "retrieval_agreement_at_10": 0.05, "perplexity_ratio": 0.05}


def transfer_quality(original: LoadedModel, compressed: LoadedModel, settings: EvalSettings, quality: dict, progress: bool = False, cache: dict | None = None) -> dict | None:
    """Quality on ``settings.transfer_source`` (held-out text of a different kind from the
    calibration text), the gap to ``quality`` (measured on ``settings.source``) and whether it is
    large (``GAP_LIMITS``: cosine 0.01, top-10 agreement 0.05, perplexity ratio 5%)."""
    source = settings.transfer_source
    if source is None or source == settings.source:
        return None
    texts = load_texts(TextSpec(source=source, split="evaluation", n=settings.n_texts, seed=settings.seed))
    n_queries = min(settings.n_queries, max(1, len(texts) // 4))
    if len(texts) < 12:
        return {"source": source, "skipped": f"only {len(texts)} held-out documents"}
    other = _quality_on(original, compressed, texts, settings, n_queries, progress, cache)
    if compressed.kind == "encoder":
        gap = {k: quality[k] - other[k] for k in ("embedding_cosine_mean", "retrieval_agreement_at_10")}
    else:
        ratio = lambda q: q["perplexity"] / q["perplexity_original"]  # noqa: E731
        gap = {"perplexity_ratio": ratio(other) / ratio(quality) - 1.0, "kl_divergence": other["kl_divergence"] - quality["kl_divergence"]}
    large = [k for k, limit in GAP_LIMITS.items() if k in gap and gap[k] > limit]
    return {
        "source": source,
        "quality": other,
        "gap": gap,
        "large_gap": bool(large),
        "warning": (
            f"quality on {source} (text of another kind than the calibration text) is lower than on {settings.source}: "
            + ", ".join(f"{k} gap {gap[k]:.4f} > {GAP_LIMITS[k]}" for k in large)
            + "; calibrate on text like yours (calibration.source: your .txt/.jsonl)"
        ) if large else None,
    }
