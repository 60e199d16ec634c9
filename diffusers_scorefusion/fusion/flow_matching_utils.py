"""The flow-matching side of ScoreFusion (SD3, Flux and other rectified-flow models), in pure torch.

Nothing here imports Diffusers. Symbols: ``t`` (Diffusers' ``sigma``, in [0, 1]) is the noise level of the rectified
flow ``x_t = (1 - t) x0 + t eps``; the model predicts the velocity ``v = eps - x0``. Diffusers' flow-matching
schedulers use ``timestep = sigma * num_train_timesteps``; some pipelines (Flux, QwenImage) pass the model
``timestep / 1000``.

Why fusing velocities is ScoreFusion: ``x_t | x0 ~ N((1 - t) x0, t^2 I)``, so by Tweedie's formula the score of the
noised data is ``score_t(x) = -E[eps | x_t = x] / t``. Writing ``x = (1 - t) E[x0 | x] + t E[eps | x]``:

    E[eps | x] = -t score_t(x)
    E[x0 | x]  = (x - t E[eps | x]) / (1 - t) = (x + t^2 score_t(x)) / (1 - t)
    E[v | x]   = E[eps | x] - E[x0 | x] = -(x + t score_t(x)) / (1 - t)

The velocity is affine in the score with coefficients that depend on ``t`` alone, so for weights on the simplex
``sum_i lambda_i v_i = -(x + t sum_i lambda_i score_i) / (1 - t)``: the weighted velocity is exactly the velocity of
the fused score ``sum_i lambda_i score_i`` of the KL barycenter ``p ∝ prod_i p_i^lambda_i``. Fitting minimises the
same quadratic as for diffusion models, with the target ``eps - x0`` (as Diffusers' flow-matching training scripts
compute it).
"""

import numbers
from typing import Optional, Tuple

import torch

# Timestep densities of Diffusers' flow-matching training scripts (`compute_density_for_timestep_sampling`):
# "uniform" (weighting_scheme "none") and "logit_normal" (mean 0, std 1: the scripts' defaults).
TIMESTEP_DENSITIES = ("uniform", "logit_normal")
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`values` `(B,)` (or a scalar) as float64 `(B, 1, ..., 1)` on `like`'s device."""
    values = torch.as_tensor(values, dtype=torch.float64, device=like.device)
    return values.reshape((-1,) + (1,) * (like.ndim - 1)) if values.ndim else values


def velocity_from_score(score: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``E[v | x_t] = -(x_t + t score_t(x_t)) / (1 - t)`` for ``x_t`` = `sample`, ``t`` = `sigma` (scalar or `(B,)`);
    float64. Undefined at ``t = 1`` (pure noise)."""
    t = _broadcast(sigma, sample)
    return -(sample.to(torch.float64) + t * score.to(torch.float64)) / (1 - t)


def score_from_velocity(velocity: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The inverse of [`velocity_from_score`]: ``score_t(x_t) = -(x_t + (1 - t) v) / t``; float64, undefined at
    ``t = 0``."""
    t = _broadcast(sigma, sample)
    return -(sample.to(torch.float64) + (1 - t) * velocity.to(torch.float64)) / t


def flow_matching_noisy_sample(sample: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps`` (computed in float64, returned in `sample`'s dtype), as
    `FlowMatchEulerDiscreteScheduler.scale_noise` and the training scripts form it."""
    t = _broadcast(sigma, sample)
    noisy = (1 - t) * sample.to(torch.float64) + t * noise.to(torch.float64)
    return noisy.to(sample.dtype)


def flow_matching_target(sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity a perfect model predicts for ``x_t = (1 - t) x0 + t eps``: ``eps - x0`` (float64)."""
    return noise.to(torch.float64) - sample.to(torch.float64)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The scheduler's shift ``shift * t / (1 + (shift - 1) * t)`` (`FlowMatchEulerDiscreteScheduler`; SD3: 3.0)."""
    _check_shift(shift)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def unshift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The inverse of [`shift_sigmas`]: ``t / (shift - (shift - 1) * t)``."""
    _check_shift(shift)
    return sigmas / (shift - (shift - 1) * sigmas)


def _check_shift(shift: float) -> None:
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not 0 < shift < float("inf"):
        raise ValueError(f"shift must be a positive finite number, got {shift!r}")


def _check_density(density: str) -> None:
    if density not in TIMESTEP_DENSITIES:
        raise ValueError(f"timestep density must be one of {TIMESTEP_DENSITIES}, got {density!r}")


def sigma_cdf(sigmas: torch.Tensor, density: str, shift: float = 1.0) -> torch.Tensor:
    """``P(T <= t)`` for ``T = shift_sigmas(U, shift)`` with ``U`` drawn from `density` (float64).

    ``"uniform"``: ``U ~ U(0, 1)``; ``"logit_normal"``: ``U = sigmoid(Z)``, ``Z ~ N(0, 1)``.
    """
    _check_density(density)
    u = unshift_sigmas(torch.as_tensor(sigmas, dtype=torch.float64).clamp(0, 1), shift)
    if density == "uniform":
        return u
    return torch.special.ndtr((torch.logit(u) - LOGIT_MEAN) / LOGIT_STD)  # logit(0) = -inf -> 0


def sigma_quantile(probabilities: torch.Tensor, density: str, shift: float = 1.0) -> torch.Tensor:
    """The inverse of [`sigma_cdf`] (float64)."""
    _check_density(density)
    p = torch.as_tensor(probabilities, dtype=torch.float64)
    u = p if density == "uniform" else torch.sigmoid(LOGIT_MEAN + LOGIT_STD * torch.special.ndtri(p))
    return shift_sigmas(u, shift)


def sample_sigmas(
    num_samples: int,
    density: str,
    shift: float = 1.0,
    sigma_range: Tuple[float, float] = (0.0, 1.0),
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Noise levels drawn as Diffusers' flow-matching training scripts draw them, restricted to `sigma_range`.

    ``T = shift_sigmas(U, shift)`` with ``U`` from `density`, conditioned on ``T`` in `sigma_range` (inverse-CDF
    sampling, so the restriction costs nothing). The scripts also round ``U`` to the scheduler's grid of
    ``1 / num_train_timesteps``; here ``T`` is continuous. Returns float64 `(num_samples,)` on the CPU.
    """
    low, high = sigma_range
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"sigma_range must satisfy 0 <= low < high <= 1, got {sigma_range!r}")
    bounds = sigma_cdf(torch.tensor([low, high], dtype=torch.float64), density, shift)  # (2,)
    uniform = torch.rand(num_samples, generator=generator, dtype=torch.float64)
    return sigma_quantile(bounds[0] + uniform * (bounds[1] - bounds[0]), density, shift).clamp(low, high)
