"""KV-cache compression at run time: one cache object (``KVCache``) for every method, usable from
Hugging Face ``generate`` and from a plain decode loop. ``kv_cache(model, {"method": ..., ...})``
builds one from a recipe step; ``kv_methods()`` lists the methods."""

from slimformer.runtime.kv.base import KVCache, KVCacheLayer, KVConfig, ScoreInputs, kv_cache, kv_config_from_dict, kv_methods, register_kv
from slimformer.runtime.kv import kivi  # noqa: F401  (one import per method registers it)
from slimformer.runtime.kv import rotatekv  # noqa: F401
from slimformer.runtime.kv import streaming_llm  # noqa: F401
from slimformer.runtime.kv import knorm  # noqa: F401
from slimformer.runtime.kv import tova  # noqa: F401
from slimformer.runtime.kv import snapkv  # noqa: F401
from slimformer.runtime.kv import h2o  # noqa: F401
from slimformer.runtime.kv import information  # noqa: F401

__all__ = ["KVCache", "KVCacheLayer", "KVConfig", "ScoreInputs", "kv_cache", "kv_config_from_dict", "kv_methods", "register_kv"]
