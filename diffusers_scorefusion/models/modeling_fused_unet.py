"""`FusedUNet`: several denoisers behind one UNet interface, combined as ``sum_i lambda_i eps_i``.

This module's path is part of the on-disk format: Diffusers records it in a saved pipeline's
``model_index.json``. Keep the class here.
"""

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (Diffusers looks this name up in a component's module)
from diffusers.utils import BaseOutput
from torch import nn

from ..fusion.fusion_utils import PREDICTION_TYPES, WeightsLike, alpha_sigma, convert_prediction
from ..fusion.member_utils import (
    NOISE_SCHEDULE_KEYS,
    check_member_schedules,
    check_members,
    noise_schedule_of,
    resolve_member_prediction_types,
    shared_member_config,
    text_encoder_slots,
)
from ..fusion.modeling_fusion import FusedModelMixin, replace_first_field
from ..loaders.fusion_mixin import FusionSaveLoadMixin
from .unet_helpers import FusedUNetHelpersMixin


def check_scheduler_matches(unet: Any, scheduler: Any) -> None:
    """Refuses a scheduler whose prediction type or noise schedule differs from the FusedUNet's."""
    if not isinstance(unet, FusedUNet) or scheduler is None:
        return
    expected = unet.config.prediction_type
    actual = scheduler.config.get("prediction_type", "epsilon")
    if actual != expected:
        raise ValueError(
            f"the scheduler's prediction_type is {actual!r} but the FusedUNet outputs {expected!r}; use "
            f"`Scheduler.from_config(scheduler.config, prediction_type={expected!r})`"
        )
    if unet.config.noise_schedule is not None:
        schedule = noise_schedule_of(scheduler)
        differing = [f"{key}={schedule[key]!r} vs {unet.config.noise_schedule[key]!r}" for key in NOISE_SCHEDULE_KEYS
                     if schedule[key] != unet.config.noise_schedule[key]]  # fmt: skip
        if differing:
            raise ValueError(
                f"the scheduler's noise schedule differs from the members' (scheduler vs members): {differing}"
            )



class FusedUNet(FusedUNetHelpersMixin, FusionSaveLoadMixin, FusedModelMixin):
    r"""
    Several UNets that share one noise schedule, combined into the KL-barycenter denoiser of ScoreFusion.

    The output is ``sum_i weights[i] * output_i`` (Liu et al., AISTATS 2025): the noise prediction of the
    barycenter ``p ∝ prod_i p_i^lambda_i``. It is a drop-in `unet` for Diffusers pipelines and schedulers.

    Args:
        unets (`list[torch.nn.Module]`):
            The k >= 1 members: `UNet2DConditionModel`, `UNet2DModel`, or any module with the Diffusers UNet calling
            convention and a `config` holding at least `in_channels`, `out_channels` and `sample_size`.
        weights (`list[float]` or `list[list[float]]`, *optional*):
            The fusion weights, on the simplex: shape `(k,)`, or `(num_bins, k)` with `timestep_bin_edges` for weights
            that depend on the noise level. Defaults to uniform.
        timestep_bin_edges (`list[float]`, *optional*):
            `num_bins + 1` increasing timesteps; row `i` of `weights` applies to `edges[i] <= t < edges[i + 1]`.
        prediction_type (`str`, *optional*):
            What the fused model outputs (`"epsilon"`, `"v_prediction"` or `"sample"`). Defaults to the members' type
            when they all share one.
        member_prediction_types (`list[str]`, *optional*):
            What each member predicts. Defaults to the members' schedulers' `prediction_type`, else `"epsilon"`.
        member_schedulers (`list[SchedulerMixin | dict]`, *optional*):
            Each member's training scheduler (or its config). Their noise schedules must agree; the schedule is
            needed to convert between prediction types.
        member_text_encoders (`list[torch.nn.Module | None]`, *optional*):
            A member's own text encoder (e.g. a DreamBooth fine-tune that trained it), or `None` for members that use
            the pipeline's. `ScoreFusionPipeline` then encodes the prompt once per distinct encoder and each member
            receives its own encoding; members sharing an encoder share one encoding.
    """

    members_attribute = "unets"
    own_config_keys = ("prediction_type", "member_prediction_types", "noise_schedule", "member_encoder_slots")

    def __init__(
        self,
        unets: Sequence[nn.Module],
        weights: Optional[WeightsLike] = None,
        timestep_bin_edges: Optional[Sequence[float]] = None,
        prediction_type: Optional[str] = None,
        member_prediction_types: Optional[Sequence[str]] = None,
        member_schedulers: Optional[Sequence[Union[ConfigMixin, Dict[str, Any]]]] = None,
        member_text_encoders: Optional[Sequence[Optional[nn.Module]]] = None,
    ):
        super().__init__()
        if isinstance(unets, nn.Module) and not isinstance(unets, nn.ModuleList):
            raise TypeError(f"unets must be a list of modules, got a single {type(unets).__name__}")
        unets = list(unets)
        if len(unets) == 0:
            raise ValueError("unets must hold at least one member, got an empty list")
        interface = check_members(unets)
        num_members = len(unets)
        noise_schedule = check_member_schedules(member_schedulers, num_members)
        member_prediction_types = resolve_member_prediction_types(
            member_prediction_types, member_schedulers, num_members, members=unets
        )
        if prediction_type is None:
            if len(set(member_prediction_types)) > 1:
                raise ValueError(
                    f"members predict {member_prediction_types}: pass prediction_type= to choose what FusedUNet outputs"
                )
            prediction_type = member_prediction_types[0]
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if noise_schedule is None and any(t != prediction_type for t in member_prediction_types):
            raise ValueError(
                f"members predict {member_prediction_types} and FusedUNet outputs {prediction_type!r}: pass "
                "member_schedulers= (the members' training schedulers) so outputs can be converted exactly"
            )
        self.unets = nn.ModuleList(unets)
        encoder_slots = text_encoder_slots(member_text_encoders, num_members)
        self.text_encoders = nn.ModuleList(encoder_slots[1])
        self.member_sources: List[Optional[Dict[str, Any]]] = [None] * num_members
        self._alphas_cumprod = None
        if noise_schedule is not None:
            self._alphas_cumprod = DDPMScheduler.from_config(noise_schedule).alphas_cumprod.to(torch.float64)
        self.register_to_config(
            **{**shared_member_config(unets, reserved=self._reserved_config_keys()), **interface},
            num_members=num_members,
            prediction_type=prediction_type,
            member_prediction_types=list(member_prediction_types),
            noise_schedule=noise_schedule,
            member_encoder_slots=encoder_slots[0],
        )
        self.set_weights([1.0 / num_members] * num_members if weights is None else weights, timestep_bin_edges)

    @property
    def num_encoder_slots(self) -> int:
        """How many prompt encodings the fusion needs: the pipeline's encoder plus each distinct member encoder."""
        return 1 + len(self.text_encoders)

    def _member_hidden_states(
        self, index: int, encoder_hidden_states: Optional[torch.Tensor]
    ) -> Optional[torch.Tensor]:
        """Member `index`'s slice of the encodings, concatenated along the last dim (one block per encoder slot)."""
        slots = self.config.member_encoder_slots
        if slots is None or encoder_hidden_states is None:
            return encoder_hidden_states
        width = self.config.cross_attention_dim
        if encoder_hidden_states.shape[-1] != width * self.num_encoder_slots:
            raise ValueError(
                f"members have their own text encoders: encoder_hidden_states must concatenate "
                f"{self.num_encoder_slots} encodings of width {width} (last dim {width * self.num_encoder_slots}), got "
                f"shape {tuple(encoder_hidden_states.shape)}; use ScoreFusionPipeline, whose encode_prompt does this"
            )
        slot = slots[index]
        return encoder_hidden_states[..., slot * width : (slot + 1) * width]

    # ----------------------------------------------------------------------------------------------- forward
    def _convert(self, model_output: torch.Tensor, sample: torch.Tensor, timestep, member_type: str) -> torch.Tensor:
        if member_type == self.config.prediction_type:
            return model_output
        timesteps = torch.as_tensor(timestep, device=sample.device).flatten().expand(sample.shape[0])
        alpha_t, sigma_t = alpha_sigma(self._alphas_cumprod, timesteps)
        return convert_prediction(model_output, sample, alpha_t, sigma_t, member_type, self.config.prediction_type)

    def member_output(
        self, index: int, sample: torch.Tensor, timestep, return_dict: bool = False, **kwargs: Any
    ) -> Any:
        """Runs member `index` (no fusion, no conversion); `None`-valued keyword arguments are not passed.

        A member whose weights sit on another device (and that has no offloading hooks moving its inputs) gets its
        inputs moved there; its output comes back on `sample.device`.
        """
        if "encoder_hidden_states" in kwargs:
            kwargs["encoder_hidden_states"] = self._member_hidden_states(index, kwargs["encoder_hidden_states"])
        return self.call_member(index, sample, timestep, return_dict=return_dict, **kwargs)

    def member_outputs(
        self, sample: torch.Tensor, timestep, members: Optional[Sequence[int]] = None, **kwargs: Any
    ) -> torch.Tensor:
        """Each member's prediction converted to `config.prediction_type`, stacked: `(len(members), B, C, H, W)`."""
        members = range(self.config.num_members) if members is None else members
        outputs = [
            self._convert(self.member_output(i, sample, timestep, **kwargs)[0], sample, timestep,
                          self.config.member_prediction_types[i])
            for i in members
        ]  # fmt: skip
        return torch.stack(outputs)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        encoder_hidden_states: Optional[torch.Tensor] = None,
        class_labels: Optional[torch.Tensor] = None,
        timestep_cond: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        added_cond_kwargs: Optional[Dict[str, torch.Tensor]] = None,
        down_block_additional_residuals: Optional[Sequence[torch.Tensor]] = None,
        mid_block_additional_residual: Optional[torch.Tensor] = None,
        down_intrablock_additional_residuals: Optional[Sequence[torch.Tensor]] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Union[BaseOutput, tuple]:
        r"""
        The fused prediction ``sum_i lambda_i output_i``; members with weight 0 at this timestep are not run.

        Takes the arguments of `UNet2DConditionModel.forward`; every argument that is not `None` reaches every member.
        Returns the members' output class (e.g. `UNet2DConditionOutput`) or, with `return_dict=False`, a tuple.
        """
        member_kwargs = dict(
            encoder_hidden_states=encoder_hidden_states, class_labels=class_labels, timestep_cond=timestep_cond,
            attention_mask=attention_mask, cross_attention_kwargs=cross_attention_kwargs,
            added_cond_kwargs=added_cond_kwargs, down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
            down_intrablock_additional_residuals=down_intrablock_additional_residuals,
            encoder_attention_mask=encoder_attention_mask, **kwargs,
        )  # fmt: skip
        first_output, fused = self.fuse(
            timestep, sample.shape[0],
            run_member=lambda i: self.member_output(i, sample, timestep, return_dict=return_dict, **member_kwargs),
            convert=lambda i, x: self._convert(x, sample, timestep, self.config.member_prediction_types[i]),
        )  # fmt: skip
        if return_dict and isinstance(first_output, BaseOutput):
            return replace_first_field(first_output, fused)
        return (fused,)

    # ----------------------------------------------------------------------------------------------- LoRA members
    @classmethod
    def from_lora(
        cls,
        base_unet: nn.Module,
        loras: Sequence[Any],
        weights: Optional[WeightsLike] = None,
        adapter_names: Optional[Sequence[str]] = None,
        allow_pickle: bool = False,
    ) -> "FusedUNet":
        r"""
        A fusion of LoRA fine-tunes of one base UNet that holds the base once: one adapter per LoRA, one
        [`LoraMember`] per adapter.

        Args:
            base_unet (`UNet2DConditionModel`):
                The base the LoRAs were trained on. The adapters are loaded into it in place (no copy).
            loras (`list`):
                Diffusers LoRA folders (`pytorch_lora_weights.safetensors`), `.safetensors` files, Hub repo ids, or
                state dicts, as `pipe.load_lora_weights` reads them. UNet keys only: text-encoder LoRAs are refused.
            weights (`list[float]`, *optional*):
                The fusion weights (uniform by default).
            adapter_names (`list[str]`, *optional*):
                Adapter names in `base_unet` (default `member_0`, `member_1`, ...).
            allow_pickle (`bool`, defaults to `False`):
                Also read pickle (`.bin`) LoRA files. Only for files you trust.
        """
        from .modeling_lora_member import load_lora_members

        members = load_lora_members(base_unet, loras, adapter_names=adapter_names, allow_pickle=allow_pickle)
        return cls(members, weights=weights)
