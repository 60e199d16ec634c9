"""`ScoreFusionFluxPipeline`: Flux text-to-image sampling from the KL barycenter of several transformers."""

from typing import Any, Dict, Optional, Sequence, Union

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from ..fitting.fitting_encoding import encode_images
from ..models.modeling_fused_transformer import FusedTransformer
from .pipeline_score_fusion_transformer import ScoreFusionTransformerPipelineMixin


class ScoreFusionFluxPipeline(ScoreFusionTransformerPipelineMixin, FluxPipeline):
    r"""
    Text-to-image sampling from the KL barycenter ``p ∝ prod_i p_i^lambda_i`` of several Flux transformers.

    A `FluxPipeline` whose `transformer` is a [`FusedTransformer`] of `FluxTransformer2DModel` members: every argument
    of `FluxPipeline.__call__` works (prompts, distilled guidance, true CFG, IP-Adapter embeddings, callbacks, any
    flow-matching scheduler), plus `fusion_weights=` to sample with other weights for one call. The fused velocity
    ``sum_i lambda_i v_i`` is the velocity of the fused score (see `fusion/flow_matching_utils.py`).

    Args:
        transformer ([`FusedTransformer`]): the fused members (e.g. [`FusedTransformer.from_lora`] for LoRAs of one
            base). Timestep bins are in the units Flux's pipeline passes: ``sigma`` in [0, 1]. As in Diffusers, a
            plain `FluxTransformer2DModel` (sampling as `FluxPipeline` does) or `None` also work.
        scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, image_encoder, feature_extractor: as in
            [`FluxPipeline`]; members share the text encoders.
    """

    transformer_class = FluxTransformer2DModel

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: Union[FusedTransformer, FluxTransformer2DModel, None],
        image_encoder: Any = None,
        feature_extractor: Any = None,
    ):
        self.check_fused_transformer(transformer, scheduler)
        super().__init__(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2, transformer=transformer, image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )  # fmt: skip

    @torch.no_grad()
    def encode_for_fitting(
        self,
        images: Any,
        prompts: Union[str, Sequence[str]],
        height: Optional[int] = None,
        width: Optional[int] = None,
        guidance_scale: float = 3.5,
        max_sequence_length: int = 512,
        batch_size: int = 8,
    ):
        r"""
        Encodes target images and captions as the Flux transformer sees them during sampling.

        Latents are VAE posterior means minus `vae.config.shift_factor`, times `vae.config.scaling_factor`, packed into
        2 x 2 patches as `prepare_latents` packs them, with their position ids; prompts go through both text encoders
        (`encode_prompt`). A guidance-distilled model (`config.guidance_embeds`) gets `guidance_scale`, the value you
        sample with (`__call__`'s default 3.5); other models ignore it, as `__call__` does.

        Returns:
            `(latents, prompt_embeds, transformer_kwargs, shared_kwargs)`: packed latents `(N, h w / 4, 4 C)`,
            `(N, L, D)`, `{"pooled_projections": (N, D_pooled), "guidance": (N,) or None}` and
            `{"img_ids": (h w / 4, 3), "txt_ids": (L, 3)}`.
        """
        latents, prompts = encode_images(self, images, prompts, height=height, width=width, batch_size=batch_size)
        num, channels, latent_height, latent_width = latents.shape
        if latent_height % 2 or latent_width % 2:
            raise ValueError(f"Flux packs 2 x 2 latent patches: latents {latent_height} x {latent_width} must be even")
        device, dtype = self._execution_device, self.transformer.dtype
        packed = self._pack_latents(latents, num, channels, latent_height, latent_width)  # (N, h w / 4, 4 C)
        image_ids = self._prepare_latent_image_ids(num, latent_height // 2, latent_width // 2, device, dtype)
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompts, None, device=device, num_images_per_prompt=1, max_sequence_length=max_sequence_length
        )
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((num,), float(guidance_scale), device=device, dtype=torch.float32)
        transformer_kwargs = {"pooled_projections": pooled_prompt_embeds.to(dtype), "guidance": guidance}
        return packed, prompt_embeds.to(dtype), transformer_kwargs, {"img_ids": image_ids, "txt_ids": text_ids}

    def _fitting_inputs(
        self, images: Any, prompts: Union[str, Sequence[str]], height: Optional[int], width: Optional[int],
        options: Dict[str, Any],
    ):  # fmt: skip
        """`(latents, prompt_embeds, fit_kwargs)` for [`fit_weights`]: packed latents and ids; timesteps in the units
        Flux's pipeline passes (``timestep / 1000``)."""
        encoding = {key: options.pop(key) for key in ("guidance_scale", "max_sequence_length") if key in options}
        latents, prompt_embeds, transformer_kwargs, shared_kwargs = self.encode_for_fitting(
            images, prompts, height=height, width=width, **encoding
        )
        timestep_scale = self.scheduler.config.num_train_timesteps / 1000
        return latents, prompt_embeds, {"transformer_kwargs": transformer_kwargs, "shared_kwargs": shared_kwargs,
                                        "timestep_scale": timestep_scale}  # fmt: skip
