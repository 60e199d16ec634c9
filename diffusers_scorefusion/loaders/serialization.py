"""Saving and loading fusions: self-contained folders, reference-only weight configs, atomic writes.

A fusion folder (local, or a Hub repo) holds `config.json` (the `FusedUNet` config plus a `members` list). In the
self-contained layout each member is a standard Diffusers UNet folder `member_{i}/` (usable on its own) and each
distinct member text encoder a transformers folder `text_encoder_{j}/`. In the reference-only layout `members`
names each member's repo id or path, subfolder, revision and variant, and loading fetches them. Only JSON is read
from a config; weights load from safetensors unless `allow_pickle=True`; no code from a config is ever run.
"""

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import transformers
from torch import nn

from .loading_utils import TEXT_ENCODER_CLASSES, load_member, load_member_text_encoder
from ..fusion.member_utils import INTERFACE_KEYS
from ..models.modeling_fused_unet import FusedUNet
from ..models.modeling_lora_member import LoraMember, load_lora_members, save_base_unet

CONFIG_NAME = "config.json"
MEMBER_FOLDER = "member_{}"
TEXT_ENCODER_FOLDER = "text_encoder_{}"
LORA_BASE_FOLDER = "lora_base_{}"
SOURCE_KEYS = ("pretrained_model_name_or_path", "subfolder", "revision", "variant")
FUSION_KEYS = {
    "num_members": int,
    "weights": list,
    "timestep_bin_edges": (list, type(None)),
    "prediction_type": str,
    "member_prediction_types": list,
    "noise_schedule": (dict, type(None)),
    "member_encoder_slots": (list, type(None)),
    "weights_provenance": (dict, type(None)),
    "members": list,
    "text_encoders": list,
    "lora_bases": list,
}
PRIVATE_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")
# Keyword arguments Diffusers' pipeline loader passes to a component's from_pretrained.
FORWARDED_LOAD_KWARGS = ("torch_dtype", "low_cpu_mem_usage", "disable_mmap", "max_memory", "offload_folder",
                         "offload_state_dict", "cache_dir", "token", "local_files_only")  # fmt: skip
IGNORED_LOAD_KWARGS = ("use_safetensors", "use_flashpack", "output_loading_info", "force_download", "proxies")


@contextlib.contextmanager
def atomic_directory(save_directory: str) -> Iterator[str]:
    """Yields a temporary sibling folder; on success it replaces `save_directory`, on failure it is removed.

    An interrupted or failing save leaves any previous save at `save_directory` untouched.
    """
    save_directory = os.path.abspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory!r} is a file; expected a folder path")
    parent = os.path.dirname(save_directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(save_directory)}.saving-", dir=parent)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    backup = None
    if os.path.exists(save_directory):
        backup = tempfile.mkdtemp(prefix=f".{os.path.basename(save_directory)}.old-", dir=parent)
        os.replace(save_directory, os.path.join(backup, "previous"))
    os.replace(staging, save_directory)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def save_atomically(save: Callable[..., None], save_directory: Union[str, os.PathLike], **kwargs: Any) -> None:
    """Runs a `save_pretrained`-like `save(folder, **kwargs)` through `atomic_directory`; a Hub push keeps the name."""
    save_directory = os.fspath(save_directory)
    if kwargs.get("push_to_hub"):
        kwargs.setdefault("repo_id", os.path.basename(os.path.normpath(save_directory)))
    with atomic_directory(save_directory) as staging:
        save(staging, **kwargs)


def _public_config(config: Any) -> Dict[str, Any]:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def save_fused_unet(
    fused: FusedUNet,
    save_directory: str,
    reference_only: bool = False,
    member_sources: Optional[Sequence[Optional[Dict[str, Any]]]] = None,
    variant: Optional[str] = None,
    max_shard_size: Any = "10GB",
) -> None:
    """Writes `fused` to `save_directory` atomically (see the module docstring for the two layouts)."""
    sources = list(member_sources) if member_sources is not None else list(fused.member_sources)
    if len(sources) != fused.config.num_members:
        raise ValueError(f"member_sources must hold {fused.config.num_members} entries, got {len(sources)}")
    lora_bases = _distinct_lora_bases(fused)
    if lora_bases and reference_only:
        raise ValueError("reference_only=True is not supported for LoRA members (from_lora); save self-contained")
    members = []
    for i, unet in enumerate(fused.unets):
        entry = {"class_name": type(unet).__name__, "config": _jsonable(_public_config(unet.config))}
        if isinstance(unet, LoraMember):
            entry["lora"] = {"base": _index_of(lora_bases, unet.base), "adapter_name": unet.adapter_name}
        if reference_only:
            source = sources[i]
            if not source or not source.get("pretrained_model_name_or_path"):
                raise ValueError(
                    f"member {i} has no recorded source (it was passed as a module): reference_only=True needs "
                    "member_sources=[{'pretrained_model_name_or_path': ..., 'subfolder': ...}, ...]"
                )
            unknown = set(source) - set(SOURCE_KEYS)
            if unknown:
                raise ValueError(f"member_sources[{i}] has unknown keys {sorted(unknown)}; allowed: {SOURCE_KEYS}")
            entry.update({key: source.get(key) for key in SOURCE_KEYS})
        else:
            entry.update(pretrained_model_name_or_path=None, subfolder=MEMBER_FOLDER.format(i), revision=None,
                         variant=variant)  # fmt: skip
        members.append(entry)
    text_encoders = []
    for j, encoder in enumerate(fused.text_encoders):
        entry = {"class_name": type(encoder).__name__}
        if reference_only:  # the encoder beside the first member that uses it (its pipeline folder or repo)
            entry["member"] = fused.config.member_encoder_slots.index(j + 1)
        else:
            entry["subfolder"] = TEXT_ENCODER_FOLDER.format(j + 1)
        text_encoders.append(entry)
    config = {**dict(fused.config), "members": members, "text_encoders": text_encoders, "_class_name": "FusedUNet",
              "lora_bases": [{"subfolder": LORA_BASE_FOLDER.format(b)} for b in range(len(lora_bases))]}  # fmt: skip
    with atomic_directory(save_directory) as staging:
        if not reference_only:
            for b, base in enumerate(lora_bases):
                save_base_unet(base, os.path.join(staging, LORA_BASE_FOLDER.format(b)), max_shard_size=max_shard_size)
            for i, unet in enumerate(fused.unets):
                folder = os.path.join(staging, MEMBER_FOLDER.format(i))
                if isinstance(unet, LoraMember):
                    unet.save_lora_weights(folder)
                else:
                    unet.save_pretrained(folder, safe_serialization=True, variant=variant, max_shard_size=max_shard_size)
            for j, encoder in enumerate(fused.text_encoders):
                encoder.save_pretrained(os.path.join(staging, TEXT_ENCODER_FOLDER.format(j + 1)), safe_serialization=True)
        with open(os.path.join(staging, CONFIG_NAME), "w", encoding="utf-8") as handle:
            json.dump(_jsonable(config), handle, indent=2, sort_keys=True)
            handle.write("\n")


def _distinct_lora_bases(fused: FusedUNet) -> List[nn.Module]:
    bases: List[nn.Module] = []
    for unet in fused.unets:
        if isinstance(unet, LoraMember) and _index_of(bases, unet.base) is None:
            bases.append(unet.base)
    return bases


def _index_of(modules: Sequence[nn.Module], module: nn.Module) -> Optional[int]:
    return next((i for i, known in enumerate(modules) if known is module), None)


def _check_config(config: Dict[str, Any], where: str) -> None:
    if config.get("_class_name") != "FusedUNet":
        raise ValueError(f"{where} is not a FusedUNet config (_class_name={config.get('_class_name')!r})")
    for key, expected in FUSION_KEYS.items():
        if key not in config:
            raise ValueError(f"{where} is missing the key {key!r}")
        if not isinstance(config[key], expected):
            raise ValueError(f"{where}: {key} must be {expected}, got {type(config[key]).__name__} {config[key]!r}")
    allowed = set(FUSION_KEYS) | set(INTERFACE_KEYS) | set(PRIVATE_KEYS)
    members = config.get("members")
    if isinstance(members, list) and members and isinstance(members[0], dict) and isinstance(members[0].get("config"), dict):
        allowed |= set(members[0]["config"])  # the members' shared config, mirrored (recomputed on load)
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}")
    num_members = config["num_members"]
    for key in ("members", "member_prediction_types"):
        if len(config[key]) != num_members:
            raise ValueError(f"{where}: {key} has {len(config[key])} entries but num_members is {num_members}")
    for i, member in enumerate(config["members"]):
        if not isinstance(member, dict) or not isinstance(member.get("config"), dict):
            raise ValueError(f"{where}: members[{i}] must be a dict with a 'config' dict, got {member!r}")
        unknown = set(member) - set(SOURCE_KEYS) - {"class_name", "config", "lora"}
        if unknown:
            raise ValueError(f"{where}: members[{i}] has unknown keys {sorted(unknown)}")


def _check_member_config(index: int, unet: nn.Module, recorded: Dict[str, Any]) -> None:
    actual = _jsonable(_public_config(unet.config))
    differing = [f"{key}: recorded {recorded.get(key)!r}, found {actual.get(key)!r}"
                 for key in sorted(set(recorded) | set(actual)) if recorded.get(key) != actual.get(key)]  # fmt: skip
    if differing:
        raise ValueError(f"member {index}'s config does not match the recorded one: {'; '.join(differing[:5])}")


def _join(*parts: Optional[str]) -> Optional[str]:
    parts = [part for part in parts if part]
    return "/".join(parts) if parts else None


def _load_text_encoder(
    entry: Dict[str, Any], source: str, subfolder: Optional[str], member_specs: List[Dict[str, Any]],
    hub_kwargs: Dict[str, Any], torch_dtype: Any, allow_pickle: bool,
) -> nn.Module:
    class_name = entry.get("class_name")
    if class_name not in TEXT_ENCODER_CLASSES:
        raise ValueError(f"text encoder entry {entry!r} names class {class_name!r}; expected one of {TEXT_ENCODER_CLASSES}")
    if "member" in entry:  # reference-only: beside that member's unet/
        if not isinstance(entry["member"], int) or not 0 <= entry["member"] < len(member_specs):
            raise ValueError(f"text encoder entry {entry!r} must name a member index below {len(member_specs)}")
        hub = {key: value for key, value in hub_kwargs.items() if key != "revision"}
        encoder = load_member_text_encoder(member_specs[entry["member"]], None, torch_dtype=torch_dtype,
                                           allow_pickle=allow_pickle, **hub)  # fmt: skip
        if encoder is None:
            raise ValueError(f"member {entry['member']} ({member_specs[entry['member']]}) has no text_encoder/ folder")
        return encoder
    if not isinstance(entry.get("subfolder"), str):
        raise ValueError(f"text encoder entry {entry!r} needs a 'subfolder' or a 'member'")
    dtype_kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    return getattr(transformers, class_name).from_pretrained(
        source, subfolder=_join(subfolder, entry["subfolder"]), use_safetensors=None if allow_pickle else True, **hub_kwargs,
        **dtype_kwargs,
    )


def _load_lora_member(
    lora: Any, spec: Dict[str, Any], bases: List[nn.Module], allow_pickle: bool, hub_kwargs: Dict[str, Any]
) -> LoraMember:
    if not isinstance(lora, dict) or not isinstance(lora.get("base"), int) or not 0 <= lora["base"] < len(bases):
        raise ValueError(f"a LoRA member entry must name a base index below {len(bases)}, got {lora!r}")
    kwargs = {**hub_kwargs, "subfolder": spec["subfolder"]}
    if spec.get("revision") is not None:
        kwargs["revision"] = spec["revision"]
    (member,) = load_lora_members(bases[lora["base"]], [spec["pretrained_model_name_or_path"]],
                                  adapter_names=[lora.get("adapter_name")], allow_pickle=allow_pickle, **kwargs)  # fmt: skip
    return member


def load_fused_unet(
    pretrained_model_name_or_path: str,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    variant: Optional[str] = None,
    allow_pickle: bool = False,
    device_map: Any = None,
    **kwargs: Any,
) -> FusedUNet:
    """Loads a fusion saved by `save_fused_unet` from a local folder or a Hub repo id."""
    unknown = set(kwargs) - set(FORWARDED_LOAD_KWARGS) - set(IGNORED_LOAD_KWARGS) - {"quantization_config"}
    if unknown:
        raise TypeError(f"FusedUNet.from_pretrained got unexpected keyword arguments {sorted(unknown)}")
    if kwargs.get("quantization_config") is not None:
        raise ValueError("quantization_config is not supported for FusedUNet; quantize the members before fusing")
    source = os.fspath(pretrained_model_name_or_path)
    where = f"the fusion config at {source!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    hub_kwargs = {key: kwargs[key] for key in ("cache_dir", "token", "local_files_only") if key in kwargs}
    if revision is not None:
        hub_kwargs["revision"] = revision
    try:
        config = dict(FusedUNet.load_config(source, subfolder=subfolder, **hub_kwargs))
    except EnvironmentError as error:
        raise ValueError(f"could not read {where}: {error}") from error
    _check_config(config, where)
    num_members = config["num_members"]
    device_maps = device_map if isinstance(device_map, (list, tuple)) else [device_map] * num_members
    if len(device_maps) != num_members:
        raise ValueError(f"device_map as a list must hold {num_members} entries (one per member), got {len(device_maps)}")
    member_kwargs = {key: kwargs[key] for key in FORWARDED_LOAD_KWARGS if key in kwargs and key not in hub_kwargs}
    members: List[nn.Module] = []
    sources: List[Optional[Dict[str, Any]]] = []
    specs: List[Dict[str, Any]] = []
    lora_bases = []
    for b, entry in enumerate(config["lora_bases"]):
        spec = {"pretrained_model_name_or_path": source, "subfolder": _join(subfolder, entry.get("subfolder")),
                "revision": revision, "variant": None}  # fmt: skip
        try:
            lora_bases.append(load_member(spec, allow_pickle=allow_pickle, **member_kwargs, **hub_kwargs)[0])
        except ValueError as error:
            raise ValueError(f"could not load LoRA base {b} from {spec}: {error}") from error
    for i, entry in enumerate(config["members"]):
        if entry.get("pretrained_model_name_or_path"):  # reference-only: an external repo or path
            spec = {key: entry.get(key) for key in SOURCE_KEYS}
            sources.append(spec)
        else:  # self-contained: a subfolder of this fusion
            spec = {"pretrained_model_name_or_path": source, "subfolder": _join(subfolder, entry.get("subfolder")),
                    "revision": revision, "variant": variant if variant is not None else entry.get("variant")}  # fmt: skip
            sources.append(None)
        specs.append(spec)
        if device_maps[i] is not None:
            member_kwargs["device_map"] = device_maps[i]
        else:
            member_kwargs.pop("device_map", None)
        try:
            if "lora" in entry:
                unet = _load_lora_member(entry["lora"], spec, lora_bases, allow_pickle, hub_kwargs)
            else:
                unet, _ = load_member(spec, allow_pickle=allow_pickle, **member_kwargs, **hub_kwargs)
        except (EnvironmentError, ValueError, RuntimeError) as error:
            raise ValueError(f"could not load member {i} from {spec}: {error}") from error
        _check_member_config(i, unet, entry["config"])
        members.append(unet)
    encoders = [_load_text_encoder(entry, source, subfolder, specs, hub_kwargs, kwargs.get("torch_dtype"), allow_pickle)
                for entry in config["text_encoders"]]  # fmt: skip
    slots = config["member_encoder_slots"]
    fused = FusedUNet(
        members,
        weights=config["weights"],
        timestep_bin_edges=config["timestep_bin_edges"],
        prediction_type=config["prediction_type"],
        member_prediction_types=config["member_prediction_types"],
        member_schedulers=[config["noise_schedule"]] * num_members if config["noise_schedule"] else None,
        member_text_encoders=[encoders[slot - 1] if slot else None for slot in slots] if slots else None,
    )
    if config["weights_provenance"] is not None:
        fused.set_weights(config["weights"], config["timestep_bin_edges"], provenance=config["weights_provenance"])
    fused.member_sources = sources
    if kwargs.get("torch_dtype") is not None and fused.dtype != kwargs["torch_dtype"]:
        fused.to(kwargs["torch_dtype"])
    return fused
