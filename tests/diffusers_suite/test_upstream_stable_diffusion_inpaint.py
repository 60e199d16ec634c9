"""Diffusers' `StableDiffusionInpaintPipeline` fast tests, with a `FusedUNet` as its `unet` (see upstream.py)."""

from upstream import derive

derive(
    globals(),
    "pipelines.stable_diffusion.test_stable_diffusion_inpaint",
    [
        "TestStableDiffusionInpaintPipeline",
        "TestStableDiffusionSimpleInpaintPipeline",
        "TestStableDiffusionInpaintPipelineMemory",
        "TestStableDiffusionInpaintPipelineIPAdapter",
    ],
)
