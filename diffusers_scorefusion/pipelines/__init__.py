"""ScoreFusion pipelines: stock Diffusers pipelines whose denoiser is a fusion."""

from .pipeline_score_fusion import ScoreFusionPipeline, ScoreFusionPipelineMixin
from .pipeline_score_fusion_xl import ScoreFusionXLPipeline

__all__ = ["ScoreFusionPipeline", "ScoreFusionPipelineMixin", "ScoreFusionXLPipeline"]
