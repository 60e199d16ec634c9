"""`ScoreFusionSD3Pipeline` and `ScoreFusionFluxPipeline`: drop-in sampling, per-call weights, checks, loading members
from folders, registration, and fitting through the pipelines' own encoding."""

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusion3Pipeline,
)

from diffusers_scorefusion import FusedTransformer, ScoreFusionFluxPipeline, ScoreFusionSD3Pipeline, fit_weights
from diffusers_scorefusion.testing import transformer_parts as parts

CALL = dict(prompt="a cat", height=8, width=8, max_sequence_length=16, num_inference_steps=2, output_type="pt")
FAMILIES = {
    "sd3": (ScoreFusionSD3Pipeline, StableDiffusion3Pipeline, parts.get_dummy_sd3_components,
            parts.get_dummy_sd3_transformer),
    "flux": (ScoreFusionFluxPipeline, FluxPipeline, parts.get_dummy_flux_components, parts.get_dummy_flux_transformer),
}  # fmt: skip


def _images(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**{**CALL, **kwargs}, generator=torch.Generator().manual_seed(0)).images


def _target_images(num=3, size=8):
    rng = np.random.default_rng(0)
    return [rng.uniform(0, 1, (size, size, 3)).astype(np.float32) for _ in range(num)]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_fusion_pipeline_matches_the_stock_pipeline_and_takes_per_call_weights(family):
    fusion_class, stock_class, build, build_member = FAMILIES[family]
    components = build(0)
    member, other = components["transformer"], build_member(1)
    expected = _images(stock_class(**components))
    pipe = fusion_class(**{**components, "transformer": FusedTransformer([member])})
    assert torch.equal(_images(pipe), expected)
    pipe = fusion_class(**{**components, "transformer": FusedTransformer([other, member], weights=[0.5, 0.5])})
    assert torch.equal(_images(pipe, fusion_weights=[0.0, 1.0]), expected)
    assert pipe.transformer.fusion_weights.tolist() == [0.5, 0.5]
    assert not torch.allclose(_images(pipe), expected, atol=1e-3)
    with pytest.raises(ValueError, match="fusion_weights must sum to 1"):
        _images(pipe, fusion_weights=[0.5, 0.6])
    assert pipe.transformer.fusion_weights.tolist() == [0.5, 0.5]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_pipelines_refuse_other_transformers_and_schedulers(family):
    fusion_class, stock_class, build, build_member = FAMILIES[family]
    components = build(0)
    # as in Diffusers, a plain transformer samples as the stock pipeline; fusion-only calls are refused
    plain = fusion_class(**components)
    assert torch.equal(_images(plain), _images(stock_class(**components)))
    with pytest.raises(TypeError, match="fusion_weights=\\[1.0\\] needs a FusedTransformer as `transformer`"):
        _images(plain, fusion_weights=[1.0])
    with pytest.raises(TypeError, match="fit_weights needs a FusedTransformer as `transformer`"):
        plain.fit_weights(_target_images(1), "a")
    wrong_class = parts.get_dummy_flux_transformer(0) if family == "sd3" else parts.get_dummy_sd3_transformer(0)
    refusal = f"{fusion_class.__name__} needs a FusedTransformer of .* members \\(or a plain"
    with pytest.raises(TypeError, match=refusal):
        fusion_class(**{**components, "transformer": wrong_class})
    with pytest.raises(ValueError, match=f"calls {fusion_class.transformer_class.__name__} members, got a fusion of"):
        fusion_class(**{**components, "transformer": FusedTransformer([wrong_class])})
    fused = FusedTransformer([components["transformer"]], member_schedulers=[components["scheduler"]])
    with pytest.raises(ValueError, match="the members are flow-matching models.*DDIMScheduler"):
        fusion_class(**{**components, "transformer": fused, "scheduler": DDIMScheduler()})
    pipe = fusion_class(**{**components, "transformer": fused})
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=500)
    with pytest.raises(ValueError, match="num_train_timesteps=500 but the members were trained with 1000"):
        _images(pipe)
    # another sampling shift is a discretisation choice, not an error
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(components["scheduler"].config, shift=5.0)
    assert _images(pipe).shape == (1, 3, 8, 8)


def test_registered_with_diffusers_so_a_saved_pipeline_resolves_to_its_class(tmp_path):
    assert diffusers.ScoreFusionFluxPipeline is ScoreFusionFluxPipeline
    assert diffusers.ScoreFusionSD3Pipeline is ScoreFusionSD3Pipeline
    components = parts.get_dummy_flux_components(0)
    fused = FusedTransformer([components["transformer"], parts.get_dummy_flux_transformer(1)], weights=[0.3, 0.7])
    pipe = ScoreFusionFluxPipeline(**{**components, "transformer": fused})
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, disable_mmap=True)  # (test_serialization_transformer.py)
    assert type(loaded) is ScoreFusionFluxPipeline and isinstance(loaded.transformer, FusedTransformer)
    assert torch.equal(_images(loaded), _images(pipe))


# ------------------------------------------------------------------------------------------------ from_pretrained
@pytest.fixture(scope="module")
def flux_folders(tmp_path_factory):
    """A saved base Flux pipeline, a member transformer folder and a member pipeline folder."""
    root = tmp_path_factory.mktemp("flux")
    components = parts.get_dummy_flux_components(0)
    FluxPipeline(**components).save_pretrained(root / "base")
    parts.get_dummy_flux_transformer(1).save_pretrained(root / "member_a")
    member_b = parts.get_dummy_flux_transformer(2)
    FluxPipeline(**{**components, "transformer": member_b}).save_pretrained(root / "member_b")
    parts.get_dummy_sd3_transformer(0).save_pretrained(root / "sd3_member")
    return root


def test_from_pretrained_builds_the_fusion_from_folders(flux_folders):
    root = flux_folders
    pipe = ScoreFusionFluxPipeline.from_pretrained(root / "base", transformers=[root / "member_a", root / "member_b"],
                                                   weights=[0.3, 0.7])  # fmt: skip
    fused = pipe.transformer
    assert isinstance(fused, FusedTransformer) and fused.fusion_weights.tolist() == [0.3, 0.7]
    # Flux's scheduler shifts at sampling time only: the members' training shift is 1
    assert fused.config.noise_schedule == {"num_train_timesteps": 1000, "shift": 1.0}
    for member, seed in zip(fused.transformers, (1, 2)):
        reference = parts.get_dummy_flux_transformer(seed).state_dict()
        assert all(torch.equal(value, reference[key]) for key, value in member.state_dict().items())
    assert fused.member_sources[0]["pretrained_model_name_or_path"] == str(root / "member_a")
    # the same as a fusion of the members loaded with Diffusers, in the base pipeline loaded with Diffusers (weights
    # loaded from disk can differ from in-memory ones in memory layout, hence in the last bits of some kernels)
    members = [FluxTransformer2DModel.from_pretrained(root / "member_a"),
               FluxTransformer2DModel.from_pretrained(root / "member_b", subfolder="transformer")]  # fmt: skip
    components = FluxPipeline.from_pretrained(root / "base").components
    reference = ScoreFusionFluxPipeline(**{**components, "transformer": FusedTransformer(members, weights=[0.3, 0.7])})
    assert torch.equal(_images(pipe), _images(reference))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(transformers=["sd3_member"]), ValueError,
         "is a 'SD3Transformer2DModel'; expected a FluxTransformer2DModel"),
        (dict(transformers=["missing"]), ValueError, "could not find a transformer config"),
        (dict(weights=[1.0]), ValueError, "weights= needs transformers="),
        (dict(transformers=["member_a"], transformer=object()), ValueError, "pass either transformer="),
        (dict(unets=["member_a"]), TypeError, "fuses transformers: pass transformers=, not unets="),
        (dict(transformers=[{"path": "member_a"}]), TypeError, "a dict with pretrained_model_name_or_path"),
        (dict(transformers=["member_a"], weights=[0.5, 0.5]), ValueError, "1 entries per row"),
    ],
)  # fmt: skip
def test_from_pretrained_refuses_bad_members(flux_folders, kwargs, error, match):
    if "transformers" in kwargs and isinstance(kwargs["transformers"][0], str):
        kwargs = {**kwargs, "transformers": [str(flux_folders / name) for name in kwargs["transformers"]]}
    if "unets" in kwargs:
        kwargs = {**kwargs, "unets": [str(flux_folders / name) for name in kwargs["unets"]]}
    with pytest.raises(error, match=match):
        ScoreFusionFluxPipeline.from_pretrained(flux_folders / "base", **kwargs)


# ------------------------------------------------------------------------------------------------ fitting
def test_flux_fit_encodes_as_the_flux_pipeline_and_fits_in_its_timestep_units():
    components = parts.get_dummy_flux_components(0, guidance_embeds=True)
    members = [components["transformer"], parts.get_dummy_flux_transformer(1, guidance_embeds=True)]
    pipe = ScoreFusionFluxPipeline(**{**components, "transformer": FusedTransformer(members)})
    images, prompts = _target_images(), ["a cat", "a dog", "a cow"]
    options = dict(num_noise_draws=2, num_bootstrap=10, num_timestep_bins=2, progress_bar=False)
    result = pipe.fit_weights(images, prompts, guidance_scale=4.0, max_sequence_length=16,
                              generator=torch.Generator().manual_seed(0), **options)  # fmt: skip
    assert result.timestep_bin_edges == [0.0, 0.5, 1.0]  # Flux's transformer takes sigma in [0, 1]
    assert result.provenance["timestep_scale"] == 1.0 and result.provenance["timestep_density"] == "uniform"
    assert torch.equal(pipe.transformer.fusion_weights, result.weights)
    # the same fit from inputs built with the stock FluxPipeline's own methods
    stock = FluxPipeline(**components)
    pixels = stock.image_processor.preprocess(images)  # (3, 3, 8, 8) in [-1, 1]
    with torch.no_grad():
        latents = (stock.vae.encode(pixels).latent_dist.mean - stock.vae.config.shift_factor)
        latents = latents * stock.vae.config.scaling_factor  # (3, 1, 8, 8)
        prompt_embeds, pooled, text_ids = stock.encode_prompt(prompts, None, max_sequence_length=16)
    _, image_ids = stock.prepare_latents(3, 1, 8, 8, torch.float32, torch.device("cpu"), None, latents=None)
    packed = stock._pack_latents(latents, 3, 1, 8, 8)  # (3, 16, 4)
    reference = fit_weights(
        FusedTransformer(members), FlowMatchEulerDiscreteScheduler(), packed, prompt_embeds,
        transformer_kwargs=dict(pooled_projections=pooled, guidance=torch.full((3,), 4.0)),
        shared_kwargs=dict(img_ids=image_ids, txt_ids=text_ids), timestep_scale=1.0,
        generator=torch.Generator().manual_seed(0), **options,
    )  # fmt: skip
    torch.testing.assert_close(result.gram, reference.gram, rtol=1e-6, atol=0)
    torch.testing.assert_close(result.weights, reference.weights, rtol=0, atol=1e-6)
    # a different guidance value is a different conditioning: the quadratic changes
    other = pipe.fit_weights(images, prompts, guidance_scale=1.0, max_sequence_length=16, set_weights=False,
                             generator=torch.Generator().manual_seed(0), **options)  # fmt: skip
    assert not torch.allclose(other.gram, result.gram)


def test_sd3_fit_uses_pooled_projections_and_logit_normal_timesteps():
    components = parts.get_dummy_sd3_components(0)
    members = [components["transformer"], parts.get_dummy_sd3_transformer(1)]
    pipe = ScoreFusionSD3Pipeline(**{**components, "transformer": FusedTransformer(members)})
    images, prompts = _target_images(2), "a cat"
    options = dict(num_noise_draws=2, num_bootstrap=0, progress_bar=False, max_sequence_length=16)
    result = pipe.fit_weights(images, prompts, generator=torch.Generator().manual_seed(0), **options)
    provenance = result.provenance
    assert provenance["timestep_density"] == "logit_normal" and provenance["timestep_scale"] == 1000.0
    assert provenance["shift"] == 3.0 and provenance["num_samples"] == 2
    latents, prompt_embeds, pooled = pipe.encode_for_fitting(images, prompts, max_sequence_length=16)
    assert latents.shape == (2, 4, 8, 8) and pooled.shape == (2, 64)
    reference = fit_weights(FusedTransformer(members), components["scheduler"], latents, prompt_embeds,
                            transformer_kwargs={"pooled_projections": pooled}, timestep_density="logit_normal",
                            generator=torch.Generator().manual_seed(0), num_noise_draws=2, num_bootstrap=0,
                            progress_bar=False)  # fmt: skip
    torch.testing.assert_close(result.gram, reference.gram, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda pipe: pipe.fit_weights([np.zeros((8, 8, 3)), np.zeros((16, 16, 3))], "a"), ValueError,
         "all images must have the same size"),
        (lambda pipe: pipe.fit_weights(_target_images(2), ["a"]), ValueError, "got 2 images but 1 prompts"),
        (lambda pipe: pipe.fit_weights(_target_images(2), "a", transformer_kwargs={}), ValueError,
         "transformer_kwargs are computed from the images and prompts here"),
        (lambda pipe: pipe.fit_weights(_target_images(2), "a", weighting="snr"), ValueError, "weight every timestep"),
    ],
)  # fmt: skip
def test_bad_fits_through_the_pipeline_change_nothing(call, error, match):
    components = parts.get_dummy_flux_components(0)
    pipe = ScoreFusionFluxPipeline(**{**components, "transformer": FusedTransformer(
        [components["transformer"], parts.get_dummy_flux_transformer(1)], weights=[0.6, 0.4])})  # fmt: skip
    with pytest.raises(error, match=match):
        call(pipe)
    assert pipe.transformer.fusion_weights.tolist() == [0.6, 0.4] and pipe.transformer.config.weights_provenance is None
