"""Structure removal: whole transformer blocks (ShortGPT, SLEB), attention/MLP sub-layers
(attention/MLP drop, BlockPruner), removed blocks folded into their neighbours (FuseGPT) and width (heads and MLP neurons, with distillation)."""

from slimformer.methods.structure.shortgpt import ShortGPTConfig, block_influence
from slimformer.methods.structure.sleb import SLEBConfig
from slimformer.methods.structure.sublayer_drop import SublayerDropConfig
from slimformer.methods.structure.blockpruner import BlockPrunerConfig
from slimformer.methods.structure.fuse import FuseGPTConfig
from slimformer.methods.structure.width import WidthSlimConfig

__all__ = ["BlockPrunerConfig", "FuseGPTConfig", "SLEBConfig", "ShortGPTConfig", "SublayerDropConfig", "WidthSlimConfig", "block_influence"]
