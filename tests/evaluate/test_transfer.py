"""Every evaluation also measures a second held-out source of a different kind from the
calibration text, and flags a large gap between the two."""

import copy

import torch

from slimformer.evaluate import EvalSettings, evaluate
from slimformer.evaluate.harness import GAP_LIMITS, transfer_quality
from slimformer.evaluate.report import markdown_table, row_of

FAST = EvalSettings(n_texts=40, n_queries=10, max_length=64, latency_batch=4, latency_tokens=32, latency_repeats=1, latency_warmup=0)


def test_evaluate_reports_the_other_kind_and_the_gap(tiny_factory):
    original = tiny_factory("bert")
    same = evaluate(original, copy.deepcopy(original), FAST)
    transfer = same["transfer"]
    assert transfer["source"] == "package-docs" and transfer["quality"]["n_texts"] == 40
    assert abs(transfer["quality"]["embedding_cosine_mean"] - 1.0) < 1e-6
    assert abs(transfer["gap"]["embedding_cosine_mean"]) < 1e-6 and transfer["large_gap"] is False and transfer["warning"] is None
    assert evaluate(original, copy.deepcopy(original), EvalSettings(**{**FAST.__dict__, "transfer_source": None})).get("transfer") is None


def test_a_large_gap_is_flagged_in_the_result_and_the_report(tiny_factory):
    original = tiny_factory("bert")
    damaged = copy.deepcopy(original)
    torch.manual_seed(0)
    with torch.no_grad():
        for module in damaged.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(torch.randn_like(module.weight) * 3 * module.weight.std())
    perfect_elsewhere = {"embedding_cosine_mean": 1.0, "retrieval_agreement_at_10": 1.0}
    transfer = transfer_quality(original, damaged, FAST, perfect_elsewhere)
    gap = transfer["gap"]["embedding_cosine_mean"]
    assert gap == 1.0 - transfer["quality"]["embedding_cosine_mean"] and gap > GAP_LIMITS["embedding_cosine_mean"]
    assert transfer["large_gap"] is True and "package-docs" in transfer["warning"]
    manifest = {"kind": "encoder", "evaluation": {"quality": perfect_elsewhere, "transfer": transfer}}
    assert "⚠ large gap" in markdown_table([row_of("damaged", manifest)])


def test_causal_gap_is_a_perplexity_ratio(tiny_factory):
    original = tiny_factory("llama")
    transfer = transfer_quality(original, copy.deepcopy(original), FAST, {"perplexity": 2.0, "perplexity_original": 1.0, "kl_divergence": 0.0})
    assert abs(transfer["gap"]["perplexity_ratio"] - (0.5 - 1.0)) < 1e-9 and transfer["large_gap"] is False
