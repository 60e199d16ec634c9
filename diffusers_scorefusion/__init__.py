"""ScoreFusion for Diffusers: sample from the KL barycenter of several fine-tuned diffusion models."""

from diffusers.models.modeling_utils import ModelMixin  # Diffusers looks this name up in a component's module

from . import modeling_fused_unet  # noqa: F401  (the 0.1 on-disk path of FusedUNet; Diffusers resolves it in sys.modules)
from .fitting import FitResult, fit_weights
from .fusion.fusion_utils import check_weights, combine_predictions, convert_prediction, solve_simplex_qp
from .models.modeling_fused_unet import FusedUNet
from .models.modeling_lora_member import LoraMember
from .pipelines.pipeline_score_fusion import ScoreFusionPipeline
from .pipelines.pipeline_score_fusion_xl import ScoreFusionXLPipeline
from .pipelines.corrector import LangevinCorrector, langevin_correct

__version__ = "0.1.0"


def _register_with_diffusers() -> None:
    """Makes `DiffusionPipeline.from_pretrained` find our pipelines by the `_class_name` saved in model_index.json.

    Diffusers resolves that name as an attribute of the `diffusers` module; we add ours there (never replacing a name
    Diffusers already has). Nothing else of Diffusers is changed.
    """
    import diffusers

    for pipeline_class in (ScoreFusionPipeline, ScoreFusionXLPipeline):
        if not hasattr(diffusers, pipeline_class.__name__):
            setattr(diffusers, pipeline_class.__name__, pipeline_class)


_register_with_diffusers()

__all__ = [
    "FitResult",
    "FusedUNet",
    "LangevinCorrector",
    "LoraMember",
    "ModelMixin",
    "ScoreFusionPipeline",
    "ScoreFusionXLPipeline",
    "check_weights",
    "combine_predictions",
    "convert_prediction",
    "fit_weights",
    "langevin_correct",
    "solve_simplex_qp",
]
