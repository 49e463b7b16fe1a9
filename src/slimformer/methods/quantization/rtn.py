"""Round-to-nearest (RTN) weight quantization.

Uniform integer grids, symmetric or asymmetric, per output channel or in groups of input
columns (as in FineQuant, Kim et al. 2023, "FineQuant: Unlocking Efficiency with Fine-Grained
Weight-Only Quantization for LLMs"). The token-embedding table is quantized row-wise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from slimformer.errors import ConfigError, is_int_at_least
from slimformer.methods.base import AUXILIARY, TARGET_KINDS, MethodConfig, ModuleSelection, register_method
from slimformer.methods.quantization import grid
from slimformer.methods.quantization.modules import QuantizedEmbedding, QuantizedLinear
from slimformer.methods.selection import check_group_size, select_modules
from slimformer.models.adapters import set_submodule


@dataclass
class WeightQuantConfig(MethodConfig, ModuleSelection):
    """Shared settings of uniform weight quantizers: ``bits`` (2, 3, 4 or 8), ``group_size``
    (columns per scale; ``None`` = one scale per output channel / embedding row),
    ``symmetric`` (zero point fixed at the middle of the grid) and ``activations``: ``"float"``
    (weight-only quantization: activations stay in the model's float dtype) or ``"int8"``
    (W8A8: linear inputs are quantized per token to int8 at run time and the layer runs on the
    int8 matrix units; needs ``bits: 8`` and ``group_size: null``)."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    activations: str = "float"
    selectable: ClassVar[tuple[str, ...]] = TARGET_KINDS

    def __post_init__(self) -> None:
        self._validate_selection(allowed=self.selectable)
        if isinstance(self.bits, bool) or self.bits not in grid.SUPPORTED_BITS:
            raise ConfigError(f"{self.name}: bits={self.bits!r} is not supported", f"use bits in {list(grid.SUPPORTED_BITS)}")
        if self.group_size is not None and not is_int_at_least(self.group_size, 1):
            raise ConfigError(f"{self.name}: group_size={self.group_size!r} must be a positive integer or null", "use e.g. group_size: 128, or null for per-channel")
        if self.activations not in ("float", "int8"):
            raise ConfigError(f"{self.name}: activations={self.activations!r} is not supported", "use activations: float (weight-only) or int8 (W8A8)")
        if self.activations == "int8" and (self.bits != 8 or self.group_size is not None):
            raise ConfigError(
                f"{self.name}: int8 activations need 8-bit per-channel weights (got bits={self.bits}, group_size={self.group_size})",
                "set bits: 8 and group_size: null, or activations: float",
            )

    @property
    def act_bits(self) -> int | None:
        """Activation bits of the quantized linears (None: float activations)."""
        return 8 if self.activations == "int8" else None


@dataclass
class RTNConfig(WeightQuantConfig):
    """Round-to-nearest quantization (FineQuant-style per-channel or group-wise grids)."""

    name = "rtn"
    family = "quantization"
    selectable = TARGET_KINDS + (AUXILIARY,)  # needs no activations: any weight outside the blocks too
    paper = "FineQuant: Unlocking Efficiency with Fine-Grained Weight-Only Quantization for LLMs (Kim et al., 2023)"
    summary = "round-to-nearest integer weights, 8/4/3/2 bits, per-channel or group-wise; embeddings row-wise"


def quantize_module_rtn(module: nn.Module, bits: int, group_size: int | None, symmetric: bool, act_bits: int | None = None) -> nn.Module:
    """The quantized replacement of an ``nn.Linear`` or ``nn.Embedding`` by round-to-nearest
    (``act_bits=8``: the linear runs W8A8, see modules.QuantizedLinear)."""
    w = module.weight.detach().float()
    scale, zero = grid.grid_params(w, bits, group_size, symmetric)
    codes = grid.quantize_codes(w, scale, zero, bits)
    if isinstance(module, nn.Embedding):
        new = QuantizedEmbedding.from_codes(codes, scale, zero, bits, group_size, symmetric, module.padding_idx)
    else:
        new = QuantizedLinear.from_codes(codes, scale, zero, bits, group_size, symmetric, module.bias, act_bits=act_bits)
    new.set_compute_dtype(module.weight.dtype)
    return new


def share_packed_storage(dst: nn.Module, src: nn.Module) -> None:
    """Make ``dst`` hold the very tensors of ``src`` (tied weights stay tied: stored once)."""
    for buffer in ("qweight", "scales", "zeros"):
        if src._buffers.get(buffer) is not None:
            dst._buffers[buffer] = src._buffers[buffer]


def replace_keeping_ties(loaded, modules: dict[str, nn.Module], quantize) -> dict:
    """Replace each of ``modules`` by ``quantize(module)``; modules sharing one weight (a tied
    embedding/head pair) end up sharing one packed storage, saved once. Returns the step record."""
    kernels: dict[str, str] = {}
    by_weight: dict[int, nn.Module] = {}
    tied: list[str] = []
    for name, module in modules.items():
        new = quantize(module)
        first = by_weight.setdefault(id(module.weight), new)
        if first is not new:  # a tied embedding/head pair quantized together: one stored table
            share_packed_storage(new, first)
            tied.append(name)
        set_submodule(loaded.model, name, new)
        kernels[name] = new.kernel
    return {"modules": sorted(modules), "kernels": kernels, "tied": tied}


@register_method(RTNConfig)
def apply_rtn(loaded, config: RTNConfig, ctx) -> dict:
    modules = select_modules(loaded, config, allow_tied=True)
    check_group_size(config.name, modules, config.group_size)
    return replace_keeping_ties(
        loaded, modules, lambda m: quantize_module_rtn(m, config.bits, config.group_size, config.symmetric, config.act_bits)
    )
