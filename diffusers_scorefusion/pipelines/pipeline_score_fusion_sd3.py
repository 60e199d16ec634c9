"""`ScoreFusionSD3Pipeline`: Stable Diffusion 3 text-to-image sampling from the KL barycenter of several
transformers."""

from typing import Any, Dict, Optional, Sequence, Union

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from ..fitting.fitting_encoding import encode_images
from ..models.modeling_fused_transformer import FusedTransformer
from .pipeline_score_fusion_transformer import ScoreFusionTransformerPipelineMixin


class ScoreFusionSD3Pipeline(ScoreFusionTransformerPipelineMixin, StableDiffusion3Pipeline):
    r"""
    Text-to-image sampling from the KL barycenter ``p ∝ prod_i p_i^lambda_i`` of several SD3 transformers.

    A `StableDiffusion3Pipeline` whose `transformer` is a [`FusedTransformer`] of `SD3Transformer2DModel` members: every
    argument of `StableDiffusion3Pipeline.__call__` works (three prompts, negative prompts, guidance, skip-layer
    guidance, callbacks, any flow-matching scheduler), plus `fusion_weights=` to sample with other weights for one call.
    The fused velocity ``sum_i lambda_i v_i`` is the velocity of the fused score (see `fusion/flow_matching_utils.py`).

    Args:
        transformer ([`FusedTransformer`]): the fused members. Timestep bins are in SD3's timestep units (0 to 1000).
            As in Diffusers, a plain `SD3Transformer2DModel` (sampling as `StableDiffusion3Pipeline` does) or `None`
            also work.
        scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3, tokenizer_3,
            image_encoder, feature_extractor: as in [`StableDiffusion3Pipeline`]; members share the text encoders.
    """

    transformer_class = SD3Transformer2DModel

    def __init__(
        self,
        transformer: Union[FusedTransformer, SD3Transformer2DModel, None],
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel,
        tokenizer_3: T5TokenizerFast,
        image_encoder: Any = None,
        feature_extractor: Any = None,
    ):
        self.check_fused_transformer(transformer, scheduler)
        super().__init__(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3, image_encoder=image_encoder, feature_extractor=feature_extractor,
        )  # fmt: skip

    @torch.no_grad()
    def encode_for_fitting(
        self,
        images: Any,
        prompts: Union[str, Sequence[str]],
        height: Optional[int] = None,
        width: Optional[int] = None,
        max_sequence_length: int = 256,
        batch_size: int = 8,
    ):
        r"""
        Encodes target images and captions as the SD3 transformer sees them during sampling.

        Latents are VAE posterior means minus `vae.config.shift_factor`, times `vae.config.scaling_factor`; prompts go
        through the three text encoders (`encode_prompt`, no classifier-free guidance; `max_sequence_length` as in
        `__call__`).

        Returns:
            `(latents, prompt_embeds, pooled_prompt_embeds)`: `(N, C, h, w)`, `(N, L, D)` and `(N, D_pooled)`.
        """
        latents, prompts = encode_images(self, images, prompts, height=height, width=width, batch_size=batch_size)
        prompt_embeds, _, pooled_prompt_embeds, _ = self.encode_prompt(
            prompts, None, None, device=self._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
        )  # fmt: skip
        dtype = self.transformer.dtype
        return latents, prompt_embeds.to(dtype), pooled_prompt_embeds.to(dtype)

    def _fitting_inputs(
        self, images: Any, prompts: Union[str, Sequence[str]], height: Optional[int], width: Optional[int],
        options: Dict[str, Any],
    ):  # fmt: skip
        """`(latents, prompt_embeds, fit_kwargs)` for [`fit_weights`]; timesteps as SD3 was trained (logit-normal,
        unless `timestep_density` says otherwise), in the scheduler's units."""
        max_sequence_length = options.pop("max_sequence_length", 256)
        latents, prompt_embeds, pooled = self.encode_for_fitting(images, prompts, height=height, width=width,
                                                                 max_sequence_length=max_sequence_length)  # fmt: skip
        options.setdefault("timestep_density", "logit_normal")
        return latents, prompt_embeds, {"transformer_kwargs": {"pooled_projections": pooled}}
