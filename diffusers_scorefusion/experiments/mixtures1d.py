"""1-D Gaussian mixtures with exact scores, the KL barycenter on a grid, and Wasserstein-1 distances.

For a mixture ``sum_k w_k N(mu_k, s^2)`` noised as ``x_t = alpha_t x0 + sigma_t eps`` the noised density is the
mixture ``sum_k w_k N(alpha_t mu_k, alpha_t^2 s^2 + sigma_t^2)``, so the exact noise predictor is
``eps(x_t, t) = -sigma_t grad log p_t(x_t)`` in closed form (`ExactMixtureDenoiser`). The clean barycenter
``p_lambda ∝ prod_i p_i^lambda_i`` has no closed form for mixtures; `barycenter_on_grid` normalises it numerically.
"""

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence, Tuple

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from scipy.special import logsumexp
from scipy.stats import norm

from ..fusion.fusion_utils import alpha_sigma


@dataclass(frozen=True)
class Mixture1D:
    """A 1-D Gaussian mixture with a shared standard deviation."""

    means: Tuple[float, ...]
    std: float
    weights: Tuple[float, ...]

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`(count,)` float64 draws."""
        components = torch.multinomial(torch.tensor(self.weights, dtype=torch.float64), count, replacement=True,
                                       generator=generator)  # fmt: skip
        noise = torch.randn(count, generator=generator, dtype=torch.float64)
        return torch.tensor(self.means, dtype=torch.float64)[components] + self.std * noise

    def log_density(self, x: np.ndarray) -> np.ndarray:
        """``log p(x)``, stable far in the tails."""
        x = np.asarray(x, dtype=np.float64)[..., None]
        parts = np.log(self.weights) + norm.logpdf(x, loc=np.asarray(self.means), scale=self.std)
        return logsumexp(parts, axis=-1)

    def density(self, x: np.ndarray) -> np.ndarray:
        """``p(x)``."""
        return np.exp(self.log_density(x))

    def cdf(self, x: np.ndarray) -> np.ndarray:
        """``P(X <= x)``."""
        x = np.asarray(x, dtype=np.float64)[..., None]
        return (np.asarray(self.weights) * norm.cdf(x, loc=np.asarray(self.means), scale=self.std)).sum(-1)

    def moments(self) -> Tuple[float, float]:
        """Population mean and standard deviation."""
        weights, means = np.asarray(self.weights), np.asarray(self.means)
        mean = float((weights * means).sum())
        return mean, math.sqrt(self.std**2 + float((weights * (means - mean) ** 2).sum()))

    def affine(self, shift: float, scale: float) -> "Mixture1D":
        """The law of ``(X - shift) / scale``: e.g. the mixture in a model's standardised coordinates."""
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        return replace(self, means=tuple((m - shift) / scale for m in self.means), std=self.std / scale)

    def noise_pred(self, sample: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
        """Exact ``eps(x_t) = -sigma_t grad log p_t(x_t)`` (float64); `sample`, `alpha_t`, `sigma_t` of shape `(B,)`."""
        x = sample.to(torch.float64)[:, None]  # (B, 1)
        alpha, sigma = alpha_t.to(torch.float64)[:, None], sigma_t.to(torch.float64)[:, None]
        means = torch.tensor(self.means, dtype=torch.float64)[None]  # (1, K)
        variance = alpha**2 * self.std**2 + sigma**2  # (B, 1)
        log_weights = torch.log(torch.tensor(self.weights, dtype=torch.float64))[None]  # (1, K)
        log_parts = log_weights - 0.5 * (x - alpha * means) ** 2 / variance  # (B, K), up to a per-row constant
        responsibility = torch.softmax(log_parts, dim=1)  # (B, K)
        score = (responsibility * -(x - alpha * means) / variance).sum(1)  # (B,)
        return -sigma[:, 0] * score


class ExactMixtureDenoiser(ModelMixin, ConfigMixin):
    """The exact epsilon predictor of a 1-D mixture under a DDPM schedule, with the Diffusers calling convention.

    A stand-in for a perfectly trained member: `FusedUNet([ExactMixtureDenoiser(...), ...])` runs the fused sampler
    with exact member scores. Samples have shape `(B, 1)`; timesteps may be fractional.
    """

    @register_to_config
    def __init__(self, means: Sequence[float] = (0.0,), std: float = 1.0, weights: Sequence[float] = (1.0,),
                 alphas_cumprod: Sequence[float] = (0.5,), in_channels: int = 1, out_channels: int = 1,
                 sample_size: int = 1):  # fmt: skip
        super().__init__()
        self.mixture = Mixture1D(tuple(means), float(std), tuple(weights))
        self.register_buffer("schedule", torch.tensor(alphas_cumprod, dtype=torch.float64), persistent=False)

    @classmethod
    def from_mixture(cls, mixture: Mixture1D, alphas_cumprod: torch.Tensor) -> "ExactMixtureDenoiser":
        """The exact denoiser of `mixture` under the schedule `alphas_cumprod`."""
        return cls(means=list(mixture.means), std=mixture.std, weights=list(mixture.weights),
                   alphas_cumprod=alphas_cumprod.to(torch.float64).tolist())  # fmt: skip

    def forward(self, sample: torch.Tensor, timestep: Any, return_dict: bool = True):
        if sample.ndim != 2 or sample.shape[1] != 1:
            raise ValueError(f"sample must have shape (B, 1), got {tuple(sample.shape)}")
        timesteps = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).expand(sample.shape[0])
        alpha_t, sigma_t = alpha_sigma(self.schedule, timesteps.cpu())
        noise_pred = self.mixture.noise_pred(sample[:, 0].cpu(), alpha_t, sigma_t)[:, None].to(sample)
        return UNet2DOutput(sample=noise_pred) if return_dict else (noise_pred,)


def wasserstein1(samples: np.ndarray, reference: np.ndarray) -> float:
    """Exact W1 between two empirical 1-D distributions: ``int |F(x) - G(x)| dx`` over the merged sample points."""
    a, b = np.sort(np.asarray(samples, np.float64).ravel()), np.sort(np.asarray(reference, np.float64).ravel())
    if a.size == 0 or b.size == 0:
        raise ValueError(f"wasserstein1 needs two non-empty samples, got sizes {a.size} and {b.size}")
    points = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(a, points[:-1], side="right") / a.size
    cdf_b = np.searchsorted(b, points[:-1], side="right") / b.size
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(points)))


def barycenter_on_grid(log_densities: np.ndarray, weights: Sequence[float], grid: np.ndarray) -> np.ndarray:
    """The density of ``p_lambda ∝ prod_i p_i^lambda_i`` on an equispaced `grid` `(G,)` from ``log p_i`` `(k, G)`.

    Normalised by the trapezoid rule on the grid, which must cover the barycenter's mass.
    """
    log_densities = np.asarray(log_densities, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if log_densities.ndim != 2 or log_densities.shape != (weights.size, np.size(grid)):
        raise ValueError(f"log_densities must be (k, G) = ({weights.size}, {np.size(grid)}), got {log_densities.shape}")
    if (weights < 0).any() or abs(weights.sum() - 1) > 1e-9:
        raise ValueError(f"weights must be >= 0 and sum to 1, got {weights.tolist()}")
    log_product = weights @ log_densities  # sum_i lambda_i log p_i, (G,)
    unnormalised = np.exp(log_product - log_product.max())
    return unnormalised / np.trapezoid(unnormalised, grid)


def grid_cdf(grid: np.ndarray, density: np.ndarray) -> np.ndarray:
    """The CDF of a density on a grid (cumulative trapezoid rule, ending at exactly 1)."""
    steps = 0.5 * (density[1:] + density[:-1]) * np.diff(grid)
    cdf = np.concatenate([[0.0], np.cumsum(steps)])
    return cdf / cdf[-1]


def wasserstein1_to_cdf(samples: np.ndarray, grid: np.ndarray, cdf: np.ndarray) -> float:
    """``int |F_samples - F|`` for a CDF `F` given on an equispaced fine grid (0 below it, 1 above it).

    The integral runs over the grid, extended with the same spacing to cover every sample.
    """
    samples = np.sort(np.asarray(samples, dtype=np.float64).ravel())
    if samples.size == 0:
        raise ValueError("wasserstein1_to_cdf needs a non-empty sample")
    step = float(grid[1] - grid[0])
    low, high = min(float(grid[0]), samples[0] - step), max(float(grid[-1]), samples[-1] + step)
    points = np.linspace(low, high, int(round((high - low) / step)) + 1)
    reference = np.interp(points, grid, cdf, left=0.0, right=1.0)
    empirical = np.searchsorted(samples, points, side="right") / samples.size
    return float(np.trapezoid(np.abs(empirical - reference), points))


def wasserstein1_between_cdfs(grid: np.ndarray, cdf_a: np.ndarray, cdf_b: np.ndarray) -> float:
    """``int |F_a - F_b|`` for two CDFs on the same grid."""
    return float(np.trapezoid(np.abs(np.asarray(cdf_a) - np.asarray(cdf_b)), grid))


def sample_from_grid(grid: np.ndarray, cdf: np.ndarray, count: int, generator: np.random.Generator) -> np.ndarray:
    """`count` exact draws (up to the grid's resolution) by inverting a grid CDF."""
    return np.interp(generator.random(count), cdf, grid)
