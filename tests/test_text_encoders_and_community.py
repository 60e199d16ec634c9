"""Members with their own text encoders, and loading through Diffusers' community-pipeline mechanism."""

import os

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from diffusers_scorefusion import FusedUNet, ScoreFusionPipeline
from diffusers_scorefusion.testing.unet_parts import get_dummy_components, get_dummy_text_encoder, get_dummy_unet

COMMUNITY = os.path.join(os.path.dirname(__file__), os.pardir, "community", "score_fusion")


def _stock(unet, text_encoder=None):
    components = get_dummy_components(num_members=1)
    components.update(unet=unet, text_encoder=text_encoder or components["text_encoder"])
    components.pop("image_encoder")
    pipe = StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, **kwargs):
    return pipe(["a cat", "a dog"], negative_prompt=["blurry", "dark"], num_inference_steps=2, guidance_scale=6.0,
                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A base pipeline folder and three fine-tune pipeline folders; `b` and `c` trained their own text encoders."""
    root = tmp_path_factory.mktemp("models")
    _stock(get_dummy_unet(0)).save_pretrained(root / "base")
    _stock(get_dummy_unet(1)).save_pretrained(root / "a")
    _stock(get_dummy_unet(2), get_dummy_text_encoder(7)).save_pretrained(root / "b")
    _stock(get_dummy_unet(3), get_dummy_text_encoder(8)).save_pretrained(root / "c")
    return root


@pytest.fixture(scope="module")
def pipe(folders):
    fused_pipe = ScoreFusionPipeline.from_pretrained(folders / "base",
                                                     unets=[folders / "a", folders / "b", folders / "c"],
                                                     weights=[0.2, 0.5, 0.3])  # fmt: skip
    fused_pipe.set_progress_bar_config(disable=True)
    return fused_pipe


def test_members_pick_up_only_differing_text_encoders(pipe):
    assert pipe.unet.config.member_encoder_slots == [0, 1, 2]
    assert len(pipe.unet.text_encoders) == 2
    assert pipe.unet.num_encoder_slots == 3


@pytest.mark.parametrize("member, folder", [(0, "a"), (1, "b"), (2, "c")])
def test_one_hot_matches_the_members_own_pipeline_with_cfg(pipe, folders, member, folder):
    weights = [0.0, 0.0, 0.0]
    weights[member] = 1.0
    stock = StableDiffusionPipeline.from_pretrained(folders / folder)
    stock.set_progress_bar_config(disable=True)
    assert (_images(pipe, fusion_weights=weights) == _images(stock)).all()


def test_each_member_receives_its_own_encoding(pipe):
    """The fused prediction equals the weighted sum of members run on their own encoders' embeddings."""
    positive, _ = pipe.encode_prompt("a cat", torch.device("cpu"), 1, False)
    assert positive.shape[-1] == 3 * 32
    sample = torch.randn(1, 4, 16, 16)
    expected = 0
    for i, encoder in enumerate([pipe.text_encoder, *pipe.unet.text_encoders]):
        ids = pipe.tokenizer("a cat", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids  # fmt: skip
        hidden = encoder(ids)[0]
        expected = expected + pipe.unet.fusion_weights[i] * pipe.unet.unets[i](sample, 50, hidden).sample.double()
    fused = pipe.unet(sample, 50, positive).sample
    assert torch.allclose(fused.double(), expected, atol=1e-5)


def test_embeddings_of_the_wrong_width_are_refused(pipe):
    with pytest.raises(ValueError, match="concatenate 3 encodings of width 32"):
        pipe.unet(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 77, 32))
    with pytest.raises(ValueError, match="pass the prompt as text"):
        pipe(prompt_embeds=torch.randn(1, 77, 32), num_inference_steps=1)


@pytest.mark.parametrize("reference_only", [False, True])
def test_text_encoders_survive_save_and_load(pipe, tmp_path, reference_only):
    pipe.unet.save_pretrained(tmp_path / "fusion", reference_only=reference_only)
    # folder names with a dot, and members outside the folder's parent only with allow_outside_paths (issues 8, 11)
    expected_files = ["config.json"] if reference_only else ["config.json", "member_0.diffusers", "member_1.diffusers",
                                                             "member_2.diffusers", "text_encoder_1.transformers",
                                                             "text_encoder_2.transformers"]  # fmt: skip
    assert sorted(os.listdir(tmp_path / "fusion")) == expected_files
    loaded = FusedUNet.from_pretrained(tmp_path / "fusion", allow_outside_paths=reference_only)
    assert loaded.config.member_encoder_slots == [0, 1, 2]
    reloaded = ScoreFusionPipeline(**{**pipe.components, "unet": loaded})
    reloaded.set_progress_bar_config(disable=True)
    assert (_images(reloaded) == _images(pipe)).all()


@pytest.mark.parametrize("target", ["folder", "file"])
def test_community_pipeline_loads_offline(folders, target):
    custom = os.path.abspath(COMMUNITY if target == "folder" else os.path.join(COMMUNITY, "pipeline.py"))
    fused = FusedUNet([get_dummy_unet(1), get_dummy_unet(2)], weights=[0.4, 0.6])
    loaded = DiffusionPipeline.from_pretrained(
        folders / "base", custom_pipeline=custom, trust_remote_code=True, unet=fused
    )
    assert type(loaded) is ScoreFusionPipeline
    loaded.set_progress_bar_config(disable=True)
    direct = ScoreFusionPipeline.from_pretrained(folders / "base", unet=fused)
    direct.set_progress_bar_config(disable=True)
    assert (_images(loaded) == _images(direct)).all()
