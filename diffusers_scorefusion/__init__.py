"""ScoreFusion for Diffusers: sample from the KL barycenter of several fine-tuned diffusion models."""

from diffusers.models.modeling_utils import ModelMixin  # Diffusers looks this name up in a component's module

from . import modeling_fused_unet  # noqa: F401  (the 0.1 on-disk path of FusedUNet; Diffusers resolves it in sys.modules)
from .fitting import FitResult, fit_weights
from .fusion.fusion_utils import check_weights, combine_predictions, convert_prediction, solve_simplex_qp
from .models.modeling_fused_transformer import FusedTransformer
from .models.modeling_fused_unet import FusedUNet
from .models.modeling_lora_member import LoraMember
from .pipelines.corrector import LangevinCorrector, langevin_correct
from .pipelines.fkc import FeynmanKacCorrector
from .pipelines.pipeline_score_fusion import ScoreFusionPipeline
from .pipelines.pipeline_score_fusion_flux import ScoreFusionFluxPipeline
from .pipelines.pipeline_score_fusion_sd3 import ScoreFusionSD3Pipeline
from .pipelines.pipeline_score_fusion_xl import ScoreFusionXLPipeline

__version__ = "0.1.0"


def _register_with_diffusers() -> None:
    """Makes Diffusers find our pipelines by name: `DiffusionPipeline.from_pretrained` resolves the `_class_name` of a
    saved `model_index.json` on the `diffusers` module, and Diffusers' tooling (e.g. its source-code parsing helpers)
    looks pipeline classes up on `diffusers.pipelines`. We add ours there, never replacing a name Diffusers already
    has. Nothing else of Diffusers is changed.
    """
    import diffusers
    import diffusers.pipelines

    for module in (diffusers, diffusers.pipelines):
        for pipeline_class in (ScoreFusionPipeline, ScoreFusionXLPipeline, ScoreFusionSD3Pipeline,
                               ScoreFusionFluxPipeline):
            if not hasattr(module, pipeline_class.__name__):
                setattr(module, pipeline_class.__name__, pipeline_class)


_register_with_diffusers()

__all__ = [
    "FeynmanKacCorrector",
    "FitResult",
    "FusedTransformer",
    "FusedUNet",
    "LangevinCorrector",
    "LoraMember",
    "ModelMixin",
    "ScoreFusionFluxPipeline",
    "ScoreFusionPipeline",
    "ScoreFusionSD3Pipeline",
    "ScoreFusionXLPipeline",
    "check_weights",
    "combine_predictions",
    "convert_prediction",
    "fit_weights",
    "langevin_correct",
    "solve_simplex_qp",
]
