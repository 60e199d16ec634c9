import itertools
import math

import numpy as np
import PIL.Image
import pytest
import torch
from _gaussian_members import STD, barycenter_samples, gaussian_fusion, member_means
from diffusers import DDPMScheduler

from diffusers_scorefusion import FusedUNet, ScoreFusionPipeline, fit_weights, solve_simplex_qp
from diffusers_scorefusion.fitting import encode_for_fitting
from diffusers_scorefusion.fitting.fitting_utils import SMALL_T_MAX_SIGMA, resolve_timestep_range
from diffusers_scorefusion.fusion.fusion_utils import denoising_target, quadratic_loss
from diffusers_scorefusion.testing.unet_parts import get_dummy_components, get_dummy_scheduler

TRUE_WEIGHTS = [0.2, 0.5, 0.3]


@pytest.fixture(scope="module")
def problem():
    scheduler = get_dummy_scheduler()
    means = member_means(3)
    return scheduler, means, barycenter_samples(means, TRUE_WEIGHTS, 64)


def fit(fused, scheduler, latents, **options):
    options.setdefault("generator", torch.Generator().manual_seed(0))
    options.setdefault("progress_bar", False)
    return fit_weights(fused, scheduler, latents, **options)


def test_recovers_barycenter_weights_and_sets_them(problem):
    scheduler, means, latents = problem
    fused = gaussian_fusion(means, scheduler)
    result = fit(fused, scheduler, latents)
    error = (result.weights - torch.tensor(TRUE_WEIGHTS, dtype=torch.float64)).abs()
    assert error.max() < 0.01, result.weights
    assert (error < 5 * result.standard_errors + 1e-3).all(), (error, result.standard_errors)
    assert (result.standard_errors > 0).all() and result.weights.sum().item() == pytest.approx(1, abs=1e-12)
    assert torch.equal(fused.fusion_weights, result.weights)
    assert fused.config.weights_provenance == result.provenance
    assert result.num_forward_passes == 3 * math.ceil(64 * 8 / 16)
    assert sum(member.num_calls for member in fused.unets) == result.num_forward_passes
    # the loss is the quadratic at the weights, and beats every member alone
    expected = quadratic_loss(result.weights, result.gram, result.linear, result.constant).item()
    assert result.loss == pytest.approx(expected, rel=1e-12)
    assert (result.per_model_loss > result.loss).all()
    provenance = result.provenance
    assert provenance["method"] == "exact" and provenance["num_samples"] == 64 and provenance["seed"] == 0
    assert provenance["timestep_range"] == [0, 999] and provenance["weighting"] == "uniform"
    assert provenance["data_fingerprint"].startswith("sha256:")


def test_members_outside_the_optimum_get_exactly_zero_weight(problem):
    scheduler, means, _ = problem
    # target mean pushed away from member 2: the optimum lies on the face {0, 1}
    center = 0.5 * means[0] + 0.5 * means[1] - 0.5 * (means[2] - 0.5 * (means[0] + means[1]))
    latents = center + STD * torch.randn((32, *means.shape[1:]), generator=torch.Generator().manual_seed(3))
    result = fit(gaussian_fusion(means, scheduler), scheduler, latents, num_noise_draws=4)
    assert result.weights[2].item() == 0.0
    assert result.weights[:2].min() > 0.2


def _brute_force_qp(gram, linear):
    """Minimum over every face of the simplex of the face's KKT solution (when feasible)."""
    k, best = linear.numel(), (float("inf"), None)
    for size in range(1, k + 1):
        for face in itertools.combinations(range(k), size):
            idx = list(face)
            kkt = torch.zeros(size + 1, size + 1, dtype=torch.float64)
            kkt[:size, :size], kkt[:size, size], kkt[size, :size] = gram[idx][:, idx], 1, 1
            rhs = torch.cat([linear[idx], torch.ones(1, dtype=torch.float64)])
            solution = torch.linalg.solve(kkt, rhs)[:size]
            if (solution < -1e-12).any():
                continue
            weights = torch.zeros(k, dtype=torch.float64)
            weights[idx] = solution
            value = quadratic_loss(weights, gram, linear, torch.tensor(0.0, dtype=torch.float64)).item()
            best = min(best, (value, weights), key=lambda pair: pair[0])
    return best


def test_exact_solver_matches_brute_force_including_faces():
    generator = torch.Generator().manual_seed(0)
    on_a_face = 0
    for trial in range(60):
        k = 2 + trial % 4
        factor = torch.randn(k, k + 2, generator=generator, dtype=torch.float64)
        gram = factor @ factor.T
        unconstrained = torch.randn(k, generator=generator, dtype=torch.float64)
        unconstrained -= (unconstrained.sum() - 1) / k  # sums to 1, often outside the simplex
        linear = gram @ unconstrained
        weights = solve_simplex_qp(gram, linear)
        value, brute = _brute_force_qp(gram, linear)
        assert quadratic_loss(weights, gram, linear, torch.tensor(0.0, dtype=torch.float64)).item() == pytest.approx(
            value, abs=1e-10
        )
        torch.testing.assert_close(weights, brute, atol=1e-8, rtol=0)
        assert weights.min() >= 0 and weights.sum().item() == pytest.approx(1, abs=1e-12)
        on_a_face += int((weights == 0).any())
    assert 10 <= on_a_face < 60  # both interior and face solutions were exercised


def test_sgd_reaches_the_exact_weights_and_loss(problem):
    scheduler, means, latents = problem
    options = dict(num_noise_draws=4, batch_size=64)
    exact = fit(gaussian_fusion(means, scheduler), scheduler, latents[:16], **options)
    epochs = []
    sgd = fit(
        gaussian_fusion(means, scheduler),
        scheduler,
        latents[:16],
        method="sgd",
        num_epochs=400,
        callback=lambda epoch, weights, forwards: epochs.append((epoch, forwards)),
        **options,
    )
    torch.testing.assert_close(sgd.gram, exact.gram, rtol=1e-12, atol=0)  # the same data and noise
    torch.testing.assert_close(sgd.weights, exact.weights, atol=2e-3, rtol=0)
    assert sgd.loss == pytest.approx(exact.loss, rel=1e-4) and sgd.loss >= exact.loss - 1e-12
    assert sgd.standard_errors is None and sgd.provenance["method"] == "sgd"
    assert exact.num_forward_passes == 3 and sgd.num_forward_passes == 400 * 3
    assert epochs[-1] == (399, 1200)


def test_noise_does_not_depend_on_batching(problem):
    scheduler, means, latents = problem
    first = fit(gaussian_fusion(means, scheduler), scheduler, latents[:8], num_noise_draws=3, batch_size=5)
    second = fit(gaussian_fusion(means, scheduler), scheduler, latents[:8], num_noise_draws=3, batch_size=24)
    torch.testing.assert_close(first.gram, second.gram, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(first.weights, second.weights, rtol=0, atol=1e-10)
    assert first.provenance["data_fingerprint"] == second.provenance["data_fingerprint"]
    other = fit(
        gaussian_fusion(means, scheduler),
        scheduler,
        latents[:8],
        num_noise_draws=3,
        generator=torch.Generator().manual_seed(1),
    )
    assert not torch.equal(first.gram, other.gram)


def test_timestep_bins_give_a_table_fused_unet_uses(problem):
    scheduler, means, latents = problem
    fused = gaussian_fusion(means, scheduler)
    result = fit(fused, scheduler, latents, num_timestep_bins=4, num_bootstrap=20)
    assert result.weights.shape == (4, 3) and result.standard_errors.shape == (4, 3)
    assert result.timestep_bin_edges == [0.0, 250.0, 500.0, 750.0, 1000.0]
    assert (result.weights - torch.tensor(TRUE_WEIGHTS, dtype=torch.float64)).abs().max() < 0.02
    assert fused.config.timestep_bin_edges == result.timestep_bin_edges
    torch.testing.assert_close(fused.fusion_weights, result.weights)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_prediction_types_recover_the_weights(problem, prediction_type):
    scheduler, means, latents = problem
    members = gaussian_fusion(means, scheduler).unets
    fused = FusedUNet(list(members), prediction_type=prediction_type, member_schedulers=[scheduler] * 3)
    fused_scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)
    timestep_range = "full" if prediction_type == "v_prediction" else (0, 900)  # x0 from eps is ill-posed at t -> T
    result = fit(fused, fused_scheduler, latents, timestep_range=timestep_range)
    assert (result.weights - torch.tensor(TRUE_WEIGHTS, dtype=torch.float64)).abs().max() < 0.01


def test_velocity_target_is_diffusers_get_velocity():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=generator), torch.randn(3, 4, 2, 2, generator=generator)
    timesteps = torch.tensor([0, 500, 999])
    a = scheduler.alphas_cumprod[timesteps].double()
    target = denoising_target(x0, noise, a.sqrt(), (1 - a).sqrt(), "v_prediction")
    torch.testing.assert_close(target.float(), scheduler.get_velocity(x0, noise, timesteps), rtol=1e-5, atol=1e-6)


def test_conditioning_is_indexed_with_the_samples(problem):
    scheduler, means, _ = problem
    generator = torch.Generator().manual_seed(5)
    num_samples = 48
    prompt_embeds = 3 * torch.randn(num_samples, 1, 1, generator=generator) + torch.zeros(num_samples, 7, 32)
    text_embeds = torch.randn(num_samples, 1, generator=generator) + torch.zeros(num_samples, 6)
    shift = (prompt_embeds.mean(dim=(1, 2)) + text_embeds.mean(dim=1)).reshape(-1, 1, 1, 1)
    cond_scales = [1.0, -1.0, 2.0]  # members react differently to the conditioning: a mismatch moves the fit
    barycenter_scale = sum(w * s for w, s in zip(TRUE_WEIGHTS, cond_scales))
    latents = barycenter_samples(means, TRUE_WEIGHTS, num_samples) + barycenter_scale * shift
    unet_kwargs = {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": torch.zeros(1, 6)}}
    result = fit(
        gaussian_fusion(means, scheduler, cond_scales),
        scheduler,
        latents,
        encoder_hidden_states=prompt_embeds,
        unet_kwargs=unet_kwargs,
        batch_size=7,
    )
    assert (result.weights - torch.tensor(TRUE_WEIGHTS, dtype=torch.float64)).abs().max() < 0.01


def test_small_t_range_and_weightings(problem):
    scheduler, means, latents = problem
    t_min, t_max = resolve_timestep_range("small_t", scheduler.alphas_cumprod)
    sigma = (1 - scheduler.alphas_cumprod.double()).sqrt()
    assert t_min == 0 and sigma[t_max] <= SMALL_T_MAX_SIGMA < sigma[t_max + 1]
    for weighting in ("snr", "min_snr"):
        result = fit(
            gaussian_fusion(means, scheduler),
            scheduler,
            latents,
            timestep_range="small_t",
            weighting=weighting,
            num_bootstrap=0,
        )
        assert result.provenance["timestep_range"] == [t_min, t_max] and result.standard_errors is None
        assert (result.weights - torch.tensor(TRUE_WEIGHTS, dtype=torch.float64)).abs().max() < 0.05


class NaNMember(torch.nn.Module):
    def __init__(self, member):
        super().__init__()
        self.member, self.config = member, member.config

    def forward(self, sample, timestep, **kwargs):
        output = self.member(sample, timestep, **kwargs)[0].clone()
        output[0, 0, 0, 0] = float("nan")
        return (output,)


def test_bad_input_is_refused_with_clear_errors(problem):
    scheduler, means, latents = problem
    fused = gaussian_fusion(means, scheduler)
    before = fused.fusion_weights.clone()
    cases = [
        (dict(latents=latents[:0]), ValueError, "N >= 1"),
        (dict(latents=latents[:, :3]), ValueError, "3 channels"),
        (dict(latents=latents.double()), ValueError, "torch.float64"),
        (dict(latents=latents.clone().index_fill_(0, torch.tensor([2]), float("nan"))), ValueError, r"rows \[2\]"),
        (dict(latents=latents.numpy()), TypeError, "torch.Tensor"),
        (dict(encoder_hidden_states=torch.zeros(5, 7, 32)), ValueError, "one row per sample"),
        (dict(encoder_hidden_states=torch.full((64, 7, 32), float("inf"))), ValueError, "encoder_hidden_states"),
        (dict(method="adam"), ValueError, "'adam'"),
        (dict(num_noise_draws=0), ValueError, "num_noise_draws"),
        (dict(batch_size=2.5), TypeError, "batch_size"),
        (dict(timestep_range=(500, 100)), ValueError, "t_min <= t_max"),
        (dict(timestep_range="early"), ValueError, "'early'"),
        (dict(weighting="p2"), ValueError, "'p2'"),
        (dict(num_timestep_bins=11, timestep_range=(0, 9)), ValueError, "num_timestep_bins=11"),
        (dict(method="sgd", num_timestep_bins=2), ValueError, "one weight vector"),
        (dict(generator=0), TypeError, "generator"),
    ]
    for overrides, error, message in cases:
        arguments = {"latents": latents, **overrides}
        with pytest.raises(error, match=message):
            fit(fused, scheduler, arguments.pop("latents"), **arguments)
    with pytest.raises(ValueError, match="prediction_type"):
        fit(fused, DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction"), latents)
    scheduled = FusedUNet(list(fused.unets), member_schedulers=[scheduler] * 3)
    with pytest.raises(ValueError, match="noise schedule"):
        fit(scheduled, DDPMScheduler.from_config(scheduler.config, beta_end=0.02), latents)
    with pytest.raises(TypeError, match="FusedUNet"):
        fit(fused.unets[0], scheduler, latents)
    broken = FusedUNet([fused.unets[0], NaNMember(fused.unets[1]), fused.unets[2]])
    with pytest.raises(ValueError, match=r"members \[1\] returned NaN"):
        fit(broken, scheduler, latents)
    assert torch.equal(fused.fusion_weights, before) and fused.config.weights_provenance is None
    assert broken.config.weights_provenance is None


def test_pipeline_fits_from_images_and_prompts():
    pipe = ScoreFusionPipeline(**get_dummy_components(num_members=2))
    pipe.set_progress_bar_config(disable=True)
    pixels = np.random.default_rng(0).random((3, 32, 32, 3)).astype(np.float32)  # in [0, 1]
    images = [PIL.Image.fromarray((255 * image).round().astype(np.uint8)) for image in pixels]
    prompts = ["a red cat", "a blue dog", "a green bird"]
    result = pipe.fit_weights(
        images,
        prompts,
        num_noise_draws=2,
        num_bootstrap=10,
        generator=torch.Generator().manual_seed(0),
        progress_bar=False,
    )
    assert result.weights.shape == (2,) and result.weights.min() >= 0
    assert result.weights.sum().item() == pytest.approx(1, abs=1e-12)
    assert pipe.unet.config.weights_provenance["num_samples"] == 3
    torch.testing.assert_close(pipe.unet.fusion_weights, result.weights)
    # the same pixels as numpy arrays in [0, 1] give the same data
    quantized = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])
    again = pipe.fit_weights(
        quantized,
        prompts,
        num_noise_draws=2,
        num_bootstrap=0,
        set_weights=False,
        generator=torch.Generator().manual_seed(0),
        progress_bar=False,
    )
    assert again.provenance["data_fingerprint"] == result.provenance["data_fingerprint"]
    torch.testing.assert_close(again.weights, result.weights)
    as_tensors = [torch.from_numpy(image).permute(2, 0, 1) for image in quantized]  # (3, H, W) in [0, 1]
    from_tensors, embeds = encode_for_fitting(pipe, as_tensors, "one caption for all")
    from_images, _ = encode_for_fitting(pipe, images, prompts)
    torch.testing.assert_close(from_tensors, from_images)
    assert from_images.shape == (3, 4, 16, 16) and embeds.shape[0] == 3
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        pipe.fit_weights(images, prompts[:2])
    with pytest.raises(ValueError, match="same size"):
        pipe.fit_weights([images[0], images[1].resize((16, 16))], prompts[:2])
    with pytest.raises(ValueError, match="empty"):
        pipe.fit_weights([], [])
