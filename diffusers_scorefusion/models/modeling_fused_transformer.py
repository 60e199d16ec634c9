"""`FusedTransformer`: several Diffusers transformers behind one transformer's interface, combined as
``sum_i lambda_i v_i``.

This module's path is part of the on-disk format: Diffusers records it in a saved pipeline's ``model_index.json``.
Keep the class here.
"""

import contextlib
import inspect
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (Diffusers looks this name up in a component's module)
from torch import nn

from ..fusion.fusion_utils import WeightsLike
from ..fusion.member_utils import (
    check_member_schedules,
    check_transformer_members,
    copy_containers,
    flow_schedule_of,
    is_flow_matching,
    member_model,
    scheduler_class_and_config,
    underlying_model_class,
)
from ..fusion.modeling_fusion import FusedModelMixin, MemberHelperMissing, member_method, replace_first_field
from ..fusion.offload_utils import call_on_member_device
from ..loaders.fusion_mixin import FusionSaveLoadMixin

# Names under which transformers take the noise level (`t`: Z-Image).
TIMESTEP_ARGUMENTS = ("timestep", "timesteps", "t")
PLAIN_TYPES = (bool, int, float, str, type(None))


def _is_plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_plain(item) for item in value)
    return isinstance(value, PLAIN_TYPES)


def _batch_and_device(value: Any, name: str) -> Tuple[int, torch.device]:
    """Batch size and device of a transformer's main input: a tensor `(B, ...)` or a list of B tensors."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1:
        return value.shape[0], value.device
    if isinstance(value, (list, tuple)) and value and all(isinstance(item, torch.Tensor) for item in value):
        return len(value), value[0].device
    raise TypeError(f"`{name}` must be a tensor (B, ...) or a list of tensors, got {type(value).__name__}")


def check_scheduler_matches_transformer(transformer: Any, scheduler: Any) -> None:
    """Refuses a scheduler that cannot sample flow-matching members: one that does not take velocities, or one with
    another `num_train_timesteps` (the unit of `timestep`). Checked only when the members' schedule is known.

    The sampling shift is not compared: it only places the steps along the same flow (Flux shifts per resolution).
    The shift of the training density matters when fitting, where [`fit_weights`] compares it.
    """
    if not isinstance(transformer, FusedTransformer) or scheduler is None:
        return
    schedule = transformer.config.noise_schedule
    if schedule is None:
        return
    name, config = scheduler_class_and_config(scheduler)
    if not is_flow_matching(scheduler):
        raise ValueError(
            f"the members are flow-matching models (they predict velocities) but the scheduler is {name} with "
            f"prediction_type={config.get('prediction_type')!r}; use FlowMatchEulerDiscreteScheduler or a scheduler "
            "with use_flow_sigmas=True and prediction_type='flow_prediction'"
        )
    if int(config.get("num_train_timesteps", 1000)) != schedule["num_train_timesteps"]:
        raise ValueError(
            f"the scheduler has num_train_timesteps={config.get('num_train_timesteps')} but the members were trained "
            f"with {schedule['num_train_timesteps']}"
        )


class FusedTransformer(FusionSaveLoadMixin, FusedModelMixin):
    r"""
    Several Diffusers transformers of one class and config, combined into the KL-barycenter denoiser of ScoreFusion.

    The output is ``sum_i weights[i] * output_i`` (Liu et al., AISTATS 2025). For flow-matching members (SD3, Flux,
    Sana, QwenImage, ...) the outputs are velocities, and the weighted velocity is exactly the velocity of the fused
    score ``sum_i lambda_i score_i`` (see `fusion/flow_matching_utils.py`); for noise-predicting members (PixArt) it is
    the fused noise prediction. It is a drop-in `transformer` for the members' Diffusers pipelines: it takes the
    members' `forward` arguments (all of them reach every member, as given), returns their output class, and mirrors
    their config (`config.in_channels`, `config.guidance_embeds`, `config.patch_size`, ...). It saves and loads as
    [`FusedUNet`] does (`save_pretrained`, `from_pretrained`, `push_to_hub`: self-contained or reference-only, LoRA
    fusions as one base plus one LoRA folder per member), and as the `transformer` of a saved pipeline.

    Args:
        transformers (`list[torch.nn.Module]`):
            The k >= 1 members: Diffusers transformers of one class (e.g. `FluxTransformer2DModel`) with equal configs,
            or [`LoraMember`]s of one base ([`FusedTransformer.from_lora`]).
        weights (`list[float]` or `list[list[float]]`, *optional*):
            The fusion weights, on the simplex: shape `(k,)`, or `(num_bins, k)` with `timestep_bin_edges`. Defaults
            to uniform.
        timestep_bin_edges (`list[float]`, *optional*):
            `num_bins + 1` increasing values; row `i` of `weights` applies to `edges[i] <= timestep < edges[i + 1]`.
            They are in the units of the `timestep` the pipeline passes to the transformer: ``sigma * 1000`` for SD3
            and Sana (the scheduler's timesteps), ``sigma`` in [0, 1] for Flux and QwenImage (whose pipelines pass
            ``timestep / 1000``).
        member_schedulers (`list[SchedulerMixin | dict]`, *optional*):
            Each member's training scheduler (or its config), flow-matching. Their `num_train_timesteps` and training
            shift must agree; they let pipelines refuse an incompatible scheduler and `fit_weights` draw timesteps as
            the members were trained.
    """

    members_attribute = "transformers"
    own_config_keys = ("member_class", "noise_schedule")

    def __init__(
        self,
        transformers: Sequence[nn.Module],
        weights: Optional[WeightsLike] = None,
        timestep_bin_edges: Optional[Sequence[float]] = None,
        member_schedulers: Optional[Sequence[Union[ConfigMixin, Dict[str, Any]]]] = None,
    ):
        super().__init__()
        if isinstance(transformers, nn.Module) and not isinstance(transformers, nn.ModuleList):
            raise TypeError(f"transformers must be a list of modules, got a single {type(transformers).__name__}")
        transformers = list(transformers)
        if len(transformers) == 0:
            raise ValueError("transformers must hold at least one member, got an empty list")
        interface, member_class = check_transformer_members(transformers, reserved=self._reserved_config_keys())
        num_members = len(transformers)
        noise_schedule = check_member_schedules(member_schedulers, num_members, schedule_of=flow_schedule_of)
        self.transformers = nn.ModuleList(transformers)
        forward = underlying_model_class(transformers[0]).forward
        # The members' `forward` signature without `self`, and the name of their timestep argument (read per call).
        self._forward_signature = inspect.Signature(list(inspect.signature(forward).parameters.values())[1:])
        names = self._forward_signature.parameters
        self._timestep_argument = next((name for name in TIMESTEP_ARGUMENTS if name in names), None)
        self.member_sources: List[Optional[Dict[str, Any]]] = [None] * num_members
        self.register_to_config(**interface, num_members=num_members, member_class=member_class,
                                noise_schedule=noise_schedule)  # fmt: skip
        self.set_weights([1.0 / num_members] * num_members if weights is None else weights, timestep_bin_edges)

    # ----------------------------------------------------------------------------------------------- arguments
    def _bind(self, args: tuple, kwargs: dict) -> Dict[str, Any]:
        """The members' `forward` arguments by name, defaults filled in; refuses arguments the members do not take."""
        try:
            bound = self._forward_signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"FusedTransformer of {self.config.member_class} members: {error}") from None
        bound.apply_defaults()
        return dict(bound.arguments)

    # ----------------------------------------------------------------------------------------------- forward
    def _run_member(self, index: int, device: torch.device, args: tuple, kwargs: dict) -> Any:
        """Member `index` on the arguments as given (lists and dicts copied: members may pop from them), its inputs
        on its own device and its output on `device`."""
        args = tuple(copy_containers(dict(enumerate(args))).values())
        return call_on_member_device(self.transformers[index], device, args, copy_containers(kwargs))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        r"""
        The fused prediction ``sum_i lambda_i output_i``; members with weight 0 at this timestep are not run.

        Takes the arguments of the members' `forward` (e.g. `FluxTransformer2DModel.forward`: `hidden_states`,
        `encoder_hidden_states`, `pooled_projections`, `timestep`, `img_ids`, `txt_ids`, `guidance`,
        `joint_attention_kwargs`, ...), passed to every member as given. Returns the members' output class (e.g.
        `Transformer2DModelOutput`) with the fused prediction as its first field, or a tuple with `return_dict=False`;
        other fields are member 0's (the first member run).
        """
        arguments = self._bind(args, kwargs)
        main_name = next(iter(self._forward_signature.parameters))
        batch_size, device = _batch_and_device(arguments[main_name], main_name)
        timestep_name = self._timestep_argument
        timestep = arguments.get(timestep_name) if timestep_name is not None else None
        if timestep is None and self._weights_table.shape[0] > 1:
            raise ValueError("weights that depend on the timestep need a timestep; the call passed none")

        def run_member(i: int) -> Any:
            output = self._run_member(i, device, args, kwargs)
            if not isinstance(output[0], torch.Tensor):
                raise TypeError(f"member {i} returned {type(output[0]).__name__} first; the fusion combines tensors")
            return output

        first_output, fused = self.fuse(timestep if timestep is not None else 0, batch_size, run_member)
        return replace_first_field(first_output, fused)

    def member_outputs(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        members: Optional[Sequence[int]] = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Each member's prediction for `(hidden_states, timestep, **kwargs)`, stacked: `(len(members), B, ...)`."""
        names = list(self._forward_signature.parameters)
        if self._timestep_argument is None:
            raise TypeError(f"{self.config.member_class}.forward takes no timestep argument {TIMESTEP_ARGUMENTS}")
        kwargs = {names[0]: hidden_states, self._timestep_argument: timestep, **kwargs}
        if "return_dict" in names:
            kwargs["return_dict"] = False
        self._bind((), kwargs)
        members = range(self.config.num_members) if members is None else members
        return torch.stack([self._run_member(i, hidden_states.device, (), kwargs)[0] for i in members])

    # ----------------------------------------------------------------------------------------------- drop-in helpers
    def __getattr__(self, name: str) -> Any:
        """Config keys (as `ModelMixin`), then plain attributes of member 0 (numbers, strings, tuples of them, such
        as `inner_dim`): members share one config, so these agree. Submodules of members are not exposed."""
        try:
            return super().__getattr__(name)
        except MemberHelperMissing:
            raise
        except AttributeError:
            members = self.__dict__.get("_modules", {}).get(self.members_attribute)
            if name.startswith("_") or members is None or len(members) == 0:
                raise
        missing = object()
        value = getattr(member_model(members[0]), name, missing)
        if value is missing:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r} (nor do its members)")
        if not _is_plain(value):
            raise AttributeError(
                f"'{type(self).__name__}' object has no attribute {name!r}: the members' {name!r} is a "
                f"{type(value).__name__}, which the fusion does not expose (only plain values shared by all members)"
            )
        return value

    @property
    def encoder_hid_proj(self) -> Optional[nn.Module]:
        """Member 0's `encoder_hid_proj` (IP-Adapter image projection; pipelines read `num_ip_adapters` from it)."""
        return getattr(member_model(self.transformers[0]), "encoder_hid_proj", None)

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """Enters every member's `cache_context` (`CacheMixin`): Diffusers pipelines wrap each call in it."""
        with contextlib.ExitStack() as stack:
            for context in self._call_on_members("cache_context", name, **kwargs):
                stack.enter_context(context)
            yield

    def enable_cache(self, config: Any) -> None:
        """`CacheMixin.enable_cache` on every member; each keeps its own cache state."""
        self._call_on_members("enable_cache", config)

    def disable_cache(self) -> None:
        self._call_on_members("disable_cache")

    _reset_stateful_cache = member_method("Resets every member's cache state (pipelines call it after sampling).")

    @property
    def is_cache_enabled(self) -> bool:
        """Whether any member has a cache enabled."""
        return any(getattr(member, "is_cache_enabled", False) for member in self.transformers)

    # ----------------------------------------------------------------------------------------------- LoRA members
    @classmethod
    def from_lora(
        cls,
        base: nn.Module,
        loras: Sequence[Any],
        weights: Optional[WeightsLike] = None,
        adapter_names: Optional[Sequence[str]] = None,
        allow_pickle: bool = False,
        member_schedulers: Optional[Sequence[Union[ConfigMixin, Dict[str, Any]]]] = None,
    ) -> "FusedTransformer":
        r"""
        A fusion of LoRA fine-tunes of one base transformer that holds the base once: one PEFT adapter per LoRA, one
        [`LoraMember`] per adapter (memory: one transformer plus k adapters).

        Args:
            base (`FluxTransformer2DModel`, `SD3Transformer2DModel`, ... with `load_lora_adapter`):
                The base the LoRAs were trained on. The adapters are loaded into it in place (no copy).
            loras (`list`):
                Diffusers LoRA folders (`pytorch_lora_weights.safetensors`), `.safetensors` files, Hub repo ids, or
                state dicts. They are read and converted as the base's pipeline reads them (`FluxPipeline`:
                Kohya, XLabs, BFL and fal formats); transformer keys only: text-encoder LoRAs are refused.
            weights (`list[float]`, *optional*):
                The fusion weights (uniform by default).
            adapter_names (`list[str]`, *optional*):
                Adapter names in `base` (default `member_0`, `member_1`, ...).
            allow_pickle (`bool`, defaults to `False`):
                Also read pickle (`.bin`) LoRA files. Only for files you trust.
            member_schedulers (`list`, *optional*):
                As in [`FusedTransformer`] (e.g. the base pipeline's scheduler, once per LoRA).
        """
        from .modeling_lora_member import load_lora_members

        members = load_lora_members(base, loras, adapter_names=adapter_names, allow_pickle=allow_pickle)
        return cls(members, weights=weights, member_schedulers=member_schedulers)
