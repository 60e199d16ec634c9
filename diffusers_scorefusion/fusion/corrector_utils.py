"""Langevin corrector maths for predictor-corrector sampling, in pure torch (nothing here imports Diffusers).

Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations" (ICLR 2021), Algorithm 5
(the corrector of the predictor-corrector samplers; score_sde's ``LangevinCorrector``): at one noise level, with the
score ``s = grad_x log p_t(x)`` and fresh noise ``z ~ N(0, I)``,

    epsilon = 2 alpha (r ||z|| / ||s||)^2 ,      x <- x + epsilon s + sqrt(2 epsilon) z ,

where ``r`` is the target signal-to-noise ratio (`snr`), ``alpha = 1 - beta_t`` for the VP SDE, and the norms are
per-sample L2 norms averaged over the batch (as score_sde does). Paper symbols in code: ``s`` is `score`, ``z`` is
`noise`, ``epsilon`` is `step_size`. Under a DDPM schedule the score of an epsilon prediction is
``s = -eps / sigma_t``. With ScoreFusion the score is the fused one, ``sum_i lambda_i s_i``: Langevin steps at a fixed
noise level then target ``prod_i p_{i,t}^lambda_i`` (normalised), which tends to the barycenter as ``t -> 0``.
"""

import math
from typing import Callable, Optional

import torch

DEFAULT_SNR = 0.16  # score_sde's value for the VP SDE on CIFAR-10


def check_corrector_options(num_corrector_steps: int, snr: float) -> None:
    """Refuses a negative or non-integer step count and a non-positive or non-finite signal-to-noise ratio."""
    if isinstance(num_corrector_steps, bool) or not isinstance(num_corrector_steps, int):
        raise TypeError(f"num_corrector_steps must be an int, got {num_corrector_steps!r}")
    if num_corrector_steps < 0:
        raise ValueError(f"num_corrector_steps must be >= 0, got {num_corrector_steps}")
    if isinstance(snr, bool) or not isinstance(snr, (int, float)) or not math.isfinite(snr) or snr <= 0:
        raise ValueError(f"snr must be a finite number > 0, got {snr!r}")


def score_from_noise_pred(noise_pred: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """``s = -eps / sigma_t`` for ``x_t = alpha_t x0 + sigma_t eps``; `sigma_t` is a scalar or has shape `(B,)`."""
    sigma = torch.as_tensor(sigma_t, dtype=noise_pred.dtype, device=noise_pred.device)
    if sigma.ndim == 1:
        sigma = sigma.reshape((-1,) + (1,) * (noise_pred.ndim - 1))  # (B, 1, ..., 1)
    if (sigma <= 0).any():
        raise ValueError(f"sigma_t must be > 0 to turn a noise prediction into a score, got {sigma.flatten().tolist()}")
    return -noise_pred / sigma


def langevin_step_size(score: torch.Tensor, noise: torch.Tensor, snr: float, alpha: float) -> torch.Tensor:
    """``epsilon = 2 alpha (r ||z|| / ||s||)^2`` with batch-averaged per-sample norms; 0 where the score is 0."""
    grad_norm = score.flatten(1).to(torch.float64).norm(dim=1).mean()  # ||s||, mean over the batch
    noise_norm = noise.flatten(1).to(torch.float64).norm(dim=1).mean()  # ||z||
    if grad_norm == 0:
        return torch.zeros((), dtype=torch.float64)
    return 2 * alpha * (snr * noise_norm / grad_norm) ** 2


def langevin_step(
    sample: torch.Tensor, score: torch.Tensor, noise: torch.Tensor, step_size: torch.Tensor
) -> torch.Tensor:
    """One unadjusted Langevin step ``x + epsilon s + sqrt(2 epsilon) z`` (in `sample`'s dtype)."""
    step = step_size.to(torch.float64)
    moved = sample.to(torch.float64) + step * score.to(torch.float64) + (2 * step).sqrt() * noise.to(torch.float64)
    return moved.to(sample.dtype)


def langevin_correct_with_score(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    sample: torch.Tensor,
    num_corrector_steps: int,
    snr: float = DEFAULT_SNR,
    alpha: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Runs `num_corrector_steps` Langevin steps at one noise level; `score_fn(x)` returns the score at `x`.

    `alpha` is ``1 - beta_t`` of the VP SDE at this level (1 for a VE SDE); the noise ``z`` is drawn with `generator`
    on the generator's device and moved to `sample`'s.
    """
    check_corrector_options(num_corrector_steps, snr)
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    for _ in range(num_corrector_steps):
        score = score_fn(sample)
        if score.shape != sample.shape:
            raise ValueError(
                f"score_fn returned shape {tuple(score.shape)} for a sample of shape {tuple(sample.shape)}"
            )
        device = generator.device if generator is not None else sample.device
        noise = torch.randn(sample.shape, generator=generator, device=device, dtype=sample.dtype).to(sample.device)
        sample = langevin_step(sample, score, noise, langevin_step_size(score, noise, snr, alpha))
    return sample
