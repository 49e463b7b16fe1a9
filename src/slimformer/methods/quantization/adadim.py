"""AdaDim: per-layer choice of the channel dimension that quantization groups run along.

Heo et al., 2024, "Rethinking Channel Dimensions to Isolate Outliers for Low-bit Weight
Quantization of Large Language Models". Weight outliers in LLMs line up along *input* channels
(columns of ``W`` (out, in), driven by activation outliers). The usual per-output-channel (per-OC)
layout groups the columns of a row, so one outlier column inflates the scale of every group it
falls in; the per-input-channel (per-IC) layout groups the rows of a column instead (one scale per
(input channel, group of output channels)), which isolates such a column in groups of its own.
AdaDim quantizes each layer both ways (round-to-nearest) and keeps the layout with the lower
output reconstruction error on calibration inputs, ``tr(dW H dW^T)`` with ``H = X^T X``.

Storage: per-OC layers are ordinary ``QuantizedLinear`` modules (int4/int8 kernels where the
layout allows). Per-IC layers are ``InputChannelQuantizedLinear``: the packed grid of ``W^T``
(qweight (in, ceil(out*bits/8)) uint8, scales/zeros (in, out/groups)), the orientation recorded in
the manifest. The CPU low-bit kernels take scales per (output row, input group) only, so per-IC
layers run on the ``unpack`` path (the weight is unpacked for each forward; reported as such).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimformer.errors import ConfigError
from slimformer.methods.base import register_method
from slimformer.methods.calibration import blockwise
from slimformer.methods.quantization import grid
from slimformer.methods.quantization.modules import QuantizedLinear, QuantizedModule, register_quantized_module, tensor_bits
from slimformer.methods.quantization.rtn import WeightQuantConfig
from slimformer.methods.selection import check_group_size, select_modules
from slimformer.models.adapters import set_submodule

ORIENTATIONS = ("output-channel", "input-channel")


@dataclass
class AdaDimConfig(WeightQuantConfig):
    """AdaDim settings: the grid (``bits``, ``group_size`` (channels per scale, along the chosen
    dimension), ``symmetric``). Activations stay float (the per-IC layout has no int8 kernel)."""

    name = "adadim"
    family = "quantization"
    paper = "Rethinking Channel Dimensions to Isolate Outliers for Low-bit Weight Quantization of Large Language Models (Heo et al., 2024)"
    summary = "per layer, groups along input or output channels, whichever reconstructs the layer's calibration outputs better"
    requires_calibration = True
    resumable = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if "embedding" in self.targets:
            raise ConfigError("adadim: the embedding table has no input activations to score layouts with", "quantize the embedding with a separate rtn or hqq step")
        if self.activations != "float":
            raise ConfigError("adadim: int8 activations are not supported (per-input-channel layers have no int8 kernel)", "use activations: float")


@register_quantized_module
class InputChannelQuantizedLinear(QuantizedModule):
    """A linear layer ``y = x W^T + b`` whose ``W`` (out, in) is quantized per input channel:
    groups of ``group_size`` output channels share a scale, per input channel.

    Stored: ``qweight`` (in, ceil(out*bits/8)) uint8, the packed codes of ``W^T``; ``scales``
    (in, out/group_size) bfloat16; ``zeros`` (in, out/group_size) uint8 (asymmetric only);
    ``bias`` (out,) float32. Input ``x`` (..., in_features); output (..., out_features).
    """

    kernel = "unpack"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None, symmetric: bool, bias: bool) -> None:
        super().__init__()
        if group_size is not None and out_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide the output width {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        groups = grid.num_groups(out_features, group_size)
        self.register_buffer("qweight", torch.zeros(in_features, grid.packed_row_bytes(out_features, bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(in_features, groups, dtype=torch.bfloat16))
        if symmetric:
            self.zeros = None
        else:
            self.register_buffer("zeros", torch.zeros(in_features, groups, dtype=torch.uint8))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None

    @classmethod
    def from_codes(cls, codes_t: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, bias: torch.Tensor | None) -> "InputChannelQuantizedLinear":
        """Build from codes of ``W^T`` (in, out) uint8, ``scale``/``zero`` (in, out/group_size), ``bias`` (out,)."""
        in_features, out_features = codes_t.shape
        module = cls(in_features, out_features, bits, group_size, symmetric, bias is not None)
        module.qweight.copy_(grid.pack_codes(codes_t, bits))
        module.scales.copy_(scale.to(torch.bfloat16))
        if not symmetric:
            module.zeros.copy_(zero.to(torch.uint8))
        if bias is not None:
            module.bias.copy_(bias.detach().float())
        return module

    @classmethod
    def from_description(cls, desc: dict) -> "InputChannelQuantizedLinear":
        return cls(desc["in_features"], desc["out_features"], desc["bits"], desc["group_size"], desc["symmetric"], desc["bias"])

    def describe(self) -> dict:
        return {
            "type": "InputChannelQuantizedLinear",
            "orientation": "input-channel",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "bias": self.bias is not None,
            "kernel": self.kernel,
        }

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def stored_bits(self) -> int:
        return tensor_bits(self.qweight, self.scales, self.zeros)

    def storage_key(self) -> torch.Tensor:
        return self.qweight

    def _transposed_weight(self) -> torch.Tensor:
        """The float32 ``W^T`` (in, out) from the stored grid."""
        codes = grid.unpack_codes(self.qweight, self.bits, self.out_features)
        zero = torch.full(self.scales.shape, float(2 ** (self.bits - 1))) if self.zeros is None else self.zeros.float()
        return grid.dequantize_codes(codes, self.scales.float(), zero)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight (out, in)."""
        return self._transposed_weight().t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self._transposed_weight().t().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size} (along outputs), symmetric={self.symmetric}, kernel={self.kernel}"
        )


def _rtn(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale, zero = grid.grid_params(w, bits, group_size, symmetric)
    return grid.quantize_codes(w, scale, zero, bits), scale, zero


def adadim_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> tuple[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, float]]:
    """Quantize ``weight`` (out, in) both ways; keep the lower ``tr(dW H dW^T)``, ``hessian`` (in, in).

    Returns ``(orientation, (codes, scale, zero), errors)``: for ``output-channel`` codes
    (out, in) and scale/zero (out, in/group_size); for ``input-channel`` codes of ``W^T``
    (in, out) and scale/zero (in, out/group_size); ``errors`` the output error of each layout.
    """
    W = weight.detach().float()
    H = hessian.detach().float()
    out_features = W.shape[0]

    def error(deq: torch.Tensor) -> float:
        dW = W - deq
        return float(((dW @ H) * dW).sum())

    oc = _rtn(W, bits, group_size, symmetric)
    errors = {"output-channel": error(grid.dequantize_codes(*oc))}
    if group_size is not None and out_features % group_size:
        return "output-channel", oc, errors
    ic = _rtn(W.t(), bits, group_size, symmetric)
    errors["input-channel"] = error(grid.dequantize_codes(*ic).t())
    if errors["input-channel"] < errors["output-channel"]:
        return "input-channel", ic, errors
    return "output-channel", oc, errors


@register_method(AdaDimConfig)
def apply_adadim(loaded, config: AdaDimConfig, ctx) -> dict:
    modules = select_modules(loaded, config, types=(torch.nn.Linear,))
    check_group_size(config.name, modules, config.group_size)
    kernels = ctx.layer_record("kernels")
    orientation = ctx.layer_record("orientation")
    for name, module, stats in blockwise(loaded, ctx, modules, hessian=True, desc="adadim"):
        H = stats.hessian[name] / stats.count[name]
        chosen, (codes, scale, zero), _ = adadim_quantize(module.weight, H, config.bits, config.group_size, config.symmetric)
        args = (codes, scale, zero, config.bits, config.group_size, config.symmetric, module.bias)
        new = InputChannelQuantizedLinear.from_codes(*args) if chosen == "input-channel" else QuantizedLinear.from_codes(*args)
        new.set_compute_dtype(module.weight.dtype)
        set_submodule(loaded.model, name, new)
        kernels[name] = new.kernel
        orientation[name] = chosen
    return {"modules": sorted(modules), "kernels": kernels, "orientation": orientation}
