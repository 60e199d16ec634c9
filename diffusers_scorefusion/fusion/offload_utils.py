"""Running fusion members placed on their own devices or offloaded one by one.

A member may sit on another device than the fusion's inputs (members spread over GPUs, or some kept on the CPU). Members
with accelerate hooks (`device_map`, CPU offload) or Diffusers group offloading move their inputs themselves; any
other member whose weights are elsewhere gets its inputs moved to its device here. Its output always comes back on the
device of `sample`, so the members' predictions can be combined.
"""

from typing import Any, Optional, Union

import torch
from diffusers.hooks import apply_group_offloading
from diffusers.hooks.group_offloading import _is_group_offload_enabled
from diffusers.utils import BaseOutput
from torch import nn

from .member_utils import distinct_models


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (also inside tuples, lists, dicts, `BaseOutput`s) on `device`; others as is."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, BaseOutput):
        return type(value)(**{key: to_device(item, device) for key, item in value.items()})
    if isinstance(value, dict):
        return type(value)((key, to_device(item, device)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value


def places_own_inputs(member: nn.Module) -> bool:
    """Whether accelerate hooks or Diffusers group offloading in `member` move its inputs to its execution device."""
    if _is_group_offload_enabled(member):
        return True
    return any(getattr(module, "_hf_hook", None) is not None for module in member.modules())


def member_input_device(member: nn.Module, device: torch.device) -> Optional[torch.device]:
    """Where `member`'s inputs must go when they are on `device`: its weights' device, or `None` (leave them)."""
    parameter = next(member.parameters(), None)
    if parameter is None or parameter.device == device or places_own_inputs(member):
        return None
    return parameter.device


def run_on_member_device(member: nn.Module, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """`member(sample, *args, **kwargs)` with inputs on the member's device and the output on `sample.device`."""
    return call_on_member_device(member, sample.device, (sample, *args), kwargs)


def call_on_member_device(member: nn.Module, device: torch.device, args: tuple, kwargs: dict) -> Any:
    """`member(*args, **kwargs)` with inputs moved from `device` to the member's device, the output on `device`."""
    target = member_input_device(member, device)
    if target is not None:
        args, kwargs = to_device((args, kwargs), target)
    return to_device(member(*args, **kwargs), device)


def enable_group_offload_per_member(
    fused: nn.Module,
    onload_device: Union[str, torch.device],
    offload_device: Union[str, torch.device] = torch.device("cpu"),
    **kwargs: Any,
) -> None:
    """Diffusers' group offloading applied to each member (and member text encoder) on its own.

    Applied to the whole fusion, `block_level` offloading would make each member one group and offload it with
    `member.to()`, which Diffusers refuses (with a warning only) on a group-offloaded model unless streams are used:
    the members would stay on the accelerator. LoRA members share one base, which is offloaded once.
    """
    for module in distinct_models([*fused.fusion_members, *getattr(fused, "text_encoders", [])]):
        apply_group_offloading(module, onload_device=torch.device(onload_device),
                               offload_device=torch.device(offload_device), **kwargs)  # fmt: skip
