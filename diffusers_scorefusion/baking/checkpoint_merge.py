"""One plain model from a fusion of full fine-tunes of one architecture: parameters ``sum_i lambda_i theta_i``
(`fusion/merge_utils.py`), saved with `save_pretrained`, alone or as the stock pipeline with the base's other parts."""

import os
from typing import Any, List, Optional, Union

import torch
from torch import nn

from ..fusion.fusion_utils import WeightsLike
from ..fusion.member_utils import is_lora_member, public_config
from ..fusion.merge_utils import first_differing_parameter, weighted_parameter_sum
from .bake_saving import save_baked
from .lora_merge import fusion_weights_row


def _check_mergeable(fused: nn.Module) -> List[nn.Module]:
    """The members, refusing LoRA members, member text encoders, mixed classes, prediction types, parameters and
    configs (each with a sentence naming the first difference)."""
    members = list(fused.fusion_members)
    if any(is_lora_member(member) for member in members):
        raise ValueError("the members are LoRA adapters of one base (from_lora): merge them with merge_lora, which "
                         "writes one LoRA; merge_checkpoints merges full fine-tunes")  # fmt: skip
    slots = getattr(fused.config, "member_encoder_slots", None) or []
    own = [i for i, slot in enumerate(slots) if slot]
    if own:
        raise ValueError(f"member {own[0]} has its own text encoder: a merged checkpoint runs with one text encoder, "
                         "so members with their own encoders cannot be merged")  # fmt: skip
    for i, member in enumerate(members):
        if type(member) is not type(members[0]):
            raise ValueError(f"the members do not share one architecture: member 0 is a {type(members[0]).__name__}, "
                             f"member {i} a {type(member).__name__}")  # fmt: skip
    if not hasattr(members[0], "from_config") or not hasattr(members[0], "save_pretrained"):
        raise TypeError(f"the members are {type(members[0]).__name__}s, which are not Diffusers models (no "
                        "from_config / save_pretrained)")  # fmt: skip
    types = list(getattr(fused.config, "member_prediction_types", None) or [])
    if len(set(types)) > 1:
        raise ValueError(f"the members predict {types}: merging the parameters of models with different prediction "
                         "types does not give a model of either type")  # fmt: skip
    differing = first_differing_parameter([member.state_dict() for member in members])
    if differing is not None:
        raise ValueError(f"the members do not share one architecture: {differing}")
    configs = [public_config(member.config) for member in members]
    for i, config in enumerate(configs[1:], start=1):
        key = next((key for key in sorted(set(config) | set(configs[0])) if config.get(key) != configs[0].get(key)),
                   None)  # fmt: skip
        if key is not None:
            raise ValueError(f"the members do not share one architecture: config {key!r} is {configs[0].get(key)!r} "
                             f"in member 0 and {config.get(key)!r} in member {i}")  # fmt: skip
    return members


def merge_checkpoints(fused: nn.Module, weights: Optional[WeightsLike] = None, row: Optional[int] = None) -> nn.Module:
    r"""
    A plain model of the members' class (e.g. `UNet2DConditionModel`) with parameters ``sum_i lambda_i theta_i``.

    Args:
        fused (`FusedUNet` or `FusedTransformer`): a fusion of full fine-tunes of one architecture.
        weights (`list[float]`, *optional*): the weights to merge; defaults to the fusion's.
        row (`int`, *optional*): for weights over timestep bins (which one merged model cannot follow), the bin whose
            weights to merge. Without it such a table is refused.

    The model is on member 0's device and dtype; the sum is accumulated in float64.
    """
    members = _check_mergeable(fused)
    merged_weights = fusion_weights_row(fused, weights, row, lora=False)
    state_dict = weighted_parameter_sum([member.state_dict() for member in members], merged_weights)
    first = members[0]
    model = type(first).from_config(first.config)
    model.load_state_dict(state_dict)
    parameter = next(first.parameters())
    model.to(parameter.device)
    if parameter.dtype != torch.float32:
        model.to(parameter.dtype)
    return model.eval()


def stock_pipeline_class(pipe: Any) -> type:
    """The Diffusers pipeline class a ScoreFusion pipeline extends (e.g. `StableDiffusionPipeline`)."""
    from diffusers import DiffusionPipeline

    for cls in type(pipe).__mro__:
        stock = cls.__module__.startswith("diffusers.") and issubclass(cls, DiffusionPipeline)
        if stock and cls is not DiffusionPipeline:
            return cls
    raise TypeError(f"{type(pipe).__name__} extends no Diffusers pipeline class")


def save_merged_checkpoint(
    model: nn.Module, save_directory: Union[str, os.PathLike], pipeline: Any = None, record: Optional[dict] = None
) -> List[str]:
    r"""
    Writes a merged model crash-safe with `save_pretrained`, beside `bake.json`.

    Args:
        pipeline (`DiffusionPipeline`, *optional*): a pipeline (e.g. the fusion's `ScoreFusionPipeline`) whose other
            components to save with the model: the folder is then the stock pipeline (`StableDiffusionPipeline`, ...)
            with `model` as its denoiser, loadable with `DiffusionPipeline.from_pretrained`.

    Returns:
        The entries written (besides `bake.json`).
    """
    if pipeline is None:
        entries = ["config.json"]

        def write(staging: str) -> None:
            model.save_pretrained(staging)
    else:
        stock = stock_pipeline_class(pipeline)
        denoiser = getattr(pipeline, "fused_component", "unet")
        expected, optional = stock._get_signature_keys(stock)
        components = {**pipeline.components, denoiser: model}
        stock_pipe = stock(**{key: value for key, value in components.items() if key in set(expected) | set(optional)})
        entries = ["model_index.json", denoiser]

        def write(staging: str) -> None:
            stock_pipe.save_pretrained(staging)

    info = {"kind": "merged checkpoint", "model_class": type(model).__name__, **(record or {})}
    if pipeline is not None:
        info["pipeline_class"] = stock.__name__
    save_baked(os.fspath(save_directory), write, entries, info)
    return entries
