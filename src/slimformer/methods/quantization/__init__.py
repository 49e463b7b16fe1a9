"""Weight quantization: round-to-nearest and GPTQ, packed low-bit modules and CPU kernels."""

from slimformer.methods.quantization.cast import CastConfig, cast_model
from slimformer.methods.quantization.gptq import GPTQConfig, gptq_quantize
from slimformer.methods.quantization.modules import QuantizedEmbedding, QuantizedLinear, choose_kernel
from slimformer.methods.quantization.rtn import RTNConfig, WeightQuantConfig, quantize_module_rtn

__all__ = [
    "CastConfig",
    "GPTQConfig",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "RTNConfig",
    "WeightQuantConfig",
    "cast_model",
    "choose_kernel",
    "gptq_quantize",
    "quantize_module_rtn",
]
