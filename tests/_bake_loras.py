"""Tiny LoRA sets for the baking tests: k random LoRAs of one base (different ranks, targets and alphas, conv layers
included) saved as Diffusers pipeline LoRA folders."""

import copy

import torch
from diffusers import FluxPipeline, StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

# member i: (rank, alpha, targets); members adapt different layers so the merge needs zero blocks
UNET_LORAS = [(2, 4, ["to_q", "to_v", "conv1"]), (4, 8, ["to_q", "to_k", "to_out.0", "proj_in"]),
              (3, 3, ["to_v", "ff.net.2", "conv2"])]  # fmt: skip
FLUX_LORAS = [(2, 4, ["to_q", "to_k"]), (4, 8, ["to_q", "proj_out"]), (3, 3, ["to_v", "proj_mlp"])]


def random_adapter(base, seed, rank, alpha, targets):
    """A copy of `base` with one random adapter "default" (non-zero B)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    return model


def save_lora_folders(base, folder, specs=UNET_LORAS, seed=10):
    """Saves one Diffusers pipeline-format LoRA folder per spec; returns the folders."""
    folders = []
    for i, (rank, alpha, targets) in enumerate(specs):
        model = random_adapter(base, seed + i, rank, alpha, targets)
        layers = get_peft_model_state_dict(model)
        config = model.peft_config["default"].to_dict()
        metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        path = str(folder / f"lora_{i}")
        if type(base).__name__.startswith("UNet"):
            StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=layers,
                                                      unet_lora_adapter_metadata=metadata)  # fmt: skip
        else:
            FluxPipeline.save_lora_weights(path, transformer_lora_layers=layers,
                                           transformer_lora_adapter_metadata=metadata)  # fmt: skip
        folders.append(path)
    return folders
