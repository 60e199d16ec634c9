"""Feynman-Kac corrector (FKC) maths for sampling the KL barycenter exactly, in pure torch (no Diffusers import).

Skreta et al., "Feynman-Kac Correctors in Diffusion" (ICML 2025), product of experts: to sample
``pi_t ∝ prod_j p_{j,t}^{beta_j}`` (``sum_j beta_j = 1``) simulate the reverse SDE with the combined score
``s_bar = sum_j beta_j s_j`` and carry a log-weight per particle that gains, along the reverse simulation,

    d log w = -(g_t^2 / 2) sum_j beta_j ||s_j - s_bar||^2 dt .

The rate does not depend on how much noise the reverse sampler injects (the divergence terms cancel for any
reverse SDE with the marginals of ``s_bar``), but resampling needs noise to separate duplicated particles, hence a
stochastic sampler. For ``x_t = alpha_t x0 + sigma_t eps`` the score is ``s = -eps / sigma_t``; in a step from
``t`` to ``t_prev`` of a DDPM-family schedule ``g_t^2 dt ~ 1 - abar_t / abar_{t_prev}`` (``abar = alphas_cumprod``).
For rectified flow ``x_t = (1 - t) x0 + t eps`` (``sigma = t``, velocity ``v = eps - x0``) the noise is
``eps = x_t + (1 - t) v``, so noise differences are ``(1 - t)`` times velocity differences, and
``g_t^2 = 2 t / (1 - t)``: ``d log w = -((1 - t) / t) sum_j beta_j ||v_j - v_bar||^2 dt`` (with ``dt > 0`` the
length of the reverse step ``t -> t_prev``; [`fkc_flow_step_factor`] is its exact discrete analogue).
Code names: ``beta_j`` is `exponents`, ``eps_j`` are `noise_preds` `(J, B, ...)`, ``abar`` is `alpha_bar`.
Classifier-free guidance with scale ``w`` on a fusion ``lambda`` is the product of the experts (member ``i``
unconditional, member ``i`` conditional) with exponents ``lambda_i (1 - w)`` and ``lambda_i w``.
"""

import math
from typing import Optional, Tuple

import torch


def fkc_step_factor(alpha_bar_t: float, alpha_bar_prev: float) -> float:
    """``g_t^2 dt / sigma_t^2 = (1 - abar_t / abar_prev) / (1 - abar_t)`` for a DDPM-family step ``t -> t_prev``."""
    if not (0 < alpha_bar_t < 1) or not (0 < alpha_bar_prev <= 1) or alpha_bar_prev < alpha_bar_t:
        raise ValueError(
            f"need 0 < alpha_bar_t < 1, alpha_bar_t <= alpha_bar_prev <= 1, got {alpha_bar_t!r} and {alpha_bar_prev!r}"
        )
    return (1.0 - alpha_bar_t / alpha_bar_prev) / (1.0 - alpha_bar_t)


def fkc_flow_step_factor(sigma_t: float, sigma_prev: float) -> float:
    """``g_t^2 dt / sigma_t^2`` for a rectified-flow step ``t -> t_prev`` (``x_t = (1 - t) x0 + t eps``, ``sigma = t``).

    In any schedule ``x_t = alpha_t x0 + sigma_t eps`` the forward transition from ``t_prev`` to ``t`` adds variance
    ``g_t^2 dt = sigma_t^2 - (alpha_t / alpha_prev)^2 sigma_prev^2``, so the factor is ``1 - snr_t / snr_prev`` with
    ``snr = alpha^2 / sigma^2`` (for DDPM this is [`fkc_step_factor`]); for flow sigmas
    ``1 - ((1 - t) t_prev / ((1 - t_prev) t))^2``, ``~ 2 dt / (t (1 - t))`` for small steps. Multiply by ``(1 - t)^2``
    to apply it to velocity differences.
    """
    if not (0 < sigma_t <= 1) or not (0 <= sigma_prev < 1) or sigma_prev > sigma_t:
        raise ValueError(f"need 0 <= sigma_prev <= sigma_t <= 1, sigma_t > 0, sigma_prev < 1, got {sigma_t!r} and "
                         f"{sigma_prev!r}")  # fmt: skip
    return 1.0 - ((1.0 - sigma_t) * sigma_prev / ((1.0 - sigma_prev) * sigma_t)) ** 2


def guidance_exponents(weights: torch.Tensor, guidance_scale: Optional[float]) -> torch.Tensor:
    """Exponents of the experts of a guided fusion: `(2k,)` ``[lambda (1 - w), lambda w]`` (unconditional experts
    first, as Diffusers batches them), or `weights` itself without guidance (`guidance_scale=None`)."""
    weights = weights.to(torch.float64)
    if guidance_scale is None:
        return weights
    return torch.cat([weights * (1.0 - guidance_scale), weights * guidance_scale], dim=-1)


def fkc_log_weight_increment(noise_preds: torch.Tensor, exponents: torch.Tensor, step_factor: float) -> torch.Tensor:
    """``-(step_factor / 2) sum_j beta_j ||eps_j - eps_bar||^2`` per particle, ``eps_bar = sum_j beta_j eps_j``.

    `noise_preds` `(J, B, ...)` are the experts' noise predictions, `exponents` `(J,)` or `(B, J)` sum to 1 (they may
    be negative, as under guidance with ``w > 1``), `step_factor` is ``g_t^2 dt / sigma_t^2`` ([`fkc_step_factor`]).
    Returns `(B,)` float64.
    """
    if noise_preds.ndim < 2 or exponents.shape[-1] != noise_preds.shape[0]:
        raise ValueError(
            f"exponents {tuple(exponents.shape)} must have one entry per expert of noise_preds "
            f"{tuple(noise_preds.shape)}"
        )
    flat = noise_preds.flatten(2).to(torch.float64)  # (J, B, D)
    beta = exponents.to(flat.device, torch.float64)
    beta = beta[:, None].expand(-1, flat.shape[1]) if beta.ndim == 1 else beta.T  # (J, B)
    if ((beta.sum(0) - 1).abs() > 1e-6).any():
        raise ValueError(f"exponents must sum to 1, got sums {beta.sum(0).tolist()[:4]}")
    mean = torch.einsum("jb,jbd->bd", beta, flat)  # eps_bar (B, D)
    spread = ((flat - mean) ** 2).sum(-1)  # ||eps_j - eps_bar||^2 (J, B)
    return -0.5 * step_factor * (beta * spread).sum(0)


def center_and_clamp(increments: torch.Tensor, clamp: Optional[float]) -> torch.Tensor:
    """Subtracts each group's mean increment (which leaves the normalised weights unchanged) and clamps the result to
    ``[-clamp, clamp]`` (FKC's EDM2 image code: against weight degeneracy in high dimension). `increments` `(G, N)`;
    `clamp=None` only centres."""
    centred = increments - increments.mean(dim=-1, keepdim=True)
    return centred if clamp is None else centred.clamp(-clamp, clamp)


def normalized_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """``w / sum w`` within each group: `(G, N)` log-weights to `(G, N)` weights (softmax, float64)."""
    return torch.softmax(log_weights.to(torch.float64), dim=-1)


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """Kish's ``ESS = (sum w)^2 / sum w^2`` per group: `(G, N)` log-weights to `(G,)` values in ``[1, N]``."""
    weights = normalized_weights(log_weights)
    return 1.0 / (weights**2).sum(dim=-1)


def systematic_resample(log_weights: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Systematic resampling within each group: `(G, N)` log-weights to `(G, N)` ancestor indices in ``[0, N)``.

    One uniform ``u ~ U[0, 1)`` per group; particle ``n`` takes the ancestor whose cumulative weight first exceeds
    ``(n + u) / N`` (Kitagawa 1996). Particle ``i`` is copied ``floor(N w_i)`` or ``ceil(N w_i)`` times.
    """
    weights = normalized_weights(log_weights).cpu()  # (G, N)
    num_groups, num = weights.shape
    device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.rand(num_groups, 1, generator=generator, device=device, dtype=torch.float64).cpu()
    positions = (torch.arange(num, dtype=torch.float64) + offsets) / num  # (G, N)
    cumulative = weights.cumsum(dim=-1)
    cumulative[:, -1] = math.inf  # rounding must never push an index past N - 1
    return torch.searchsorted(cumulative, positions, right=True).clamp(max=num - 1).to(log_weights.device)


def group_gather_indices(ancestors: torch.Tensor) -> torch.Tensor:
    """Flat batch indices of `(G, N)` within-group ancestors for a batch laid out group by group (`(G * N,)`)."""
    num_groups, num = ancestors.shape
    base = torch.arange(num_groups, device=ancestors.device)[:, None] * num
    return (base + ancestors).flatten()


def reweight_and_resample(
    log_weights: torch.Tensor,
    increments: Optional[torch.Tensor],
    ess_threshold: float,
    increment_clamp: Optional[float] = None,
    force: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One SMC step on `(G, N)` log-weights: add the (centred, clamped) `increments` `(G, N)` (`None`: no update),
    then resample every group whose ESS fell below ``ess_threshold * N`` (all groups with `force`).

    Returns the new log-weights (0 in resampled groups), the ESS `(G,)` before resampling, and `(G, N)` ancestors
    (the identity in groups not resampled) or `None` when no group was resampled.
    """
    if increments is not None:
        log_weights = log_weights + center_and_clamp(increments.to(log_weights), increment_clamp)
    ess = effective_sample_size(log_weights)
    num_groups, num = log_weights.shape
    resample = torch.ones(num_groups, dtype=torch.bool) if force else (ess < ess_threshold * num).cpu()
    if not resample.any():
        return log_weights, ess, None
    ancestors = torch.arange(num, device=log_weights.device).expand(num_groups, num).clone()
    ancestors[resample] = systematic_resample(log_weights[resample], generator)
    log_weights = log_weights.clone()
    log_weights[resample] = 0.0
    return log_weights, ess, ancestors
