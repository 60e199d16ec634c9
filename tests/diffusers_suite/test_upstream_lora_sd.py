"""Diffusers' LoRA-loader tests of `StableDiffusionPipeline`, with a `FusedUNet` as its `unet` (see upstream.py)."""

from upstream import derive

derive(globals(), "lora.test_lora_layers_sd", ["StableDiffusionLoRATests"])
