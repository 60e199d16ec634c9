"""Encoding target images and captions through a pipeline's VAE and text encoders, for `fit_weights`."""

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from .fitting_utils import check_images


def fused_component(pipe: Any) -> Any:
    """The pipeline's fused denoiser: the component named by its `fused_component` (`"unet"` by default)."""
    return getattr(pipe, getattr(pipe, "fused_component", "unet"))


def encode_images(
    pipe: Any,
    images: Any,
    prompts: Union[str, Sequence[str]],
    height: Optional[int] = None,
    width: Optional[int] = None,
    batch_size: int = 8,
) -> Tuple[torch.Tensor, List[str]]:
    r"""
    VAE latents of target images and one caption per image, for fitting through a pipeline.

    Images are PIL images (converted to RGB as PIL does), or numpy arrays `(H, W, 3)` / tensors `(3, H, W)` (or
    batches of them) of uint8 pixels in 0..255 or floats in [0, 1] (or [-1, 1]); anything else is refused (see
    `fitting_utils.check_images`). Their size, or `height` and `width` (which resize), must be multiples of the VAE
    factor. They go through the pipeline's `VaeImageProcessor`; latents are the mean of the VAE posterior
    (deterministic: the same images always give the same latents and data fingerprint), shifted by
    `vae.config.shift_factor` when set and times `vae.config.scaling_factor`, in the fused denoiser's dtype (`unet` or
    `transformer`). The VAE runs in float32 when `vae.config.force_upcast` (the SDXL VAE overflows in float16).

    Returns:
        `(latents, prompts)`: `(N, C, h, w)` and a list of N strings.
    """
    images = check_images(images, height, width, pipe.image_processor.config.vae_scale_factor)
    pixels = pipe.image_processor.preprocess(images, height=height, width=width)  # (N, 3, H, W) in [-1, 1]
    num_images = pixels.shape[0]
    if num_images == 0:
        raise ValueError("images is empty: fitting needs at least one target image")
    if isinstance(prompts, str):
        prompts = [prompts] * num_images
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(prompt, str) for prompt in prompts):
        raise TypeError(f"prompts must be a string or a list of strings, got {prompts!r:.200}")
    if len(prompts) != num_images:
        raise ValueError(f"got {num_images} images but {len(prompts)} prompts; give one prompt per image or one string")
    if not torch.isfinite(pixels).all():
        raise ValueError("images contain NaN or inf")
    device, vae = pipe._execution_device, pipe.vae
    vae_dtype, shift = vae.dtype, getattr(vae.config, "shift_factor", None) or 0.0
    upcast = getattr(vae.config, "force_upcast", False) and vae_dtype != torch.float32
    latents = []
    try:
        if upcast:
            vae.to(torch.float32)
        with torch.no_grad():
            for start in range(0, num_images, batch_size):
                chunk = pixels[start : start + batch_size].to(device=device, dtype=vae.dtype)
                latents.append((vae.encode(chunk).latent_dist.mean - shift) * vae.config.scaling_factor)
    finally:
        if upcast:
            vae.to(vae_dtype)
    return torch.cat(latents).to(fused_component(pipe).dtype), list(prompts)


def encode_for_fitting(
    pipe: Any,
    images: Any,
    prompts: Union[str, Sequence[str]],
    height: Optional[int] = None,
    width: Optional[int] = None,
    batch_size: int = 8,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""
    Encodes target images and captions with a Stable Diffusion pipeline's VAE and text encoder ([`encode_images`];
    prompts without classifier-free guidance).

    Returns:
        `(latents, prompt_embeds)`: `(N, C, h, w)` and `(N, L, D)`.
    """
    latents, prompts = encode_images(pipe, images, prompts, height=height, width=width, batch_size=batch_size)
    with torch.no_grad():
        prompt_embeds, _ = pipe.encode_prompt(prompts, pipe._execution_device, 1, False)
    return latents, prompt_embeds.to(pipe.unet.dtype)
