"""Bad input to the `scorefusion` command, one row per case (issue 11): each exits with status 2 and one sentence (never
a traceback) naming the file or flag, and writes nothing. The library's rows are in `test_bad_inputs.py`."""

import json
import os

import PIL.Image
import pytest


def _data(root, names=("a.png", "b.png"), metadata=None):
    data = root / "data"
    data.mkdir()
    for name in names:
        PIL.Image.new("RGB", (32, 32), (9, 9, 9)).save(data / name)
        if metadata is None:
            (data / name).with_suffix(".txt").write_text("a photo")
    if metadata is not None:
        (data / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in metadata) + "\n")
    return data


def _fit_argv(root, data, *extra, out="out", members=("--unet", "no-unet"), base="no-base"):
    members = [value if value.startswith("--") else str(root / value) for value in members]
    return ["fit", "--base", str(root / base), *members, "--data", str(data), "--out", str(root / out), "--no-progress",
            *extra]  # fmt: skip


def _base(root, class_name, denoiser):
    """A base folder whose model_index.json names `class_name` and a `denoiser` component (nothing is loaded: the
    refusals below come first)."""
    (root / "base").mkdir()
    index = {"_class_name": class_name, denoiser: ["diffusers", "Model"], "vae": ["diffusers", "AutoencoderKL"]}
    (root / "base" / "model_index.json").write_text(json.dumps(index))


def _fit_on(class_name, denoiser, *extra, members=("--unet", "no-unet")):
    return lambda root: (_base(root, class_name, denoiser),
                         _fit_argv(root, _data(root), *extra, members=members, base="base"))[1]  # fmt: skip


def _outside_name(root):
    PIL.Image.new("RGB", (32, 32)).save(root / "outside.png")
    return _fit_argv(root, _data(root, metadata=[{"file_name": "../outside.png", "text": "x"}]))


def _absolute_name(root):
    PIL.Image.new("RGB", (32, 32)).save(root / "outside.png")
    return _fit_argv(root, _data(root, metadata=[{"file_name": str(root / "outside.png"), "text": "x"}]))


def _linked_outside(root):
    data = _data(root)
    PIL.Image.new("RGB", (32, 32)).save(root / "secret.png")
    os.symlink(root / "secret.png", data / "c.png")
    (data / "c.txt").write_text("x")
    return _fit_argv(root, data)


def _bomb(root, monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # a 32 x 32 image is then a decompression bomb
    return _fit_argv(root, _data(root))


def _foreign_out(root):
    (root / "out").mkdir()
    (root / "out" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return _fit_argv(root, _data(root))


CLI_CASES = [
    ("metadata naming ../outside.png", _outside_name, "'../outside.png' lies outside the data folder"),
    ("metadata naming an absolute path", _absolute_name, "file_name must be a relative path inside the data folder"),
    ("an image linked from outside the data folder", _linked_outside, "'c.png' lies outside the data folder"),
    ("duplicate file_name rows", lambda root: _fit_argv(root, _data(root, names=("a.png",), metadata=[
        {"file_name": "a.png", "text": "x"}, {"file_name": "a.png", "text": "y"}])), "'a.png' is listed twice"),
    ("a decompression bomb", _bomb, "image 'a.png' is refused: Image size"),
    ("an unreadable image", lambda root: (_data(root), (root / "data" / "a.png").write_bytes(b"not a png"),
                                          _fit_argv(root, root / "data"))[2], "image 'a.png' could not be read"),
    ("--device nonsense", lambda root: _fit_argv(root, _data(root), "--device", "nonsense"),
     "--device 'nonsense' is not a torch device"),
    ("--height not a multiple of 8", lambda root: _fit_argv(root, _data(root), "--height", "13"),
     "--height must be a positive multiple of 8"),
    ("--out holding another pipeline", _foreign_out, "is not from a ScoreFusion pipeline save"),
    ("--unet for a Flux base", _fit_on("FluxPipeline", "transformer"),
     "is a FluxPipeline, whose members are transformers: give them with --transformer, not --unet"),
    ("--transformer for a Stable Diffusion base", _fit_on("StableDiffusionPipeline", "unet", members=(
        "--transformer", "a")), "whose members are UNets: give them with --unet, not --transformer"),
    ("both --unet and --transformer", lambda root: _fit_argv(root, _data(root), members=(
        "--unet", "a", "--transformer", "b")),
     "--unet (Stable Diffusion 1/2, XL) or --transformer (SD3, Flux), not both"),
    ("neither --unet nor --transformer", lambda root: _fit_argv(root, _data(root), members=()), "not neither"),
    ("a base without model_index.json", lambda root: _fit_argv(root, _data(root)),
     "is not a Diffusers pipeline (no readable model_index.json)"),
    ("a base of another transformer pipeline", _fit_on("WanPipeline", "transformer", members=("--transformer", "a")),
     "is a 'WanPipeline'; scorefusion takes StableDiffusionPipeline, StableDiffusionXLPipeline"),
    ("--guidance-scale for an SD3 base", _fit_on("StableDiffusion3Pipeline", "transformer", "--guidance-scale", "3",
                                                 members=("--transformer", "a")), "--guidance-scale applies to Flux"),
    ("sample from a folder that is no pipeline", lambda root: ["sample", "--fusion", str(root), "--prompt", "x",
                                                               "--out", str(root / "out")],
     "is not a Diffusers pipeline (no readable model_index.json)"),
    ("sample --num-inference-steps 0", lambda root: ["sample", "--fusion", str(root / "none"), "--prompt", "x",
                                                     "--out", str(root / "out"), "--num-inference-steps", "0"],
     "--num-inference-steps must be >= 1, got 0"),
]  # fmt: skip


@pytest.mark.parametrize("name, make_argv, message", CLI_CASES, ids=[case[0] for case in CLI_CASES])
def test_cli_refuses_with_status_2_a_sentence_and_no_writes(name, make_argv, message, tmp_path, capsys, monkeypatch):
    from diffusers_scorefusion.cli import main

    argv = make_argv(tmp_path, monkeypatch) if make_argv is _bomb else make_argv(tmp_path)
    before = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == before
