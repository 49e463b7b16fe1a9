"""Casting a model to bfloat16 (or float16): half the bytes, and bfloat16 matmuls run on the
CPU's AMX / AVX-512 BF16 units (about 4x the fp32 throughput on this machine's CPU).

Kalamkar et al., 2019, "A Study of BFLOAT16 for Deep Learning Training".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimformer.errors import ConfigError
from slimformer.methods.base import MethodConfig, register_method

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CastConfig(MethodConfig):
    """Cast every float weight (and so every activation) to ``dtype``; packed low-bit weights
    stay packed and compute in that dtype."""

    name = "cast"
    family = "quantization"
    paper = "A Study of BFLOAT16 for Deep Learning Training (Kalamkar et al., 2019)"
    summary = "cast weights and activations to bfloat16 (AMX/AVX-512 BF16 matmuls on CPU) or float16"

    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"cast: dtype={self.dtype!r} is not supported", f"use one of {list(DTYPES)}")


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s float parameters and persistent float buffers to ``dtype`` in place.

    Packed low-bit modules keep their stored form (codes, bfloat16 scales) and switch their
    compute dtype; non-persistent buffers (e.g. rotary frequencies) keep theirs, as they do in a
    model built directly in ``dtype``, so a saved and reloaded model computes bit for bit alike.
    """
    from slimformer.methods.quantization.modules import QuantizedModule

    cast: dict[int, torch.nn.Parameter] = {}  # tied parameters stay tied
    for module in model.modules():
        if isinstance(module, QuantizedModule):
            module.set_compute_dtype(dtype)
            continue
        for name, param in module._parameters.items():
            if param is not None and param.is_floating_point():
                if id(param) not in cast:
                    cast[id(param)] = torch.nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
                module._parameters[name] = cast[id(param)]
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = buf.to(dtype)
    model.config.dtype = dtype


@register_method(CastConfig)
def apply_cast(loaded, config: CastConfig, ctx) -> dict:
    cast_model(loaded.model, DTYPES[config.dtype])
    return {"dtype": config.dtype}
