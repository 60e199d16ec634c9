"""ScoreFusionXLPipeline: one-member and one-hot fusions reproduce the stock SDXL pipeline; loading; fitting; errors."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from diffusers_scorefusion import FusedUNet, ScoreFusionXLPipeline, fitting
from diffusers_scorefusion.testing.unet_parts import (
    get_dummy_scheduler,
    get_dummy_unet,
    get_dummy_xl_components,
    get_dummy_xl_unet,
)

CALL = dict(prompt="a cat", negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
            output_type="np")  # fmt: skip


def stock_pipeline(components, unet):
    return StableDiffusionXLPipeline(**{**components, "unet": unet}).to("cpu")


def images_of(pipe, seed=0, **kwargs):
    return pipe(**{**CALL, **kwargs}, generator=torch.Generator().manual_seed(seed)).images


def test_one_member_fusion_matches_stock_pipeline():
    components = get_dummy_xl_components(num_members=1)
    fused = components["unet"]
    expected = images_of(stock_pipeline(components, fused.unets[0]))
    actual = images_of(ScoreFusionXLPipeline(**components))
    assert expected.shape == (1, 32, 32, 3) and np.abs(expected).max() > 0
    np.testing.assert_array_equal(actual, expected)


def test_one_hot_fusion_weights_match_member_pipeline():
    components = get_dummy_xl_components(num_members=2)
    pipe = ScoreFusionXLPipeline(**components)
    expected = images_of(stock_pipeline(components, components["unet"].unets[1]))
    np.testing.assert_array_equal(images_of(pipe, fusion_weights=[0.0, 1.0]), expected)
    mixed = images_of(pipe)  # the stored uniform weights apply again after the call
    assert np.abs(mixed - expected).max() > 1e-3
    assert pipe.unet.fusion_weights.tolist() == [0.5, 0.5]


def test_from_pretrained_with_local_folders(tmp_path):
    components = get_dummy_xl_components(num_members=2)
    members = components["unet"].unets
    stock_pipeline(components, members[0]).save_pretrained(tmp_path / "base")
    for i, unet in enumerate(members):
        unet.save_pretrained(tmp_path / f"member_{i}")
    members_dirs = [tmp_path / "member_0", tmp_path / "member_1"]
    pipe = ScoreFusionXLPipeline.from_pretrained(tmp_path / "base", unets=members_dirs, weights=[0.25, 0.75])
    assert isinstance(pipe.unet, FusedUNet) and pipe.unet.fusion_weights.tolist() == [0.25, 0.75]
    reference = ScoreFusionXLPipeline(**{**components, "unet": FusedUNet(list(members), weights=[0.25, 0.75])})
    np.testing.assert_allclose(images_of(pipe), images_of(reference), atol=1e-6)


def test_fit_weights_uses_the_sampling_conditioning():
    components = get_dummy_xl_components(num_members=2)
    pipe = ScoreFusionXLPipeline(**components)
    seen = {}
    hook = pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    pipe(prompt="a cat", num_inference_steps=1, guidance_scale=1.0, height=32, width=32, output_type="latent")
    hook.remove()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    latents, prompt_embeds, added = pipe.encode_for_fitting(images, "a cat")
    assert latents.shape == (2, 4, 16, 16) and prompt_embeds.shape == (2, *seen["encoder_hidden_states"].shape[1:])
    # batch 2 here, 1 while sampling: equal up to float32 rounding
    torch.testing.assert_close(prompt_embeds[:1], seen["encoder_hidden_states"], rtol=0, atol=1e-6)
    torch.testing.assert_close(added["text_embeds"][:1], seen["added_cond_kwargs"]["text_embeds"], rtol=0, atol=1e-6)
    torch.testing.assert_close(added["time_ids"], torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2), rtol=0, atol=0)
    torch.testing.assert_close(added["time_ids"][:1], seen["added_cond_kwargs"]["time_ids"], rtol=0, atol=0)
    options = dict(num_noise_draws=2, num_bootstrap=0, progress_bar=False)
    result = pipe.fit_weights(images, "a cat", generator=torch.Generator().manual_seed(1), **options)
    direct = fitting.fit_weights(pipe.unet, pipe.scheduler, latents, encoder_hidden_states=prompt_embeds,
                                 unet_kwargs={"added_cond_kwargs": added}, set_weights=False,
                                 generator=torch.Generator().manual_seed(1), **options)  # fmt: skip
    torch.testing.assert_close(result.weights, direct.weights, rtol=0, atol=0)
    stored = pipe.unet.fusion_weights
    torch.testing.assert_close(stored, result.weights.to(stored), rtol=0, atol=1e-12)
    assert abs(float(result.weights.sum()) - 1) < 1e-6 and result.num_forward_passes > 0


def test_bad_input_is_refused(tmp_path):
    components = get_dummy_xl_components(num_members=2)
    plain = ScoreFusionXLPipeline(**{**components, "unet": get_dummy_xl_unet(0)})  # works as the stock pipeline
    with pytest.raises(TypeError, match="fusion_weights=\\[1.0\\] needs a FusedUNet as `unet`"):
        plain(**CALL, fusion_weights=[1.0])
    with pytest.raises(ValueError, match="addition_embed_type='text_time'.*got addition_embed_type=None"):
        ScoreFusionXLPipeline(**{**components, "unet": FusedUNet([get_dummy_unet(0, cross_attention_dim=64)])})
    with pytest.raises(ValueError, match="prediction_type is 'v_prediction' but the FusedUNet outputs 'epsilon'"):
        ScoreFusionXLPipeline(**{**components, "scheduler": get_dummy_scheduler(prediction_type="v_prediction")})
    with pytest.raises(ValueError, match="weights= needs unets="):
        ScoreFusionXLPipeline.from_pretrained(tmp_path, weights=[1.0])
    with pytest.raises(ValueError, match="either unet= .* or unets="):
        ScoreFusionXLPipeline.from_pretrained(tmp_path, unets=[get_dummy_xl_unet(0)], unet=components["unet"])
    pipe = ScoreFusionXLPipeline(**components)
    with pytest.raises(ValueError, match="fusion_weights must sum to 1"):
        pipe(**CALL, fusion_weights=[0.5, 0.6])
    with pytest.raises(ValueError, match="got 2 images but 3 prompts"):
        pipe.fit_weights(torch.rand(2, 3, 32, 32), ["a", "b", "c"])
    with pytest.raises(ValueError, match="unet_kwargs are computed"):
        pipe.fit_weights(torch.rand(2, 3, 32, 32), "a", unet_kwargs={})
