"""Saving and loading fusions: round trips, layouts, atomic saves, and bad input."""

import json
import os
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel

from diffusers_scorefusion import FusedUNet, ScoreFusionPipeline
from diffusers_scorefusion.testing.unet_parts import get_dummy_components, get_dummy_unet


def _inputs(batch=2):
    torch.manual_seed(1)
    return torch.randn(batch, 4, 16, 16), torch.tensor([10, 700]), torch.randn(batch, 7, 32)


def _files(folder):
    """Every file under `folder` with its bytes."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, folder)] = handle.read()
    return found


@pytest.fixture(scope="module")
def fused():
    schedulers = [DDIMScheduler(prediction_type="epsilon"), DDIMScheduler(prediction_type="v_prediction")]
    model = FusedUNet([get_dummy_unet(0), get_dummy_unet(1)], prediction_type="epsilon", member_schedulers=schedulers)
    model.set_weights(
        [[0.25, 0.75], [1.0, 0.0]], timestep_bin_edges=[0, 500, 1000], provenance={"method": "exact", "n": 8}
    )
    return model


def test_round_trip_is_bit_exact_and_members_are_standard_unet_folders(fused, tmp_path):
    fused.save_pretrained(tmp_path / "fusion")
    assert sorted(os.listdir(tmp_path / "fusion")) == ["config.json", "member_0.diffusers", "member_1.diffusers"]
    loaded = FusedUNet.from_pretrained(tmp_path / "fusion")
    for key in ("weights", "timestep_bin_edges", "prediction_type", "member_prediction_types", "noise_schedule",
                "weights_provenance", "num_members"):  # fmt: skip
        assert loaded.config[key] == fused.config[key], key
    sample, timestep, hidden = _inputs()
    assert torch.equal(loaded(sample, timestep, hidden).sample, fused(sample, timestep, hidden).sample)
    member = UNet2DConditionModel.from_pretrained(tmp_path / "fusion" / "member_1.diffusers")
    for (name, mine), theirs in zip(member.state_dict().items(), fused.unets[1].state_dict().values()):
        assert torch.equal(mine, theirs), name


def test_torch_dtype_and_variant(fused, tmp_path):
    fused.save_pretrained(tmp_path / "fusion", variant="fp16")
    assert os.path.isfile(tmp_path / "fusion" / "member_0.fp16.diffusers" / "diffusion_pytorch_model.fp16.safetensors")
    loaded = FusedUNet.from_pretrained(tmp_path / "fusion", torch_dtype=torch.float16)
    assert loaded.dtype == torch.float16
    assert all(unet.dtype == torch.float16 for unet in loaded.unets)


def test_reference_only_layout_resolves_members_by_path(tmp_path):
    for i in range(2):
        get_dummy_unet(i).save_pretrained(tmp_path / f"unet_{i}")
    components = get_dummy_components()
    base = ScoreFusionPipeline(**{**components, "unet": FusedUNet([get_dummy_unet(0)])})
    base.save_pretrained(tmp_path / "base")
    pipe = ScoreFusionPipeline.from_pretrained(tmp_path / "base",
                                               unets=[str(tmp_path / "unet_0"), str(tmp_path / "unet_1")],
                                               weights=[0.3, 0.7])  # fmt: skip
    pipe.unet.save_pretrained(tmp_path / "ref", reference_only=True)
    assert os.listdir(tmp_path / "ref") == ["config.json"]
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert config["members"][1]["pretrained_model_name_or_path"] == str(tmp_path / "unet_1")
    loaded = FusedUNet.from_pretrained(tmp_path / "ref")
    sample, timestep, hidden = _inputs()
    assert torch.equal(loaded(sample, timestep, hidden).sample, pipe.unet(sample, timestep, hidden).sample)
    assert loaded.member_sources[0]["pretrained_model_name_or_path"] == str(tmp_path / "unet_0")


def test_reference_only_needs_sources_for_modules(fused, tmp_path):
    with pytest.raises(ValueError, match="member 0 has no recorded source"):
        fused.save_pretrained(tmp_path / "ref", reference_only=True)
    fused.unets[0].save_pretrained(tmp_path / "a")
    fused.unets[1].save_pretrained(tmp_path / "b")
    sources = [{"pretrained_model_name_or_path": str(tmp_path / name)} for name in ("a", "b")]
    fused.save_pretrained(tmp_path / "ref", reference_only=True, member_sources=sources)
    loaded = FusedUNet.from_pretrained(tmp_path / "ref")
    sample, timestep, hidden = _inputs()
    assert torch.equal(loaded(sample, timestep, hidden).sample, fused(sample, timestep, hidden).sample)


def test_pipeline_round_trip_through_both_loaders(tmp_path):
    pipe = ScoreFusionPipeline(**get_dummy_components(num_members=3, weights=[0.2, 0.5, 0.3]))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers_scorefusion.models.modeling_fused_unet", "FusedUNet"]
    expected = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    # a pipeline saved by 0.1 names the module path FusedUNet had then; it must keep loading
    shutil.copytree(tmp_path / "pipe", tmp_path / "pipe_v01", dirs_exist_ok=True)
    old_index = {**index, "unet": ["diffusers_scorefusion.modeling_fused_unet", "FusedUNet"]}
    (tmp_path / "pipe_v01" / "model_index.json").write_text(json.dumps(old_index))
    for loader, folder in ((ScoreFusionPipeline, "pipe"), (DiffusionPipeline, "pipe"), (DiffusionPipeline, "pipe_v01")):
        loaded = loader.from_pretrained(tmp_path / folder)
        assert type(loaded) is ScoreFusionPipeline
        loaded.set_progress_bar_config(disable=True)
        images = loaded(
            "a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images
        assert (images == expected).all()


def test_failing_save_leaves_previous_save_intact(fused, tmp_path, monkeypatch):
    target = tmp_path / "fusion"
    fused.save_pretrained(target)
    before = _files(target)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fused.unets[1], "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        fused.save_pretrained(target)
    monkeypatch.setattr(fused.unets[1], "save_pretrained", KeyboardInterruptRaiser())
    with pytest.raises(KeyboardInterrupt):
        fused.save_pretrained(target)
    assert _files(target) == before
    assert os.listdir(tmp_path) == ["fusion"]  # no staging folders left behind


class KeyboardInterruptRaiser:
    def __call__(self, *args, **kwargs):
        raise KeyboardInterrupt


def test_failing_pipeline_save_leaves_previous_save_intact(tmp_path, monkeypatch):
    pipe = ScoreFusionPipeline(**get_dummy_components())
    pipe.save_pretrained(tmp_path / "pipe")
    before = _files(tmp_path / "pipe")
    monkeypatch.setattr(pipe.vae, "save_pretrained", KeyboardInterruptRaiser())
    with pytest.raises(KeyboardInterrupt):
        pipe.save_pretrained(tmp_path / "pipe")
    assert _files(tmp_path / "pipe") == before
    assert os.listdir(tmp_path) == ["pipe"]


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def saved(fused, tmp_path):
    fused.save_pretrained(tmp_path / "fusion")
    return tmp_path / "fusion"


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"weights": [[0.5, 0.6], [1.0, 0.0]]}, "must sum to 1"),
        ({"weights": [[-0.5, 1.5], [1.0, 0.0]]}, "must be >= 0"),
        ({"weights": [[float("nan"), 1.0], [1.0, 0.0]]}, "must be finite"),
        ({"weights": [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]}, "must have 2 entries per row"),
        ({"weights": "0.5,0.5"}, "weights must be"),
        ({"num_members": "2"}, "num_members must be"),
        ({"num_members": 3}, "members has 2 entries but num_members is 3"),
        ({"surprise": 1}, r"unknown keys \['surprise'\]"),
        ({"_class_name": "UNet2DConditionModel"}, "is not a FusedUNet config"),
        ({"prediction_type": "noise"}, "prediction_type must be one of"),
    ],
)
def test_malformed_config_is_refused(saved, changes, message):
    _edit_config(saved, **changes)
    with pytest.raises(ValueError, match=message):
        FusedUNet.from_pretrained(saved)


def test_missing_key_and_broken_json(saved):
    config = json.loads((saved / "config.json").read_text())
    del config["members"]
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing the key 'members'"):
        FusedUNet.from_pretrained(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises((ValueError, EnvironmentError)):
        FusedUNet.from_pretrained(saved)


def test_member_config_mismatch_is_refused(saved):
    config = json.loads((saved / "config.json").read_text())
    config["members"][1]["config"]["layers_per_block"] = 2
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="member 1's config does not match the recorded one: layers_per_block"):
        FusedUNet.from_pretrained(saved)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_weights_are_refused(saved, damage):
    weights = saved / "member_1.diffusers" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64 + os.urandom(256))
    # the checksum recorded at save time names the file (issue 11); without it the reader still refuses it
    with pytest.raises(ValueError, match="member 1 .*diffusion_pytorch_model.safetensors does not match the sha256"):
        FusedUNet.from_pretrained(saved)
    with pytest.raises(ValueError, match="could not load member 1"):
        FusedUNet.from_pretrained(saved, verify_weights=False)


def test_missing_member_is_refused(saved, tmp_path):
    config = json.loads((saved / "config.json").read_text())
    config["members"][0].update(pretrained_model_name_or_path=str(tmp_path / "nowhere"), subfolder=None)
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="could not load member 0 from .*nowhere"):
        FusedUNet.from_pretrained(saved)


def test_bin_members_load_with_weights_only_and_allow_pickle_false_refuses_them(fused, tmp_path):
    # Changed by issue 8: `.bin` weights load by default, as Diffusers loads them (torch's weights_only=True loader);
    # allow_pickle=False now means "safetensors only".
    fused.save_pretrained(tmp_path / "fusion", safe_serialization=False)
    member = tmp_path / "fusion" / "member_0.diffusers"
    assert sorted(os.listdir(member)) == ["config.json", "diffusion_pytorch_model.bin"]
    loaded = FusedUNet.from_pretrained(tmp_path / "fusion")
    sample, timestep, hidden = _inputs()
    assert torch.equal(loaded(sample, timestep, hidden).sample, fused(sample, timestep, hidden).sample)
    with pytest.raises(ValueError, match="only safetensors were read: allow_pickle=False"):
        FusedUNet.from_pretrained(tmp_path / "fusion", allow_pickle=False)


def test_unknown_load_kwargs_are_refused(fused, saved, tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        FusedUNet.from_pretrained(saved, weights_only=False)
    with pytest.raises(ValueError, match="contradicts use_safetensors=False"):
        FusedUNet.from_pretrained(saved, allow_pickle=False, use_safetensors=False)


def test_push_to_hub_uploads_the_saved_folder(fused, tmp_path, monkeypatch):
    import huggingface_hub

    uploaded = {}

    class Repo:
        repo_id = "someone/fusion"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: Repo())

    def upload_folder(repo_id, folder_path, **kwargs):
        uploaded.update(repo_id=repo_id, files=sorted(_files(folder_path)))

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    fused.unets[0].save_pretrained(tmp_path / "a")
    fused.unets[1].save_pretrained(tmp_path / "b")
    sources = [{"pretrained_model_name_or_path": str(tmp_path / name)} for name in ("a", "b")]
    assert fused.push_to_hub("someone/fusion", reference_only=True, member_sources=sources) == "someone/fusion"
    assert uploaded == {"repo_id": "someone/fusion", "files": ["config.json"]}


def test_device_map_per_member(saved):
    loaded = FusedUNet.from_pretrained(saved, device_map=["cpu", "cpu"])
    assert all(param.device.type == "cpu" for param in loaded.parameters())
    with pytest.raises(ValueError, match="device_map as a list must hold 2 entries"):
        FusedUNet.from_pretrained(saved, device_map=["cpu"])


def test_xl_pipeline_round_trip_and_atomic_save(tmp_path, monkeypatch):
    from diffusers_scorefusion import ScoreFusionXLPipeline
    from diffusers_scorefusion.testing.unet_parts import get_dummy_xl_components

    pipe = ScoreFusionXLPipeline(**get_dummy_xl_components(num_members=2))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "xl")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "xl")
    assert type(loaded) is ScoreFusionXLPipeline
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    expected = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (loaded("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images == expected).all()
    before = _files(tmp_path / "xl")
    monkeypatch.setattr(pipe.unet.unets[1], "save_pretrained", KeyboardInterruptRaiser())
    with pytest.raises(KeyboardInterrupt):
        pipe.save_pretrained(tmp_path / "xl")
    assert _files(tmp_path / "xl") == before
