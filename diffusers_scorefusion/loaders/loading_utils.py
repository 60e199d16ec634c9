"""Resolving fusion members (UNets and transformers) given as modules, local folders or Hub repo ids, and loading them
with checks.

Weights load as Diffusers and transformers load them: safetensors, or `.bin` files through torch's
`weights_only=True` loader, which never runs code. A file that would need full unpickling is refused with a sentence
that names it; a member whose file lacks tensors of its class, or holds tensors it does not have, is refused with the
tensors' names (stock Diffusers would leave them on the `meta` device).
"""

import os
from typing import Any, Dict, Optional, Tuple, Union

import diffusers
import torch
import transformers
from diffusers import DDPMScheduler
from torch import nn

from .fusion_config import MEMBER_CLASSES, SOURCE_KEYS, TEXT_ENCODER_CLASSES
from .integrity import UnpicklingRefusedError, needs_unpickling, unpickling_refused

MemberSpec = Union[str, os.PathLike, nn.Module, Dict[str, Any]]
HUB_KEYS = ("cache_dir", "token", "local_files_only")

__all__ = ["MEMBER_CLASSES", "TEXT_ENCODER_CLASSES", "MemberSpec", "load_checked", "load_member",
           "load_member_text_encoder", "load_transformer_member", "member_source", "resolve_use_safetensors",
           "same_weights"]  # fmt: skip


def resolve_use_safetensors(allow_pickle: Optional[bool], use_safetensors: Optional[bool]) -> Optional[bool]:
    """`use_safetensors` for Diffusers and transformers from the package's `allow_pickle` (`None`: as Diffusers).

    `allow_pickle=False` reads safetensors only; `True` or `None` also reads `.bin` files, always with
    `weights_only=True`. Nothing ever unpickles arbitrary objects.
    """
    if allow_pickle is not None and not isinstance(allow_pickle, bool):
        raise TypeError(f"allow_pickle must be True, False or None, got {allow_pickle!r}")
    if use_safetensors is not None and not isinstance(use_safetensors, bool):
        raise TypeError(f"use_safetensors must be True, False or None, got {use_safetensors!r}")
    if allow_pickle is False:
        if use_safetensors is False:
            raise ValueError("allow_pickle=False (safetensors only) contradicts use_safetensors=False (.bin only)")
        return True
    return use_safetensors


def load_checked(model_class: type, source: str, where: str, **kwargs: Any) -> nn.Module:
    """`model_class.from_pretrained(source, **kwargs)` refusing missing or unexpected tensors and pickled objects."""
    try:
        model, info = model_class.from_pretrained(source, output_loading_info=True, **kwargs)
    except Exception as error:  # noqa: BLE001  (Diffusers wraps the refusal of a pickle in several error types)
        if needs_unpickling(error):
            raise unpickling_refused(error, where) from error
        raise
    problems = []
    for key, label in (("missing_keys", "lacks"), ("unexpected_keys", "holds unexpected"),
                       ("mismatched_keys", "has wrongly shaped")):  # fmt: skip
        names = sorted(str(name) for name in (info.get(key) or []))
        if names:
            problems.append(f"{label} tensors {names[:8]}" + (f" and {len(names) - 8} more" if len(names) > 8 else ""))
    if problems:
        raise ValueError(f"{where}: the weights do not fit {model_class.__name__}: they {'; '.join(problems)}")
    return model


def _member_kind(member_class: Optional[type]) -> Tuple[str, str]:
    """`(pipeline folder, what it is called)` of a member: `("unet", "UNet")`, or `("transformer", "transformer")`."""
    return ("unet", "UNet") if member_class is None else ("transformer", "transformer")


def _member_location(
    source: str, subfolder: Optional[str], hub_kwargs: Dict[str, Any], component: str = "unet"
) -> Optional[str]:
    """The subfolder that holds the member: given, `component` (`unet`, `transformer`) for pipeline folders or repos,
    else the root (`None`)."""
    if subfolder is not None:
        return subfolder or None
    if os.path.isdir(source):
        return component if os.path.isfile(os.path.join(source, component, "config.json")) else None
    try:  # a Hub repo: a full pipeline has {component}/config.json
        diffusers.UNet2DConditionModel.load_config(source, subfolder=component, **hub_kwargs)  # any config.json
        return component
    except EnvironmentError:
        return None


def _scheduler_config(
    source: str, member_subfolder: Optional[str], hub_kwargs: Dict[str, Any]
) -> Optional[Dict[str, Any]]:
    """The member's training scheduler config (`scheduler/` beside its `unet/` or `transformer/`), if it has one."""
    if member_subfolder is None:
        return None
    scheduler_subfolder = os.path.join(os.path.dirname(member_subfolder.rstrip("/")), "scheduler").lstrip("/")
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, scheduler_subfolder, "scheduler_config.json")):
        return None  # Diffusers would fall back to a config at the root
    try:
        return dict(DDPMScheduler.load_config(source, subfolder=scheduler_subfolder, **hub_kwargs))
    except EnvironmentError:
        return None


def _read_member_config(
    source: str, subfolder: Optional[str], hub_kwargs: Dict[str, Any], label: str, kind: str
) -> Dict[str, Any]:
    local = os.path.join(source, subfolder) if subfolder else source
    if os.path.isdir(source) and not os.path.isfile(os.path.join(local, "config.json")):
        what = f"folder {subfolder!r} of {source!r}" if subfolder else f"folder {source!r}"
        raise ValueError(f"{label}: the {what} is missing or holds no config.json")
    try:
        config = diffusers.UNet2DConditionModel.load_config(source, subfolder=subfolder, **hub_kwargs)
    except EnvironmentError as error:
        raise ValueError(f"could not find a {kind} config for {label} (subfolder={subfolder!r}): {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{label}: the {kind} config in {source!r} (subfolder={subfolder!r}) is not a JSON object")
    return config


def _member_spec(member: MemberSpec) -> Dict[str, Any]:
    """A member given as a path, repo id or dict, as a checked dict of `SOURCE_KEYS`."""
    if isinstance(member, (str, os.PathLike)):
        member = {"pretrained_model_name_or_path": os.fspath(member)}
    if not isinstance(member, dict) or "pretrained_model_name_or_path" not in member:
        raise TypeError(
            "a member must be a module, a path or repo id, or a dict with pretrained_model_name_or_path; got "
            f"{member!r}"
        )
    unknown = set(member) - set(SOURCE_KEYS)
    if unknown:
        raise ValueError(f"unknown keys in member spec {member!r}: {sorted(unknown)}")
    for key in ("subfolder", "revision", "variant"):
        if member.get(key) is not None and not isinstance(member[key], str):
            raise ValueError(f"member spec {key} must be a string or None, got {member[key]!r}")
    return member


def load_member(
    member: MemberSpec, allow_pickle: Optional[bool] = None, member_class: Optional[type] = None, **load_kwargs: Any
) -> Tuple[nn.Module, Optional[Dict[str, Any]]]:
    """Loads one member (a UNet, or a transformer of `member_class`) and, when it comes from a pipeline folder or repo,
    its scheduler config.

    `member` is a module (used as is), a local path or Hub repo id (a model folder, or a pipeline whose `unet/` or
    `transformer/` is used), or a dict with `pretrained_model_name_or_path` and optional `subfolder`, `revision`,
    `variant`. Without `member_class` the member is a UNet of a class in `MEMBER_CLASSES` (as its config says); with
    it, its config must name `member_class` (a Diffusers transformer). Weights load as in Diffusers (safetensors, or
    `.bin` through `weights_only=True`), with the checks of `load_checked`; `allow_pickle=False` reads safetensors
    only. `load_kwargs` go to `from_pretrained`.
    """
    if isinstance(member, nn.Module):
        return member, None
    member = _member_spec(member)
    component, kind = _member_kind(member_class)
    source = os.fspath(member["pretrained_model_name_or_path"])
    hub_kwargs = {key: load_kwargs[key] for key in HUB_KEYS if key in load_kwargs}
    if member.get("revision") is not None:
        hub_kwargs["revision"] = member["revision"]
    if not os.path.isdir(source) and os.path.exists(source):
        raise ValueError(
            f"member path {source!r} is a file; expected a {kind} folder, a pipeline folder or a Hub repo id"
        )
    subfolder = _member_location(source, member.get("subfolder"), hub_kwargs, component)
    label = f"member {source!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    config = _read_member_config(source, subfolder, hub_kwargs, label, kind)
    if member_class is None:
        class_name = config.get("_class_name", "UNet2DConditionModel")
        if class_name not in MEMBER_CLASSES:
            raise ValueError(f"{label} is a {class_name!r}; expected one of {MEMBER_CLASSES}")
        member_class = getattr(diffusers, class_name)
    elif config.get("_class_name") != member_class.__name__:
        raise ValueError(f"{label} is a {config.get('_class_name')!r}; expected a {member_class.__name__}")
    load_kwargs = {key: value for key, value in load_kwargs.items() if key not in hub_kwargs}
    load_kwargs["use_safetensors"] = resolve_use_safetensors(allow_pickle, load_kwargs.get("use_safetensors"))
    try:
        model = load_checked(member_class, source, label, subfolder=subfolder, variant=member.get("variant"),
                             **hub_kwargs, **load_kwargs)  # fmt: skip
    except UnpicklingRefusedError:
        raise
    except EnvironmentError as error:
        hint = " (only safetensors were read: allow_pickle=False or use_safetensors=True)" if load_kwargs[
            "use_safetensors"] else ""  # fmt: skip
        raise ValueError(f"could not load the {kind} of {label}{hint}: {error}") from error
    return model, _scheduler_config(source, subfolder, hub_kwargs)


def load_transformer_member(
    member: MemberSpec, transformer_class: type, allow_pickle: Optional[bool] = None, **load_kwargs: Any
) -> Tuple[nn.Module, Optional[Dict[str, Any]]]:
    """`load_member` for a transformer of `transformer_class` (a pipeline's `transformer/`, a transformer folder or a
    Hub repo id; the member's config must name `transformer_class`)."""
    return load_member(member, allow_pickle=allow_pickle, member_class=transformer_class, **load_kwargs)


def member_source(member: MemberSpec) -> Optional[Dict[str, Any]]:
    """Where a member came from, as recorded in reference-only fusion configs (`None` for a module)."""
    if isinstance(member, nn.Module):
        return None
    if isinstance(member, (str, os.PathLike)):
        member = {"pretrained_model_name_or_path": os.fspath(member)}
    return {key: (os.fspath(member[key]) if key == SOURCE_KEYS[0] else member.get(key)) for key in SOURCE_KEYS}


def load_text_encoder(
    class_name: str, source: str, subfolder: Optional[str], where: str, torch_dtype: Any = None,
    allow_pickle: Optional[bool] = None, variant: Optional[str] = None, **hub_kwargs: Any,
) -> nn.Module:  # fmt: skip
    """A CLIP text encoder of a recorded class, loaded with the checks of `load_checked`."""
    if class_name not in TEXT_ENCODER_CLASSES:
        raise ValueError(f"{where} records class {class_name!r}; expected one of {TEXT_ENCODER_CLASSES}")
    dtype = {"dtype": torch_dtype} if torch_dtype is not None else {}
    use_safetensors = resolve_use_safetensors(allow_pickle, hub_kwargs.pop("use_safetensors", None))
    variant_kwargs = {"variant": variant} if variant is not None else {}
    return load_checked(getattr(transformers, class_name), source, where, subfolder=subfolder,
                        use_safetensors=use_safetensors, **variant_kwargs, **hub_kwargs, **dtype)  # fmt: skip


def load_member_text_encoder(
    member: MemberSpec, reference: Optional[nn.Module], **load_kwargs: Any
) -> Optional[nn.Module]:
    """A member's own text encoder: the `text_encoder/` beside its `unet/`, if it differs from `reference`.

    Only members given as pipeline folders or repos can bring one; `None` when absent or equal to `reference`.
    """
    if isinstance(member, nn.Module):
        return None
    spec = {"pretrained_model_name_or_path": os.fspath(member)} if isinstance(member, (str, os.PathLike)) else member
    source = os.fspath(spec["pretrained_model_name_or_path"])
    hub_kwargs = {key: load_kwargs[key] for key in HUB_KEYS if key in load_kwargs}
    if spec.get("revision") is not None:
        hub_kwargs["revision"] = spec["revision"]
    unet_subfolder = _member_location(source, spec.get("subfolder"), hub_kwargs)
    if unet_subfolder is None or os.path.basename(unet_subfolder.rstrip("/")) != "unet":
        return None
    subfolder = os.path.join(os.path.dirname(unet_subfolder.rstrip("/")), "text_encoder").lstrip("/")
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, subfolder, "config.json")):
        return None
    try:
        config = transformers.PretrainedConfig.get_config_dict(source, subfolder=subfolder, **hub_kwargs)[0]
    except EnvironmentError:
        return None
    architectures = config.get("architectures") or ["CLIPTextModel"]
    class_name = architectures[0] if isinstance(architectures, list) else architectures
    encoder = load_text_encoder(
        class_name, source, subfolder, f"the text encoder of member {source!r}", load_kwargs.get("torch_dtype"),
        load_kwargs.get("allow_pickle"), use_safetensors=load_kwargs.get("use_safetensors"), **hub_kwargs,
    )  # fmt: skip
    return None if reference is not None and same_weights(encoder, reference) else encoder


def same_weights(module: nn.Module, other: nn.Module) -> bool:
    """True when two modules have the same class, parameter names and exactly equal values."""
    if type(module) is not type(other):
        return False
    mine, theirs = module.state_dict(), other.state_dict()
    return mine.keys() == theirs.keys() and all(
        mine[key].shape == theirs[key].shape and torch.equal(mine[key].cpu(), theirs[key].cpu()) for key in mine
    )
