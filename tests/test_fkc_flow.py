"""Feynman-Kac correctors on flow-matching fusions: the SDE DPM-Solver with flow sigmas samples the barycenter of exact
Gaussian flow members, a tiny Sana fusion resamples with no extra forwards, other flow schedulers are refused."""

import math

import pytest
import torch
from _gaussian_flow_members import GaussianVelocityTransformer
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    SanaPipeline,
)

from diffusers_scorefusion import FusedTransformer, ScoreFusionSD3Pipeline
from diffusers_scorefusion.fusion.smc_utils import fkc_flow_step_factor, fkc_step_factor
from diffusers_scorefusion.pipelines.fkc import FeynmanKacCorrector, check_fkc_scheduler
from diffusers_scorefusion.testing.transformer_parts import (
    get_dummy_sana_components,
    get_dummy_sana_transformer,
    get_dummy_sd3_components,
    get_dummy_sd3_transformer,
)

FLOW_SDE = dict(use_flow_sigmas=True, prediction_type="flow_prediction", algorithm_type="sde-dpmsolver++")
# members N(-1, 0.3^2) and N(1, 1) per pixel at lambda = (0.5, 0.5): barycenter N(m, s^2) with 1/s^2 = sum lambda/s_i^2
PRECISION = 0.5 / 0.3**2 + 0.5
BARYCENTER_MEAN, BARYCENTER_STD = (0.5 * -1 / 0.3**2 + 0.5) / PRECISION, math.sqrt(1 / PRECISION)


class SanaGaussianMember(GaussianVelocityTransformer):
    """The exact velocity of ``N(mean, std^2)`` per pixel, called as `SanaPipeline` calls its transformer."""

    def __init__(self, mean: float, std: float):
        super().__init__(torch.full((1, 1, 1), mean), std=std)
        self.config.timestep_scale = 1.0  # Sana multiplies the timestep (sigma * 1000) by it

    def forward(self, hidden_states, encoder_hidden_states=None, encoder_attention_mask=None, timestep=None,
                attention_kwargs=None, return_dict=True):  # fmt: skip
        return super().forward(hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                               return_dict=return_dict)  # fmt: skip


def _sana(transformer, **scheduler_config):
    components = get_dummy_sana_components()
    components.update(transformer=transformer, scheduler=DPMSolverMultistepScheduler(**FLOW_SDE, **scheduler_config))
    pipe = SanaPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_gaussian(pipe, num, callback=None, steps=40):
    zeros, mask = torch.zeros(1, 4, 8), torch.ones(1, 4, dtype=torch.long)  # members ignore a zero prompt
    latents = torch.randn(num, 1, 1, 1, generator=torch.Generator().manual_seed(5))
    return pipe(prompt_embeds=zeros, prompt_attention_mask=mask, negative_prompt=None, negative_prompt_embeds=zeros,
                negative_prompt_attention_mask=mask, num_inference_steps=steps, num_images_per_prompt=num,
                height=32, width=32, use_resolution_binning=False, output_type="latent", latents=latents,
                guidance_scale=4.5, generator=torch.Generator().manual_seed(0),
                callback_on_step_end=callback).images[:, 0, 0, 0].double()  # fmt: skip


def test_flow_step_factor_is_the_snr_ratio_and_tends_to_the_sde_rate():
    # the DDPM factor is 1 - snr_t / snr_prev too: check on flow alphas (1 - t)^2 in a variance-preserving rescaling
    t, t_prev = 0.6, 0.55
    snr = lambda s: ((1 - s) / s) ** 2  # noqa: E731
    assert fkc_flow_step_factor(t, t_prev) == pytest.approx(1 - snr(t) / snr(t_prev))
    abar = lambda s: snr(s) / (1 + snr(s))  # the VP schedule with the same snr: same factor  # noqa: E731
    assert fkc_flow_step_factor(t, t_prev) == pytest.approx(fkc_step_factor(abar(t), abar(t_prev)))
    dt = 1e-6  # g^2 dt / sigma^2 with g^2 = 2 t / (1 - t), sigma = t
    assert fkc_flow_step_factor(t, t - dt) / dt == pytest.approx(2 / (t * (1 - t)), rel=1e-4)
    assert fkc_flow_step_factor(0.3, 0.0) == 1.0 and fkc_flow_step_factor(1.0, 0.9) == 1.0
    with pytest.raises(ValueError, match="sigma_prev <= sigma_t"):
        fkc_flow_step_factor(0.5, 0.6)


def test_fkc_samples_the_barycenter_of_gaussian_flow_members_with_no_extra_forwards():
    members = [SanaGaussianMember(-1.0, 0.3), SanaGaussianMember(1.0, 1.0)]
    pipe = _sana(FusedTransformer(members, weights=[0.5, 0.5]), flow_shift=3.0)
    plain = _run_gaussian(pipe, 512)
    plain_calls = [member.num_calls for member in members]
    fkc = FeynmanKacCorrector(512, generator=torch.Generator().manual_seed(1))
    with pipe.transformer.capture_member_predictions():
        corrected = _run_gaussian(pipe, 512, callback=fkc)  # guidance 4.5: experts (member, uncond / cond)
    assert [member.num_calls for member in members] == [2 * calls for calls in plain_calls]  # zero extra forwards
    standard_error = BARYCENTER_STD / math.sqrt(512)
    assert abs(float(plain.mean()) - BARYCENTER_MEAN) > 10 * standard_error  # the plain flow SDE is off ...
    assert abs(float(corrected.mean()) - BARYCENTER_MEAN) < 0.03 + 3 * standard_error  # ... FKC on it
    assert float(corrected.std()) == pytest.approx(BARYCENTER_STD, rel=0.1)
    assert abs(float(plain.std()) / BARYCENTER_STD - 1) > 0.1
    assert len(fkc.ess_history) == 40 and fkc.resampling_steps[-1] == (39, [0])


def test_tiny_sana_fusion_resamples_and_stays_finite_with_no_extra_forwards():
    members = [get_dummy_sana_transformer(0), get_dummy_sana_transformer(1)]
    pipe = _sana(FusedTransformer(members, weights=[0.3, 0.7]), flow_shift=7.0)
    calls = []
    hooks = [member.register_forward_pre_hook(lambda *_: calls.append(1)) for member in members]
    call = dict(prompt=["a cat", "a dog"], negative_prompt="", height=32, width=32, max_sequence_length=16,
                guidance_scale=6.0, complex_human_instruction=None, clean_caption=False, use_resolution_binning=False,
                num_inference_steps=4,
                num_images_per_prompt=3, output_type="latent")  # fmt: skip
    try:
        pipe(**call, generator=torch.Generator().manual_seed(0))
        plain_calls, calls[:] = len(calls), []
        fkc = FeynmanKacCorrector(3, ess_threshold=1.0, increment_clamp=2.0, generator=torch.Generator().manual_seed(1))
        with pipe.transformer.capture_member_predictions():
            latents = pipe(**call, generator=torch.Generator().manual_seed(0), callback_on_step_end=fkc).images
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == plain_calls == 2 * 4  # two members, four steps, guidance batched: zero extra forwards
    assert latents.shape == (6, 4, 16, 16) and torch.isfinite(latents).all()
    assert len(fkc.resampling_steps) >= 2 and fkc.resampling_steps[-1] == (3, [0, 1])
    assert all(set(groups) <= {0, 1} for _, groups in fkc.resampling_steps)
    assert all(torch.isfinite(ess).all() for ess in fkc.ess_history)


@pytest.mark.parametrize("scheduler, match", [
    (FlowMatchEulerDiscreteScheduler(stochastic_sampling=True),
     r"^FeynmanKacCorrector does not support FlowMatchEulerDiscreteScheduler\(stochastic_sampling=True\): it re-draws"),
    (FlowMatchEulerDiscreteScheduler(shift=3.0), "deterministic flow-matching FlowMatchEulerDiscreteScheduler: use"),
    (FlowMatchHeunDiscreteScheduler(), "deterministic flow-matching FlowMatchHeunDiscreteScheduler: use"),
    (DPMSolverMultistepScheduler(**dict(FLOW_SDE, algorithm_type="dpmsolver++")),
     r"deterministic flow-matching DPMSolverMultistepScheduler\(algorithm_type='dpmsolver\+\+'\): use"),
    (DPMSolverMultistepScheduler(**dict(FLOW_SDE, algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min")),
     r"supports flow-matching only with .*, got DPMSolverMultistepScheduler\(algorithm_type='sde-dpmsolver', "),
])  # fmt: skip
def test_other_flow_schedulers_are_refused_with_one_sentence_naming_the_one_to_use(scheduler, match):
    with pytest.raises(ValueError, match=match) as error:
        check_fkc_scheduler(scheduler)
    message = str(error.value)
    assert "DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type='flow_prediction', " \
           "algorithm_type='sde-dpmsolver++', flow_shift=...)" in message  # the one to use
    assert ". " not in message  # one sentence
    assert check_fkc_scheduler(DPMSolverMultistepScheduler(**FLOW_SDE)) is None  # the stochastic flow scheduler


def test_tiny_sd3_fusion_with_the_flow_sde_resamples_and_stays_finite():
    components = get_dummy_sd3_components()
    components["transformer"] = FusedTransformer([get_dummy_sd3_transformer(0), get_dummy_sd3_transformer(1)])
    components["scheduler"] = DPMSolverMultistepScheduler(**FLOW_SDE, flow_shift=3.0)
    pipe = ScoreFusionSD3Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    fkc = FeynmanKacCorrector(3, ess_threshold=1.0, generator=torch.Generator().manual_seed(1))
    with pipe.transformer.capture_member_predictions():
        latents = pipe(["a cat", "a dog"], num_inference_steps=4, height=32, width=32, num_images_per_prompt=3,
                       max_sequence_length=16, output_type="latent", callback_on_step_end=fkc).images  # fmt: skip
    assert latents.shape[0] == 6 and torch.isfinite(latents).all()
    assert len(fkc.resampling_steps) >= 2 and fkc.resampling_steps[-1] == (3, [0, 1])


def test_flux_pipelines_are_refused_with_one_sentence():
    from diffusers_scorefusion import ScoreFusionFluxPipeline
    from diffusers_scorefusion.testing.transformer_parts import get_dummy_flux_components, get_dummy_flux_transformer

    components = get_dummy_flux_components()
    components["transformer"] = FusedTransformer([get_dummy_flux_transformer(0), get_dummy_flux_transformer(1)])
    pipe = ScoreFusionFluxPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    fkc = FeynmanKacCorrector(2)
    message = r"does not support ScoreFusionFluxPipeline yet .*use an SD3 or Sana fusion"
    with pytest.raises(ValueError, match=message) as error:
        with pipe.transformer.capture_member_predictions():
            pipe("a cat", num_inference_steps=2, height=32, width=32, num_images_per_prompt=2, max_sequence_length=16,
                 output_type="latent", callback_on_step_end=fkc)
    assert ". " not in str(error.value)
