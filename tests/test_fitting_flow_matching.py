"""Flow matching end to end with exact Gaussian velocity members: sampling the fused velocity through the stock
scheduler gives the barycenter, and `fit_weights` on barycenter samples recovers its weights."""

import pytest
import torch
from _gaussian_flow_members import STD, barycenter_samples, gaussian_flow_fusion, member_means
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffusers_scorefusion import FusedTransformer, fit_weights

TRUE_WEIGHTS = [0.2, 0.5, 0.3]


@pytest.fixture(scope="module")
def problem():
    means = member_means(3)
    return means, barycenter_samples(means, TRUE_WEIGHTS, 64)


def fit(fused, latents, scheduler=None, **options):
    options.setdefault("generator", torch.Generator().manual_seed(0))
    options.setdefault("progress_bar", False)
    return fit_weights(fused, scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0), latents, **options)


def euler_reference(scheduler, std):
    """The Euler sampler's exact output law for Gaussian data N(mu, std^2 I) started from N(0, I).

    The exact velocity is v = A(t) (x - (1 - t) mu) - mu with A = (t - (1 - t) std^2) / ((1 - t)^2 std^2 + t^2), so each
    Euler step x + dt v is affine: the sampler returns N(c mu, g^2 I). Returns `(c, g)` (both -> 1 and std as the
    number of steps grows; at 30 steps they are a few percent off: the discretisation error, not the fusion's).
    """
    gain, offset = 1.0, 0.0  # x = gain * x_T + offset * mu
    sigmas = scheduler.sigmas.double().tolist()
    for t, t_next in zip(sigmas[:-1], sigmas[1:]):
        a = (t - (1 - t) * std**2) / ((1 - t) ** 2 * std**2 + t**2)
        dt = t_next - t
        gain, offset = gain * (1 + dt * a), offset * (1 + dt * a) + dt * (-a * (1 - t) - 1)
    return offset, abs(gain)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sampling_the_fused_velocity_through_the_stock_scheduler_gives_the_barycenter(shift):
    """Members: exact velocities of N(mu_i, s^2 I); the Euler flow of the fused velocity from N(0, I) must end at the
    Euler sampler's law for the barycenter N(sum_i lambda_i mu_i, s^2 I), within Monte Carlo error."""
    means = member_means(3)
    fused = gaussian_flow_fusion(means, weights=TRUE_WEIGHTS, shift=shift)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(30)
    num_samples = 4000
    sample = randn_tensor((num_samples, *means.shape[1:]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in scheduler.timesteps:
            velocity = fused(hidden_states=sample, timestep=t.expand(num_samples), return_dict=False)[0]
            sample = scheduler.step(velocity, t, sample, return_dict=False)[0]
    center = torch.einsum("k,kchw->chw", torch.tensor(TRUE_WEIGHTS), means)
    mean_gain, std = euler_reference(scheduler, STD)
    assert abs(mean_gain - 1) < 0.01 and abs(std - STD) < 0.05  # the sampler is close to N(center, STD^2)
    # per-coordinate means: Monte Carlo std ~ STD / sqrt(N) = 0.008; the max over 256 coordinates ~ 3.5 of them
    assert (sample.mean(0) - mean_gain * center).abs().max() < 0.04
    assert abs(sample.std(0).mean().item() - std) < 0.003  # mean of 256 std estimates, each +- STD / sqrt(2N)
    assert (means[0] - center).abs().max() > 1.0  # a member alone is far off: the barycenter is what was sampled


@pytest.mark.parametrize("density", ["uniform", "logit_normal"])
def test_fit_recovers_the_barycenter_weights(problem, density):
    means, latents = problem
    fused = gaussian_flow_fusion(means)
    result = fit(fused, latents, timestep_density=density)
    error = (result.weights - torch.tensor(TRUE_WEIGHTS, dtype=torch.float64)).abs()
    assert error.max() < 0.02, result.weights
    assert (result.standard_errors > 0).all() and (error < 5 * result.standard_errors + 2e-3).all()
    assert torch.equal(fused.fusion_weights, result.weights)
    assert (result.per_model_loss > result.loss).all()
    provenance = result.provenance
    assert provenance == fused.config.weights_provenance
    assert provenance["objective"] == "flow_matching" and provenance["timestep_density"] == density
    assert provenance["shift"] == 3.0 and provenance["timestep_scale"] == 1000.0
    assert provenance["timestep_range"] == [0.0, 1000.0] and provenance["weighting"] == "uniform"
    assert sum(member.num_calls for member in fused.transformers) == result.num_forward_passes == 3 * 64 * 8 // 16


def test_timestep_scale_bins_and_small_t_are_in_the_members_units(problem):
    """Flux-style members take sigma in [0, 1] (timestep_scale=1): bins are in those units and both bins recover the
    weights (for Gaussians with one std the noised barycenter is the barycenter of the noised members)."""
    means, latents = problem
    fused = gaussian_flow_fusion(means, timestep_scale=1.0)
    result = fit(fused, latents, timestep_scale=1.0, num_timestep_bins=2, num_bootstrap=0)
    assert result.timestep_bin_edges == [0.0, 0.5, 1.0] and fused.config.timestep_bin_edges == [0.0, 0.5, 1.0]
    assert (result.weights - torch.tensor([TRUE_WEIGHTS] * 2, dtype=torch.float64)).abs().max() < 0.03
    small = fit(gaussian_flow_fusion(means, timestep_scale=1.0), latents, timestep_scale=1.0,
                timestep_range="small_t", num_bootstrap=0)  # fmt: skip
    assert small.provenance["timestep_range"] == [0.0, 0.1]
    assert (small.weights - torch.tensor(TRUE_WEIGHTS, dtype=torch.float64)).abs().max() < 0.02
    # the default scale (1000) on members that take sigma: timesteps are 1000x off and the fit is wrong
    wrong = fit(gaussian_flow_fusion(means, timestep_scale=1.0), latents, num_bootstrap=0)
    assert (wrong.weights - torch.tensor(TRUE_WEIGHTS, dtype=torch.float64)).abs().max() > 0.05


def test_sgd_reference_and_shared_inputs(problem):
    means, latents = problem
    exact = fit(gaussian_flow_fusion(means), latents[:16], num_noise_draws=4, num_bootstrap=0)
    sgd = fit(gaussian_flow_fusion(means), latents[:16], num_noise_draws=4, method="sgd", num_epochs=40)
    assert (sgd.weights - exact.weights).abs().max() < 0.02
    fused = gaussian_flow_fusion(means)
    pooled = torch.zeros(16, 3)
    fit(fused, latents[:16], num_noise_draws=2, batch_size=8, num_bootstrap=0,
        shared_kwargs={"pooled_projections": pooled})  # fmt: skip
    assert set(fused.transformers[0].pooled_shapes) == {(16, 3)}  # passed whole although its first dim is N
    fused = gaussian_flow_fusion(means)
    fit(fused, latents[:16], num_noise_draws=2, batch_size=8, num_bootstrap=0,
        transformer_kwargs={"pooled_projections": pooled})  # fmt: skip
    assert set(fused.transformers[0].pooled_shapes) == {(8, 3)}  # indexed per batch


@pytest.mark.parametrize(
    "options, scheduler, error, match",
    [
        ({}, DDIMScheduler(), TypeError, "needs the members' flow-matching training scheduler.*DDIMScheduler"),
        ({}, FlowMatchEulerDiscreteScheduler(shift=1.0), ValueError, "training shift is 1.0 but the members were "
                                                                     "trained with shift 3.0"),
        ({}, FlowMatchEulerDiscreteScheduler(shift=3.0, num_train_timesteps=500), ValueError,
         "num_train_timesteps=500 but the members were trained with 1000"),
        (dict(weighting="snr"), None, ValueError, "flow-matching fits weight every timestep equally"),
        (dict(timestep_density="mode"), None, ValueError, "timestep_density must be one of"),
        (dict(timestep_scale=0), None, ValueError, "timestep_scale must be a positive number"),
        (dict(timestep_range=(0, 1500)), None, ValueError, "0 <= low < high <= 1000"),
        (dict(timestep_range=(0,)), None, TypeError, "two numbers"),
        (dict(unet_kwargs={}), None, ValueError, "unet_kwargs is for a FusedUNet; pass the FusedTransformer's inputs"),
        (dict(transformer_kwargs={"a": 1}, shared_kwargs={"a": 2}), None, ValueError, "given both"),
    ],
)  # fmt: skip
def test_bad_fits_are_refused_and_change_nothing(problem, options, scheduler, error, match):
    means, latents = problem
    fused = gaussian_flow_fusion(means, weights=[0.6, 0.2, 0.2])
    with pytest.raises(error, match=match):
        fit(fused, latents, scheduler=scheduler, **options)
    assert fused.fusion_weights.tolist() == [0.6, 0.2, 0.2] and fused.config.weights_provenance is None
    assert sum(member.num_calls for member in fused.transformers) == 0


def test_bad_latents_are_refused(problem):
    means, latents = problem
    fused = gaussian_flow_fusion(means)
    with pytest.raises(ValueError, match="latents have 15 channels but the members take in_channels=16"):
        fit(fused, latents[:, :15])
    with pytest.raises(ValueError, match="packed \\(N, L, C\\) latents have 4 channels"):
        fit(fused, latents.flatten(2).transpose(1, 2)[..., :4])
    with pytest.raises(ValueError, match="latents are torch.float64 but the members are torch.float32"):
        fit(fused, latents.double())
    with pytest.raises(ValueError, match="timestep_density and timestep_scale apply to flow-matching"):
        from _gaussian_members import gaussian_fusion

        fit_weights(gaussian_fusion(member_means(2)), DDIMScheduler(), latents, timestep_density="uniform")


def test_members_without_a_recorded_schedule_are_fitted_with_the_given_scheduler(problem):
    means, latents = problem
    members = gaussian_flow_fusion(means).transformers
    fused = FusedTransformer(list(members))  # no member_schedulers: nothing to compare the scheduler with
    result = fit(fused, latents, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), num_bootstrap=0)
    assert result.provenance["shift"] == 1.0
    assert (result.weights - torch.tensor(TRUE_WEIGHTS, dtype=torch.float64)).abs().max() < 0.02
