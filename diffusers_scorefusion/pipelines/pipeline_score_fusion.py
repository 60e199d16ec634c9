"""`ScoreFusionPipeline`: Stable Diffusion text-to-image sampling from the KL barycenter of several UNets."""

import contextlib
import functools
import inspect
import os
import re
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from ..fitting import FitResult, encode_for_fitting, fit_weights
from ..fusion.fusion_utils import WeightsLike
from ..loaders.loading_utils import (
    MemberSpec,
    load_member,
    load_member_text_encoder,
    member_source,
    resolve_use_safetensors,
)
from ..loaders.pipeline_loading import loading_pipeline, save_pipeline
from ..models.modeling_fused_unet import FusedUNet, check_scheduler_matches


def build_fused_unet(
    unets: Sequence[MemberSpec],
    weights: Optional[WeightsLike] = None,
    allow_pickle: Optional[bool] = None,
    base_text_encoder: Optional[torch.nn.Module] = None,
    base_scheduler: Optional[Dict[str, Any]] = None,
    **load_kwargs: Any,
) -> FusedUNet:
    """A `FusedUNet` from modules, local folders or Hub ids.

    Members given as pipeline folders or repos bring their scheduler (its noise schedule and prediction type) and,
    when `base_text_encoder` is given and theirs differs from it, their own text encoder. Members without a scheduler
    of their own use `base_scheduler` (fine-tunes of the base model) when it is given. Weights load as Diffusers
    loads them (`allow_pickle=False`: safetensors only).
    """
    if isinstance(unets, (str, os.PathLike, torch.nn.Module, dict)) or len(unets) == 0:
        raise ValueError(f"unets must be a non-empty list of members, got {unets!r:.200}")
    members, schedulers = zip(*(load_member(unet, allow_pickle=allow_pickle, **load_kwargs) for unet in unets))
    encoders = None
    if base_text_encoder is not None:
        encoders = [load_member_text_encoder(unet, base_text_encoder, allow_pickle=allow_pickle, **load_kwargs)
                    for unet in unets]  # fmt: skip
        encoders = encoders if any(encoder is not None for encoder in encoders) else None
    schedulers = [base_scheduler if scheduler is None else scheduler for scheduler in schedulers]
    declared = [s is not None for s in schedulers]
    member_schedulers = list(schedulers) if all(declared) else None
    if any(declared) and not all(declared):
        missing = [i for i, has in enumerate(declared) if not has]
        raise ValueError(
            f"members {missing} come without a scheduler config while others have one: give every member as a "
            "pipeline folder (with scheduler/), or none, so their noise schedules can be compared"
        )
    fused = FusedUNet(
        list(members), weights=weights, member_schedulers=member_schedulers, member_text_encoders=encoders
    )
    fused.member_sources = [member_source(unet) for unet in unets]
    return fused


def fusion_loading_kwargs(
    pretrained_model_name_or_path: Union[str, os.PathLike],
    unets: Optional[Sequence[MemberSpec]],
    weights: Optional[WeightsLike],
    kwargs: Dict[str, Any],
    text_encoder_class: Optional[type] = None,
    component: str = "unet",
    build_fusion: Callable[..., Any] = build_fused_unet,
    fusion_class: type = FusedUNet,
) -> Dict[str, Any]:
    """The `DiffusionPipeline.from_pretrained` kwargs of a fusion pipeline: weights as Diffusers loads them (safetensors
    only with `allow_pickle=False`), and with members (`unets`), a fusion of them (`build_fusion`: a `FusedUNet` by
    default) as `component` (`"unet"`; `"transformer"` for transformer pipelines); members without a scheduler get
    the base model's. `verify_weights` and `allow_outside_paths` reach a saved fusion's `fusion_class.from_pretrained`.

    With `text_encoder_class`, the base's text encoder is loaded first, so members whose own equals it share it.
    """
    kwargs = dict(kwargs)
    use_safetensors = resolve_use_safetensors(kwargs.pop("allow_pickle", None), kwargs.pop("use_safetensors", None))
    if use_safetensors is not None:
        kwargs["use_safetensors"] = use_safetensors
    fusion_options = {key: kwargs.pop(key) for key in ("verify_weights", "allow_outside_paths") if key in kwargs}
    members_name = f"{component}s"
    if unets is None:
        if weights is not None:
            raise ValueError(
                f"weights= needs {members_name}=; to change a loaded fusion's weights "
                f"use pipe.{component}.set_weights()"
            )
        if fusion_options and component not in kwargs:  # Diffusers would not pass them on: load the fusion here
            dtype = kwargs.get("torch_dtype")
            dtype = dtype.get(component, dtype.get("default")) if isinstance(dtype, dict) else dtype
            load = {key: kwargs[key]
                    for key in ("cache_dir", "token", "local_files_only", "revision", "use_safetensors")
                    if key in kwargs}  # fmt: skip
            kwargs[component] = fusion_class.from_pretrained(pretrained_model_name_or_path, subfolder=component,
                                                             torch_dtype=dtype, **load, **fusion_options)  # fmt: skip
        return kwargs
    if fusion_options:
        raise ValueError(
            f"{sorted(fusion_options)} apply to a saved fusion; with {members_name}= the members load as given"
        )
    if component in kwargs:
        raise ValueError(f"pass either {component}= (a fusion) or {members_name}= (its members), not both")
    hub_kwargs = {key: kwargs[key] for key in ("cache_dir", "token", "local_files_only", "revision") if key in kwargs}
    member_kwargs = {
        key: kwargs[key] for key in ("torch_dtype", "cache_dir", "token", "local_files_only") if key in kwargs
    }
    if isinstance(member_kwargs.get("torch_dtype"), dict):  # Diffusers' per-component dtypes
        member_kwargs["torch_dtype"] = kwargs["torch_dtype"].get(component, kwargs["torch_dtype"].get("default"))
    base_scheduler = None
    if "scheduler" not in kwargs:
        base_scheduler = dict(
            DDPMScheduler.load_config(pretrained_model_name_or_path, subfolder="scheduler", **hub_kwargs)
        )
    if text_encoder_class is not None and "text_encoder" not in kwargs:
        dtype = kwargs.get("torch_dtype")
        dtype = dtype.get("text_encoder", dtype.get("default")) if isinstance(dtype, dict) else dtype
        kwargs["text_encoder"] = text_encoder_class.from_pretrained(
            pretrained_model_name_or_path, subfolder="text_encoder", use_safetensors=use_safetensors, **hub_kwargs,
            **({"dtype": dtype} if dtype is not None else {}),
        )  # fmt: skip
    base_text_encoder = kwargs.get("text_encoder") if text_encoder_class is not None else None
    kwargs[component] = build_fusion(
        unets, weights, base_text_encoder=base_text_encoder, base_scheduler=base_scheduler,
        use_safetensors=use_safetensors, **member_kwargs,
    )  # fmt: skip
    return kwargs


FUSION_WEIGHTS_DOC = """
            fusion_weights (`list[float]` or `torch.Tensor`, *optional*):
                ScoreFusion: the fusion weights for this call only, shape `(k,)` (or the stored `(num_bins, k)`
                table's shape), on the simplex; or regional weights, per-member masks `(k, H, W)` at the latents' or
                the image's resolution, summing to 1 at every position (docs/barycenter-sampling.md). Defaults to the
                fusion's own weights (`unet.fusion_weights` or `transformer.fusion_weights`).
"""


def _stock_call(cls: type) -> Callable[..., Any]:
    """The `__call__` of the first base of `cls` that is not a ScoreFusion mixin (the stock pipeline's)."""
    for base in cls.__mro__:
        if "__call__" in base.__dict__ and not issubclass(base, ScoreFusionPipelineMixin):
            return base.__dict__["__call__"]
    raise TypeError(f"{cls.__name__} has no stock pipeline __call__ to extend")


def fusion_call(stock_call: Callable[..., Any]) -> Callable[..., Any]:
    """`stock_call` with the keyword `fusion_weights` added: same signature, docstring and return value."""

    @functools.wraps(stock_call)
    def __call__(self, *args: Any, fusion_weights: Optional[WeightsLike] = None, **kwargs: Any) -> Any:
        with self._check_fusion_call(fusion_weights):
            return stock_call(self, *args, **kwargs)

    signature = inspect.signature(stock_call)
    parameters = list(signature.parameters.values())
    position = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters))
    extra = inspect.Parameter("fusion_weights", inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=Optional[WeightsLike])  # fmt: skip
    __call__.__signature__ = signature.replace(parameters=[*parameters[:position], extra, *parameters[position:]])
    __call__.__doc__ = _with_fusion_weights_doc(stock_call.__doc__ or "")
    return __call__


def _with_fusion_weights_doc(doc: str) -> str:
    """The stock docstring with `fusion_weights` documented after the last argument (before `Examples:`/`Returns:`)."""
    match = re.search(r"\n[ \t]*(Examples|Returns):", doc)
    if match is None:
        return doc + FUSION_WEIGHTS_DOC
    return doc[: match.start()].rstrip() + "\n" + FUSION_WEIGHTS_DOC.rstrip("\n") + "\n" + doc[match.start():]


class ScoreFusionPipelineMixin:
    r"""
    What the ScoreFusion pipelines add to a Diffusers pipeline class whose denoiser is a fusion ([`FusedUNet`] as
    `unet`; [`FusedTransformer`] as `transformer` with `ScoreFusionTransformerPipelineMixin`): loading from a base
    model plus members, `fusion_weights=` per call, the scheduler check, fitting, atomic saves. Put it first in the
    bases (`class P(ScoreFusionPipelineMixin, StableDiffusionPipeline)`).
    """

    # The base's text encoder class when members may bring their own (`None`: members share the pipeline's).
    member_text_encoder_class: Optional[type] = None
    # The pipeline component that is the fusion, its class, and the check of the pipeline's scheduler against it.
    fused_component = "unet"
    fusion_class: type = FusedUNet
    scheduler_check = staticmethod(check_scheduler_matches)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        unets: Optional[Sequence[MemberSpec]] = None,
        weights: Optional[WeightsLike] = None,
        **kwargs: Any,
    ):
        r"""
        Loads a saved ScoreFusion pipeline, or builds one from a base model and fine-tuned UNets.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A saved ScoreFusion pipeline, or (with `unets`) a base model (local folder or Hub id) that provides
                the VAE, text encoder(s), tokenizer(s) and scheduler.
            unets (`list`, *optional*):
                The members: modules, local folders or Hub ids of UNets or of whole pipelines (their `unet/` is
                used, with their scheduler and, for Stable Diffusion 1/2, a text encoder that differs from the base's),
                or dicts with `pretrained_model_name_or_path`, `subfolder`, `revision`, `variant`. Members without a
                scheduler of their own get the base's noise schedule.
            weights (`list[float]`, *optional*):
                The fusion weights (uniform by default).
            kwargs: passed to `DiffusionPipeline.from_pretrained`; `torch_dtype`, `cache_dir`, `token`,
                `local_files_only` and `use_safetensors` also apply to the members. Weights load as Diffusers loads
                them: safetensors, or `.bin` files through torch's `weights_only=True` loader (a file that would need
                full unpickling is refused); `allow_pickle=False` reads safetensors only. For a saved fusion pipeline,
                `verify_weights=False` skips the sha256 check of the members and `allow_outside_paths=True` lets it name
                members anywhere (see `FusedUNet.from_pretrained`).
        """
        return cls._from_base(pretrained_model_name_or_path, unets, weights, kwargs)

    @classmethod
    def _fusion_loading_kwargs(cls, pretrained_model_name_or_path, members, weights, kwargs) -> Dict[str, Any]:
        return fusion_loading_kwargs(pretrained_model_name_or_path, members, weights, kwargs,
                                     cls.member_text_encoder_class)  # fmt: skip

    @classmethod
    def _from_base(cls, pretrained_model_name_or_path, members, weights, kwargs: Dict[str, Any]):
        """`DiffusionPipeline.from_pretrained` with the fusion of `members` (if given) as the fused component, under
        the load lock of a ScoreFusion pipeline folder (an interrupted save there is completed first)."""
        with loading_pipeline(pretrained_model_name_or_path, kwargs.get("variant")):
            kwargs = cls._fusion_loading_kwargs(pretrained_model_name_or_path, members, weights, kwargs)
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs: Any) -> None:
        """`DiffusionPipeline.save_pretrained` (same arguments: `safe_serialization`, `variant`, `push_to_hub`, ...),
        crash-safe: after a failure or a crash at any instant the folder holds the complete earlier save or the
        complete new one. Files in the folder that no ScoreFusion pipeline save wrote are left alone."""
        components = [name for name, component in self.components.items() if component is not None]
        save_pipeline(super().save_pretrained, save_directory, components, **kwargs)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Gives each pipeline class a `__call__` with the stock pipeline's own signature plus `fusion_weights`."""
        super().__init_subclass__(**kwargs)
        if "__call__" not in cls.__dict__ and issubclass(cls, DiffusionPipeline):  # not for mixins of the mixin
            cls.__call__ = fusion_call(_stock_call(cls))

    @property
    def fusion_model(self) -> Optional[Any]:
        """The fusion behind the fused component (also when `torch.compile` wrapped it), or `None` for a plain model."""
        denoiser = getattr(self, self.fused_component)
        denoiser = getattr(denoiser, "_orig_mod", denoiser)
        return denoiser if isinstance(denoiser, self.fusion_class) else None

    def _check_fusion_call(self, fusion_weights: Optional[WeightsLike]) -> Any:
        """The fusion weights' context for one call: the override, after the scheduler check; refuses per-call
        weights when the denoiser is not a fusion."""
        fusion = self.fusion_model
        if fusion is None:
            if fusion_weights is not None:
                denoiser = getattr(self, self.fused_component)
                raise TypeError(
                    f"fusion_weights={fusion_weights!r} needs a {self.fusion_class.__name__} as "
                    f"`{self.fused_component}`, got {type(denoiser).__name__}"
                )
            return contextlib.nullcontext()
        self.scheduler_check(fusion, self.scheduler)
        return fusion.override_weights(fusion_weights)

    def fit_weights(
        self,
        images: Any,
        prompts: Union[str, Sequence[str]],
        height: Optional[int] = None,
        width: Optional[int] = None,
        **options: Any,
    ) -> FitResult:
        r"""
        Fits the fusion weights to target images and their captions, and sets them on the fusion (see [`fit_weights`]).

        Args:
            images (PIL images, numpy arrays or tensors): the target images, all of one size; pixel values in [0, 1]
                (tensors in [-1, 1] are also accepted), as for `VaeImageProcessor.preprocess`.
            prompts (`str` or `list[str]`): one caption per image, or one for all.
            height, width (`int`, *optional*): resize to this size first (default: the images' size).
            options: passed to [`fit_weights`] (`num_noise_draws`, `timestep_range`, `generator`, ...), and the
                pipeline's own encoding options where it has some (Flux: `guidance_scale`, `max_sequence_length`).

        Latents are the VAE posterior means (shifted and scaled as the VAE config says); prompts are encoded without
        classifier-free guidance, as the pipeline's `encode_for_fitting` does. The noise schedule is `self.scheduler`'s.
        """
        fusion = self.fusion_model
        if fusion is None:
            denoiser = getattr(self, self.fused_component)
            raise TypeError(
                f"fit_weights needs a {self.fusion_class.__name__} as `{self.fused_component}`, got "
                f"{type(denoiser).__name__}"
            )
        latents, prompt_embeds, computed = self._fitting_inputs(images, prompts, height, width, options)
        clash = sorted(set(computed) & set(options))
        if clash:
            raise ValueError(
                f"{', '.join(clash)} are computed from the images and prompts here; call fitting.fit_weights to pass "
                "your own"
            )
        return fit_weights(fusion, self.scheduler, latents, encoder_hidden_states=prompt_embeds, **computed, **options)


class ScoreFusionPipeline(ScoreFusionPipelineMixin, StableDiffusionPipeline):
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
            `unet.config.prediction_type`. As in Diffusers, a plain `UNet2DConditionModel` (the pipeline then samples
            as `StableDiffusionPipeline` does; `fusion_weights` and `fit_weights` are refused) or `None` (to encode
            prompts alone) also work.
    """

    member_text_encoder_class = CLIPTextModel

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: Union[FusedUNet, UNet2DConditionModel, None],
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: Optional[StableDiffusionSafetyChecker] = None,
        feature_extractor: Optional[CLIPImageProcessor] = None,
        image_encoder: Optional[CLIPVisionModelWithProjection] = None,
        requires_safety_checker: bool = True,
    ):
        check_scheduler_matches(unet, scheduler)
        super().__init__(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=safety_checker, feature_extractor=feature_extractor, image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )  # fmt: skip

    def encode_prompt(
        self,
        prompt: Any,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: Any = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        lora_scale: Optional[float] = None,
        clip_skip: Optional[int] = None,
    ):
        r"""
        `StableDiffusionPipeline.encode_prompt`, once per distinct text encoder of the fusion.

        When members have their own text encoders (`unet.text_encoders`), the encodings by the pipeline's encoder and
        by each member encoder are concatenated along the last dimension; `FusedUNet` hands each member its block.
        """
        args = (device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt)
        slots = getattr(self.unet, "num_encoder_slots", 1)  # a plain UNet or None: 1, the stock encoding
        if slots > 1 and (prompt is None or prompt_embeds is not None or negative_prompt_embeds is not None):
            raise ValueError("members have their own text encoders: pass the prompt as text, not prompt_embeds")
        prompt_embeds, negative_prompt_embeds = super().encode_prompt(
            prompt, *args, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale, clip_skip=clip_skip,
        )  # fmt: skip
        if slots == 1:
            return prompt_embeds, negative_prompt_embeds
        encodings = [(prompt_embeds, negative_prompt_embeds)]
        pipeline_encoder = self.text_encoder
        try:
            for encoder in self.unet.text_encoders:
                object.__setattr__(self, "text_encoder", encoder)  # this call only; the registered component stays
                encodings.append(super().encode_prompt(prompt, *args, lora_scale=lora_scale, clip_skip=clip_skip))
        finally:
            object.__setattr__(self, "text_encoder", pipeline_encoder)
        prompt_embeds = torch.cat([encoding[0] for encoding in encodings], dim=-1)
        if do_classifier_free_guidance:
            negative_prompt_embeds = torch.cat([encoding[1] for encoding in encodings], dim=-1)
        return prompt_embeds, negative_prompt_embeds

    def _fitting_inputs(
        self, images: Any, prompts: Union[str, Sequence[str]], height: Optional[int], width: Optional[int],
        options: Dict[str, Any],
    ):  # fmt: skip
        """`(latents, prompt_embeds, fit_kwargs)` for [`fit_weights`]: [`encode_for_fitting`], no extra UNet inputs."""
        latents, prompt_embeds = encode_for_fitting(self, images, prompts, height=height, width=width)
        return latents, prompt_embeds, {}
