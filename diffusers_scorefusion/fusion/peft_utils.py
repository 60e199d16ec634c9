"""LoRA on a whole fusion: one adapter (a style LoRA, an IP-Adapter FaceID LoRA) applied to every member.

Diffusers' PEFT integration (`PeftAdapterMixin`, which Diffusers models inherit) already works on the fusion as one
model for everything that walks its modules: `add_adapter` (which matches target modules by name suffix, so it reaches
every member), `set_adapters`, `fuse_lora`, `unfuse_lora`, `disable_lora`, `delete_adapters`, `unload_lora`. What
differs is loading a state dict written for *one* model: its keys (`down_blocks.0...to_q.lora_A.weight`) name the
member's modules, so the fusion repeats them once per member (`unets.0.down_blocks...`, `unets.1.down_blocks...`).
"""

from typing import Any, Dict, List, Optional

from diffusers.loaders.lora_base import _fetch_state_dict
from diffusers.loaders.peft import PeftAdapterMixin

from .member_utils import distinct_models

HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder",
              "weight_name", "use_safetensors")  # fmt: skip


class FusedPeftMixin(PeftAdapterMixin):
    """Diffusers' `PeftAdapterMixin` for a fusion: LoRA adapters applied to every member."""

    def _member_prefixes(self) -> List[str]:
        """Module path of each distinct member model inside the fusion (`unets.0`, `unets.1`, ...)."""
        paths = {id(module): name for name, module in self.named_modules()}
        return [paths[id(model)] for model in distinct_models(self.fusion_members)]

    def _refuse_lora_members(self, action: str) -> None:
        if any(hasattr(member, "adapter_name") and hasattr(member, "base") for member in self.fusion_members):
            raise ValueError(
                f"{action}: this fusion's members are LoRA adapters of one base (FusedUNet.from_lora), which activate "
                "their own adapter at every call; a LoRA for all members would be switched off. Load and fuse it "
                "into the base (`base.load_lora_adapter(...); base.fuse_lora()`) before `from_lora`."
            )

    def add_adapter(self, adapter_config: Any, adapter_name: str = "default") -> None:
        """`PeftAdapterMixin.add_adapter` on every member (target modules match each member's modules)."""
        self._refuse_lora_members("add_adapter")
        PeftAdapterMixin.add_adapter(self, adapter_config, adapter_name=adapter_name)

    def load_lora_adapter(
        self, pretrained_model_name_or_path_or_dict: Any, prefix: Optional[str] = "transformer", hotswap: bool = False,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        r"""
        `PeftAdapterMixin.load_lora_adapter` for every member: a LoRA written for one member model (keys such as
        `unet.down_blocks...lora_A.weight`, as `pipe.load_lora_weights` passes them) is loaded into each member, as
        one adapter of the fusion. A state dict taken from a fusion (`unets.0...` keys) loads as it is.
        """
        self._refuse_lora_members("load_lora_adapter")
        hub_kwargs = {key: kwargs.pop(key, None) for key in HUB_KWARGS}
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
            weight_name=hub_kwargs["weight_name"], use_safetensors=hub_kwargs["use_safetensors"],
            local_files_only=hub_kwargs["local_files_only"], cache_dir=hub_kwargs["cache_dir"],
            force_download=bool(hub_kwargs["force_download"]), proxies=hub_kwargs["proxies"], token=hub_kwargs["token"],
            revision=hub_kwargs["revision"], subfolder=hub_kwargs["subfolder"],
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"}, allow_pickle=False,
            metadata=kwargs.pop("metadata", None),
        )  # fmt: skip
        network_alphas = kwargs.pop("network_alphas", None)
        state_dict = _strip_prefix(state_dict, prefix)
        network_alphas = None if network_alphas is None else _strip_prefix(network_alphas, prefix)
        metadata = None if metadata is None else _strip_prefix(metadata, prefix, keep_unprefixed=True)
        prefixes = self._member_prefixes()
        fusion_form = bool(state_dict) and all(key.startswith(f"{self.members_attribute}.") for key in state_dict)
        if not fusion_form:
            state_dict = _repeat_for_members(state_dict, prefixes)
            network_alphas = None if network_alphas is None else _repeat_for_members(network_alphas, prefixes)
        # Diffusers needs a prefix when network alphas are given: one it strips again at once.
        tag = "fusion"
        PeftAdapterMixin.load_lora_adapter(
            self, {f"{tag}.{key}": value for key, value in state_dict.items()}, prefix=tag, hotswap=hotswap,
            network_alphas=None if network_alphas is None else {f"{tag}.{k}": v for k, v in network_alphas.items()},
            metadata=None if metadata is None else {f"{tag}.{k}": v for k, v in metadata.items()}, **kwargs,
        )  # fmt: skip


def _strip_prefix(mapping: Dict[str, Any], prefix: Optional[str], keep_unprefixed: bool = False) -> Dict[str, Any]:
    """The entries under `prefix.` with it removed (all entries when `prefix` is `None`)."""
    if prefix is None:
        return dict(mapping)
    stripped = {key[len(prefix) + 1 :]: value for key, value in mapping.items() if key.startswith(f"{prefix}.")}
    if keep_unprefixed and not stripped:
        return dict(mapping)
    return stripped


def _repeat_for_members(mapping: Dict[str, Any], prefixes: List[str]) -> Dict[str, Any]:
    """Each entry once per member, under that member's module path."""
    return {f"{prefix}.{key}": value for prefix in prefixes for key, value in mapping.items()}

