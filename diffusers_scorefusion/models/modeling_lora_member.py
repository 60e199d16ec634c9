"""`LoraMember`: one LoRA fine-tune as a fusion member that shares its base model with the other members.

k LoRA fine-tunes of one base model (a UNet or a transformer) cost one base plus k adapters: each member holds a
reference to the same base (with every adapter loaded through Diffusers' PEFT integration) and activates its own
adapter before it runs. LoRA files are read and converted as the base's Diffusers pipeline reads them.
"""

import contextlib
import inspect
import os
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders import lora_pipeline
from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn

from ..loaders.integrity import needs_unpickling, unpickling_refused

LoraSpec = Union[str, os.PathLike, Mapping[str, torch.Tensor]]

# Prefixes of a Diffusers pipeline-format LoRA file (`pytorch_lora_weights.safetensors`).
UNET_PREFIX = "unet"
TRANSFORMER_PREFIX = "transformer"
TEXT_ENCODER_PREFIXES = ("text_encoder", "text_encoder_2", "text_encoder_3", "te", "te1", "te2")
# The LoRA loader of each transformer's pipeline (it converts Kohya / XLabs / ... formats as `load_lora_weights` does).
# Other transformers get SD3's reader, which reads Diffusers-format LoRAs without conversion.
TRANSFORMER_LORA_LOADERS = {
    "FluxTransformer2DModel": "FluxLoraLoaderMixin",
    "Flux2Transformer2DModel": "Flux2LoraLoaderMixin",
    "SD3Transformer2DModel": "SD3LoraLoaderMixin",
    "SanaTransformer2DModel": "SanaLoraLoaderMixin",
    "QwenImageTransformer2DModel": "QwenImageLoraLoaderMixin",
}


def lora_format(base: nn.Module) -> Tuple[str, type]:
    """`(prefix, loader mixin)` for LoRAs of `base`: `("unet", StableDiffusionXLLoraLoaderMixin)` for UNets,
    `("transformer", <its pipeline's loader>)` for transformers."""
    name = type(base).__name__
    if name.startswith("UNet"):
        return UNET_PREFIX, StableDiffusionXLLoraLoaderMixin
    return TRANSFORMER_PREFIX, getattr(lora_pipeline, TRANSFORMER_LORA_LOADERS.get(name, "SD3LoraLoaderMixin"))


def _kind(prefix: str) -> str:
    return "UNet" if prefix == UNET_PREFIX else "transformer"


class LoraMember(nn.Module):
    r"""
    A fusion member that runs a shared base model (UNet or transformer) with one of its LoRA adapters active.

    Several `LoraMember`s hold the same `base`: the fusion's `parameters()` counts its weights once, and moving the
    fusion (`.to(device)`, `.to(dtype)`, model CPU offload) moves the one base. The base's active adapter is left at
    the last member that ran.

    Args:
        base (`UNet2DConditionModel`, `FluxTransformer2DModel`, ...):
            The shared base model, with the adapter `adapter_name` loaded (`load_lora_adapter`).
        adapter_name (`str`):
            The adapter this member activates.
    """

    def __init__(self, base: nn.Module, adapter_name: str):
        super().__init__()
        if not hasattr(base, "set_adapter") or not hasattr(base, "config"):
            raise TypeError(
                "base must be a Diffusers model with PEFT adapters (e.g. UNet2DConditionModel), "
                f"got {type(base).__name__}"
            )
        loaded = list(getattr(base, "peft_config", {}))
        if adapter_name not in loaded:
            raise ValueError(f"adapter {adapter_name!r} is not loaded in the base model; loaded adapters: {loaded}")
        self.base = base
        self.adapter_name = adapter_name

    @property
    def config(self) -> Any:
        """The base model's config."""
        return self.base.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Activates this member's adapter and runs the base model (the base's `forward` arguments)."""
        self.base.set_adapter(self.adapter_name)
        return self.base(*args, **kwargs)

    # ----------------------------------------------------------------------------------------------- the adapter
    def lora_state_dict(self) -> Dict[str, torch.Tensor]:
        """This adapter's weights with PEFT keys and no adapter name (`down_blocks.1...to_q.lora_A.weight`)."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.base, adapter_name=self.adapter_name)

    def lora_metadata(self) -> Dict[str, Any]:
        """This adapter's `LoraConfig` as a JSON-serialisable dict (rank, alpha, target modules, patterns)."""
        config = self.base.peft_config[self.adapter_name].to_dict()
        return {key: (sorted(value) if isinstance(value, set) else value) for key, value in config.items()}

    def save_lora_weights(self, save_directory: Union[str, os.PathLike]) -> None:
        """Writes this adapter as a Diffusers LoRA folder (`pytorch_lora_weights.safetensors`, keys `unet.*` or
        `transformer.*`).

        The folder loads with `from_lora`, `pipe.load_lora_weights` and `base.load_lora_adapter(..., prefix=...)`.
        """
        prefix, loader = lora_format(self.base)
        if prefix == UNET_PREFIX:
            StableDiffusionPipeline.save_lora_weights(
                save_directory, unet_lora_layers=self.lora_state_dict(), unet_lora_adapter_metadata=self.lora_metadata()
            )
            return
        loader.save_lora_weights(save_directory, transformer_lora_layers=self.lora_state_dict(),
                                 transformer_lora_adapter_metadata=self.lora_metadata())  # fmt: skip

    # ----------------------------------------------------------------------------------------------- model helpers
    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """The base's `cache_context` (transformer pipelines enter it around every call)."""
        with self.base.cache_context(name, **kwargs):
            yield

    @property
    def encoder_hid_proj(self) -> Optional[nn.Module]:
        return getattr(self.base, "encoder_hid_proj", None)

    @property
    def add_embedding(self) -> nn.Module:
        return self.base.add_embedding

    @property
    def attn_processors(self) -> Dict[str, Any]:
        return self.base.attn_processors

    def set_attn_processor(self, processor: Any) -> None:
        self.base.set_attn_processor(processor)

    def set_default_attn_processor(self) -> None:
        self.base.set_default_attn_processor()

    def set_attention_slice(self, slice_size: Union[str, int, List[int]] = "auto") -> None:
        self.base.set_attention_slice(slice_size)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        self.base.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)

    def disable_freeu(self) -> None:
        self.base.disable_freeu()

    def enable_forward_chunking(self, chunk_size: Optional[int] = None, dim: int = 0) -> None:
        self.base.enable_forward_chunking(chunk_size=chunk_size, dim=dim)

    def disable_forward_chunking(self) -> None:
        self.base.disable_forward_chunking()


def base_state_dict(base: nn.Module) -> Dict[str, torch.Tensor]:
    """The base model's own weights under its plain Diffusers names: adapter weights dropped, `base_layer.` removed."""
    return {key.replace(".base_layer.", "."): value for key, value in base.state_dict().items() if ".lora_" not in key}


def save_base_model(
    base: nn.Module,
    save_directory: Union[str, os.PathLike],
    max_shard_size: Union[int, str] = "10GB",
    safe_serialization: bool = True,
    variant: Optional[str] = None,
) -> None:
    """Writes the shared base model (a UNet or a transformer) without its adapters as a standard Diffusers model folder
    (file names, shards and variant as `ModelMixin.save_pretrained` writes them); its class's `from_pretrained` (e.g.
    `UNet2DConditionModel.from_pretrained`) loads it."""
    from huggingface_hub import save_torch_state_dict

    os.makedirs(save_directory, exist_ok=True)
    base.save_config(save_directory)
    extension = "safetensors" if safe_serialization else "bin"
    name = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    save_torch_state_dict(
        base_state_dict(base), save_directory, filename_pattern=f"{name}{{suffix}}.{extension}",
        max_shard_size=max_shard_size, safe_serialization=safe_serialization,
        metadata={"format": "pt"} if safe_serialization else None,
    )  # fmt: skip


def _describe(lora: LoraSpec) -> str:
    return f"state dict with {len(lora)} tensors" if isinstance(lora, Mapping) else repr(os.fspath(lora))


def fetch_lora_state_dict(
    lora: LoraSpec, allow_pickle: bool = False, loader: type = StableDiffusionXLLoraLoaderMixin, **hub_kwargs: Any
) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, float]], Optional[Dict[str, Any]]]:
    """Reads a LoRA (folder, `.safetensors` file, Hub repo id or state dict) with a Diffusers LoRA reader.

    Returns `(state_dict, network_alphas, metadata)` as `loader.lora_state_dict` gives them (for the default SDXL
    reader, Kohya / A1111 keys converted to Diffusers'; for `FluxLoraLoaderMixin`, Kohya, XLabs, BFL and fal keys).
    `.bin` files are read only with `allow_pickle=True`, and then with torch's `weights_only=True` loader as Diffusers
    reads them: a file that would need full unpickling is refused.
    """
    kwargs: Dict[str, Any] = dict(hub_kwargs)
    if isinstance(lora, Mapping):
        bad = [key for key, value in lora.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
        if bad or not lora:
            raise TypeError(f"a LoRA state dict must map names to tensors and not be empty; bad entries: {bad[:3]}")
        source = dict(lora)
    elif isinstance(lora, (str, os.PathLike)):
        source = os.fspath(lora)
        if os.path.isfile(source):
            source, kwargs["weight_name"] = os.path.split(source)
            if not kwargs["weight_name"].endswith(".safetensors") and not allow_pickle:
                raise ValueError(
                    f"LoRA file {lora!r} is not a .safetensors file; pass allow_pickle=True to read .bin files "
                    "(through torch's weights_only=True loader, which runs no code)"
                )
        elif not os.path.isdir(source):
            try:
                validate_repo_id(source)
            except HFValidationError as error:
                raise ValueError(f"LoRA {source!r} is neither a local folder or file nor a Hub repo id") from error
    else:
        raise TypeError(f"a LoRA must be a folder, file, Hub repo id or state dict, got {type(lora).__name__}")
    # `use_safetensors=None` lets Diffusers fall back to pickle files; `True` reads safetensors only.
    kwargs["use_safetensors"] = None if allow_pickle else True
    if "return_alphas" in inspect.signature(loader.lora_state_dict).parameters:
        kwargs["return_alphas"] = True  # Flux: alphas of some community formats
    try:
        result = loader.lora_state_dict(source, return_lora_metadata=True, **kwargs)
    except Exception as error:  # noqa: BLE001  (Diffusers wraps a refused pickle in several error types)
        if needs_unpickling(error):
            raise unpickling_refused(error, f"LoRA {_describe(lora)}") from error
        if not isinstance(error, (OSError, ValueError, KeyError)):
            raise
        hint = "" if allow_pickle else " (only .safetensors files are read unless allow_pickle=True)"
        raise ValueError(f"could not read LoRA {_describe(lora)}{hint}: {error}") from error
    state_dict, network_alphas, metadata = result if len(result) == 3 else (result[0], None, result[1])
    return dict(state_dict), network_alphas or None, metadata


def _denoiser_part(state_dict: Dict[str, torch.Tensor], metadata: Optional[Dict[str, Any]], name: str, prefix: str):
    """The denoiser's keys (PEFT names) and metadata with a `{prefix}.` prefix; text-encoder LoRA keys are refused."""
    prefixes = {key.split(".", 1)[0] for key in state_dict}
    text_encoder = sorted(prefixes & set(TEXT_ENCODER_PREFIXES))
    if text_encoder:
        raise ValueError(
            f"LoRA {name} also adapts {text_encoder}: a fusion member can only change the {_kind(prefix)}; keep the "
            f"LoRA's `{prefix}.*` keys only (the text encoders are shared by all members)"
        )
    if prefix not in prefixes:  # adapter format (`model.save_lora_adapter`): keys and metadata without prefix
        state_dict = {f"{prefix}.{key}": value for key, value in state_dict.items()}
        if metadata is not None and not any(key.startswith(f"{prefix}.") for key in metadata):
            metadata = {f"{prefix}.{key}": value for key, value in metadata.items()}
    elif prefixes != {prefix}:
        raise ValueError(f"LoRA {name} mixes `{prefix}.` keys with keys starting {sorted(prefixes - {prefix})}")
    # Every key to PEFT names (`lora.down` -> `lora_A`); Diffusers converts only if the first key needs it.
    return convert_unet_state_dict_to_peft(state_dict), metadata


def _check_tensors(state_dict: Dict[str, torch.Tensor], name: str) -> None:
    """Refuses LoRA tensors that are not floating point, `lora_A`/`lora_B` weights that are not matrices (or conv
    kernels), and an A without its B (or a B without its A)."""
    not_float = sorted(key for key, value in state_dict.items() if not value.is_floating_point())
    if not_float:
        raise TypeError(
            f"LoRA {name} holds tensors that are not floating point: {not_float[:3]} "
            f"({state_dict[not_float[0]].dtype}); LoRA weights must be float16, bfloat16 or float32"
        )
    pairs: Dict[str, set] = {}
    for key, value in state_dict.items():
        if ".lora_A." in key or ".lora_B." in key:
            module, part = key.rsplit(".lora_", 1)
            if part.endswith("weight") and value.ndim not in (2, 4):
                raise ValueError(
                    f"LoRA {name}: {key} has shape {tuple(value.shape)}; lora_A and lora_B weights must be matrices "
                    "(2-D) or convolution kernels (4-D)"
                )
            if part[1:] == ".weight":  # (lora_B may also carry a bias)
                pairs.setdefault(module, set()).add(part[0])
    unpaired = sorted(f"{module} (only lora_{''.join(parts)})" for module, parts in pairs.items() if len(parts) != 2)
    if unpaired:
        raise ValueError(f"LoRA {name} lacks the lora_A or lora_B half of {unpaired[:3]}")


def _check_targets(base: nn.Module, state_dict: Dict[str, torch.Tensor], name: str, prefix: str) -> None:
    """Refuses a LoRA whose target modules the base lacks, or whose shapes do not fit them."""
    peft_keys = {key[len(prefix) + 1:]: value for key, value in state_dict.items()}
    modules = dict(base.named_modules())
    missing, mismatched = set(), []
    for key, value in peft_keys.items():
        if ".lora_" not in key:
            raise ValueError(
                f"LoRA {name} holds {key!r}, which is not a LoRA weight (expected `<module>.lora_A.weight`-style keys)"
            )
        module_name, part = key.rsplit(".lora_", 1)
        module = modules.get(module_name)
        layer = getattr(module, "base_layer", module)  # a module another adapter already wraps
        if module is None or not isinstance(layer, (nn.Linear, nn.Conv2d)):
            missing.add(module_name)
            continue
        expected = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        actual = value.shape[1] if part.startswith("A.") else None
        if part.startswith("B.weight"):
            expected = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            actual = value.shape[0]
        if actual is not None and actual != expected:
            mismatched.append(f"{key}: {actual} vs {expected}")
    kind = _kind(prefix)
    if missing:
        raise ValueError(
            f"LoRA {name} targets {len(missing)} modules the base {kind} lacks (or are not Linear/Conv2d), "
            f"e.g. {sorted(missing)[:3]}"
        )
    if mismatched:
        raise ValueError(f"LoRA {name} does not fit the base {kind} (LoRA size vs layer size): {mismatched[:3]}")


def load_lora_members(
    base_unet: nn.Module,
    loras: Sequence[LoraSpec],
    adapter_names: Optional[Sequence[str]] = None,
    allow_pickle: bool = False,
    **hub_kwargs: Any,
) -> List[LoraMember]:
    """Loads each LoRA into the base model `base_unet` (a UNet or a transformer; in place) as its own adapter and
    returns one `LoraMember` per LoRA.

    LoRAs are read with the reader of the base's pipeline ([`lora_format`]). Every LoRA is read and checked before any
    is loaded; if loading one fails, the adapters loaded so far are removed.
    """
    if not hasattr(base_unet, "load_lora_adapter"):
        raise TypeError(
            "the base must be a Diffusers model with LoRA support (UNet2DConditionModel, FluxTransformer2DModel, ...), "
            f"got {type(base_unet).__name__}"
        )
    prefix, loader = lora_format(base_unet)
    if isinstance(loras, (str, os.PathLike, Mapping)) or len(loras) == 0:
        raise ValueError(f"loras must be a non-empty list of LoRAs (one per member), got {loras!r:.200}")
    names = [f"member_{i}" for i in range(len(loras))] if adapter_names is None else list(adapter_names)
    if len(names) != len(loras) or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"adapter_names must be {len(loras)} distinct non-empty strings, got {names}")
    taken = sorted(set(names) & set(getattr(base_unet, "peft_config", {})))
    if taken:
        raise ValueError(f"adapter names {taken} are already loaded in the base; pass other adapter_names")
    prepared = []
    for i, lora in enumerate(loras):
        label = f"{i} ({_describe(lora)})"
        state_dict, network_alphas, metadata = fetch_lora_state_dict(lora, allow_pickle=allow_pickle, loader=loader,
                                                                     **hub_kwargs)  # fmt: skip
        state_dict, metadata = _denoiser_part(state_dict, metadata, label, prefix)
        _check_tensors(state_dict, label)
        _check_targets(base_unet, state_dict, label, prefix)
        prepared.append((label, state_dict, network_alphas, metadata))
    loaded = []
    try:
        for name, (label, state_dict, network_alphas, metadata) in zip(names, prepared):
            try:
                with warnings.catch_warnings():  # several adapters in one model is the point here
                    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                    base_unet.load_lora_adapter(state_dict, prefix=prefix, network_alphas=network_alphas,
                                                metadata=metadata, adapter_name=name)  # fmt: skip
            except (RuntimeError, KeyError) as error:
                raise ValueError(f"LoRA {label} could not be loaded into the base {_kind(prefix)}: {error}") from error
            loaded.append(name)
    except Exception:
        if loaded:
            base_unet.delete_adapters(loaded)
        raise
    return [LoraMember(base_unet, name) for name in names]
