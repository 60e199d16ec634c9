"""`num_timestep_bins="auto"` through a pipeline's `fit_weights` and `scorefusion fit --num-timestep-bins auto`."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from test_cli import fit_argv, write_images

from diffusers_scorefusion import ScoreFusionPipeline
from diffusers_scorefusion.cli import main
from diffusers_scorefusion.testing.unet_parts import (
    get_dummy_components,
    get_dummy_scheduler,
    get_dummy_text_encoder,
    get_dummy_tokenizer,
    get_dummy_unet,
    get_dummy_vae,
)


def test_pipeline_fits_auto_bins():
    pipe = ScoreFusionPipeline(**get_dummy_components(num_members=2))
    pipe.set_progress_bar_config(disable=True)
    images = np.random.default_rng(0).random((4, 32, 32, 3)).astype(np.float32)
    result = pipe.fit_weights(list(images), "a photo", num_timestep_bins="auto", num_noise_draws=4, num_bootstrap=0,
                              generator=torch.Generator().manual_seed(0), progress_bar=False)  # fmt: skip
    selection = result.timestep_bin_selection
    assert selection["num_folds"] == 4 and selection["max_timestep_bins"] == 16
    assert pipe.unet.config.weights_provenance["timestep_bin_selection"] == selection
    assert result.num_forward_passes == 2 * 1  # 16 noised samples in one batch of 16, each member once
    rows = selection["num_timestep_bins"]
    assert tuple(pipe.unet.fusion_weights.shape) == ((2,) if rows == 1 else (rows, 2))


def test_cli_fits_auto_bins(tmp_path, capsys):
    base = StableDiffusionPipeline(vae=get_dummy_vae(), text_encoder=get_dummy_text_encoder(),
                                   tokenizer=get_dummy_tokenizer(), unet=get_dummy_unet(0),
                                   scheduler=get_dummy_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip
    base.save_pretrained(tmp_path / "base")
    for seed, name in ((1, "member_a"), (2, "member_b")):
        get_dummy_unet(seed).save_pretrained(tmp_path / name)
    data = tmp_path / "data"
    write_images(data, ["one.png", "two.png", "three.png"])
    for stem in ("one", "two", "three"):
        (data / f"{stem}.txt").write_text("a photo")
    out = tmp_path / "fusion"
    assert main(fit_argv(tmp_path, data, out, "--num-timestep-bins", "auto", "--num-bootstrap", "0")) == 0
    printed = capsys.readouterr().out
    provenance = ScoreFusionPipeline.from_pretrained(str(out)).unet.config.weights_provenance
    selection = provenance["timestep_bin_selection"]
    assert f"auto bins: {selection['num_timestep_bins']}" in printed and selection["num_folds"] == 3
    with pytest.raises(SystemExit):
        main(fit_argv(tmp_path, data, tmp_path / "other", "--num-timestep-bins", "many"))
    assert "expected a positive int or auto, got 'many'" in capsys.readouterr().err
