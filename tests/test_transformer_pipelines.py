"""Stock Diffusers transformer pipelines with a `FusedTransformer` as `transformer`: a one-member fusion gives the stock
pipeline's images bit for bit, one-hot weights give the member's, mixed weights change them."""

import pytest
import torch
from diffusers import (
    ChromaPipeline,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FluxPipeline,
    PixArtSigmaPipeline,
    SanaPipeline,
    StableDiffusion3Pipeline,
)

from diffusers_scorefusion import FusedTransformer
from diffusers_scorefusion.testing import transformer_parts as parts

FLOW_DPM = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
CASES = {
    # name: (pipeline class, components builder, other member builder, call arguments)
    "flux": (FluxPipeline, parts.get_dummy_flux_components, parts.get_dummy_flux_transformer,
             dict(prompt="a cat", height=8, width=8, max_sequence_length=16, guidance_scale=5.0)),
    "sd3": (StableDiffusion3Pipeline, parts.get_dummy_sd3_components, parts.get_dummy_sd3_transformer,
            dict(prompt="a cat", height=8, width=8, max_sequence_length=16, guidance_scale=5.0)),
    "chroma": (ChromaPipeline, parts.get_dummy_chroma_components, parts.get_dummy_chroma_transformer,
               dict(prompt="a cat", height=8, width=8, max_sequence_length=16, guidance_scale=5.0)),
    "pixart_sigma": (PixArtSigmaPipeline, parts.get_dummy_pixart_components, parts.get_dummy_pixart_transformer,
                     dict(prompt="a cat", height=8, width=8, max_sequence_length=16, use_resolution_binning=False,
                          clean_caption=False)),
    "sana": (SanaPipeline, parts.get_dummy_sana_components, parts.get_dummy_sana_transformer,
             dict(prompt="a cat", negative_prompt="", height=32, width=32, max_sequence_length=16, guidance_scale=6.0,
                  complex_human_instruction=None, clean_caption=False)),
}  # fmt: skip
SCHEDULERS = [
    ("flux", FlowMatchEulerDiscreteScheduler, {}),
    ("flux", DPMSolverMultistepScheduler, dict(FLOW_DPM, use_dynamic_shifting=True)),  # Flux passes mu
    ("sd3", FlowMatchEulerDiscreteScheduler, dict(shift=3.0)),
    ("sd3", FlowMatchHeunDiscreteScheduler, dict(shift=3.0)),
    ("chroma", FlowMatchEulerDiscreteScheduler, {}),
    ("pixart_sigma", DDIMScheduler, {}),
    ("pixart_sigma", DPMSolverMultistepScheduler, {}),
    pytest.param("sana", FlowMatchEulerDiscreteScheduler, dict(shift=7.0), marks=pytest.mark.slow),  # ~4 s a call
    pytest.param("sana", DPMSolverMultistepScheduler, dict(FLOW_DPM, flow_shift=7.0), marks=pytest.mark.slow),
]


def _images(pipeline_class, components, call):
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(**call, num_inference_steps=2, generator=generator, output_type="pt").images


@pytest.mark.parametrize("name, scheduler_class, scheduler_config", SCHEDULERS)
def test_one_member_fusion_reproduces_the_stock_pipeline_bit_for_bit(name, scheduler_class, scheduler_config):
    pipeline_class, build, build_member, call = CASES[name]
    components = {**build(0), "scheduler": scheduler_class(**scheduler_config)}
    expected = _images(pipeline_class, components, call)
    member = components["transformer"]
    fused = _images(pipeline_class, {**components, "transformer": FusedTransformer([member])}, call)
    assert torch.equal(fused, expected)
    # one-hot weights on a two-member fusion: the member's images, the other member is never called
    other = build_member(1)
    calls = []
    handle = other.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        one_hot = FusedTransformer([other, member], weights=[0.0, 1.0])
        assert torch.equal(_images(pipeline_class, {**components, "transformer": one_hot}, call), expected)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("name", ["flux", "sd3", "chroma", "pixart_sigma"])
def test_mixed_weights_change_the_images_and_per_call_weights_restore_them(name):
    pipeline_class, build, build_member, call = CASES[name]
    components = build(0)
    if name == "pixart_sigma":
        components["scheduler"] = DDIMScheduler()
    expected = _images(pipeline_class, components, call)
    fused = FusedTransformer([components["transformer"], build_member(1)], weights=[0.5, 0.5])
    mixed = _images(pipeline_class, {**components, "transformer": fused}, call)
    assert not torch.allclose(mixed, expected, atol=1e-3)
    with fused.override_weights([1.0, 0.0]):
        assert torch.equal(_images(pipeline_class, {**components, "transformer": fused}, call), expected)
