import json
import math
import os
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffusers_scorefusion.experiments import data as digit_data
from diffusers_scorefusion.experiments.digits import (
    QUICK,
    closest_auxiliary,
    main,
    method_names,
    resolve_n_values,
    run_digits,
)
from diffusers_scorefusion.experiments.digits_eval import paired_difference
from diffusers_scorefusion.experiments.digits_models import merge_unets
from diffusers_scorefusion.experiments.digits_report import summarise_pairs
from diffusers_scorefusion.experiments.training import TrainingConfig, cache_key, make_digit_unet

TARGET_SIZES = digit_data.class_counts(QUICK.max_n, (0.6, 0.4))


@pytest.fixture(scope="module")
def digits():
    return digit_data.load_digit_pixels()


def test_splits_are_disjoint_and_cover_each_class(digits):
    _, labels = digits
    split = digit_data.split_digits(labels, (7, 9), 40, TARGET_SIZES)
    for c, digit in enumerate((7, 9)):
        parts = [set(split.indices[name][digit].tolist()) for name in digit_data.SPLIT_NAMES]
        assert sum(len(p) for p in parts) == len(set().union(*parts)) == int((labels == digit).sum())
        assert all((labels[list(p)] == digit).all() for p in parts)
        assert split.indices["test"][digit].size == 40 and split.indices["target"][digit].size == TARGET_SIZES[c]
        # the auxiliary pool takes everything else
        assert split.indices["auxiliary"][digit].size == int((labels == digit).sum()) - 40 - TARGET_SIZES[c]


def test_target_draws_never_touch_test_or_auxiliary_images(digits):
    _, labels = digits
    split = digit_data.split_digits(labels, (7, 9), 40, TARGET_SIZES)
    held_out = set()
    for name in ("test", "auxiliary"):
        for digit in (7, 9):
            held_out |= set(split.indices[name][digit].tolist())
    available = digit_data.max_target_size(split, (0.6, 0.4))
    assert available == QUICK.max_n
    for n in (2, 8, 16, available):
        for seed in range(5):
            chosen = digit_data.draw_target_indices(split, n, (0.6, 0.4), seed)
            assert len(set(chosen.tolist())) == n and not held_out & set(chosen.tolist())
            assert (labels[chosen] == 7).sum() == digit_data.class_counts(n, (0.6, 0.4))[0]
    with pytest.raises(ValueError, match="target pool"):
        digit_data.draw_target_indices(split, available + 1, (0.6, 0.4), 0)


def test_holdout_keeps_at_least_one_image_on_each_side():
    indices = np.arange(10, 20)
    train, val = digit_data.holdout(indices, 0.25, seed=0)
    assert len(val) == 2 and len(train) == 8 and set(train) | set(val) == set(indices) and not set(train) & set(val)
    assert len(digit_data.holdout(np.arange(2), 0.25, 0)[1]) == 1  # max(1, round(0.5)) = 1, and one stays to train
    assert np.array_equal(digit_data.holdout(indices, 0.25, 3)[1], digit_data.holdout(indices, 0.25, 3)[1])
    with pytest.raises(ValueError, match="at least 2"):
        digit_data.holdout(np.arange(1), 0.25, 0)
    with pytest.raises(ValueError, match="fraction"):
        digit_data.holdout(indices, 1.5, 0)


def test_split_is_reproducible_and_depends_on_the_seed(digits):
    _, labels = digits
    first, again = (digit_data.split_digits(labels, (7, 9), 40, TARGET_SIZES, 0) for _ in range(2))
    other = digit_data.split_digits(labels, (7, 9), 40, TARGET_SIZES, 1)
    assert np.array_equal(first.indices["test"][7], again.indices["test"][7])
    assert not np.array_equal(first.indices["test"][7], other.indices["test"][7])


def test_split_refuses_bad_sizes(digits):
    _, labels = digits
    with pytest.raises(ValueError, match="one target size"):
        digit_data.split_digits(labels, (7, 9), 40, (5,))
    with pytest.raises(ValueError, match="need at least"):
        digit_data.split_digits(labels, (7, 9), 150, (30, 30))


def test_mixture_sampler_follows_its_proportions():
    pools = [np.zeros((3, 8, 8)), np.ones((5, 8, 8))]
    sampler = digit_data.MixtureSampler(pools, (0.3, 0.7))
    batch = sampler(4000, torch.Generator().manual_seed(0))
    share_of_second = batch[:, 0, 0].mean().item()
    assert abs(share_of_second - 0.7) < 4 * math.sqrt(0.21 / 4000)


def test_n_values_and_closest_auxiliary():
    assert resolve_n_values((64, "all", 16), 90) == [16, 64, 90]
    with pytest.raises(ValueError, match="must be an integer"):
        resolve_n_values((200,), 90)
    with pytest.raises(ValueError, match="at least 2 images"):
        resolve_n_values((3,), 90)  # class counts (2, 1): nothing left to validate the second class on
    assert closest_auxiliary(QUICK) == 2  # (0.7, 0.3) is the closest mix to (0.6, 0.4)
    assert cache_key({"a": 1}) == cache_key({"a": 1}) != cache_key({"a": 2})


def test_merge_unets_averages_weights_and_refuses_bad_weights():
    first, second = make_digit_unet((8, 16), seed=0), make_digit_unet((8, 16), seed=1)
    merged = merge_unets([first, second], [0.25, 0.75])
    name, tensor = next((k, v) for k, v in merged.state_dict().items() if v.is_floating_point())
    expected = 0.25 * first.state_dict()[name] + 0.75 * second.state_dict()[name]
    torch.testing.assert_close(tensor, expected)
    one_hot = merge_unets([first, second], [0.0, 1.0])
    sample, timestep = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    torch.testing.assert_close(one_hot(sample, timestep).sample, second(sample, timestep).sample)
    with pytest.raises(ValueError, match="sum to 1"):
        merge_unets([first, second], [0.5, 0.6])
    with pytest.raises(ValueError, match="one weight per model"):
        merge_unets([first, second], [1.0])


TINY = replace(
    QUICK, n_values=(4, "all"), seeds=(0, 1), block_out_channels=(8, 16), test_per_class=6, max_n=8,
    base_training=TrainingConfig(steps=8, learning_rate=1e-3, batch_size=16, eval_every=4, patience=1),
    auxiliary_training=TrainingConfig(steps=4, learning_rate=1e-3, batch_size=16, eval_every=2, patience=1),
    target_training=TrainingConfig(steps=6, learning_rate=1e-3, batch_size=16, eval_every=3, patience=2),
    finetune_learning_rate=1e-4, validation_draws=1, target_validation_draws=2, denoising_draws=2,
    nll_steps=1, num_generated=8, sampling_steps=2, fit_noise_draws=2, spectrum_points=3, distill_steps=4,
)  # fmt: skip


def test_miniature_end_to_end_run_writes_every_file_with_the_documented_schema(tmp_path):
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    payload = run_digits(TINY, out, cache)
    for name in ("report.md", "results.json", "nll_vs_n.png", "proportion_vs_n.png", "lambda_spectrum.png",
                 "paired_differences.png"):  # fmt: skip
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert len([f for f in os.listdir(out) if f.startswith("samples_n")]) == 2
    with open(os.path.join(out, "results.json")) as handle:
        saved = json.load(handle)
    assert saved["experiment"] == "digits" and "bits/dim" in saved["units"].replace("bits per dimension", "bits/dim")
    methods = method_names(TINY)
    assert {"merge-fitted", "merge-uniform"} <= set(methods)
    expected = {(n, m) for n in saved["meta"]["n_values"] for m in methods}
    assert saved["meta"]["n_values"] == [4, 8]
    assert {(row["n"], row["method"]) for row in saved["rows"]} == expected
    for row in saved["rows"]:
        assert {"nll_bpd", "nll_se", "denoising_loss", "denoising_se", "proportion", "weights"} <= set(row)
        assert math.isfinite(row["nll_bpd"]) and 0 <= row["proportion"] <= 1
        if row["method"].startswith("aux"):  # evaluated on the first seed only: no standard error
            assert row["num_seeds"] == 1 and row["nll_se"] is None
        else:
            assert row["num_seeds"] == 2 and row["nll_se"] >= 0
        assert row["denoising_loss"] > 0
        if row["method"] in ("scorefusion", "uniform", "merge-fitted", "merge-uniform", "merge-refit", "distilled"):
            assert len(row["weights"]) == 4 and min(row["weights"]) >= 0 and abs(sum(row["weights"]) - 1) < 1e-3
        if row["method"] == "scorefusion-auto":  # the bin table on the finest grid (16 bins), to average over seeds
            assert np.asarray(row["weights"]).shape == (16, 4)
        if row["method"] in ("scratch", "finetune"):  # early stopping kept a checkpoint within the budget
            assert all(0 <= b <= s <= 6 for b, s in zip(row["best_step"], row["steps_run"]))
    by_key = {(r["seed"], r["n"], r["method"]): r for r in saved["records"]}
    for pair in saved["pair_records"]:  # the paired difference is the difference of the two methods' means
        first, second = pair["pair"].split(" - ")
        metric = "nll_bpd" if pair["metric"] == "nll" else "denoising_loss"
        gap = by_key[(pair["seed"], pair["n"], first)][metric] - by_key[(pair["seed"], pair["n"], second)][metric]
        assert pair["difference"] == pytest.approx(gap, rel=1e-9, abs=1e-12)
    for summary in saved["paired_differences"]:
        assert summary["ci_low"] <= summary["mean"] <= summary["ci_high"] and summary["num_seeds"] == 2
    report = open(os.path.join(out, "report.md")).read()
    assert ("| n | scratch | finetune | scorefusion | scorefusion-auto | merge-fitted | merge-refit | distilled "
            "| uniform | merge-uniform | aux1") in report
    forwards = saved["meta"]["member_forwards_per_step"]
    assert forwards == {m: 4 if m in ("scorefusion", "scorefusion-auto", "uniform") else 1 for m in methods}
    assert "| merge-refit | 1 |" in report and "| scorefusion | 4 |" in report
    for record in saved["records"]:  # the refit never ends above its start (the fusion's lambda) on the fitting data
        if record["method"] == "merge-refit":
            assert record["training"]["loss"] <= record["training"]["start_loss"]
    assert {"merge-refit - scorefusion", "distilled - scorefusion"} <= {s["pair"] for s in saved["paired_differences"]}
    assert "## Cross-validated timestep bins" in report and os.path.getsize(os.path.join(out, "auto_weights.png")) > 0
    with open(os.path.join(out, "auto_bins.json")) as handle:
        fits = json.load(handle)["fits"]
    assert sorted((f["seed"], f["n"]) for f in fits) == [(0, 4), (0, 8), (1, 4), (1, 8)]
    for fit in fits:  # the auto fit runs the members as often as the single-λ fit: n x 2 draws in one batch of 16
        assert fit["num_forward_passes"] == 4 and len(fit["weights"]) == fit["num_timestep_bins"]
    assert "Paired differences" in report and "Held-out denoising loss" in report
    assert "Feynman-Kac correctors" in report and os.path.getsize(os.path.join(out, "fkc_ess.png")) > 0
    fkc_rows = payload["meta"]["fkc"]["rows"]
    assert [r["sampler"] for r in fkc_rows] == ["DDIM (experiment's)", "plain DDPM", "FKC", "FKC"]
    assert all(0 <= r["share"] <= 1 for r in fkc_rows) and fkc_rows[-1]["resamplings"] >= 1
    # a rerun of one seed and n reads its models from the cache and reproduces that seed's numbers exactly
    num_models = 1 + 4 + 2 * 2 * 2  # base, auxiliaries, (scratch, finetune) per seed and n
    assert len(os.listdir(cache)) == num_models
    again = run_digits(replace(TINY, seeds=(1,), n_values=(4,)), str(tmp_path / "out2"), cache)
    assert len(os.listdir(cache)) == num_models
    first = {(r["method"], r["n"]): r["nll_bpd"] for r in payload["records"] if r["seed"] == 1 and r["n"] == 4}
    assert not any(method.startswith("aux") for method, _ in first)  # the auxiliaries alone: first seed only
    rerun = {(r["method"], r["n"]): r["nll_bpd"] for r in again["records"]}
    assert {key: value for key, value in rerun.items() if key in first} == first and len(first) == 9


def test_main_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num-threads"):
        main(["--num-threads", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="must be an integer"):
        main(["--n", "100000", "--out", str(tmp_path), "--no-cache"])
    with pytest.raises(SystemExit):
        main(["--medium", "--full", "--out", str(tmp_path)])


def test_paired_differences_and_their_confidence_interval():
    records = [dict(n=16, pair="a - b", metric="nll", difference=d, within_seed_se=0.1) for d in (1.0, 2.0, 3.0)]
    (summary,) = summarise_pairs(records)
    half = 4.302653 * 1.0 / math.sqrt(3)  # t_{0.975, 2} x (sd 1 / sqrt(3))
    assert summary["mean"] == pytest.approx(2.0) and summary["se"] == pytest.approx(1 / math.sqrt(3))
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx((2.0 - half, 2.0 + half), rel=1e-6)
    assert summary["num_negative"] == 0 and summary["within_seed_se"] == pytest.approx(0.1)
    # within one seed: the target-weighted mean of per-image differences, classes weighted by the target mix
    test = SimpleNamespace(weights=torch.tensor([0.3, 0.3, 0.2, 0.2], dtype=torch.float64),
                           classes=torch.tensor([0, 0, 1, 1]))  # fmt: skip
    first = {"nll_per_image": np.array([1.0, 3.0, 0.0, 0.0])}
    second = {"nll_per_image": np.zeros(4)}
    result = paired_difference(first, second, test, "nll")
    assert result["difference"] == pytest.approx(0.3 * 1 + 0.3 * 3)
    assert result["within_seed_se"] == pytest.approx(math.sqrt(0.6**2 * 2.0 / 2))  # class 0: variance 2, 2 images
