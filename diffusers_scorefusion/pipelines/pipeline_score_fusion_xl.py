"""`ScoreFusionXLPipeline`: Stable Diffusion XL text-to-image sampling from the KL barycenter of several UNets."""

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from ..fitting import encode_images
from ..models.modeling_fused_unet import FusedUNet, check_scheduler_matches
from .pipeline_score_fusion import ScoreFusionPipelineMixin


class ScoreFusionXLPipeline(ScoreFusionPipelineMixin, StableDiffusionXLPipeline):
    r"""
    Text-to-image sampling from the KL barycenter ``p ∝ prod_i p_i^lambda_i`` of several Stable Diffusion XL UNets.

    A `StableDiffusionXLPipeline` whose `unet` is a [`FusedUNet`]: every argument of
    `StableDiffusionXLPipeline.__call__` works (two prompts, negative prompts, guidance, size and crop conditioning,
    callbacks, any compatible scheduler), plus `fusion_weights=` to sample with other weights for one call.

    Args:
        vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler, image_encoder, feature_extractor,
            force_zeros_for_empty_prompt, add_watermarker: as in [`StableDiffusionXLPipeline`].
        unet ([`FusedUNet`]): the fused SDXL members (e.g. [`FusedUNet.from_lora`] for LoRA fine-tunes; a plain
            `UNet2DConditionModel` or `None` work as in `StableDiffusionXLPipeline`). The
            scheduler's `prediction_type` must match `unet.config.prediction_type`. Members share the pipeline's two
            text encoders.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: Union[FusedUNet, UNet2DConditionModel, None],
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: Optional[CLIPVisionModelWithProjection] = None,
        feature_extractor: Optional[CLIPImageProcessor] = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: Optional[bool] = None,
    ):
        if isinstance(unet, FusedUNet) and unet.config.addition_embed_type != "text_time":
            raise ValueError(
                f"ScoreFusionXLPipeline needs SDXL members (addition_embed_type='text_time'), got "
                f"addition_embed_type={unet.config.addition_embed_type!r}; use ScoreFusionPipeline for Stable "
                "Diffusion 1/2"
            )
        if getattr(unet, "num_encoder_slots", 1) != 1:
            raise ValueError(
                f"the fusion has {unet.num_encoder_slots - 1} member text encoders; ScoreFusionXLPipeline members "
                "share the pipeline's two text encoders"
            )
        check_scheduler_matches(unet, scheduler)
        super().__init__(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
            feature_extractor=feature_extractor, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )  # fmt: skip

    # ----------------------------------------------------------------------------------------------- fitting
    @torch.no_grad()
    def encode_for_fitting(
        self,
        images: Any,
        prompts: Union[str, Sequence[str]],
        height: Optional[int] = None,
        width: Optional[int] = None,
        batch_size: int = 8,
    ) -> Tuple[torch.Tensor, torch.Tensor, dict]:
        r"""
        Encodes target images and captions as the SDXL UNet sees them during sampling.

        Latents are VAE posterior means (minus `vae.config.shift_factor` when set) times `vae.config.scaling_factor`;
        the VAE runs in float32 when `vae.config.force_upcast`. Prompts go through both text encoders without
        classifier-free guidance. The time ids are `(H, W, 0, 0, H, W)` (original and target size = the images' size,
        no crop), as `__call__` uses by default.

        Returns:
            `(latents, prompt_embeds, added_cond_kwargs)`: `(N, C, h, w)`, `(N, L, D)` and
            `{"text_embeds": (N, D_pooled), "time_ids": (N, 6)}`.
        """
        latents, prompts = encode_images(self, images, prompts, height=height, width=width, batch_size=batch_size)
        device = self._execution_device
        prompt_embeds, _, pooled_prompt_embeds, _ = self.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        projection_dim = (self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None
                          else int(pooled_prompt_embeds.shape[-1]))  # fmt: skip
        size = (latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor)
        time_ids = self._get_add_time_ids(size, (0, 0), size, dtype=prompt_embeds.dtype,
                                          text_encoder_projection_dim=projection_dim)  # fmt: skip  # (1, 6)
        unet_dtype = self.unet.dtype
        time_ids = time_ids.to(device=device, dtype=unet_dtype).repeat(len(prompts), 1)  # (N, 6)
        added_cond_kwargs = {"text_embeds": pooled_prompt_embeds.to(unet_dtype), "time_ids": time_ids}
        return latents, prompt_embeds.to(unet_dtype), added_cond_kwargs

    def _fitting_inputs(
        self, images: Any, prompts: Union[str, Sequence[str]], height: Optional[int], width: Optional[int],
        options: Dict[str, Any],
    ):  # fmt: skip
        """`(latents, prompt_embeds, fit_kwargs)` for [`fit_weights`], from [`encode_for_fitting`]."""
        latents, prompt_embeds, added_cond_kwargs = self.encode_for_fitting(images, prompts, height=height, width=width)
        return latents, prompt_embeds, {"unet_kwargs": {"added_cond_kwargs": added_cond_kwargs}}
