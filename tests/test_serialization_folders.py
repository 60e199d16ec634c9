"""Where saves write and what loads accept (issues 8 and 11): beside the user's files as Diffusers does, variants and
`.bin` weights, leftovers of crashed saves, saves by 0.1, Hub configs, integrity checks on pipelines."""

import json
import os
import shutil

import pytest
import torch
from _serialization_checks import check_variant_round_trip
from diffusers import DiffusionPipeline, UNet2DConditionModel

from diffusers_scorefusion import FusedUNet, ScoreFusionPipeline, ScoreFusionXLPipeline
from diffusers_scorefusion.loaders.atomic_save import JOURNAL_NAME
from diffusers_scorefusion.testing.unet_parts import get_dummy_components, get_dummy_unet, get_dummy_xl_components


def _inputs():
    torch.manual_seed(1)
    return torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 7, 32)


def _same(first, second):
    sample, timestep, hidden = _inputs()
    return torch.equal(first(sample, timestep, hidden).sample, second(sample, timestep, hidden).sample)


@pytest.fixture(scope="module")
def fused():
    return FusedUNet([get_dummy_unet(0), get_dummy_unet(1)], weights=[0.3, 0.7])


def _images(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                **kwargs).images  # fmt: skip


def test_saves_write_beside_the_users_files_and_replace_only_their_own(fused, tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('mine')")
    (project / "notes").mkdir()
    monkeypatch.chdir(project)
    bigger = FusedUNet([get_dummy_unet(0), get_dummy_unet(1), get_dummy_unet(2)])
    bigger.save_pretrained(".")
    fused.save_pretrained(".")  # replaces the earlier save, including its third member
    assert sorted(os.listdir(project)) == ["config.json", "member_0.diffusers", "member_1.diffusers", "notes",
                                           "train.py"]  # fmt: skip
    assert (project / "train.py").read_text() == "print('mine')" and os.getcwd() == str(project)
    assert _same(FusedUNet.from_pretrained("."), fused)


def test_save_into_an_existing_empty_folder_and_through_a_link(fused, tmp_path):
    (tmp_path / "empty").mkdir()
    fused.save_pretrained(tmp_path / "empty")
    assert _same(FusedUNet.from_pretrained(tmp_path / "empty"), fused)
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    fused.save_pretrained(tmp_path / "link")
    fused.save_pretrained(tmp_path / "link")
    assert os.path.islink(tmp_path / "link") and "config.json" in os.listdir(tmp_path / "real")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_folder_is_refused_without_leftovers(fused, tmp_path):
    fused.save_pretrained(tmp_path / "fusion")
    os.chmod(tmp_path / "fusion", 0o555)
    try:
        with pytest.raises(PermissionError):
            fused.save_pretrained(tmp_path / "fusion")
        assert sorted(os.listdir(tmp_path / "fusion")) == ["config.json", "member_0.diffusers", "member_1.diffusers"]
    finally:
        os.chmod(tmp_path / "fusion", 0o755)


def test_leftovers_of_crashed_saves_go_with_the_next_save(fused, tmp_path):
    folder = tmp_path / "fusion"
    fused.save_pretrained(folder)
    for name in (".scorefusion-saving-dead", ".scorefusion-old-dead"):
        (folder / name / "member_0.diffusers").mkdir(parents=True)
    (folder / ".scorefusion-journal-dead").write_text("{")
    assert _same(FusedUNet.from_pretrained(folder), fused)  # loads never need them
    fused.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["config.json", "member_0.diffusers", "member_1.diffusers"]


def test_a_save_by_0_1_killed_between_its_renames_is_recovered(fused, tmp_path):
    """0.1 replaced the whole folder: `fusion` moved to `.fusion.old-*/previous`, then the new one moved in."""
    fused.save_pretrained(tmp_path / "saved")
    (tmp_path / ".fusion.old-abc").mkdir()
    shutil.move(tmp_path / "saved", tmp_path / ".fusion.old-abc" / "previous")
    (tmp_path / ".fusion.saving-def" / "member_0").mkdir(parents=True)
    assert _same(FusedUNet.from_pretrained(tmp_path / "fusion"), fused)  # restored from the backup
    fused.save_pretrained(tmp_path / "fusion")
    assert sorted(os.listdir(tmp_path)) == ["fusion"]


def test_an_interrupted_swap_is_completed_by_the_next_load(fused, tmp_path):
    """The state a kill leaves after the commit point: the journal, the old save half moved out."""
    folder = tmp_path / "fusion"
    fused.save_pretrained(folder)
    other = FusedUNet([get_dummy_unet(2), get_dummy_unet(3)], weights=[0.9, 0.1])
    other.save_pretrained(tmp_path / "staged")
    shutil.move(tmp_path / "staged", folder / ".scorefusion-saving-x")
    (folder / ".scorefusion-old-x").mkdir()
    shutil.move(folder / "config.json", folder / ".scorefusion-old-x" / "config.json")
    names = ["config.json", "member_0.diffusers", "member_1.diffusers"]
    (folder / JOURNAL_NAME).write_text(json.dumps({"kind": "FusedUNet save", "staging": ".scorefusion-saving-x",
                                                   "backup": ".scorefusion-old-x", "commit": "config.json",
                                                   "old": names, "new": names}))  # fmt: skip
    with pytest.raises(OSError, match="model_index.json"):  # meanwhile plain Diffusers fails loudly
        DiffusionPipeline.from_pretrained(folder)
    assert _same(FusedUNet.from_pretrained(folder), other)
    assert sorted(os.listdir(folder)) == names


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_variants_and_bin_weights_round_trip_for_fusions(fused, tmp_path, safe_serialization):
    check_variant_round_trip(fused, FusedUNet, UNet2DConditionModel, _same, tmp_path / "fusion", safe_serialization)


def test_lora_fusions_save_bin_weights_and_variants(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = get_dummy_unet(0)
    adapted = get_dummy_unet(0)
    adapted.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights=False))
    lora = {f"unet.{key}": value for key, value in get_peft_model_state_dict(adapted).items()}
    fused = FusedUNet.from_lora(base, [lora, lora], weights=[0.5, 0.5])
    fused.save_pretrained(tmp_path / "fusion", variant="fp16", safe_serialization=False)
    assert sorted(os.listdir(tmp_path / "fusion")) == [
        "config.json", "lora_base_0.fp16.diffusers", "member_0.fp16.diffusers", "member_1.fp16.diffusers"
    ]  # fmt: skip
    # the adapters stay safetensors: their LoRA config (rank, alpha) lives in the header, which a .bin lacks
    assert os.listdir(tmp_path / "fusion" / "member_0.fp16.diffusers") == ["pytorch_lora_weights.safetensors"]
    assert "diffusion_pytorch_model.fp16.bin" in os.listdir(tmp_path / "fusion" / "lora_base_0.fp16.diffusers")
    with torch.no_grad():
        assert _same(FusedUNet.from_pretrained(tmp_path / "fusion"), fused)


@pytest.mark.parametrize("pipeline_class, components", [(ScoreFusionPipeline, get_dummy_components),
                                                         (ScoreFusionXLPipeline, get_dummy_xl_components)])  # fmt: skip
def test_pipelines_save_variants_and_bin_weights_into_an_existing_folder(tmp_path, pipeline_class, components):
    pipe = pipeline_class(**components())
    kwargs = {"height": 32, "width": 32} if pipeline_class is ScoreFusionXLPipeline else {}
    expected = _images(pipe, **kwargs)
    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "README.md").write_text("mine")
    pipe.save_pretrained(folder, variant="fp16", safe_serialization=False)
    unet = folder / "unet"
    assert all("." in name for name in os.listdir(unet))  # Diffusers' variant scan reads name.split(".")[1]
    assert "diffusion_pytorch_model.fp16.bin" in os.listdir(unet / "member_0.fp16.diffusers")
    for loader in (pipeline_class, DiffusionPipeline):
        loaded = loader.from_pretrained(folder, variant="fp16")
        assert type(loaded) is pipeline_class and (_images(loaded, **kwargs) == expected).all()
    assert (folder / "README.md").read_text() == "mine"
    with pytest.raises(ValueError, match="You are trying to load the model files of the `variant=bf16`"):
        pipeline_class.from_pretrained(folder, variant="bf16")


def test_pipeline_loading_options_reach_the_fusion(tmp_path):
    pipe = ScoreFusionPipeline(**get_dummy_components())
    pipe.save_pretrained(tmp_path / "pipe")
    weights = tmp_path / "pipe" / "unet" / "member_1.diffusers" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="member 1 .*does not match the sha256"):
        ScoreFusionPipeline.from_pretrained(tmp_path / "pipe")
    loaded = ScoreFusionPipeline.from_pretrained(tmp_path / "pipe", verify_weights=False)  # the documented way out
    mine, theirs = loaded.unet.unets[1].state_dict(), pipe.unet.unets[1].state_dict()
    assert sum(not torch.equal(mine[key], theirs[key]) for key in mine) == 1  # the flipped bit, loaded unchecked


def test_pipelines_saved_by_0_1_explain_the_variant_scan(tmp_path):
    pipe = ScoreFusionPipeline(**get_dummy_components())
    pipe.save_pretrained(tmp_path / "pipe")
    os.rename(tmp_path / "pipe" / "unet" / "member_0.diffusers", tmp_path / "pipe" / "unet" / "member_0")
    with pytest.raises(ValueError, match="written by diffusers-scorefusion 0.1.*load it without variant="):
        ScoreFusionPipeline.from_pretrained(tmp_path / "pipe", variant="fp16")


def test_a_config_from_the_hub_may_name_only_hub_repos(fused, tmp_path):
    from huggingface_hub import constants

    snapshot = os.path.join(constants.HF_HUB_CACHE, "models--someone--fusion", "snapshots", "0" * 40)
    fused.unets[0].save_pretrained(tmp_path / "unet_0")
    fused.unets[1].save_pretrained(tmp_path / "unet_1")
    sources = [{"pretrained_model_name_or_path": str(tmp_path / f"unet_{i}")} for i in range(2)]
    fused.save_pretrained(snapshot, reference_only=True, member_sources=sources)
    os.makedirs(os.path.join(constants.HF_HUB_CACHE, "models--someone--fusion", "refs"), exist_ok=True)
    with open(os.path.join(constants.HF_HUB_CACHE, "models--someone--fusion", "refs", "main"), "w") as handle:
        handle.write("0" * 40)
    with pytest.raises(ValueError, match="a local path; a fusion config from the Hub may only name Hub repo ids"):
        FusedUNet.from_pretrained("someone/fusion")
    with pytest.raises(ValueError, match="a local path"):  # no flag opens a Hub config to local paths
        FusedUNet.from_pretrained("someone/fusion", allow_outside_paths=True)


class _Payload:
    def __reduce__(self):  # unpickling would create the marker folder
        return (os.makedirs, (os.environ["SCOREFUSION_TEST_MARKER"],))


def test_pickles_that_would_run_code_are_refused_everywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("SCOREFUSION_TEST_MARKER", str(tmp_path / "ran"))
    pipe = ScoreFusionPipeline(**get_dummy_components())
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=False)
    vae = tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.bin"
    torch.save({**torch.load(vae, weights_only=True), "payload": _Payload()}, vae)
    with pytest.raises(OSError, match="the pipeline at .*holds Python objects other than tensors"):
        ScoreFusionPipeline.from_pretrained(tmp_path / "pipe")
    pytest.importorskip("peft")
    lora = tmp_path / "lora"
    lora.mkdir()
    key = "unet.down_blocks.1.attentions.0.proj_in.lora_{}.weight"
    tensors = {key.format("A"): torch.zeros(4, 64), key.format("B"): torch.zeros(64, 4), "payload": _Payload()}
    torch.save(tensors, lora / "pytorch_lora_weights.bin")
    with pytest.raises(OSError, match="LoRA .*holds Python objects other than tensors"):
        FusedUNet.from_lora(get_dummy_unet(0), [lora], allow_pickle=True)
    assert not (tmp_path / "ran").exists()


def test_a_failing_swap_is_undone(fused, tmp_path, monkeypatch):
    """An error (not a crash) half-way through the renames puts the old save back and leaves nothing behind."""
    folder = tmp_path / "fusion"
    fused.save_pretrained(folder)
    (folder / "precious.txt").write_text("mine")
    before = {name: os.path.getmtime(folder / name) for name in os.listdir(folder)}
    calls, replace = [], os.replace

    def failing_replace(source, destination):
        calls.append(source)
        if len(calls) == 4:  # journal, config.json out, member_0 out, then member_1 fails
            raise PermissionError(f"cannot move {source}")
        replace(source, destination)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(PermissionError, match="cannot move"):
        FusedUNet([get_dummy_unet(2), get_dummy_unet(3)]).save_pretrained(folder)
    monkeypatch.setattr(os, "replace", replace)
    assert {name: os.path.getmtime(folder / name) for name in os.listdir(folder)} == before
    assert _same(FusedUNet.from_pretrained(folder), fused)


def test_a_fusion_saved_by_0_1_loads_and_a_new_save_replaces_it(fused, tmp_path):
    """0.1 wrote `member_{i}/` folders and no checksums; a save over it removes them, leaving the user's files."""
    folder = tmp_path / "fusion"
    fused.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    for i, member in enumerate(config["members"]):
        os.rename(folder / member["subfolder"], folder / f"member_{i}")
        member["subfolder"] = f"member_{i}"
        del member["sha256"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "notes.txt").write_text("mine")
    assert _same(FusedUNet.from_pretrained(folder), fused)
    fused.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["config.json", "member_0.diffusers", "member_1.diffusers", "notes.txt"]
