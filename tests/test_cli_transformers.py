"""`scorefusion fit` / `sample` with SD3 and Flux bases (members given with `--transformer`), on tiny local
pipelines."""

import os

import PIL.Image
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from test_cli import write_images  # noqa: E402

from diffusers_scorefusion import FusedTransformer, ScoreFusionFluxPipeline, ScoreFusionSD3Pipeline
from diffusers_scorefusion.cli import main, read_image_folder
from diffusers_scorefusion.testing import transformer_parts as parts

FAMILIES = {
    "sd3": (StableDiffusion3Pipeline, ScoreFusionSD3Pipeline, parts.get_dummy_sd3_components,
            parts.get_dummy_sd3_transformer),
    "flux": (FluxPipeline, ScoreFusionFluxPipeline, parts.get_dummy_flux_components, parts.get_dummy_flux_transformer),
}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Per family: a stock base pipeline, a member transformer folder and a member pipeline folder; captioned 8 x 8
    images."""
    root = tmp_path_factory.mktemp("cli")
    for family, (stock_class, _, build, build_member) in FAMILIES.items():
        components = build(0)
        stock_class(**components).save_pretrained(root / family / "base")
        build_member(1).save_pretrained(root / family / "member_a")
        stock_class(**{**components, "transformer": build_member(2)}).save_pretrained(root / family / "member_b")
    write_images(root / "data", ["one.png", "two.png", "three.png"], size=8)
    for stem, caption in (("one", "a red cat"), ("two", "a blue dog"), ("three", "a green bird")):
        (root / "data" / f"{stem}.txt").write_text(caption)
    return root


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_fit_then_sample_with_transformer_members(family, folders, tmp_path, capsys):
    _, fusion_class, _, _ = FAMILIES[family]
    base, members = folders / family / "base", [folders / family / "member_a", folders / family / "member_b"]
    extra = ["--guidance-scale", "3.5"] if family == "flux" else ["--timestep-density", "uniform"]
    argv = ["fit", "--base", str(base), "--transformer", str(members[0]), "--transformer", str(members[1]),
            "--data", str(folders / "data"), "--out", str(tmp_path / "fusion"), "--num-noise-draws", "2",
            "--num-bootstrap", "0", "--seed", "3", "--no-progress", *extra]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "weights:" in capsys.readouterr().out
    saved = fusion_class.from_pretrained(tmp_path / "fusion")
    assert isinstance(saved.transformer, FusedTransformer)
    provenance = saved.transformer.config.weights_provenance
    assert provenance["objective"] == "flow_matching" and provenance["timestep_density"] == "uniform"
    assert provenance["members"] == [str(member) for member in members] and provenance["num_samples"] == 3
    # the same fit through the library: the command adds nothing but reading the folder and saving
    pipe = fusion_class.from_pretrained(base, transformers=members)
    pipe.set_progress_bar_config(disable=True)
    images, prompts, _ = read_image_folder(folders / "data")
    options = {"guidance_scale": 3.5} if family == "flux" else {"timestep_density": "uniform"}
    result = pipe.fit_weights(images, prompts, num_noise_draws=2, num_bootstrap=0, progress_bar=False,
                              generator=torch.Generator().manual_seed(3), **options)  # fmt: skip
    assert saved.transformer.fusion_weights.tolist() == result.weights.tolist()

    samples = tmp_path / "samples"
    argv = ["sample", "--fusion", str(tmp_path / "fusion"), "--prompt", "a cat", "--out", str(samples), "--num-images",
            "2", "--num-inference-steps", "2", "--height", "8", "--width", "8", "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert sorted(os.listdir(samples)) == ["grid.png", "metadata.jsonl", "sample_000.png", "sample_001.png"]
    with PIL.Image.open(samples / "grid.png") as grid:
        assert grid.size == (2 * 8, 8)
