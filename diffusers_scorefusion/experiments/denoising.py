"""Held-out denoising loss with fixed draws: the validation loss of early stopping and a cheap model-comparison metric.

For held-out clean samples ``x0_j`` (weights ``w_j``), `num_draws` pairs ``(t, eps)`` per sample are drawn once
(``t`` uniform over the training timesteps, ``eps ~ N(0, I)``), so every model is scored on the same noised inputs:

    L = sum_j w_j mean_draws ||eps_theta(alpha_t x0_j + sigma_t eps, t) - eps||^2 / D .

It is the training objective (uniform in t) on unseen data: an unbiased estimate with no estimator bias, and the
quantity `fit_weights` minimises for a fusion (on the training samples).
"""

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn


@dataclass
class NoisedSet:
    """Fixed noised copies of held-out samples: `noisy`, `noise` `(M, ...)`, `timesteps` and `sample_index` `(M,)`,
    and per-sample weights `sample_weights` `(m,)` (float64, summing to 1)."""

    noisy: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    sample_index: torch.Tensor
    sample_weights: torch.Tensor


def make_noised_set(
    clean: torch.Tensor,
    num_draws: int,
    noise_scheduler: Any,
    generator: torch.Generator,
    sample_weights: Optional[torch.Tensor] = None,
    prepare: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None,
) -> NoisedSet:
    """`num_draws` noised copies of each of the `(m, ...)` `clean` samples (uniform weights unless given).

    `prepare(copies, generator)` maps the repeated raw samples to model space first (e.g. dequantisation of grey
    levels, one draw per copy).
    """
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}")
    count = clean.shape[0]
    if count == 0:
        raise ValueError("clean is empty: a held-out loss needs at least one sample")
    if sample_weights is None:
        sample_weights = torch.full((count,), 1.0 / count, dtype=torch.float64)
    sample_weights = torch.as_tensor(sample_weights, dtype=torch.float64)
    if sample_weights.shape != (count,) or (sample_weights < 0).any() or abs(float(sample_weights.sum()) - 1) > 1e-9:
        raise ValueError(f"sample_weights must be {count} numbers >= 0 summing to 1, got {sample_weights.tolist()}")
    copies = clean.repeat_interleave(num_draws, dim=0)  # (m * draws, ...)
    if prepare is not None:
        copies = prepare(copies, generator)
    noise = torch.randn(copies.shape, generator=generator, dtype=copies.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (copies.shape[0],), generator=generator)
    noisy = noise_scheduler.add_noise(copies, noise, timesteps)  # x_t = alpha_t x0 + sigma_t eps
    sample_index = torch.arange(count).repeat_interleave(num_draws)
    return NoisedSet(noisy=noisy, noise=noise, timesteps=timesteps, sample_index=sample_index,
                     sample_weights=sample_weights)  # fmt: skip


@torch.no_grad()
def per_sample_denoising_loss(model: nn.Module, noised: NoisedSet, batch_size: int = 1024) -> torch.Tensor:
    """Mean squared noise-prediction error per held-out sample, `(m,)` float64 (mean over draws and dimensions)."""
    errors = []
    for start in range(0, noised.noisy.shape[0], batch_size):
        chunk = slice(start, start + batch_size)
        noise_pred = model(noised.noisy[chunk], noised.timesteps[chunk], return_dict=False)[0]
        errors.append((noise_pred.double() - noised.noise[chunk].double()).pow(2).flatten(1).mean(1))
    per_copy = torch.cat(errors)  # (M,)
    count = noised.sample_weights.numel()
    sums = torch.zeros(count, dtype=torch.float64).index_add_(0, noised.sample_index, per_copy)
    return sums / torch.bincount(noised.sample_index, minlength=count).to(torch.float64)


def denoising_loss(model: nn.Module, noised: NoisedSet, batch_size: int = 1024) -> float:
    """The weighted held-out denoising loss ``L`` of the module docstring."""
    return float((noised.sample_weights * per_sample_denoising_loss(model, noised, batch_size)).sum())
