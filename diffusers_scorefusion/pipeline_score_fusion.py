"""`ScoreFusionPipeline`: Stable Diffusion text-to-image sampling from the KL barycenter of several UNets."""

import os
from typing import Any, Optional, Sequence, Union

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from .fusion_utils import WeightsLike
from .loading_utils import MemberSpec, load_member
from .modeling_fused_unet import FusedUNet, check_scheduler_matches
from .serialization import atomic_directory


def build_fused_unet(
    unets: Sequence[MemberSpec], weights: Optional[WeightsLike] = None, allow_pickle: bool = False, **load_kwargs: Any
) -> FusedUNet:
    """A `FusedUNet` from modules, local folders or Hub ids; members from pipeline folders bring their scheduler."""
    members, schedulers = zip(*(load_member(unet, allow_pickle=allow_pickle, **load_kwargs) for unet in unets))
    declared = [s is not None for s in schedulers]
    member_schedulers = list(schedulers) if all(declared) else None
    if any(declared) and not all(declared):
        missing = [i for i, has in enumerate(declared) if not has]
        raise ValueError(
            f"members {missing} come without a scheduler config while others have one: give every member as a "
            "pipeline folder (with scheduler/), or none, so their noise schedules can be compared"
        )
    return FusedUNet(list(members), weights=weights, member_schedulers=member_schedulers)


class ScoreFusionPipeline(StableDiffusionPipeline):
    r"""
    Text-to-image sampling from the KL barycenter ``p ∝ prod_i p_i^lambda_i`` of several Stable Diffusion UNets.

    A `StableDiffusionPipeline` whose `unet` is a [`FusedUNet`]: every argument of `StableDiffusionPipeline.__call__`
    works (prompts, negative prompts, classifier-free guidance, callbacks, any compatible scheduler), plus
    `fusion_weights=` to sample with other weights for one call.

    Args:
        vae ([`AutoencoderKL`]), text_encoder ([`~transformers.CLIPTextModel`]), tokenizer
            ([`~transformers.CLIPTokenizer`]), scheduler ([`SchedulerMixin`]), safety_checker, feature_extractor,
            image_encoder: as in [`StableDiffusionPipeline`].
        unet ([`FusedUNet`]): the fused members. The scheduler's `prediction_type` must match
            `unet.config.prediction_type`.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: FusedUNet,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: Optional[StableDiffusionSafetyChecker] = None,
        feature_extractor: Optional[CLIPImageProcessor] = None,
        image_encoder: Optional[CLIPVisionModelWithProjection] = None,
        requires_safety_checker: bool = True,
    ):
        if not isinstance(unet, FusedUNet):
            raise TypeError(
                f"ScoreFusionPipeline needs a FusedUNet as `unet`, got {type(unet).__name__}; build one with "
                "FusedUNet([...]) or ScoreFusionPipeline.from_pretrained(base, unets=[...])"
            )
        check_scheduler_matches(unet, scheduler)
        super().__init__(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=safety_checker, feature_extractor=feature_extractor, image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )  # fmt: skip

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        unets: Optional[Sequence[MemberSpec]] = None,
        weights: Optional[WeightsLike] = None,
        **kwargs: Any,
    ) -> "ScoreFusionPipeline":
        r"""
        Loads a saved ScoreFusion pipeline, or builds one from a base model and fine-tuned UNets.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A saved ScoreFusion pipeline, or (with `unets`) a base Stable Diffusion model (local folder or Hub id)
                that provides the VAE, text encoder, tokenizer and scheduler.
            unets (`list`, *optional*):
                The members: modules, local folders or Hub ids of UNets or of whole pipelines (their `unet/` is
                used), or dicts with `pretrained_model_name_or_path`, `subfolder`, `revision`, `variant`.
            weights (`list[float]`, *optional*):
                The fusion weights (uniform by default).
            kwargs: passed to `DiffusionPipeline.from_pretrained`; `torch_dtype`, `cache_dir`, `token` and
                `local_files_only` also apply to the members. Weights load from safetensors only unless
                `allow_pickle=True`.
        """
        allow_pickle = kwargs.pop("allow_pickle", False)
        kwargs.setdefault("use_safetensors", None if allow_pickle else True)
        if unets is None:
            if weights is not None:
                raise ValueError("weights= needs unets=; to change a loaded fusion's weights use pipe.unet.set_weights()")
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if "unet" in kwargs:
            raise ValueError("pass either unet= (a FusedUNet) or unets= (its members), not both")
        member_kwargs = {key: kwargs[key] for key in ("torch_dtype", "cache_dir", "token", "local_files_only") if key in kwargs}
        kwargs["unet"] = build_fused_unet(unets, weights, allow_pickle=allow_pickle, **member_kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs: Any) -> None:
        """`DiffusionPipeline.save_pretrained`, made atomic: a failing save leaves an earlier save intact."""
        if kwargs.get("push_to_hub"):
            kwargs.setdefault("repo_id", os.path.basename(os.path.normpath(os.fspath(save_directory))))
        with atomic_directory(os.fspath(save_directory)) as staging:
            super().save_pretrained(staging, **kwargs)

    @torch.no_grad()
    def __call__(self, *args: Any, fusion_weights: Optional[WeightsLike] = None, **kwargs: Any):
        r"""
        Generates images from the fused model; takes every argument of `StableDiffusionPipeline.__call__`.

        Args:
            fusion_weights (`list[float]` or `torch.Tensor`, *optional*):
                Weights for this call only, shape `(k,)` (or the stored `(num_bins, k)` table's shape); on the simplex.
                Defaults to `unet.fusion_weights`.

        Returns:
            [`~pipelines.stable_diffusion.StableDiffusionPipelineOutput`] or `tuple`, as `StableDiffusionPipeline`.
        """
        check_scheduler_matches(self.unet, self.scheduler)
        with self.unet.override_weights(fusion_weights):
            return super().__call__(*args, **kwargs)
