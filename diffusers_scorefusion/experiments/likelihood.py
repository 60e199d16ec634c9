"""Exact-likelihood evaluation of an epsilon-prediction model through the probability-flow ODE.

The DDPM noise schedule ``x_t = alpha_t x0 + sigma_t eps`` (``alpha_t^2 = alphas_cumprod[t]``) is made continuous by
interpolating ``log sigma_VE = log(sigma_t / alpha_t)`` linearly between integer timesteps (as
`fusion_utils.alpha_sigma` does), so the network is only ever queried at noise levels it was trained on. In the
variance-exploding coordinates ``y = x / alpha`` the probability-flow ODE is the DDIM ODE (Song et al. 2021;
Karras et al. 2022, eq. 4 with ``D = y - sigma eps``):

    dy/ds = sigma eps_hat(alpha y, t(s)) ,     s = log sigma_VE ,

and the log-density changes by ``d log p(y_s)/ds = -div_y(sigma eps_hat) = -sigma alpha div_x eps_hat``. We integrate
from the smallest training noise level (timestep 0, sigma_VE ~ 0.01) to the largest (timestep 999) with a fixed-step
classical Runge-Kutta (RK4) in ``s``: the step count is fixed so the cost is known in advance, and ``s`` makes the
dynamics smooth enough for a few dozen evaluations. The divergence is the exact trace (small dimensions) or the
Skilling-Hutchinson estimate ``v^T (d eps_hat / dx) v`` with one Rademacher probe ``v`` per sample, held fixed along
the trajectory. The end point is scored under the prior ``x_T ~ N(0, I)``.
"""

import math
from typing import Callable, Optional

import torch

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sample, timestep) -> eps_hat, same shape


def log_sigma_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``log sigma_VE[t] = 0.5 log((1 - a_t) / a_t)`` per integer timestep (float64, increasing)."""
    alphas_cumprod = alphas_cumprod.to(torch.float64)
    return 0.5 * (torch.log1p(-alphas_cumprod) - torch.log(alphas_cumprod))


def timestep_at(log_sigma: float, table: torch.Tensor) -> float:
    """The fractional timestep whose interpolated ``log sigma_VE`` equals `log_sigma` (inverse of `alpha_sigma`)."""
    tolerance = 1e-9 * float(table[-1] - table[0])  # float rounding at the ends
    if not table[0] - tolerance <= log_sigma <= table[-1] + tolerance:
        raise ValueError(f"log sigma {log_sigma:.4f} is outside the schedule's range [{table[0]:.4f}, {table[-1]:.4f}]")
    log_sigma = min(max(log_sigma, float(table[0])), float(table[-1]))
    high = int(torch.searchsorted(table, torch.tensor(log_sigma, dtype=torch.float64)).clamp(1, table.numel() - 1))
    low = high - 1
    return low + float((log_sigma - table[low]) / (table[high] - table[low]))


def divergence(
    eps_model: EpsModel, sample: torch.Tensor, timestep: torch.Tensor, probe: Optional[torch.Tensor]
) -> tuple:
    """``(eps_hat, div_x eps_hat)`` per sample: Hutchinson ``v^T J v`` with `probe` ``v``; the exact trace if None."""
    with torch.enable_grad():
        sample = sample.detach().requires_grad_(True)
        eps = eps_model(sample, timestep)
        if probe is not None:
            (vjp,) = torch.autograd.grad(eps, sample, probe)
            div = (vjp * probe).flatten(1).sum(1)
        else:
            flat = eps.flatten(1)
            div = torch.zeros(sample.shape[0], dtype=eps.dtype)
            for d in range(flat.shape[1]):
                (row,) = torch.autograd.grad(flat[:, d].sum(), sample, retain_graph=d + 1 < flat.shape[1])
                div = div + row.flatten(1)[:, d]
    return eps.detach(), div.detach()


def ode_log_likelihood(
    eps_model: EpsModel,
    sample: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_steps: int = 12,
    hutchinson: bool = True,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``log p(x)`` in nats per sample, for `sample` taken as the model's data at timestep 0 (sigma_VE = table[0]).

    Args:
        eps_model: ``(x_t, t) -> eps_hat``; `t` is a float tensor of shape `(B,)` (fractional timesteps).
        sample: `(B, ...)` points ``x`` (float32).
        alphas_cumprod: the training schedule's cumulative alphas (length = number of training timesteps).
        num_steps: RK4 steps in ``log sigma_VE`` (4 model evaluations each, each with one vector-Jacobian product).
        hutchinson: Skilling-Hutchinson trace estimate (one Rademacher probe per sample); else the exact trace.
        generator: draws the probes.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    table = log_sigma_table(alphas_cumprod)
    batch = sample.shape[0]
    dims = sample[0].numel()
    probe = None
    if hutchinson:
        probe = torch.randint(0, 2, sample.shape, generator=generator).to(sample.dtype) * 2 - 1

    def drift(y: torch.Tensor, s: float) -> tuple:
        # y = x / alpha, sigma = sigma_VE = e^s, alpha = 1 / sqrt(1 + sigma^2)
        sigma = math.exp(s)
        alpha = 1.0 / math.sqrt(1.0 + sigma * sigma)
        timestep = torch.full((batch,), timestep_at(s, table), dtype=torch.float32)
        eps, div = divergence(eps_model, (alpha * y).to(sample.dtype), timestep, probe)
        return sigma * eps.to(torch.float64), sigma * alpha * div.to(torch.float64)  # dy/ds, div_y(dy/ds)

    s_start, s_end = float(table[0]), float(table[-1])
    step = (s_end - s_start) / num_steps
    alpha_start = 1.0 / math.sqrt(1.0 + math.exp(2 * s_start))
    y = sample.to(torch.float64) / alpha_start
    delta_logp = torch.zeros(batch, dtype=torch.float64)  # accumulates  int div_y f ds = log p_0(y_0) - log p_T(y_T)
    for i in range(num_steps):
        s = s_start + i * step
        k1, d1 = drift(y, s)
        k2, d2 = drift(y + 0.5 * step * k1, s + 0.5 * step)
        k3, d3 = drift(y + 0.5 * step * k2, s + 0.5 * step)
        k4, d4 = drift(y + step * k3, s + step)
        y = y + step / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        delta_logp = delta_logp + step / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
    alpha_end = 1.0 / math.sqrt(1.0 + math.exp(2 * s_end))
    x_end = (alpha_end * y).flatten(1)  # x_T, scored under N(0, I)
    prior = -0.5 * (x_end**2).sum(1) - 0.5 * dims * math.log(2 * math.pi)
    # log p_x(x_0) = log p_y(y_0) - D log alpha_0,  log p_y(y_0) = log p_y(y_T) + delta,  p_y(y_T) = p_x(x_T) alpha_T^D
    return prior + dims * math.log(alpha_end) + delta_logp - dims * math.log(alpha_start)


def bits_per_dim(log_likelihood: torch.Tensor, dims: int, num_levels: int) -> torch.Tensor:
    """Negative log-likelihood in bits/dim of the discrete data from the density of its dequantised version in [-1, 1].

    With ``z = 2 (g + u) / L - 1`` the bin of grey level ``g`` has width ``2 / L``, so
    ``log P(g) >= E_u log p(z) + D log(2 / L)`` (uniform dequantisation bound); bits/dim = ``-log P(g) / (D ln 2)``.
    """
    return -(log_likelihood + dims * math.log(2.0 / num_levels)) / (dims * math.log(2.0))
