"""A preallocated key/value cache written in place (gpt-fast style), serving both our decode loop
and Hugging Face ``generate`` through the transformers per-layer cache contract.

Each layer holds ``keys``/``values`` (batch, kv_heads, max_len, head_dim) allocated once, and a
length counter (a 0-d int64 tensor, so a compiled decode step reads and advances it without
recompiling). ``update`` writes the new entries at ``[length, length + q)`` with ``index_copy_``
and returns the whole buffers: positions past the length hold stale or zero entries, which the
attention mask hides (our loop passes its own 4-D mask; ``generate`` builds one from
``get_mask_sizes``). ``crop(-n)`` moves the length back by ``n`` (speculative decoding rejects
draft tokens this way) and ``move`` copies a run of entries to other slots (a token tree's
accepted branch, moved behind its root); tensor shapes and addresses never change.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class StaticKVLayer(CacheLayerMixin):
    """One layer's preallocated cache: ``keys``/``values`` (batch, kv_heads, max_len, head_dim).

    Allocated eagerly when the shapes are given, else lazily at the first ``update``.
    """

    is_compileable = True
    is_croppable = True
    is_sliding = False

    def __init__(self, max_cache_len: int, batch_size: int | None = None, num_heads: int | None = None,
                 head_dim: int | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.max_cache_len = max_cache_len
        self.device = torch.device(device)
        self.cumulative_length = torch.zeros((), dtype=torch.long, device=self.device)
        if batch_size is not None:
            shape = (batch_size, num_heads, max_cache_len, head_dim)
            self._allocate(shape, shape, dtype)

    def _allocate(self, k_shape: tuple, v_shape: tuple, dtype: torch.dtype) -> None:
        self.keys = torch.zeros(k_shape, dtype=dtype, device=self.device)
        self.values = torch.zeros(v_shape, dtype=dtype, device=self.device)
        self.batch_size, self.num_heads = k_shape[:2]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, dk = key_states.shape
        self._allocate((b, h, self.max_cache_len, dk), (b, h, self.max_cache_len, value_states.shape[-1]), key_states.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key_states``/``value_states`` (batch, kv_heads, q, head_dim) at the current
        length, advance it by q, and return the full buffers (batch, kv_heads, max_len, head_dim)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        index = torch.arange(q, device=self.device) + self.cumulative_length
        self.keys.index_copy_(2, index, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, index, value_states.to(self.values.dtype))
        self.cumulative_length.add_(q)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self) -> int:
        return int(self.cumulative_length) if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        self.cumulative_length.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` entries (a negative count, as transformers'
        static layers take), or keep only the first ``tokens_to_remove`` when it is >= 0."""
        length = int(self.cumulative_length)
        keep = length + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove, length)
        self.cumulative_length.fill_(max(keep, 0))

    def move(self, source: int, target: int, n: int) -> None:
        """Copy the entries of slots ``[source, source + n)`` to ``[target, target + n)`` (a
        token tree's accepted branch moved behind its root; the length is not changed)."""
        if n <= 0 or source == target or not self.is_initialized:
            return
        self.keys[:, :, target:target + n] = self.keys[:, :, source:source + n].clone()
        self.values[:, :, target:target + n] = self.values[:, :, source:source + n].clone()

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class StaticKVCache(Cache):
    """A static cache of ``num_layers`` ``StaticKVLayer``, each (batch, kv_heads, max_len, head_dim).

    ``StaticKVCache.for_model(model, batch_size, max_len)`` reads the shapes from the config.
    """

    def __init__(self, layers: list[CacheLayerMixin]) -> None:
        super().__init__(layers=layers)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> "StaticKVCache":
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        n_layers = config.num_hidden_layers
        n_heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        param = next(model.parameters(), None)
        dtype = dtype or (param.dtype if param is not None and param.is_floating_point() else torch.float32)
        device = param.device if param is not None else torch.device("cpu")
        return cls([StaticKVLayer(max_len, batch_size, kv_heads, head_dim, dtype, device) for _ in range(n_layers)])

    @property
    def length(self) -> torch.Tensor:
        """The shared length counter of the first layer (0-d int64)."""
        return self.layers[0].cumulative_length

    def crop(self, tokens_to_remove: int) -> None:
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    def move(self, source: int, target: int, n: int) -> None:
        for layer in self.layers:
            layer.move(source, target, n)

    def nbytes(self) -> int:
        """Bytes held by the key/value buffers."""
        return sum(layer.nbytes() for layer in self.layers)
