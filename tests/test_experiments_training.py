import os

import pytest
import torch
from torch import nn

from diffusers_scorefusion.experiments.denoising import denoising_loss, make_noised_set, per_sample_denoising_loss
from diffusers_scorefusion.experiments.training import (
    TrainingConfig,
    load_or_train,
    make_noise_scheduler,
    train_denoiser,
)


class TinyDenoiser(nn.Module):
    """A linear noise predictor with the Diffusers calling convention (enough to train and snapshot)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, sample, timestep, return_dict=True):
        t = torch.as_tensor(timestep, dtype=sample.dtype).reshape(-1).expand(sample.shape[0])[:, None] / 1000
        return (self.linear(torch.cat([sample, t], dim=1)),)


def _draw(batch_size, generator):
    return torch.randn(batch_size, 1, generator=generator)


def test_early_stopping_keeps_the_best_checkpoint_and_stops_after_patience():
    losses = iter([5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 3.8])
    snapshots = []

    def validation(model):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(losses)

    config = TrainingConfig(steps=50, learning_rate=1e-2, batch_size=8, eval_every=1, patience=2)
    model, record = train_denoiser(TinyDenoiser(), _draw, make_noise_scheduler(), config,
                                   torch.Generator().manual_seed(0), validation=validation)  # fmt: skip
    # evaluations at steps 0..4: the best (3.0) is at step 2; steps 3 and 4 do not improve: patience 2 is used up
    assert record == dict(steps_run=4, best_step=2, best_validation_loss=3.0)
    assert len(snapshots) == 5
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, snapshots[2][name])
    assert not torch.equal(snapshots[2]["linear.weight"], snapshots[4]["linear.weight"])  # training did move on


def test_without_patience_training_runs_the_whole_budget_and_still_keeps_the_best():
    losses = iter([3.0, 2.0, 1.0, 2.5, 2.6])
    config = TrainingConfig(steps=8, learning_rate=1e-2, batch_size=8, eval_every=2)
    _, record = train_denoiser(TinyDenoiser(), _draw, make_noise_scheduler(), config, torch.Generator().manual_seed(0),
                               validation=lambda model: next(losses))  # fmt: skip
    assert record == dict(steps_run=8, best_step=4, best_validation_loss=1.0)
    plain_config = TrainingConfig(steps=3, learning_rate=1e-2)
    _, plain = train_denoiser(TinyDenoiser(), _draw, make_noise_scheduler(), plain_config,
                              torch.Generator().manual_seed(0))  # fmt: skip
    assert plain == dict(steps_run=3, best_step=3, best_validation_loss=None)


def test_training_refuses_bad_validation_settings():
    with pytest.raises(ValueError, match="validation function"):
        train_denoiser(TinyDenoiser(), _draw, make_noise_scheduler(),
                       TrainingConfig(steps=3, learning_rate=1e-2, eval_every=1), torch.Generator())  # fmt: skip
    with pytest.raises(ValueError, match="eval_every and patience"):
        TrainingConfig(steps=3, learning_rate=1e-2, patience=-1)


class SavableDenoiser(TinyDenoiser):
    def save_pretrained(self, path):
        torch.save(self.state_dict(), os.path.join(path, "weights.pt"))


def _load(path):
    model = SavableDenoiser()
    model.load_state_dict(torch.load(os.path.join(path, "weights.pt")))
    return model


def test_load_or_train_caches_the_training_record_with_the_model(tmp_path):
    calls = []

    def train(model):
        calls.append(1)
        return model, dict(steps_run=7, best_step=5, best_validation_loss=0.25)

    first, record = load_or_train(str(tmp_path), "m", dict(a=1), SavableDenoiser, train, _load)
    again, cached = load_or_train(str(tmp_path), "m", dict(a=1), SavableDenoiser, train, _load)
    assert len(calls) == 1 and cached == record == dict(steps_run=7, best_step=5, best_validation_loss=0.25)
    torch.testing.assert_close(again.linear.weight, first.linear.weight)


def test_denoising_loss_of_a_zero_predictor_is_the_weighted_mean_noise_energy():
    clean = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    weights = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    noised = make_noised_set(clean, 5, make_noise_scheduler(), torch.Generator().manual_seed(1), sample_weights=weights)
    assert noised.noisy.shape == (15, 1, 4, 4) and noised.sample_index.tolist() == [0] * 5 + [1] * 5 + [2] * 5

    def zero(sample, timestep, return_dict=False):
        return (torch.zeros_like(sample),)

    per_sample = per_sample_denoising_loss(zero, noised, batch_size=4)  # batching must not matter
    expected = noised.noise.double().pow(2).flatten(1).mean(1).reshape(3, 5).mean(1)
    torch.testing.assert_close(per_sample, expected)
    assert denoising_loss(zero, noised) == pytest.approx(float((weights * expected).sum()))
    # the same generator seed gives the same draws: every model is scored on identical inputs
    again = make_noised_set(clean, 5, make_noise_scheduler(), torch.Generator().manual_seed(1), sample_weights=weights)
    assert torch.equal(again.noisy, noised.noisy) and torch.equal(again.timesteps, noised.timesteps)


def test_make_noised_set_refuses_bad_input():
    clean = torch.zeros(2, 1)
    with pytest.raises(ValueError, match="num_draws"):
        make_noised_set(clean, 0, make_noise_scheduler(), torch.Generator())
    with pytest.raises(ValueError, match="summing to 1"):
        make_noised_set(clean, 1, make_noise_scheduler(), torch.Generator(), sample_weights=torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="empty"):
        make_noised_set(torch.zeros(0, 1), 1, make_noise_scheduler(), torch.Generator())


def test_min_steps_keeps_early_checkpoints_out_of_the_running():
    seen = []

    def validation(model):
        seen.append(len(seen))
        return 1.0 + len(seen)  # every later checkpoint is worse: the first candidate wins

    config = TrainingConfig(steps=10, learning_rate=1e-2, batch_size=8, eval_every=2, patience=2, min_steps=4)
    _, record = train_denoiser(TinyDenoiser(), _draw, make_noise_scheduler(), config, torch.Generator().manual_seed(0),
                               validation=validation)  # fmt: skip
    # candidates at steps 4, 6, 8: the best is step 4 (not step 0, the starting model), patience ends it at step 8
    assert record == dict(steps_run=8, best_step=4, best_validation_loss=2.0) and len(seen) == 3
    with pytest.raises(ValueError, match="min_steps"):
        TrainingConfig(steps=3, learning_rate=1e-2, min_steps=4)
