"""Low-rank factorization: SVD, ASVD, SVD-LLM (two smaller linears) and LQ-LoRA (low-rank plus
quantized residual)."""

from slimformer.methods.lowrank.svd import SVDConfig
from slimformer.methods.lowrank.asvd import ASVDConfig
from slimformer.methods.lowrank.svd_llm import SVDLLMConfig
from slimformer.methods.lowrank.lq_lora import LQLoRAConfig

__all__ = ["ASVDConfig", "LQLoRAConfig", "SVDConfig", "SVDLLMConfig"]
