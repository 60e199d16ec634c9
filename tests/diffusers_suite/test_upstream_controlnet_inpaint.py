"""Diffusers' `StableDiffusionControlNetInpaintPipeline` fast tests, with a `FusedUNet` as its `unet`
(see upstream.py)."""

from upstream import derive

derive(
    globals(),
    "pipelines.controlnet.test_controlnet_inpaint",
    [
        "ControlNetInpaintPipelineFastTests",
        "ControlNetSimpleInpaintPipelineFastTests",
        "MultiControlNetInpaintPipelineFastTests",
    ],
)
