"""Exit rules: each decides, at an exit, which rows of the batch stop there.

``decide(layer, output, state) -> done (rows,) bool``; ``state`` holds per-row tensors the rule
keeps between exits (the runner filters them as rows leave).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SimilarityRule:
    """MuE (Tang et al., 2023, "You Need Multiple Exiting"): exit when the outputs of two
    consecutive exits agree, cosine >= ``threshold``. A threshold above 1 never exits."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def _similarity(self, output: torch.Tensor, state: dict) -> torch.Tensor:
        prev = state.get("previous")
        state["previous"] = output
        if prev is None:
            return torch.full((output.shape[0],), float("-inf"))  # nothing to agree with yet
        return F.cosine_similarity(output, prev, dim=-1)

    def decide(self, layer: int, output: torch.Tensor, state: dict) -> torch.Tensor:
        return self._similarity(output, state) >= self.threshold


class PatienceRule(SimilarityRule):
    """Patience (PABEE, Zhou et al., 2020, adapted to embeddings): exit once ``patience``
    consecutive exits agreed with their predecessor (cosine >= ``threshold``)."""

    def __init__(self, threshold: float, patience: int) -> None:
        super().__init__(threshold)
        self.patience = patience

    def decide(self, layer: int, output: torch.Tensor, state: dict) -> torch.Tensor:
        agree = self._similarity(output, state) >= self.threshold
        streak = state.get("streak", torch.zeros(output.shape[0], dtype=torch.long))
        streak = torch.where(agree, streak + 1, torch.zeros_like(streak))
        state["streak"] = streak
        return streak >= self.patience


class ConfidenceRule:
    """Posterior confidence (early exits for speech recognition, Wright et al., 2023): exit when
    the exit's prediction has entropy <= ``threshold`` (nats). For heads whose output is a
    distribution (classifiers); an embedding has none, so it is rejected for embedding models."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def decide(self, layer: int, output: torch.Tensor, state: dict) -> torch.Tensor:
        logp = output.log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return entropy <= self.threshold


class PredictedCosineRule:
    """Learned confidence: each exit predicts its own cosine to the final embedding (a head on the
    exit's output, its agreement with the previous exit and the input's length, calibrated by
    isotonic regression on held-back calibration rows; see ``ExitHeads``); exit when the
    predicted cosine >= ``threshold``, so the threshold is the expected cosine of what exits.
    After the learned exit-confidence of BERxiT (Xin et al., 2021) and CALM (Schuster et al., 2022)."""

    def __init__(self, threshold: float, exits) -> None:
        if exits is None or not getattr(exits, "has_confidence", False):
            raise ValueError("the predicted rule needs exits with confidence heads")
        self.threshold = threshold
        self.exits = exits

    def predicted(self, layer: int, output: torch.Tensor, state: dict) -> torch.Tensor:
        prev = state.get("previous")
        state["previous"] = output
        tokens = state.get("tokens")
        if tokens is None:
            tokens = torch.zeros(output.shape[0])
        return self.exits.predicted_cos(layer, output, prev, tokens)

    def decide(self, layer: int, output: torch.Tensor, state: dict) -> torch.Tensor:
        return self.predicted(layer, output, state) >= self.threshold


RULES = ("similarity", "patience", "confidence", "predicted")


def make_rule(name: str, threshold: float, patience: int, exits=None):
    if name == "predicted":
        return PredictedCosineRule(threshold, exits)
    if name == "similarity":
        return SimilarityRule(threshold)
    if name == "patience":
        return PatienceRule(threshold, patience)
    if name == "confidence":
        return ConfidenceRule(threshold)
    raise ValueError(name)
