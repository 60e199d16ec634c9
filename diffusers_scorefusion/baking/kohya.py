"""Kohya / A1111 key format for merged UNet LoRAs (`lora_unet_<module path with _>.lora_down.weight`, `.lora_up.weight`,
`.alpha`), the keys sd-scripts writes for Stable Diffusion UNets and that A1111, ComfyUI and Diffusers' own Kohya reader
load. Written with Diffusers' converter `convert_state_dict_to_kohya`, then read back with Diffusers' Kohya reader: a
layer whose name that reader would not map back to the same layer is refused before anything is written."""

from typing import Dict

import torch

KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"


def to_kohya(merged) -> Dict[str, torch.Tensor]:
    """The Kohya state dict of a merged UNet LoRA (alpha = rank, so the Kohya scale alpha / rank is 1, as merged)."""
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft

    if merged.prefix != "unet":
        raise ValueError(
            f"the Kohya format is written for UNet LoRAs (SD 1/2, SDXL); this LoRA is for a {merged.base_class}: save "
            "it with format='diffusers' (ComfyUI and Diffusers load that format for transformers)"
        )
    peft_keys = {f"unet.{key}": value for key, value in merged.state_dict.items()}
    kohya = convert_state_dict_to_kohya(peft_keys)
    kohya = {key: value.contiguous() for key, value in kohya.items()}
    # Read back as Diffusers reads Kohya files; every layer must come back under its own name.
    read, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(dict(kohya))
    read = convert_unet_state_dict_to_peft({key[len("unet."):]: value for key, value in read.items()})
    lost = sorted(set(merged.state_dict) - set(read))
    if lost:
        module = lost[0].rsplit(".lora_", 1)[0]
        raise ValueError(
            f"layer {module!r} has no Kohya name that Diffusers' Kohya reader maps back to it (it reads "
            f"{sorted(set(read) - set(merged.state_dict))[:1]}); save this LoRA with format='diffusers'"
        )
    return kohya
