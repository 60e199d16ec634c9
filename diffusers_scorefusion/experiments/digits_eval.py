"""Evaluating a digits generator: test NLL (bits/dim), held-out denoising loss, generated digit proportion, samples.

Every method of one seed is scored with the same draws (dequantisation, Hutchinson probes, noised copies, initial
noise), so differences between methods within a seed are paired: the estimator noise largely cancels in them.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..models.modeling_fused_unet import FusedUNet
from . import data as digit_data
from .denoising import NoisedSet, make_noised_set, per_sample_denoising_loss
from .likelihood import bits_per_dim, ode_log_likelihood
from .training import generate, make_noise_scheduler


@dataclass
class TestSet:
    """The test images `(m, 1, 8, 8)` (grey levels), their weights ``p_c / m_c`` under the target mix `(m,)`, their
    class index `(m,)`, and the fixed noised copies for the denoising loss."""

    pixels: torch.Tensor
    weights: torch.Tensor
    classes: torch.Tensor
    noised: NoisedSet


def make_test_set(pixels: np.ndarray, split: digit_data.DigitSplit, target_mix: Sequence[float], num_draws: int,
                  seed: int) -> TestSet:  # fmt: skip
    """The test split, weighted to the target mix, with `num_draws` noised copies per image (seeded by `seed`)."""
    parts = [torch.as_tensor(split.images(pixels, "test", d), dtype=torch.float32).unsqueeze(1) for d in split.digits]
    weights = torch.cat([torch.full((len(part),), p / len(part), dtype=torch.float64)
                         for part, p in zip(parts, target_mix)])  # fmt: skip
    classes = torch.cat([torch.full((len(part),), c) for c, part in enumerate(parts)])
    clean = torch.cat(parts)
    noised = make_noised_set(clean, num_draws, make_noise_scheduler(), torch.Generator().manual_seed(20_000 + seed),
                             sample_weights=weights, prepare=digit_data.dequantize)  # fmt: skip
    return TestSet(pixels=clean, weights=weights, classes=classes, noised=noised)


def train_proportion_classifier(pixels: np.ndarray, labels: np.ndarray, split: digit_data.DigitSplit):
    """Logistic regression on the auxiliary pool (never on test images); returns it and its test-split accuracy."""
    from sklearn.linear_model import LogisticRegression

    def stack(name: str) -> Tuple[np.ndarray, np.ndarray]:
        rows = np.concatenate([split.indices[name][d] for d in split.digits])
        return pixels[rows].reshape(len(rows), -1) / 16.0, labels[rows]

    features, targets = stack("auxiliary")
    classifier = LogisticRegression(max_iter=2000, C=1.0).fit(features, targets)
    test_features, test_targets = stack("test")
    return classifier, float((classifier.predict(test_features) == test_targets).mean())


def evaluate(model: torch.nn.Module, settings: Any, test: TestSet, classifier: Any, noise: torch.Tensor,
             seed: int) -> Dict[str, Any]:  # fmt: skip
    """NLL (bits/dim) and denoising loss, target-weighted means and per test image; generated proportion; images."""
    scheduler = make_noise_scheduler()
    generator = torch.Generator().manual_seed(10_000 + seed)  # same dequantisation and probes for every method

    def eps_model(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return model(sample, timestep, return_dict=False)[0]

    sample = digit_data.dequantize(test.pixels, generator)  # (m, 1, 8, 8)
    log_likelihood = ode_log_likelihood(eps_model, sample, scheduler.alphas_cumprod, settings.nll_steps,
                                        generator=generator)  # fmt: skip
    nll = bits_per_dim(log_likelihood, sample[0].numel(), digit_data.NUM_LEVELS)  # (m,)
    denoising = per_sample_denoising_loss(model, test.noised)  # (m,)
    images = digit_data.quantize(generate(model, scheduler, noise, settings.sampling_steps))[:, 0]  # (g, 8, 8)
    predicted = classifier.predict(images.reshape(images.shape[0], -1).numpy() / 16.0)
    return dict(nll_bpd=float((test.weights * nll).sum()), nll_per_image=nll.numpy(),
                denoising_loss=float((test.weights * denoising).sum()), denoising_per_image=denoising.numpy(),
                proportion=float((predicted == settings.digits[0]).mean()), images=images.numpy())  # fmt: skip


def paired_difference(first: Dict[str, Any], second: Dict[str, Any], test: TestSet, metric: str) -> Dict[str, float]:
    """``first - second`` of a target-weighted metric on one seed's shared draws, with its standard error over test
    images (classes weighted by the target mix: ``se^2 = sum_c p_c^2 var_c / m_c``)."""
    difference = first[f"{metric}_per_image"] - second[f"{metric}_per_image"]  # (m,)
    weights, classes = test.weights.numpy(), test.classes.numpy()
    variance = 0.0
    for c in np.unique(classes):
        rows = classes == c
        share = weights[rows].sum()
        variance += share**2 * difference[rows].var(ddof=1) / rows.sum() if rows.sum() > 1 else float("nan")
    return dict(difference=float((weights * difference).sum()), within_seed_se=float(np.sqrt(variance)))


def lambda_spectrum(auxiliaries: Sequence[torch.nn.Module], settings: Any, fitted: Optional[Sequence[float]],
                    num_noises: int = 8) -> Tuple[np.ndarray, List[str]]:  # fmt: skip
    """Samples from one set of initial noises for weights sweeping from aux 1 to the last aux (plus the fitted ones)."""
    num_aux = len(auxiliaries)
    fused = FusedUNet(auxiliaries)
    noise = torch.randn((num_noises, 1, 8, 8), generator=torch.Generator().manual_seed(12345))
    columns, labels = [], []
    for a in np.linspace(0.0, 1.0, settings.spectrum_points):
        weights = np.zeros(num_aux)
        weights[0], weights[-1] = 1 - a, a
        columns.append(weights.tolist())
        labels.append(f"λ1={1 - a:.1f}\nλ{num_aux}={a:.1f}")
    if fitted is not None:
        columns.append(list(fitted))
        labels.append("fitted λ\n(largest n)")
    images = []
    for weights in columns:
        fused.set_weights(weights)
        sample = generate(fused, make_noise_scheduler(), noise, settings.sampling_steps)  # (num_noises, 1, 8, 8)
        images.append(digit_data.quantize(sample)[:, 0])
    return torch.stack(images, dim=1).numpy(), labels  # (num_noises, num_columns, 8, 8)
