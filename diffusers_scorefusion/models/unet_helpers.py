"""What a Diffusers pipeline or loader reads from, or calls on, a `UNet2DConditionModel`, provided by `FusedUNet` for
all its members: the block layout, IP-Adapter loading, block-wise LoRA scales, attention slicing, FreeU."""

from typing import Any, Dict, List, Optional, Union

from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales
from diffusers.models.modeling_utils import _LOW_CPU_MEM_USAGE_DEFAULT
from torch import nn

from ..fusion.member_utils import distinct_models
from ..fusion.modeling_fusion import member_method

# Config entries that fix a UNet's block layout (module names, attention processors, block-wise scales).
LAYOUT_KEYS = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "mid_block_type",
               "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim")  # fmt: skip


class FusedUNetHelpersMixin:
    """UNet helpers of `FusedUNet` (mixed in before `FusedModelMixin`)."""

    def _layout_model(self, reason: str) -> nn.Module:
        """Member 0's model when every member has the same block layout (as fine-tunes of one base do), else raise."""
        first = dict(self.unets[0].config)
        differing = [key for key in LAYOUT_KEYS if key in first and key not in self.config]
        if differing:
            raise AttributeError(
                f"{reason} needs members with one block layout; the members differ in {differing} "
                "(use fused.unets[i] for one member)"
            )
        return distinct_models(self.unets)[0]

    # ----------------------------------------------------------------------------------------------- layout
    @property
    def down_blocks(self) -> nn.ModuleList:
        """Member 0's `down_blocks`: the layout every member shares (for code that reads a UNet's structure, such as
        Diffusers' block-wise LoRA and IP-Adapter scales). Change members through the fusion's methods."""
        return self._layout_model("down_blocks").down_blocks

    @property
    def mid_block(self) -> Optional[nn.Module]:
        """Member 0's `mid_block` (see `down_blocks`)."""
        return self._layout_model("mid_block").mid_block

    @property
    def up_blocks(self) -> nn.ModuleList:
        """Member 0's `up_blocks` (see `down_blocks`)."""
        return self._layout_model("up_blocks").up_blocks

    @property
    def add_embedding(self) -> nn.Module:
        """Member 0's `add_embedding` (SDXL pipelines read its input size; members agree on it)."""
        return self.unets[0].add_embedding

    @property
    def encoder_hid_proj(self) -> Optional[nn.Module]:
        """Member 0's `encoder_hid_proj` (an IP-Adapter's image projection is one module shared by all members)."""
        return getattr(self.unets[0], "encoder_hid_proj", None)

    @encoder_hid_proj.setter
    def encoder_hid_proj(self, value: Optional[nn.Module]) -> None:
        """Sets it on every member; `None` (as `pipe.unload_ip_adapter()` sets it) also clears their
        `encoder_hid_dim_type`, as that method does on the fusion's config."""
        for model in distinct_models(self.unets):
            model.encoder_hid_proj = value
            if value is None:
                model.config.encoder_hid_dim_type = None

    # ----------------------------------------------------------------------------------------------- IP-Adapter
    def _load_ip_adapter_weights(self, state_dicts: Any, low_cpu_mem_usage: bool = _LOW_CPU_MEM_USAGE_DEFAULT) -> None:
        """Loads IP-Adapter weights (`pipe.load_ip_adapter`) for every member: the adapter's image projection and
        attention processors are built once and shared by all members, so one image encoding feeds them all and
        `pipe.set_ip_adapter_scale` reaches every member."""
        first = self._layout_model("load_ip_adapter")
        models = distinct_models(self.unets)
        missing = [type(model).__name__ for model in models if not hasattr(model, "_load_ip_adapter_weights")]
        if missing:
            raise NotImplementedError(f"load_ip_adapter() cannot be applied to the fusion: members {missing} lack it")
        first._load_ip_adapter_weights(state_dicts, low_cpu_mem_usage=low_cpu_mem_usage)
        for model in models[1:]:
            model.set_attn_processor(dict(first.attn_processors))
            model.encoder_hid_proj = first.encoder_hid_proj
            model.config.encoder_hid_dim_type = first.config.encoder_hid_dim_type
        self.register_to_config(encoder_hid_dim_type=first.config.encoder_hid_dim_type)

    def _load_ip_adapter_loras(self, state_dicts: Any) -> Dict[int, Dict[str, Any]]:
        """The FaceID LoRAs in IP-Adapter state dicts (keyed by a single UNet's module names, which all members
        share)."""
        return self._layout_model("load_ip_adapter")._load_ip_adapter_loras(state_dicts)

    # ----------------------------------------------------------------------------------------------- LoRA scales
    def set_adapters(self, adapter_names: Union[List[str], str], weights: Optional[Any] = None) -> None:
        """`PeftAdapterMixin.set_adapters`, with block-wise scales (`{"down": ..., "mid": ..., "up": ...}`) expanded
        over the members' shared UNet layout as Diffusers does for a `UNet2DConditionModel`."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        scales = weights if isinstance(weights, list) else [weights] * len(names)
        if any(isinstance(scale, dict) for scale in scales):
            scales = _maybe_expand_lora_scales(self, [1.0 if scale is None else scale for scale in scales])
            weights = scales
        PeftAdapterMixin.set_adapters(self, adapter_names, weights)

    # ----------------------------------------------------------------------------------------------- UNet helpers
    set_attention_slice = member_method("`set_attention_slice(slice_size)` on every member (attention slicing).")
    enable_freeu = member_method("`enable_freeu(s1, s2, b1, b2)` on every member (FreeU).")
    disable_freeu = member_method("Disables FreeU on every member.")
