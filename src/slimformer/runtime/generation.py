"""The decode loop: plain functions ``prefill``, ``decode_one`` and ``decode_n`` over a static KV
cache, and ``TextGenerator``, which adds tokenization, batches, sampling, stop rules, streaming
and per-call measurements.

Only the one-token step (and the speculative verify step, see ``speculative``) is compiled with
``torch.compile`` (Inductor; ``fullgraph=True``, warmed up on first use); prefill stays eager.
The one-token step has static shapes; steps of 2 or more tokens (verify steps) are compiled once
with the token count symbolic, so every verify width shares one graph (on SmolLM2 a graph costs
10-60 s to compile; the symbolic graph's steps equal the one-token steps bit for bit and run as
fast as graphs compiled for one width each, measured on the AMD EPYC). Any compiler failure falls back to eager with a warning, and ``SLIMFORMER_COMPILE=0``
(or ``compile=False``) turns compilation off. The model runs its own modules, so a compressed
model's packed layers (int8/int4 paths of ``QuantizedLinear``) are used as they are.

Batches are left-padded; each row has its own positions (0 at its first real token) and its pad
entries are masked out, so a row's tokens do not depend on the other rows.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate
from dataclasses import asdict, dataclass, field, replace

import torch

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.runtime.attention import use_decode_attention
from slimformer.runtime.sampling import SamplingConfig, next_tokens
from slimformer.runtime.static_cache import StaticKVCache

log = logging.getLogger(__name__)

COMPILE_ENV = "SLIMFORMER_COMPILE"
CACHE_LEN_MULTIPLE = 256  # cache lengths are rounded up to this, so the compiled step rarely recompiles


def compile_enabled(requested: bool | None = None) -> bool:
    """Whether to compile: ``requested`` if given, else on unless ``SLIMFORMER_COMPILE=0``."""
    if os.environ.get(COMPILE_ENV, "1") == "0":
        return False
    return True if requested is None else bool(requested)


# ----- the loop as plain functions ---------------------------------------------------------------

def _cache_kwarg(model: torch.nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def attention_mask_4d(key_valid: torch.Tensor, start: torch.Tensor | int, q: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (batch, 1, q, max_len) in ``dtype``: query ``i`` (at cache slot
    ``start + i``) sees slot ``j`` iff ``j <= start + i`` and ``key_valid[b, j]`` (not padding).

    ``key_valid``: (batch, max_len) bool. Fully masked rows (a pad query) get a uniform softmax
    instead of NaN (the most negative finite value, not -inf).
    """
    max_len = key_valid.shape[1]
    slots = torch.arange(max_len, device=key_valid.device)
    queries = torch.arange(q, device=key_valid.device) + start
    allowed = key_valid[:, None, None, :] & (slots[None, None, None, :] <= queries[None, None, :, None])
    zero = torch.zeros((), dtype=dtype, device=key_valid.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def chain_tree(q: int) -> torch.Tensor:
    """The ancestry (q, q) bool of ``q`` tokens in a row: token i sees tokens 0..i."""
    return torch.ones(q, q, dtype=torch.bool).tril()


def tree_attention_mask_4d(key_valid: torch.Tensor, start: torch.Tensor | int, tree: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (batch, 1, q, max_len) in ``dtype`` for a step of ``q`` tokens written at
    cache slots ``[start, start + q)`` whose ``tree`` (q, q) bool says which of the step's tokens
    each one sees (itself and its ancestors): the valid slots before ``start`` and, among the
    step's own slots, those ``tree`` allows. ``chain_tree(q)`` gives the mask of
    :func:`attention_mask_4d` exactly (so a chain's step is the plain verify step)."""
    q = tree.shape[0]
    max_len = key_valid.shape[1]
    rel = torch.arange(max_len, device=key_valid.device) - start  # slot - start
    inside = (rel >= 0) & (rel < q)
    own = tree[:, rel.clamp(0, q - 1)] & inside[None, :]  # (q, max_len)
    allowed = (key_valid & (rel < 0)[None, :])[:, None, None, :] | own[None, None, :, :]
    zero = torch.zeros((), dtype=dtype, device=key_valid.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def step_guards():
    """Dynamo's recursive dict-tag guards for the decode step's graphs only (the setting is read
    when a graph's guards are built, i.e. when this step compiles; other compiled code keeps the
    default). A module whose ``__dict__`` (and its submodules') is unchanged since the last step
    skips the rest of its guards: ~1.7 ms of a 14 ms SmolLM2 step on the AMX Xeon. Attribute
    assignments on any module are still caught (they change the tags); what is no longer re-checked
    is the metadata of tensors held in unchanged modules, which the loop never changes (weights are
    read in place; ``.data`` reassignments of another shape or dtype between steps are not supported)."""
    import torch._dynamo

    return torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=True)


def step_codegen():
    """Inductor settings for the decode step's graphs (read when the step compiles): no size,
    stride or alignment asserts on the outputs of the step's extern kernels. Inductor checks each
    of them with a Python call per tensor; a SmolLM2 step calls ~210 kernels (the packed-code
    linears), and the asserts cost ~0.7 ms of a ~8 ms 4-bit step on the AMX Xeon. The kernels'
    outputs are fresh contiguous tensors as their registered fake functions declare, and the
    compiled step is tested against the eager one, so the checks guard against nothing the tests
    do not."""
    import torch._inductor.config

    return torch._inductor.config.patch(size_asserts=False, alignment_asserts=False)


def forward_step(model: torch.nn.Module, cache: StaticKVCache, tokens: torch.Tensor, key_valid: torch.Tensor,
                 next_pos: torch.Tensor, dtype: torch.dtype, cache_kwarg: str = "cache", tree: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``tokens`` (batch, q) int64 (all real, e.g. a decode or verify step) after the cached
    context; return logits (batch, q, vocab) float32. ``tree`` (q, q) bool: which of the step's
    tokens each one sees (a token tree of several drafts; position = context length + depth);
    None: a chain.

    In place: writes their keys/values at the cache length, marks those slots valid in
    ``key_valid`` (batch, max_len) bool and advances ``next_pos`` (batch,) int64 by q.
    """
    q = tokens.shape[1]
    start = cache.length
    key_valid.index_fill_(1, torch.arange(q, device=tokens.device) + start, True)
    if tree is None:
        mask = attention_mask_4d(key_valid, start, q, dtype)
        positions = next_pos[:, None] + torch.arange(q, device=tokens.device)[None, :]
    else:
        mask = tree_attention_mask_4d(key_valid, start, tree, dtype)
        positions = next_pos[:, None] + (tree.sum(-1) - 1)[None, :]
    out = model(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True, **{cache_kwarg: cache})
    next_pos.add_(q)
    return out.logits.float()


def decode_one(model: torch.nn.Module, cache: StaticKVCache, tokens: torch.Tensor, key_valid: torch.Tensor,
               next_pos: torch.Tensor, dtype: torch.dtype, cache_kwarg: str = "cache") -> torch.Tensor:
    """One decode step: ``tokens`` (batch, 1) -> next-token logits (batch, vocab) float32."""
    return forward_step(model, cache, tokens, key_valid, next_pos, dtype, cache_kwarg)[:, -1]


def prefill(model: torch.nn.Module, cache: StaticKVCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            key_valid: torch.Tensor, next_pos: torch.Tensor, dtype: torch.dtype, cache_kwarg: str = "cache") -> torch.Tensor:
    """Run the (left-padded) prompt ``input_ids`` (batch, T) with ``attention_mask`` (batch, T)
    into an empty ``cache``; return the last position's logits (batch, vocab) float32.

    Sets ``key_valid[:, :T]`` from the mask and ``next_pos`` (batch,) to each row's length.
    """
    t = input_ids.shape[1]
    key_valid.zero_()
    key_valid[:, :t] = attention_mask.bool()
    mask = attention_mask_4d(key_valid, 0, t, dtype)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=input_ids, position_ids=positions, attention_mask=mask, use_cache=True, **{cache_kwarg: cache}, **kwargs)
    next_pos.copy_(attention_mask.long().sum(-1))
    return out.logits[:, -1].float()


def decode_n(step: Callable, model: torch.nn.Module, cache: StaticKVCache, first: torch.Tensor, n: int, key_valid: torch.Tensor,
             next_pos: torch.Tensor, dtype: torch.dtype, choose: Callable[[torch.Tensor], torch.Tensor],
             cache_kwarg: str = "cache") -> Iterator[torch.Tensor]:
    """Yield ``n`` next tokens (batch,) after ``first`` (batch,), each from ``step`` (``decode_one``
    or its compiled form) and ``choose`` (logits -> tokens)."""
    token = first
    for _ in range(n):
        logits = step(model, cache, token[:, None], key_valid, next_pos, dtype, cache_kwarg)
        token = choose(logits)
        yield token


# ----- configuration, results --------------------------------------------------------------------

@dataclass
class GenerationConfig:
    """What to generate: ``max_new_tokens``; sampling (``temperature`` 0 = greedy, ``top_k``,
    ``top_p``, ``seed``); stop rules (``stop`` strings, ``stop_at_eos``); ``speculation``: a
    ``speculative.SpeculationConfig`` (greedy only, batch 1; lossless) or None; ``kv_cache``: a
    KV-cache recipe step (``{"method": "information", "ratio": 0.75, "bits": 4}``, see
    ``runtime.kv``) or None: the prompt is prefilled into that compressed cache and every step
    attends over it (eager steps, one prompt at a time; the reported KV bytes are the cache's)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True
    speculation: object | None = None
    kv_cache: object | None = None

    def __post_init__(self) -> None:
        if not is_int_at_least(self.max_new_tokens, 1):
            raise ConfigError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1", "pass e.g. max_new_tokens=64")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"stop={list(self.stop)!r} must be non-empty strings", "pass e.g. stop=['\\n\\n']")
        self.sampling = SamplingConfig(self.temperature, self.top_k, self.top_p, self.seed)
        if self.speculation is not None and not self.sampling.greedy:
            raise ConfigError("speculative decoding is lossless only for greedy decoding", "use temperature=0 or drop the speculation")
        if self.kv_cache is not None:
            from slimformer.runtime.kv import kv_config_from_dict

            self.kv_cache = kv_config_from_dict(self.kv_cache)
            if self.speculation is not None:
                raise ConfigError("speculative decoding over a compressed KV cache is not supported", "drop either the speculation or the KV-cache recipe")


@dataclass
class GenerationStats:
    """Measurements of one call. Times in seconds; ``decode_tokens_per_s`` counts new tokens of
    all rows after the first one (batch * steps / decode time); ``peak_rss_mb``: the process's
    peak resident memory during the call (Linux; else the lifetime peak)."""

    batch: int
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    prefill_s: float
    prefill_tokens_per_s: float
    decode_s: float
    decode_steps: int
    decode_tokens_per_s: float
    peak_rss_mb: float
    kv_cache_mb: float
    compiled: bool
    speculation: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    """``texts``: the new text of each prompt (cut before a stop string); ``tokens``: the new
    token ids of each prompt; ``finish``: ``"eos"``, ``"stop"`` or ``"length"`` per prompt."""

    texts: list[str]
    tokens: list[list[int]]
    finish: list[str]
    stats: GenerationStats


class _PeakMemory:
    """Peak resident memory of this process over a block (Linux: resets VmHWM first)."""

    def __enter__(self):
        self.reset = False
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.reset = True
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        self.peak_mb = _vm_hwm_mb()

    @staticmethod
    def now() -> float:
        return _vm_hwm_mb()


def _vm_hwm_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----- the generator ------------------------------------------------------------------------------

def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree (and config) that shares every tensor with ``model``: edits of
    the structure (dropped blocks) do not touch the original, and no weight is duplicated."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for value in module.__dict__.values():
            if isinstance(value, torch.Tensor):
                memo[id(value)] = value
            elif isinstance(value, dict):
                for v in value.values():
                    if isinstance(v, torch.Tensor):
                        memo[id(v)] = v
    return copy.deepcopy(model, memo)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The float dtype the model computes in (that of its input embeddings' output)."""
    emb = model.get_input_embeddings()
    with torch.no_grad():
        return emb(torch.zeros(1, 1, dtype=torch.long)).dtype


def plan_original(loaded, view: torch.nn.Module, execution: object):
    """Plan the decode paths of ``view`` (a weight-sharing copy of ``loaded.model``) when
    ``loaded`` was not planned at load time and holds no quantized layer: activations as stored,
    the decode workload. Returns the ``ExecutionPlan``, or None (planning off, or already planned)."""
    from slimformer.methods.quantization.modules import QuantizedModule
    from slimformer.runtime.planner import as_plan_settings, plan_execution, planner_enabled

    settings = as_plan_settings(execution)
    if settings is None or not planner_enabled() or getattr(loaded, "execution", None) is not None:
        return None
    if any(isinstance(m, QuantizedModule) for m in view.modules()):  # compressed: planned by its loader
        return None
    target = copy.copy(loaded)  # the same model record, pointing at the view
    target.model, target.execution = view, None
    return plan_execution(target, replace(settings, activations="stored", workload="decode"))


class TextGenerator:
    """Generate text with a causal LM (a ``LoadedModel``: original or compressed).

    ``dtype``: compute dtype (``torch.bfloat16`` casts a copy that shares nothing with the
    original's float weights; None keeps the model's); ``compile``: compile the decode step
    (None: on unless ``SLIMFORMER_COMPILE=0``); ``execution``: planner settings for a model that
    was not planned when it was loaded (an original: its plain linears), as ``load_model``'s
    ``execution`` (``"auto"``, a memory policy, a dict, or ``"off"``): each layer's decode path is
    timed on this machine (``F.linear`` against :mod:`slimformer.kernels.dense_linear`) and
    installed on the generator's weight-sharing view, never on ``loaded.model`` itself.
    """

    def __init__(self, loaded, dtype: torch.dtype | None = None, compile: bool | None = None, execution: object = "auto") -> None:
        if getattr(loaded, "kind", "causal-lm") != "causal-lm":
            raise ConfigError(f"{loaded.source} is an encoder ({loaded.kind}); it cannot generate text", "pass a causal language model")
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        model = loaded.model
        if dtype is not None and model_dtype(model) != dtype:
            from slimformer.methods.quantization.cast import cast_model

            model = copy.deepcopy(model)
            cast_model(model, dtype)
        view = shared_copy(model.eval())  # same weights; matmul attention for few-token steps
        attention = use_decode_attention(view)
        self.execution = plan_original(loaded, view, execution)
        self.model = view if attention or self.execution is not None else model
        self.dtype = model_dtype(self.model)
        self.cache_kwarg = _cache_kwarg(self.model)
        self.compile = compile_enabled(compile)
        self._compiled: Callable | None = None
        self._verify_costs: list[float] = []
        self._step_costs = None  # speculative.StepCosts: the verify costs refined by timed steps (speculative.step_costs)
        self._caches: dict[tuple[int, int], tuple[StaticKVCache, torch.Tensor]] = {}
        self.eos_ids = self._eos_ids()

    # ----- pieces ------------------------------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def step_fn(self) -> Callable:
        """The one-token step: compiled (Inductor, fullgraph) unless compilation is off."""
        if not self.compile:
            return forward_step
        if self._compiled is None:
            from slimformer.dynamo import allow_graphs

            allow_graphs(64)
            self._compiled = torch.compile(forward_step, fullgraph=True, dynamic=False)
        return self._compiled

    def run_step(self, cache: StaticKVCache, tokens: torch.Tensor, key_valid: torch.Tensor, next_pos: torch.Tensor,
                 model: torch.nn.Module | None = None, tree: torch.Tensor | None = None) -> torch.Tensor:
        """``forward_step`` through the compiled form, falling back to eager on a compiler error.
        ``tokens`` (batch, q): every step of q >= 2 tokens runs as a token tree (``tree`` (q, q)
        bool, default ``chain_tree(q)``), whose compiled graph takes q as a symbolic size (one
        graph for every verify width and shape of tree)."""
        model = self.model if model is None else model
        q = tokens.shape[1]
        if q > 1 and tree is None:
            tree = chain_tree(q)
        with torch.no_grad():
            if self.compile:
                if q > 1:
                    torch._dynamo.maybe_mark_dynamic(tokens, 1)
                    torch._dynamo.maybe_mark_dynamic(tree, 0)
                    torch._dynamo.maybe_mark_dynamic(tree, 1)
                try:
                    with step_guards(), step_codegen():
                        return self.step_fn()(model, cache, tokens, key_valid, next_pos, self.dtype, self.cache_kwarg, tree)
                except Exception as exc:  # noqa: BLE001 - any compiler failure: run eagerly
                    if isinstance(exc, (KeyboardInterrupt, MemoryError)):
                        raise
                    from slimformer.runtime.compile import exception_line

                    warnings.warn(f"slimformer: torch.compile failed for the decode step ({exception_line(exc)}); running eagerly", stacklevel=2)
                    self.compile = False
            return forward_step(model, cache, tokens, key_valid, next_pos, self.dtype, self.cache_kwarg, tree)

    def verify_costs(self, widths: int, rounds: int = 9, context: int = 64) -> list[float]:
        """Measured time of a step of 1..``widths`` tokens (batch 1, after ``context`` cached
        tokens) on this machine, in one-token steps: ``costs[q - 1]``; medians of ``rounds``
        interleaved rounds after a warm-up that compiles, made non-decreasing in q. Measured once
        per generator (a wider request measures again); about ``rounds * widths`` steps."""
        if len(self._verify_costs) >= widths:
            return self._verify_costs[:widths]
        cache, key_valid = self.cache_for(1, context + widths + 1)
        next_pos = torch.zeros(1, dtype=torch.long)
        vocab = int(getattr(self.model.config, "vocab_size", 2))
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (1, context), generator=gen)
        with torch.no_grad():
            prefill(self.model, cache, ids, torch.ones_like(ids), key_valid, next_pos, self.dtype, self.cache_kwarg)
        times: list[list[float]] = [[] for _ in range(widths)]
        for r in range(rounds + 1):
            for q in range(1, widths + 1):
                tokens = torch.randint(0, vocab, (1, q), generator=gen)
                start = time.perf_counter()
                self.run_step(cache, tokens, key_valid, next_pos)
                if r:  # round 0 warms up (and compiles)
                    times[q - 1].append(time.perf_counter() - start)
                cache.crop(-q)
                next_pos.sub_(q)
        medians = [sorted(t)[len(t) // 2] for t in times]
        self._verify_costs = list(accumulate((m / medians[0] for m in medians), max))
        return self._verify_costs

    def cache_for(self, batch: int, needed: int, model: torch.nn.Module | None = None) -> tuple[StaticKVCache, torch.Tensor]:
        """A reset static cache for ``batch`` rows of at least ``needed`` slots, and its
        ``key_valid`` (batch, max_len) bool; reused across calls of the same size."""
        model = self.model if model is None else model
        max_len = -(-needed // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if limit and needed > limit:
            raise ConfigError(f"prompt plus new tokens ({needed}) exceed the model's context ({limit})", "shorten the prompt or lower max_new_tokens")
        if limit:
            max_len = min(max_len, limit)
        key = (id(model), batch, max_len)
        if key not in self._caches:
            cache = StaticKVCache.for_model(model, batch, max_len, dtype=self.dtype)
            self._caches[key] = (cache, torch.zeros(batch, max_len, dtype=torch.bool))
        cache, key_valid = self._caches[key]
        cache.reset()
        key_valid.zero_()
        return cache, key_valid

    def encode(self, prompts: Sequence[str], chat: bool = False, system: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``input_ids`` and ``attention_mask`` (batch, T) of ``prompts``; with
        ``chat``, each prompt is a user message wrapped in the model's chat template."""
        tok = self.tokenizer
        if tok is None:
            raise ConfigError(f"{self.loaded.source} has no tokenizer", "save the tokenizer into the model folder")
        if chat:
            conversations = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}] for p in prompts]
            return self.encode_conversations(conversations)
        encoded = [tok(p)["input_ids"] for p in prompts]
        return self._pad(encoded)

    def encode_conversations(self, conversations: Sequence[list[dict]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``input_ids``/``attention_mask`` (batch, T) of chat ``conversations`` (lists
        of ``{"role", "content"}`` messages) through the model's chat template, ready for the
        assistant's turn."""
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ConfigError(f"{self.loaded.source} has no chat template", "generate with a plain prompt instead of chat")
        texts = [tok.apply_chat_template(list(c), add_generation_prompt=True, tokenize=False) for c in conversations]
        return self._pad([tok(t, add_special_tokens=False)["input_ids"] for t in texts])

    def _pad(self, encoded: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad token lists into ``input_ids``/``attention_mask`` (batch, T) int64."""
        tok = self.tokenizer
        if any(len(e) == 0 for e in encoded):
            raise ConfigError("a prompt encodes to no tokens", "pass a non-empty prompt")
        width = max(len(e) for e in encoded)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
            mask[i, width - len(e):] = 1
        return ids, mask

    # ----- generation --------------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[str], config: GenerationConfig | None = None, chat: bool = False,
                 system: str | None = None, on_text: Callable[[int, str], None] | None = None) -> GenerationResult:
        """Generate for one prompt or a batch; ``on_text(row, piece)`` receives streamed text."""
        config = config or GenerationConfig()
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        if not prompts:
            raise ConfigError("no prompts given", "pass at least one prompt")
        ids, mask = self.encode(prompts, chat=chat, system=system)
        return self.generate_ids(ids, mask, config, on_text=on_text)

    def stream(self, prompt: str, config: GenerationConfig | None = None, chat: bool = False,
               system: str | None = None) -> Iterator[str]:
        """Yield the generated text of one prompt piece by piece; the call's ``GenerationResult``
        is then in ``self.last_result``."""
        import queue
        import threading

        pieces: queue.Queue = queue.Queue()
        done = object()
        errors: list[BaseException] = []

        def work():
            try:
                self.last_result = self.generate(prompt, config, chat=chat, system=system, on_text=lambda _row, piece: pieces.put(piece))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)
            finally:
                pieces.put(done)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        while True:
            piece = pieces.get()
            if piece is done:
                break
            yield piece
        thread.join()
        if errors:
            raise errors[0]

    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig,
                     on_text: Callable[[int, str], None] | None = None) -> GenerationResult:
        """Generate from left-padded ``input_ids``/``attention_mask`` (batch, T) int64."""
        batch, width = input_ids.shape
        if config.speculation is not None and batch != 1:
            raise ConfigError(f"speculative decoding runs one prompt at a time (got {batch})", "generate the prompts one by one, or drop the speculation")
        if config.kv_cache is not None and batch != 1:
            raise ConfigError(f"a compressed KV cache runs one prompt at a time (got {batch})", "generate the prompts one by one, or drop the KV-cache recipe")
        streams = [_RowText(self.tokenizer, config.stop) for _ in range(batch)]
        finish = ["length"] * batch
        done = [False] * batch

        def accept(row: int, token: int) -> None:
            if done[row]:
                return
            if config.stop_at_eos and token in self.eos_ids:
                done[row], finish[row] = True, "eos"
                return
            piece, stopped = streams[row].add(token)
            if piece and on_text is not None:
                on_text(row, piece)
            if stopped:
                done[row], finish[row] = True, "stop"
            elif len(streams[row].tokens) >= config.max_new_tokens:
                done[row] = True

        with _PeakMemory() as peak:
            start = time.perf_counter()
            if config.speculation is not None:
                timing, spec_stats = config.speculation.run(self, input_ids, attention_mask, config, lambda tok: accept(0, tok), lambda: done[0])
                cache_bytes = timing.pop("kv_bytes")
            elif config.kv_cache is not None:
                spec_stats = {}
                timing, cache_bytes = self._generate_compressed(input_ids, attention_mask, config, lambda tok: accept(0, tok), lambda: done[0])
            else:
                spec_stats = {}
                cache, key_valid = self.cache_for(batch, width + config.max_new_tokens)
                next_pos = torch.zeros(batch, dtype=torch.long)
                generator = config.sampling.make_generator()
                with torch.no_grad():
                    logits = prefill(self.model, cache, input_ids, attention_mask, key_valid, next_pos, self.dtype, self.cache_kwarg)
                token = next_tokens(logits, config.sampling, generator)
                first = time.perf_counter()
                for row in range(batch):
                    accept(row, int(token[row]))
                steps = 0
                while not all(done):
                    logits = self.run_step(cache, token[:, None], key_valid, next_pos)[:, -1]
                    token = next_tokens(logits, config.sampling, generator)
                    steps += 1
                    for row in range(batch):
                        accept(row, int(token[row]))
                end = time.perf_counter()
                timing = {"prefill_end": first, "end": end, "steps": steps}
                cache_bytes = cache.nbytes()
            for row in range(batch):
                piece = streams[row].flush()
                if piece and on_text is not None:
                    on_text(row, piece)
        prompt_tokens = int(attention_mask.sum())
        prefill_s = timing["prefill_end"] - start
        decode_s = timing["end"] - timing["prefill_end"]
        new_tokens = sum(len(s.tokens) for s in streams)
        decoded_after_first = max(new_tokens - batch, 0) if config.speculation is None else max(new_tokens - 1, 0)
        stats = GenerationStats(
            batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens, ttft_s=prefill_s, prefill_s=prefill_s,
            prefill_tokens_per_s=prompt_tokens / prefill_s if prefill_s > 0 else float("nan"),
            decode_s=decode_s, decode_steps=timing["steps"],
            decode_tokens_per_s=decoded_after_first / decode_s if decode_s > 0 else float("nan"),
            peak_rss_mb=peak.peak_mb, kv_cache_mb=cache_bytes / 2**20, compiled=self.compile, speculation=spec_stats,
        )
        return GenerationResult([s.text for s in streams], [s.tokens for s in streams], finish, stats)

    def _generate_compressed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig,
                             accept: Callable[[int], None], finished: Callable[[], bool]) -> tuple[dict, int]:
        """One prompt ``(1, T)`` through a ``runtime.kv`` compressed cache: prefill, then one token a
        step with explicit positions (after eviction the cache holds fewer entries than tokens seen)."""
        from slimformer.runtime.kv import KVCache

        ids = input_ids[:, attention_mask[0].bool()]
        cache = KVCache(config.kv_cache, self.model.config.num_hidden_layers)
        generator = config.sampling.make_generator()
        n = ids.shape[1]
        with torch.no_grad(), cache.attach(self.model):
            out = self.model(ids, position_ids=torch.arange(n).unsqueeze(0), use_cache=True, logits_to_keep=1, **{self.cache_kwarg: cache})
            token = next_tokens(out.logits[:, -1].float(), config.sampling, generator)
            first = time.perf_counter()
            accept(int(token[0]))
            steps = 0
            while not finished():
                out = self.model(token[:, None], position_ids=torch.tensor([[n + steps]]), use_cache=True, **{self.cache_kwarg: cache})
                token = next_tokens(out.logits[:, -1].float(), config.sampling, generator)
                steps += 1
                accept(int(token[0]))
        return {"prefill_end": first, "end": time.perf_counter(), "steps": steps}, cache.nbytes


class _RowText:
    """The text of one row's new tokens, the part already streamed, and the stop-string rule."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0

    def add(self, token: int) -> tuple[str, bool]:
        """Add ``token``; return ``(text ready to stream, whether a stop string appeared)``."""
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for s in self.stop:
            cut = self.text.find(s)
            if cut >= 0:
                self.text = self.text[:cut]
                return self._emit(len(self.text)), True
        ready = len(self.text) - self.hold
        if self.text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next token
            ready = min(ready, len(self.text) - 1)
        return self._emit(ready), False

    def _emit(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece = self.text[self.sent:upto]
        self.sent = upto
        return piece

    def flush(self) -> str:
        return self._emit(len(self.text))
