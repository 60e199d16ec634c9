"""`ScoreFusionPipeline` and `FusedUNet` inside stock Diffusers pipelines: image-for-image equalities and features."""

import inspect

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from diffusers.models.attention_processor import Attention, SlicedAttnProcessor
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from diffusers_scorefusion import FusedUNet, ScoreFusionPipeline
from diffusers_scorefusion.pipelines.pipeline_score_fusion import build_fused_unet
from diffusers_scorefusion.testing.unet_parts import (
    get_dummy_scheduler,
    get_dummy_text_encoder,
    get_dummy_tokenizer,
    get_dummy_unet,
    get_dummy_vae,
    get_dummy_xl_components,
)

PROMPT = "a red cat"


@pytest.fixture(scope="module")
def parts():
    """Shared frozen parts: VAE, text encoder, tokenizer and three member UNets (seeds 0, 1, 2)."""
    return dict(vae=get_dummy_vae(0), text_encoder=get_dummy_text_encoder(0), tokenizer=get_dummy_tokenizer(),
                members=[get_dummy_unet(seed) for seed in range(3)])  # fmt: skip


def _components(parts, unet, scheduler=None):
    return dict(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=unet,
                scheduler=scheduler or get_dummy_scheduler(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)  # fmt: skip


def _stock(parts, unet, scheduler=None):
    pipe = StableDiffusionPipeline(**_components(parts, unet, scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _fusion(parts, members, weights=None, scheduler=None):
    pipe = ScoreFusionPipeline(**_components(parts, FusedUNet(members, weights=weights), scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, seed=0, **kwargs):
    arguments = dict(prompt=PROMPT, num_inference_steps=2, output_type="np",
                     generator=torch.Generator().manual_seed(seed))  # fmt: skip
    arguments.update(kwargs)
    return pipe(**arguments).images


# ------------------------------------------------------------------------------------------------ image for image
SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "dpm_multistep": (DPMSolverMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "unipc": (UniPCMultistepScheduler, {}),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_one_member_fusion_equals_stock_pipeline(parts, name):
    scheduler_class, overrides = SCHEDULERS[name]
    make = lambda: scheduler_class.from_config(get_dummy_scheduler().config, **overrides)  # noqa: E731
    member = parts["members"][1]
    expected = _generate(_stock(parts, member, make()), num_inference_steps=3)
    fused = _generate(_fusion(parts, [member], scheduler=make()), num_inference_steps=3)
    assert expected.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(fused, expected)  # the FusedUNet multiplies by 1.0: bit for bit


@pytest.mark.parametrize("index", [0, 2])
def test_one_hot_fusion_equals_stock_pipeline_of_that_member(parts, index):
    weights = [1.0 if i == index else 0.0 for i in range(3)]
    expected = _generate(_stock(parts, parts["members"][index]))
    np.testing.assert_array_equal(_generate(_fusion(parts, parts["members"], weights)), expected)
    other = _generate(_stock(parts, parts["members"][1]))
    assert np.abs(other - expected).max() > 1e-3  # members differ: the equality above is not vacuous


def test_mixed_fusion_differs_from_every_member_and_is_deterministic(parts):
    pipe = _fusion(parts, parts["members"], [0.2, 0.5, 0.3])
    image = _generate(pipe)
    np.testing.assert_array_equal(_generate(pipe), image)
    assert np.abs(_generate(pipe, seed=1) - image).max() > 1e-3
    for member in parts["members"]:
        assert np.abs(_generate(_stock(parts, member)) - image).max() > 1e-4


# ------------------------------------------------------------------------------------------------ SDXL drop-in
def test_sdxl_pipeline_with_fused_unet_runs_and_one_member_equals_stock():
    components = get_dummy_xl_components(num_members=2)
    members = list(components["unet"].unets)
    pipe = StableDiffusionXLPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    images = _generate(pipe)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()

    stock = StableDiffusionXLPipeline(**{**components, "unet": members[1]})
    stock.set_progress_bar_config(disable=True)
    one_member = StableDiffusionXLPipeline(**{**components, "unet": FusedUNet([members[1]])})
    one_member.set_progress_bar_config(disable=True)
    expected = _generate(stock)
    np.testing.assert_array_equal(_generate(one_member), expected)
    one_hot = StableDiffusionXLPipeline(**{**components, "unet": FusedUNet(members, weights=[0.0, 1.0])})
    one_hot.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(_generate(one_hot), expected)
    assert np.abs(images - expected).max() > 1e-4


# ------------------------------------------------------------------------------------------------ pipeline features
def test_negative_prompt_height_width_and_num_images(parts):
    member = parts["members"][0]
    stock, fusion = _stock(parts, member), _fusion(parts, [member])
    for kwargs in (dict(negative_prompt="blurry"), dict(height=48, width=40), dict(num_images_per_prompt=2)):
        expected = _generate(stock, **kwargs)
        np.testing.assert_array_equal(_generate(fusion, **kwargs), expected)
    assert _generate(fusion, height=48, width=40).shape == (1, 48, 40, 3)
    assert _generate(fusion, num_images_per_prompt=2).shape == (2, 32, 32, 3)
    assert np.abs(_generate(fusion, negative_prompt="blurry") - _generate(fusion)).max() > 1e-4
    no_cfg = _generate(fusion, guidance_scale=1.0)
    np.testing.assert_array_equal(no_cfg, _generate(stock, guidance_scale=1.0))
    assert np.abs(no_cfg - _generate(fusion)).max() > 1e-4


def test_output_types_and_return_dict(parts):
    pipe = _fusion(parts, parts["members"][:2], [0.5, 0.5])
    as_np = _generate(pipe, output_type="np")
    as_pt = _generate(pipe, output_type="pt")
    as_pil = _generate(pipe, output_type="pil")
    assert isinstance(as_np, np.ndarray) and as_np.shape == (1, 32, 32, 3)
    assert isinstance(as_pt, torch.Tensor) and as_pt.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(as_pt.permute(0, 2, 3, 1).numpy(), as_np, rtol=0, atol=0)
    assert isinstance(as_pil, list) and isinstance(as_pil[0], PIL.Image.Image) and as_pil[0].size == (32, 32)
    np.testing.assert_array_equal(np.asarray(as_pil[0]), (as_np[0] * 255).round().astype(np.uint8))
    output = pipe(PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert isinstance(output, StableDiffusionPipelineOutput)
    as_tuple = pipe(PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0),
                    return_dict=False)  # fmt: skip
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    np.testing.assert_array_equal(as_tuple[0], as_np)
    assert as_tuple[1] is None  # no safety checker


def test_callback_on_step_end_is_called_every_step(parts):
    pipe = _fusion(parts, parts["members"][:2])
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append((step, int(timestep), tuple(callback_kwargs["latents"].shape)))
        return callback_kwargs

    _generate(
        pipe, num_inference_steps=3, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"]
    )
    assert [step for step, _, _ in seen] == [0, 1, 2]
    assert [t for _, t, _ in seen] == pipe.scheduler.timesteps.tolist()
    assert all(shape == (1, 4, 16, 16) for _, _, shape in seen)


def test_provided_latents_reproduce(parts):
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    fusion = _fusion(parts, parts["members"][:1])
    first = _generate(fusion, latents=latents.clone())
    np.testing.assert_array_equal(_generate(fusion, seed=123, latents=latents.clone()), first)
    np.testing.assert_array_equal(_generate(_stock(parts, parts["members"][0]), latents=latents.clone()), first)
    assert np.abs(_generate(fusion) - first).max() > 1e-3


def test_fusion_weights_per_call_equal_construction_and_do_not_persist(parts):
    members = parts["members"]
    pipe = _fusion(parts, members, [0.2, 0.5, 0.3])
    default = _generate(pipe)
    per_call = _generate(pipe, fusion_weights=[0.6, 0.0, 0.4])
    np.testing.assert_array_equal(per_call, _generate(_fusion(parts, members, [0.6, 0.0, 0.4])))
    assert np.abs(per_call - default).max() > 1e-4
    assert pipe.unet.fusion_weights.tolist() == [0.2, 0.5, 0.3]
    np.testing.assert_array_equal(_generate(pipe), default)
    one_hot = _generate(pipe, fusion_weights=torch.tensor([0.0, 1.0, 0.0]))
    np.testing.assert_array_equal(one_hot, _generate(_stock(parts, members[1])))


def test_bad_fusion_weights_are_refused_and_leave_the_weights(parts):
    pipe = _fusion(parts, parts["members"][:2], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"fusion_weights must sum to 1 .*got 0\.90000000"):
        _generate(pipe, fusion_weights=[0.5, 0.4])
    with pytest.raises(ValueError, match=r"fusion_weights must be >= 0, got \[\[1\.5, -0\.5\]\]"):
        _generate(pipe, fusion_weights=[1.5, -0.5])
    with pytest.raises(ValueError, match=r"fusion_weights must have 2 entries per row \(one per member\), got 3"):
        _generate(pipe, fusion_weights=[0.2, 0.3, 0.5])
    assert pipe.unet.fusion_weights.tolist() == [0.5, 0.5]


def test_scheduler_with_mismatched_prediction_type_is_refused(parts):
    v_scheduler = get_dummy_scheduler(prediction_type="v_prediction")
    with pytest.raises(ValueError, match=r"prediction_type is 'v_prediction' but the FusedUNet outputs 'epsilon'"):
        ScoreFusionPipeline(**_components(parts, FusedUNet(parts["members"][:2]), v_scheduler))
    pipe = _fusion(parts, parts["members"][:2])
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    with pytest.raises(ValueError, match=r"prediction_type is 'v_prediction' but the FusedUNet outputs 'epsilon'"):
        _generate(pipe)


def test_call_signature_is_the_stock_one_plus_fusion_weights():
    stock = inspect.signature(StableDiffusionPipeline.__call__).parameters
    fusion = inspect.signature(ScoreFusionPipeline.__call__).parameters
    assert list(fusion) == [name for name in stock if name != "kwargs"] + ["fusion_weights", "kwargs"]
    assert all(fusion[name].default is stock[name].default for name in stock)
    assert fusion["fusion_weights"].kind is inspect.Parameter.KEYWORD_ONLY and fusion["fusion_weights"].default is None
    assert "fusion_weights (`list[float]`" in ScoreFusionPipeline.__call__.__doc__
    assert ScoreFusionPipeline.__call__.__doc__.startswith(StableDiffusionPipeline.__call__.__doc__[:200])


def test_plain_unet_or_none_work_as_in_diffusers(parts):
    """A plain UNet samples exactly as the stock pipeline; per-call weights and fitting need a fusion; `unet=None`
    encodes prompts alone."""
    pipe = ScoreFusionPipeline(**_components(parts, parts["members"][0]))
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(_generate(pipe), _generate(_stock(parts, parts["members"][0])))
    with pytest.raises(
        TypeError, match=r"fusion_weights=\[1.0\] needs a FusedUNet as `unet`, got UNet2DConditionModel"
    ):
        _generate(pipe, fusion_weights=[1.0])
    with pytest.raises(TypeError, match="fit_weights needs a FusedUNet as `unet`, got UNet2DConditionModel"):
        pipe.fit_weights([PIL.Image.new("RGB", (32, 32))], "a cat")
    encoder_only = ScoreFusionPipeline(**_components(parts, None))
    embeds, _ = encoder_only.encode_prompt(PROMPT, "cpu", 1, False)
    expected, _ = _stock(parts, parts["members"][0]).encode_prompt(PROMPT, "cpu", 1, False)
    assert torch.equal(embeds, expected)


def test_scheduler_with_another_noise_schedule_is_refused(parts):
    schedulers = [get_dummy_scheduler(), get_dummy_scheduler()]
    fused = FusedUNet(parts["members"][:2], member_schedulers=schedulers)
    with pytest.raises(ValueError, match=r"noise schedule differs .*beta_schedule='linear' vs 'scaled_linear'"):
        ScoreFusionPipeline(**_components(parts, fused, get_dummy_scheduler(beta_schedule="linear")))


def test_attention_slicing_reaches_every_member():
    members = [get_dummy_unet(seed) for seed in range(2)]
    pipe = ScoreFusionPipeline(**_components(dict(vae=get_dummy_vae(0), text_encoder=get_dummy_text_encoder(0),
                                                  tokenizer=get_dummy_tokenizer()), FusedUNet(members)))  # fmt: skip
    before = _generate(pipe)
    pipe.enable_attention_slicing(slice_size=1)
    for member in members:
        processors = [m.processor for m in member.modules() if isinstance(m, Attention)]
        assert processors and all(isinstance(p, SlicedAttnProcessor) and p.slice_size == 1 for p in processors)
    np.testing.assert_allclose(_generate(pipe), before, rtol=0, atol=1e-5)  # slicing reorders sums only
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert all(block.b1 == 1.2 for member in members for block in member.up_blocks)
    pipe.disable_freeu()
    pipe.fuse_qkv_projections()
    assert all(m.fused_projections for member in members for m in member.modules() if isinstance(m, Attention))


# ------------------------------------------------------------------------------------------------ from_pretrained
@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory):
    """A base pipeline folder, two member UNet folders and two member pipeline folders on disk."""
    root = tmp_path_factory.mktemp("saved")
    _stock(parts, get_dummy_unet(9)).save_pretrained(root / "base")
    for i, member in enumerate(parts["members"][:2]):
        member.save_pretrained(root / f"unet_{i}")
        _stock(parts, member).save_pretrained(root / f"pipeline_{i}")
    return root


def test_from_pretrained_with_unet_folders_and_modules(parts, saved):
    expected = _generate(_fusion(parts, parts["members"][:2], [0.3, 0.7]))
    pipe = ScoreFusionPipeline.from_pretrained(saved / "base", unets=[saved / "unet_0", str(saved / "unet_1")],
                                               weights=[0.3, 0.7])  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, ScoreFusionPipeline) and isinstance(pipe.unet, FusedUNet)
    assert pipe.unet.fusion_weights.tolist() == [0.3, 0.7]
    np.testing.assert_array_equal(_generate(pipe), expected)
    modules = ScoreFusionPipeline.from_pretrained(saved / "base", unets=parts["members"][:2], weights=[0.3, 0.7])
    modules.set_progress_bar_config(disable=True)
    assert modules.unet.unets[0] is parts["members"][0]
    np.testing.assert_array_equal(_generate(modules), expected)


def test_from_pretrained_with_whole_pipeline_folders(parts, saved):
    pipe = ScoreFusionPipeline.from_pretrained(saved / "base", unets=[saved / "pipeline_0", saved / "pipeline_1"],
                                               weights=[1.0, 0.0])  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.noise_schedule["beta_schedule"] == "scaled_linear"  # read from the members' scheduler/
    np.testing.assert_array_equal(_generate(pipe), _generate(_stock(parts, parts["members"][0])))
    mixed = _generate(pipe, fusion_weights=[0.3, 0.7])
    np.testing.assert_array_equal(mixed, _generate(_fusion(parts, parts["members"][:2], [0.3, 0.7])))


def test_from_pretrained_refuses_bad_members(saved):
    with pytest.raises(ValueError, match=r"weights must sum to 1 .*got 0\.50000000"):
        ScoreFusionPipeline.from_pretrained(
            saved / "base", unets=[saved / "unet_0", saved / "unet_1"], weights=[0.25, 0.25]
        )
    with pytest.raises(ValueError, match="could not find a UNet config for member"):
        ScoreFusionPipeline.from_pretrained(saved / "base", unets=[saved / "unet_0", saved / "nowhere"])
    with pytest.raises(ValueError, match="weights= needs unets="):
        ScoreFusionPipeline.from_pretrained(saved / "base", weights=[1.0])


def test_from_pretrained_mixing_a_unet_folder_and_a_pipeline_folder(parts, saved):
    # a member without its own scheduler is a fine-tune of the base: it gets the base's noise schedule
    pipe = ScoreFusionPipeline.from_pretrained(saved / "base", unets=[saved / "unet_0", saved / "pipeline_1"])
    base_schedule = {key: pipe.scheduler.config[key] for key in pipe.unet.config.noise_schedule}
    assert pipe.unet.config.noise_schedule == base_schedule
    # without a base to fall back on, a mix cannot be checked, so it is refused with the member index
    with pytest.raises(ValueError, match=r"members \[0\] come without a scheduler config while others have one"):
        build_fused_unet([saved / "unet_0", saved / "pipeline_1"])


# ------------------------------------------------------------------------------------------------ converted members
@pytest.mark.parametrize("name", ["ddim", "euler", "dpm_multistep"])
def test_v_prediction_member_in_an_epsilon_fusion_matches_the_stock_v_pipeline(parts, name):
    # Euler's linspace timesteps include a fractional one (499.5): the conversion must use that step's noise level
    scheduler_class, overrides = SCHEDULERS[name]
    v_config = get_dummy_scheduler(prediction_type="v_prediction").config
    member = parts["members"][2]
    stock = _stock(parts, member, scheduler_class.from_config(v_config, **overrides))
    fused = FusedUNet([member], prediction_type="epsilon", member_schedulers=[v_config])
    fusion = ScoreFusionPipeline(**_components(parts, fused, scheduler_class.from_config(get_dummy_scheduler().config)))
    fusion.set_progress_bar_config(disable=True)
    expected = _generate(stock, num_inference_steps=3)
    # the stock scheduler converts v -> x0 and the fusion v -> eps: the same maths in another float32 order (~1e-5)
    np.testing.assert_allclose(_generate(fusion, num_inference_steps=3), expected, rtol=0, atol=5e-5)
    assert np.abs(_generate(_fusion(parts, [member]), num_inference_steps=3) - expected).max() > 1e-3


def test_weights_are_restored_when_the_call_fails(parts):
    pipe = _fusion(parts, parts["members"][:2], [0.5, 0.5])

    def failing_callback(pipeline, step, timestep, callback_kwargs):
        assert pipeline.unet.fusion_weights.tolist() == [1.0, 0.0]
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        _generate(pipe, fusion_weights=[1.0, 0.0], callback_on_step_end=failing_callback)
    assert pipe.unet.fusion_weights.tolist() == [0.5, 0.5]


def test_progress_bar_shows_every_step(parts, capsys):
    pipe = _fusion(parts, parts["members"][:2])
    pipe.set_progress_bar_config(disable=False)
    _generate(pipe, num_inference_steps=3)
    assert "3/3" in capsys.readouterr().err
