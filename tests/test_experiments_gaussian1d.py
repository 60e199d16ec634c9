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
    Coordinates,
    Mixture1D,
    MLPDenoiser,
    coordinates,
    main,
    run_gaussian1d,
    wasserstein1,
)
from diffusers_scorefusion.experiments.mixtures1d import (
    ExactMixtureDenoiser,
    barycenter_on_grid,
    grid_cdf,
    sample_from_grid,
    wasserstein1_between_cdfs,
    wasserstein1_to_cdf,
)
from diffusers_scorefusion.experiments.training import TrainingConfig, make_noise_scheduler


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


def test_exact_noise_prediction_is_minus_sigma_times_the_noised_score():
    mixture = Mixture1D(means=(-1.0, 2.0), std=0.5, weights=(0.3, 0.7))
    alpha, sigma = 0.8, 0.6
    noised = Mixture1D(means=(-0.8, 1.6), std=float(np.sqrt(0.64 * 0.25 + 0.36)), weights=(0.3, 0.7))
    x = np.linspace(-3, 3, 13)
    h = 1e-5
    score = (noised.log_density(x + h) - noised.log_density(x - h)) / (2 * h)  # finite differences
    eps = mixture.noise_pred(torch.tensor(x), torch.full((13,), alpha), torch.full((13,), sigma)).numpy()
    np.testing.assert_allclose(eps, -sigma * score, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mixture.cdf(np.array([-40.0, 40.0])), [0.0, 1.0])


def test_exact_denoiser_fuses_and_standardises():
    alphas_cumprod = make_noise_scheduler().alphas_cumprod
    first, second = TARGET, TARGET.affine(1.0, 2.0)
    assert second.means == (-3.5, 2.5) and second.std == 0.4
    members = [ExactMixtureDenoiser.from_mixture(m, alphas_cumprod) for m in (first, second)]
    sample, timestep = torch.randn(6, 1), torch.tensor(250)
    fused = FusedUNet(members, weights=[0.25, 0.75])
    expected = 0.25 * members[0](sample, timestep).sample + 0.75 * members[1](sample, timestep).sample
    torch.testing.assert_close(fused(sample, timestep).sample, expected)
    with pytest.raises(ValueError, match="shape"):
        members[0](torch.randn(2, 1, 1, 1), timestep)
    with pytest.raises(ValueError, match="scale"):
        TARGET.affine(0.0, 0.0)


def test_barycenter_on_a_grid_matches_the_gaussian_closed_form():
    # prod N(m_i, s_i^2)^l_i is N(m, s^2) with 1/s^2 = sum l_i / s_i^2 and m = s^2 sum l_i m_i / s_i^2
    grid = np.linspace(-10, 10, 40001)
    members = [Mixture1D((-1.0,), 0.3, (1.0,)), Mixture1D((2.0,), 1.5, (1.0,))]
    weights = [0.4, 0.6]
    precision = 0.4 / 0.09 + 0.6 / 2.25
    mean = (0.4 * -1.0 / 0.09 + 0.6 * 2.0 / 2.25) / precision
    density = barycenter_on_grid(np.stack([m.log_density(grid) for m in members]), weights, grid)
    exact = Mixture1D((mean,), float(np.sqrt(1 / precision)), (1.0,))
    np.testing.assert_allclose(density, exact.density(grid), atol=1e-6)
    cdf = grid_cdf(grid, density)
    assert wasserstein1_between_cdfs(grid, cdf, exact.cdf(grid)) < 1e-6
    # one-hot weights give back that member, a bimodal mixture included
    mixture = TARGET.affine(0.0, 5.0)
    one_hot = barycenter_on_grid(np.stack([mixture.log_density(grid), members[0].log_density(grid)]), [1, 0], grid)
    np.testing.assert_allclose(one_hot, mixture.density(grid), atol=1e-6)
    # draws by inverting the grid CDF are the barycenter's: their W1 to it is at the sampling floor
    draws = sample_from_grid(grid, cdf, 20000, np.random.default_rng(0))
    assert wasserstein1_to_cdf(draws, grid, cdf) < 0.01
    assert wasserstein1_to_cdf(draws + 0.5, grid, cdf) == pytest.approx(0.5, abs=0.01)  # a shift costs its length
    assert wasserstein1_to_cdf(np.array([15.0]), grid, cdf) == pytest.approx(15.0 - mean, abs=1e-3)  # off the grid
    with pytest.raises(ValueError, match="sum to 1"):
        barycenter_on_grid(np.zeros((2, grid.size)), [0.5, 0.6], grid)
    with pytest.raises(ValueError, match=r"\(k, G\)"):
        barycenter_on_grid(np.zeros((3, grid.size)), [0.5, 0.5], grid)


def test_coordinates_follow_the_setup():
    train = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)
    paper = coordinates(replace(QUICK_1D, setup="paper"), train)
    assert paper == Coordinates(3.0, 2.0)
    assert coordinates(replace(QUICK_1D, setup="common-scale"), train) == Coordinates(0.0, QUICK_1D.common_scale)
    np.testing.assert_allclose(paper.to_data(paper.to_model(train)[:, 0].numpy()), train.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="setup"):
        replace(QUICK_1D, setup="other")


TINY_1D = replace(
    QUICK_1D, n_values=(8, 16), seeds=(0, 1), hidden_size=16, num_generated=200, num_test=300, num_trials=2,
    sampling_steps=5, fit_noise_draws=2, auxiliary_sizes=(256, 64), validation_draws=1, target_validation_draws=2,
    lambda_grid=3, corrector_steps=(0, 1), trained_corrector_steps=(0, 1), fkc_configs=((None, 5, None), (8, 5, 1.0)),
    auxiliary_training=TrainingConfig(steps=20, learning_rate=1e-3, batch_size=32, eval_every=10, patience=1),
    scratch_training=TrainingConfig(steps=10, learning_rate=1e-3, batch_size=32, eval_every=5, patience=1),
)  # fmt: skip


@pytest.mark.parametrize("setup", ["paper", "common-scale"])
def test_miniature_run_writes_every_file_with_the_documented_schema(tmp_path, setup):
    out = str(tmp_path / "out")
    payload = run_gaussian1d(replace(TINY_1D, setup=setup), out, str(tmp_path / "cache"))
    for name in ("report.md", "results.json", "w1_vs_n.png", "samples.png", "what_is_sampled.png", "corrector.png",
                 "fkc.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "results.json")) as handle:
        saved = json.load(handle)
    assert saved["experiment"] == "gaussian1d" and saved["setup"] == setup and "Wasserstein-1" in saved["units"]
    methods = ("scratch", "scorefusion", "scorefusion-full", "scorefusion-auto", "aux1", "aux2")
    assert {(row["n"], row["method"]) for row in saved["rows"]} == {(n, m) for n in (8, 16) for m in methods}
    assert len(saved["records"]) == 2 * 2 * len(methods) * 2  # seeds x n x methods x trials
    for row in saved["rows"]:
        assert row["w1"] > 0 and row["w1_se"] >= 0 and row["num_trials"] == 2
        if row["method"] == "scorefusion-auto":  # the bin table on the finest grid (16 bins), averaged over seeds
            table = np.asarray(row["weights"])
            assert table.shape == (16, 2) and table.min() >= 0 and np.allclose(table.sum(1), 1, atol=1e-6)
        elif row["method"].startswith("scorefusion"):
            assert min(row["weights"]) >= 0 and abs(sum(row["weights"]) - 1) < 1e-6
    auto = [f for f in saved["fits"] if f["method"] == "scorefusion-auto"]
    assert len(auto) == 4 and all(len(f["table"]) == f["num_timestep_bins"] for f in auto)
    sampled = saved["what_is_sampled"]
    assert sampled["lambdas"] == [0.0, 0.5, 1.0]
    assert all(len(sampled[k]) == 3 for k in ("barycenter_w1", "exact_sampler_w1", "trained_sampler_w1"))
    corrector = saved["corrector"]
    assert [(r["case"], r["corrector_steps"], r["member_forwards"]) for r in corrector["rows"]] == [
        ("exact", 0, 10), ("exact", 1, 18), ("trained", 0, 10), ("trained", 1, 18)]  # 2 x (5 + 4 M)
    assert [(r["case"], r["sampler"], r["member_forwards"]) for r in saved["fkc"]["rows"]] == [
        (case, sampler, 5) for case in ("control", "exact", "trained") for sampler in ("plain DDPM", "FKC")]
    assert all(r["resamplings"] >= 1 for r in saved["fkc"]["rows"] if r["sampler"] == "FKC")  # at least the last
    report = open(os.path.join(out, "report.md")).read()
    assert "## What the fused sampler samples" in report and "## Cross-validated timestep bins" in report
    assert "## Feynman-Kac correctors (SMC)" in report
    assert payload["rows"] == saved["rows"]


def test_main_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num-threads"):
        main(["--num-threads", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="trials"):
        main(["--trials", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--setup", "nonsense", "--out", str(tmp_path)])
