"""Diffusers' `StableDiffusionXLPipeline` fast tests, on `ScoreFusionXLPipeline` (see upstream.py)."""

from upstream import derive

from diffusers_scorefusion import ScoreFusionXLPipeline

derive(
    globals(),
    "pipelines.stable_diffusion_xl.test_stable_diffusion_xl",
    [
        "StableDiffusionXLPipelineFastTests",
    ],
    ScoreFusionXLPipeline,
)
