"""Scoring a candidate: distortion of the model's outputs against the original's, on calibration text.

Causal LMs: KL(original || candidate) of next-token distributions per valid token (EvoPress's
fitness), or with ``fitness="nll"`` the candidate's negative log-likelihood of the text's next
tokens (the perplexity criterion of SLEB and BlockPruner). Encoders: ``1 - cosine`` of the
pooled, normalised embeddings per text. Lower is better.

``fitness="log-kl"`` (ours): the mean over calibration documents of the log of each document's
distortion (its KL per token; ``1 - cosine`` of an encoder's text). The token mean of ``kl`` is
ruled by the kinds of text the model predicts worst: on SmolLM2 at 3 bits, licence texts carry
three times the KL per token of docstrings, and an evolution on ``kl`` bought 4.6 % less KL on
them with 1-1.5 % more on docstrings and code, which held-out docstrings then showed. In logs a
document's *relative* change counts the same whatever its KL, so a child wins by improving most
documents, not the worst kind's.

An ``Evaluator`` is stateful, as EvoPress's workers are: it holds a working copy of the model
whose searched layers stay ordinary linears, the calibration batches and the original's outputs
on them, and switches a layer's weight only when a candidate's level for it differs from the
level it holds (the dequantized weights come from the level database and are cached up to a
byte budget). Scores depend only on the levels, never on which evaluator computed them.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F

from slimformer.methods.structure.search import next_token_nll
from slimformer.search.database import LevelDatabase
from slimformer.search.units import DROP, KEEP, Unit, removed_sublayers

ORIGINAL = -1  # "level" of a layer that keeps its original weight (used by sensitivity probes)


@torch.no_grad()
def reference_outputs(loaded, batches: list[dict]) -> list[torch.Tensor]:
    """The original model's outputs per batch: log-probabilities of the valid tokens (tokens,
    vocab) as float16 (causal LMs), or normalised pooled embeddings (batch, dim) float32."""
    return [_outputs(loaded, b).to(torch.float16 if loaded.kind == "causal-lm" else torch.float32) for b in batches]


@torch.no_grad()
def _outputs(loaded, batch: dict) -> torch.Tensor:
    if loaded.kind == "causal-lm":
        logits = loaded.model(**batch, use_cache=False).logits.float()
        return F.log_softmax(logits[batch["attention_mask"].bool()], dim=-1)
    from slimformer.models.pooling import pool

    hidden = loaded.model(**batch).last_hidden_state.float()
    return F.normalize(pool(hidden, batch["attention_mask"], loaded.pooling), dim=-1)


@torch.no_grad()
def negative_log_likelihood(loaded, batch: dict) -> tuple[float, int]:
    """The model's summed next-token negative log-likelihood on ``batch`` and the token count,
    computed as SLEB's and BlockPruner's scorer computes it (:func:`next_token_nll`)."""
    return next_token_nll(loaded.model(**batch, use_cache=False).logits, batch)


def document_distortions(kind: str, reference: torch.Tensor, output: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per document (text) of a batch its mean distortion, shape (batch,): KL per valid token
    (``reference``/``output``: log-probabilities of the batch's valid tokens, row after row, as
    :func:`reference_outputs` keeps them) or ``1 - cosine`` (encoders, one row per text)."""
    if kind != "causal-lm":
        return 1.0 - (reference * output).sum(-1)
    ref = reference.float()
    per_token = (ref.exp() * (ref - output)).sum(-1)
    counts = attention_mask.sum(1)
    return torch.stack([t.sum() / max(int(n), 1) for t, n in zip(per_token.split(counts.tolist()), counts)])


LOG_FLOOR = 1e-9  # a document the candidate predicts exactly as the original (the original itself) scores log(1e-9)


def distortion(kind: str, reference: torch.Tensor, output: torch.Tensor) -> tuple[float, int]:
    """Summed distortion and the number of items (tokens or texts) it is summed over."""
    if kind == "causal-lm":
        ref = reference.float()
        return float((ref.exp() * (ref - output)).sum()), ref.shape[0]
    return float((1.0 - (reference * output).sum(-1)).sum()), reference.shape[0]


class Evaluator:
    """Scores level assignments of the database's units on the first ``n`` calibration batches.

    ``loaded``: the original model (copied, never changed); ``batches``: tokenized calibration
    batches; ``reference``: :func:`reference_outputs` on them; ``threads``: torch threads (the
    same everywhere, so that every evaluator computes bit-identical scores);
    ``cache_bytes``: budget for cached dequantized weights; ``units``: the search units a
    candidate's entries set (default: one per database layer, levels = its widths);
    ``dtype``: the working copy's dtype (``bfloat16``: weights and activations, the reference
    stays the float32 original's outputs); ``fitness``: ``kl`` (against ``reference``) or
    ``nll`` (causal LMs; ``reference`` unused).
    A removed sub-layer is muted by a forward hook that zeroes its output, which in a pre-norm
    block is exactly its removal (the saved model removes it physically).
    """

    def __init__(self, loaded, database: LevelDatabase | str, batches: list[dict], reference: list[torch.Tensor],
                 threads: int | None = None, cache_bytes: int = 1 << 30, units: list[Unit] | None = None, dtype: str = "float32",
                 fitness: str = "kl") -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.loaded = copy.copy(loaded)
        self.loaded.model = copy.deepcopy(loaded.model)
        if dtype != "float32":
            self.loaded.model.to(getattr(torch, dtype))
        self.db = database if isinstance(database, LevelDatabase) else _open(database)
        self.batches = batches
        self.reference = reference
        self.fitness = fitness
        self.modules = {u: self.loaded.model.get_submodule(u) for u in self.db.units}
        self.original = {u: m.weight.detach().clone() for u, m in self.modules.items()}
        self.current = {u: ORIGINAL for u in self.db.units}
        self.units = units or [Unit(u, (u,), tuple(self.db.level_bits)) for u in self.db.units]
        self._pos = {b: k for k, b in enumerate(self.db.level_bits)}
        self._muted: dict[str, object] = {}
        self._cache: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._held = 0

    def _weight(self, unit: str, level: int) -> torch.Tensor:
        if level == ORIGINAL:
            return self.original[unit]
        key = (unit, level)
        w = self._cache.get(key)
        if w is None:
            w = self.db.weight(unit, self.db.level_bits[level]).to(self.original[unit].dtype)
            self._cache[key] = w
            self._held += w.numel() * w.element_size()
            while self._held > self._cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._held -= old.numel() * old.element_size()
        else:
            self._cache.move_to_end(key)
        return w

    def set_levels(self, levels: dict[str, int] | list[int]) -> None:
        """Give each unit its level: an index into the unit's levels, or ORIGINAL (a dict sets
        database layers directly by name, with indices into the database's widths)."""
        if isinstance(levels, dict):
            for unit, level in levels.items():
                self._set_layer(unit, int(level))
            return
        removed = removed_sublayers(self.units, levels)
        for unit, level in zip(self.units, levels):
            bits = None if level == ORIGINAL or unit.levels[level] == KEEP else unit.levels[level]
            if unit.sublayer is not None:
                self._mute(unit.sublayer, unit.sublayer in removed)
            if bits != DROP:
                for name in unit.linears:
                    self._set_layer(name, ORIGINAL if bits is None else self._pos[bits])

    def _set_layer(self, name: str, level: int) -> None:
        if self.current[name] != level:
            self.modules[name].weight.data = self._weight(name, level)
            self.current[name] = level

    def _mute(self, sublayer: str, muted: bool) -> None:
        if muted == (sublayer in self._muted):
            return
        if not muted:
            self._muted.pop(sublayer).remove()
            return
        module = self.loaded.model.get_submodule(sublayer)

        def zero(_m, _inputs, output):
            if isinstance(output, tuple):
                return (torch.zeros_like(output[0]),) + tuple(output[1:])
            return torch.zeros_like(output)

        self._muted[sublayer] = module.register_forward_hook(zero)

    def use_batches(self, batches: list[dict], reference: list[torch.Tensor], fitness: str) -> None:
        """Score on other ``batches`` from now on (e.g. validation text after the search)."""
        self.batches, self.reference, self.fitness = batches, reference, fitness

    @torch.no_grad()
    def score(self, levels, n_batches: int, fitness: str | None = None) -> float:
        """Mean distortion of the model at ``levels`` on the first ``n_batches`` batches, by the
        evaluator's fitness or ``fitness`` (e.g. ``kl`` for the DP's additive sensitivities when
        the evolution's fitness is ``log-kl``)."""
        fitness = fitness or self.fitness
        self.set_levels(levels)
        total = count = 0.0
        for i, batch in enumerate(self.batches[:n_batches]):
            if fitness == "nll":
                s, n = negative_log_likelihood(self.loaded, batch)
            elif fitness == "log-kl":
                per_doc = document_distortions(self.loaded.kind, self.reference[i], _outputs(self.loaded, batch), batch["attention_mask"])
                s, n = float(per_doc.clamp_min(LOG_FLOOR).log().sum()), per_doc.numel()
            else:
                s, n = distortion(self.loaded.kind, self.reference[i], _outputs(self.loaded, batch))
            total += s
            count += n
        return total / max(count, 1.0)

    def score_many(self, candidates: list[list[int]], n_batches: int, fitness: str | None = None) -> list[float]:
        return [self.score(c, n_batches, fitness) for c in candidates]


def _open(folder: str) -> LevelDatabase:
    import json
    from pathlib import Path

    from slimformer.search.database import INDEX_NAME

    return LevelDatabase(Path(folder), json.loads((Path(folder) / INDEX_NAME).read_text()))
