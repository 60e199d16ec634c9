"""ScoreFusion for Diffusers: sample from the KL barycenter of several fine-tuned diffusion models."""

from diffusers.models.modeling_utils import ModelMixin  # Diffusers looks this name up in a component's module

from .fusion_utils import check_weights, combine_predictions, convert_prediction, solve_simplex_qp
from .modeling_fused_unet import FusedUNet
from .pipeline_score_fusion import ScoreFusionPipeline

__version__ = "0.1.0"

__all__ = [
    "FusedUNet",
    "ModelMixin",
    "ScoreFusionPipeline",
    "check_weights",
    "combine_predictions",
    "convert_prediction",
    "solve_simplex_qp",
]
