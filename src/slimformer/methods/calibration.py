"""Calibration: tokenized calibration batches, and statistics of the inputs of linear layers
collected block by block (so that each block sees the outputs of the already-compressed blocks
before it, as GPTQ, SparseGPT and Wanda do).

One pass through depth: the inputs of block 0 (hidden states, plus the keyword arguments each
block receives: attention mask, position embeddings, position ids) are captured once per batch;
each block is then calibrated on its cached inputs, compressed by the caller, and run once more to
produce the next block's inputs. An L-block model costs O(L) block forwards per batch. Cached
hidden states stay in memory while they fit a budget, else one file per batch is spilled to disk
(safetensors) and read back one batch at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from slimformer.data import TextSpec, load_texts
from slimformer.data.text import check_source
from slimformer.errors import ConfigError, is_int_at_least

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("auto", "memory", "disk")


@dataclass(frozen=True)
class CalibrationSettings:
    """Calibration text: ``source`` (a built-in source, by default ``mix``: docstrings, reference
    prose, code and notices, short and long; or your own .txt/.jsonl, preferred when given), ``n_samples``
    documents of the calibration split, truncated to ``max_length`` tokens, run in batches of
    ``batch_size``, sampled with ``seed``. ``windows``: a document longer than ``max_length``
    gives up to that many consecutive windows of ``max_length`` tokens, each its own sample
    (1: only its first window; a later window is kept if it holds at least a quarter of
    ``max_length`` tokens), so long documents are not cut to their beginning. ``offload``: where the cached block inputs live
    during calibration: ``memory``, ``disk`` (one safetensors file per batch, read back one at a
    time) or ``auto`` (memory while they fit a quarter of the available memory, else disk)."""

    source: str = "mix"
    n_samples: int = 128
    max_length: int = 128
    batch_size: int = 16
    seed: int = 0
    offload: str = "auto"
    windows: int = 1

    def __post_init__(self) -> None:
        check_source(self.source, "calibration.source")
        if self.offload not in OFFLOAD_MODES:
            raise ConfigError(f"calibration offload must be one of {list(OFFLOAD_MODES)}, got {self.offload!r}", "set calibration.offload to auto, memory or disk")
        for name in ("n_samples", "max_length", "batch_size", "windows"):
            value = getattr(self, name)
            if not is_int_at_least(value, 1):
                raise ConfigError(f"calibration {name} must be a positive integer, got {value!r}", f"set calibration.{name} to e.g. 128")


class CompressionContext:
    """What a transform needs besides the model: calibration batches and progress settings."""

    def __init__(self, calibration: CalibrationSettings | None = None, progress: bool = False) -> None:
        self.calibration = calibration or CalibrationSettings()
        self.progress = progress
        self.max_positions: int | None = None  # the model's position limit, set by compress()
        # Float weights (out, in) of every linear layer before the recipe ran, keyed by module
        # name; taken by compress() only when a step declares requires_original_weights.
        self.original_weights: dict[str, torch.Tensor] | None = None
        # The model (nn.Module) as it was before the recipe ran, for steps that learn from it
        # (requires_teacher); a copy taken by compress() only when such a step is in the recipe.
        self.teacher: nn.Module | None = None
        # Where spilled calibration activations go (None: the system's temporary folder).
        self.work_dir: str | os.PathLike | None = None
        # Streamed weights: an object with ``materialize(prefix, module)`` that loads the
        # weights of a block left on the meta device (see slimformer.methods.streaming).
        self.weights: Any = None
        # Bytes of cached activations kept in memory before spilling to disk (offload=auto);
        # None: a quarter of the available memory.
        self.activation_budget: int | None = None
        # The job's per-block checkpoints (slimformer.methods.checkpoint.JobCheckpoint), set by
        # compress() when it is given a work folder; blockwise saves and restores through it.
        self.checkpoint: Any = None
        # Per-layer record entries of the current step (see layer_record), reset per step.
        self.layer_records: dict[str, dict] = {}
        self._batches: list[dict[str, torch.Tensor]] | None = None
        self._texts: list[str] | None = None

    def layer_record(self, key: str) -> dict:
        """A dict ``{layer name: value}`` of the current step's record (e.g. ``"kernels"``):
        values written here for a block's layers are checkpointed with the block and put back
        when a resumed job restores it, so a resumable method builds its per-layer record here.
        Values must be JSON-safe (numbers, strings, lists)."""
        return self.layer_records.setdefault(key, {})

    def batches(self, tokenizer) -> list[dict[str, torch.Tensor]]:
        """Tokenized calibration batches: dicts of ``input_ids``/``attention_mask`` (batch, seq).

        Documents are grouped by length (longest first) before batching, so a batch pads its
        documents to a similar length: statistics summed over valid tokens are the same as for
        any grouping, and the forward passes of calibration do not compute padding (with the
        mixed default text, about a third of the positions of randomly grouped batches)."""
        if self._batches is None:
            self._batches = self.tokenize(tokenizer, self.texts())
        return self._batches

    def batches_in_draw_order(self, tokenizer) -> list[dict[str, torch.Tensor]]:
        """The calibration documents batched in their (seeded, shuffled) draw order, so that any
        first ``k`` batches are a random sample of them: what scores candidates on a prefix of
        the batches needs (a search's probes and first selection stages). Length-sorted batches
        put the longest documents first, and on mixed text those are mostly one kind (on the
        default mix, 4 docstrings and source files for SmolLM2's first batch): a search scored
        on them is tuned to that kind. Costs some padding (a batch pads to its longest). With
        ``windows > 1`` the windows stay batched longest first."""
        return self.tokenize(tokenizer, self.texts(), by_length=False)

    def texts(self) -> list[str]:
        """The calibration documents (loaded once)."""
        if self._texts is None:
            s = self.calibration
            self._texts = load_texts(TextSpec(source=s.source, split="calibration", n=s.n_samples, seed=s.seed))
        return self._texts

    def tokenize(self, tokenizer, texts: list[str], by_length: bool = True) -> list[dict[str, torch.Tensor]]:
        """``texts`` as batches of these settings (``batch_size``, ``max_length``), longest first
        (``by_length=False``: in their given order)."""
        s = self.calibration
        max_length = min(s.max_length, self.max_positions or s.max_length)
        if s.windows > 1:
            return self._window_batches(tokenizer, texts, max_length)
        if by_length:
            lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
            texts = [texts[i] for i in sorted(range(len(texts)), key=lambda i: -lengths[i])]
        batches = [
            dict(tokenizer(texts[i : i + s.batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
            for i in range(0, len(texts), s.batch_size)
        ]
        for b in batches:
            b.pop("token_type_ids", None)
        return batches

    def _window_batches(self, tokenizer, texts: list[str], max_length: int) -> list[dict[str, torch.Tensor]]:
        """Up to ``windows`` consecutive windows of ``max_length`` tokens per document (the
        tokenizer's overflow, each window with the model's special tokens), batched longest
        first."""
        s = self.calibration
        try:
            enc = tokenizer(texts, truncation=True, max_length=max_length, return_overflowing_tokens=True, stride=0)
        except (NotImplementedError, ValueError) as e:
            raise ConfigError(f"calibration windows={s.windows} needs a tokenizer that returns overflowing tokens ({e})", "set calibration.windows: 1") from None
        owner = enc.get("overflow_to_sample_mapping")
        if owner is None:
            raise ConfigError(f"calibration windows={s.windows} needs a tokenizer that returns overflowing tokens", "set calibration.windows: 1")
        taken: dict[int, int] = {}
        samples = []
        for k, doc in enumerate(owner):
            ids = enc["input_ids"][k]
            n = taken.get(doc, 0)
            if n < s.windows and (n == 0 or len(ids) >= max_length // 4):
                taken[doc] = n + 1
                samples.append({"input_ids": ids, "attention_mask": enc["attention_mask"][k]})
        samples.sort(key=lambda x: -len(x["input_ids"]))
        batches = [dict(tokenizer.pad(samples[i : i + s.batch_size], padding=True, return_tensors="pt")) for i in range(0, len(samples), s.batch_size)]
        for b in batches:
            b.pop("token_type_ids", None)
        return batches


class _StopForward(Exception):
    pass


def run_batches(model: nn.Module, batches: list[dict], stop_after: nn.Module | None = None, on_batch: Callable[[dict], None] | None = None) -> None:
    """Run ``model`` on each batch, optionally stopping right after module ``stop_after`` ran.

    Batches are dicts of ``input_ids``/``attention_mask`` (batch, seq); no KV cache is built.
    """
    extra = {"use_cache": False} if _is_causal(model) else {}
    handle = None
    if stop_after is not None:
        def _stop(_module, _inputs, _output):
            raise _StopForward

        handle = stop_after.register_forward_hook(_stop)
    try:
        with torch.no_grad():
            for batch in batches:
                if on_batch is not None:
                    on_batch(batch)
                try:
                    model(**batch, **extra)
                except _StopForward:
                    pass
    finally:
        if handle is not None:
            handle.remove()


def _is_causal(model: nn.Module) -> bool:
    from slimformer.models.adapters import spec_for_model_type

    return spec_for_model_type(model.config.model_type).kind == "causal-lm"


class InputStatistics:
    """Accumulates statistics of the inputs of linear layers, over valid (non-padding) tokens.

    ``hessian[name]``: ``sum x x^T`` (in, in) float32 and ``count[name]`` the number of tokens;
    ``sq_norm[name]``: ``sum x_j^2``, ``abs_sum[name]``: ``sum |x_j|``, ``sum[name]``: ``sum x_j``
    and ``absmax[name]``:
    ``max |x_j|`` per input feature (in,); with ``keep_samples`` > 0, ``samples[name]``: the
    first ``keep_samples`` input rows (tokens, in) float32. Use as a context manager.
    """

    def __init__(self, modules: dict[str, nn.Linear], hessian: bool = True, keep_samples: int = 0) -> None:
        self.modules = modules
        self.want_hessian = hessian
        self.keep_samples = keep_samples
        self.absmax: dict[str, torch.Tensor] = {}
        self.samples: dict[str, torch.Tensor] = {}
        self.hessian: dict[str, torch.Tensor] = {}
        self.sq_norm: dict[str, torch.Tensor] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {name: 0 for name in modules}
        self.mask: torch.Tensor | None = None
        self._handles: list = []
        self._previous: tuple | None = None  # (input tensor, layer name, its batch statistics)
        self._leader: dict[str, str] = {}

    def set_batch(self, batch: dict) -> None:
        self.mask = batch.get("attention_mask")
        self._previous = None

    def input_leader(self, name: str) -> str:
        """The first layer whose input was the very same tensor as ``name``'s in every batch (its
        statistics are then identical to ``name``'s); ``name`` itself when there is none."""
        return self._leader.get(name, name)

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, _output) -> None:
            source = inputs[0]
            previous = self._previous
            if previous is not None and previous[0] is source:
                # same input tensor as the layer called just before (q/k/v, gate/up): reuse its
                # per-batch statistics instead of recomputing x^T x
                leader, parts = previous[1], previous[2]
            else:
                leader, parts = name, self._batch_statistics(source)
                self._previous = (source, name, parts)
            seen = self._leader.get(name)
            self._leader[name] = leader if seen is None or seen == leader else name
            x, h, sq, ab, am, total = parts
            if leader != name and name not in self.sq_norm:  # a follower's first values: its own tensors
                h, sq, ab, am, total = (None if h is None else h.clone()), sq.clone(), ab.clone(), am.clone(), total.clone()
            self.count[name] += x.shape[0]
            if self.want_hessian:
                self.hessian[name] = self.hessian[name] + h if name in self.hessian else h
            self.sq_norm[name] = self.sq_norm[name] + sq if name in self.sq_norm else sq
            self.abs_sum[name] = self.abs_sum[name] + ab if name in self.abs_sum else ab
            self.sum[name] = self.sum[name] + total if name in self.sum else total
            self.absmax[name] = torch.maximum(self.absmax[name], am) if name in self.absmax else am
            if self.keep_samples:
                kept = self.samples.get(name, x[:0])
                if kept.shape[0] < self.keep_samples:
                    self.samples[name] = torch.cat([kept, x[: self.keep_samples - kept.shape[0]]])

        return hook

    def _batch_statistics(self, source: torch.Tensor) -> tuple:
        """``(x, x^T x, sum x^2, sum |x|, max |x|, sum x)`` of one input (valid tokens only, float32)."""
        x = source.detach()
        if self.mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
            x = x[self.mask.bool()]
        x = x.reshape(-1, x.shape[-1]).float()
        h = x.t() @ x if self.want_hessian else None
        return x, h, (x * x).sum(0), x.abs().sum(0), x.abs().amax(0), x.sum(0)

    def __enter__(self) -> "InputStatistics":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def stages_of_block(model: nn.Module, block: nn.Module, names: list[str], batch: dict) -> list[list[str]]:
    """Split a block's selected linears into the stages they run in, in execution order.

    Layers that read the very same input tensor (e.g. q, k and v) form one stage; a layer
    whose input is computed from an earlier stage's output comes in a later stage. Found by
    running ``batch`` once up to the end of ``block`` and recording call order and inputs.
    """
    order: list[tuple[str, torch.Tensor]] = []  # inputs are held, so no two can share memory
    handles = []
    for n in names:
        def hook(_m, inputs, _o, n=n):
            if all(n != seen for seen, _ in order):
                order.append((n, inputs[0]))

        handles.append(model.get_submodule(n).register_forward_hook(hook))
    try:
        run_batches(model, [batch], stop_after=block)
    finally:
        for h in handles:
            h.remove()
    return _stages_from_call_order(order, list(names))


def _stages_from_call_order(order: list[tuple[str, torch.Tensor]], names: list[str]) -> list[list[str]]:
    """Group layers recorded in call order with their input tensors into stages: consecutive
    layers reading the very same tensor share a stage; layers that never ran come last."""
    stages: list[list[str]] = []
    last_input = None
    for n, x in order:
        if stages and x is last_input:
            stages[-1].append(n)
        else:
            stages.append([n])
        last_input = x
    missing = [n for n in names if all(n != m for m, _ in order)]
    return stages + ([missing] if missing else [])


# ----- one pass through depth ---------------------------------------------------------------


class ActivationStore:
    """The hidden states (batch, seq, hidden) entering the current block, one tensor per
    calibration batch: in memory, or spilled to ``folder`` as one safetensors file per batch and
    read back one batch at a time (so at most a batch's input and output are held)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._memory: dict[int, torch.Tensor] = {}
        self._count = 0

    @property
    def spilled(self) -> bool:
        return self.folder is not None

    def _path(self, index: int) -> Path:
        assert self.folder is not None
        return self.folder / f"batch-{index:05d}.safetensors"

    def __len__(self) -> int:
        """Batches stored (indices 0 .. len - 1)."""
        return self._count

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self._count:
            raise IndexError(index)
        return self.get(index)

    def put(self, index: int, hidden: torch.Tensor) -> None:
        self._count = max(self._count, index + 1)
        if self.folder is None:
            self._memory[index] = hidden
            return
        from safetensors.torch import save_file

        path = self._path(index)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"hidden": hidden.contiguous()}, str(tmp))
        os.replace(tmp, path)

    def get(self, index: int) -> torch.Tensor:
        if self.folder is None:
            return self._memory[index]
        from safetensors.torch import load_file

        return load_file(str(self._path(index)))["hidden"]

    def close(self) -> None:
        self._memory.clear()
        self._count = 0
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class BlockCall:
    """How the model called one block for one batch, minus the hidden states: the remaining
    positional ``args`` and the ``kwargs`` (attention mask, position embeddings, position ids,
    cache settings), and whether the hidden states came as the ``hidden_states`` keyword."""

    args: tuple
    kwargs: dict
    hidden_as_kwarg: bool = False


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """Run one transformer ``block`` on ``hidden`` (batch, seq, hidden) as the model would; returns
    its output hidden states (batch, seq, hidden)."""
    if call.hidden_as_kwarg:
        out = block(*call.args, hidden_states=hidden, **call.kwargs)
    else:
        out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class _StandIn(nn.Module):
    """Takes a block's place while the model runs: calls ``on_call(index, args, kwargs)`` and
    returns what it returns (the incoming hidden states when it returns None), as a 1-tuple when
    the real blocks return tuples."""

    def __init__(self, index: int, on_call: Callable, as_tuple: bool) -> None:
        super().__init__()
        self.index = index
        self.on_call = on_call
        self.as_tuple = as_tuple

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        out = self.on_call(self.index, args, kwargs)
        out = hidden if out is None else out
        return (out,) if self.as_tuple else out


class _BlocksReplaced:
    """Context manager: the model's list of blocks is temporarily ``modules``."""

    def __init__(self, adapter, modules: list[nn.Module]) -> None:
        parent_path, _, self.attr = adapter.spec.blocks.rpartition(".")
        self.parent = adapter.base().get_submodule(parent_path) if parent_path else adapter.base()
        self.modules = modules

    def __enter__(self) -> None:
        self.original = getattr(self.parent, self.attr)
        setattr(self.parent, self.attr, nn.ModuleList(self.modules))

    def __exit__(self, *exc) -> None:
        setattr(self.parent, self.attr, self.original)


def _model_kwargs(model: nn.Module) -> dict:
    return {"use_cache": False} if _is_causal(model) else {}


def _returns_tuple(model: nn.Module, block: nn.Module, batch: dict) -> bool:
    """Whether ``block`` returns a tuple (older transformers) rather than a tensor."""
    seen: dict[str, bool] = {}

    def hook(_module, _inputs, output) -> None:
        seen["tuple"] = isinstance(output, (tuple, list))

    handle = block.register_forward_hook(hook)
    try:
        run_batches(model, [batch], stop_after=block)
    finally:
        handle.remove()
    return seen.get("tuple", False)


def capture_block_inputs(model: nn.Module, adapter, batches: list[dict], store: ActivationStore, as_tuple: bool = False) -> list[list[BlockCall]]:
    """Run the model once per batch with every block replaced by a recorder: stores the hidden
    states entering block 0 of batch ``b`` at ``store[b]`` and returns ``calls[b][i]``, the other
    arguments block ``i`` receives (per block, so per-layer masks such as sliding windows are
    kept; identical tensors are shared, not copied). Costs the embeddings only."""
    n = adapter.num_layers()
    calls: list[list[BlockCall]] = []
    current: list[BlockCall] = []

    def on_call(i: int, args: tuple, kwargs: dict):
        kw = dict(kwargs)
        if args:
            hidden, call = args[0], BlockCall(tuple(args[1:]), kw)
        else:
            hidden, call = kw.pop("hidden_states"), BlockCall((), kw, hidden_as_kwarg=True)
        if i == 0:
            store.put(len(calls), hidden.detach())
        current.append(call)
        if i == n - 1:
            raise _StopForward
        return None

    stand_ins = [_StandIn(i, on_call, as_tuple) for i in range(n)]
    with _BlocksReplaced(adapter, stand_ins), torch.no_grad():
        for batch in batches:
            current = []
            try:
                model(**batch, **_model_kwargs(model))
            except _StopForward:
                pass
            if len(current) != n:
                raise ConfigError(f"calibration reached {len(current)} of the model's {n} blocks", "check that the model runs on the calibration text")
            calls.append(current)
    return calls


def open_block_inputs(loaded, ctx: CompressionContext, batches: list[dict]) -> tuple[ActivationStore, list[list[BlockCall]]]:
    """The hidden states entering block 0 in a store that spills to disk as
    ``calibration.offload`` says (:func:`open_activation_store`; the caller closes it), and
    ``calls[b][i]`` as :func:`capture_block_inputs` returns them: for methods that carry the
    calibration stream through depth themselves, replacing each batch's states in place."""
    store = open_activation_store(loaded, ctx, batches)
    try:
        blocks = loaded.adapter.blocks()
        calls = capture_block_inputs(loaded.model, loaded.adapter, batches, store, _returns_tuple(loaded.model, blocks[0], batches[0]))
    except BaseException:
        store.close()
        raise
    return store, calls


def _block_stages(block: nn.Module, modules: dict[str, nn.Module], hidden: torch.Tensor, call: BlockCall) -> list[list[str]]:
    """Split a block's selected linears into the stages they run in, in execution order (layers
    reading the very same input tensor form one stage), by running the block once on ``hidden``."""
    order: list[tuple[str, torch.Tensor]] = []
    handles = []
    for n, m in modules.items():
        def hook(_m, inputs, _o, n=n):
            if all(n != seen for seen, _ in order):
                order.append((n, inputs[0]))

        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run_block(block, hidden, call)
    finally:
        for h in handles:
            h.remove()
    return _stages_from_call_order(order, list(modules))


class _StopWhenAllRan:
    """Forward hooks that stop the forward pass once every module of ``modules`` has run."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.pending: set[str] = set()
        self._handles: list = []

    def reset(self) -> None:
        self.pending = set(self.modules)

    def __enter__(self) -> "_StopWhenAllRan":
        for n, m in self.modules.items():
            def hook(_m, _i, _o, n=n):
                self.pending.discard(n)
                if not self.pending:
                    raise _StopForward

            self._handles.append(m.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _block_statistics(block, modules, store, calls, layer, batches, hessian, keep_samples, replay: "_StageReplay | None" = None) -> InputStatistics:
    """Statistics of ``modules`` (inside ``block``) over every batch, running only the block on
    its cached inputs and stopping as soon as all of ``modules`` ran. With ``replay``, layers of
    earlier stages return their recorded outputs and the inputs of ``modules`` are kept."""
    stats = InputStatistics(modules, hessian=hessian, keep_samples=keep_samples)
    capture = replay.capturing(modules) if replay is not None else contextlib.nullcontext()
    with stats, capture, _StopWhenAllRan(modules) as stop, torch.no_grad():
        for b, batch in enumerate(batches):
            if replay is not None:
                replay.batch = b
            stats.set_batch(batch)
            stop.reset()
            try:
                run_block(block, store.get(b), calls[b][layer])
            except _StopForward:
                pass
    return stats


def _tail_statistics(model, adapter, modules, store, batches, hessian, keep_samples, as_tuple) -> InputStatistics:
    """Statistics of modules outside the blocks (e.g. the output head): the model runs with its
    blocks replaced by a stand-in that returns the cached output of the last block."""
    n = adapter.num_layers()
    state = {"batch": 0}

    def on_call(i: int, _args, _kwargs):
        return store.get(state["batch"]) if i == n - 1 else None

    stand_ins = [_StandIn(i, on_call, as_tuple) for i in range(n)]
    stats = InputStatistics(modules, hessian=hessian, keep_samples=keep_samples)
    with _BlocksReplaced(adapter, stand_ins), stats, _StopWhenAllRan(modules) as stop, torch.no_grad():
        for b, batch in enumerate(batches):
            state["batch"] = b
            stats.set_batch(batch)
            stop.reset()
            try:
                model(**batch, **_model_kwargs(model))
            except _StopForward:
                pass
    return stats


def hidden_state_bytes(model: nn.Module, batches: list[dict]) -> int:
    """Bytes of one (batch, seq, hidden) hidden-state tensor per batch of ``model``: padded
    tokens x hidden width x the embedding's element size."""
    emb = model.get_input_embeddings()
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    return tokens * int(emb.weight.shape[1]) * emb.weight.element_size()


def activation_bytes(loaded, batches: list[dict]) -> int:
    """Bytes of one set of cached block inputs: tokens x hidden width x element size."""
    return hidden_state_bytes(loaded.model, batches)


def open_activation_store(loaded, ctx: CompressionContext, batches: list[dict]) -> ActivationStore:
    """An in-memory store, or a spill folder when ``offload`` says disk (or auto and the cached
    activations exceed the budget: a quarter of the available memory unless set)."""
    from slimformer.methods.memory import available_memory_bytes

    mode = ctx.calibration.offload
    if mode == "auto":
        budget = ctx.activation_budget if ctx.activation_budget is not None else available_memory_bytes() // 4
        mode = "disk" if activation_bytes(loaded, batches) > budget else "memory"
    if mode == "memory":
        return ActivationStore()
    folder = Path(tempfile.mkdtemp(prefix="slimformer-activations-", dir=ctx.work_dir))
    log.info("calibration activations spill to %s", folder)
    return ActivationStore(folder)


def blockwise(loaded, ctx: CompressionContext, selected: dict[str, nn.Module], hessian: bool, desc: str, sequential: bool = False, keep_samples: int = 0) -> Iterator[tuple[str, nn.Module, InputStatistics]]:
    """Yield ``(name, module, stats)`` for each selected linear layer, block by block.

    The statistics of block ``i`` are collected after the caller has processed (replaced) the
    layers of blocks ``< i``, so they reflect the compressed model so far. With ``sequential``
    (GPTQ's "true sequential" order) this holds inside each block too: its layers are taken
    stage by stage (q/k/v, then the attention output, then the MLP input and output
    projections), each stage calibrated on the outputs of the already-processed stages. Layers
    outside the blocks (e.g. the output head) come last.

    One pass through depth: block inputs are captured once, each block runs on its cached inputs
    once per stage to collect statistics and once more (compressed) to produce the next block's
    inputs, so the cost is linear in depth. With ``ctx.weights`` set, each block's weights are
    loaded from disk just before it is calibrated (streamed weights). With ``ctx.checkpoint``
    active (a resumable step of a job with a work folder), each finished block is checkpointed,
    and blocks a killed run already finished are restored instead of calibrated (their layers
    are not yielded; their record entries come back through ``ctx.layer_record``).
    """
    adapter = loaded.adapter
    model = loaded.model
    blocks = list(adapter.blocks())
    remaining = dict(selected)
    per_block: list[list[str]] = []
    for i in range(len(blocks)):
        prefix = adapter.block_prefix(i) + "."
        names = [n for n in remaining if n.startswith(prefix)]
        for n in names:
            remaining.pop(n)
        per_block.append(names)
    tail = list(remaining)
    last = len(blocks) - 1 if tail else max((i for i, names in enumerate(per_block) if names), default=-1)
    bar = tqdm(total=len(selected), desc=desc, disable=not ctx.progress, unit="layer")
    # Per-block checkpoints of a resumable job: finished blocks are restored, not recomputed.
    job = ctx.checkpoint if ctx.checkpoint is not None and ctx.checkpoint.active else None
    done = [bool(job is not None and names and job.has(_unit(i))) for i, names in enumerate(per_block)]
    tail_done = bool(tail) and job is not None and job.has("tail")

    def materialize(i: int) -> None:
        if ctx.weights is not None:
            ctx.weights.materialize(adapter.block_prefix(i), blocks[i])

    def restore(i: int) -> None:
        job.restore(_unit(i), model, ctx.layer_records)
        bar.update(len(per_block[i]))

    if all(d or not names for d, names in zip(done, per_block)) and (tail_done or not tail):
        # Every unit of this step is checkpointed: restore them, no calibration run at all.
        for i in range(len(blocks)):
            if done[i]:
                materialize(i)
                restore(i)
        if tail:
            if ctx.weights is not None:
                ctx.weights.materialize("", model)
            job.restore("tail", model, ctx.layer_records)
            bar.update(len(tail))
        bar.close()
        return

    batches = ctx.batches(loaded.tokenizer)
    store = open_activation_store(loaded, ctx, batches)
    stage_plans: dict[tuple[str, ...], list[list[str]]] = {}
    try:
        if last >= 0:
            materialize(0)
            as_tuple = _returns_tuple(model, blocks[0], batches[0])
            calls = capture_block_inputs(model, adapter, batches, store, as_tuple)
        for i in range(last + 1):
            materialize(i)
            block = blocks[i]
            names = per_block[i]
            if done[i]:
                restore(i)
                if i < last or tail:  # as the uninterrupted job ran it: compressed layers as dense products
                    dense = _DenseWhileCalibrating(block)
                    dense.swap_in()
                    try:
                        _run_to_next_block(block, store, calls, i, len(batches))
                    finally:
                        dense.swap_out()
            elif names:
                modules = {n: model.get_submodule(n) for n in names}
                if sequential:
                    # blocks of one model share their structure: found by running block i once,
                    # reused for every later block with the same layer names
                    prefix = adapter.block_prefix(i) + "."
                    local = tuple(n[len(prefix):] for n in names)
                    if local not in stage_plans:
                        found = _block_stages(block, modules, store.get(0), calls[0][i])
                        stage_plans[local] = [[n[len(prefix):] for n in stage] for stage in found]
                    stages = [[prefix + n for n in stage] for stage in stage_plans[local]]
                else:
                    stages = [names]
                replay = _StageReplay.if_it_fits(block, modules, store, batches, ctx) if len(stages) > 1 else None
                dense = _DenseWhileCalibrating(block)
                try:
                    for stage in stages:
                        if replay is not None:  # earlier stages' layers return their recorded outputs
                            replay.swap_in()
                        else:  # layers compressed by the earlier stages run from one dequantized copy
                            dense.swap_in()
                        stats = _block_statistics(block, {n: model.get_submodule(n) for n in stage}, store, calls, i, batches, hessian, keep_samples, replay)
                        dense.swap_out()
                        if replay is not None:
                            replay.swap_out()
                        yield from _layers_with(model, stage, stats, bar)
                        if replay is not None:
                            replay.record(stage)
                        if ctx.weights is not None:  # streamed: the replaced float layers leave memory now
                            for n in stage:
                                if model.get_submodule(n) is not modules[n]:
                                    _drop_tensors(modules[n])
                    if job is not None:  # every layer of the block is replaced by now
                        job.save(_unit(i), model, [adapter.block_prefix(i)], names, ctx.layer_records)
                    if i < last or tail:
                        if replay is not None:
                            replay.swap_in()
                        else:
                            dense.swap_in()
                        _run_to_next_block(block, store, calls, i, len(batches), replay)
                finally:
                    dense.swap_out()
                    if replay is not None:
                        replay.swap_out()
                        replay.clear()
            elif i < last or tail:
                _run_to_next_block(block, store, calls, i, len(batches))
        if tail:
            if ctx.weights is not None:
                ctx.weights.materialize("", model)  # e.g. an output head left on disk
            if tail_done:
                job.restore("tail", model, ctx.layer_records)
                bar.update(len(tail))
            else:
                stats = _tail_statistics(model, adapter, {n: model.get_submodule(n) for n in tail}, store, batches, hessian, keep_samples, as_tuple)
                yield from _layers_with(model, tail, stats, bar)
                if job is not None:
                    job.save("tail", model, tail, tail, ctx.layer_records)
    finally:
        store.close()
        bar.close()


def _layers_with(model: nn.Module, names: list[str], stats: InputStatistics, bar) -> Iterator[tuple[str, nn.Module, InputStatistics]]:
    """Yield ``(name, module, stats)`` for ``names`` (each must have seen calibration tokens)."""
    for n in names:
        if stats.count[n] == 0:
            raise ConfigError(f"calibration never reached {n}", "check that the calibration text is not empty")
        yield n, model.get_submodule(n), stats
        bar.update(1)


def _run_to_next_block(block: nn.Module, store: ActivationStore, calls: list[list[BlockCall]], i: int, n_batches: int, replay: "_StageReplay | None" = None) -> None:
    """Replace the cached inputs of block ``i`` by its outputs (the inputs of block ``i + 1``)."""
    with torch.no_grad():
        for b in range(n_batches):
            if replay is not None:
                replay.batch = b
            store.put(b, run_block(block, store.get(b), calls[b][i]).detach())


class _ReplayedLinear(nn.Module):
    """Stands in for a layer of a finished stage: returns its output recorded for the current
    batch (the layer applied once to the very input it receives again), so later stages and the
    block's final forward do not recompute it."""

    def __init__(self, replay: "_StageReplay", name: str) -> None:
        super().__init__()
        self.replay = replay
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.replay.outputs[self.name][self.replay.batch]
        if out.shape[:-1] != x.shape[:-1]:
            raise RuntimeError(f"replayed output of {self.name} does not match its input {tuple(x.shape)}")
        return out


class _StageReplay:
    """GPTQ's "true sequential" order without re-running finished stages.

    While stage ``k`` of a block is calibrated, the inputs of its layers are kept per batch
    (one tensor per distinct input: q, k and v share one); once the caller replaced the layers,
    each is applied once to those inputs and its outputs are recorded. Stage ``k + 1`` and the
    block's final forward then run with the finished layers replaced by :class:`_ReplayedLinear`:
    the outputs are the ones a re-run would compute (same inputs, same layer), but every linear
    layer of the block runs once per batch instead of once per later stage. Only used while the
    recorded tensors fit the in-memory activation budget (:meth:`if_it_fits`).
    """

    def __init__(self, block: nn.Module, prefix_of: dict[str, str]) -> None:
        self.block = block
        self.local = prefix_of  # model name -> name inside the block
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.batch = 0
        self.swapped: dict[str, nn.Module] = {}

    @classmethod
    def if_it_fits(cls, block: nn.Module, modules: dict[str, nn.Module], store: ActivationStore, batches: list[dict], ctx) -> "_StageReplay | None":
        if store.spilled:
            return None
        need = replay_bytes(batches, modules)
        budget = ctx.activation_budget if ctx.activation_budget is not None else _available_bytes() // 4
        if need > budget:
            return None
        names = {id(m): n for n, m in block.named_modules()}
        return cls(block, {full: names[id(m)] for full, m in modules.items()})

    @contextlib.contextmanager
    def capturing(self, modules: dict[str, nn.Module]):
        """Keep the input (batch, seq, in) of each of ``modules`` for the current batch."""
        handles = []
        for n, m in modules.items():
            self.inputs[n] = []

            def hook(_m, inputs, _o, n=n):
                if len(self.inputs[n]) == self.batch:
                    self.inputs[n].append(inputs[0].detach())

            handles.append(m.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def record(self, stage: list[str]) -> None:
        """Apply the (now replaced) layers of ``stage`` to their kept inputs; drop the inputs."""
        with torch.no_grad():
            for n in stage:
                module = self.block.get_submodule(self.local[n])
                if _runs_as_dense_product(module):
                    module = _DenseLinear.of(module)
                self.outputs[n] = [module(x) for x in self.inputs.pop(n)]
        self.inputs.clear()

    def swap_in(self) -> None:
        for n in self.outputs:
            local = self.local[n]
            self.swapped[local] = self.block.get_submodule(local)
            _set_child(self.block, local, _ReplayedLinear(self, n))

    def swap_out(self) -> None:
        for local, module in self.swapped.items():
            _set_child(self.block, local, module)
        self.swapped.clear()

    def clear(self) -> None:
        self.outputs.clear()
        self.inputs.clear()


def replay_bytes(batches: list[dict], modules: dict[str, nn.Module]) -> int:
    """Bytes :class:`_StageReplay` holds at most for one block: every layer's output (float32)
    and the widest stage input, for every calibration token (padded)."""
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    outs = sum(int(getattr(m, "out_features", 0)) for m in modules.values())
    widest = max((int(getattr(m, "in_features", 0)) for m in modules.values()), default=0)
    return tokens * (outs + widest) * 4


def _available_bytes() -> int:
    from slimformer.methods.memory import available_memory_bytes

    return available_memory_bytes()


class _DenseLinear(nn.Module):
    """Stands in for a compressed linear layer while its block is calibrated: the same
    numerics (the layer's dequantized float weight), dequantized once instead of per call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias

    @classmethod
    def of(cls, module: nn.Module) -> "_DenseLinear":
        """The dense product ``module`` stands for (see :func:`_runs_as_dense_product`)."""
        return cls(module.dequantized_weight(), getattr(module, "bias", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)


class _DenseWhileCalibrating:
    """Swaps the compressed linear layers of ``block`` (float activations) for
    :class:`_DenseLinear` stand-ins and back. A block's stages and its final forward run several
    times over every calibration batch; unpacking codes on each call cost more than the matrix
    product on narrow layers. Stand-ins are dropped with the block."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.dense: dict[str, tuple[nn.Module, _DenseLinear]] = {}  # name -> (layer, its stand-in)
        self.swapped: dict[str, nn.Module] = {}

    def swap_in(self) -> None:
        for name, module in list(self.block.named_modules()):
            if name and _runs_as_dense_product(module):
                if name not in self.dense or self.dense[name][0] is not module:
                    self.dense[name] = (module, _DenseLinear.of(module))
                self.swapped[name] = module
                _set_child(self.block, name, self.dense[name][1])

    def swap_out(self) -> None:
        for name, module in self.swapped.items():
            _set_child(self.block, name, module)
        self.swapped.clear()


def _runs_as_dense_product(module: nn.Module) -> bool:
    """A compressed linear layer with float activations: it stands for ``linear(x, W, bias)``
    with ``W = dequantized_weight()`` (its kernel computes that product, up to the kernel's
    rounding). Calibration runs such layers as that exact product: later layers are calibrated
    on the stored numerics, and no kernel's run-time form is built during the job."""
    return (getattr(module, "act_bits", None) is None and hasattr(module, "dequantized_weight")
            and hasattr(module, "in_features") and isinstance(getattr(module, "kernel", None), str)
            and not isinstance(module, (_DenseLinear, _ReplayedLinear)))


def _drop_tensors(module: nn.Module) -> None:
    """Forget the float weights of a layer the caller replaced (its own parameters and buffers,
    not those of submodules): the step's selection still names the old module, and with streamed
    weights every finished block's float weights would otherwise stay in memory to the end."""
    for name in list(module._parameters):
        module._parameters[name] = None
    for name in list(module._buffers):
        module._buffers[name] = None


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _unit(i: int) -> str:
    """The checkpoint unit of block ``i``."""
    return f"block-{i:05d}"
