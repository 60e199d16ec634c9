"""Resolving fusion members given as modules, local folders or Hub repo ids."""

import os
from typing import Any, Dict, Optional, Tuple, Union

import diffusers
from diffusers import DDPMScheduler
from torch import nn

# Member classes a config may name; nothing else is ever imported from a config.
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
    load_kwargs.setdefault("use_safetensors", not allow_pickle)
    unet = model_class.from_pretrained(
        source, subfolder=subfolder, variant=member.get("variant"), **hub_kwargs,
        **{key: value for key, value in load_kwargs.items() if key not in hub_kwargs},
    )  # fmt: skip
    return unet, _scheduler_config(source, subfolder, hub_kwargs)
