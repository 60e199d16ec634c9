"""The Langevin corrector: its maths, known answers with Gaussian members, and the pipeline callback."""

import math

import pytest
import torch
from _gaussian_members import SHAPE, STD, GaussianNoisePredictor, member_means
from diffusers import EulerDiscreteScheduler

from diffusers_scorefusion import (
    FusedUNet,
    LangevinCorrector,
    ScoreFusionPipeline,
    ScoreFusionXLPipeline,
    langevin_correct,
)
from diffusers_scorefusion.experiments.training import generate
from diffusers_scorefusion.fusion.corrector_utils import (
    check_corrector_options,
    langevin_correct_with_score,
    langevin_step,
    langevin_step_size,
    score_from_noise_pred,
)
from diffusers_scorefusion.pipelines.corrector import SDXL_TENSOR_INPUTS
from diffusers_scorefusion.testing.unet_parts import (
    get_dummy_components,
    get_dummy_scheduler,
    get_dummy_xl_components,
)


def test_step_size_follows_the_target_signal_to_noise_ratio():
    score = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # per-sample norms 5 and 0: batch mean 2.5
    noise = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # norms 1 and 2: batch mean 1.5
    step = langevin_step_size(score, noise, snr=0.2, alpha=0.9)
    assert float(step) == pytest.approx(2 * 0.9 * (0.2 * 1.5 / 2.5) ** 2)
    sample = torch.zeros(2, 2)
    moved = langevin_step(sample, score, noise, step)
    torch.testing.assert_close(moved, step.float() * score + (2 * step).sqrt().float() * noise)
    assert float(langevin_step_size(torch.zeros(2, 2), noise, 0.2, 1.0)) == 0.0  # a zero score does not blow up
    torch.testing.assert_close(score_from_noise_pred(torch.ones(2, 3), torch.tensor([0.5, 2.0])),
                               torch.tensor([[-2.0] * 3, [-0.5] * 3]))  # fmt: skip


def test_corrector_options_are_checked():
    for steps, snr, error, match in ((-1, 0.16, ValueError, "num_corrector_steps"), (1.5, 0.16, TypeError, "an int"),
                                     (True, 0.16, TypeError, "an int"), (1, 0.0, ValueError, "snr"),
                                     (1, float("nan"), ValueError, "snr")):  # fmt: skip
        with pytest.raises(error, match=match):
            check_corrector_options(steps, snr)
    with pytest.raises(ValueError, match="alpha"):
        langevin_correct_with_score(lambda x: -x, torch.zeros(2, 1), 1, alpha=1.5)
    with pytest.raises(ValueError, match="sigma_t must be > 0"):
        score_from_noise_pred(torch.ones(1, 1), torch.tensor([0.0]))


def test_langevin_samples_a_gaussian_from_a_wrong_start():
    # score of N(2, 0.5^2): from N(1.8, 0.05^2), Langevin reaches its mean and (up to the O(snr^2) bias) its std
    start = 1.8 + 0.05 * torch.randn(4000, 1, generator=torch.Generator().manual_seed(3))
    moved = langevin_correct_with_score(lambda x: -(x - 2.0) / 0.25, start, 200, snr=0.16,
                                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert float(moved.mean()) == pytest.approx(2.0, abs=0.03)
    assert float(moved.std()) == pytest.approx(0.5, rel=0.04)


def _noised_barycenter(means, weights, std, alpha_t, sigma_t, count, seed):
    """Exact samples of the noised barycenter of N(mu_i, std^2 I) (common std: it is N(alpha mu_bar, ...))."""
    center = torch.einsum("k,kchw->chw", torch.tensor(weights, dtype=torch.float32), means)
    spread = math.sqrt(alpha_t**2 * std**2 + sigma_t**2)
    noise = torch.randn((count, *SHAPE), generator=torch.Generator().manual_seed(seed))
    return alpha_t * center + spread * noise, alpha_t * center, spread


def test_corrector_does_not_move_the_exact_barycenter_of_gaussian_members():
    scheduler = get_dummy_scheduler()
    means, weights = member_means(3), [0.2, 0.5, 0.3]
    fused = FusedUNet([GaussianNoisePredictor(m, STD, scheduler.alphas_cumprod) for m in means], weights=weights)
    for timestep in (20, 400, 900):
        a = float(scheduler.alphas_cumprod[timestep])
        sample, center, spread = _noised_barycenter(means, weights, STD, math.sqrt(a), math.sqrt(1 - a), 256, timestep)
        corrected = langevin_correct(fused, sample, timestep, scheduler, num_corrector_steps=20,
                                     generator=torch.Generator().manual_seed(1))  # fmt: skip
        assert not torch.equal(corrected, sample)  # it did run
        residual = corrected - center  # (256, 4, 8, 8): should still be N(0, spread^2) per entry
        assert float(residual.mean(0).abs().mean()) < 0.1 * spread  # per-pixel means stay (s.e. 0.0625 * spread)
        # unadjusted Langevin inflates the variance by ~ (1 - alpha snr^2)^-1: 1.3 % in std at snr = 0.16
        assert float(residual.std() / spread) == pytest.approx(1.0, abs=0.025)
        for member in fused.unets:
            assert member.num_calls == 20
            member.num_calls = 0


def _unequal_gaussians(scheduler):
    """Two members N(mu_i, s_i^2 I) with different s_i: the fused sampler does not sample their barycenter exactly."""
    means = torch.stack([torch.full(SHAPE, -1.0), torch.full(SHAPE, 1.0)])
    members = [GaussianNoisePredictor(means[0], 0.3, scheduler.alphas_cumprod),
               GaussianNoisePredictor(means[1], 1.0, scheduler.alphas_cumprod)]  # fmt: skip
    precision = 0.5 / 0.3**2 + 0.5 / 1.0**2  # barycenter N(m, v): 1/v = sum lambda_i / s_i^2
    mean = (0.5 * -1.0 / 0.3**2 + 0.5 * 1.0 / 1.0**2) / precision
    return FusedUNet(members, weights=[0.5, 0.5]), mean, math.sqrt(1 / precision)


def test_corrected_sampler_approaches_the_barycenter_the_plain_sampler_misses():
    scheduler = get_dummy_scheduler()
    fused, mean, std = _unequal_gaussians(scheduler)
    noise = torch.randn((64, *SHAPE), generator=torch.Generator().manual_seed(0))
    plain = generate(fused, scheduler, noise, num_inference_steps=20)
    corrected = generate(fused, scheduler, noise, num_inference_steps=20, num_corrector_steps=30,
                         generator=torch.Generator().manual_seed(1))  # fmt: skip
    plain_error = abs(float(plain.mean()) - mean) + abs(float(plain.std()) - std)
    corrected_error = abs(float(corrected.mean()) - mean) + abs(float(corrected.std()) - std)
    assert plain_error > 0.3  # the plain fused sampler is measurably off the barycenter (its mean by ~0.45) ...
    assert corrected_error < 0.06  # ... the corrected one is on it (within sampling and ULA error)
    # cost: 20 predictor calls plus 30 corrector calls after each of the first 19 steps, per member
    assert [member.num_calls for member in fused.unets] == [20 + (20 + 19 * 30)] * 2  # two generate() calls


def _gaussian_pipeline(weights=(0.3, 0.7)):
    scheduler = get_dummy_scheduler()
    means = member_means(2)
    components = get_dummy_components()
    components["unet"] = FusedUNet([GaussianNoisePredictor(m, STD, scheduler.alphas_cumprod, cond_scale=0.0)
                                    for m in means], weights=list(weights))  # fmt: skip
    components["scheduler"] = scheduler
    pipe = ScoreFusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    center = torch.einsum("k,kchw->chw", torch.tensor(weights, dtype=torch.float32), means)
    return pipe, center


def _latents(pipe, **kwargs):
    return pipe("a cat", num_inference_steps=20, num_images_per_prompt=64, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images  # fmt: skip


def test_pipeline_callback_keeps_gaussian_barycenter_and_counts_its_cost():
    pipe, center = _gaussian_pipeline()
    plain = _latents(pipe)
    assert torch.equal(_latents(pipe, callback_on_step_end=LangevinCorrector(num_corrector_steps=0)), plain)
    corrector = LangevinCorrector(num_corrector_steps=3, generator=torch.Generator().manual_seed(2))
    corrected = _latents(pipe, callback_on_step_end=corrector)
    assert not torch.equal(corrected, plain)
    assert corrector.num_model_evaluations == 3 * (20 - 1)  # no correction after the last step
    # the members share their std, so the exact answer N(center, STD^2) is the barycenter at every noise level: the
    # corrector keeps the latents on it (plain 20-step DDIM itself undershoots the std by ~9 % on this schedule)
    errors = {}
    for name, latents in (("plain", plain), ("corrected", corrected)):
        residual = latents - center  # (64, 4, 8, 8)
        pixel_mean_rms = float(residual.mean(0).pow(2).mean().sqrt()) / (STD / math.sqrt(64))  # ~1 when unbiased
        assert pixel_mean_rms < 1.6, name
        errors[name] = abs(float(residual.std() / STD) - 1)
    assert errors["corrected"] < 0.06 and errors["corrected"] < errors["plain"]
    assert corrector.config.num_corrector_steps == 3 and "generator" not in corrector.config


def test_pipeline_callback_refuses_unsupported_schedulers_and_missing_inputs():
    pipe, _ = _gaussian_pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="init_noise_sigma"):
        _latents(pipe, callback_on_step_end=LangevinCorrector(1))
    with pytest.raises(ValueError, match="tensor_inputs must include"):
        LangevinCorrector(1, tensor_inputs=["latents"])
    with pytest.raises(TypeError, match="generator"):
        LangevinCorrector(1, generator=0)
    xl = ScoreFusionXLPipeline(**get_dummy_xl_components())
    xl.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="add_text_embeds"):
        xl("a cat", num_inference_steps=2, output_type="latent", callback_on_step_end=LangevinCorrector(1))
    corrector = LangevinCorrector(1, tensor_inputs=SDXL_TENSOR_INPUTS)
    xl("a cat", num_inference_steps=2, output_type="latent", callback_on_step_end=corrector)
    assert corrector.num_model_evaluations == 1
