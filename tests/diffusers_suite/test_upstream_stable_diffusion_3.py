"""Diffusers' `StableDiffusion3Pipeline` fast tests, on `ScoreFusionSD3Pipeline` (see upstream.py)."""

from upstream import derive

from diffusers_scorefusion import ScoreFusionSD3Pipeline

derive(globals(), "pipelines.stable_diffusion_3.test_pipeline_stable_diffusion_3",
       ["StableDiffusion3PipelineFastTests"], ScoreFusionSD3Pipeline, denoiser_key="transformer")  # fmt: skip
