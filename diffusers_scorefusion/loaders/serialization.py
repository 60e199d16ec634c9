"""Saving and loading fusions: self-contained folders, reference-only weight configs, crash-safe writes.

A fusion folder (local, or a Hub repo) holds `config.json` (the `FusedUNet` config plus a `members` list; its schema is
`fusion_config.py`). In the self-contained layout each member is a standard Diffusers folder `member_{i}.diffusers/`
(a UNet folder, or a LoRA folder for LoRA members, whose shared base is `lora_base_{b}.diffusers/`) and each distinct
member text encoder a transformers folder `text_encoder_{j}.transformers/`; with a `variant` the names are
`member_{i}.{variant}.diffusers` and so on. Every folder name holds a dot: Diffusers' variant scan of a pipeline
folder reads the part after the first dot of each entry of `unet/`. The config records the sha256 of every saved
file. In the reference-only layout `members` names each member's repo id or path, subfolder, revision and variant.
Only JSON is read from a config, and no code from it is ever run. Saves go through `atomic_save`.
"""

import contextlib
import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence

from torch import nn

from ..models.modeling_fused_unet import FusedUNet
from ..models.modeling_lora_member import LoraMember, load_lora_members, save_base_unet
from .atomic_save import SaveKind, atomic_save, check_save_target, reading, recover_legacy
from .fusion_config import (
    CLASS_NAME,
    CONFIG_NAME,
    MEMBER_CLASSES,
    SAVED_MEMBER_CLASSES,
    SOURCE_KEYS,
    check_fusion_config,
    check_subfolder,
    saved_entries,
)
from .integrity import folder_digests, verify_digests
from .loading_utils import load_member, load_member_text_encoder, load_text_encoder, resolve_use_safetensors

FUSION_SAVE = SaveKind(description="FusedUNet save", commit_file=CONFIG_NAME, entries_of=saved_entries)
VARIANT = re.compile(r"[A-Za-z0-9_-]+")
# Keyword arguments Diffusers' pipeline loader passes to a component's from_pretrained.
FORWARDED_LOAD_KWARGS = ("torch_dtype", "low_cpu_mem_usage", "disable_mmap", "max_memory", "offload_folder",
                         "offload_state_dict", "cache_dir", "token", "local_files_only")  # fmt: skip
IGNORED_LOAD_KWARGS = ("use_flashpack", "output_loading_info", "force_download", "proxies")
HUB_KEYS = ("cache_dir", "token", "local_files_only")


def folder_name(name: str, variant: Optional[str], library: str) -> str:
    """`member_0.diffusers`, or `member_0.fp16.diffusers` with a variant (see the module docstring)."""
    return ".".join([name, *([variant] if variant else []), library])


def _public_config(config: Any) -> Dict[str, Any]:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def _distinct_lora_bases(fused: FusedUNet) -> List[nn.Module]:
    bases: List[nn.Module] = []
    for unet in fused.unets:
        if isinstance(unet, LoraMember) and _index_of(bases, unet.base) is None:
            bases.append(unet.base)
    return bases


def _index_of(modules: Sequence[nn.Module], module: nn.Module) -> Optional[int]:
    return next((i for i, known in enumerate(modules) if known is module), None)


def _check_saveable(fused: FusedUNet, variant: Optional[str], safe_serialization: Any) -> None:
    import diffusers

    if variant is not None and (not isinstance(variant, str) or not VARIANT.fullmatch(variant)):
        raise ValueError(f"variant must be letters, digits, '-' or '_' (e.g. 'fp16'), got {variant!r}")
    if not isinstance(safe_serialization, bool):
        raise TypeError(f"safe_serialization must be True or False, got {safe_serialization!r}")
    for i, unet in enumerate(fused.unets):
        name = type(unet).__name__
        known = name == "LoraMember" or (name in MEMBER_CLASSES and type(unet) is getattr(diffusers, name))
        if not known:
            raise TypeError(
                f"member {i} is a {name}; a fusion folder can only hold {SAVED_MEMBER_CLASSES} members (loading "
                "instantiates nothing else)"
            )


def fusion_config_to_save(
    fused: FusedUNet, reference_only: bool, member_sources: Optional[Sequence[Optional[Dict[str, Any]]]],
    variant: Optional[str],
) -> Dict[str, Any]:  # fmt: skip
    """The config a save writes (without the file checksums, added once the files are written)."""
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
            entry["pretrained_model_name_or_path"] = os.fspath(entry["pretrained_model_name_or_path"])
        else:
            entry.update(pretrained_model_name_or_path=None, subfolder=folder_name(f"member_{i}", variant, "diffusers"),
                         revision=None, variant=variant)  # fmt: skip
        members.append(entry)
    text_encoders = []
    for j, encoder in enumerate(fused.text_encoders):
        entry = {"class_name": type(encoder).__name__}
        if reference_only:  # the encoder beside the first member that uses it (its pipeline folder or repo)
            entry["member"] = fused.config.member_encoder_slots.index(j + 1)
        else:
            entry.update(subfolder=folder_name(f"text_encoder_{j + 1}", variant, "transformers"), variant=variant)
        text_encoders.append(entry)
    bases = [{"subfolder": folder_name(f"lora_base_{b}", variant, "diffusers"), "variant": variant}
             for b in range(len(lora_bases))]  # fmt: skip
    config = _jsonable({**dict(fused.config), "members": members, "text_encoders": text_encoders, "lora_bases": bases,
                        "_class_name": CLASS_NAME})  # fmt: skip
    check_fusion_config(config, "the fusion config being saved", check_paths=False)
    return config


def save_fused_unet(
    fused: FusedUNet,
    save_directory: str,
    reference_only: bool = False,
    member_sources: Optional[Sequence[Optional[Dict[str, Any]]]] = None,
    variant: Optional[str] = None,
    max_shard_size: Any = "10GB",
    safe_serialization: bool = True,
) -> None:
    """Writes `fused` into `save_directory` (see the module docstring). With `safe_serialization=False` the UNets are
    `.bin` files; LoRA adapters stay safetensors (their LoRA config lives in the file's header, which `.bin` lacks)
    and transformers writes text encoders as safetensors whatever is asked.

    Everything is checked before anything is written; other files in the folder are left alone.
    """
    _check_saveable(fused, variant, safe_serialization)
    config = fusion_config_to_save(fused, reference_only, member_sources, variant)
    check_save_target(save_directory, FUSION_SAVE, [CONFIG_NAME, *(saved_entries(config) or [])])
    lora_bases = _distinct_lora_bases(fused)

    def write(staging: str) -> None:
        parts = [("member", entry, fused.unets[i]) for i, entry in enumerate(config["members"]) if not reference_only]
        parts += [("base", entry, lora_bases[b]) for b, entry in enumerate(config["lora_bases"])]
        parts += [("encoder", entry, fused.text_encoders[j]) for j, entry in enumerate(config["text_encoders"])
                  if "subfolder" in entry]  # fmt: skip
        for kind, entry, module in parts:
            folder = os.path.join(staging, entry["subfolder"])
            if isinstance(module, LoraMember):  # safetensors always: the adapter's LoRA config is in its header
                module.save_lora_weights(folder)
            elif kind == "base":
                save_base_unet(module, folder, max_shard_size=max_shard_size, safe_serialization=safe_serialization,
                               variant=variant)  # fmt: skip
            elif kind == "encoder":
                module.save_pretrained(folder, variant=variant)  # transformers writes safetensors only
            else:
                module.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant,
                                       max_shard_size=max_shard_size)  # fmt: skip
            entry["sha256"] = folder_digests(folder)
        with open(os.path.join(staging, CONFIG_NAME), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
            handle.write("\n")

    atomic_save(save_directory, write, FUSION_SAVE)


# ----------------------------------------------------------------------------------------------------------- loading
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
    recorded = {entry.get("variant") for key in ("members", "text_encoders", "lora_bases") for entry in config[key]
                if entry.get("pretrained_model_name_or_path") is None and "member" not in entry}  # fmt: skip
    if variant is not None and recorded and recorded != {variant}:
        raise ValueError(f"{where} was saved with variant {sorted(recorded, key=str)[0]!r}; got variant={variant!r}")


def load_fused_unet(
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
) -> FusedUNet:
    """Loads a fusion saved by `save_fused_unet` from a local folder or a Hub repo id (`FusedUNet.from_pretrained`)."""
    unknown = set(kwargs) - set(FORWARDED_LOAD_KWARGS) - set(IGNORED_LOAD_KWARGS) - {"quantization_config"}
    if unknown:
        raise TypeError(f"FusedUNet.from_pretrained got unexpected keyword arguments {sorted(unknown)}")
    if kwargs.get("quantization_config") is not None:
        raise ValueError("quantization_config is not supported for FusedUNet; quantize the members before fusing")
    for name, value in (("allow_outside_paths", allow_outside_paths), ("verify_weights", verify_weights)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    for name, value in (("revision", revision), ("variant", variant)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a string or None, got {value!r}")
    check_subfolder(subfolder, "FusedUNet.from_pretrained")
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
        check_fusion_config(config, where, folder=folder if local else None, allow_outside_paths=allow_outside_paths)
        _saved_variant(config, variant, where)
        return _load_checked_config(config, source, subfolder, where, hub_kwargs, use_safetensors, device_map,
                                    verify_weights, kwargs)  # fmt: skip


def _load_checked_config(
    config: Dict[str, Any], source: str, subfolder: Optional[str], where: str, hub_kwargs: Dict[str, Any],
    use_safetensors: Optional[bool], device_map: Any, verify_weights: bool, kwargs: Dict[str, Any],
) -> FusedUNet:  # fmt: skip
    num_members = config["num_members"]
    device_maps = device_map if isinstance(device_map, (list, tuple)) else [device_map] * num_members
    if len(device_maps) != num_members:
        raise ValueError(
            f"device_map as a list must hold {num_members} entries (one per member), got {len(device_maps)}"
        )
    member_kwargs = {key: kwargs[key] for key in FORWARDED_LOAD_KWARGS if key in kwargs and key not in hub_kwargs}
    member_kwargs["use_safetensors"] = use_safetensors
    verify = _verify if verify_weights else (lambda *args: None)
    lora_bases = []
    for b, entry in enumerate(config["lora_bases"]):
        spec = {"pretrained_model_name_or_path": source, "subfolder": _join(subfolder, entry["subfolder"]),
                "revision": hub_kwargs.get("revision"), "variant": entry.get("variant")}  # fmt: skip
        verify(source, spec["subfolder"], entry, f"LoRA base {b}", hub_kwargs)
        try:
            lora_bases.append(load_member(spec, **member_kwargs, **hub_kwargs)[0])
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
                (unet,) = load_lora_members(
                    lora_bases[entry["lora"]["base"]], [source], adapter_names=[entry["lora"].get("adapter_name")],
                    allow_pickle=use_safetensors is not True, subfolder=spec["subfolder"], **hub_kwargs,
                )  # fmt: skip
            else:
                unet, _ = load_member(spec, **member_kwargs, **{k: v for k, v in hub_kwargs.items() if k != "revision"})
        except ValueError as error:
            raise ValueError(f"could not load member {i} from {spec}: {error}") from error
        if type(unet).__name__ != entry["class_name"]:
            found = type(unet).__name__
            raise ValueError(f"member {i} is recorded as a {entry['class_name']} but its folder holds a {found}")
        _check_member_config(i, unet, entry["config"])
        members.append(unet)
    encoders = []
    for j, entry in enumerate(config["text_encoders"]):
        if "member" in entry:  # reference-only: beside that member's unet/
            hub = {key: value for key, value in hub_kwargs.items() if key != "revision"}
            encoder = load_member_text_encoder(specs[entry["member"]], None, torch_dtype=kwargs.get("torch_dtype"),
                                               use_safetensors=use_safetensors, **hub)  # fmt: skip
            if encoder is None:
                raise ValueError(f"member {entry['member']} ({specs[entry['member']]}) has no text_encoder/ folder")
        else:
            location = _join(subfolder, entry["subfolder"])
            verify(source, location, entry, f"text encoder {j + 1}", hub_kwargs)
            encoder = load_text_encoder(entry["class_name"], source, location, f"text encoder {j + 1} of {where}",
                                        kwargs.get("torch_dtype"), variant=entry.get("variant"),
                                        use_safetensors=use_safetensors, **hub_kwargs)  # fmt: skip
        encoders.append(encoder)
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


def _check_member_config(index: int, unet: nn.Module, recorded: Dict[str, Any]) -> None:
    actual = _jsonable(_public_config(unet.config))
    differing = [f"{key}: recorded {recorded.get(key)!r}, found {actual.get(key)!r}"
                 for key in sorted(set(recorded) | set(actual)) if recorded.get(key) != actual.get(key)]  # fmt: skip
    if differing:
        raise ValueError(f"member {index}'s config does not match the recorded one: {'; '.join(differing[:5])}")
