"""`num_timestep_bins="auto"`: the joint smoothed QP, the cross-validated choice, and its acceptance criteria."""

import math

import numpy as np
import pytest
import torch
from _gaussian_members import SHAPE
from _noise_dependent_members import members, noise_dependent_problem, per_bin_optimum, target_samples
from scipy.optimize import minimize

from diffusers_scorefusion import fit_weights, solve_simplex_qp
from diffusers_scorefusion.fitting.cross_validation import (
    RELATIVE_SMOOTHNESS,
    _fold_of_each_sample,
    coarsen,
    select_timestep_bins,
)
from diffusers_scorefusion.fusion.fusion_utils import quadratic_loss
from diffusers_scorefusion.fusion.smoothed_qp import solve_smoothed_simplex_qp, tangent_curvature
from diffusers_scorefusion.testing.unet_parts import get_dummy_scheduler


def random_bins(num_bins: int, k: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    factors = torch.randn(num_bins, k, k + 2, generator=generator, dtype=torch.float64)
    return factors @ factors.transpose(1, 2) / (k + 2), 0.5 * torch.randn(num_bins, k, generator=generator,
                                                                           dtype=torch.float64)  # fmt: skip


@pytest.mark.parametrize("smoothness", [0.0, 0.05, 1.0, 30.0])
def test_joint_qp_is_the_exact_optimum(smoothness):
    gram, linear = random_bins(4, 3, seed=int(smoothness * 10))
    weights = solve_smoothed_simplex_qp(gram, linear, smoothness)
    assert (weights >= 0).all() and torch.allclose(weights.sum(1), torch.ones(4, dtype=torch.float64), atol=1e-12)

    def objective(x):
        x = x.reshape(4, 3)
        data = sum(x[b] @ gram[b].numpy() @ x[b] - 2 * linear[b].numpy() @ x[b] for b in range(4))
        return float(data + smoothness * ((x[1:] - x[:-1]) ** 2).sum())

    constraints = [{"type": "eq", "fun": lambda x, b=b: x.reshape(4, 3)[b].sum() - 1} for b in range(4)]
    reference = minimize(objective, np.full(12, 1 / 3), bounds=[(0, 1)] * 12, constraints=constraints, method="SLSQP",
                         options=dict(ftol=1e-15, maxiter=1000))  # fmt: skip
    assert objective(weights.flatten().numpy()) <= reference.fun + 1e-12
    np.testing.assert_allclose(weights.flatten().numpy(), reference.x, atol=1e-6)


def test_joint_qp_limits_and_bad_input():
    gram, linear = random_bins(5, 3, seed=3)
    independent = torch.stack([solve_simplex_qp(gram[b], linear[b]) for b in range(5)])
    assert torch.equal(solve_smoothed_simplex_qp(gram, linear, 0.0), independent)
    tied = solve_smoothed_simplex_qp(gram, linear, 1e7)  # every bin the single weight vector of the pooled loss
    torch.testing.assert_close(tied, solve_simplex_qp(gram.sum(0), linear.sum(0)).expand(5, 3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="smoothness must be a finite number >= 0, got -1"):
        solve_smoothed_simplex_qp(gram, linear, -1)
    with pytest.raises(ValueError, match=r"gram must be \(nb, k, k\) and linear \(nb, k\), got \(5, 3, 3\) and \(3,\)"):
        solve_smoothed_simplex_qp(gram, linear[0], 1.0)
    # the curvature along the simplex: for G = I it is 1; a constant shift of every entry does not change it
    assert tangent_curvature(torch.eye(3) + 7.0) == pytest.approx(1.0)


def test_cross_validation_curve_matches_a_direct_k_fold():
    """The CV loss of the one-bin candidate, recomputed by hand: fit on the other folds, score the held-out samples."""
    num_samples, fine, k = 11, 4, 3
    generator = torch.Generator().manual_seed(5)
    factors = torch.randn(num_samples, fine, k, 6, generator=generator, dtype=torch.float64)
    target = torch.randn(num_samples, fine, 6, generator=generator, dtype=torch.float64)
    sums = dict(gram=factors @ factors.transpose(-1, -2), linear=torch.einsum("nfkd,nfd->nfk", factors, target),
                constant=(target**2).sum(-1), count=torch.full((num_samples, fine), 6.0).double())  # fmt: skip
    coarse, edges, record = select_timestep_bins(sums, torch.linspace(0, 1000, fine + 1), seed=17)
    folds = _fold_of_each_sample(num_samples, 5, 17)
    assert sorted(torch.bincount(folds).tolist()) == [2, 2, 2, 2, 3]
    one = coarsen(sums, 1)
    held_out = 0.0
    for fold in range(5):
        train = folds != fold
        weights = solve_simplex_qp(one["gram"][train].sum((0, 1)), one["linear"][train].sum((0, 1)))
        held_out += sum(float(quadratic_loss(weights, one["gram"][n, 0], one["linear"][n, 0], one["constant"][n, 0]))
                        for n in (~train).nonzero().flatten().tolist())  # fmt: skip
    curve = record["curve"]
    assert curve[0]["num_timestep_bins"] == 1 and curve[0]["cv_loss"] == pytest.approx(held_out / (11 * 4 * 6), 1e-12)
    assert len(curve) == 1 + 2 * len(RELATIVE_SMOOTHNESS)  # 1 bin; 2 and 4 bins with every tau
    chosen = next(c for c in curve if (c["num_timestep_bins"], c["relative_smoothness"]) == (
        record["num_timestep_bins"], record["relative_smoothness"]))  # fmt: skip
    best = min(c["cv_loss"] for c in curve)
    assert chosen["cv_loss"] - best <= chosen["standard_error_vs_minimum"]  # the one-standard-error rule
    assert edges.tolist() == torch.linspace(0, 1000, fine + 1)[:: fine // record["num_timestep_bins"]].tolist()
    assert coarse["count"].shape == (num_samples, record["num_timestep_bins"])
    _, _, minimum = select_timestep_bins(sums, torch.linspace(0, 1000, fine + 1), seed=17, rule="minimum")
    best = min(curve, key=lambda c: c["cv_loss"])
    assert (minimum["num_timestep_bins"], minimum["relative_smoothness"]) == (
        best["num_timestep_bins"], best["relative_smoothness"]) and minimum["curve"] == curve  # fmt: skip
    with pytest.raises(ValueError, match="rule must be one of"):
        select_timestep_bins(sums, torch.linspace(0, 1000, fine + 1), seed=17, rule="best")


def auto_fit(fused, scheduler, latents, **options):
    options = dict(dict(num_noise_draws=16, batch_size=64, num_bootstrap=20, progress_bar=False,
                        generator=torch.Generator().manual_seed(0)), **options)  # fmt: skip
    return fit_weights(fused, scheduler, latents, **options)


@pytest.fixture(scope="module")
def noise_dependent():
    scheduler = get_dummy_scheduler()
    means, stds, std = noise_dependent_problem(scheduler)
    latents = target_samples(means, means[0], std, 128)  # the target: member 0's mean, member 1's spread
    fused = members(means, stds, scheduler)
    return scheduler, means, stds, std, latents, fused, auto_fit(fused, scheduler, latents, num_timestep_bins="auto")


def test_auto_picks_bins_and_recovers_the_per_bin_optimum(noise_dependent):
    scheduler, means, stds, std, latents, fused, result = noise_dependent
    selection = result.timestep_bin_selection
    num_bins = selection["num_timestep_bins"]
    assert num_bins > 1 and result.weights.shape == (num_bins, 2)
    assert result.provenance["timestep_bin_selection"] == selection
    assert result.provenance["num_timestep_bins"] == num_bins
    optimum = per_bin_optimum(means, stds, means[0], std, scheduler.alphas_cumprod, result.timestep_bin_edges)
    assert (result.weights - optimum).abs().max() < 0.03, (result.weights, optimum)
    assert optimum[0, 0] < 0.3 and optimum[-1, 0] > 0.95  # the best weights really change with the noise level
    # the stored table is the fusion's ordinary bin format: weights (num_bins, k) and timestep_bin_edges
    assert torch.equal(fused.fusion_weights, result.weights)
    assert fused.config.timestep_bin_edges == result.timestep_bin_edges
    assert len(result.timestep_bin_edges) == num_bins + 1 and result.timestep_bin_edges[-1] == 1000
    # the loss is the data term at the weights (no penalty), and beats the single weight vector's
    expected = sum(quadratic_loss(result.weights[b], result.gram[b], result.linear[b], result.constant[b])
                   for b in range(num_bins))  # fmt: skip
    assert result.standard_errors.shape == (num_bins, 2) and math.isfinite(expected)
    single = [c for c in selection["curve"] if c["num_timestep_bins"] == 1][0]
    assert min(c["cv_loss"] for c in selection["curve"]) < single["cv_loss"] - 3 * single["standard_error_vs_minimum"]


def test_auto_uses_the_same_forwards_and_sums_as_a_fixed_fit(noise_dependent):
    scheduler, means, stds, std, latents, _, result = noise_dependent
    fused = members(means, stds, scheduler)
    single = auto_fit(fused, scheduler, latents, num_timestep_bins=1)
    assert result.num_forward_passes == single.num_forward_passes == 2 * 128 * 16 // 64
    assert sum(member.num_calls for member in fused.unets) == single.num_forward_passes
    again = members(means, stds, scheduler)
    auto = auto_fit(again, scheduler, latents, num_timestep_bins="auto")
    assert sum(member.num_calls for member in again.unets) == single.num_forward_passes  # no extra member forwards
    # reproducible: the same generator gives the same choice, curve and weights
    assert auto.timestep_bin_selection == result.timestep_bin_selection and torch.equal(auto.weights, result.weights)
    # the chosen bins' sums are those of a fit with that many bins from the same noise
    num_bins = result.timestep_bin_selection["num_timestep_bins"]
    fixed = auto_fit(members(means, stds, scheduler), scheduler, latents, num_timestep_bins=num_bins)
    assert fixed.timestep_bin_edges == result.timestep_bin_edges
    for name in ("gram", "linear", "constant"):
        torch.testing.assert_close(getattr(fixed, name), getattr(result, name), rtol=1e-12, atol=1e-14)
    if result.timestep_bin_selection["relative_smoothness"] == 0:
        torch.testing.assert_close(fixed.weights, result.weights, rtol=0, atol=1e-12)


def test_auto_picks_one_bin_when_the_best_weights_do_not_depend_on_noise():
    scheduler = get_dummy_scheduler()
    means, stds, std = noise_dependent_problem(scheduler, common=True)
    target_mean = 0.4 * means[0] + 0.6 * means[1]  # the barycenter with weights (0.4, 0.6) at every noise level
    fused = members(means, stds, scheduler)
    result = auto_fit(fused, scheduler, target_samples(means, target_mean, std, 64), num_timestep_bins="auto")
    assert result.timestep_bin_selection["num_timestep_bins"] == 1 and result.timestep_bin_edges is None
    assert result.weights.shape == (2,) and fused.config.timestep_bin_edges is None
    torch.testing.assert_close(result.weights, torch.tensor([0.4, 0.6], dtype=torch.float64), atol=0.01, rtol=0)


def test_auto_fits_flow_matching_members():
    from _gaussian_flow_members import SHAPE as FLOW_SHAPE
    from _gaussian_flow_members import GaussianVelocityTransformer
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_scorefusion import FusedTransformer

    generator = torch.Generator().manual_seed(0)
    mu, shift = torch.randn(FLOW_SHAPE, generator=generator), torch.randn(FLOW_SHAPE, generator=generator)
    fused = FusedTransformer([GaussianVelocityTransformer(mu, 0.3), GaussianVelocityTransformer(mu + shift, 1.0)])
    latents = mu + torch.randn((48, *FLOW_SHAPE), generator=generator)  # member 0's mean, member 1's spread
    result = auto_fit(fused, FlowMatchEulerDiscreteScheduler(), latents, num_timestep_bins="auto")
    selection = result.timestep_bin_selection
    assert selection["num_timestep_bins"] > 1 and result.provenance["objective"] == "flow_matching"
    assert result.num_forward_passes == sum(member.num_calls for member in fused.transformers) == 2 * 48 * 16 // 64
    assert result.timestep_bin_edges[0] == 0 and result.timestep_bin_edges[-1] == 1000
    assert result.weights[0, 0] < result.weights[-1, 0]  # the right mean matters at high noise: bin 0 is low noise


def test_auto_bad_input():
    scheduler = get_dummy_scheduler()
    means, stds, std = noise_dependent_problem(scheduler)
    fused = members(means, stds, scheduler)
    latents = target_samples(means, means[0], std, 4)
    with pytest.raises(ValueError, match="num_timestep_bins must be an int >= 1 or 'auto', got 'Auto'"):
        auto_fit(fused, scheduler, latents, num_timestep_bins="Auto")
    with pytest.raises(ValueError, match="num_timestep_bins='auto' needs method='exact', got method='sgd'"):
        auto_fit(fused, scheduler, latents, num_timestep_bins="auto", method="sgd")
    with pytest.raises(ValueError, match="needs at least 2, got 1"):
        auto_fit(fused, scheduler, latents[:1], num_timestep_bins="auto")
    assert sum(member.num_calls for member in fused.unets) == 0 and fused.config.weights_provenance is None
    assert latents.shape[1:] == SHAPE
