import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffusers_scorefusion import ScoreFusionPipeline
from diffusers_scorefusion.cli import main, read_image_folder
from diffusers_scorefusion.testing.unet_parts import (
    get_dummy_scheduler,
    get_dummy_text_encoder,
    get_dummy_tokenizer,
    get_dummy_unet,
    get_dummy_vae,
)


def write_images(folder, names, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)


def fit_argv(model_folders, data, out, *extra):
    """`scorefusion fit` arguments: the tiny base, members a and b, 2 noise draws, no progress bars."""
    members = ["--unet", str(model_folders / "member_a"), "--unet", str(model_folders / "member_b")]
    return ["fit", "--base", str(model_folders / "base"), *members, "--data", str(data), "--out", str(out),
            "--num-noise-draws", "2", "--no-progress", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = StableDiffusionPipeline(
        vae=get_dummy_vae(),
        text_encoder=get_dummy_text_encoder(),
        tokenizer=get_dummy_tokenizer(),
        unet=get_dummy_unet(0),
        scheduler=get_dummy_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    base.save_pretrained(root / "base")
    for seed, name in ((1, "member_a"), (2, "member_b")):
        get_dummy_unet(seed).save_pretrained(root / name)
    return root


def test_fit_then_sample_from_the_shell(model_folders, tmp_path, capsys):
    data = tmp_path / "data"
    write_images(data, ["one.png", "two.png", "three.jpg"])
    for stem, caption in (("one", "a red cat"), ("two", "a blue dog"), ("three", "a green bird")):
        (data / f"{stem}.txt").write_text(caption)
    out = tmp_path / "fusion"
    status = main(fit_argv(model_folders, data, out, "--num-bootstrap", "10", "--seed", "3"))
    assert status == 0
    assert "weights:" in capsys.readouterr().out
    pipe = ScoreFusionPipeline.from_pretrained(str(out))
    weights = pipe.unet.fusion_weights
    assert weights.shape == (2,) and weights.min() >= 0 and weights.sum().item() == pytest.approx(1, abs=1e-9)
    provenance = pipe.unet.config.weights_provenance
    assert provenance["method"] == "exact" and provenance["num_samples"] == 3 and provenance["seed"] == 3
    assert provenance["data_files"] == ["one.png", "three.jpg", "two.png"] and len(provenance["members"]) == 2

    samples = tmp_path / "samples"
    status = main(
        [
            "sample",
            "--fusion",
            str(out),
            "--prompt",
            "a cat",
            "--out",
            str(samples),
            "--num-images",
            "3",
            "--num-inference-steps",
            "2",
            "--no-progress",
        ]
    )
    assert status == 0
    assert sorted(os.listdir(samples)) == ["grid.png", "metadata.jsonl", "sample_000.png", "sample_001.png",
                                           "sample_002.png"]  # fmt: skip
    with PIL.Image.open(samples / "grid.png") as grid:
        assert grid.size == (3 * 32, 32)


def test_bad_data_fails_cleanly_without_writing(model_folders, tmp_path, capsys):
    data = tmp_path / "data"
    write_images(data, ["one.png"])  # no caption
    out = tmp_path / "fusion"
    arguments = [
        "fit",
        "--base",
        str(model_folders / "base"),
        "--unet",
        str(model_folders / "member_a"),
        "--data",
        str(data),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(arguments) == 2
    assert "has no caption file 'one.txt'" in capsys.readouterr().err
    (data / "one.txt").write_text("a cat")
    write_images(data, ["two.png"])
    (data / "two.txt").write_text("a dog")
    assert main(arguments + ["--timestep-range", "5,2"]) == 2  # fails inside the fit, after loading
    assert "t_min <= t_max" in capsys.readouterr().err
    assert not out.exists() and not [name for name in os.listdir(tmp_path) if name.startswith(".")]


def test_metadata_jsonl_folders(tmp_path):
    write_images(tmp_path, ["b.png", "a.webp"])
    lines = [{"file_name": "b.png", "text": "second"}, {"file_name": "a.webp", "text": "first"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    images, captions, names = read_image_folder(tmp_path)
    assert names == ["a.webp", "b.png"] and captions == ["first", "second"]
    assert all(image.mode == "RGB" and image.size == (32, 32) for image in images)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "missing.png", "text": "x"}))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file": "b.png"}')
    with pytest.raises(ValueError, match="line 1"):
        read_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no captioned images"):
        read_image_folder(tmp_path / "empty")


def test_fitted_weights_are_reproducible_from_the_same_folder(model_folders, tmp_path):
    data = tmp_path / "data"
    write_images(data, ["one.png", "two.png"])
    for stem in ("one", "two"):
        (data / f"{stem}.txt").write_text("a photo")
    outs = []
    for name in ("first", "second"):
        out = tmp_path / name
        assert main(fit_argv(model_folders, data, out, "--num-bootstrap", "0")) == 0
        outs.append(ScoreFusionPipeline.from_pretrained(str(out)).unet)
    assert torch.equal(outs[0].fusion_weights, outs[1].fusion_weights)
    first, second = (unet.config.weights_provenance for unet in outs)
    assert first["data_fingerprint"] == second["data_fingerprint"] and first["loss"] == second["loss"]


def test_fit_resizes_mixed_sizes_and_saves_beside_the_users_files(model_folders, tmp_path):
    data = tmp_path / "data"
    write_images(data, ["big.png"], size=48)
    write_images(data, ["small.png"], size=32)
    for stem in ("big", "small"):
        (data / f"{stem}.txt").write_text("a photo")
    out = tmp_path / "existing"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    argv = fit_argv(model_folders, data, out, "--num-bootstrap", "0")
    assert main(argv) == 2  # mixed sizes: refused unless resized
    assert sorted(os.listdir(out)) == ["precious.txt"]
    assert main(argv + ["--height", "32", "--width", "32"]) == 0
    assert (out / "precious.txt").read_text() == "mine"
    assert "model_index.json" in os.listdir(out) and not [name for name in os.listdir(out) if name.startswith(".")]
    assert ScoreFusionPipeline.from_pretrained(str(out)).unet.config.weights_provenance["num_samples"] == 2


def test_an_sdxl_base_is_fitted_with_the_xl_pipeline(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from diffusers_scorefusion import ScoreFusionXLPipeline
    from diffusers_scorefusion.testing.unet_parts import get_dummy_xl_components, get_dummy_xl_unet

    StableDiffusionXLPipeline(**{**get_dummy_xl_components(), "unet": get_dummy_xl_unet(0)}).save_pretrained(
        tmp_path / "base")
    for seed in (1, 2):
        get_dummy_xl_unet(seed).save_pretrained(tmp_path / f"member_{seed}")
    write_images(tmp_path / "data", ["one.png", "two.png"])
    for stem in ("one", "two"):
        (tmp_path / "data" / f"{stem}.txt").write_text("a photo")
    argv = ["fit", "--base", str(tmp_path / "base"), "--unet", str(tmp_path / "member_1"), "--unet",
            str(tmp_path / "member_2"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "fusion"),
            "--num-noise-draws", "1", "--num-bootstrap", "0", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    loaded = ScoreFusionXLPipeline.from_pretrained(tmp_path / "fusion")
    assert loaded.unet.config.weights_provenance["num_samples"] == 2
