"""Calibration: tokenized calibration batches, and statistics of the inputs of linear layers
collected block by block (so that each block sees the outputs of the already-compressed blocks
before it, as GPTQ, SparseGPT and Wanda do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from slimformer.data import TextSpec, load_texts
from slimformer.data.text import check_source
from slimformer.errors import ConfigError, is_int_at_least


@dataclass(frozen=True)
class CalibrationSettings:
    """Calibration text: ``source`` (a built-in source, by default ``mix``: docstrings, reference
    prose, code and notices, short and long; or your own .txt/.jsonl, preferred when given), ``n_samples``
    documents of the calibration split, truncated to ``max_length`` tokens, run in batches of
    ``batch_size``, sampled with ``seed``."""

    source: str = "mix"
    n_samples: int = 128
    max_length: int = 128
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        check_source(self.source, "calibration.source")
        for name in ("n_samples", "max_length", "batch_size"):
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
        self._batches: list[dict[str, torch.Tensor]] | None = None

    def batches(self, tokenizer) -> list[dict[str, torch.Tensor]]:
        """Tokenized calibration batches: dicts of ``input_ids``/``attention_mask`` (batch, seq)."""
        if self._batches is None:
            s = self.calibration
            texts = load_texts(TextSpec(source=s.source, split="calibration", n=s.n_samples, seed=s.seed))
            max_length = min(s.max_length, self.max_positions or s.max_length)
            self._batches = [
                dict(tokenizer(texts[i : i + s.batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
                for i in range(0, len(texts), s.batch_size)
            ]
            for b in self._batches:
                b.pop("token_type_ids", None)
        return self._batches


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
    ``sq_norm[name]``: ``sum x_j^2``, ``abs_sum[name]``: ``sum |x_j|`` and ``absmax[name]``:
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
        self.count: dict[str, int] = {name: 0 for name in modules}
        self.mask: torch.Tensor | None = None
        self._handles: list = []

    def set_batch(self, batch: dict) -> None:
        self.mask = batch.get("attention_mask")

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, _output) -> None:
            x = inputs[0].detach()
            if self.mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
                x = x[self.mask.bool()]
            x = x.reshape(-1, x.shape[-1]).float()
            self.count[name] += x.shape[0]
            if self.want_hessian:
                h = x.t() @ x
                self.hessian[name] = self.hessian[name] + h if name in self.hessian else h
            sq = (x * x).sum(0)
            self.sq_norm[name] = self.sq_norm[name] + sq if name in self.sq_norm else sq
            ab = x.abs().sum(0)
            self.abs_sum[name] = self.abs_sum[name] + ab if name in self.abs_sum else ab
            am = x.abs().amax(0)
            self.absmax[name] = torch.maximum(self.absmax[name], am) if name in self.absmax else am
            if self.keep_samples:
                kept = self.samples.get(name, x[:0])
                if kept.shape[0] < self.keep_samples:
                    self.samples[name] = torch.cat([kept, x[: self.keep_samples - kept.shape[0]]])

        return hook

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


def blockwise(loaded, ctx: CompressionContext, selected: dict[str, nn.Module], hessian: bool, desc: str, sequential: bool = False, keep_samples: int = 0) -> Iterator[tuple[str, nn.Module, InputStatistics]]:
    """Yield ``(name, module, stats)`` for each selected linear layer, block by block.

    The statistics of block ``i`` are collected after the caller has processed (replaced) the
    layers of blocks ``< i``, so they reflect the compressed model so far. With ``sequential``
    (GPTQ's "true sequential" order) this holds inside each block too: its layers are taken
    stage by stage (q/k/v, then the attention output, then the MLP input and output
    projections), each stage calibrated on the outputs of the already-processed stages. Layers
    outside the blocks (e.g. the output head) come last, from a full forward pass.
    """
    adapter = loaded.adapter
    batches = ctx.batches(loaded.tokenizer)
    remaining = dict(selected)
    groups: list[tuple[nn.Module | None, list[str]]] = []
    for i in range(adapter.num_layers()):
        prefix = adapter.block_prefix(i) + "."
        names = [n for n in remaining if n.startswith(prefix)]
        for n in names:
            remaining.pop(n)
        if names:
            block = adapter.blocks()[i]
            stages = stages_of_block(loaded.model, block, names, batches[0]) if sequential else [names]
            groups.extend((block, stage) for stage in stages)
    if remaining:
        groups.append((None, list(remaining)))
    bar = tqdm(total=len(selected), desc=desc, disable=not ctx.progress, unit="layer")
    try:
        for stop_after, names in groups:
            stats = InputStatistics({n: loaded.model.get_submodule(n) for n in names}, hessian=hessian, keep_samples=keep_samples)
            with stats:
                run_batches(loaded.model, batches, stop_after=stop_after, on_batch=stats.set_batch)
            for n in names:
                if stats.count[n] == 0:
                    raise ConfigError(f"calibration never reached {n}", "check that the calibration text is not empty")
                yield n, loaded.model.get_submodule(n), stats
                bar.update(1)
    finally:
        bar.close()
