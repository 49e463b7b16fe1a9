"""The run-time side: the generation loop over a static KV cache, speculative decoding, the
execution planner (per-machine choice of how each compressed layer computes), padding-free
batching, the machine description, and KV-cache compression (``runtime.kv``).

    from slimformer.runtime import TextGenerator, GenerationConfig
    gen = TextGenerator(slimformer.load("smollm2"))
    result = gen.generate("What is the capital of France?", GenerationConfig(max_new_tokens=32), chat=True)
    for piece in gen.stream("Tell me a story", chat=True): ...
"""

from slimformer.runtime.generation import (
    GenerationConfig,
    GenerationResult,
    GenerationStats,
    TextGenerator,
    decode_n,
    decode_one,
    forward_step,
    prefill,
)
from slimformer.runtime.sampling import SamplingConfig
from slimformer.runtime.static_cache import StaticKVCache, StaticKVLayer

__all__ = [
    "GenerationConfig",
    "GenerationResult",
    "GenerationStats",
    "SamplingConfig",
    "StaticKVCache",
    "StaticKVLayer",
    "TextGenerator",
    "decode_n",
    "decode_one",
    "forward_step",
    "prefill",
]
