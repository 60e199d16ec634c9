"""Regional weights: per-member masks, bit for bit per fusion class, bins, saving, refusals."""

import pytest
import torch

from diffusers_scorefusion import FusedTransformer, FusedUNet, ScoreFusionPipeline
from diffusers_scorefusion.fusion.regional_utils import check_weights_or_masks, masks_to_resolution, masks_to_tokens
from diffusers_scorefusion.testing.transformer_parts import get_dummy_flux_transformer
from diffusers_scorefusion.testing.unet_parts import get_dummy_components, get_dummy_unet


def halves(height, width):
    """Member 0 on the left half, member 1 on the right: `(2, H, W)`."""
    left = torch.zeros(height, width, dtype=torch.float64)
    left[:, : width // 2] = 1.0
    return torch.stack([left, 1 - left])


@pytest.fixture(scope="module")
def unets():
    return [get_dummy_unet(seed) for seed in range(2)]


def _unet_inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=generator), torch.tensor(500), torch.randn(2, 7, 32, generator=generator)


def _run_unet(model):
    sample, timestep, text = _unet_inputs()
    with torch.no_grad():
        return model(sample, timestep, encoder_hidden_states=text, return_dict=False)[0]


@pytest.mark.parametrize("size", [16, 32, 128])  # the latents' resolution, 2x and 8x (the image's for SD's VAE)
def test_unet_half_masks_give_each_member_its_half_bit_for_bit(unets, size):
    member_outputs = [_run_unet(unet) for unet in unets]
    fused = _run_unet(FusedUNet(unets, weights=halves(size, size)))
    assert torch.equal(fused[..., :8], member_outputs[0][..., :8])
    assert torch.equal(fused[..., 8:], member_outputs[1][..., 8:])


def test_uniform_masks_equal_the_scalar_weights_bit_for_bit(unets):
    masks = torch.tensor([0.3, 0.7], dtype=torch.float64)[:, None, None].expand(2, 16, 16)
    assert torch.equal(_run_unet(FusedUNet(unets, weights=masks)), _run_unet(FusedUNet(unets, weights=[0.3, 0.7])))
    fusion = FusedUNet(unets, weights=[0.3, 0.7])
    with fusion.override_weights(halves(16, 16)):  # per call, on a fusion with scalar weights
        assert torch.equal(_run_unet(fusion)[..., :8], _run_unet(unets[0])[..., :8])


def _flux_inputs():
    generator = torch.Generator().manual_seed(0)
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(4).repeat_interleave(4), torch.arange(4).repeat(4)
    return dict(hidden_states=torch.randn(2, 16, 4, generator=generator),
                encoder_hidden_states=torch.randn(2, 6, 32, generator=generator),
                pooled_projections=torch.randn(2, 32, generator=generator), timestep=torch.full((2,), 0.6),
                img_ids=img_ids, txt_ids=torch.zeros(6, 3), return_dict=False)  # fmt: skip


@pytest.mark.parametrize("size", [4, 8, 64])  # the token grid, the latents (2x: Flux packs 2x2) and the image (16x)
def test_packed_token_transformer_half_masks_bit_for_bit(size):
    members = [get_dummy_flux_transformer(seed) for seed in range(2)]
    with torch.no_grad():
        outputs = [member(**_flux_inputs())[0] for member in members]
        fused = FusedTransformer(members, weights=halves(size, size))(**_flux_inputs())[0]  # (B, 16 tokens, C)
    left = torch.arange(16) % 4 < 2  # row-major 4 x 4 token grid: columns 0 and 1
    assert torch.equal(fused[:, left], outputs[0][:, left]) and torch.equal(fused[:, ~left], outputs[1][:, ~left])
    uniform = torch.full((2, size, size), 0.5, dtype=torch.float64)
    with torch.no_grad():
        scalar = FusedTransformer(members, weights=[0.5, 0.5])(**_flux_inputs())[0]
        assert torch.equal(FusedTransformer(members, weights=uniform)(**_flux_inputs())[0], scalar)


def test_masks_combine_with_timestep_bins(unets):
    table = torch.stack([halves(16, 16), halves(16, 16).flip(0)])  # bin 0 (t < 500): left member 0; bin 1: mirrored
    fused = FusedUNet(unets, weights=table, timestep_bin_edges=[0, 500, 1000])
    sample, _, text = _unet_inputs()
    with torch.no_grad():
        late = fused(sample, torch.tensor(700), encoder_hidden_states=text, return_dict=False)[0]
        member1 = unets[1](sample, torch.tensor(700), encoder_hidden_states=text, return_dict=False)[0]
    assert torch.equal(late[..., :8], member1[..., :8])  # bin 1: member 1 on the left
    assert fused.fusion_weights.shape == (2, 2, 16, 16)


def test_stored_masks_round_trip_through_save_and_load(unets, tmp_path):
    masks = halves(32, 32) * 0.6 + 0.2  # values 0.8 / 0.2, summing to 1
    fused = FusedUNet(unets, weights=masks)
    fused.save_pretrained(tmp_path / "fusion")
    loaded = FusedUNet.from_pretrained(tmp_path / "fusion")
    assert torch.equal(loaded.fusion_weights, masks)
    assert torch.equal(_run_unet(loaded), _run_unet(fused))


def test_bad_masks_get_one_sentence(unets):
    with pytest.raises(ValueError, match="sum to 1 over the members at every position"):
        FusedUNet(unets, weights=halves(8, 8) * 0.9)
    negative = halves(8, 8)
    negative[0, 0, 0], negative[1, 0, 0] = -0.5, 1.5
    with pytest.raises(ValueError, match=r">= 0 everywhere, got -0.5 at \(bin, member, y, x\) = \(0, 0, 0, 0\)"):
        FusedUNet(unets, weights=negative)
    with pytest.raises(ValueError, match="k = 2 members"):
        check_weights_or_masks(torch.ones(3, 8, 8) / 3, 2)
    with pytest.raises(ValueError, match=r"fit neither the latents' resolution \(16, 16\)"):
        _run_unet(FusedUNet(unets, weights=halves(24, 24)))
    with pytest.raises(ValueError, match="cannot be mapped to 16 tokens"):
        masks_to_tokens(halves(6, 6), 16)
    with pytest.raises(ValueError, match="fit neither"):
        masks_to_resolution(halves(32, 16), (16, 16))  # 2x in height, 1x in width


def test_pipeline_takes_image_resolution_masks_per_call():
    pipe = ScoreFusionPipeline(**get_dummy_components())
    pipe.set_progress_bar_config(disable=True)

    def run(weights):
        return pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="latent", fusion_weights=weights,
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    regional, first, second = run(halves(32, 32)), run([1.0, 0.0]), run([0.0, 1.0])
    assert regional.shape == first.shape and torch.isfinite(regional).all()
    assert not torch.equal(regional, first) and not torch.equal(regional, second)
