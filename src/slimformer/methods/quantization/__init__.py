"""Weight quantization: round-to-nearest and GPTQ, packed low-bit modules and CPU kernels."""

from slimformer.methods.quantization.cast import CastConfig, cast_model
from slimformer.methods.quantization.gptq import GPTQConfig, gptq_quantize
from slimformer.methods.quantization.quantease import QuantEaseConfig, quantease_quantize
from slimformer.methods.quantization.modules import QuantizedEmbedding, QuantizedLinear, choose_kernel
from slimformer.methods.quantization.rtn import RTNConfig, WeightQuantConfig, quantize_module_rtn
from slimformer.methods.quantization.hqq import HQQConfig, HQQEmbedding, HQQLinear, hqq_quantize
from slimformer.methods.quantization.awq import AWQConfig, AWQLinear, awq_quantize
from slimformer.methods.quantization.adadim import AdaDimConfig, InputChannelQuantizedLinear, adadim_quantize
from slimformer.methods.quantization.codebook_modules import LUTEmbedding, LUTLinear, VQLinear
from slimformer.methods.quantization.float4 import FP4Config, NF4Config
from slimformer.methods.quantization.vptq import VPTQConfig, vptq_quantize
from slimformer.methods.quantization.eora import EoRAConfig, LowRankCompensated
from slimformer.methods.quantization.bitstack import BitStackConfig, BitStackLinear
from slimformer.methods.quantization.mixed_precision import MixedPrecisionConfig, allocate_bits
from slimformer.methods.quantization.smoothquant import SmoothQuantConfig
from slimformer.methods.quantization.gguf_blocks import GGUFBlockEmbedding, GGUFBlockLinear
from slimformer.methods.quantization.scale_tuning import ScaleTuningConfig

__all__ = [
    "AWQConfig",
    "AWQLinear",
    "AdaDimConfig",
    "HQQConfig",
    "HQQEmbedding",
    "HQQLinear",
    "InputChannelQuantizedLinear",
    "adadim_quantize",
    "awq_quantize",
    "hqq_quantize",
    "CastConfig",
    "FP4Config",
    "QuantEaseConfig",
    "quantease_quantize",
    "LUTEmbedding",
    "LUTLinear",
    "NF4Config",
    "VPTQConfig",
    "VQLinear",
    "vptq_quantize",
    "GGUFBlockEmbedding",
    "GGUFBlockLinear",
    "GPTQConfig",
    "MixedPrecisionConfig",
    "ScaleTuningConfig",
    "SmoothQuantConfig",
    "allocate_bits",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "RTNConfig",
    "WeightQuantConfig",
    "BitStackConfig",
    "BitStackLinear",
    "EoRAConfig",
    "LowRankCompensated",
    "cast_model",
    "choose_kernel",
    "gptq_quantize",
    "quantize_module_rtn",
]
