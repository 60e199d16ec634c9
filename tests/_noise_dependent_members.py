"""Exact Gaussian members whose best fusion weights change with the noise level, with the per-bin optimum in closed
form.

Member 0 is ``N(mu, s_0^2 I)`` (the target's mean, a narrower spread), member 1 ``N(mu + delta, s^2 I)`` (the target's
spread, a shifted mean); the target is ``N(mu, s^2 I)``. At high noise the means decide the noise prediction (member 0
is best), at low noise the spread does (member 1 is best). With ``x0 = m + s z`` and ``c_i = 1 / (a s_i^2 + 1 - a)``
(``a = alphas_cumprod[t]``) the members' exact predictions give per timestep

``G_ij(t) = (1 - a) c_i c_j (a <(m - mu_i)(m - mu_j)> + a s^2 + 1 - a)``, ``b_i(t) = (1 - a) c_i``,

(``<.>``: mean over dimensions), and a bin's optimum is the simplex QP of their means over the bin's timesteps.
"""

from typing import Sequence, Tuple

import torch
from _gaussian_members import SHAPE, GaussianNoisePredictor

from diffusers_scorefusion import FusedUNet
from diffusers_scorefusion.fusion.fusion_utils import solve_simplex_qp


def noise_dependent_problem(
    scheduler, delta: float = 1.0, stds: Sequence[float] = (0.5, 1.0), common: bool = False
) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Member means `(2, C, H, W)`, their stds and the target's std. `common=True` gives both members the target's
    spread and mean ``mu + delta_i``: then the best weights do not depend on the noise level."""
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(SHAPE, generator=generator)
    shift = delta * torch.randn(SHAPE, generator=generator)
    if common:
        means = torch.stack([mu - 0.6 * shift, mu + 0.4 * shift])  # the target mean is 0.4 / 0.6 of the way
        return means, torch.tensor([stds[1], stds[1]]), stds[1]
    return torch.stack([mu, mu + shift]), torch.tensor(list(stds)), stds[1]


def members(means: torch.Tensor, stds: torch.Tensor, scheduler) -> FusedUNet:
    return FusedUNet([GaussianNoisePredictor(m, float(s), scheduler.alphas_cumprod) for m, s in zip(means, stds)])


def target_samples(means: torch.Tensor, target_mean: torch.Tensor, std: float, num_samples: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return target_mean + std * torch.randn((num_samples, *SHAPE), generator=generator)


def per_bin_optimum(
    means: torch.Tensor, stds: torch.Tensor, target_mean: torch.Tensor, std: float, alphas_cumprod: torch.Tensor,
    bin_edges: Sequence[float],
) -> torch.Tensor:  # fmt: skip
    """The population optimum of each bin `(nb, k)` (timesteps drawn uniformly from all of the schedule)."""
    a = alphas_cumprod.to(torch.float64)[:, None]  # (T, 1)
    c = 1 / (a * stds.to(torch.float64) ** 2 + 1 - a)  # (T, k)
    offsets = (target_mean[None] - means).flatten(1).to(torch.float64)  # (k, D)
    products = offsets @ offsets.T / offsets.shape[1]  # (k, k)
    a3 = a[:, :, None]
    gram = (1 - a3) * c[:, :, None] * c[:, None, :] * (a3 * products + a3 * std**2 + 1 - a3)  # (T, k, k)
    linear = (1 - a) * c  # (T, k)
    t = torch.arange(alphas_cumprod.numel(), dtype=torch.float64)
    rows = []
    for low, high in zip(bin_edges[:-1], bin_edges[1:]):
        inside = (t >= low) & (t < high)
        rows.append(solve_simplex_qp(gram[inside].mean(0), linear[inside].mean(0)))
    return torch.stack(rows)
