"""What the transformer ScoreFusion pipelines (SD3, Flux) share: members loaded by path or Hub id, the fusion as the
`transformer` component, the flow-matching scheduler check, and fitting defaults."""

import functools
import os
from typing import Any, Dict, Optional, Sequence, Union

from torch import nn

from ..fusion.fusion_utils import WeightsLike
from ..loaders.loading_utils import MemberSpec, load_transformer_member, member_source
from ..models.modeling_fused_transformer import FusedTransformer, check_scheduler_matches_transformer
from .pipeline_score_fusion import ScoreFusionPipelineMixin, fusion_loading_kwargs


def build_fused_transformer(
    transformers: Sequence[MemberSpec],
    weights: Optional[WeightsLike] = None,
    transformer_class: type = nn.Module,
    allow_pickle: Optional[bool] = None,
    base_text_encoder: None = None,
    base_scheduler: Optional[Dict[str, Any]] = None,
    **load_kwargs: Any,
) -> FusedTransformer:
    """A `FusedTransformer` from modules, local folders or Hub ids; members without a scheduler of their own (loaded
    from a pipeline folder or repo) get `base_scheduler` (fine-tunes of the base model)."""
    if isinstance(transformers, (str, os.PathLike, nn.Module, dict)) or len(transformers) == 0:
        raise ValueError(f"transformers must be a non-empty list of members, got {transformers!r:.200}")
    loaded = [load_transformer_member(member, transformer_class, allow_pickle=allow_pickle, **load_kwargs)
              for member in transformers]  # fmt: skip
    schedulers = [base_scheduler if scheduler is None else scheduler for _, scheduler in loaded]
    declared = [scheduler is not None for scheduler in schedulers]
    if any(declared) and not all(declared):
        missing = [i for i, has in enumerate(declared) if not has]
        raise ValueError(
            f"members {missing} come without a scheduler config while others have one: give every member as a "
            "pipeline folder (with scheduler/), or none, so their flow schedules can be compared"
        )
    fused = FusedTransformer([model for model, _ in loaded], weights=weights,
                             member_schedulers=schedulers if all(declared) else None)  # fmt: skip
    fused.member_sources = [member_source(member) for member in transformers]
    return fused


class ScoreFusionTransformerPipelineMixin(ScoreFusionPipelineMixin):
    r"""
    [`ScoreFusionPipelineMixin`] for pipelines whose denoiser is a [`FusedTransformer`] as `transformer`: members given
    as `transformers=`, the flow-matching scheduler check, and the member class the pipeline calls
    (`transformer_class`). Put it first in the bases.
    """

    fused_component = "transformer"
    fusion_class = FusedTransformer
    scheduler_check = staticmethod(check_scheduler_matches_transformer)
    # The Diffusers transformer class the pipeline's members must be (set by each pipeline).
    transformer_class: type = nn.Module

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        transformers: Optional[Sequence[MemberSpec]] = None,
        weights: Optional[WeightsLike] = None,
        **kwargs: Any,
    ):
        r"""
        Builds the pipeline from a base model and fine-tuned transformers.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A base model (local folder or Hub id) that provides the VAE, text encoders, tokenizers and scheduler.
            transformers (`list`, *optional*):
                The members: modules, local folders or Hub ids of transformers or of whole pipelines (their
                `transformer/` is used, with their scheduler), or dicts with `pretrained_model_name_or_path`,
                `subfolder`, `revision`, `variant`. Members without a scheduler of their own get the base's. For LoRA
                fine-tunes build the fusion with [`FusedTransformer.from_lora`] and pass it as `transformer=`.
            weights (`list[float]`, *optional*):
                The fusion weights (uniform by default).
            kwargs: passed to `DiffusionPipeline.from_pretrained`; `torch_dtype`, `cache_dir`, `token` and
                `local_files_only` also apply to the members. Weights load from safetensors only unless
                `allow_pickle=True`.
        """
        if "unets" in kwargs:
            raise TypeError(f"{cls.__name__} fuses transformers: pass transformers=, not unets=")
        return cls._from_base(pretrained_model_name_or_path, transformers, weights, kwargs)

    @classmethod
    def _fusion_loading_kwargs(cls, pretrained_model_name_or_path, members, weights, kwargs) -> Dict[str, Any]:
        build = functools.partial(build_fused_transformer, transformer_class=cls.transformer_class)
        return fusion_loading_kwargs(pretrained_model_name_or_path, members, weights, kwargs, component="transformer",
                                     build_fusion=build, fusion_class=FusedTransformer)  # fmt: skip

    @classmethod
    def check_fused_transformer(cls, transformer: Any, scheduler: Any) -> None:
        """Refuses a `transformer` that is neither a fusion of `transformer_class` members nor a plain
        `transformer_class` (or `None`), and a scheduler the fusion cannot sample with.

        As in Diffusers, a plain transformer samples as the stock pipeline does (`fusion_weights` and `fit_weights`
        are then refused), and `None` leaves prompt encoding alone.
        """
        name, expected = cls.__name__, cls.transformer_class.__name__
        model = getattr(transformer, "_orig_mod", transformer)  # `torch.compile` wraps it
        if model is None or isinstance(model, cls.transformer_class):
            return
        if not isinstance(model, FusedTransformer):
            raise TypeError(
                f"{name} needs a FusedTransformer of {expected} members (or a plain {expected}) as `transformer`, got "
                f"{type(model).__name__}; build one with FusedTransformer([...]), FusedTransformer.from_lora(...) or "
                f"{name}.from_pretrained(base, transformers=[...])"
            )
        if model.config.member_class != expected:
            raise ValueError(f"{name} calls {expected} members, got a fusion of {model.config.member_class}")
        check_scheduler_matches_transformer(model, scheduler)
