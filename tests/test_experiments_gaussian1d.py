import json
import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from diffusers_scorefusion import FusedUNet
from diffusers_scorefusion.experiments.gaussian1d import (
    QUICK_1D,
    TARGET,
    Mixture1D,
    MLPDenoiser,
    run_gaussian1d,
    wasserstein1,
)
from diffusers_scorefusion.experiments.training import TrainingConfig


def test_wasserstein1_matches_scipy_and_known_values():
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300), rng.standard_t(3, size=170)
    assert wasserstein1(a, b) == pytest.approx(wasserstein_distance(a, b), rel=1e-10)
    assert wasserstein1(a, a + 2.5) == pytest.approx(2.5)
    assert wasserstein1(a, a) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        wasserstein1(a, [])


def test_mixture_samples_follow_its_weights_and_density_integrates_to_one():
    draws = TARGET.sample(20000, torch.Generator().manual_seed(0)).numpy()
    assert abs((draws < 0).mean() - 0.6) < 4 * math.sqrt(0.24 / 20000)
    grid = np.linspace(-20, 20, 20001)
    assert np.trapezoid(TARGET.density(grid), grid) == pytest.approx(1.0, abs=1e-6)
    narrow = Mixture1D(means=(0.0,), std=0.5, weights=(1.0,))
    assert narrow.sample(20000, torch.Generator().manual_seed(1)).std().item() == pytest.approx(0.5, rel=0.03)


def test_mlp_denoiser_fuses_like_a_unet():
    torch.manual_seed(0)
    members = [MLPDenoiser(hidden_size=16), MLPDenoiser(hidden_size=16)]
    sample, timestep = torch.randn(5, 1), torch.tensor(300)
    fused = FusedUNet(members, weights=[0.25, 0.75])
    expected = 0.25 * members[0](sample, timestep).sample + 0.75 * members[1](sample, timestep).sample
    assert torch.allclose(fused(sample, timestep).sample, expected, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        members[0](torch.randn(5, 1, 1, 1), timestep)


TINY_1D = replace(
    QUICK_1D, n_values=(8, 32), seeds=(0, 1), hidden_size=16, num_generated=200, num_test=300, sampling_steps=5,
    fit_noise_draws=2, auxiliary_training=TrainingConfig(steps=20, learning_rate=1e-3, batch_size=32),
    scratch_training=TrainingConfig(steps=10, learning_rate=1e-3, batch_size=32),
)  # fmt: skip


def test_miniature_run_writes_every_file_with_the_documented_schema(tmp_path):
    out = str(tmp_path / "out")
    payload = run_gaussian1d(TINY_1D, out, str(tmp_path / "cache"))
    for name in ("report.md", "results.json", "w1_vs_n.png", "samples.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "results.json")) as handle:
        saved = json.load(handle)
    assert saved["experiment"] == "gaussian1d" and "Wasserstein-1" in saved["units"]
    assert {(row["n"], row["method"]) for row in saved["rows"]} == {
        (n, m) for n in (8, 32) for m in ("scratch", "scorefusion", "aux1", "aux2")
    }
    for row in saved["rows"]:
        assert {"n", "method", "w1", "w1_se", "weights"} <= set(row)
        assert row["w1"] > 0 and row["w1_se"] >= 0
    fusion = [row for row in saved["rows"] if row["method"] == "scorefusion"]
    assert all(min(r["weights"]) >= 0 and abs(sum(r["weights"]) - 1) < 1e-3 for r in fusion)
    assert payload["rows"] == saved["rows"]
