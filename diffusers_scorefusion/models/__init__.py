"""Fused denoisers: `FusedUNet`, `FusedTransformer` and their LoRA members."""

from .modeling_fused_transformer import FusedTransformer
from .modeling_fused_unet import FusedUNet
from .modeling_lora_member import LoraMember

__all__ = ["FusedTransformer", "FusedUNet", "LoraMember"]
