import math

import pytest
import torch

from diffusers_scorefusion.experiments.data import dequantize, quantize
from diffusers_scorefusion.experiments.likelihood import bits_per_dim, log_sigma_table, ode_log_likelihood, timestep_at
from diffusers_scorefusion.experiments.training import make_noise_scheduler
from diffusers_scorefusion.fusion.fusion_utils import alpha_sigma

ALPHAS_CUMPROD = make_noise_scheduler().alphas_cumprod


def random_covariance(dims: int, scale: float, seed: int) -> torch.Tensor:
    """A random SPD covariance with eigenvalues in [0.2, 1] * scale^2 (non-diagonal, so the Jacobian is not either)."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dims, dims, generator=generator, dtype=torch.float64))
    eigenvalues = scale**2 * torch.linspace(0.2, 1.0, dims, dtype=torch.float64)
    return basis @ torch.diag(eigenvalues) @ basis.T


def gaussian_eps_model(mean: torch.Tensor, covariance: torch.Tensor):
    """The exact epsilon predictor of data N(mean, C): eps = sigma (alpha^2 C + sigma^2 I)^-1 (x - alpha mean)."""
    eigenvalues, basis = torch.linalg.eigh(covariance)

    def eps_model(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        alpha, sigma = alpha_sigma(ALPHAS_CUMPROD, timestep)
        alpha, sigma = alpha.reshape(-1, 1), sigma.reshape(-1, 1)
        centred = (sample.double() - alpha * mean) @ basis  # (B, D) in the eigenbasis
        return (sigma * (centred / (alpha**2 * eigenvalues + sigma**2)) @ basis.T).float()

    return eps_model


def gaussian_log_density_at_t0(sample: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """log N(x; alpha_0 mean, alpha_0^2 C + sigma_0^2 I): the exact density at the ODE's start (timestep 0)."""
    alpha, sigma = alpha_sigma(ALPHAS_CUMPROD, torch.zeros(1))
    marginal = alpha**2 * covariance + sigma**2 * torch.eye(covariance.shape[0], dtype=torch.float64)
    distribution = torch.distributions.MultivariateNormal(alpha * mean[0], covariance_matrix=marginal)
    return distribution.log_prob(sample.double())


@pytest.mark.parametrize("scale", [0.5, 0.05])
def test_ode_likelihood_of_a_gaussian_matches_the_closed_form(scale):
    mean = torch.tensor([[0.3, -0.5, 0.1, 0.8]], dtype=torch.float64)
    covariance = random_covariance(4, scale, seed=0)
    sample = torch.distributions.MultivariateNormal(mean[0], covariance).sample((32,)).float()
    exact = gaussian_log_density_at_t0(sample, mean, covariance)
    model = gaussian_eps_model(mean, covariance)
    ode = ode_log_likelihood(model, sample, ALPHAS_CUMPROD, num_steps=32, hutchinson=False)
    # remaining error: the N(0, I) prior vs the exact p_T (alpha_T ~ 0.007) and RK4's discretisation
    assert (ode - exact).abs().max() < 0.03
    coarse = ode_log_likelihood(model, sample, ALPHAS_CUMPROD, num_steps=4, hutchinson=False)
    assert (coarse - exact).abs().mean() > (ode - exact).abs().mean()  # the step count matters, so it is measured


def test_hutchinson_estimate_is_unbiased():
    mean = torch.tensor([[0.2, -0.1, 0.4, 0.0, -0.3, 0.6]], dtype=torch.float64)
    model = gaussian_eps_model(mean, random_covariance(6, 0.3, seed=1))
    point = torch.tensor([[0.5, -0.4, 0.3, 0.2, 0.1, 0.2]])
    exact = ode_log_likelihood(model, point, ALPHAS_CUMPROD, num_steps=8, hutchinson=False)
    estimates = ode_log_likelihood(model, point.expand(512, -1).contiguous(), ALPHAS_CUMPROD, num_steps=8,
                                   generator=torch.Generator().manual_seed(0))
    standard_error = estimates.std() / math.sqrt(estimates.numel())
    assert estimates.std() > 0.01  # the probes do vary (a non-diagonal Jacobian)
    assert abs(estimates.mean() - exact[0]) < 4 * standard_error


def test_ode_likelihood_works_on_image_shaped_samples():
    mean = torch.zeros(1, 4, dtype=torch.float64)
    covariance = random_covariance(4, 0.5, seed=2)
    flat_model = gaussian_eps_model(mean, covariance)

    def image_model(sample, timestep):  # (B, 1, 2, 2)
        return flat_model(sample.flatten(1), timestep).reshape(sample.shape)

    sample = torch.distributions.MultivariateNormal(mean[0], covariance).sample((8,)).float()
    flat = ode_log_likelihood(flat_model, sample, ALPHAS_CUMPROD, num_steps=8, hutchinson=False)
    image = ode_log_likelihood(image_model, sample.reshape(8, 1, 2, 2), ALPHAS_CUMPROD, num_steps=8, hutchinson=False)
    assert torch.allclose(flat, image, atol=1e-5)


def test_timestep_at_inverts_the_interpolated_schedule():
    table = log_sigma_table(ALPHAS_CUMPROD)
    timesteps = torch.tensor([0.0, 0.25, 3.5, 499.9, 998.2, 999.0], dtype=torch.float64)
    alpha, sigma = alpha_sigma(ALPHAS_CUMPROD, timesteps)
    recovered = [timestep_at(float(torch.log(s / a)), table) for a, s in zip(alpha, sigma)]
    assert torch.allclose(torch.tensor(recovered, dtype=torch.float64), timesteps, atol=1e-6)
    with pytest.raises(ValueError, match="outside the schedule"):
        timestep_at(float(table[-1]) + 1.0, table)


def test_bits_per_dim_of_the_uniform_density_is_log2_of_the_levels():
    dims = 64
    uniform_on_cube = torch.tensor([-dims * math.log(2.0)])  # density 2^-D on [-1, 1]^D
    assert bits_per_dim(uniform_on_cube, dims, 17).item() == pytest.approx(math.log2(17))


def test_dequantize_stays_in_the_bin_and_quantize_inverts_it():
    levels = torch.arange(17).repeat(20)
    values = dequantize(levels, torch.Generator().manual_seed(0))
    assert values.min() >= -1 and values.max() < 1
    assert torch.equal(quantize(values), levels)
    with pytest.raises(ValueError, match="grey levels"):
        dequantize(torch.tensor([17]), torch.Generator())


def test_bad_step_count_is_refused():
    with pytest.raises(ValueError, match="num_steps"):
        ode_log_likelihood(lambda x, t: x, torch.zeros(1, 2), ALPHAS_CUMPROD, num_steps=0)
