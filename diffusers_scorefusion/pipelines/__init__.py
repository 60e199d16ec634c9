"""ScoreFusion pipelines: stock Diffusers pipelines whose denoiser is a fusion."""

from .pipeline_score_fusion import ScoreFusionPipeline, ScoreFusionPipelineMixin
from .pipeline_score_fusion_flux import ScoreFusionFluxPipeline
from .pipeline_score_fusion_sd3 import ScoreFusionSD3Pipeline
from .pipeline_score_fusion_transformer import ScoreFusionTransformerPipelineMixin
from .pipeline_score_fusion_xl import ScoreFusionXLPipeline

__all__ = [
    "ScoreFusionFluxPipeline",
    "ScoreFusionPipeline",
    "ScoreFusionPipelineMixin",
    "ScoreFusionSD3Pipeline",
    "ScoreFusionTransformerPipelineMixin",
    "ScoreFusionXLPipeline",
]
