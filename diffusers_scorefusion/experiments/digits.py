"""Experiment 1 of the paper on real data: fusing four digit generators for a scarce target mix (sklearn's 8x8 digits).

Run ``python -m diffusers_scorefusion.experiments.digits`` (quick, a few minutes on 2 CPU cores) or with ``--full``.
Design (PAPER.md, experiment 1): two digit classes; a held-out test split per class; four auxiliary populations mixing
the two digits in proportions (0.1, 0.9), (0.3, 0.7), (0.7, 0.3), (0.9, 0.1), one small `UNet2DModel` trained on
each; the target is a (0.6, 0.4) mix with n training samples. Per n and seed: training from scratch on the n samples,
fine-tuning the closest auxiliary on them, ScoreFusion (weights fitted by `fit_weights`, exact QP), and as references
uniform weights and each auxiliary alone. Metrics: test NLL in bits/dim (probability-flow ODE, Hutchinson trace,
uniform dequantisation) and the first digit's proportion among generated samples (a classifier trained on held-out
real digits).
"""

import argparse
import copy
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers import UNet2DModel
from tqdm.auto import tqdm

from ..fitting import fit_weights
from ..models.modeling_fused_unet import FusedUNet
from . import data as digit_data
from .digits_report import write_digits_outputs
from .likelihood import bits_per_dim, ode_log_likelihood
from .training import TrainingConfig, generate, load_or_train, make_digit_unet, make_noise_scheduler, train_denoiser

ALL = "all"


@dataclass(frozen=True)
class DigitsSettings:
    """Everything that defines a run; `quick` and `full` below are the two presets."""

    preset: str
    n_values: Tuple[Union[int, str], ...]  # "all" = the whole target pool
    seeds: Tuple[int, ...]
    auxiliary_training: TrainingConfig
    scratch_training: TrainingConfig
    finetune_training: TrainingConfig
    block_out_channels: Tuple[int, ...] = (32, 64)
    digits: Tuple[int, int] = (7, 9)
    split_sizes: Tuple[Tuple[str, int], ...] = (("test", 40), ("classifier", 25), ("auxiliary", 60))
    auxiliary_proportions: Tuple[float, ...] = (0.1, 0.3, 0.7, 0.9)  # share of the first digit
    target_proportion: float = 0.6
    fit_noise_draws: int = 16
    nll_steps: int = 12
    num_generated: int = 200
    sampling_steps: int = 25
    spectrum_points: int = 6
    split_seed: int = 0


QUICK = DigitsSettings(
    preset="quick", n_values=(16, 64, ALL), seeds=(0, 1), block_out_channels=(16, 32),
    auxiliary_training=TrainingConfig(steps=400, learning_rate=3e-3, batch_size=128, warmup_steps=20),
    scratch_training=TrainingConfig(steps=300, learning_rate=3e-3, batch_size=64, warmup_steps=20),
    finetune_training=TrainingConfig(steps=100, learning_rate=5e-4, batch_size=64), nll_steps=16, num_generated=128,
    sampling_steps=20,
)  # fmt: skip
FULL = replace(
    QUICK, preset="full", n_values=(8, 16, 32, 64, ALL), seeds=(0, 1, 2, 3, 4), block_out_channels=(32, 64),
    auxiliary_training=TrainingConfig(steps=3000, learning_rate=2e-3, batch_size=128, warmup_steps=100),
    scratch_training=TrainingConfig(steps=1500, learning_rate=2e-3, batch_size=64, warmup_steps=100),
    finetune_training=TrainingConfig(steps=300, learning_rate=3e-4, batch_size=64), nll_steps=16, num_generated=256,
    sampling_steps=30,
)  # fmt: skip


def method_names(settings: DigitsSettings) -> List[str]:
    """Column order: the three compared methods, then the references."""
    return ["scratch", "finetune", "scorefusion", "uniform"] + [
        f"aux{i + 1}" for i in range(len(settings.auxiliary_proportions))
    ]


def resolve_n_values(n_values: Sequence[Union[int, str]], available: int) -> List[int]:
    """Sorted distinct n; ``"all"`` is the whole target pool. Refuses n outside ``[2, available]``."""
    resolved = set()
    for n in n_values:
        if n == ALL:
            resolved.add(available)
        elif isinstance(n, int) and 2 <= n <= available:
            resolved.add(n)
        else:
            raise ValueError(f"n must be an integer in [2, {available}] or {ALL!r}, got {n!r}")
    return sorted(resolved)


def closest_auxiliary(settings: DigitsSettings) -> int:
    """Index of the auxiliary population whose mix is closest to the target's (the one fine-tuning starts from)."""
    gaps = [abs(p - settings.target_proportion) for p in settings.auxiliary_proportions]
    return int(np.argmin(gaps))


def train_proportion_classifier(pixels: np.ndarray, labels: np.ndarray, split: digit_data.DigitSplit):
    """Logistic regression on the held-out ``classifier`` split; returns it and its accuracy on the ``test`` split."""
    from sklearn.linear_model import LogisticRegression

    def stack(name: str) -> Tuple[np.ndarray, np.ndarray]:
        rows = np.concatenate([split.indices[name][d] for d in split.digits])
        return pixels[rows].reshape(len(rows), -1) / 16.0, labels[rows]

    features, targets = stack("classifier")
    classifier = LogisticRegression(max_iter=2000, C=1.0).fit(features, targets)
    test_features, test_targets = stack("test")
    return classifier, float((classifier.predict(test_features) == test_targets).mean())


def _as_model_input(pixels: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(pixels, dtype=torch.float32).unsqueeze(1)  # (m, 1, 8, 8) grey levels


def _trained_unet(settings: DigitsSettings, cache_dir: Optional[str], name: str, key: Dict[str, Any],
                  pools: Sequence[np.ndarray], proportions: Sequence[float], config: TrainingConfig, seed: int,
                  start_from: Optional[UNet2DModel] = None) -> UNet2DModel:  # fmt: skip
    """Trains (or loads from the cache) a UNet on dequantised batches from a mixture of image pools."""
    sampler = digit_data.MixtureSampler(pools, proportions)
    scheduler = make_noise_scheduler()

    def draw(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return digit_data.dequantize(sampler(batch_size, generator), generator).unsqueeze(1)

    def build() -> UNet2DModel:
        if start_from is not None:
            return copy.deepcopy(start_from)
        return make_digit_unet(settings.block_out_channels, seed)

    def train(model: UNet2DModel) -> UNet2DModel:
        return train_denoiser(model, draw, scheduler, config, torch.Generator().manual_seed(seed), description=name)

    # `key` names the images (split settings, target indices); the pools are a function of it
    settings_key = dict(key, config=config, seed=seed, block_out_channels=list(settings.block_out_channels),
                        proportions=list(proportions))  # fmt: skip
    return load_or_train(cache_dir, name, settings_key, build, train, UNet2DModel.from_pretrained)


def evaluate(model: torch.nn.Module, settings: DigitsSettings, test_pixels: Sequence[torch.Tensor],
             classifier: Any, noise: torch.Tensor, seed: int) -> Dict[str, Any]:  # fmt: skip
    """Target-weighted test NLL (bits/dim), generated first-digit proportion, and the generated grey-level images."""
    scheduler = make_noise_scheduler()
    weights = (settings.target_proportion, 1 - settings.target_proportion)
    generator = torch.Generator().manual_seed(10_000 + seed)  # same dequantisation and probes for every method

    def eps_model(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return model(sample, timestep, return_dict=False)[0]

    # one batch for all test images; E over the target mix = sum_c p_c mean(NLL | class c)
    sample = digit_data.dequantize(torch.cat(list(test_pixels)), generator)  # (m, 1, 8, 8)
    image_weights = torch.cat([torch.full((len(px),), w / len(px), dtype=torch.float64)
                               for w, px in zip(weights, test_pixels)])  # fmt: skip
    log_likelihood = ode_log_likelihood(eps_model, sample, scheduler.alphas_cumprod, settings.nll_steps,
                                        generator=generator)  # fmt: skip
    nll = float((image_weights * bits_per_dim(log_likelihood, sample[0].numel(), digit_data.NUM_LEVELS)).sum())
    images = digit_data.quantize(generate(model, scheduler, noise, settings.sampling_steps))[:, 0]  # (m, 8, 8)
    predicted = classifier.predict(images.reshape(images.shape[0], -1).numpy() / 16.0)
    return dict(nll_bpd=nll, proportion=float((predicted == settings.digits[0]).mean()), images=images.numpy())


def run_digits(settings: DigitsSettings, out_dir: str, cache_dir: Optional[str]) -> Dict[str, Any]:
    """Runs the experiment, writes report.md, results.json and figures to `out_dir`, and returns the results."""
    started = time.time()
    cached_before = _cached_models(cache_dir)
    pixels, labels = digit_data.load_digit_pixels()
    split = digit_data.split_digits(labels, settings.digits, dict(settings.split_sizes), settings.split_seed)
    target_mix = (settings.target_proportion, 1 - settings.target_proportion)
    n_values = resolve_n_values(settings.n_values, digit_data.max_target_size(split, target_mix))
    classifier, classifier_accuracy = train_proportion_classifier(pixels, labels, split)
    aux_pools = [split.images(pixels, "auxiliary", d) for d in settings.digits]
    test_pixels = [_as_model_input(split.images(pixels, "test", d)) for d in settings.digits]
    data_key = dict(digits=list(settings.digits), split_sizes=dict(settings.split_sizes),
                    split_seed=settings.split_seed)  # fmt: skip

    auxiliaries = []
    for i, p in enumerate(tqdm(settings.auxiliary_proportions, desc="auxiliary models")):
        auxiliaries.append(_trained_unet(settings, cache_dir, f"aux{i + 1}", data_key, aux_pools, (p, 1 - p),
                                         settings.auxiliary_training, seed=i))  # fmt: skip
    closest = closest_auxiliary(settings)
    num_aux = len(auxiliaries)
    records: List[Dict[str, Any]] = []  # one per (seed, n, method)
    sample_images: Dict[int, Dict[str, np.ndarray]] = {}
    fitted_example = None
    progress = tqdm(total=len(settings.seeds) * (1 + len(n_values)), desc="seeds x n (evaluations)")
    for seed in settings.seeds:
        noise = torch.randn((settings.num_generated, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
        references = {f"aux{i + 1}": (model, np.eye(num_aux)[i].tolist()) for i, model in enumerate(auxiliaries)}
        references["uniform"] = (FusedUNet(auxiliaries), [1.0 / num_aux] * num_aux)
        reference_results = {
            name: dict(evaluate(model, settings, test_pixels, classifier, noise, seed), weights=weights)
            for name, (model, weights) in references.items()
        }
        progress.update(1)
        for n in n_values:
            chosen = digit_data.draw_target_indices(split, n, target_mix, seed=1_000 * seed + n)
            target_pixels = pixels[chosen]
            key = dict(data_key, target_indices=chosen.tolist())
            pools = [target_pixels[labels[chosen] == d] for d in settings.digits]
            counts = [len(pool) / n for pool in pools]  # sample uniformly from the n images
            scratch = _trained_unet(settings, cache_dir, "scratch", key, pools, counts, settings.scratch_training,
                                    seed=100 + seed)  # fmt: skip
            finetune = _trained_unet(settings, cache_dir, f"finetune-aux{closest + 1}", dict(key, start=closest), pools,
                                     counts, settings.finetune_training, seed=200 + seed,
                                     start_from=auxiliaries[closest])  # fmt: skip
            fused = FusedUNet(auxiliaries)
            fit_generator = torch.Generator().manual_seed(seed)
            latents = digit_data.dequantize(_as_model_input(target_pixels), fit_generator)  # (n, 1, 8, 8) in [-1, 1]
            fit = fit_weights(fused, make_noise_scheduler(), latents, generator=fit_generator,
                              num_noise_draws=settings.fit_noise_draws, progress_bar=False)  # fmt: skip
            weights = fit.weights.tolist()
            if seed == settings.seeds[0] and n == n_values[-1]:
                fitted_example = weights
            results = dict(reference_results)
            results["scratch"] = dict(evaluate(scratch, settings, test_pixels, classifier, noise, seed), weights=None)
            results["finetune"] = dict(evaluate(finetune, settings, test_pixels, classifier, noise, seed), weights=None)
            results["scorefusion"] = dict(evaluate(fused, settings, test_pixels, classifier, noise, seed),
                                          weights=weights)  # fmt: skip
            for method, result in results.items():
                record = dict(seed=seed, n=n, method=method, nll_bpd=result["nll_bpd"],
                              proportion=result["proportion"], weights=result["weights"])  # fmt: skip
                if method == "scorefusion":
                    record["weights_bootstrap_se"] = fit.standard_errors.tolist()
                records.append(record)
                if seed == settings.seeds[0] and n in (n_values[0], n_values[-1]):
                    sample_images.setdefault(n, {})[method] = result["images"]
            progress.update(1)
    progress.close()
    spectrum, spectrum_labels = lambda_spectrum(auxiliaries, settings, fitted_example)
    meta = dict(
        classifier_test_accuracy=classifier_accuracy, n_values=n_values, closest_auxiliary=f"aux{closest + 1}",
        split_sizes={name: {str(d): int(part[d].size) for d in settings.digits}
                     for name, part in split.indices.items()},
        wall_time_s=time.time() - started, settings=_settings_dict(settings),
        models_trained=len(_cached_models(cache_dir) - cached_before) if cache_dir is not None
        else len(settings.auxiliary_proportions) + 2 * len(settings.seeds) * len(n_values),
    )  # fmt: skip
    return write_digits_outputs(out_dir, settings, method_names(settings), records, meta, sample_images, spectrum,
                                spectrum_labels)  # fmt: skip


def lambda_spectrum(auxiliaries: Sequence[torch.nn.Module], settings: DigitsSettings,
                    fitted: Optional[Sequence[float]], num_noises: int = 8) -> Tuple[np.ndarray, List[str]]:
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


def _cached_models(cache_dir: Optional[str]) -> set:
    """Names of the finished models in the cache (staging folders start with a dot)."""
    if cache_dir is None or not os.path.isdir(cache_dir):
        return set()
    return {name for name in os.listdir(cache_dir) if not name.startswith(".")}


def _settings_dict(settings: DigitsSettings) -> Dict[str, Any]:
    return {key: asdict(value) if isinstance(value, TrainingConfig) else value for key, value in vars(settings).items()}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="the whole sweep: n = 8..all, 5 seeds, bigger UNets, longer training (hours)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1 quick, 0..4 full)")
    parser.add_argument("--n", nargs="+", default=None, help="target sizes, integers or 'all'")
    parser.add_argument("--out", default=os.path.join("results", "digits"), help="output folder")
    parser.add_argument("--cache-dir", default=None, help="trained-model cache (default: <out>/cache)")
    parser.add_argument("--no-cache", action="store_true", help="train everything, read and write no cache")
    parser.add_argument("--num-threads", type=int, default=2, help="torch CPU threads (default 2)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> DigitsSettings:
    """The preset chosen by ``--full``, with ``--seeds`` and ``--n`` applied."""
    settings = FULL if args.full else QUICK
    if args.seeds is not None:
        settings = replace(settings, seeds=tuple(args.seeds))
    if args.n is not None:
        settings = replace(settings, n_values=tuple(ALL if n == ALL else int(n) for n in args.n))
    return settings


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Command-line entry point: ``python -m diffusers_scorefusion.experiments.digits [--full] [--seeds ...]``."""
    args = parse_args(argv)
    if args.num_threads < 1:
        raise ValueError(f"--num-threads must be >= 1, got {args.num_threads}")
    torch.set_num_threads(args.num_threads)
    cache_dir = None if args.no_cache else (args.cache_dir or os.path.join(args.out, "cache"))
    results = run_digits(settings_from_args(args), args.out, cache_dir)
    print(f"wrote {args.out}/report.md ({results['meta']['wall_time_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
