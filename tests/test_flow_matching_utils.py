"""The flow-matching maths: velocity and score, the target, the scheduler's shift and the timestep densities."""

import pytest
import torch
from _gaussian_flow_members import gaussian_score, gaussian_velocity
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from diffusers_scorefusion.fusion.flow_matching_utils import (
    flow_matching_noisy_sample,
    flow_matching_target,
    sample_sigmas,
    score_from_velocity,
    shift_sigmas,
    sigma_cdf,
    sigma_quantile,
    unshift_sigmas,
    velocity_from_score,
)


def _ks_statistic(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of `samples` and `cdf`."""
    x = samples.sort().values.double()
    n = x.numel()
    theoretical = cdf(x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - theoretical
    lower = theoretical - torch.arange(0, n, dtype=torch.float64) / n
    return max(upper.max().item(), lower.max().item())


# ------------------------------------------------------------------------------------------------ velocity and score
def test_velocity_of_the_exact_score_is_the_regression_of_eps_minus_x0_on_x_t():
    """Monte Carlo: for 1-D Gaussian data E[eps - x0 | x_t] is affine in x_t; its least-squares fit on samples must
    match velocity_from_score of the exact score (which is derived independently of the velocity)."""
    generator = torch.Generator().manual_seed(0)
    mean, std, t, n = 1.5, 0.7, 0.35, 400_000
    x0 = mean + std * torch.randn(n, generator=generator, dtype=torch.float64)
    eps = torch.randn(n, generator=generator, dtype=torch.float64)
    x_t = (1 - t) * x0 + t * eps
    design = torch.stack([x_t, torch.ones_like(x_t)], dim=1)  # (n, 2)
    slope, intercept = torch.linalg.lstsq(design, (eps - x0).unsqueeze(1)).solution.flatten().tolist()
    grid = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    sigma = torch.full((3,), t, dtype=torch.float64)
    score = gaussian_score(grid, sigma, torch.tensor(mean), std)
    predicted = velocity_from_score(score, grid, sigma)
    torch.testing.assert_close(predicted, slope * grid + intercept, rtol=0, atol=0.01)


def test_velocity_from_score_matches_the_gaussian_posterior_means():
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(5, 3, 4, 4, generator=generator, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.97], dtype=torch.float64)
    mean = torch.randn(3, 4, 4, generator=generator, dtype=torch.float64)
    velocity = velocity_from_score(gaussian_score(sample, sigma, mean, 0.6), sample, sigma)
    torch.testing.assert_close(velocity, gaussian_velocity(sample, sigma, mean, 0.6), rtol=1e-12, atol=1e-12)


def test_score_and_velocity_conversions_are_inverse():
    generator = torch.Generator().manual_seed(2)
    sample, score = torch.randn(2, 2, 8, 3, 3, generator=generator, dtype=torch.float64)  # two (B, C, H, W)
    sigma = torch.tensor([0.2, 0.9], dtype=torch.float64)
    torch.testing.assert_close(score_from_velocity(velocity_from_score(score, sample, sigma), sample, sigma), score)
    # a scalar sigma works too
    torch.testing.assert_close(
        score_from_velocity(velocity_from_score(score, sample, torch.tensor(0.4)), sample, torch.tensor(0.4)), score
    )


def test_fused_velocities_are_the_velocity_of_the_fused_score():
    """sum_i lambda_i v_i = v(sum_i lambda_i score_i) for any scores, because v is affine in the score."""
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(4, 2, 5, 5, generator=generator, dtype=torch.float64)
    scores = torch.randn(3, 4, 2, 5, 5, generator=generator, dtype=torch.float64)  # (k, B, C, H, W)
    sigma = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    fused_velocity = sum(w * velocity_from_score(s, sample, sigma) for w, s in zip(weights, scores))
    velocity_of_fused = velocity_from_score(torch.einsum("k,kbchw->bchw", weights, scores), sample, sigma)
    torch.testing.assert_close(fused_velocity, velocity_of_fused, rtol=1e-12, atol=1e-12)


def test_gaussian_members_with_a_common_std_fuse_into_the_barycenter_velocity():
    generator = torch.Generator().manual_seed(4)
    means = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    sample = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    weights = torch.tensor([0.6, 0.1, 0.3], dtype=torch.float64)
    fused = sum(w * gaussian_velocity(sample, sigma, m, 0.5) for w, m in zip(weights, means))
    barycenter = gaussian_velocity(sample, sigma, torch.einsum("k,kchw->chw", weights, means), 0.5)
    torch.testing.assert_close(fused, barycenter, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ noising and target
def test_noisy_sample_matches_the_scheduler_and_the_target_is_eps_minus_x0():
    generator = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(2, 2, 4, 8, 8, generator=generator)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    timestep = scheduler.timesteps[3:5]  # (2,)
    sigma = scheduler.sigmas[3:5]
    expected = scheduler.scale_noise(x0, timestep, noise)
    torch.testing.assert_close(flow_matching_noisy_sample(x0, noise, sigma), expected, rtol=0, atol=1e-6)
    target = flow_matching_target(x0, noise)
    assert target.dtype == torch.float64
    torch.testing.assert_close(target, (noise - x0).double())
    # a perfect velocity moves x_t to x0 in one Euler step of size -sigma: x0 = x_t - sigma v
    x_t = flow_matching_noisy_sample(x0.double(), noise.double(), sigma)
    torch.testing.assert_close(x_t - sigma.reshape(-1, 1, 1, 1) * target, x0.double())


# ------------------------------------------------------------------------------------------------ shift and densities
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_shift_matches_the_scheduler_and_unshift_inverts_it(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    unshifted = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    torch.testing.assert_close(shift_sigmas(unshifted, shift), scheduler.sigmas.double(), rtol=0, atol=1e-6)
    sigmas = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(unshift_sigmas(shift_sigmas(sigmas, shift), shift), sigmas, rtol=0, atol=1e-14)


@pytest.mark.parametrize("density", ["uniform", "logit_normal"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sampled_sigmas_follow_the_training_scripts_density(density, shift):
    """Same law as Diffusers' training scripts: u from compute_density_for_timestep_sampling, then the shift."""
    generator = torch.Generator().manual_seed(6)
    ours = sample_sigmas(20_000, density, shift=shift, generator=generator)
    scheme = "logit_normal" if density == "logit_normal" else "none"
    u = compute_density_for_timestep_sampling(scheme, 20_000, logit_mean=0.0, logit_std=1.0,
                                              generator=torch.Generator().manual_seed(7))  # fmt: skip
    theirs = shift_sigmas(u.double(), shift)
    # one-sample KS against the closed-form CDF and against the scripts' draws (critical value ~0.0136 at 1 %)
    assert _ks_statistic(ours, lambda x: sigma_cdf(x, density, shift)) < 0.0136
    assert _ks_statistic(theirs, lambda x: sigma_cdf(x, density, shift)) < 0.0136
    torch.testing.assert_close(sigma_cdf(sigma_quantile(torch.tensor([0.1, 0.5, 0.9]), density, shift), density, shift),
                               torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))  # fmt: skip


def test_sampled_sigmas_can_be_restricted_to_a_range():
    generator = torch.Generator().manual_seed(8)
    sigmas = sample_sigmas(20_000, "logit_normal", shift=3.0, sigma_range=(0.0, 0.1), generator=generator)
    assert sigmas.min() >= 0 and sigmas.max() <= 0.1
    low, high = sigma_cdf(torch.tensor([0.0, 0.1]), "logit_normal", 3.0)

    def conditional_cdf(x):
        return (sigma_cdf(x, "logit_normal", 3.0) - low) / (high - low)

    assert _ks_statistic(sigmas, conditional_cdf) < 0.0136


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sample_sigmas(4, "mode"), "must be one of"),
        (lambda: sample_sigmas(4, "uniform", sigma_range=(0.5, 0.2)), "0 <= low < high <= 1"),
        (lambda: sample_sigmas(4, "uniform", sigma_range=(0.0, 1.5)), "0 <= low < high <= 1"),
        (lambda: shift_sigmas(torch.tensor([0.5]), 0.0), "shift must be a positive"),
        (lambda: shift_sigmas(torch.tensor([0.5]), float("nan")), "shift must be a positive"),
    ],
)
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
