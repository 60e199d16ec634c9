"""Resolving fusion members given as modules, local folders or Hub repo ids."""

import os
from typing import Any, Dict, Optional, Tuple, Union

import diffusers
import torch
import transformers
from diffusers import DDPMScheduler
from torch import nn

# Classes a config may name; nothing else is ever imported from a config.
MEMBER_CLASSES = ("UNet2DConditionModel", "UNet2DModel")

MemberSpec = Union[str, os.PathLike, nn.Module, Dict[str, Any]]


def _is_pipeline_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "unet", "config.json"))


def _member_location(source: str, subfolder: Optional[str], hub_kwargs: Dict[str, Any]) -> Optional[str]:
    """The subfolder that holds the UNet: given, `unet` for pipeline folders or repos, else the root (`None`)."""
    if subfolder is not None:
        return subfolder or None
    if os.path.isdir(source):
        return "unet" if _is_pipeline_folder(source) else None
    try:  # a Hub repo: a full pipeline has unet/config.json
        diffusers.UNet2DConditionModel.load_config(source, subfolder="unet", **hub_kwargs)
        return "unet"
    except EnvironmentError:
        return None


def _scheduler_config(source: str, unet_subfolder: Optional[str], hub_kwargs: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The member's training scheduler config (`scheduler/` beside its `unet/`), if it has one."""
    if unet_subfolder is None:
        return None
    scheduler_subfolder = os.path.join(os.path.dirname(unet_subfolder.rstrip("/")), "scheduler").lstrip("/")
    try:
        return dict(DDPMScheduler.load_config(source, subfolder=scheduler_subfolder, **hub_kwargs))
    except EnvironmentError:
        return None


def load_member(
    member: MemberSpec, allow_pickle: bool = False, **load_kwargs: Any
) -> Tuple[nn.Module, Optional[Dict[str, Any]]]:
    """Loads one member UNet and, when it comes from a pipeline folder or repo, its scheduler config.

    `member` is a module (used as is), a local path or Hub repo id (a UNet folder, or a pipeline whose `unet/`
    is used), or a dict with `pretrained_model_name_or_path` and optional `subfolder`, `revision`, `variant`.
    Weights load from safetensors only unless `allow_pickle=True`; `load_kwargs` go to `from_pretrained`.
    """
    if isinstance(member, nn.Module):
        return member, None
    if isinstance(member, (str, os.PathLike)):
        member = {"pretrained_model_name_or_path": os.fspath(member)}
    if not isinstance(member, dict) or "pretrained_model_name_or_path" not in member:
        raise TypeError(f"a member must be a module, a path or repo id, or a dict with pretrained_model_name_or_path; got {member!r}")
    unknown = set(member) - {"pretrained_model_name_or_path", "subfolder", "revision", "variant"}
    if unknown:
        raise ValueError(f"unknown keys in member spec {member!r}: {sorted(unknown)}")
    source = member["pretrained_model_name_or_path"]
    hub_kwargs = {key: load_kwargs[key] for key in ("cache_dir", "token", "local_files_only") if key in load_kwargs}
    if member.get("revision") is not None:
        hub_kwargs["revision"] = member["revision"]
    if not os.path.isdir(source) and os.path.exists(source):
        raise ValueError(f"member path {source!r} is a file; expected a UNet folder, a pipeline folder or a Hub repo id")
    subfolder = _member_location(source, member.get("subfolder"), hub_kwargs)
    try:
        config = diffusers.UNet2DConditionModel.load_config(source, subfolder=subfolder, **hub_kwargs)
    except EnvironmentError as error:
        raise ValueError(f"could not find a UNet config for member {source!r} (subfolder={subfolder!r}): {error}") from error
    class_name = config.get("_class_name", "UNet2DConditionModel")
    if class_name not in MEMBER_CLASSES:
        raise ValueError(f"member {source!r} is a {class_name!r}; expected one of {MEMBER_CLASSES}")
    model_class = getattr(diffusers, class_name)
    load_kwargs.setdefault("use_safetensors", None if allow_pickle else True)
    try:
        unet = model_class.from_pretrained(
            source, subfolder=subfolder, variant=member.get("variant"), **hub_kwargs,
            **{key: value for key, value in load_kwargs.items() if key not in hub_kwargs},
        )  # fmt: skip
    except EnvironmentError as error:
        hint = "" if allow_pickle else (
            " If it holds only pickle weights (.bin/.ckpt), pass allow_pickle=True to load them (this unpickles: "
            "only for sources you trust)."
        )  # fmt: skip
        raise ValueError(f"could not load the UNet of {source!r} (subfolder={subfolder!r}): {error}{hint}") from error
    return unet, _scheduler_config(source, subfolder, hub_kwargs)


def member_source(member: MemberSpec) -> Optional[Dict[str, Any]]:
    """Where a member came from, as recorded in reference-only fusion configs (`None` for a module)."""
    if isinstance(member, nn.Module):
        return None
    if isinstance(member, (str, os.PathLike)):
        member = {"pretrained_model_name_or_path": os.fspath(member)}
    keys = ("pretrained_model_name_or_path", "subfolder", "revision", "variant")
    return {key: member.get(key) for key in keys}


TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")


def load_member_text_encoder(
    member: MemberSpec, reference: Optional[nn.Module], **load_kwargs: Any
) -> Optional[nn.Module]:
    """A member's own text encoder: the `text_encoder/` beside its `unet/`, if it differs from `reference`.

    Only members given as pipeline folders or repos can bring one; `None` when absent or equal to `reference`.
    """
    if isinstance(member, nn.Module):
        return None
    spec = {"pretrained_model_name_or_path": os.fspath(member)} if isinstance(member, (str, os.PathLike)) else member
    source = spec["pretrained_model_name_or_path"]
    hub_kwargs = {key: load_kwargs[key] for key in ("cache_dir", "token", "local_files_only") if key in load_kwargs}
    if spec.get("revision") is not None:
        hub_kwargs["revision"] = spec["revision"]
    unet_subfolder = _member_location(source, spec.get("subfolder"), hub_kwargs)
    if unet_subfolder is None or os.path.basename(unet_subfolder.rstrip("/")) != "unet":
        return None
    subfolder = os.path.join(os.path.dirname(unet_subfolder.rstrip("/")), "text_encoder").lstrip("/")
    try:
        config = transformers.PretrainedConfig.get_config_dict(source, subfolder=subfolder, **hub_kwargs)[0]
    except EnvironmentError:
        return None
    class_name = (config.get("architectures") or ["CLIPTextModel"])[0]
    if class_name not in TEXT_ENCODER_CLASSES:
        raise ValueError(f"member {source!r} has a text encoder of class {class_name!r}; expected one of {TEXT_ENCODER_CLASSES}")
    dtype = {"dtype": load_kwargs["torch_dtype"]} if load_kwargs.get("torch_dtype") is not None else {}
    encoder = getattr(transformers, class_name).from_pretrained(
        source, subfolder=subfolder, use_safetensors=None if load_kwargs.get("allow_pickle") else True, **hub_kwargs, **dtype
    )
    return None if reference is not None and same_weights(encoder, reference) else encoder


def same_weights(module: nn.Module, other: nn.Module) -> bool:
    """True when two modules have the same class, parameter names and exactly equal values."""
    if type(module) is not type(other):
        return False
    mine, theirs = module.state_dict(), other.state_dict()
    return mine.keys() == theirs.keys() and all(
        mine[key].shape == theirs[key].shape and torch.equal(mine[key].cpu(), theirs[key].cpu()) for key in mine
    )
