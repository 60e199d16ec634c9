"""Loading fusions saved by `serialization.save_fusion` (its module docstring describes the folder), from a local
folder or a Hub repo id: the config is checked key by key (`fusion_config.py`) and every saved file against its sha256
before any weights are read; members load through `loading_utils.load_member`.
"""

import contextlib
import json
import os
from typing import Any, Callable, Dict, List, Optional

from torch import nn

from .atomic_save import reading, recover_legacy
from .fusion_config import (
    CONFIG_NAME,
    FUSED_TRANSFORMER,
    FUSED_UNET,
    SOURCE_KEYS,
    check_fusion_config,
    check_subfolder,
    flow_schedule_config,
    transformer_member_class,
)
from .integrity import verify_digests
from .loading_utils import load_member, load_member_text_encoder, load_text_encoder, resolve_use_safetensors
from .serialization import jsonable, public_config

# Keyword arguments Diffusers' pipeline loader passes to a component's from_pretrained.
FORWARDED_LOAD_KWARGS = ("torch_dtype", "low_cpu_mem_usage", "disable_mmap", "max_memory", "offload_folder",
                         "offload_state_dict", "cache_dir", "token", "local_files_only")  # fmt: skip
IGNORED_LOAD_KWARGS = ("use_flashpack", "output_loading_info", "force_download", "proxies")
HUB_KEYS = ("cache_dir", "token", "local_files_only")


def _join(*parts: Optional[str]) -> Optional[str]:
    parts = [part for part in parts if part]
    return "/".join(parts) if parts else None


def _read_config(source: str, subfolder: Optional[str], hub_kwargs: Dict[str, Any], where: str) -> Any:
    """The parsed `config.json` of a local folder or Hub repo (only JSON is read)."""
    try:
        if os.path.isdir(source):
            path = os.path.join(source, subfolder or "", CONFIG_NAME)
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(source, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"could not read {where}: {error}") from error


def _verify(
    source: str, subfolder: Optional[str], entry: Dict[str, Any], where: str, hub_kwargs: Dict[str, Any]
) -> None:
    """Checks a saved folder's files against the sha256 its entry records (saves by 0.1 record none)."""
    if "sha256" not in entry:
        return
    if os.path.isdir(source):
        folder = os.path.join(source, subfolder or "")
        if not os.path.isdir(folder):
            raise ValueError(f"{where}: its folder {subfolder!r} is missing from {source!r}")

        def resolve(name: str) -> str:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no file {path}")
            return path

        verify_digests(entry["sha256"], resolve, f"{where} ({folder})", os.listdir(folder))
    else:
        from huggingface_hub import hf_hub_download

        verify_digests(entry["sha256"], lambda name: hf_hub_download(source, name, subfolder=subfolder, **hub_kwargs),
                       f"{where} ({source}, {subfolder})")  # fmt: skip


def _saved_variant(config: Dict[str, Any], variant: Optional[str], where: str) -> None:
    entries = [entry for key in ("members", "text_encoders", "lora_bases") for entry in config.get(key, [])]
    recorded = {entry.get("variant") for entry in entries
                if entry.get("pretrained_model_name_or_path") is None and "member" not in entry}  # fmt: skip
    if variant is not None and recorded and recorded != {variant}:
        raise ValueError(f"{where} was saved with variant {sorted(recorded, key=str)[0]!r}; got variant={variant!r}")


def load_fusion(
    fusion_class: type,
    pretrained_model_name_or_path: str,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    variant: Optional[str] = None,
    allow_pickle: Optional[bool] = None,
    device_map: Any = None,
    allow_outside_paths: bool = False,
    verify_weights: bool = True,
    use_safetensors: Optional[bool] = None,
    **kwargs: Any,
) -> Any:
    """Loads a fusion saved by `save_fusion` from a local folder or a Hub repo id (`FusedUNet.from_pretrained`,
    `FusedTransformer.from_pretrained`: `fusion_class` says which the folder must hold)."""
    class_name = FUSED_TRANSFORMER if fusion_class.members_attribute == "transformers" else FUSED_UNET
    unknown = set(kwargs) - set(FORWARDED_LOAD_KWARGS) - set(IGNORED_LOAD_KWARGS) - {"quantization_config"}
    if unknown:
        raise TypeError(f"{class_name}.from_pretrained got unexpected keyword arguments {sorted(unknown)}")
    if kwargs.get("quantization_config") is not None:
        raise ValueError(f"quantization_config is not supported for {class_name}; quantize the members before fusing")
    for name, value in (("allow_outside_paths", allow_outside_paths), ("verify_weights", verify_weights)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    for name, value in (("revision", revision), ("variant", variant)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a string or None, got {value!r}")
    check_subfolder(subfolder, f"{class_name}.from_pretrained")
    use_safetensors = resolve_use_safetensors(allow_pickle, use_safetensors)
    source = os.fspath(pretrained_model_name_or_path)
    where = f"the fusion config at {source!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    hub_kwargs = {key: kwargs[key] for key in HUB_KEYS if key in kwargs}
    if revision is not None:
        hub_kwargs["revision"] = revision
    folder = os.path.join(source, subfolder) if subfolder else source
    if not os.path.lexists(folder):
        recover_legacy(folder)  # a save by 0.1 killed between its two renames left the folder missing
    local = os.path.isdir(source)
    with reading(folder) if local else contextlib.nullcontext():
        config = _read_config(source, subfolder, hub_kwargs, where)
        check_fusion_config(config, where, folder=folder if local else None, allow_outside_paths=allow_outside_paths,
                            class_name=class_name)  # fmt: skip
        _saved_variant(config, variant, where)
        return _load_checked_config(config, source, subfolder, where, hub_kwargs, use_safetensors, device_map,
                                    verify_weights, kwargs)  # fmt: skip


def _load_checked_config(
    config: Dict[str, Any], source: str, subfolder: Optional[str], where: str, hub_kwargs: Dict[str, Any],
    use_safetensors: Optional[bool], device_map: Any, verify_weights: bool, kwargs: Dict[str, Any],
) -> Any:  # fmt: skip
    num_members = config["num_members"]
    device_maps = device_map if isinstance(device_map, (list, tuple)) else [device_map] * num_members
    if len(device_maps) != num_members:
        raise ValueError(
            f"device_map as a list must hold {num_members} entries (one per member), got {len(device_maps)}"
        )
    transformer = config["_class_name"] == FUSED_TRANSFORMER
    member_class = transformer_member_class(config["member_class"]) if transformer else None
    member_kwargs = {key: kwargs[key] for key in FORWARDED_LOAD_KWARGS if key in kwargs and key not in hub_kwargs}
    member_kwargs["use_safetensors"] = use_safetensors
    member_kwargs["member_class"] = member_class
    verify: Callable[..., None] = _verify if verify_weights else (lambda *args: None)
    lora_bases = []
    for b, entry in enumerate(config["lora_bases"]):
        spec = {"pretrained_model_name_or_path": source, "subfolder": _join(subfolder, entry["subfolder"]),
                "revision": hub_kwargs.get("revision"), "variant": entry.get("variant")}  # fmt: skip
        verify(source, spec["subfolder"], entry, f"LoRA base {b}", hub_kwargs)
        try:
            lora_bases.append(load_member(spec, **member_kwargs, **_without_revision(hub_kwargs))[0])
        except ValueError as error:
            raise ValueError(f"could not load LoRA base {b} from {spec}: {error}") from error
    members: List[nn.Module] = []
    sources: List[Optional[Dict[str, Any]]] = []
    specs: List[Dict[str, Any]] = []
    for i, entry in enumerate(config["members"]):
        if entry["pretrained_model_name_or_path"]:  # reference-only: an external repo or path
            spec = {key: entry[key] for key in SOURCE_KEYS}
            sources.append(spec)
        else:  # self-contained: a subfolder of this fusion
            spec = {"pretrained_model_name_or_path": source, "subfolder": _join(subfolder, entry["subfolder"]),
                    "revision": hub_kwargs.get("revision"), "variant": entry["variant"]}  # fmt: skip
            sources.append(None)
            verify(source, spec["subfolder"], entry, f"member {i}", hub_kwargs)
        specs.append(spec)
        member_kwargs.pop("device_map", None)
        if device_maps[i] is not None:
            member_kwargs["device_map"] = device_maps[i]
        try:
            if "lora" in entry:
                from ..models.modeling_lora_member import load_lora_members  # models/ imports loaders/: import late

                (member,) = load_lora_members(
                    lora_bases[entry["lora"]["base"]], [source], adapter_names=[entry["lora"].get("adapter_name")],
                    allow_pickle=use_safetensors is not True, subfolder=spec["subfolder"], **hub_kwargs,
                )  # fmt: skip
            else:
                member, _ = load_member(spec, **member_kwargs, **_without_revision(hub_kwargs))
        except ValueError as error:
            raise ValueError(f"could not load member {i} from {spec}: {error}") from error
        if type(member).__name__ != entry["class_name"]:
            found = type(member).__name__
            raise ValueError(f"member {i} is recorded as a {entry['class_name']} but its folder holds a {found}")
        _check_member_config(i, member, entry["config"])
        members.append(member)
    if transformer:
        from ..models.modeling_fused_transformer import FusedTransformer  # models/ imports loaders/: import late

        fused = FusedTransformer(
            members, weights=config["weights"], timestep_bin_edges=config["timestep_bin_edges"],
            member_schedulers=[flow_schedule_config(config["noise_schedule"])] * num_members
            if config["noise_schedule"] else None,
        )  # fmt: skip
    else:
        fused = _fused_unet(config, members, specs, source, subfolder, where, hub_kwargs, use_safetensors, verify,
                            kwargs.get("torch_dtype"))  # fmt: skip
    if config["weights_provenance"] is not None:
        fused.set_weights(config["weights"], config["timestep_bin_edges"], provenance=config["weights_provenance"])
    fused.member_sources = sources
    if kwargs.get("torch_dtype") is not None and fused.dtype != kwargs["torch_dtype"]:
        fused.to(kwargs["torch_dtype"])
    return fused


def _without_revision(hub_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Hub keyword arguments for a member spec, which carries its own revision."""
    return {key: value for key, value in hub_kwargs.items() if key != "revision"}


def _fused_unet(
    config: Dict[str, Any], members: List[nn.Module], specs: List[Dict[str, Any]], source: str,
    subfolder: Optional[str], where: str, hub_kwargs: Dict[str, Any], use_safetensors: Optional[bool],
    verify: Callable[..., None], torch_dtype: Any,
) -> Any:  # fmt: skip
    """A FusedUNet of `members` with its recorded prediction types, noise schedule and member text encoders."""
    encoders = []
    for j, entry in enumerate(config["text_encoders"]):
        if "member" in entry:  # reference-only: beside that member's unet/
            encoder = load_member_text_encoder(specs[entry["member"]], None, torch_dtype=torch_dtype,
                                               use_safetensors=use_safetensors,
                                               **_without_revision(hub_kwargs))  # fmt: skip
            if encoder is None:
                raise ValueError(f"member {entry['member']} ({specs[entry['member']]}) has no text_encoder/ folder")
        else:
            location = _join(subfolder, entry["subfolder"])
            verify(source, location, entry, f"text encoder {j + 1}", hub_kwargs)
            encoder = load_text_encoder(entry["class_name"], source, location, f"text encoder {j + 1} of {where}",
                                        torch_dtype, variant=entry.get("variant"), use_safetensors=use_safetensors,
                                        **hub_kwargs)  # fmt: skip
        encoders.append(encoder)
    from ..models.modeling_fused_unet import FusedUNet  # models/ imports loaders/: import late

    slots, num_members = config["member_encoder_slots"], config["num_members"]
    return FusedUNet(
        members,
        weights=config["weights"],
        timestep_bin_edges=config["timestep_bin_edges"],
        prediction_type=config["prediction_type"],
        member_prediction_types=config["member_prediction_types"],
        member_schedulers=[config["noise_schedule"]] * num_members if config["noise_schedule"] else None,
        member_text_encoders=[encoders[slot - 1] if slot else None for slot in slots] if slots else None,
    )


def _check_member_config(index: int, member: nn.Module, recorded: Dict[str, Any]) -> None:
    actual = jsonable(public_config(member.config))
    differing = [f"{key}: recorded {recorded.get(key)!r}, found {actual.get(key)!r}"
                 for key in sorted(set(recorded) | set(actual)) if recorded.get(key) != actual.get(key)]  # fmt: skip
    if differing:
        raise ValueError(f"member {index}'s config does not match the recorded one: {'; '.join(differing[:5])}")
