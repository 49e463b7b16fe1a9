"""One compressed KV cache for every method: the transformers per-layer cache contract, budgets,
storage (full precision or bit-packed), hooks and write-back.

A KV method is a ``@dataclass`` config (``KVConfig``) whose fields are its hyperparameters; a
scoring method writes one function, ``score(inputs) -> (batch, kv_heads, tokens)`` (higher is
kept), and ``KVCacheLayer`` does the rest (kvpress's shape, moved into the cache object):

- ``update(key_states, value_states)`` returns the keys/values this forward attends over (the
  stored, possibly dequantized, cache followed by the new states at full precision), then writes
  the new states back into compressed storage: eviction to the layer's budget when the cache
  exceeds it (by ``step`` tokens while decoding), then quantization of everything older than the
  full-precision ``window`` (KIVI's residual) in blocks of ``group`` tokens;
- the budget follows the tokens seen: a layer keeps ``ceil(keep_l * seen)`` entries, ``keep_l``
  uniform or a pyramid over depth (PyramidKV) with the same mean; selection is per KV head
  (each head keeps its own top scores, all heads of a layer the same count, so tensors stay dense
  and the bytes really go away);
- ``KVCache.attach(model)`` is a context manager that registers the hooks the scorers need (the
  query projection's output and the rotary embedding of each attention module, so scores are
  computed from the cached keys and the current queries here, without eager attention) and
  aligns each layer's attention mask to that layer's own cache length; hooks are removed in
  ``finally``;
- methods that score entries by what the model could not predict (``needs_information``: the
  self-information ``-log p(token | context)`` of each cached token) cannot evict inside a layer,
  because the token's probability is known only once the forward has reached the output. Their
  layers append during the forward; a hook on the base model's output computes the chunk's
  self-information (the output head applied to its final hidden states, in chunks of 256
  positions) and ``KVCache.end_forward`` then evicts every layer to its budget. A prefill chunk
  is therefore held in full until the end of its forward (prefill in chunks to bound it).

The same ``KVCache`` object serves Hugging Face ``generate`` (pass ``cache=``) and a plain decode
loop (pass explicit ``position_ids``: after eviction ``get_seq_length`` is the number of entries
kept, not the number of tokens seen, which ``seen_tokens`` holds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.runtime.kv.storage import PACKABLE_BITS, PackedTensor, concat_tokens, dequantize, hadamard, quantize

BUDGETS = ("uniform", "pyramid")
FP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "model": None}


@dataclass
class KVConfig:
    """Base of every KV-cache method.

    Fields shared by all methods:
    ``ratio``: fraction of cache entries evicted (0 keeps every token);
    ``window``: most recent tokens always kept, at full precision (KIVI's residual window);
    ``sinks``: first tokens always kept (StreamingLLM's attention sinks);
    ``budget``: ``"uniform"`` (every layer keeps the same fraction) or ``"pyramid"`` (lower layers
    keep more, linearly, same mean; PyramidKV);
    ``step``: while decoding, the cache may exceed its budget by up to ``step - 1`` entries before
    it is compressed again (1 compresses at every token);
    ``bits``: ``None`` (kept entries stored at ``fp_dtype``) or 2/4/8: entries older than the
    window stored bit-packed, keys per channel in blocks of ``group`` tokens, values per token
    in groups of ``group`` channels (KIVI);
    ``rotate``: Hadamard-rotate keys before quantizing (RotateKV);
    ``fp_dtype``: ``"float16"``, ``"bfloat16"`` or ``"model"`` (the model's own dtype: with
    ``ratio`` 0 and no bits the cache is then the identity).
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    version: ClassVar[int] = 1
    query_window: ClassVar[int] = 0  # how many recent queries score() needs (0: none)
    accumulates: ClassVar[bool] = False  # score() needs attention mass accumulated over all queries
    needs_information: ClassVar[bool] = False  # score() needs each token's self-information (evicts after the forward)

    ratio: float = 0.0
    window: int = 32
    sinks: int = 0
    budget: str = "uniform"
    step: int = 1
    bits: int | None = None
    group: int = 32
    rotate: bool = False
    fp_dtype: str = "float16"

    def __post_init__(self) -> None:
        name = self.name or type(self).__name__
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"{name}: ratio must be in [0, 1), got {self.ratio!r}", "give the fraction of entries to evict, e.g. ratio: 0.75")
        for key, minimum in (("window", 0), ("sinks", 0), ("step", 1), ("group", 1)):
            if not is_int_at_least(getattr(self, key), minimum):
                raise ConfigError(f"{name}: {key} must be an integer >= {minimum}, got {getattr(self, key)!r}", f"write e.g. {key}: {max(minimum, 1) * 32 if key in ('window', 'group') else max(minimum, 1)}")
        if self.budget not in BUDGETS:
            raise ConfigError(f"{name}: unknown budget {self.budget!r}", f"use one of {list(BUDGETS)}")
        if self.bits is not None and self.bits not in PACKABLE_BITS:
            raise ConfigError(f"{name}: bits must be one of {list(PACKABLE_BITS)} or null, got {self.bits!r}", "write e.g. bits: 4")
        if self.bits is not None and self.group % (8 // self.bits):
            raise ConfigError(f"{name}: group {self.group} cannot be packed at {self.bits} bits", "use a group that is a multiple of 4, e.g. 32")
        if self.fp_dtype not in FP_DTYPES:
            raise ConfigError(f"{name}: unknown fp_dtype {self.fp_dtype!r}", f"use one of {list(FP_DTYPES)}")
        if not isinstance(self.rotate, bool):
            raise ConfigError(f"{name}: rotate must be true or false, got {self.rotate!r}", "write rotate: true")
        if self.ratio > 0 and not self.evicts:
            raise ConfigError(f"{name} does not evict, but ratio={self.ratio}", "use an eviction method (snapkv, h2o, tova, knorm, streaming-llm) for ratio > 0")

    @property
    def evicts(self) -> bool:
        return type(self).score is not KVConfig.score

    def score(self, inputs: "ScoreInputs") -> torch.Tensor:
        """Importance of each cached entry ``(batch, kv_heads, tokens)``; higher is kept."""
        raise NotImplementedError

    def keep_fraction(self, layer: int, num_layers: int) -> float:
        """Fraction of the tokens seen that layer ``layer`` keeps."""
        keep = 1.0 - self.ratio
        if self.budget == "pyramid" and num_layers > 1 and self.ratio > 0:
            keep *= 1.0 + 0.5 * (1.0 - 2.0 * layer / (num_layers - 1))
        return min(1.0, keep)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.name, "version": self.version}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        return out


@dataclass
class ScoreInputs:
    """What a scorer sees, for one layer.

    ``keys``/``values``: ``(batch, kv_heads, tokens, head_dim)`` every entry held now (the stored
    cache, dequantized, followed by the new states), in the model's dtype;
    ``attention``: ``(batch, kv_heads, q, tokens)`` softmax attention of the last ``q`` queries
    (summed over the query heads of each KV head), or ``None`` when the method needs no queries;
    ``accumulated``: ``(batch, kv_heads, tokens)`` attention mass each entry received from every
    query so far (only for methods that accumulate), else ``None``;
    ``seen``: tokens seen by this layer so far;
    ``information``: ``(batch, kv_heads, tokens)`` self-information ``-log p(token | context)`` of
    each entry's token in nats (only for methods that need it), else ``None``;
    ``keep``: how many entries the eviction keeps.
    """

    keys: torch.Tensor
    values: torch.Tensor
    attention: torch.Tensor | None
    accumulated: torch.Tensor | None
    seen: int
    information: torch.Tensor | None = None
    keep: int = 0


_KV_REGISTRY: dict[str, type[KVConfig]] = {}


def register_kv(config_type: type[KVConfig]) -> type[KVConfig]:
    """Class decorator: add a KV method to the one registry (by ``config_type.name``)."""
    if not config_type.name or config_type.name in _KV_REGISTRY:
        raise TypeError(f"KV method {config_type.__name__} has no name or is registered twice")
    _KV_REGISTRY[config_type.name] = config_type
    return config_type


def kv_methods() -> dict[str, type[KVConfig]]:
    import slimformer.runtime.kv  # noqa: F401  (importing the package registers every method)

    return dict(_KV_REGISTRY)


def kv_config_from_dict(spec: dict[str, Any] | KVConfig) -> KVConfig:
    """A KV config from a recipe step ``{method: snapkv, ratio: 0.75, ...}`` (only known names)."""
    if isinstance(spec, KVConfig):
        return spec
    if not isinstance(spec, dict):
        raise ConfigError(f"a KV-cache step must be a mapping, got {spec!r}", "write e.g. {method: snapkv, ratio: 0.75}")
    methods = kv_methods()
    data = dict(spec)
    name = data.pop("method", None)
    if name not in methods:
        raise ConfigError(f"unknown KV-cache method {name!r}", f"use one of {sorted(methods)}")
    cls = methods[name]
    version = data.pop("version", cls.version)
    if version != cls.version:
        raise ConfigError(f"{name}: version {version} is not {cls.version}", "update the recipe to the current version")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{name}: unknown setting {unknown[0]!r}", f"valid settings are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if hints[key] is float and isinstance(value, int) and not isinstance(value, bool):
            data[key] = float(value)
    return cls(**data)


def attention_mass(queries: torch.Tensor, keys: torch.Tensor, scaling: float, chunk: int = 256) -> torch.Tensor:
    """Softmax attention of ``queries`` ``(b, hq, q, d)`` (the last q positions) over ``keys``
    ``(b, h, t, d)``, causal, summed over the query heads of each KV head: ``(b, h, q, t)``."""
    b, hq, q, d = queries.shape
    h, t = keys.shape[1], keys.shape[2]
    groups = hq // h
    k = keys.float()
    out = []
    for start in range(0, q, chunk):
        qc = queries[:, :, start : start + chunk].float().reshape(b, h, groups, -1, d)
        logits = torch.einsum("bhgqd,bhtd->bhgqt", qc, k) * scaling
        pos = torch.arange(start, start + qc.shape[3], device=keys.device) + (t - q)
        mask = torch.arange(t, device=keys.device)[None, :] > pos[:, None]
        logits.masked_fill_(mask, float("-inf"))
        out.append(logits.softmax(-1).sum(2))
    return torch.cat(out, dim=2)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class KVCacheLayer(CacheLayerMixin):
    """One layer's compressed cache (see the module docstring). Storage, oldest first:
    ``quantized`` (a list of ``(keys, values)`` ``PackedTensor`` blocks, when ``bits``), then the
    full-precision ``keys``/``values`` ``(batch, kv_heads, n, head_dim)`` in ``fp_dtype``."""

    is_sliding = False
    is_croppable = True

    def __init__(self, config: KVConfig, layer_idx: int, num_layers: int, scaling: float | None = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.keep = config.keep_fraction(layer_idx, num_layers)
        self.scaling = scaling
        self._reset_state()

    def _reset_state(self) -> None:
        self.keys = self.values = None
        self.quantized: list[tuple[PackedTensor, PackedTensor]] = []
        self.accumulated: torch.Tensor | None = None
        self.information: torch.Tensor | None = None  # (b, h, n) float16, aligned with the entries held
        self.recent_queries: torch.Tensor | None = None
        self.pending_queries: torch.Tensor | None = None  # set by the hooks, consumed by update
        self.precomputed_mass: torch.Tensor | None = None  # (b, h, t) accumulated mass of these queries, if known
        self.seen = 0
        self.is_initialized = False

    # -- the transformers contract -------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.store_dtype = FP_DTYPES[self.config.fp_dtype] or key_states.dtype
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty((b, h, 0, d), dtype=self.store_dtype)
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]), dtype=self.store_dtype)
        if self.scaling is None:
            self.scaling = d**-0.5
        self.is_initialized = True

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.shape[-2] + sum(k.tokens for k, _ in self.quantized)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self._reset_state()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the ``-tokens_to_remove`` most recent entries (they must still be at full precision)."""
        n = -tokens_to_remove
        if n <= 0 or not self.is_initialized:
            return
        if n > self.keys.shape[-2]:
            raise ValueError(f"cannot crop {n} entries: only {self.keys.shape[-2]} are still at full precision")
        self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]
        if self.accumulated is not None:
            self.accumulated = self.accumulated[..., :-n]
        if self.information is not None:
            self.information = self.information[..., :-n]
        self.seen -= n

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.quantized:
            raise NotImplementedError("beam search over a quantized KV cache is not supported")
        self.keys = self.keys.repeat_interleave(repeats, dim=0)
        self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.quantized:
            raise NotImplementedError("beam search over a quantized KV cache is not supported")
        self.keys, self.values = self.keys[indices], self.values[indices]

    # -- storage ---------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of key/value storage held (codes, scales, zeros and full-precision entries)."""
        if not self.is_initialized:
            return 0
        total = self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        return total + sum(k.nbytes + v.nbytes for k, v in self.quantized)

    @property
    def aux_nbytes(self) -> int:
        """Bytes of scoring state (accumulated attention, recent queries, self-information), kept
        apart from KV bytes."""
        return sum(t.numel() * t.element_size() for t in (self.accumulated, self.recent_queries, self.information) if t is not None)

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored entries ``(b, h, n, d)`` in the model's dtype, oldest first."""
        ks, vs = [], []
        for pk, pv in self.quantized:
            k = dequantize(pk, self.dtype)
            if self.config.rotate:
                k = k @ hadamard(k.shape[-1]).to(k.dtype).T
            ks.append(k)
            vs.append(dequantize(pv, self.dtype))
        ks.append(self.keys.to(self.dtype))
        vs.append(self.values.to(self.dtype))
        if len(ks) == 1:
            return ks[0], vs[0]
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)

    def _quantize_block(self, k: torch.Tensor, v: torch.Tensor) -> tuple[PackedTensor, PackedTensor]:
        cfg = self.config
        if cfg.rotate:
            k = k.float() @ hadamard(k.shape[-1])
            pk = quantize(k, cfg.bits, min(cfg.group, k.shape[-1]), "channel")
        else:
            pk = quantize(k, cfg.bits, cfg.group, "token")
        pv = quantize(v, cfg.bits, min(cfg.group, v.shape[-1]), "channel")
        return pk, pv

    def _flush(self) -> None:
        """Quantize full-precision entries older than the window, in blocks of ``group`` tokens."""
        cfg = self.config
        if cfg.bits is None:
            return
        n = self.keys.shape[-2] - cfg.window
        n -= n % cfg.group
        if n <= 0:
            return
        pk, pv = self._quantize_block(self.keys[..., :n, :], self.values[..., :n, :])
        if self.quantized:  # one growing block: one dequantization pass per step
            (qk, qv), = self.quantized
            pk, pv = concat_tokens(qk, pk), concat_tokens(qv, pv)
        self.quantized = [(pk, pv)]
        self.keys, self.values = self.keys[..., n:, :], self.values[..., n:, :]

    # -- the write path --------------------------------------------------------------------------
    def budget(self) -> int:
        """Entries this layer may keep after compression, given the tokens seen."""
        cfg = self.config
        return max(min(self.seen, cfg.window + cfg.sinks), math.ceil(self.keep * self.seen - 1e-9))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values ``(b, h, stored + q, d)`` to attend over; then the new states ``(b, h, q, d)``
        are written back compressed."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cfg = self.config
        q_len = key_states.shape[-2]
        had = self.get_seq_length()
        if cfg.needs_information and had != (0 if self.information is None else self.information.shape[-1]):
            raise ConfigError(
                f"{cfg.name} scores entries by self-information but the cache saw no model output",
                "use the cache inside `with cache.attach(model):` (or slimformer.runtime.kv.kv_cache)",
            )
        if had:
            old_k, old_v = self._dequantized()
            all_k = torch.cat([old_k, key_states], dim=-2)
            all_v = torch.cat([old_v, value_states], dim=-2)
        else:
            all_k, all_v = key_states, value_states
        self.seen += q_len
        queries = self.pending_queries
        self.pending_queries = None
        attention = None
        if cfg.query_window or cfg.accumulates:
            if queries is None:
                raise ConfigError(
                    f"{cfg.name} scores entries by attention but the cache saw no queries",
                    "use the cache inside `with cache.attach(model):` (or slimformer.runtime.kv.kv_cache)",
                )
            if cfg.accumulates:
                acc = self.precomputed_mass if self.precomputed_mass is not None else attention_mass(queries, all_k, self.scaling).sum(2)
                self.precomputed_mass = None
                if self.accumulated is not None:
                    acc[..., :had] += self.accumulated
                self.accumulated = acc
            keep_q = max(cfg.query_window, 1)
            recent = queries if self.recent_queries is None or q_len >= keep_q else torch.cat([self.recent_queries, queries], dim=2)
            self.recent_queries = recent[:, :, -keep_q:].detach()
        # write back: append at full precision, evict to the budget, quantize the old part
        new_k = key_states.to(self.store_dtype)
        new_v = value_states.to(self.store_dtype)
        stored = had + q_len
        slack = cfg.step - 1 if had else 0
        if cfg.evicts and not cfg.needs_information and stored > self.budget() + slack:
            if cfg.query_window:
                attention = attention_mass(self.recent_queries, all_k, self.scaling)
            self._evict(all_k, all_v, attention)
        else:
            self.keys = torch.cat([self.keys, new_k], dim=-2)
            self.values = torch.cat([self.values, new_v], dim=-2)
        if not cfg.needs_information:  # those evict (and then quantize) in end_forward
            self._flush()
        return all_k, all_v

    def end_forward(self, information: torch.Tensor) -> None:
        """For ``needs_information`` methods, after the forward: record the self-information
        ``(batch, q)`` of the ``q`` tokens this forward appended, evict to the budget, quantize."""
        cfg = self.config
        b, q = information.shape
        h = self.keys.shape[1]
        info = information.to(torch.float16).unsqueeze(1).expand(b, h, q)
        self.information = info.contiguous() if self.information is None else torch.cat([self.information, info], dim=-1)
        stored = self.get_seq_length()
        if stored != self.information.shape[-1]:
            raise ValueError(f"layer {self.layer_idx}: {stored} entries but self-information for {self.information.shape[-1]}")
        slack = cfg.step - 1 if self.seen > q else 0
        if stored > self.budget() + slack:
            all_k, all_v = self._dequantized()
            attention = attention_mass(self.recent_queries, all_k, self.scaling) if cfg.query_window else None
            self._evict(all_k, all_v, attention)
        self._flush()

    def _evict(self, all_k: torch.Tensor, all_v: torch.Tensor, attention: torch.Tensor | None) -> None:
        """Keep the top-scored ``budget()`` entries of each KV head (sinks and window forced), in
        their original order. Entries already quantized (the first ``nq`` of ``all_k``/``all_v``
        ``(b, h, t, d)``) are kept as they are: re-quantizing dequantized values would compound
        their error at every step, so eviction chooses among the full-precision entries, and the
        quantized part shrinks only when a prefill compresses before anything is quantized."""
        cfg = self.config
        t = all_k.shape[-2]
        nq = self.quantized[0][0].tokens if self.quantized else 0
        keep = self.budget()
        scores = cfg.score(ScoreInputs(all_k, all_v, attention, self.accumulated, self.seen, self.information, keep)).float()
        scores = scores.clone()
        scores[..., :nq] = float("inf")
        if cfg.sinks:
            scores[..., : cfg.sinks] = float("inf")
        if cfg.window:
            scores[..., max(0, t - cfg.window) :] = float("inf")
        keep = min(t, max(keep, int(torch.isinf(scores[0, 0]).sum())))
        idx = scores.topk(keep, dim=-1).indices.sort(dim=-1).values  # (b, h, keep); the first nq are 0..nq-1
        fp_idx = idx[..., nq:]
        kept_k = all_k.gather(2, fp_idx.unsqueeze(-1).expand(-1, -1, -1, all_k.shape[-1])).to(self.store_dtype)
        kept_v = all_v.gather(2, fp_idx.unsqueeze(-1).expand(-1, -1, -1, all_v.shape[-1])).to(self.store_dtype)
        if self.accumulated is not None:
            self.accumulated = self.accumulated.gather(2, idx)
        if self.information is not None:
            self.information = self.information.gather(2, idx)
        self.keys, self.values = kept_k, kept_v
        self.kept_indices = idx  # (b, h, keep): positions in this update's ``all_k`` (for tests)


class KVCache(Cache):
    """A ``transformers`` ``Cache`` of ``KVCacheLayer`` s built from one ``KVConfig``."""

    def __init__(self, config: KVConfig, num_layers: int, scaling: float | None = None):
        self.config = config
        super().__init__(layers=[KVCacheLayer(config, i, num_layers, scaling) for i in range(num_layers)])

    @property
    def nbytes(self) -> int:
        """Bytes of key/value storage held by all layers (measured from the tensors kept)."""
        return sum(layer.nbytes for layer in self.layers)


    @property
    def seen_tokens(self) -> int:
        return self.layers[0].seen

    @property
    def aux_nbytes(self) -> int:
        logp = getattr(self, "last_logp", None)
        return sum(layer.aux_nbytes for layer in self.layers) + (0 if logp is None else logp.numel() * logp.element_size())

    def end_forward(self, information: torch.Tensor, last_logp: torch.Tensor | None = None) -> None:
        """After a forward (``needs_information`` methods): ``information`` ``(batch, q)`` is the
        self-information of the forward's ``q`` tokens; ``last_logp`` ``(batch, vocab)`` the
        log-probabilities from its last position, which score the next forward's first token."""
        for layer in self.layers:
            layer.end_forward(information)
        if last_logp is not None:
            self.last_logp = last_logp

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    @contextlib.contextmanager
    def attach(self, model):
        """Register the hooks this cache needs on ``model`` (a ``LoadedModel`` or a transformers
        causal LM): query capture for attention-scored methods, and per-layer mask alignment."""
        from slimformer.models.adapters import ArchitectureAdapter

        hf = getattr(model, "model", model) if not isinstance(model, torch.nn.Module) else model
        adapter = ArchitectureAdapter(hf)
        needs_queries = bool(self.config.query_window or self.config.accumulates)
        handles = []
        if self.config.needs_information:
            handles += self._information_hooks(adapter)
        try:
            for i, layer in enumerate(self.layers):
                attn = adapter.attention(i)
                if getattr(attn, "scaling", None) is not None:
                    layer.scaling = attn.scaling
                handles.append(attn.register_forward_pre_hook(_pre_hook(layer, needs_queries), with_kwargs=True))
                if needs_queries:
                    q_proj, _ = adapter.query_key(attn)
                    handles.append(q_proj.register_forward_hook(_query_hook(layer)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _information_hooks(self, adapter) -> list:
        """Hooks on the base model (its input ids in, its final hidden states out -> the tokens'
        self-information, then ``end_forward``) and on the output head (the last position's
        log-probabilities, kept to score the next forward's first token: a decode step computes
        no extra head output)."""
        head = adapter.head()
        if head is None:
            raise ConfigError(f"{self.config.name} needs the model's output head to score tokens", "use a causal language model")
        head_module, base = head[1], adapter.base()
        seen: dict[str, torch.Tensor] = {}

        def pre(module, args, kwargs):
            if kwargs.get("cache", kwargs.get("past_key_values")) is not self:
                return  # a forward over another cache (hooks see every forward while attached)
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                raise ConfigError(f"{self.config.name} needs token ids, the model was given embeddings", "call the model with input_ids")
            seen["ids"] = ids

        def post(module, args, kwargs, output):
            if seen.get("ids") is None:
                return
            hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
            with torch.no_grad():
                info = token_information(head_module, hidden, seen["ids"], getattr(self, "last_logp", None))
            self.end_forward(info)

        def head_out(module, args, output):
            if seen.pop("ids", None) is not None:
                self.last_logp = output[:, -1].detach().float().log_softmax(-1)

        return [base.register_forward_pre_hook(pre, with_kwargs=True), base.register_forward_hook(post, with_kwargs=True),
                head_module.register_forward_hook(head_out)]


FIRST_TOKEN_INFORMATION = 1e4  # nats: a sequence's first token has no context, so nothing predicts it


def token_information(head: torch.nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
                      previous_logp: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
    """Self-information ``-log p(x_i | x_<i)`` in nats of each token ``(batch, q)``.

    ``hidden`` ``(batch, q, hidden)``: final hidden states of ``input_ids`` ``(batch, q)``;
    position ``i - 1`` predicts token ``i`` (the head runs on positions ``0 .. q-2``, ``chunk``
    at a time, so the vocabulary-sized logits are never all held); ``previous_logp``
    ``(batch, vocab)``: log-probabilities from the position before this chunk (they score token
    0), else token 0 gets ``FIRST_TOKEN_INFORMATION``.
    """
    b, q, _ = hidden.shape
    out = []
    if previous_logp is not None:
        out.append(-previous_logp.float().gather(-1, input_ids[:, :1]))
    else:
        out.append(torch.full((b, 1), FIRST_TOKEN_INFORMATION))
    for start in range(0, q - 1, chunk):
        stop = min(start + chunk, q - 1)
        logp = head(hidden[:, start:stop]).float().log_softmax(-1)
        out.append(-logp.gather(-1, input_ids[:, start + 1 : stop + 1].unsqueeze(-1)).squeeze(-1))
    return torch.cat(out, dim=1)


def _pre_hook(layer: KVCacheLayer, needs_queries: bool):
    def hook(module, args, kwargs):
        if needs_queries:
            layer._rope = kwargs.get("position_embeddings")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            need = layer.get_seq_length() + hidden.shape[1]
            have = mask.shape[-1]
            if have > need:
                kwargs["attention_mask"] = mask[..., -need:]
            elif have < need:
                fill = True if mask.dtype == torch.bool else 0.0
                kwargs["attention_mask"] = torch.nn.functional.pad(mask, (need - have, 0), value=fill)
        return args, kwargs

    return hook


def _query_hook(layer: KVCacheLayer):
    def hook(module, args, output):
        b, t, _ = output.shape
        cos, sin = layer._rope
        d = cos.shape[-1]
        q = output.view(b, t, -1, d).transpose(1, 2)
        layer.pending_queries = _rope(q, cos, sin).detach()

    return hook


def kv_cache(model, spec: dict[str, Any] | KVConfig) -> KVCache:
    """A ``KVCache`` for ``model`` (a ``LoadedModel`` or a transformers causal LM) from a recipe step
    such as ``{"method": "snapkv", "ratio": 0.75}``. Use it inside ``with cache.attach(model):``."""
    config = kv_config_from_dict(spec)
    hf = model if isinstance(model, torch.nn.Module) else model.model
    return KVCache(config, hf.config.num_hidden_layers)
