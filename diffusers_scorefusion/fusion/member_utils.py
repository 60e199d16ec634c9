"""Checks and small helpers for fusion members (`FusedUNet`, `FusedTransformer`): interfaces, noise schedules,
prediction types, encoders."""

import math
import numbers
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin
from torch import nn

from .fusion_utils import PREDICTION_TYPES

# Config keys pipelines read from `pipe.unet.config`; every member must agree on them.
INTERFACE_KEYS = (
    "in_channels",
    "out_channels",
    "sample_size",
    "cross_attention_dim",
    "time_cond_proj_dim",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "class_embed_type",
    "num_class_embeds",
)
# Scheduler config keys that define the training noise schedule (alphas_cumprod).
NOISE_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
)
NOISE_SCHEDULE_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                           "beta_schedule": "linear", "trained_betas": None,
                           "rescale_betas_zero_snr": False}  # fmt: skip


def config_get(config: Any, key: str) -> Any:
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


def noise_schedule_of(scheduler: Union[ConfigMixin, Dict[str, Any]]) -> Dict[str, Any]:
    """The noise-schedule part of a scheduler (or scheduler config), defaults filled in."""
    config = scheduler if isinstance(scheduler, dict) else getattr(scheduler, "config", None)
    if config is None:
        raise TypeError(f"expected a Diffusers scheduler or a scheduler config dict, got {type(scheduler).__name__}")
    schedule = {}
    for key in NOISE_SCHEDULE_KEYS:
        value = config_get(config, key)
        schedule[key] = NOISE_SCHEDULE_DEFAULTS[key] if value is None else value
    betas = schedule["trained_betas"]
    if betas is not None:
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__"):
            raise TypeError(f"trained_betas must be a list of numbers, got {betas!r:.100}")
        if not all(isinstance(beta, numbers.Real) and not isinstance(beta, bool) for beta in list(betas)):
            raise TypeError(f"trained_betas must hold real numbers, got {list(betas)[:5]!r}...")
        schedule["trained_betas"] = [float(beta) for beta in betas]
    return schedule


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_noise_schedule(schedule: Dict[str, Any], name: str = "noise schedule") -> None:
    """Refuses a noise schedule that would give NaN or out-of-range timesteps: at least one timestep, finite betas in
    (0, 1) (the last may be 1 with `rescale_betas_zero_snr`), `trained_betas` of length `num_train_timesteps`."""
    from diffusers import DDPMScheduler  # here: this module's checks otherwise need no Diffusers

    count = schedule["num_train_timesteps"]
    if not _is_int(count) or count < 1:
        raise ValueError(f"{name}: num_train_timesteps must be an int >= 1, got {count!r}")
    for key in ("beta_start", "beta_end"):
        if not _is_real(schedule[key]) or not 0 < schedule[key] < 1:
            raise ValueError(f"{name}: {key} must be a finite number in (0, 1), got {schedule[key]!r}")
    if not isinstance(schedule["rescale_betas_zero_snr"], bool):
        raise TypeError(
            f"{name}: rescale_betas_zero_snr must be True or False, got {schedule['rescale_betas_zero_snr']!r}"
        )
    if not isinstance(schedule["beta_schedule"], str):
        raise TypeError(f"{name}: beta_schedule must be a string, got {schedule['beta_schedule']!r}")
    trained = schedule["trained_betas"]
    if trained is not None and len(trained) != count:
        raise ValueError(f"{name}: trained_betas has {len(trained)} entries but num_train_timesteps is {count}")
    try:
        betas = DDPMScheduler.from_config(schedule).betas.to(torch.float64)
    except (NotImplementedError, ValueError, TypeError, RuntimeError) as error:
        raise ValueError(f"{name}: not a schedule Diffusers can build ({error})") from error
    upper = torch.full_like(betas, 1 - 1e-12)
    if schedule["rescale_betas_zero_snr"]:
        upper[-1] = 1.0  # a zero-terminal-SNR schedule reaches beta = 1 at its last timestep
    bad = (~torch.isfinite(betas)) | (betas <= 0) | (betas > upper)
    if bad.any():
        first = int(bad.nonzero()[0])
        raise ValueError(
            f"{name}: betas must be finite and in (0, 1), got {betas[first].item()!r} at timestep {first} "
            f"({int(bad.sum())} bad of {betas.numel()})"
        )


def plain(value: Any) -> Any:
    """Tuples as lists, so configs compare equal however they were stored."""
    return list(value) if isinstance(value, tuple) else value


def copy_containers(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Shallow copies of list and dict arguments, one set per member call."""
    # UNet2DConditionModel pops from `down_intrablock_additional_residuals` and `cross_attention_kwargs`.
    return {key: (type(value)(value) if isinstance(value, (list, dict)) else value) for key, value in kwargs.items()}


def check_members(unets: List[nn.Module]) -> Dict[str, Any]:
    """Refuses members that are not UNet-like or disagree with member 0; returns the shared interface config."""
    for i, unet in enumerate(unets):
        if not isinstance(unet, nn.Module):
            raise TypeError(f"member {i} must be a torch.nn.Module, got {type(unet).__name__}")
        config = getattr(unet, "config", None)
        missing = [key for key in ("in_channels", "out_channels", "sample_size") if config_get(config, key) is None]
        if config is None or missing:
            raise TypeError(
                f"member {i} ({type(unet).__name__}) needs a `config` with in_channels, out_channels and "
                f"sample_size; missing {missing if config is not None else 'the config'}"
            )
    reference = {key: plain(config_get(unets[0].config, key)) for key in INTERFACE_KEYS}
    for i, unet in enumerate(unets[1:], start=1):
        for key, expected in reference.items():
            value = plain(config_get(unet.config, key))
            if value != expected:
                raise ValueError(f"member {i} has {key}={value!r} but member 0 has {key}={expected!r}")
    check_member_dtypes(unets)
    return reference


def check_member_dtypes(members: Sequence[nn.Module]) -> None:
    """Refuses members whose parameters have another dtype than member 0's."""
    dtypes = [next(member.parameters(), torch.empty(0)).dtype for member in members]
    for i, dtype in enumerate(dtypes[1:], start=1):
        if dtype != dtypes[0]:
            raise ValueError(f"member {i} has dtype {dtype} but member 0 has dtype {dtypes[0]}")


def distinct_models(members: Sequence[nn.Module]) -> List[nn.Module]:
    """The distinct models behind the members, in order: `LoraMember`s of one base share that base."""
    models: List[nn.Module] = []
    for member in members:
        model = member_model(member)
        if not any(model is known for known in models):
            models.append(model)
    return models


def _config_dict(config: Any) -> Dict[str, Any]:
    """A member's config as a dict (Diffusers' `FrozenDict`, or any object with attributes)."""
    if config is None:
        return {}
    return dict(config) if isinstance(config, dict) else dict(vars(config))


def shared_member_config(members: Sequence[nn.Module], reserved: Sequence[str] = ()) -> Dict[str, Any]:
    """The public config entries every member has with the same value (tuples as lists), in member 0's order.

    A fusion mirrors them in its own config, so code that reads a single model's config (`block_out_channels`,
    `layers_per_block`, ...) reads the members' shared value; entries the members disagree on are left out, and so
    are the `reserved` keys (the fusion's own entries and attribute names, which win: a member that is itself a fusion
    has `num_members`, `weights`, ...).
    """
    configs = [_config_dict(getattr(member, "config", None)) for member in members]
    shared = {}
    for key, value in configs[0].items():
        if key.startswith("_") or key in reserved:
            continue
        value = plain(value)
        if all(key in config and plain(config[key]) == value for config in configs[1:]):
            shared[key] = value
    return shared


def check_member_schedules(
    member_schedulers: Optional[Sequence[Any]],
    num_members: int,
    schedule_of: Callable[[Any], Dict[str, Any]] = noise_schedule_of,
) -> Optional[Dict[str, Any]]:
    """The members' shared noise schedule (refusing members whose schedules differ), or `None` if not given.

    `schedule_of` reads the part of a scheduler that must agree ([`noise_schedule_of`] or [`flow_schedule_of`]).
    """
    if member_schedulers is None:
        return None
    if len(member_schedulers) != num_members:
        raise ValueError(
            f"member_schedulers must hold {num_members} entries (one per member), got {len(member_schedulers)}"
        )
    schedules = [schedule_of(scheduler) for scheduler in member_schedulers]
    if schedule_of is noise_schedule_of:
        for i, schedule in enumerate(schedules):
            check_noise_schedule(schedule, f"member {i}'s noise schedule")
    for i, schedule in enumerate(schedules[1:], start=1):
        differing = {key: (schedule[key], schedules[0][key]) for key in schedule if schedule[key] != schedules[0][key]}
        if differing:
            shown = ", ".join(f"{key}={mine!r} vs {theirs!r}" for key, (mine, theirs) in differing.items())
            raise ValueError(f"member {i}'s noise schedule differs from member 0's: {shown}")
    return schedules[0]

def resolve_member_prediction_types(
    member_prediction_types: Optional[Sequence[str]],
    member_schedulers: Optional[Sequence[Any]],
    num_members: int,
    members: Optional[Sequence[nn.Module]] = None,
) -> List[str]:
    """Each member's prediction type: given, else its scheduler's, else the `prediction_type` its own config records
    (a fusion's, a custom denoiser's), else `"epsilon"`; given and declared must agree."""
    declared = None
    if member_schedulers is not None:
        declared = [config_get(noise_config, "prediction_type") for noise_config in
                    (s if isinstance(s, dict) else s.config for s in member_schedulers)]  # fmt: skip
    if member_prediction_types is None:
        recorded = [config_get(getattr(member, "config", None), "prediction_type") for member in members or ()]
        recorded = [value if value in PREDICTION_TYPES else None for value in recorded] or [None] * num_members
        member_prediction_types = [
            (declared[i] if declared else None) or recorded[i] or "epsilon" for i in range(num_members)
        ]
    member_prediction_types = list(member_prediction_types)
    if len(member_prediction_types) != num_members:
        raise ValueError(
            f"member_prediction_types must hold {num_members} entries, got {len(member_prediction_types)}: "
            f"{member_prediction_types}"
        )
    for i, kind in enumerate(member_prediction_types):
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"member_prediction_types[{i}] must be one of {PREDICTION_TYPES}, got {kind!r}")
        if declared and declared[i] is not None and declared[i] != kind:
            raise ValueError(
                f"member {i}'s scheduler says prediction_type={declared[i]!r} but member_prediction_types[{i}]={kind!r}"
            )
    return member_prediction_types

def text_encoder_slots(
    member_text_encoders: Optional[Sequence[Optional[nn.Module]]], num_members: int
) -> Tuple[Optional[List[int]], List[nn.Module]]:
    """Slot of each member's text encoder (0: the pipeline's, j: `text_encoders[j - 1]`) and the distinct encoders."""
    if member_text_encoders is None:
        return None, []
    if len(member_text_encoders) != num_members:
        raise ValueError(
            f"member_text_encoders must hold {num_members} entries (a module or None per member), "
            f"got {len(member_text_encoders)}"
        )
    encoders, slots = [], []
    for i, encoder in enumerate(member_text_encoders):
        if encoder is None:
            slots.append(0)
            continue
        if not isinstance(encoder, nn.Module):
            raise TypeError(
                f"member_text_encoders[{i}] must be a torch.nn.Module or None, got {type(encoder).__name__}"
            )
        found = next((j for j, known in enumerate(encoders) if known is encoder), None)
        if found is None:
            encoders.append(encoder)
            found = len(encoders) - 1
        slots.append(found + 1)
    return (slots, encoders) if encoders else (None, [])


# ----------------------------------------------------------------------------------------------- transformer members
def member_model(member: nn.Module) -> nn.Module:
    """The model behind a member: a `LoraMember`'s shared base (it has `base` and `adapter_name`), else the member."""
    base = getattr(member, "base", None)
    return base if isinstance(base, nn.Module) and isinstance(getattr(member, "adapter_name", None), str) else member


def is_lora_member(member: nn.Module) -> bool:
    """Whether `member` is a `LoraMember` (an adapter of a shared base), recognised without importing models/."""
    return member_model(member) is not member


def public_config(config: Any) -> Dict[str, Any]:
    """A model config (a Diffusers `FrozenDict` or an object with attributes) as a dict without private `_` keys."""
    return {key: plain(value) for key, value in _config_dict(config).items() if not key.startswith("_")}


def underlying_model_class(member: nn.Module) -> type:
    """The model class behind a member: a `LoraMember`'s base's, a fusion's members' (fusions nest), else its own."""
    members = getattr(member, "fusion_members", None)
    if isinstance(members, nn.ModuleList) and len(members) > 0:
        return underlying_model_class(members[0])
    return type(member_model(member))


def _without(config: Dict[str, Any], keys: Sequence[str]) -> Dict[str, Any]:
    return {key: value for key, value in config.items() if key not in keys}


def check_transformer_members(members: Sequence[Any], reserved: Sequence[str] = ()) -> Tuple[Dict[str, Any], str]:
    """Refuses members that are not modules of one class with one config; returns that config (without the
    `reserved` keys: the fusion's own) and the class name.

    A `LoraMember` counts as its base's class, a fusion as its members'. Every other config key must agree (members
    are fine-tunes of one model).
    """
    for i, member in enumerate(members):
        if not isinstance(member, nn.Module):
            raise TypeError(f"member {i} must be a torch.nn.Module, got {type(member).__name__}")
        config = getattr(member, "config", None)
        if config is None or config_get(config, "in_channels") is None:
            raise TypeError(
                f"member {i} ({type(member).__name__}) needs a `config` with in_channels, as Diffusers transformers "
                "have"
            )
    classes = [underlying_model_class(member) for member in members]
    for i, cls in enumerate(classes[1:], start=1):
        if cls is not classes[0]:
            raise ValueError(f"member {i} is a {cls.__name__} but member 0 is a {classes[0].__name__}")
    reference = _without(public_config(members[0].config), reserved)
    for i, member in enumerate(members[1:], start=1):
        config = _without(public_config(member.config), reserved)
        keys = sorted(set(config) | set(reference))
        differing = [f"{key}={config.get(key)!r} vs {reference.get(key)!r}" for key in keys
                     if config.get(key) != reference.get(key)]  # fmt: skip
        if differing:
            raise ValueError(f"member {i}'s config differs from member 0's (member {i} vs member 0): {differing[:5]}")
    check_member_dtypes(members)
    return reference, classes[0].__name__


def scheduler_class_and_config(scheduler: Union[ConfigMixin, Dict[str, Any]]) -> Tuple[str, Any]:
    """`(class name, config)` of a scheduler or a scheduler config dict (its `_class_name`)."""
    if isinstance(scheduler, dict):
        return str(scheduler.get("_class_name", "")), scheduler
    config = getattr(scheduler, "config", None)
    if config is None:
        raise TypeError(f"expected a Diffusers scheduler or a scheduler config dict, got {type(scheduler).__name__}")
    return type(scheduler).__name__, config


def is_flow_matching(scheduler: Union[ConfigMixin, Dict[str, Any]]) -> bool:
    """Whether a scheduler takes velocities: a `FlowMatch*` scheduler or `prediction_type="flow_prediction"`."""
    name, config = scheduler_class_and_config(scheduler)
    return name.startswith("FlowMatch") or config_get(config, "prediction_type") == "flow_prediction"


def flow_schedule_of(scheduler: Union[ConfigMixin, Dict[str, Any]]) -> Dict[str, Any]:
    """The training schedule of a flow-matching scheduler: `num_train_timesteps` and the `shift` of the training
    timestep density.

    Diffusers' training scripts draw timesteps from the scheduler as it is built, which applies `shift` only when
    `use_dynamic_shifting` is off (Flux's scheduler shifts at sampling time only: its training shift is 1).
    `DPMSolverMultistepScheduler` / `UniPCMultistepScheduler` with flow sigmas name it `flow_shift`.
    """
    name, config = scheduler_class_and_config(scheduler)
    if not is_flow_matching(scheduler):
        raise ValueError(
            f"expected a flow-matching scheduler (FlowMatch* or prediction_type='flow_prediction'), got {name or 'a'} "
            f"config with prediction_type={config_get(config, 'prediction_type')!r}"
        )
    shift = config_get(config, "shift" if name.startswith("FlowMatch") else "flow_shift")
    shift = 1.0 if shift is None or config_get(config, "use_dynamic_shifting") else shift
    count = config_get(config, "num_train_timesteps") or 1000
    if not _is_real(shift) or not shift > 0:
        raise ValueError(f"{name or 'the scheduler'}'s shift must be a finite number > 0, got {shift!r}")
    if not _is_int(count) or count < 1:
        raise ValueError(f"{name or 'the scheduler'}'s num_train_timesteps must be an int >= 1, got {count!r}")
    return {"num_train_timesteps": int(count), "shift": float(shift)}
