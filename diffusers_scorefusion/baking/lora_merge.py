"""One LoRA from a LoRA fusion (`FusedUNet.from_lora`, `FusedTransformer.from_lora`): exact by concatenating the
members' factors, or truncated to a given rank by SVD. The maths is `fusion/merge_utils.py`; this module reads the
adapters out of the shared base and writes the result as a Diffusers (or Kohya) LoRA."""

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..fusion.fusion_utils import WeightsLike, check_weights
from ..fusion.member_utils import is_lora_member
from ..fusion.merge_utils import concatenate_lora_factors, truncate_lora
from .bake_saving import LORA_WEIGHT_NAME, save_baked

# (lora_A weight, lora_B weight, scale) of one adapted layer
Factors = Tuple[torch.Tensor, torch.Tensor, float]


@dataclass
class MergedLora:
    r"""
    One LoRA whose weight delta is the fusion's weighted sum of its members' deltas.

    Args:
        state_dict (`dict[str, torch.Tensor]`): PEFT keys without prefix (`down_blocks.1...to_q.lora_A.weight`).
        lora_config (`dict`): the `LoraConfig` (rank `r`, `lora_alpha = r`, so its scale is 1), as Diffusers stores it
            in the file's metadata.
        prefix (`str`): `"unet"` or `"transformer"`, the key prefix of the base's pipeline LoRA files.
        weights (`list[float]`): the fusion weights that were merged.
        rank (`int`): the rank of every adapted layer.
        relative_errors (`dict[str, float]`, *optional*): with `rank=`, ``||delta - delta_rank||_F / ||delta||_F``
            per adapted layer; `None` for the exact merge.
        base_class (`str`): the class of the base model the LoRA belongs to.
        record (`dict`): anything else to note in `bake.json` (e.g. how the weights were obtained).
    """

    state_dict: Dict[str, torch.Tensor]
    lora_config: Dict[str, Any]
    prefix: str
    weights: List[float]
    rank: int
    relative_errors: Optional[Dict[str, float]] = None
    base_class: str = ""
    record: Dict[str, Any] = field(default_factory=dict)


def lora_base_of(fused: nn.Module) -> Tuple[nn.Module, List[str]]:
    """The base model shared by every member of a LoRA fusion and the members' adapter names; refuses fusions whose
    members are not all LoRA adapters of one base object."""
    members = list(fused.fusion_members)
    plain = [i for i, member in enumerate(members) if not is_lora_member(member)]
    if plain:
        raise ValueError(
            f"member {plain[0]} is a full model ({type(members[plain[0]]).__name__}), not a LoRA adapter: a LoRA merge "
            "needs a fusion built with from_lora; merge full fine-tunes with merge_checkpoints"
        )
    base = members[0].base
    other = next((i for i, member in enumerate(members) if member.base is not base), None)
    if other is not None:
        raise ValueError(
            f"the members do not share a base: member {other}'s {type(members[other].base).__name__} is another object "
            f"than member 0's; a LoRA merge needs LoRAs of one base (FusedUNet.from_lora / FusedTransformer.from_lora)"
        )
    return base, [member.adapter_name for member in members]


def adapter_factors(base: nn.Module, adapter_name: str) -> Dict[str, Factors]:
    """`{module name: (lora_A, lora_B, scale)}` of one adapter of `base`, with the scale the layer runs it at."""
    from peft.tuners.lora import LoraLayer

    factors: Dict[str, Factors] = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name in getattr(module, "lora_embedding_A", {}):
            raise ValueError(f"adapter {adapter_name!r} adapts the embedding {name!r}; only Linear and Conv LoRA "
                             "layers can be merged")  # fmt: skip
        if adapter_name not in module.lora_A:
            continue
        if module.use_dora.get(adapter_name) or module.lora_bias.get(adapter_name):
            kind = "DoRA" if module.use_dora.get(adapter_name) else "lora_bias"
            raise ValueError(f"adapter {adapter_name!r} uses {kind} at {name!r}, whose delta is not B @ A; only plain "
                             "LoRA adapters can be merged")  # fmt: skip
        factors[name] = (module.lora_A[adapter_name].weight.detach(), module.lora_B[adapter_name].weight.detach(),
                         float(module.scaling[adapter_name]))  # fmt: skip
    if not factors:
        raise ValueError(f"adapter {adapter_name!r} adapts no layer of the base")
    return factors


def _pad(lora_A: torch.Tensor, lora_B: torch.Tensor, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Factors widened to `width` with zero rows of A and zero columns of B (the delta is unchanged)."""
    extra = width - lora_A.shape[0]
    if extra == 0:
        return lora_A, lora_B
    return (torch.cat([lora_A, lora_A.new_zeros(extra, *lora_A.shape[1:])]),
            torch.cat([lora_B, lora_B.new_zeros(lora_B.shape[0], extra, *lora_B.shape[2:])], dim=1))  # fmt: skip


def merge_factors(
    member_factors: Sequence[Dict[str, Factors]], weights: Sequence[float], rank: Optional[int] = None
) -> Tuple[Dict[str, torch.Tensor], int, Optional[Dict[str, float]]]:
    """PEFT state dict of the merged LoRA (scale 1), its rank and, with `rank`, the per-layer relative errors.

    Member `i` contributes a block of width ``r_i`` (its largest rank) to every layer, zero where it does not adapt the
    layer, so every layer has rank ``sum_i r_i`` before truncation.
    """
    widths = [max(lora_A.shape[0] for lora_A, _, _ in factors.values()) for factors in member_factors]
    full_rank = sum(widths)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full_rank):
        raise ValueError(
            f"rank must be an integer from 1 to the members' total rank {full_rank} (ranks {widths}), got {rank!r}; "
            "the exact merge needs no more than their sum"
        )
    modules = sorted({name for factors in member_factors for name in factors})
    state_dict: Dict[str, torch.Tensor] = {}
    errors: Dict[str, float] = {}
    for name in modules:
        lora_As, lora_Bs, coefficients = [], [], []
        for i, factors in enumerate(member_factors):
            lora_A, lora_B, scale = factors.get(name, (None, None, 0.0))
            if lora_A is not None:
                lora_A, lora_B = _pad(lora_A, lora_B, widths[i])
            lora_As.append(lora_A)
            lora_Bs.append(lora_B)
            coefficients.append(float(weights[i]) * scale)  # lambda_i * scale_i
        merged_A, merged_B = concatenate_lora_factors(lora_As, lora_Bs, coefficients, widths)
        if rank is not None:
            merged_A, merged_B, errors[name] = truncate_lora(merged_A, merged_B, rank)
        state_dict[f"{name}.lora_A.weight"] = merged_A.contiguous()
        state_dict[f"{name}.lora_B.weight"] = merged_B.contiguous()
    return state_dict, full_rank if rank is None else rank, errors if rank is not None else None


def fusion_weights_row(
    fused: nn.Module, weights: Optional[WeightsLike], row: Optional[int], lora: bool = True
) -> List[float]:
    """The `(k,)` weights to merge: `weights` if given, else the fusion's; a `(num_bins, k)` table needs `row`."""
    table = check_weights(fused.fusion_weights if weights is None else weights, fused.config.num_members)
    if table.shape[0] == 1:
        if row is not None and row != 0:
            raise ValueError(f"row={row} was given but the weights have one row")
        return table[0].tolist()
    if row is None:
        hint = "or bake the table into the k adapters with bake_lora_schedule" if lora else "full fine-tunes cannot " \
            "switch weights per step at the cost of one model"
        raise ValueError(
            f"the fusion weights are a table over {table.shape[0]} timestep bins, which one merged model cannot "
            f"follow: pass row= (the bin whose weights to merge); {hint}"
        )
    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < table.shape[0]:
        raise ValueError(f"row must be an integer from 0 to {table.shape[0] - 1}, got {row!r}")
    return table[row].tolist()


def merge_lora(
    fused: nn.Module, weights: Optional[WeightsLike] = None, rank: Optional[int] = None, row: Optional[int] = None
) -> MergedLora:
    r"""
    One LoRA with the weight delta ``sum_i lambda_i * scale_i * B_i @ A_i`` of a LoRA fusion.

    Args:
        fused (`FusedUNet` or `FusedTransformer`): a fusion built with `from_lora` (its members share one base).
        weights (`list[float]`, *optional*): the weights to merge; defaults to the fusion's.
        rank (`int`, *optional*): truncate every layer to this rank by SVD (at most the members' total rank) and
            report the relative error per layer; by default the merge is exact, of rank ``sum_i r_i``.
        row (`int`, *optional*): for weights over timestep bins, the bin whose weights to merge.
    """
    from ..models.modeling_lora_member import lora_format

    base, adapter_names = lora_base_of(fused)
    merged_weights = fusion_weights_row(fused, weights, row)
    member_factors = [adapter_factors(base, name) for name in adapter_names]
    state_dict, merged_rank, errors = merge_factors(member_factors, merged_weights, rank)
    prefix, _ = lora_format(base)
    return MergedLora(state_dict=state_dict, lora_config=lora_config_for(state_dict, merged_rank), prefix=prefix,
                      weights=merged_weights, rank=merged_rank, relative_errors=errors,
                      base_class=type(base).__name__)  # fmt: skip


def lora_config_for(state_dict: Dict[str, torch.Tensor], rank: int) -> Dict[str, Any]:
    """The `LoraConfig` of a merged LoRA as JSON: every adapted layer named, rank `rank`, alpha = rank (scale 1)."""
    from peft import LoraConfig

    modules = sorted({key.rsplit(".lora_", 1)[0] for key in state_dict})
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, init_lora_weights=True).to_dict()
    return {key: (sorted(value) if isinstance(value, set) else value) for key, value in config.items()}


def write_diffusers_lora(merged: MergedLora, folder: str, weight_name: str = LORA_WEIGHT_NAME) -> None:
    """Writes `merged` as `pipe.save_lora_weights` does (keys `unet.*` or `transformer.*`, config in the metadata)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders import lora_pipeline

    from ..models.modeling_lora_member import TRANSFORMER_LORA_LOADERS, UNET_PREFIX

    if merged.prefix == UNET_PREFIX:
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=merged.state_dict, weight_name=weight_name,
                                                  unet_lora_adapter_metadata=dict(merged.lora_config))  # fmt: skip
        return
    loader = getattr(lora_pipeline, TRANSFORMER_LORA_LOADERS.get(merged.base_class, "SD3LoraLoaderMixin"))
    loader.save_lora_weights(folder, transformer_lora_layers=merged.state_dict, weight_name=weight_name,
                             transformer_lora_adapter_metadata=dict(merged.lora_config))  # fmt: skip


def save_merged_lora(
    merged: MergedLora, save_directory: Union[str, os.PathLike], format: str = "diffusers"
) -> List[str]:
    r"""
    Writes a merged LoRA into `save_directory` crash-safe, with `bake.json` (weights, rank, per-layer errors).

    Args:
        format (`str`): `"diffusers"` writes `pytorch_lora_weights.safetensors` (what `pipe.save_lora_weights` writes;
            `pipe.load_lora_weights(save_directory)` loads it); `"kohya"` writes `lora_kohya.safetensors` with Kohya /
            A1111 keys (`lora_unet_*.lora_down.weight`, `.alpha`), for UNet LoRAs.

    Returns:
        The names of the files written (besides `bake.json`).
    """
    from .kohya import KOHYA_WEIGHT_NAME, to_kohya

    if format not in ("diffusers", "kohya"):
        raise ValueError(f"format must be 'diffusers' or 'kohya', got {format!r}")
    kohya = to_kohya(merged) if format == "kohya" else None  # refused before anything is written
    name = KOHYA_WEIGHT_NAME if format == "kohya" else LORA_WEIGHT_NAME

    def write(staging: str) -> None:
        if kohya is None:
            write_diffusers_lora(merged, staging)
        else:
            from safetensors.torch import save_file

            save_file(kohya, os.path.join(staging, name), metadata={"format": "pt"})

    record = {"kind": "merged LoRA", "format": format, "base_class": merged.base_class, "weights": merged.weights,
              "rank": merged.rank, "relative_errors": merged.relative_errors, **merged.record}  # fmt: skip
    save_baked(os.fspath(save_directory), write, [name], record)
    return [name]
