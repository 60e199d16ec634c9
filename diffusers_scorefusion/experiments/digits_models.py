"""The digits experiment's models, each early-stopped on its own validation images and cached on disk.

- ``base``: one `UNet2DModel` trained on the pooled auxiliary data (both digits, equal shares: the union of the four
  auxiliary mixes), validated on the auxiliary validation images;
- ``aux1..aux4``: the base fine-tuned on each auxiliary mix, validated on the same images weighted by that mix. Sharing
  one base makes their weights averageable (`merge_unets`), like LoRA fine-tunes of one foundation model;
- per seed and n: ``scratch`` (fresh init) and ``finetune`` (the closest auxiliary) trained on the n target images
  minus a validation share, validated on that share, on one matched budget (same steps, batch and validation
  schedule; only the learning rate differs).
"""

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from diffusers import UNet2DModel

from . import data as digit_data
from .denoising import NoisedSet, denoising_loss, make_noised_set
from .training import TrainingConfig, load_or_train, make_digit_unet, make_noise_scheduler, train_denoiser

BASE_PROPORTIONS = (0.5, 0.5)  # the pooled auxiliary data: the four mixes (0.1, 0.3, 0.7, 0.9) average to one half


def validation_set(pools: Sequence[np.ndarray], proportions: Sequence[float], num_draws: int, seed: int) -> NoisedSet:
    """Fixed noised copies of validation images, image weights ``p_c / m_c`` (class share over class count)."""
    kept = [(pool, p) for pool, p in zip(pools, proportions) if p > 0 and len(pool) > 0]
    if not kept:
        raise ValueError(f"no validation images with a positive share: sizes {[len(p) for p in pools]}, "
                         f"proportions {list(proportions)}")  # fmt: skip
    total = sum(p for _, p in kept)
    clean = torch.cat([torch.as_tensor(pool, dtype=torch.float32).unsqueeze(1) for pool, _ in kept])  # (m, 1, 8, 8)
    weights = torch.cat([torch.full((len(pool),), p / total / len(pool), dtype=torch.float64) for pool, p in kept])
    weights = weights / weights.sum()
    return make_noised_set(clean, num_draws, make_noise_scheduler(), torch.Generator().manual_seed(seed),
                           sample_weights=weights, prepare=digit_data.dequantize)  # fmt: skip


def train_unet(settings: Any, cache_dir: Optional[str], name: str, key: Dict[str, Any], pools: Sequence[np.ndarray],
               proportions: Sequence[float], validation: NoisedSet, config: TrainingConfig, seed: int,
               start_from: Optional[UNet2DModel] = None) -> Tuple[UNet2DModel, Dict[str, Any]]:  # fmt: skip
    """Trains (or loads from the cache) a UNet on dequantised batches from a mixture of image pools.

    `key` must name the training and validation images (and the model started from); the pools are a function of it.
    """
    sampler = digit_data.MixtureSampler(pools, proportions)
    scheduler = make_noise_scheduler()

    def draw(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return digit_data.dequantize(sampler(batch_size, generator), generator).unsqueeze(1)

    def build() -> UNet2DModel:
        if start_from is not None:
            return copy.deepcopy(start_from)
        return make_digit_unet(settings.block_out_channels, seed)

    def train(model: UNet2DModel) -> Tuple[UNet2DModel, Dict[str, Any]]:
        return train_denoiser(model, draw, scheduler, config, torch.Generator().manual_seed(seed), description=name,
                              validation=lambda m: denoising_loss(m, validation))  # fmt: skip

    settings_key = dict(key, config=config, seed=seed, block_out_channels=list(settings.block_out_channels),
                        proportions=list(proportions))  # fmt: skip
    return load_or_train(cache_dir, name, settings_key, build, train, UNet2DModel.from_pretrained)


def train_auxiliaries(settings: Any, cache_dir: Optional[str], data_key: Dict[str, Any],
                      train_pools: Sequence[np.ndarray], val_pools: Sequence[np.ndarray],
                      progress: Any = None) -> Tuple[List[UNet2DModel], Dict[str, Dict[str, Any]]]:  # fmt: skip
    """The base model and the auxiliaries fine-tuned from it; returns the auxiliaries and every training record."""
    draws = settings.validation_draws
    base_val = validation_set(val_pools, BASE_PROPORTIONS, draws, seed=7_000)
    base, base_record = train_unet(settings, cache_dir, "base", data_key, train_pools, BASE_PROPORTIONS, base_val,
                                   settings.base_training, seed=0)  # fmt: skip
    records = {"base": base_record}
    auxiliaries = []
    for i, p in enumerate(settings.auxiliary_proportions):
        mix = (p, 1 - p)
        val = validation_set(val_pools, mix, draws, seed=7_001 + i)
        model, record = train_unet(settings, cache_dir, f"aux{i + 1}", dict(data_key, start="base"), train_pools, mix,
                                   val, settings.auxiliary_training, seed=1 + i, start_from=base)  # fmt: skip
        auxiliaries.append(model)
        records[f"aux{i + 1}"] = record
        if progress is not None:
            progress.update(1)
    return auxiliaries, records


def train_target_models(settings: Any, cache_dir: Optional[str], key: Dict[str, Any], train_pools: Sequence[np.ndarray],
                        val_pools: Sequence[np.ndarray], start_from: UNet2DModel, start_name: str,
                        seed: int) -> Dict[str, Tuple[UNet2DModel, Dict[str, Any]]]:  # fmt: skip
    """``scratch`` and ``finetune`` on the target training images (uniform over images), on one matched budget."""
    counts = [len(pool) for pool in train_pools]
    uniform = [c / sum(counts) for c in counts]  # every training image equally likely
    val_counts = [len(pool) for pool in val_pools]
    validation = validation_set(val_pools, [c / sum(val_counts) for c in val_counts], settings.target_validation_draws,
                                seed=8_000 + seed)  # fmt: skip
    budget = settings.target_training
    scratch = train_unet(settings, cache_dir, "scratch", key, train_pools, uniform, validation, budget,
                         seed=100 + seed)  # fmt: skip
    finetune_config = TrainingConfig(**{**budget.__dict__, "learning_rate": settings.finetune_learning_rate})
    finetune = train_unet(settings, cache_dir, f"finetune-{start_name}", dict(key, start=start_name), train_pools,
                          uniform, validation, finetune_config, seed=200 + seed, start_from=start_from)  # fmt: skip
    return {"scratch": scratch, "finetune": finetune}


def merge_unets(unets: Sequence[UNet2DModel], weights: Sequence[float]) -> UNet2DModel:
    """Weight-space merge ``theta = sum_i w_i theta_i`` of models fine-tuned from one base (same architecture)."""
    if len(unets) != len(weights) or len(unets) == 0:
        raise ValueError(f"need one weight per model, got {len(weights)} weights for {len(unets)} models")
    weights = [float(w) for w in weights]
    if min(weights) < 0 or abs(sum(weights) - 1) > 1e-6:
        raise ValueError(f"merge weights must be >= 0 and sum to 1, got {weights}")
    states = [unet.state_dict() for unet in unets]
    if any(state.keys() != states[0].keys() for state in states):
        raise ValueError("models to merge must have the same parameters (one architecture)")
    merged = copy.deepcopy(unets[0])
    averaged = {}
    for name, tensor in states[0].items():
        if tensor.is_floating_point():
            merged_tensor = sum(w * state[name].to(torch.float64) for w, state in zip(weights, states))
            averaged[name] = merged_tensor.to(tensor.dtype)
        else:
            averaged[name] = tensor
    merged.load_state_dict(averaged)
    return merged.eval()
