"""Fused denoisers: `FusedUNet` and its LoRA members."""

from .modeling_fused_unet import FusedUNet
from .modeling_lora_member import LoraMember

__all__ = ["FusedUNet", "LoraMember"]
