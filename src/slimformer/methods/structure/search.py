"""Scoring candidate structure removals by their calibration loss (SLEB, BlockPruner).

A candidate removal at block ``i`` leaves blocks ``< i`` untouched, so their output is taken
from a cache of every block's input (filled by one forward pass of the current model) and only
the blocks from ``i`` on are run: on average half a forward pass per candidate.

The loss is the mean next-token negative log-likelihood on the calibration tokens (causal LMs;
``exp`` of it is the calibration perplexity) or, for encoders, the relative squared error of the
final hidden states to those of the model before any removal,
``sum ||h - h_0||^2 / sum ||h_0||^2`` over valid tokens.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def next_token_nll(logits: torch.Tensor, batch: dict) -> tuple[float, int]:
    """Summed negative log-likelihood of the next tokens of ``batch`` under ``logits`` (batch,
    seq, vocab), over positions whose token and predecessor are both valid (either padding side),
    and the number of those tokens: the perplexity criterion of the greedy removal searches."""
    mask = batch["attention_mask"].bool()
    valid = mask[:, 1:] & mask[:, :-1]
    nll = F.cross_entropy(logits[:, :-1].float()[valid], batch["input_ids"][:, 1:][valid], reduction="sum")
    return float(nll), int(valid.sum())


class RemovalScorer:
    """Calibration loss of the current model and of candidate removals.

    ``batches``: calibration batches, dicts of ``input_ids``/``attention_mask`` (batch, seq).
    Call :meth:`refresh` after every committed removal; it re-fills the block-input cache
    (memory: blocks x calibration tokens x hidden size floats).
    """

    def __init__(self, loaded, batches: list[dict]) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.adapter = loaded.adapter
        self.batches = batches
        self.causal = loaded.kind == "causal-lm"
        self.reference: list[torch.Tensor] | None = None
        self.inputs: list[list[torch.Tensor]] = []
        if not self.causal:
            with torch.no_grad():
                self.reference = [self.model(**b).last_hidden_state.float() for b in batches]

    def _forward(self, batch: dict):
        extra = {"use_cache": False} if self.causal else {}
        return self.model(**batch, **extra)

    def _loss(self, outputs, index: int) -> tuple[float, float]:
        """``(sum of per-token losses, number of tokens)`` of one batch."""
        batch = self.batches[index]
        mask = batch["attention_mask"].bool()
        if self.causal:
            nll, count = next_token_nll(outputs.logits, batch)
            return nll, float(count)
        h = outputs.last_hidden_state.float()[mask]
        ref = self.reference[index][mask]
        return float(((h - ref) ** 2).sum() / (ref**2).sum().clamp(min=1e-12)) * float(mask.sum()), float(mask.sum())

    @torch.no_grad()
    def refresh(self) -> float:
        """Re-fill the cache of every block's input for the current model; returns its loss."""
        blocks = list(self.adapter.blocks())
        self.inputs = [[] for _ in blocks]
        handles = []
        for i, block in enumerate(blocks):
            def hook(_m, args, kwargs, i=i):
                h = args[0] if args else kwargs["hidden_states"]
                self.inputs[i].append(h.detach())

            handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        total = count = 0.0
        try:
            for j, batch in enumerate(self.batches):
                s, c = self._loss(self._forward(batch), j)
                total += s
                count += c
        finally:
            for h in handles:
                h.remove()
        return total / max(count, 1.0)

    @torch.no_grad()
    def loss_from(self, start: int, tail: list[nn.Module]) -> float:
        """Loss when the blocks ``tail`` run on the cached input of block ``start`` (the
        blocks before ``start`` unchanged). ``tail`` empty: the model ends after block
        ``start - 1``."""
        blocks = list(self.adapter.blocks())
        if not tail:
            run, inject = blocks[:start], None
        else:
            run, inject = tail, tail[0]
        state: dict = {}

        def pre_hook(_m, args, kwargs):
            if args:
                return (state["h"],) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = state["h"]
            return args, kwargs

        handle = inject.register_forward_pre_hook(pre_hook, with_kwargs=True) if inject is not None else None
        total = count = 0.0
        try:
            with self.adapter.temporary_blocks(run):
                for j, batch in enumerate(self.batches):
                    state["h"] = self.inputs[start][j]
                    s, c = self._loss(self._forward(batch), j)
                    total += s
                    count += c
        finally:
            if handle is not None:
                handle.remove()
        return total / max(count, 1.0)

    def loss_without_block(self, index: int) -> float:
        """Loss of the current model with block ``index`` removed."""
        return self.loss_from(index, list(self.adapter.blocks())[index + 1 :])

    def loss_without_sublayer(self, index: int, kind: str) -> float:
        """Loss of the current model with the ``kind`` (attention/mlp) sub-layer of block
        ``index`` removed (the whole block, when its other sub-layer is already gone)."""
        other = "mlp" if kind == "attention" else "attention"
        if self.adapter.sublayer_removed(index, other):
            return self.loss_without_block(index)
        with without_sublayer(self.adapter, index, kind):
            return self.loss_from(index, list(self.adapter.blocks())[index:])


@contextmanager
def without_sublayer(adapter, index: int, kind: str):
    """Temporarily remove one sub-layer of a block whose other sub-layer is present."""
    block = adapter.blocks()[index]
    saved = dict(block.named_children())
    adapter.remove_sublayer(index, kind)
    try:
        yield
    finally:
        for name, module in saved.items():
            setattr(block, name, module)
        adapter.renumber_layers()


def sublayer_parameters(adapter, index: int, kind: str) -> int:
    """Parameters of one block's attention or MLP sub-layer (with the norm that feeds it)."""
    seen: set[int] = set()
    count = 0
    for module in adapter.sublayer_modules(index, kind):
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                count += p.numel()
    return count


def block_parameters(adapter, index: int) -> int:
    return sum(p.numel() for p in adapter.blocks()[index].parameters())


class Shortlist:
    """Which candidates a greedy search re-scores at each step.

    ``size=None``: every candidate, every step (the papers' search: O(depth) candidates, each
    a forward from its block on, so O(depth^2) block passes per step). ``size=k``: the first
    step scores every candidate; later steps re-score only the ``k`` candidates whose removal
    cost least when last scored (cost = loss increase over the model as it was then), and the
    step removes the best of those freshly scored: O(k * depth) block passes per step, linear
    in depth. Candidates are hashable keys that survive index shifts (e.g. ``(id(block), kind)``).
    """

    def __init__(self, size: int | None) -> None:
        self.size = size
        self.cost: dict = {}

    def pick(self, candidates: list) -> list:
        """The candidates (a subset of ``candidates``, in their order) to score this step."""
        if self.size is None or not self.cost or len(candidates) <= self.size:
            return list(candidates)
        unseen = [c for c in candidates if c not in self.cost]
        seen = sorted((c for c in candidates if c in self.cost), key=self.cost.__getitem__)
        chosen = set(unseen) | set(seen[: max(self.size - len(unseen), 0)])
        return [c for c in candidates if c in chosen]

    def record(self, candidate, loss: float, base: float) -> None:
        """``loss``: the calibration loss with ``candidate`` removed; ``base``: without."""
        self.cost[candidate] = loss - base
