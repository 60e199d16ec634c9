"""Saving fusions (`FusedUNet`, `FusedTransformer`): self-contained folders, reference-only weight configs, crash-safe
writes. Loading is `fusion_loading.py`.

A fusion folder (local, or a Hub repo) holds `config.json` (the fusion's config plus a `members` list; its schema is
`fusion_config.py`, `_class_name` "FusedUNet" or "FusedTransformer"). In the self-contained layout each member is a
standard Diffusers folder `member_{i}.diffusers/` (a UNet or transformer folder, or a LoRA folder for LoRA members,
whose shared base is `lora_base_{b}.diffusers/`) and each distinct member text encoder of a FusedUNet a transformers
folder `text_encoder_{j}.transformers/`; with a `variant` the names are `member_{i}.{variant}.diffusers` and so on.
Every folder name holds a dot: Diffusers' variant scan of a pipeline folder reads the part after the first dot of each
entry of `unet/` or `transformer/`. The config records the sha256 of every saved file. In the reference-only layout
`members` names each member's repo id or path, subfolder, revision and variant. Only JSON is read from a config, and
no code from it is ever run. Saves go through `atomic_save`.
"""

import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence

from torch import nn

from ..fusion.member_utils import is_lora_member
from ..fusion.modeling_fusion import FusedModelMixin
from .atomic_save import SaveKind, atomic_save, check_save_target
from .fusion_config import (
    CONFIG_NAME,
    FUSED_TRANSFORMER,
    FUSED_UNET,
    MEMBER_CLASSES,
    SAVED_MEMBER_CLASSES,
    SOURCE_KEYS,
    check_fusion_config,
    saved_entries,
    transformer_member_class,
)
from .integrity import folder_digests

# One kind of save per fusion class (a journal names its kind); either may replace a save of the other.
FUSION_SAVES = {name: SaveKind(description=f"{name} save", commit_file=CONFIG_NAME, entries_of=saved_entries)
                for name in (FUSED_UNET, FUSED_TRANSFORMER)}  # fmt: skip
VARIANT = re.compile(r"[A-Za-z0-9_-]+")


def fusion_class_name(fused: Any) -> str:
    """`"FusedUNet"` or `"FusedTransformer"`: the `_class_name` a save of `fused` records."""
    # read from the class, so that loaders/ needs no import of models/ (which imports loaders/)
    names = {"transformers": FUSED_TRANSFORMER, "unets": FUSED_UNET}
    if isinstance(fused, FusedModelMixin) and fused.members_attribute in names:
        return names[fused.members_attribute]
    raise TypeError(f"expected a FusedUNet or a FusedTransformer, got {type(fused).__name__}")


def folder_name(name: str, variant: Optional[str], library: str) -> str:
    """`member_0.diffusers`, or `member_0.fp16.diffusers` with a variant (see the module docstring)."""
    return ".".join([name, *([variant] if variant else []), library])


def public_config(config: Any) -> Dict[str, Any]:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def _distinct_lora_bases(fused: Any) -> List[nn.Module]:
    bases: List[nn.Module] = []
    for member in fused.fusion_members:
        if is_lora_member(member) and _index_of(bases, member.base) is None:
            bases.append(member.base)
    return bases


def _index_of(modules: Sequence[nn.Module], module: nn.Module) -> Optional[int]:
    return next((i for i, known in enumerate(modules) if known is module), None)


def _loadable(model: nn.Module, class_name: str) -> bool:
    """Whether loading can instantiate `model`'s class: exactly a member class of the fusion's schema."""
    import diffusers

    name = type(model).__name__
    if class_name == FUSED_UNET:
        return name in MEMBER_CLASSES and type(model) is getattr(diffusers, name)
    return transformer_member_class(name) is type(model)


def _check_saveable(fused: Any, variant: Optional[str], safe_serialization: Any) -> None:
    if variant is not None and (not isinstance(variant, str) or not VARIANT.fullmatch(variant)):
        raise ValueError(f"variant must be letters, digits, '-' or '_' (e.g. 'fp16'), got {variant!r}")
    if not isinstance(safe_serialization, bool):
        raise TypeError(f"safe_serialization must be True or False, got {safe_serialization!r}")
    class_name = fusion_class_name(fused)
    expected = (f"{SAVED_MEMBER_CLASSES}" if class_name == FUSED_UNET else
                "Diffusers transformer models (classes of diffusers.models.transformers) and LoraMember")  # fmt: skip
    for i, member in enumerate(fused.fusion_members):
        model = member.base if is_lora_member(member) else member
        if not _loadable(model, class_name):
            what = f"a LoraMember of a {type(model).__name__}" if model is not member else f"a {type(model).__name__}"
            raise TypeError(
                f"member {i} is {what}; a {class_name} folder can only hold {expected} members (loading instantiates "
                "nothing else)"
            )


def fusion_config_to_save(
    fused: Any, reference_only: bool, member_sources: Optional[Sequence[Optional[Dict[str, Any]]]],
    variant: Optional[str],
) -> Dict[str, Any]:  # fmt: skip
    """The config a save writes (without the file checksums, added once the files are written)."""
    class_name = fusion_class_name(fused)
    sources = list(member_sources) if member_sources is not None else list(fused.member_sources)
    if len(sources) != fused.config.num_members:
        raise ValueError(f"member_sources must hold {fused.config.num_members} entries, got {len(sources)}")
    lora_bases = _distinct_lora_bases(fused)
    if lora_bases and reference_only:
        raise ValueError("reference_only=True is not supported for LoRA members (from_lora); save self-contained")
    members = []
    for i, member in enumerate(fused.fusion_members):
        entry = {"class_name": type(member).__name__, "config": jsonable(public_config(member.config))}
        if is_lora_member(member):
            entry["lora"] = {"base": _index_of(lora_bases, member.base), "adapter_name": member.adapter_name}
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
    bases = [{"subfolder": folder_name(f"lora_base_{b}", variant, "diffusers"), "variant": variant}
             for b in range(len(lora_bases))]  # fmt: skip
    config = {**dict(fused.config), "members": members, "lora_bases": bases, "_class_name": class_name}
    if class_name == FUSED_UNET:
        config["text_encoders"] = _text_encoder_entries(fused, reference_only, variant)
    config = jsonable(config)
    check_fusion_config(config, "the fusion config being saved", check_paths=False, class_name=class_name)
    return config


def _text_encoder_entries(fused: Any, reference_only: bool, variant: Optional[str]) -> List[Dict[str, Any]]:
    """A FusedUNet's member text encoders: saved here, or (reference-only) beside the first member that uses each."""
    entries = []
    for j, encoder in enumerate(fused.text_encoders):
        entry = {"class_name": type(encoder).__name__}
        if reference_only:  # the encoder beside the first member that uses it (its pipeline folder or repo)
            entry["member"] = fused.config.member_encoder_slots.index(j + 1)
        else:
            entry.update(subfolder=folder_name(f"text_encoder_{j + 1}", variant, "transformers"), variant=variant)
        entries.append(entry)
    return entries


def save_fusion(
    fused: Any,
    save_directory: str,
    reference_only: bool = False,
    member_sources: Optional[Sequence[Optional[Dict[str, Any]]]] = None,
    variant: Optional[str] = None,
    max_shard_size: Any = "10GB",
    safe_serialization: bool = True,
) -> None:
    """Writes `fused` (a `FusedUNet` or `FusedTransformer`) into `save_directory` (see the module docstring). With
    `safe_serialization=False` the members and LoRA bases are `.bin` files; LoRA adapters stay safetensors (their LoRA
    config lives in the file's header, which `.bin` lacks) and transformers writes text encoders as safetensors
    whatever is asked.

    Everything is checked before anything is written; other files in the folder are left alone.
    """
    _check_saveable(fused, variant, safe_serialization)
    config = fusion_config_to_save(fused, reference_only, member_sources, variant)
    kind = FUSION_SAVES[config["_class_name"]]
    check_save_target(save_directory, kind, [CONFIG_NAME, *(saved_entries(config) or [])])
    lora_bases = _distinct_lora_bases(fused)
    members = fused.fusion_members
    encoders = getattr(fused, "text_encoders", [])

    def write(staging: str) -> None:
        parts = [("member", entry, members[i]) for i, entry in enumerate(config["members"]) if not reference_only]
        parts += [("base", entry, lora_bases[b]) for b, entry in enumerate(config["lora_bases"])]
        parts += [("encoder", entry, encoders[j]) for j, entry in enumerate(config.get("text_encoders", []))
                  if "subfolder" in entry]  # fmt: skip
        for part, entry, module in parts:
            folder = os.path.join(staging, entry["subfolder"])
            if is_lora_member(module):  # safetensors always: the adapter's LoRA config is in its header
                module.save_lora_weights(folder)
            elif part == "base":
                from ..models.modeling_lora_member import save_base_model  # models/ imports loaders/: import late

                save_base_model(module, folder, max_shard_size=max_shard_size, safe_serialization=safe_serialization,
                                variant=variant)  # fmt: skip
            elif part == "encoder":
                module.save_pretrained(folder, variant=variant)  # transformers writes safetensors only
            else:
                module.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant,
                                       max_shard_size=max_shard_size)  # fmt: skip
            entry["sha256"] = folder_digests(folder)
        with open(os.path.join(staging, CONFIG_NAME), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
            handle.write("\n")

    atomic_save(save_directory, write, kind)
