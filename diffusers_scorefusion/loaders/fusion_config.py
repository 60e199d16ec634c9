"""The schema of a fusion folder's `config.json`, in one place: saving checks what it writes with it, loading checks
every key of every entry with it before anything is loaded. One schema for both fusion classes: `FusedUNet` configs
(`_class_name` "FusedUNet") and `FusedTransformer` configs ("FusedTransformer") share the weights, members and LoRA
bases; a `FusedUNet` adds prediction types, a DDPM noise schedule and member text encoders, a `FusedTransformer` its
`member_class` and a flow-matching schedule.

Only JSON values are read; the class names a config may record are the classes this package instantiates.
"""

import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import diffusers
from diffusers.models.modeling_utils import ModelMixin
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..fusion.fusion_utils import PREDICTION_TYPES, check_bin_edges
from ..fusion.member_utils import (
    INTERFACE_KEYS,
    NOISE_SCHEDULE_KEYS,
    check_noise_schedule,
    flow_schedule_of,
    noise_schedule_of,
)
from ..fusion.regional_utils import check_weights_or_masks
from .atomic_save import is_entry_name

CONFIG_NAME = "config.json"
FUSED_UNET, FUSED_TRANSFORMER = "FusedUNet", "FusedTransformer"
CLASS_NAMES = (FUSED_UNET, FUSED_TRANSFORMER)
NONE = type(None)
# Top-level keys of a FusedUNet config besides the members' interface and shared config, which it mirrors.
FUSION_KEYS: Dict[str, Tuple[type, ...]] = {
    "num_members": (int,),
    "weights": (list,),
    "timestep_bin_edges": (list, NONE),
    "prediction_type": (str,),
    "member_prediction_types": (list,),
    "noise_schedule": (dict, NONE),
    "member_encoder_slots": (list, NONE),
    "weights_provenance": (dict, NONE),
    "members": (list,),
    "text_encoders": (list,),
    "lora_bases": (list,),
}
# Top-level keys of a FusedTransformer config besides the members' config, which it mirrors.
TRANSFORMER_FUSION_KEYS: Dict[str, Tuple[type, ...]] = {
    "num_members": (int,),
    "weights": (list,),
    "timestep_bin_edges": (list, NONE),
    "member_class": (str,),
    "noise_schedule": (dict, NONE),
    "weights_provenance": (dict, NONE),
    "members": (list,),
    "lora_bases": (list,),
}
FLOW_SCHEDULE_KEYS = ("num_train_timesteps", "shift")
PRIVATE_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")
SOURCE_KEYS = ("pretrained_model_name_or_path", "subfolder", "revision", "variant")
MEMBER_KEYS: Dict[str, Tuple[type, ...]] = {
    "class_name": (str,), "config": (dict,), "pretrained_model_name_or_path": (str, NONE), "subfolder": (str, NONE),
    "revision": (str, NONE), "variant": (str, NONE), "lora": (dict,), "sha256": (dict,),
}  # fmt: skip
MEMBER_REQUIRED = ("class_name", "config", "pretrained_model_name_or_path", "subfolder", "revision", "variant")
LORA_KEYS: Dict[str, Tuple[type, ...]] = {"base": (int,), "adapter_name": (str,)}
TEXT_ENCODER_KEYS: Dict[str, Tuple[type, ...]] = {"class_name": (str,), "subfolder": (str,), "member": (int,),
                                                   "variant": (str, NONE), "sha256": (dict,)}  # fmt: skip
LORA_BASE_KEYS: Dict[str, Tuple[type, ...]] = {"subfolder": (str,), "variant": (str, NONE), "sha256": (dict,)}
# The member classes a FusedUNet can save and load (nothing else is ever instantiated from a config); a
# FusedTransformer's are Diffusers' transformer models (`transformer_member_class`).
MEMBER_CLASSES = ("UNet2DConditionModel", "UNet2DModel")
SAVED_MEMBER_CLASSES = MEMBER_CLASSES + ("LoraMember",)
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
TRANSFORMER_MODULE_PREFIX = "diffusers.models.transformers."
SHA256 = re.compile(r"[0-9a-f]{64}")
CLASS_IDENTIFIER = re.compile(r"[A-Z][A-Za-z0-9]*")


def transformer_member_class(name: Any) -> Optional[type]:
    """The Diffusers transformer model class called `name` (`FluxTransformer2DModel`, `SD3Transformer2DModel`, ...), or
    `None` when `name` is not one: a `ModelMixin` that `diffusers` exports under that name from its
    `diffusers.models.transformers` package. These are the classes a `FusedTransformer` config may record."""
    if not isinstance(name, str) or not CLASS_IDENTIFIER.fullmatch(name):
        return None
    try:
        model_class = getattr(diffusers, name)
    except (AttributeError, ImportError, RuntimeError):  # not a Diffusers name, or one whose extras are missing
        return None
    is_transformer = isinstance(model_class, type) and issubclass(model_class, ModelMixin)
    if not is_transformer or not model_class.__module__.startswith(TRANSFORMER_MODULE_PREFIX):
        return None
    return model_class if model_class.__name__ == name else None


def _type_names(types: Tuple[type, ...]) -> str:
    return " or ".join("null" if kind is NONE else kind.__name__ for kind in types)


def check_entry(entry: Any, schema: Dict[str, Tuple[type, ...]], where: str, required: Sequence[str] = ()) -> None:
    """An entry is a dict whose keys are in `schema`, with values of the listed JSON types (booleans are not ints)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(entry).__name__} {entry!r:.100}")
    unknown = sorted(set(entry) - set(schema))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; allowed: {sorted(schema)}")
    missing = [key for key in required if key not in entry]
    if missing:
        raise ValueError(f"{where} is missing the keys {missing}")
    for key, value in entry.items():
        types = schema[key]
        if not isinstance(value, types) or (isinstance(value, bool) and int in types and bool not in types):
            raise ValueError(f"{where}: {key} must be {_type_names(types)}, got {type(value).__name__} {value!r:.100}")


def check_subfolder(value: Optional[str], where: str, single: bool = False) -> None:
    """A relative path inside the folder: never absolute, never `..`; with `single`, one plain name."""
    if value is None:
        return
    if not isinstance(value, str):
        raise ValueError(f"{where}: subfolder must be a string or null, got {type(value).__name__} {value!r}")
    if single:
        if not is_entry_name(value):
            raise ValueError(f"{where}: subfolder must be a plain folder name inside the fusion folder, got {value!r}")
        return
    parts = value.replace("\\", "/").split("/")
    if os.path.isabs(value) or value.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", value) or ".." in parts:
        raise ValueError(f"{where}: subfolder must be a relative path without '..', got {value!r}")


def check_source(value: str, where: str, folder: Optional[str], allow_outside_paths: bool) -> None:
    """Where a reference-only member may point: a config from the Hub (`folder=None`) names Hub repo ids only; a local
    one names Hub repo ids or paths inside or beside its folder, unless `allow_outside_paths`."""
    if not value:
        raise ValueError(f"{where}: pretrained_model_name_or_path must not be empty")
    looks_local = os.path.isabs(value) or value.startswith((".", "~")) or os.path.exists(value)
    if folder is None:
        if looks_local:
            raise ValueError(
                f"{where} names {value!r}, a local path; a fusion config from the Hub may only name Hub repo ids"
            )
    elif looks_local:
        if allow_outside_paths:
            return
        base = os.path.dirname(os.path.realpath(folder))
        real = os.path.realpath(os.path.expanduser(value))
        if os.path.commonpath([real, base]) != base:
            raise ValueError(
                f"{where} names {value!r}, outside {base!r} (the fusion folder's parent); pass "
                "allow_outside_paths=True to load members from anywhere if you trust this config"
            )
        return
    try:
        validate_repo_id(value)
    except HFValidationError as error:
        raise ValueError(f"{where} names {value!r}, neither an existing local path nor a Hub repo id") from error


def check_digests(digests: Dict[str, Any], where: str) -> None:
    for name, digest in digests.items():
        if not is_entry_name(name) or not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise ValueError(f"{where}: sha256 must map file names to 64 hex digits, got {name!r}: {digest!r:.80}")


def _check_members(config: Dict[str, Any], where: str, folder: Optional[str], allow_outside_paths: bool,
                   check_paths: bool, member_classes: Sequence[str]) -> None:  # fmt: skip
    allowed = tuple(member_classes) + ("LoraMember",)
    for i, member in enumerate(config["members"]):
        entry = f"{where}: members[{i}]"
        check_entry(member, MEMBER_KEYS, entry, MEMBER_REQUIRED)
        if member["class_name"] not in allowed:
            raise ValueError(f"{entry} records class {member['class_name']!r}; expected one of {allowed}")
        check_digests(member.get("sha256", {}), entry)
        source = member["pretrained_model_name_or_path"]
        check_subfolder(member["subfolder"], entry, single=source is None)
        if source is None:
            if member["subfolder"] is None:
                raise ValueError(f"{entry} names neither a subfolder of the fusion nor a pretrained_model_name_or_path")
        elif check_paths:
            check_source(source, entry, folder, allow_outside_paths)
        if (member["class_name"] == "LoraMember") != ("lora" in member):
            raise ValueError(f"{entry}: a 'lora' entry goes with class LoraMember, got class {member['class_name']!r}")
        if "lora" in member:
            check_entry(member["lora"], LORA_KEYS, f"{entry}.lora", ("base",))
            if source is not None or not 0 <= member["lora"]["base"] < len(config["lora_bases"]):
                raise ValueError(
                    f"{entry}.lora must name a base index below {len(config['lora_bases'])} of a self-contained "
                    f"fusion, got {member['lora']!r}"
                )


def _check_text_encoders(config: Dict[str, Any], where: str) -> None:
    num_encoders, slots = len(config["text_encoders"]), config["member_encoder_slots"]
    for j, encoder in enumerate(config["text_encoders"]):
        entry = f"{where}: text_encoders[{j}]"
        check_entry(encoder, TEXT_ENCODER_KEYS, entry, ("class_name",))
        if encoder["class_name"] not in TEXT_ENCODER_CLASSES:
            raise ValueError(f"{entry} records class {encoder['class_name']!r}; expected one of {TEXT_ENCODER_CLASSES}")
        if ("subfolder" in encoder) == ("member" in encoder):
            raise ValueError(
                f"{entry} must have exactly one of 'subfolder' (saved here) and 'member' (beside a member)"
            )
        check_subfolder(encoder.get("subfolder"), entry, single=True)
        if "member" in encoder and not 0 <= encoder["member"] < config["num_members"]:
            raise ValueError(
                f"{entry}: member must be a member index below {config['num_members']}, got {encoder['member']}"
            )
        check_digests(encoder.get("sha256", {}), entry)
    if slots is None:
        if num_encoders:
            raise ValueError(f"{where} has {num_encoders} text_encoders but no member_encoder_slots to assign them")
        return
    if len(slots) != config["num_members"] or not all(isinstance(s, int) and not isinstance(s, bool) for s in slots):
        raise ValueError(f"{where}: member_encoder_slots must hold {config['num_members']} ints, got {slots!r}")
    if any(not 0 <= slot <= num_encoders for slot in slots) or set(range(1, num_encoders + 1)) - set(slots):
        raise ValueError(
            f"{where}: member_encoder_slots must use each of the {num_encoders} text encoders (slots 1..{num_encoders};"
            f" 0 for the pipeline's), got {slots!r}"
        )


def _check_unet_keys(config: Dict[str, Any], where: str) -> Tuple[str, ...]:
    """The keys only a FusedUNet config has; returns its member classes."""
    named_types = [("prediction_type", config["prediction_type"])]
    named_types += [(f"member_prediction_types[{i}]", kind) for i, kind in enumerate(config["member_prediction_types"])]
    for key, value in named_types:
        if not isinstance(value, str) or value not in PREDICTION_TYPES:
            raise ValueError(f"{where}: {key} must be one of {PREDICTION_TYPES}, got {value!r}")
    if config["noise_schedule"] is not None:
        schedule = config["noise_schedule"]
        check_entry(schedule, {key: (object,) for key in NOISE_SCHEDULE_KEYS}, f"{where}: noise_schedule",
                    NOISE_SCHEDULE_KEYS)  # fmt: skip
        check_noise_schedule(noise_schedule_of(schedule), f"{where}: noise_schedule")
    return MEMBER_CLASSES


def flow_schedule_config(schedule: Dict[str, Any]) -> Dict[str, Any]:
    """A saved flow schedule as the scheduler config that `FusedTransformer(member_schedulers=...)` reads it from."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", **schedule}


def _check_transformer_keys(config: Dict[str, Any], where: str) -> Tuple[str, ...]:
    """The keys only a FusedTransformer config has; returns its member classes (its `member_class`)."""
    if transformer_member_class(config["member_class"]) is None:
        raise ValueError(
            f"{where}: member_class {config['member_class']!r} is not a Diffusers transformer model (a class of "
            "diffusers.models.transformers, e.g. 'FluxTransformer2DModel')"
        )
    if config["noise_schedule"] is not None:
        schedule, name = config["noise_schedule"], f"{where}: noise_schedule"
        check_entry(schedule, {"num_train_timesteps": (int,), "shift": (float, int)}, name, FLOW_SCHEDULE_KEYS)
        try:
            flow_schedule_of(flow_schedule_config(schedule))
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error
    return (config["member_class"],)


def check_fusion_config(
    config: Any,
    where: str,
    folder: Optional[str] = None,
    allow_outside_paths: bool = False,
    check_paths: bool = True,
    class_name: Optional[str] = None,
) -> None:
    r"""
    Validates a fusion config (every key of every entry) and raises a `ValueError` that names the key.

    Args:
        config: the parsed `config.json`.
        where (`str`): how messages name it.
        folder (`str`, *optional*): the local folder it was read from; `None` for a Hub repo (members may then only
            name Hub repo ids).
        allow_outside_paths (`bool`): let reference-only members name local paths outside the folder's parent.
        check_paths (`bool`): `False` when saving (the paths are the caller's own).
        class_name (`str`, *optional*): the fusion class expected (`"FusedUNet"` or `"FusedTransformer"`); either
            when `None`.
    """
    if not isinstance(config, dict):
        raise ValueError(f"{where} must be a JSON object, got a JSON {type(config).__name__}")
    found = config.get("_class_name")
    expected = (class_name,) if class_name is not None else CLASS_NAMES
    if found not in expected:
        hint = f"; load it with {found}.from_pretrained" if found in CLASS_NAMES else ""
        raise ValueError(f"{where} is not a {' or '.join(expected)} config (_class_name={found!r}){hint}")
    keys = FUSION_KEYS if found == FUSED_UNET else TRANSFORMER_FUSION_KEYS
    for key, types in keys.items():
        if key not in config:
            raise ValueError(f"{where} is missing the key {key!r}")
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ValueError(f"{where}: {key} must be {_type_names(types)}, got {type(value).__name__} {value!r:.100}")
    members = config["members"]
    allowed = set(keys) | set(PRIVATE_KEYS) | (set(INTERFACE_KEYS) if found == FUSED_UNET else set())
    if members and isinstance(members[0], dict) and isinstance(members[0].get("config"), dict):
        allowed |= set(members[0]["config"])  # the members' shared config, mirrored (recomputed on load)
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}")
    num_members = config["num_members"]
    if num_members < 1:
        raise ValueError(f"{where}: num_members must be >= 1, got {num_members}")
    for key in ("members", "member_prediction_types") if found == FUSED_UNET else ("members",):
        if len(config[key]) != num_members:
            raise ValueError(f"{where}: {key} has {len(config[key])} entries but num_members is {num_members}")
    member_classes = (_check_unet_keys if found == FUSED_UNET else _check_transformer_keys)(config, where)
    table = check_weights_or_masks(config["weights"], num_members)  # (num_bins, k) or masks (num_bins, k, H, W)
    if config["timestep_bin_edges"] is not None:
        check_bin_edges(config["timestep_bin_edges"], table.shape[0])
    elif table.shape[0] > 1:
        raise ValueError(f"{where}: weights with {table.shape[0]} rows need timestep_bin_edges")
    _check_members(config, where, folder, allow_outside_paths, check_paths, member_classes)
    if found == FUSED_UNET:
        _check_text_encoders(config, where)
    for b, base in enumerate(config["lora_bases"]):
        check_entry(base, LORA_BASE_KEYS, f"{where}: lora_bases[{b}]", ("subfolder",))
        check_subfolder(base["subfolder"], f"{where}: lora_bases[{b}]", single=True)
        check_digests(base.get("sha256", {}), f"{where}: lora_bases[{b}]")


def saved_entries(config: Dict[str, Any]) -> Optional[list]:
    """The folder entries a self-contained save wrote (`SaveKind.entries_of`), or `None` if not a fusion config (of
    either class: a fusion folder may hold either)."""
    if config.get("_class_name") not in CLASS_NAMES:
        return None
    names = []
    unet = config["_class_name"] == FUSED_UNET
    for key in ("members", "text_encoders", "lora_bases") if unet else ("members", "lora_bases"):
        entries = config.get(key)
        if not isinstance(entries, list):
            return None
        for entry in entries:
            if not isinstance(entry, dict):
                return None
            if entry.get("pretrained_model_name_or_path") is None and entry.get("subfolder") is not None:
                names.append(entry["subfolder"])
    return names
