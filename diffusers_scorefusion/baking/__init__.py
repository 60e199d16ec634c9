"""Baking a fitted fusion into one model that samples at the cost of one member forward per step."""

from .checkpoint_merge import merge_checkpoints, save_merged_checkpoint
from .distillation import DistillOutput, distill
from .lora_merge import MergedLora, merge_lora, save_merged_lora
from .schedule import AdapterWeightSchedule, bake_lora_schedule, load_lora_schedule, save_lora_schedule

__all__ = [
    "AdapterWeightSchedule",
    "DistillOutput",
    "MergedLora",
    "bake_lora_schedule",
    "distill",
    "load_lora_schedule",
    "merge_checkpoints",
    "merge_lora",
    "save_merged_checkpoint",
    "save_lora_schedule",
    "save_merged_lora",
]
