"""Diffusers' `StableDiffusionPipeline` fast tests, on `ScoreFusionPipeline` (see upstream.py)."""

from upstream import derive

from diffusers_scorefusion import ScoreFusionPipeline

derive(globals(), "pipelines.stable_diffusion.test_stable_diffusion",
       ["TestStableDiffusionPipeline", "TestStableDiffusionPipelineMemory", "TestStableDiffusionPipelineIPAdapter"],
       ScoreFusionPipeline)
