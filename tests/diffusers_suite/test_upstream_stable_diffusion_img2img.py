"""Diffusers' `StableDiffusionImg2ImgPipeline` fast tests, with a `FusedUNet` as its `unet` (see upstream.py)."""

from upstream import derive

derive(
    globals(),
    "pipelines.stable_diffusion.test_stable_diffusion_img2img",
    [
        "TestStableDiffusionImg2ImgPipeline",
        "TestStableDiffusionImg2ImgPipelineMemory",
        "TestStableDiffusionImg2ImgPipelineIPAdapter",
    ],
)
