"""Feynman-Kac correctors: the SMC maths, the barycenter of exact Gaussian members, per-prompt resampling, cost."""

import math
from types import SimpleNamespace

import pytest
import torch
from _gaussian_members import GaussianNoisePredictor
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionPipeline,
)

from diffusers_scorefusion import (
    FusedTransformer,
    FusedUNet,
    ScoreFusionPipeline,
    ScoreFusionSD3Pipeline,
    ScoreFusionXLPipeline,
)
from diffusers_scorefusion.fusion.smc_utils import (
    effective_sample_size,
    fkc_log_weight_increment,
    fkc_step_factor,
    group_gather_indices,
    guidance_exponents,
    reweight_and_resample,
    systematic_resample,
)
from diffusers_scorefusion.pipelines.fkc import SDXL_TENSOR_INPUTS, FeynmanKacCorrector, check_fkc_scheduler
from diffusers_scorefusion.testing.transformer_parts import get_dummy_sd3_components, get_dummy_sd3_transformer
from diffusers_scorefusion.testing.unet_parts import get_dummy_components, get_dummy_scheduler, get_dummy_xl_components

# members N(-1, 0.3^2) and N(1, 1) per pixel at lambda = (0.5, 0.5): barycenter N(m, s^2) with 1/s^2 = sum lambda/s_i^2
PRECISION = 0.5 / 0.3**2 + 0.5
BARYCENTER_MEAN, BARYCENTER_STD = (0.5 * -1 / 0.3**2 + 0.5) / PRECISION, math.sqrt(1 / PRECISION)


def test_increment_is_the_two_expert_formula_and_guidance_exponents_sum_to_one():
    generator = torch.Generator().manual_seed(0)
    eps = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64)  # (k, B, ...)
    b, factor = 0.3, 0.7
    increment = fkc_log_weight_increment(eps, torch.tensor([1 - b, b]), factor)
    # Skreta et al. Prop. 3.1 in noise units: (factor / 2) b (b - 1) ||eps_1 - eps_2||^2
    expected = 0.5 * factor * b * (b - 1) * ((eps[0] - eps[1]) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(increment, expected)
    exponents = guidance_exponents(torch.tensor([0.2, 0.8]), 7.5)
    expected_exponents = torch.tensor([0.2 * -6.5, 0.8 * -6.5, 0.2 * 7.5, 0.8 * 7.5], dtype=torch.float64)
    torch.testing.assert_close(exponents, expected_exponents)
    assert float(exponents.sum()) == pytest.approx(1.0)
    # identical experts never change the weights, whatever the exponents
    same = eps[:1].expand(4, -1, -1, -1)
    torch.testing.assert_close(fkc_log_weight_increment(same, exponents, 1.0), torch.zeros(3, dtype=torch.float64),
                               rtol=0, atol=1e-12)  # fmt: skip
    assert fkc_step_factor(0.5, 1.0) == pytest.approx(1.0)  # (1 - 0.5 / 1) / (1 - 0.5)
    with pytest.raises(ValueError, match="sum to 1"):
        fkc_log_weight_increment(eps, torch.tensor([0.5, 0.6]), 1.0)
    with pytest.raises(ValueError, match="alpha_bar"):
        fkc_step_factor(0.6, 0.5)


def test_ess_and_systematic_resampling():
    log_weights = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.25] * 4], dtype=torch.float64))
    expected_ess = torch.tensor([1 / (0.25 + 0.0625 + 2 * 0.015625), 4.0], dtype=torch.float64)
    torch.testing.assert_close(effective_sample_size(log_weights), expected_ess)
    for seed in range(20):
        ancestors = systematic_resample(log_weights, torch.Generator().manual_seed(seed))
        counts = torch.bincount(ancestors[0], minlength=4)
        assert counts[0] == 2 and counts[1] == 1 and counts[2:].sum() == 1  # floor or ceil of N w_i copies
        assert torch.equal(ancestors[1], torch.arange(4))  # equal weights: every particle kept once
    assert group_gather_indices(torch.tensor([[1, 1], [0, 0]])).tolist() == [1, 1, 2, 2]  # never across groups
    new, ess, ancestors = reweight_and_resample(torch.zeros(2, 4, dtype=torch.float64), log_weights, 0.9)
    assert ancestors is not None and torch.equal(ancestors[1], torch.arange(4))  # group 1 kept (ESS = 4)
    assert torch.equal(new[0], torch.zeros(4, dtype=torch.float64))  # resampled: weights reset
    assert torch.equal(new[1], log_weights[1] - log_weights[1].mean())  # kept: centred increments added


def _gaussian_pipeline(scheduler_class=DDPMScheduler, cond_scale=0.0):
    schedule = get_dummy_scheduler()
    cumprod = schedule.alphas_cumprod
    members = [GaussianNoisePredictor(torch.full((1, 1, 1), -1.0), 0.3, cumprod, cond_scale),
               GaussianNoisePredictor(torch.full((1, 1, 1), 1.0), 1.0, cumprod, cond_scale)]  # fmt: skip
    components = get_dummy_components()
    components["unet"] = FusedUNet(members, weights=[0.5, 0.5])
    components["scheduler"] = scheduler_class.from_config(schedule.config)
    pipe = ScoreFusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, num, prompt="a cat", callback=None, steps=40, **kwargs):
    batch = num * (len(prompt) if isinstance(prompt, list) else 1)
    latents = torch.randn(batch, 1, 1, 1, generator=torch.Generator().manual_seed(5))
    return pipe(prompt, num_inference_steps=steps, num_images_per_prompt=num, output_type="latent", height=8, width=8,
                latents=latents, generator=torch.Generator().manual_seed(0), callback_on_step_end=callback,
                **kwargs).images[:, 0, 0, 0].double()  # fmt: skip


def test_fkc_samples_the_barycenter_of_gaussian_members_with_no_extra_forwards():
    pipe = _gaussian_pipeline()  # DDPM
    plain = _run(pipe, 512)
    plain_calls = [member.num_calls for member in pipe.unet.unets]
    fkc = FeynmanKacCorrector(512, generator=torch.Generator().manual_seed(1))
    with pipe.unet.capture_member_predictions():
        corrected = _run(pipe, 512, callback=fkc)  # guidance 7.5: experts (member, unconditional / conditional)
    assert pipe.unet.last_member_predictions is None  # dropped when the block ends
    assert [member.num_calls for member in pipe.unet.unets] == [2 * calls for calls in plain_calls]  # zero extra
    standard_error = BARYCENTER_STD / math.sqrt(512)
    assert abs(float(plain.mean()) - BARYCENTER_MEAN) > 10 * standard_error  # plain is off by ~0.3 ...
    assert abs(float(corrected.mean()) - BARYCENTER_MEAN) < 0.03 + 3 * standard_error  # ... FKC on it (40 steps)
    assert float(corrected.std()) == pytest.approx(BARYCENTER_STD, rel=0.1)
    assert len(fkc.ess_history) == 40 and fkc.resampling_steps[-1] == (39, [0])  # the final resampling
    assert fkc.log_weights.shape == (1, 512) and torch.equal(fkc.log_weights, torch.zeros(1, 512, dtype=torch.float64))


def test_sde_dpm_solver_history_is_resampled_with_the_particles():
    pipe = _gaussian_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="sde-dpmsolver++")
    fkc = FeynmanKacCorrector(256, ess_threshold=0.9, generator=torch.Generator().manual_seed(1))
    with pipe.unet.capture_member_predictions():
        corrected = _run(pipe, 256, callback=fkc)
    assert len(fkc.resampling_steps) > 1  # also mid-run: the solver's model_outputs history is gathered too
    assert float(corrected.mean()) == pytest.approx(BARYCENTER_MEAN, abs=0.05)
    assert float(corrected.std()) == pytest.approx(BARYCENTER_STD, rel=0.12)


def test_resampling_copies_every_per_sample_tensor_and_the_scheduler_history():
    batch = 4
    scheduler = SimpleNamespace(model_outputs=[None, torch.arange(4.0)[:, None]], last_sample=torch.arange(4.0),
                                timesteps=torch.arange(10))  # fmt: skip
    kwargs = dict(latents=torch.arange(4.0)[:, None], prompt_embeds=torch.arange(8.0)[:, None],
                  add_time_ids=torch.arange(8.0)[:, None], scale=torch.tensor(2.0))  # fmt: skip
    index = torch.tensor([1, 1, 3, 2])  # prompt 0 = particles 0, 1; prompt 1 = particles 2, 3
    FeynmanKacCorrector(2)._gather(SimpleNamespace(scheduler=scheduler), kwargs, index, batch)
    assert kwargs["latents"].flatten().tolist() == [1, 1, 3, 2]
    assert kwargs["prompt_embeds"].flatten().tolist() == [1, 1, 3, 2, 5, 5, 7, 6]  # both halves under guidance
    assert kwargs["add_time_ids"].flatten().tolist() == [1, 1, 3, 2, 5, 5, 7, 6] and float(kwargs["scale"]) == 2
    assert scheduler.model_outputs[0] is None and scheduler.model_outputs[1].flatten().tolist() == [1, 1, 3, 2]
    assert scheduler.last_sample.tolist() == [1, 1, 3, 2] and scheduler.timesteps.tolist() == list(range(10))


def test_particles_are_resampled_within_their_prompt_only():
    pipe = _gaussian_pipeline(cond_scale=40.0)  # the members' means move by 40 x the prompt embedding's mean
    prompt_embeds = torch.stack([torch.full((77, 32), -0.05), torch.full((77, 32), 0.05)])  # prompts 4 apart
    fkc = FeynmanKacCorrector(64, ess_threshold=1.0, generator=torch.Generator().manual_seed(1))  # resample often
    latents = torch.randn(128, 1, 1, 1, generator=torch.Generator().manual_seed(5))
    with pipe.unet.capture_member_predictions():
        images = pipe(prompt_embeds=prompt_embeds, num_inference_steps=40, num_images_per_prompt=64, height=8, width=8,
                      output_type="latent", latents=latents, guidance_scale=1.0, callback_on_step_end=fkc,
                      generator=torch.Generator().manual_seed(0)).images[:, 0, 0, 0].double()  # fmt: skip
    assert len(fkc.resampling_steps) > 5 and all(a.shape == (2, 64) for a in fkc.ancestors)
    # each prompt's images stayed on their own barycenter N(m -+ 2, s^2)
    for images_of_prompt, shift in ((images[:64], -2.0), (images[64:], 2.0)):
        assert float(images_of_prompt.mean()) == pytest.approx(BARYCENTER_MEAN + shift, abs=0.3)  # 64 particles
        assert float((images_of_prompt - BARYCENTER_MEAN - shift).abs().max()) < 5 * BARYCENTER_STD


def test_deterministic_and_flow_schedulers_are_refused_with_the_one_to_use():
    for scheduler in (EulerDiscreteScheduler.from_config(get_dummy_scheduler().config),
                      DPMSolverMultistepScheduler.from_config(get_dummy_scheduler().config)):  # fmt: skip
        with pytest.raises(ValueError, match="deterministic .*use DDPMScheduler, EulerAncestralDiscreteScheduler"):
            check_fkc_scheduler(scheduler)
    with pytest.raises(ValueError, match="deterministic flow-matching FlowMatchEulerDiscreteScheduler: use DPMSolver"):
        check_fkc_scheduler(FlowMatchEulerDiscreteScheduler())
    check_fkc_scheduler(DPMSolverMultistepScheduler.from_config(get_dummy_scheduler().config,
                                                                algorithm_type="sde-dpmsolver++"))  # fmt: skip
    pipe = _gaussian_pipeline(DDIMScheduler)  # DDIM: stochastic only with eta > 0, which only the pipeline sees
    with pipe.unet.capture_member_predictions():
        with pytest.raises(ValueError, match="added no noise .*eta=0"):
            _run(pipe, 32, callback=FeynmanKacCorrector(32, ess_threshold=1.0), steps=10)
        _run(pipe, 32, callback=FeynmanKacCorrector(32, ess_threshold=1.0), steps=10, eta=1.0)


def test_bad_options_and_missing_capture_get_one_sentence():
    for kwargs, match in ((dict(num_particles=1), "num_particles must be an int >= 2"),
                          (dict(num_particles=4, ess_threshold=1.5), "ess_threshold"),
                          (dict(num_particles=4, active_timesteps=(500, 100)), "active_timesteps"),
                          (dict(num_particles=4, increment_clamp=0.0), "increment_clamp"),
                          (dict(num_particles=4, tensor_inputs=["latents"]), "tensor_inputs")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            FeynmanKacCorrector(**kwargs)
    pipe = _gaussian_pipeline()
    with pytest.raises(ValueError, match="capture_member_predictions"):
        _run(pipe, 4, callback=FeynmanKacCorrector(4), steps=3)
    with pipe.unet.capture_member_predictions(), pytest.raises(ValueError, match="num_images_per_prompt"):
        _run(pipe, 4, prompt=["a cat", "a dog"], callback=FeynmanKacCorrector(8), steps=3)


def test_active_interval_limits_the_weighting():
    pipe = _gaussian_pipeline()
    fkc = FeynmanKacCorrector(16, active_timesteps=(0, 300), resample_at_end=False, ess_threshold=0.0)
    with pipe.unet.capture_member_predictions():
        _run(pipe, 16, callback=fkc, steps=10)
    timesteps = pipe.scheduler.timesteps
    flat = [bool((ess == 16).all()) for ess in fkc.ess_history]
    assert flat == [bool(t > 300) for t in timesteps]  # weights move only inside the interval
    assert fkc.resampling_steps == []


@pytest.mark.parametrize("kind", ["sd", "stock-sd", "xl"])
def test_tiny_pipelines_resample_and_stay_finite(kind):
    if kind == "xl":
        pipe = ScoreFusionXLPipeline(**get_dummy_xl_components())
        fkc = FeynmanKacCorrector(3, ess_threshold=1.0, tensor_inputs=SDXL_TENSOR_INPUTS, increment_clamp=2.0)
    else:  # ScoreFusionPipeline, or Diffusers' own StableDiffusionPipeline whose unet is a fusion
        pipeline_class = ScoreFusionPipeline if kind == "sd" else StableDiffusionPipeline
        pipe = pipeline_class(**get_dummy_components(weights=[0.3, 0.7]))
        fkc = FeynmanKacCorrector(3, ess_threshold=1.0)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with pipe.unet.capture_member_predictions():
        images = pipe(["a cat", "a dog"], num_inference_steps=4, num_images_per_prompt=3, output_type="np",
                      generator=torch.Generator().manual_seed(0), callback_on_step_end=fkc).images  # fmt: skip
    assert images.shape[0] == 6 and torch.isfinite(torch.as_tensor(images)).all()
    assert len(fkc.resampling_steps) >= 2 and fkc.resampling_steps[-1] == (3, [0, 1])  # the last: every prompt
    assert all(set(groups) <= {0, 1} for _, groups in fkc.resampling_steps)
    assert all(torch.isfinite(ess).all() for ess in fkc.ess_history)


def test_flow_matching_pipelines_are_refused_with_a_sentence():
    components = get_dummy_sd3_components()
    components["transformer"] = FusedTransformer([get_dummy_sd3_transformer(0), get_dummy_sd3_transformer(1)])
    pipe = ScoreFusionSD3Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    stochastic = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True)
    pipe.scheduler = stochastic  # the only stochastic flow sampler in Diffusers 0.42: it re-draws all the noise
    with pipe.transformer.capture_member_predictions(), pytest.raises(ValueError, match="re-draws all the noise"):
        pipe("a cat", num_inference_steps=2, height=32, width=32, num_images_per_prompt=2, output_type="latent",
             callback_on_step_end=FeynmanKacCorrector(2))  # fmt: skip
