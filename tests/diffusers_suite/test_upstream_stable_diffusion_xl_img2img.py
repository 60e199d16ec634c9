"""Diffusers' `StableDiffusionXLImg2ImgPipeline` fast tests, with a `FusedUNet` as its `unet` (see upstream.py)."""

from upstream import derive

derive(
    globals(),
    "pipelines.stable_diffusion_xl.test_stable_diffusion_xl_img2img",
    [
        "StableDiffusionXLImg2ImgPipelineFastTests",
        "StableDiffusionXLImg2ImgRefinerOnlyPipelineFastTests",
    ],
)
