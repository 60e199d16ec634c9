"""Weights over timestep bins for a LoRA fusion, at one forward per step: the delta is linear in the weights, so the k
adapters stay loaded in the stock pipeline and a `callback_on_step_end` object switches their weights
(`pipe.set_adapters`) when the next step's timestep falls in another bin."""

import copy
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Union

import torch
from diffusers.callbacks import PipelineCallback
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..fusion.fusion_utils import check_bin_edges, check_weights, timestep_bins
from .bake_saving import LORA_WEIGHT_NAME, save_baked
from .lora_merge import MergedLora, adapter_factors, lora_base_of, lora_config_for, merge_factors, write_diffusers_lora

SCHEDULE_NAME = "adapter_weight_schedule.json"
# Pipelines that pass `timestep / 1000` to their transformer: the fusion's bin edges are in those units.
PER_MILLE_TIMESTEPS = ("FluxTransformer2DModel", "QwenImageTransformer2DModel")


class AdapterWeightSchedule(PipelineCallback):
    r"""
    A `callback_on_step_end` that sets the pipeline's adapter weights (`pipe.set_adapters`) to the row of
    `adapter_weights` whose timestep bin holds the next step's timestep, when that row changes.

    Args:
        adapter_names (`list[str]`): the k adapters loaded in the pipeline.
        adapter_weights (`list[list[float]]`): `(num_bins, k)`, one row of adapter weights per timestep bin.
        timestep_bin_edges (`list[float]`): `num_bins + 1` increasing edges, in the units of the timestep the pipeline
            passes to its denoiser (as a fusion's `timestep_bin_edges`).
        timestep_scale (`float`): the denoiser's timestep per scheduler timestep (1 for UNets and SD3, 1/1000 for
            Flux, whose pipeline passes `timestep / 1000`).

    Call `prepare(pipe, num_inference_steps)` before each pipeline call: a step-end callback cannot act before the
    first step, so `prepare` sets the first step's weights.
    """

    config_name = SCHEDULE_NAME
    tensor_inputs: List[str] = []

    @register_to_config
    def __init__(self, adapter_names: Sequence[str], adapter_weights: Sequence[Sequence[float]],
                 timestep_bin_edges: Sequence[float], timestep_scale: float = 1.0):  # fmt: skip
        names = list(adapter_names)
        if not names or len(set(names)) != len(names) or not all(isinstance(name, str) and name for name in names):
            raise ValueError(f"adapter_names must be distinct non-empty strings, got {names}")
        table = torch.as_tensor(adapter_weights, dtype=torch.float64)
        if table.ndim != 2 or table.shape[1] != len(names) or not torch.isfinite(table).all():
            raise ValueError(f"adapter_weights must be finite, of shape (num_bins, {len(names)}), got "
                             f"{list(map(list, adapter_weights))}")  # fmt: skip
        self._edges = check_bin_edges(timestep_bin_edges, table.shape[0])
        if not isinstance(timestep_scale, (int, float)) or not timestep_scale > 0:
            raise ValueError(f"timestep_scale must be a positive number, got {timestep_scale!r}")
        self._table = table
        self._current_row = None

    def row(self, timestep: Union[torch.Tensor, float]) -> int:
        """The bin of a scheduler timestep."""
        model_timestep = torch.as_tensor(timestep, dtype=torch.float64).flatten()[:1] * self.config.timestep_scale
        return int(timestep_bins(model_timestep, self._edges)[0])

    def apply(self, pipeline: Any, timestep: Union[torch.Tensor, float]) -> None:
        """Sets the adapter weights of the bin of `timestep` (a scheduler timestep), if they are not set already."""
        row = self.row(timestep)
        if row != self._current_row:
            pipeline.set_adapters(list(self.config.adapter_names), adapter_weights=self._table[row].tolist())
            self._current_row = row

    def prepare(self, pipeline: Any, num_inference_steps: int, **set_timesteps_kwargs: Any) -> None:
        """Sets the weights of the first step of a call with `num_inference_steps` (and the scheduler's other
        `set_timesteps` arguments, e.g. `mu=` for Flux), computed on a copy of `pipeline.scheduler`."""
        scheduler = copy.deepcopy(pipeline.scheduler)
        scheduler.set_timesteps(num_inference_steps, **set_timesteps_kwargs)
        self._current_row = None
        self.apply(pipeline, scheduler.timesteps[0])

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: Dict[str, Any]) -> Dict:
        timesteps = pipeline.scheduler.timesteps
        if step_index + 1 < len(timesteps):
            self.apply(pipeline, timesteps[step_index + 1])
        return callback_kwargs


@dataclass
class LoraSchedule:
    """The k member adapters (each with its scale folded in, so its adapter weight is the fusion weight) and the
    callback that switches their weights per timestep bin."""

    adapters: List[MergedLora]
    schedule: AdapterWeightSchedule


def bake_lora_schedule(fused: nn.Module) -> LoraSchedule:
    """Bakes a LoRA fusion whose weights are a `(num_bins, k)` table over timestep bins into k adapters plus an
    [`AdapterWeightSchedule`]; with `pipe.set_adapters(names, row)` the stock pipeline's denoiser is then the merged
    model of that row, at every step."""
    from ..models.modeling_lora_member import lora_format

    base, names = lora_base_of(fused)
    if fused.config.timestep_bin_edges is None:
        raise ValueError("the fusion's weights are one row, not a table over timestep bins: bake it with merge_lora")
    table = check_weights(fused.fusion_weights, fused.config.num_members)
    prefix, _ = lora_format(base)
    adapters = []
    for name in names:
        state_dict, rank, _ = merge_factors([adapter_factors(base, name)], [1.0])
        adapters.append(MergedLora(state_dict=state_dict, lora_config=lora_config_for(state_dict, rank), prefix=prefix,
                                   weights=[1.0], rank=rank, base_class=type(base).__name__))  # fmt: skip
    scale = 1e-3 if type(base).__name__ in PER_MILLE_TIMESTEPS else 1.0
    schedule = AdapterWeightSchedule(adapter_names=names, adapter_weights=table.tolist(),
                                     timestep_bin_edges=list(fused.config.timestep_bin_edges),
                                     timestep_scale=scale)  # fmt: skip
    return LoraSchedule(adapters=adapters, schedule=schedule)


def save_lora_schedule(baked: LoraSchedule, save_directory: Union[str, os.PathLike]) -> List[str]:
    """Writes `adapter_{i}/pytorch_lora_weights.safetensors` per adapter and `adapter_weight_schedule.json`, crash-safe,
    beside `bake.json`. Returns the entries written (besides `bake.json`)."""
    entries = [f"adapter_{i}" for i in range(len(baked.adapters))] + [SCHEDULE_NAME]

    def write(staging: str) -> None:
        for i, adapter in enumerate(baked.adapters):
            write_diffusers_lora(adapter, os.path.join(staging, f"adapter_{i}"))
        baked.schedule.save_config(staging)

    record = {"kind": "LoRA adapters with a per-step weight schedule", "base_class": baked.adapters[0].base_class,
              "adapter_weights": baked.schedule.config.adapter_weights,
              "timestep_bin_edges": baked.schedule.config.timestep_bin_edges}  # fmt: skip
    save_baked(os.fspath(save_directory), write, entries, record)
    return entries


def load_lora_schedule(pipeline: Any, folder: Union[str, os.PathLike]) -> AdapterWeightSchedule:
    """Loads the k adapters of a folder written by `save_lora_schedule` into `pipeline` (`load_lora_weights`, under the
    schedule's adapter names) and returns its [`AdapterWeightSchedule`]."""
    folder = os.fspath(folder)
    path = os.path.join(folder, SCHEDULE_NAME)
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path!r} is not a readable adapter weight schedule: {error}") from error
    schedule = AdapterWeightSchedule.from_config(config)
    for i, name in enumerate(schedule.config.adapter_names):
        pipeline.load_lora_weights(os.path.join(folder, f"adapter_{i}"), weight_name=LORA_WEIGHT_NAME,
                                   adapter_name=name)  # fmt: skip
    return schedule
