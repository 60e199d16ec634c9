"""The on-disk path of `FusedUNet` in pipelines saved by diffusers-scorefusion 0.1 (`model_index.json` names
`["diffusers_scorefusion.modeling_fused_unet", "FusedUNet"]`); the class lives in `models.modeling_fused_unet`."""

from diffusers.models.modeling_utils import ModelMixin  # Diffusers looks this name up in a component's module

from .models.modeling_fused_unet import FusedUNet, check_scheduler_matches

__all__ = ["FusedUNet", "ModelMixin", "check_scheduler_matches"]
