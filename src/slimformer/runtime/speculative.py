"""Lossless speculative decoding (greedy): a cheap drafter proposes ``num_draft`` tokens, the full
model scores them all in one forward (the verify step), and the longest prefix that equals the
model's own greedy choices is kept, plus the model's token after it. The output is exactly the
plain greedy output; only the number of full-model forwards changes.

Drafters:

- ``prompt-lookup``: copy the tokens that followed an earlier occurrence of the end of the
  context (Saxena 2023, "Prompt Lookup Decoding"; CopySpec, Dumitru et al. 2025). Of all earlier
  occurrences of the last token, the one whose preceding tokens agree longest with the end of the
  context is copied (the latest among equals); a match shorter than ``min_ngram`` tokens drafts
  nothing and the step is a plain one-token step. When the copied
  span runs into the end of the context, the draft continues periodically (a repetition loop
  is drafted in full). Free to draft; pays off when the output repeats the input (summarise,
  extract, edit code);
- ``self``: the model's own first ``exit_layer`` blocks plus its final norm and head (early-exit
  self-speculation, LayerSkip: Elhoushi et al. 2024). The draft shares the weights (no copy); it
  keeps its own KV cache for those blocks. Exits trained by self-distillation are not done here:
  the draft is the untrained early exit;
- ``draft``: any smaller or compressed copy of the model with the same vocabulary (e.g. 2-bit
  weights, fewer blocks; Leviathan et al. 2023, "Fast Inference from Transformers via
  Speculative Decoding").

A rejected draft token's cache entry is dropped by moving the static cache's length back
(``crop``); shapes never change.

Token trees (``branches``, prompt lookup with ``adaptive``; default up to 3): the context's end
often matches several earlier spans that continue differently, and a verify step of a few tokens
costs about as much as a one-token step once the linears share their weight loads across rows
(``packed-q8a-tiles``). So a step may verify several drafts at once, each beginning with a
different token, as a tree whose branches share only the root (the current token): each token
sees the context, the root and its own branch (``generation.tree_attention_mask_4d``; positions
by depth). The branch whose first token is the model's is followed as far as it agrees; its
cache entries are moved behind the root (``StaticKVCache.move``) and the rest dropped, so the
cache then holds what plain decoding would have written. How many tokens of each draft
(``best_tree``): tokens in order of their chance of being reached (a later draft's first token
discounted by the earlier ones' chances: at most one first token can be the model's), the prefix
with the most expected tokens per measured step cost. Each tree token's logits are those of the
same token in a one-token step, bit for bit (the decode-attention kernel sums each token's
softmax over its own slots), so the output stays exactly the plain greedy output. Verify steps of every width share one compiled graph (the token
count is a symbolic size, see ``generation``).

How long a lookup draft is (``adaptive``, the default for prompt lookup): on a CPU a verify step
of q tokens costs more than a one-token step, by an amount that depends on the machine and the
weights' kernels (SmolLM2 on the AMD EPYC, 2 threads, in one-token steps for q = 2..7: fp32 dense
kernel 1.06, 1.12, 1.15, 1.31, 1.49, 1.83; 8-bit packed-q8a 1.03, 1.13, 1.43, 1.50, 1.76, 1.81).
So the generator measures these costs on the machine at hand (``TextGenerator.verify_costs``, once
per generator, at the first speculative call), then replaces each width's figure by the median of
the steps of that width it has run for real (``StepCosts``: in place, in the real contexts, with
the loop's own overheads), and each step drafts the number of tokens ``d``
(0 to ``num_draft``) that maximises the expected tokens per unit of time,
``(1 + a_1 + a_1 a_2 + ... + a_1...a_d) / cost(d + 1)``, where ``a_j`` is the chance that the
j-th drafted token is the model's own. That chance grows with how many context tokens the copied
source agrees with (``match + j - 1``): a prior per agreement length, measured on the
*calibration* split's greedy outputs of SmolLM2 (fp32 and 8-bit, summarise/extract and code
prompts, ``benchmarks/lookup_acceptance.py``: 23%, 54%, 63%, 73%, 71%, 84%, 84% for 1..7 agreeing
tokens, 89-100% beyond; chat 10% after one; ``LOOKUP_PRIOR``), updated by what this generation accepted so far (``PRIOR_WEIGHT`` pseudo-counts
for the prior). A one-token match is then worth drafting where a two-token verify step is nearly
free (a dense kernel reading its weights once for both rows) and not where it is dear; chat
answers, which rarely repeat their prompt, fall back to one-token steps as their misses are
counted. ``adaptive=False`` keeps the fixed form: a ``num_draft``-token draft (padded) whenever
the match has ``min_ngram`` tokens (default 3 there, 1 with ``adaptive``).
"""

from __future__ import annotations

import time
from collections import deque
from itertools import accumulate
from dataclasses import dataclass
from typing import Any

import torch

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.runtime.generation import TextGenerator, prefill, shared_copy

MODES = ("prompt-lookup", "self", "draft")


@dataclass
class SpeculationConfig:
    """``mode``: one of ``MODES``; ``num_draft``: most tokens proposed per verify step (None: 6
    for prompt lookup, 4 for model drafts); ``ngram`` / ``min_ngram``: longest context match
    compared and shortest match drafted from (prompt-lookup; ``min_ngram`` None: 1 when adaptive,
    else 3); ``adaptive``: each step drafts the length with the most expected tokens per measured
    verify cost (prompt-lookup only; None: on for prompt-lookup); ``branches``: with ``adaptive``,
    most drafts (copied from earlier occurrences with different next tokens) verified together in
    one step as a token tree (1: a single draft); ``exit_layer``: blocks
    of the model used by the ``self`` draft (default: a quarter of them); ``draft``: the draft
    ``LoadedModel`` (``draft`` mode)."""

    mode: str = "prompt-lookup"
    num_draft: int | None = None
    ngram: int = 16
    min_ngram: int | None = None
    adaptive: bool | None = None
    branches: int = 3
    exit_layer: int | None = None
    draft: Any = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"speculation mode {self.mode!r} is unknown", f"use one of {list(MODES)}")
        if self.num_draft is None:
            self.num_draft = 6 if self.mode == "prompt-lookup" else 4
        if self.adaptive is None:
            self.adaptive = self.mode == "prompt-lookup"
        if not isinstance(self.adaptive, bool):
            raise ConfigError(f"adaptive={self.adaptive!r} must be True or False", "pass adaptive=True or adaptive=False")
        if self.adaptive and self.mode != "prompt-lookup":
            raise ConfigError(f"adaptive draft lengths apply to prompt-lookup, not {self.mode!r}", "drop adaptive=True, or use mode 'prompt-lookup'")
        if self.min_ngram is None:
            self.min_ngram = 1 if self.adaptive else 3
        if not is_int_at_least(self.branches, 1):
            raise ConfigError(f"branches={self.branches!r} must be an integer >= 1", "pass e.g. branches=3 (1: one draft per step)")
        if not is_int_at_least(self.num_draft, 1):
            raise ConfigError(f"num_draft={self.num_draft!r} must be an integer >= 1", "pass e.g. num_draft=4")
        if not (is_int_at_least(self.min_ngram, 1) and is_int_at_least(self.ngram, self.min_ngram)):
            raise ConfigError(f"ngram={self.ngram!r}, min_ngram={self.min_ngram!r} must satisfy 1 <= min_ngram <= ngram", "pass e.g. ngram=16, min_ngram=3")
        if self.exit_layer is not None and not is_int_at_least(self.exit_layer, 1):
            raise ConfigError(f"exit_layer={self.exit_layer!r} must be an integer >= 1", "pass e.g. exit_layer=8")
        if self.mode == "draft" and self.draft is None:
            raise ConfigError("speculation mode 'draft' needs a draft model", "pass draft=slimformer.load(...) of a smaller copy")

    def run(self, gen: TextGenerator, input_ids: torch.Tensor, attention_mask: torch.Tensor, config, accept, is_done) -> tuple[dict, dict]:
        """The generator's entry point (see ``speculative_generate``)."""
        return speculative_generate(gen, input_ids, attention_mask, config, accept, is_done)


def lookup_proposal(context: list[int], k: int, ngram: int, min_ngram: int) -> list[int]:
    """Up to ``k`` tokens that followed the earlier occurrence of the context's last token whose
    preceding tokens agree longest (up to ``ngram``) with the end of the context (the latest of
    equally long ones); continued periodically where the copy reaches the end of the context;
    [] when the longest agreement is shorter than ``min_ngram``."""
    return LookupIndex(ngram).proposal(context, k, min_ngram)[0]


class LookupIndex:
    """Where each token occurs in a growing context, to find the longest match of its end.

    ``proposal`` indexes the tokens appended since the last call (the context only grows), then
    compares at most ``MAX_CANDIDATES`` most recent occurrences of the last token.
    """

    MAX_CANDIDATES = 512

    def __init__(self, ngram: int) -> None:
        self.ngram = ngram
        self.positions: dict[int, list[int]] = {}
        self.indexed = 0

    def proposal(self, context: list[int], k: int, min_ngram: int) -> tuple[list[int], int]:
        """``(draft, match length)``: the draft (up to ``k`` tokens) and how many tokens of the
        context's end its source agrees with (0 and [] when under ``min_ngram``)."""
        found = self.proposals(context, k, min_ngram, 1)
        return found[0] if found else ([], 0)

    def proposals(self, context: list[int], k: int, min_ngram: int, branches: int) -> list[tuple[list[int], int]]:
        """Up to ``branches`` ``(draft, match length)`` pairs whose drafts begin with different
        tokens: for each next token, its longest-agreeing source (the latest among equals); the
        longest agreements first (the first pair is :meth:`proposal`'s)."""
        n_ctx = len(context)
        for p in range(self.indexed, n_ctx - 1):  # an occurrence needs a token after it
            self.positions.setdefault(context[p], []).append(p)
        self.indexed = max(self.indexed, n_ctx - 1)
        if n_ctx < 2 or k < 1:
            return []
        best: dict[int, tuple[int, int]] = {}  # next token -> (agreement, position)
        for p in reversed(self.positions.get(context[-1], [])[-self.MAX_CANDIDATES:]):
            length = 1
            while length < self.ngram and length <= p and context[p - length] == context[n_ctx - 1 - length]:
                length += 1
            if length > best.get(context[p + 1], (0, 0))[0]:
                best[context[p + 1]] = (length, p)
                if length == self.ngram and branches == 1:
                    break
        ranked = sorted(best.values(), key=lambda lp: (-lp[0], -lp[1]))
        out = []
        for length, p in ranked[:branches]:
            if length < min_ngram:
                break
            draft: list[int] = []
            for i in range(p + 1, p + 1 + k):  # past the end: copy the draft itself (a loop)
                draft.append(context[i] if i < n_ctx else draft[i - n_ctx])
            out.append((draft, length))
        return out


# Chance that a drafted token is the model's own, by how many context tokens its source agrees
# with (1, 2, ... 8 or more); measured on the calibration split (benchmarks/lookup_acceptance.py).
LOOKUP_PRIOR = (0.2, 0.5, 0.6, 0.7, 0.7, 0.8, 0.85, 0.9)
PRIOR_WEIGHT = 4.0


class StepCosts:
    """The time of a q-token step in one-token steps (``costs()[q - 1]``, non-decreasing in q):
    ``measured`` (the generator's up-front figures) until at least ``MIN_SEEN`` real steps of that
    width and of one token have been timed (``observe``), then the ratio of their medians over the
    last ``WINDOW`` of each. Kept on the generator, so what one generation saw serves the next."""

    WINDOW = 64
    MIN_SEEN = 8

    def __init__(self, measured: list[float]) -> None:
        self.measured = list(measured)
        self.seen = [deque(maxlen=self.WINDOW) for _ in self.measured]

    def observe(self, width: int, seconds: float) -> None:
        if 1 <= width <= len(self.seen):
            self.seen[width - 1].append(seconds)

    def costs(self) -> list[float]:
        one = sorted(self.seen[0])
        timed = len(one) >= self.MIN_SEEN

        def cost(q: int) -> float:
            seen = self.seen[q - 1]
            if q > 1 and timed and len(seen) >= self.MIN_SEEN:
                return sorted(seen)[len(seen) // 2] / one[len(one) // 2]
            return self.measured[q - 1]

        return list(accumulate((cost(q) for q in range(1, len(self.measured) + 1)), max))


def best_draft_length(chances: list[float], costs: list[float]) -> int:
    """The draft length ``d`` (0..``len(chances)``, below ``len(costs)``) with the most expected
    tokens per unit of time: ``(1 + sum_i prod_{j<=i} chances[j-1]) / costs[d]``, where
    ``chances[j-1]`` is the chance that the j-th drafted token is accepted once the ones before it
    were, and ``costs[q-1]`` is a q-token step's time; 0 is a plain one-token step (``best_tree``
    of one draft)."""
    return best_tree([chances], costs)[0]


def best_tree(chances: list[list[float]], costs: list[float]) -> list[int]:
    """How many tokens of each draft to verify together (branches sharing only the root, each
    beginning with a different token): ``chances[b][j]`` is the chance that token j of draft b
    is accepted once the ones before it were (for j = 0, given that no earlier draft's first
    token was: so its reach is discounted by the earlier first tokens' chances, the drafts'
    first tokens being exclusive). Tokens are added in order of reach, the highest first, and
    the prefix of that order with the most expected tokens per ``costs[q - 1]`` (a q-token
    step's time) is kept: all zeros is a plain step."""
    reaches, left = [], 1.0
    for draft in chances:
        reach, row = left, []
        for j, chance in enumerate(draft):
            reach *= chance
            row.append(reach)
        if draft:
            left *= 1.0 - draft[0]
        reaches.append(row)
    taken = [0] * len(chances)
    best, best_rate = list(taken), 1.0 / costs[0]
    expected = 1.0
    for total in range(1, len(costs)):
        options = [(row[taken[b]], -b) for b, row in enumerate(reaches) if taken[b] < len(row)]
        if not options:
            break
        reach, neg_b = max(options)
        taken[-neg_b] += 1
        expected += reach
        if expected / costs[total] > best_rate:
            best, best_rate = list(taken), expected / costs[total]
    return best


class _LookupDrafter:
    """Prompt-lookup drafts; with ``adaptive``, sized by ``best_tree`` under the step costs of
    ``clock`` and the acceptance seen so far."""

    def __init__(self, spec: SpeculationConfig, clock: StepCosts | None = None) -> None:
        self.spec = spec
        self.index = LookupIndex(spec.ngram)
        self.clock = clock
        self.counts: dict[int, list[int]] = {}  # agreement length -> [accepted, verified]
        self.last_tree: list[tuple[int, int]] = []  # (match length, tokens drafted) per branch of the last proposal

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, needed: int) -> None:
        pass

    def chance(self, agreement: int) -> float:
        """Estimated chance that a token whose source agrees with ``agreement`` context tokens is
        accepted: the prior, moved by this generation's counts."""
        ok, seen = self.counts.get(agreement, (0, 0))
        prior = LOOKUP_PRIOR[min(agreement, len(LOOKUP_PRIOR)) - 1]
        return (ok + PRIOR_WEIGHT * prior) / (seen + PRIOR_WEIGHT)

    def propose(self, context: list[int], k: int) -> list[int]:
        """One draft (:meth:`propose_tree` with one branch); [] for a plain step."""
        drafts = self.propose_tree(context, k, branches=1)
        return drafts[0] if drafts else []

    def propose_tree(self, context: list[int], k: int, branches: int | None = None) -> list[list[int]]:
        """Drafts to verify together (a token tree whose branches share only the root, the
        current token; each begins with a different token): up to ``branches`` (None:
        ``spec.branches``; 1 without ``adaptive``) copied sources, the longest agreements first,
        with ``adaptive`` sized together by ``best_tree``; [] for a plain step."""
        wanted = (self.spec.branches if branches is None else branches) if self.spec.adaptive else 1
        found = self.index.proposals(context, k, self.spec.min_ngram, wanted)
        if self.spec.adaptive:
            ngram = self.spec.ngram
            chances = [[self.chance(min(length + j, ngram)) for j in range(len(draft))] for draft, length in found]
            sizes = best_tree(chances, self.clock.costs())
        else:
            sizes = [len(draft) for draft, _ in found]
        self.last_tree = [(length, n) for (_, length), n in zip(found, sizes) if n]
        return [draft[:n] for (draft, _), n in zip(found, sizes) if n]

    def width(self, real: int, k: int) -> int:
        """Draft tokens the verify step carries for a ``real``-token draft: ``k`` (padded), or
        with ``adaptive`` the draft itself."""
        return real if self.spec.adaptive else k

    def accepted(self, n: int, k: int, branch: int = 0) -> None:
        """Count the verified tokens of the last draft (of branch ``branch`` of the last tree):
        the first ``n`` accepted, the next one (if drafted) rejected; the ones after it were
        never compared. Of the branches before ``branch`` (their first token rejected), the
        first tokens are counted as rejected; of those after it, nothing (their first token
        could not be the model's once an earlier one was)."""
        for b, (length, drafted) in enumerate(self.last_tree[: branch + 1]):
            accepted = n if b == branch else 0
            for j in range(min(accepted + 1, drafted)):
                entry = self.counts.setdefault(min(length + j, self.spec.ngram), [0, 0])
                entry[0] += j < accepted
                entry[1] += 1


class _ModelDrafter:
    """Greedy drafting with a (smaller) model and its own static cache."""

    def __init__(self, gen: TextGenerator) -> None:
        self.gen = gen

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, needed: int) -> None:
        gen = self.gen
        self.cache, self.key_valid = gen.cache_for(1, needed)
        self.next_pos = torch.zeros(1, dtype=torch.long)
        with torch.no_grad():
            prefill(gen.model, self.cache, input_ids, attention_mask, self.key_valid, self.next_pos, gen.dtype, gen.cache_kwarg)
        self.in_cache = int(attention_mask.sum())

    def propose(self, context: list[int], k: int) -> list[int]:
        pending = context[self.in_cache:]
        logits = self.gen.run_step(self.cache, torch.tensor([pending]), self.key_valid, self.next_pos)[:, -1]
        self.in_cache += len(pending)
        out = [int(logits.argmax(-1))]
        for _ in range(k - 1):
            logits = self.gen.run_step(self.cache, torch.tensor([[out[-1]]]), self.key_valid, self.next_pos)[:, -1]
            self.in_cache += 1
            out.append(int(logits.argmax(-1)))
        return out

    def width(self, real: int, k: int) -> int:
        return k

    def accepted(self, n: int, k: int) -> None:
        """The cache holds the first k-1 drafts; keep those among the n accepted."""
        remove = (k - 1) - min(n, k - 1)
        if remove:
            self.cache.crop(-remove)
            self.next_pos.sub_(remove)
            self.in_cache -= remove


def self_draft_model(model: torch.nn.Module, exit_layer: int) -> torch.nn.Module:
    """A view of ``model`` with only its first ``exit_layer`` blocks (then its final norm and
    head); every tensor is shared with ``model``."""
    from slimformer.models.adapters import ArchitectureAdapter

    depth = ArchitectureAdapter(model).num_layers()
    if exit_layer >= depth:
        raise ConfigError(f"exit_layer={exit_layer} must be below the model's depth {depth}", f"pass exit_layer between 1 and {depth - 1}")
    view = shared_copy(model)
    ArchitectureAdapter(view).drop_blocks(list(range(exit_layer, depth)))
    return view


def _drafter_for(gen: TextGenerator, spec: SpeculationConfig):
    if spec.mode == "prompt-lookup":
        return _LookupDrafter(spec, step_costs(gen, spec.num_draft + 1) if spec.adaptive else None)
    from slimformer.models.loading import LoadedModel

    cached = getattr(gen, "_drafters", {})
    gen._drafters = cached
    key = (spec.mode, spec.exit_layer, id(spec.draft))
    if key not in cached:
        if spec.mode == "self":
            from slimformer.models.adapters import ArchitectureAdapter

            exit_layer = spec.exit_layer or max(1, ArchitectureAdapter(gen.model).num_layers() // 4)
            draft = LoadedModel(model=self_draft_model(gen.model, exit_layer), tokenizer=gen.tokenizer, kind="causal-lm", source=f"{gen.loaded.source}[:{exit_layer}]")
        else:
            draft = spec.draft
            target_vocab = getattr(gen.model.config, "vocab_size", None)
            draft_vocab = getattr(draft.model.config, "vocab_size", None)
            if target_vocab != draft_vocab:
                raise ConfigError(f"the draft's vocabulary ({draft_vocab}) differs from the model's ({target_vocab})", "use a draft made from the same model")
        cached[key] = TextGenerator(draft, dtype=gen.dtype, compile=gen.compile)
    return _ModelDrafter(cached[key])


def step_costs(gen: TextGenerator, widths: int) -> StepCosts:
    """The generator's ``StepCosts`` for steps of up to ``widths`` tokens (measured up front the
    first time, then refined by every speculative generation it runs)."""
    clock = gen._step_costs
    if clock is None or len(clock.measured) < widths:
        clock = StepCosts(gen.verify_costs(widths))
        gen._step_costs = clock
    return clock


def tree_ancestry(branches: list[list[int]]) -> torch.Tensor:
    """The ``tree`` (q, q) bool of a verify step ``[root] + branches[0] + branches[1] + ...``:
    each token sees the root, the tokens of its own branch up to itself, and nothing else."""
    q = 1 + sum(map(len, branches))
    tree = torch.zeros(q, q, dtype=torch.bool)
    tree[:, 0] = True
    offset = 1
    for branch in branches:
        for i in range(len(branch)):
            tree[offset + i, offset:offset + i + 1] = True
        offset += len(branch)
    return tree


def _verify_chain(gen: TextGenerator, cache, key_valid: torch.Tensor, next_pos: torch.Tensor, token: int,
                  draft: list[int], drafter, k: int) -> tuple[list[int], int, int]:
    """One verify step of ``token`` and one draft (padded to the drafter's width); returns the new
    tokens (the accepted prefix, then the model's token after it), how many were drafted ones,
    and the step's width. The rejected tokens' cache entries are dropped."""
    real = len(draft)
    width = drafter.width(real, k)
    logits = gen.run_step(cache, torch.tensor([[token] + draft + [draft[-1]] * (width - real)]), key_valid, next_pos)[0]
    target = logits.argmax(-1).tolist()
    n = 0
    while n < real and draft[n] == target[n]:
        n += 1
    rejected = width - n
    if rejected:
        cache.crop(-rejected)
        next_pos.sub_(rejected)
    drafter.accepted(n, k)
    return draft[:n] + [target[n]], n, width + 1


def _verify_tree(gen: TextGenerator, cache, key_valid: torch.Tensor, next_pos: torch.Tensor, token: int,
                 branches: list[list[int]], drafter, k: int) -> tuple[list[int], int, int]:
    """One verify step of several drafts as a token tree; returns the new tokens (the accepted
    prefix of the branch that begins with the model's token, then the model's token after it),
    how many were drafted ones, and the step's width. The accepted branch's cache entries are
    moved behind the root and the rest dropped, so the cache holds exactly the accepted context."""
    start = int(cache.length)
    offsets = list(accumulate([1] + [len(b) for b in branches[:-1]]))
    logits = gen.run_step(cache, torch.tensor([[token] + [t for b in branches for t in b]]), key_valid, next_pos,
                          tree=tree_ancestry(branches))[0]
    target = logits.argmax(-1).tolist()
    which = next((b for b, branch in enumerate(branches) if branch[0] == target[0]), None)
    n, last = 0, 0
    if which is not None:
        branch, offset = branches[which], offsets[which]
        n = 1
        while n < len(branch) and branch[n] == target[offset + n - 1]:
            n += 1
        last = offset + n - 1
        if offset != 1:
            cache.move(start + offset, start + 1, n)
    rejected = len(target) - 1 - n
    if rejected:
        cache.crop(-rejected)
        next_pos.sub_(rejected)
    drafter.accepted(n, k, branch=len(branches) - 1 if which is None else which)
    return (branches[which][:n] if which is not None else []) + [target[last]], n, len(target)


def speculative_generate(gen: TextGenerator, input_ids: torch.Tensor, attention_mask: torch.Tensor, config, accept, is_done) -> tuple[dict, dict]:
    """Greedy speculative generation of one prompt ``input_ids`` (1, T); calls ``accept(token)``
    for each new token until ``is_done()``. Returns ``(timing, stats)``: stats hold the steps
    (``verify_steps``, of which ``plain_steps`` had no draft), drafted and accepted tokens and the
    acceptance rate, and ``tree_steps``, the steps that verified several drafts as a token tree."""
    spec: SpeculationConfig = config.speculation
    k = spec.num_draft
    needed = input_ids.shape[1] + config.max_new_tokens + k + 2
    drafter = _drafter_for(gen, spec)  # first: measuring verify costs uses the generator's cache
    cache, key_valid = gen.cache_for(1, needed)
    next_pos = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        logits = prefill(gen.model, cache, input_ids, attention_mask, key_valid, next_pos, gen.dtype, gen.cache_kwarg)
    token = int(logits.argmax(-1))
    prefill_end = time.perf_counter()
    drafter.start(input_ids, attention_mask, needed)
    context = input_ids[0][attention_mask[0].bool()].tolist() + [token]
    accept(token)
    clock = getattr(drafter, "clock", None)  # each step's time refines the step costs
    steps = drafted = accepted = plain = tree_steps = 0
    trees = hasattr(drafter, "propose_tree") and hasattr(cache, "move")
    while not is_done():
        branches = drafter.propose_tree(context, k) if trees else [d for d in [drafter.propose(context, k)] if d]
        draft = branches[0] if branches else []
        steps += 1
        started = time.perf_counter()
        if not draft:
            plain += 1
            logits = gen.run_step(cache, torch.tensor([[token]]), key_valid, next_pos)[:, -1]
            token = int(logits.argmax(-1))
            if clock is not None:
                clock.observe(1, time.perf_counter() - started)
            context.append(token)
            accept(token)
            continue
        if len(branches) > 1:
            tree_steps += 1
            new, n, width = _verify_tree(gen, cache, key_valid, next_pos, token, branches, drafter, k)
        else:
            new, n, width = _verify_chain(gen, cache, key_valid, next_pos, token, draft, drafter, k)
        if clock is not None:
            clock.observe(width, time.perf_counter() - started)
        drafted += sum(map(len, branches))
        accepted += n
        for t in new:
            context.append(t)
            accept(t)
            if is_done():
                break
        token = new[-1]
    end = time.perf_counter()
    kv_bytes = cache.nbytes() + (drafter.cache.nbytes() if hasattr(drafter, "cache") else 0)
    stats = {
        "mode": spec.mode, "num_draft": k, "verify_steps": steps, "plain_steps": plain, "tree_steps": tree_steps, "drafted": drafted, "accepted": accepted,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
    }
    return {"prefill_end": prefill_end, "end": end, "steps": steps, "kv_bytes": kv_bytes}, stats
