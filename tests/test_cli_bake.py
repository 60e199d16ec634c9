"""`scorefusion bake` from the shell: LoRA fusions to one LoRA (Diffusers or Kohya keys) or to adapters plus a weight
schedule, full fine-tunes to the stock pipeline; bad input exits 2 with one sentence and writes nothing."""

import copy
import json

import numpy as np
import PIL.Image
import pytest
import torch
from _bake_loras import save_lora_folders
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from diffusers_scorefusion import FusedUNet, LoraMember, ScoreFusionPipeline
from diffusers_scorefusion.cli import main
from diffusers_scorefusion.testing.unet_parts import get_dummy_components

WEIGHTS = [0.5, 0.2, 0.3]
CALL = dict(prompt="a photo", num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="np")


def images(pipe, **kwargs):
    return pipe(**CALL, **kwargs, generator=torch.Generator().manual_seed(0)).images


def _plain_components():
    components = get_dummy_components(num_members=1)
    components["unet"] = components["unet"].unets[0]
    return components


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Saved fusion pipelines: LoRA (weights one row), LoRA (a table), full fine-tunes, LoRAs of two bases."""
    root = tmp_path_factory.mktemp("fusions")
    components = _plain_components()
    base = components["unet"]
    folders = save_lora_folders(base, root)
    lora = FusedUNet.from_lora(copy.deepcopy(base), folders, weights=WEIGHTS)
    ScoreFusionPipeline(**{**components, "unet": lora}).save_pretrained(root / "lora")
    lora.set_weights([[0.6, 0.1, 0.3], [0.1, 0.7, 0.2]], timestep_bin_edges=[0, 500, 1000])
    ScoreFusionPipeline(**{**components, "unet": lora}).save_pretrained(root / "lora_table")
    full = get_dummy_components(num_members=3, weights=WEIGHTS)
    ScoreFusionPipeline(**full).save_pretrained(root / "full")
    full["unet"].set_weights([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], timestep_bin_edges=[0, 500, 1000])
    ScoreFusionPipeline(**full).save_pretrained(root / "full_table")
    other = FusedUNet.from_lora(copy.deepcopy(base), folders[:1], adapter_names=["other"])
    split = FusedUNet([lora.unets[0], LoraMember(other.unets[0].base, "other")])
    ScoreFusionPipeline(**{**components, "unet": split}).save_pretrained(root / "two_bases")
    StableDiffusionPipeline(**components).save_pretrained(root / "plain")
    return root, components, folders, full


def bake(root, name, out, *extra):
    return main(["bake", "--fusion", str(root / name), "--out", str(out), "--no-progress", *extra])


def test_bake_lora_fusion_gives_the_stock_pipeline_with_the_k_loras(saved, tmp_path):
    root, components, folders, _ = saved
    assert bake(root, "lora", tmp_path / "baked") == 0
    assert bake(root, "lora", tmp_path / "kohya", "--format", "kohya", "--rank", "9") == 0
    reference = StableDiffusionPipeline(**{**components, "unet": copy.deepcopy(components["unet"])})
    for i, folder in enumerate(folders):
        reference.load_lora_weights(folder, adapter_name=f"m{i}")
    reference.set_adapters(["m0", "m1", "m2"], adapter_weights=WEIGHTS)
    expected = images(reference)
    for out, weight_name in (("baked", None), ("kohya", "lora_kohya.safetensors")):
        pipe = StableDiffusionPipeline(**{**components, "unet": copy.deepcopy(components["unet"])})
        pipe.load_lora_weights(str(tmp_path / out), **({"weight_name": weight_name} if weight_name else {}))
        np.testing.assert_allclose(images(pipe), expected, atol=2e-5)
    record = json.loads((tmp_path / "kohya" / "bake.json").read_text())
    assert record["rank"] == 9 and record["method"] == "merge" and max(record["relative_errors"].values()) < 1e-5
    assert bake(root, "lora", tmp_path / "baked", "--rank", "2") == 0  # a second bake replaces the first
    assert json.loads((tmp_path / "baked" / "bake.json").read_text())["rank"] == 2


def test_bake_lora_table_writes_adapters_and_schedule(saved, tmp_path):
    root, components, _, _ = saved
    assert bake(root, "lora_table", tmp_path / "baked") == 0
    names = sorted(p.name for p in (tmp_path / "baked").iterdir())
    assert names == ["adapter_0", "adapter_1", "adapter_2", "adapter_weight_schedule.json", "bake.json"]
    assert bake(root, "lora_table", tmp_path / "row", "--row", "1") == 0
    assert json.loads((tmp_path / "row" / "bake.json").read_text())["weights"] == pytest.approx([0.1, 0.7, 0.2])


def test_bake_full_fine_tunes_gives_the_stock_pipeline(saved, tmp_path):
    root, _, _, full = saved
    assert bake(root, "full", tmp_path / "baked") == 0
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "baked")
    assert type(pipe) is StableDiffusionPipeline
    for name, value in pipe.unet.state_dict().items():
        expected = sum(w * unet.state_dict()[name] for w, unet in zip(WEIGHTS, full["unet"].unets))
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-6)


def _target_data(root):
    """Four captioned 32x32 images: the target data of merge-refit and distill."""
    folder = root / "target_data"
    if not folder.is_dir():
        folder.mkdir()
        for i in range(4):
            pixels = (np.random.default_rng(i).random((32, 32, 3)) * 255).astype(np.uint8)
            PIL.Image.fromarray(pixels).save(folder / f"image_{i}.png")
            (folder / f"image_{i}.txt").write_text("a photo")
    return str(folder)


def test_bake_merge_refit_merges_the_refit_weights_and_records_them(saved, tmp_path):
    root, _, _, full = saved
    assert bake(root, "full", tmp_path / "baked", "--method", "merge-refit", "--data", _target_data(tmp_path)) == 0
    record = json.loads((tmp_path / "baked" / "bake.json").read_text())
    provenance = record["provenance"]
    assert record["method"] == "merge-refit" and provenance["target"] == "merge"
    refit = provenance["merge_refit"]
    assert refit["loss"] <= refit["start_loss"]  # never worse than the exact QP's weights, for the merged model
    weights = record["weights"]
    assert abs(sum(weights) - 1) < 1e-9 and min(weights) >= 0
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "baked")
    assert type(pipe) is StableDiffusionPipeline
    for name, value in pipe.unet.state_dict().items():
        expected = sum(w * unet.state_dict()[name] for w, unet in zip(weights, full["unet"].unets))
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-6)


def test_bake_distill_writes_a_stock_pipeline_or_a_lora(saved, tmp_path):
    root, components, _, full = saved
    data = _target_data(tmp_path)
    short = ["--method", "distill", "--data", data, "--max-steps", "4", "--num-generated", "2"]
    assert bake(root, "full", tmp_path / "merged_student", *short) == 0
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "merged_student")
    assert type(pipe) is StableDiffusionPipeline
    assert json.loads((tmp_path / "merged_student" / "bake.json").read_text())["method"] == "distill"
    assert np.isfinite(images(pipe)).all()
    assert bake(root, "lora", tmp_path / "lora_student", *short, "--rank", "2") == 0
    stock = StableDiffusionPipeline(**copy.deepcopy(components))
    stock.load_lora_weights(str(tmp_path / "lora_student"))
    ranks = {module.r["default_0"] for module in stock.unet.modules() if hasattr(module, "r") and module.r}
    assert ranks == {2}
    assert np.isfinite(images(stock)).all()


def _empty_data(root):
    (root / "empty").mkdir(exist_ok=True)
    return str(root / "empty")


def _foreign(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "pytorch_lora_weights.safetensors").write_bytes(b"mine")


BAD = [
    ("rank above the members' total", "lora", ["--rank", "10"],
     "rank must be an integer from 1 to the members' total rank 9 (ranks [2, 4, 3]), got 10"),
    ("members of two bases", "two_bases", [], "the members do not share a base"),
    ("kohya for full fine-tunes", "full", ["--format", "kohya"], "--format kohya writes LoRA files"),
    ("rank for full fine-tunes", "full", ["--rank", "2"], "--rank applies to LoRA fusions"),
    ("a bin table for full fine-tunes", "full_table", [], "pass --row N to merge bin N's weights"),
    ("a bin table with --rank", "lora_table", ["--rank", "2"], "drop --rank and --format kohya, or pass --row N"),
    ("--row out of range", "full_table", ["--row", "5"], "row must be an integer from 0 to 1, got 5"),
    ("--data for merge", "lora", ["--data", "x"], "--data is read by --method merge-refit and distill"),
    ("merge-refit without --data", "lora", ["--method", "merge-refit"], "--method merge-refit needs --data"),
    ("distill on a data folder without images", "lora", ["--method", "distill", "--data", _empty_data],
     "holds no captioned images"),
    ("a plain pipeline", "plain", [], "holds a 'UNet2DConditionModel' as unet, not a fusion"),
    ("--out holding the user's file", "lora", [_foreign], "already holds ['pytorch_lora_weights.safetensors']"),
    ("--max-steps for merge", "full", ["--max-steps", "3"], "--max-steps applies to --method distill"),
    ("--num-generated below 0", "full", ["--method", "distill", "--data", _empty_data, "--num-generated", "-1"],
     "--num-generated must be >= 0, got -1"),
]  # fmt: skip


@pytest.mark.parametrize("name, fusion, extra, message", BAD, ids=[case[0] for case in BAD])
def test_bake_refuses_with_status_2_a_sentence_and_no_writes(name, fusion, extra, message, saved, tmp_path, capsys):
    root = saved[0]
    argv = []
    for item in extra:
        if callable(item):
            result = item(tmp_path)
            argv += [result] if result else []
        else:
            argv.append(item)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert bake(root, fusion, tmp_path / "out", *argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after Diffusers' loading bar, where there is one
    assert error.startswith("scorefusion bake: error: ") and message in error and "\n" not in error
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
