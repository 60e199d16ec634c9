import json
import math
import os
from dataclasses import replace

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
from diffusers_scorefusion.experiments.training import TrainingConfig, cache_key

SIZES = dict(QUICK.split_sizes)


@pytest.fixture(scope="module")
def digits():
    return digit_data.load_digit_pixels()


def test_splits_are_disjoint_and_cover_each_class(digits):
    _, labels = digits
    split = digit_data.split_digits(labels, (7, 9), SIZES)
    for digit in (7, 9):
        parts = [set(split.indices[name][digit].tolist()) for name in digit_data.SPLIT_NAMES]
        assert sum(len(p) for p in parts) == len(set().union(*parts)) == int((labels == digit).sum())
        assert all((labels[list(p)] == digit).all() for p in parts)
        for name in ("test", "classifier", "auxiliary"):
            assert split.indices[name][digit].size == SIZES[name]


def test_target_draws_never_touch_test_or_classifier_images(digits):
    _, labels = digits
    split = digit_data.split_digits(labels, (7, 9), SIZES)
    held_out = set()
    for name in ("test", "classifier", "auxiliary"):
        for digit in (7, 9):
            held_out |= set(split.indices[name][digit].tolist())
    available = digit_data.max_target_size(split, (0.6, 0.4))
    for n in (2, 8, 16, available):
        for seed in range(5):
            chosen = digit_data.draw_target_indices(split, n, (0.6, 0.4), seed)
            assert len(set(chosen.tolist())) == n and not held_out & set(chosen.tolist())
            assert (labels[chosen] == 7).sum() == digit_data.class_counts(n, (0.6, 0.4))[0]
    with pytest.raises(ValueError, match="target pool"):
        digit_data.draw_target_indices(split, available + 1, (0.6, 0.4), 0)


def test_split_is_reproducible_and_depends_on_the_seed(digits):
    _, labels = digits
    first, again = (digit_data.split_digits(labels, (7, 9), SIZES, 0) for _ in range(2))
    other = digit_data.split_digits(labels, (7, 9), SIZES, 1)
    assert np.array_equal(first.indices["test"][7], again.indices["test"][7])
    assert not np.array_equal(first.indices["test"][7], other.indices["test"][7])


def test_split_refuses_bad_sizes(digits):
    _, labels = digits
    with pytest.raises(ValueError, match="sizes must give"):
        digit_data.split_digits(labels, (7, 9), {"test": 5})
    with pytest.raises(ValueError, match="need at least"):
        digit_data.split_digits(labels, (7, 9), {"test": 100, "classifier": 50, "auxiliary": 50})


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
    assert closest_auxiliary(QUICK) == 2  # (0.7, 0.3) is the closest mix to (0.6, 0.4)
    assert cache_key({"a": 1}) == cache_key({"a": 1}) != cache_key({"a": 2})


TINY = replace(
    QUICK, n_values=(4, "all"), seeds=(0, 1), block_out_channels=(8, 16),
    split_sizes=(("test", 6), ("classifier", 20), ("auxiliary", 20)),
    auxiliary_training=TrainingConfig(steps=12, learning_rate=1e-3, batch_size=16),
    scratch_training=TrainingConfig(steps=6, learning_rate=1e-3, batch_size=16),
    finetune_training=TrainingConfig(steps=4, learning_rate=1e-3, batch_size=16),
    nll_steps=1, num_generated=8, sampling_steps=2, fit_noise_draws=2, spectrum_points=3,
)  # fmt: skip


def test_miniature_end_to_end_run_writes_every_file_with_the_documented_schema(tmp_path):
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    payload = run_digits(TINY, out, cache)
    for name in ("report.md", "results.json", "nll_vs_n.png", "proportion_vs_n.png", "lambda_spectrum.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert len([f for f in os.listdir(out) if f.startswith("samples_n")]) == 2
    with open(os.path.join(out, "results.json")) as handle:
        saved = json.load(handle)
    assert saved["experiment"] == "digits" and "bits/dim" in saved["units"].replace("bits per dimension", "bits/dim")
    methods = method_names(TINY)
    expected = {(n, m) for n in saved["meta"]["n_values"] for m in methods}
    assert {(row["n"], row["method"]) for row in saved["rows"]} == expected
    for row in saved["rows"]:
        assert {"n", "method", "nll_bpd", "nll_se", "proportion", "weights"} <= set(row)
        assert math.isfinite(row["nll_bpd"]) and row["nll_se"] >= 0 and 0 <= row["proportion"] <= 1
        if row["method"] in ("scorefusion", "uniform"):
            assert len(row["weights"]) == 4 and min(row["weights"]) >= 0 and abs(sum(row["weights"]) - 1) < 1e-3
    report = open(os.path.join(out, "report.md")).read()
    assert "| n | scratch | finetune | scorefusion | uniform | aux1" in report
    # a rerun of one seed and n reads its models from the cache and reproduces that seed's numbers exactly
    assert len(os.listdir(cache)) == 4 + 2 * 2 * 2  # auxiliaries + (scratch, finetune) per seed and n
    again = run_digits(replace(TINY, seeds=(1,), n_values=(4,)), str(tmp_path / "out2"), cache)
    assert len(os.listdir(cache)) == 4 + 2 * 2 * 2
    first = {(r["method"], r["n"]): r["nll_bpd"] for r in payload["records"] if r["seed"] == 1 and r["n"] == 4}
    assert {(r["method"], r["n"]): r["nll_bpd"] for r in again["records"]} == first


def test_main_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num-threads"):
        main(["--num-threads", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="must be an integer"):
        main(["--n", "100000", "--out", str(tmp_path), "--no-cache"])
