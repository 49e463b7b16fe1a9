"""Evaluation: quality against the original on held-out text, and measured cost."""

from slimformer.evaluate.cost import compare_cost, model_cost, storage_bytes
from slimformer.evaluate.harness import evaluate
from slimformer.evaluate.quality import causal_quality, encode, encoder_quality
from slimformer.evaluate.settings import EvalSettings

__all__ = ["EvalSettings", "causal_quality", "compare_cost", "encode", "encoder_quality", "evaluate", "model_cost", "storage_bytes"]
