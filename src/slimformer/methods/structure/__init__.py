"""Structure removal: whole transformer blocks (ShortGPT)."""

from slimformer.methods.structure.shortgpt import ShortGPTConfig, block_influence

__all__ = ["ShortGPTConfig", "block_influence"]
