"""Experiment 1 of the paper on real data: fusing four digit generators for a scarce target mix (sklearn's 8x8 digits).

Run ``python -m diffusers_scorefusion.experiments.digits`` (quick, under 10 minutes on 2 CPU cores), ``--medium``
(5 seeds, n = 8..64, under an hour) or ``--full``. Design (PAPER.md, experiment 1): two digit classes; a held-out test
split per class; four auxiliary populations mixing the two digits in proportions (0.1, 0.9), (0.3, 0.7), (0.7, 0.3),
(0.9, 0.1), each a `UNet2DModel` fine-tuned from one base trained on the pooled auxiliary data; the target is a
(0.6, 0.4) mix with n samples. Per n and seed: training from scratch and fine-tuning the closest auxiliary (both
early-stopped on a validation share of the n images, on one matched budget), ScoreFusion (weights fitted by
`fit_weights` on the n images, exact QP), weight-space merging of the auxiliaries with the fitted weights, and as
references uniform fusion, uniform merging and each auxiliary alone. Metrics: test NLL in bits/dim (probability-flow
ODE, Hutchinson trace, uniform dequantisation), held-out denoising loss, and the first digit's proportion among
generated samples (a classifier trained on the auxiliary pool).
"""

import argparse
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..fitting import fit_weights
from ..models.modeling_fused_unet import FusedUNet
from . import data as digit_data
from .digits_auto import AUTO_METHOD, AUTO_PAIRS, fit_auto, write_auto_outputs
from .digits_bake import baked_models, member_forwards_per_step
from .digits_eval import evaluate, lambda_spectrum, make_test_set, paired_difference, train_proportion_classifier
from .digits_fkc import digits_fkc_row
from .digits_models import merge_unets, train_auxiliaries, train_target_models
from .digits_report import write_digits_outputs
from .output_dirs import add_output_arguments, output_dirs
from .training import TrainingConfig, make_noise_scheduler

ALL = "all"
RECORD_KEYS = ("nll_bpd", "denoising_loss", "proportion", "weights", "training")
PAIRS = (("scorefusion", "uniform"), ("merge-fitted", "merge-uniform"), ("scorefusion", "merge-fitted"),
         ("merge-refit", "scorefusion"), ("distilled", "scorefusion"), ("merge-refit", "merge-fitted"), *AUTO_PAIRS)


@dataclass(frozen=True)
class DigitsSettings:
    """Everything that defines a run; `QUICK`, `MEDIUM` and `FULL` below are the presets."""

    preset: str
    n_values: Tuple[Union[int, str], ...]  # "all" = the whole target pool (max_n)
    seeds: Tuple[int, ...]
    base_training: TrainingConfig
    auxiliary_training: TrainingConfig
    target_training: TrainingConfig  # scratch's; finetune runs the same budget with `finetune_learning_rate`
    finetune_learning_rate: float
    block_out_channels: Tuple[int, ...] = (16, 32)
    digits: Tuple[int, int] = (7, 9)
    test_per_class: int = 40
    max_n: int = 64  # the target pool holds the class counts of the largest n; the auxiliary pool gets the rest
    auxiliary_val_fraction: float = 0.2
    target_val_fraction: float = 0.25
    auxiliary_proportions: Tuple[float, ...] = (0.1, 0.3, 0.7, 0.9)  # share of the first digit
    target_proportion: float = 0.6
    validation_draws: int = 8  # noised copies per auxiliary validation image
    target_validation_draws: int = 32  # per target validation image (there are few)
    denoising_draws: int = 32  # per test image, for the held-out denoising loss
    fit_noise_draws: int = 16
    nll_steps: int = 16
    num_generated: int = 128
    sampling_steps: int = 20
    spectrum_points: int = 6
    distill_steps: int = 300  # the distilled student's budget (Adam steps of batch 64, early-stopped)
    split_seed: int = 0


QUICK = DigitsSettings(
    preset="quick", n_values=(16, ALL), seeds=(0, 1, 2),
    base_training=TrainingConfig(steps=800, learning_rate=3e-3, batch_size=64, warmup_steps=20, eval_every=50,
                                 patience=4),
    # the uniform-in-t denoising loss barely sees the class mix that sets the auxiliaries apart (fine-tuning the base
    # towards (0.1, 0.9) moved its generated share of 7s from 0.49 to 0.15-0.24 while the validation loss moved within
    # its checkpoint-to-checkpoint noise), so each auxiliary is fine-tuned for at least `min_steps` before early
    # stopping
    auxiliary_training=TrainingConfig(steps=300, learning_rate=1e-3, batch_size=64, eval_every=25, patience=4,
                                      min_steps=150),
    target_training=TrainingConfig(steps=600, learning_rate=3e-3, batch_size=64, warmup_steps=20, eval_every=25,
                                   patience=4),
    finetune_learning_rate=1e-4,  # 5e-4 made the held-out loss of aux3 worse from the first checkpoint on
)  # fmt: skip
MEDIUM = replace(
    QUICK, preset="medium", n_values=(8, 16, 32, ALL), seeds=(0, 1, 2, 3, 4),
    base_training=replace(QUICK.base_training, steps=1500, patience=6),
    auxiliary_training=replace(QUICK.auxiliary_training, steps=600, patience=6, min_steps=300),
    target_training=replace(QUICK.target_training, steps=1000, patience=8), num_generated=256,
)  # fmt: skip
FULL = replace(
    MEDIUM, preset="full", seeds=tuple(range(10)), block_out_channels=(32, 64),
    base_training=replace(MEDIUM.base_training, steps=4000, learning_rate=2e-3, warmup_steps=100, patience=10),
    auxiliary_training=replace(MEDIUM.auxiliary_training, steps=1500, patience=10, min_steps=600),
    target_training=replace(MEDIUM.target_training, steps=2000, learning_rate=2e-3, warmup_steps=100, patience=12),
    finetune_learning_rate=5e-5, sampling_steps=30,
)  # fmt: skip
PRESETS = {"quick": QUICK, "medium": MEDIUM, "full": FULL}


def method_names(settings: DigitsSettings) -> List[str]:
    """Column order: the methods that use the target data, then the references that do not."""
    auxiliaries = [f"aux{i + 1}" for i in range(len(settings.auxiliary_proportions))]
    return ["scratch", "finetune", "scorefusion", AUTO_METHOD, "merge-fitted", "merge-refit", "distilled", "uniform",
            "merge-uniform"] + auxiliaries


def resolve_n_values(n_values: Sequence[Union[int, str]], available: int,
                     proportions: Sequence[float] = (0.6, 0.4)) -> List[int]:  # fmt: skip
    """Sorted distinct n; ``"all"`` is the whole target pool. Refuses n outside ``[2, available]`` and n too small to
    hold out a validation image of every class (each class needs at least 2 images)."""
    resolved = set()
    for n in n_values:
        if n == ALL:
            n = available
        if not isinstance(n, int) or not 2 <= n <= available:
            raise ValueError(f"n must be an integer in [2, {available}] or {ALL!r}, got {n!r}")
        if min(digit_data.class_counts(n, proportions)) < 2:
            raise ValueError(f"n={n} gives class counts {digit_data.class_counts(n, proportions)}: every class needs "
                             "at least 2 images (one to train on, one to validate on)")  # fmt: skip
        resolved.add(n)
    return sorted(resolved)


def closest_auxiliary(settings: DigitsSettings) -> int:
    """Index of the auxiliary population whose mix is closest to the target's (the one fine-tuning starts from)."""
    gaps = [abs(p - settings.target_proportion) for p in settings.auxiliary_proportions]
    return int(np.argmin(gaps))


def _per_class(pixels: np.ndarray, labels: np.ndarray, indices: np.ndarray, digits: Sequence[int]) -> List[np.ndarray]:
    return [pixels[indices[labels[indices] == d]] for d in digits]


class DigitsSetup(NamedTuple):
    """What every part of the experiment shares: the data, its split, the n values, the proportion classifier, the
    auxiliaries' train/validation parts and the cache key of their data."""

    pixels: np.ndarray
    labels: np.ndarray
    split: Any
    target_mix: Tuple[float, float]
    n_values: List[int]
    classifier: Any
    classifier_accuracy: float
    aux_parts: List[Tuple[np.ndarray, np.ndarray]]
    data_key: Dict[str, Any]


def digits_setup(settings: DigitsSettings) -> DigitsSetup:
    """Loads the digits, splits them once (split seed), resolves n and trains the proportion classifier."""
    pixels, labels = digit_data.load_digit_pixels()
    target_mix = (settings.target_proportion, 1 - settings.target_proportion)
    target_sizes = digit_data.class_counts(settings.max_n, target_mix)
    split = digit_data.split_digits(labels, settings.digits, settings.test_per_class, target_sizes, settings.split_seed)
    n_values = resolve_n_values(settings.n_values, digit_data.max_target_size(split, target_mix), target_mix)
    classifier, classifier_accuracy = train_proportion_classifier(pixels, labels, split)
    aux_parts = [digit_data.holdout(split.indices["auxiliary"][d], settings.auxiliary_val_fraction, settings.split_seed)
                 for d in settings.digits]  # fmt: skip
    data_key = dict(digits=list(settings.digits), test_per_class=settings.test_per_class, max_n=settings.max_n,
                    split_seed=settings.split_seed, auxiliary_val_fraction=settings.auxiliary_val_fraction,
                    validation_draws=settings.validation_draws)  # fmt: skip
    return DigitsSetup(pixels, labels, split, target_mix, n_values, classifier, classifier_accuracy, aux_parts,
                       data_key)  # fmt: skip


def run_digits(settings: DigitsSettings, out_dir: str, cache_dir: Optional[str]) -> Dict[str, Any]:
    """Runs the experiment, writes report.md, results.json and figures to `out_dir`, and returns the results."""
    started = time.time()
    cached_before = _cached_models(cache_dir)
    pixels, labels, split, target_mix, n_values, classifier, classifier_accuracy, aux_parts, data_key = digits_setup(
        settings
    )
    num_aux = len(settings.auxiliary_proportions)
    progress = tqdm(total=num_aux + len(settings.seeds) * (1 + len(n_values)), desc="models and evaluations")
    auxiliaries, training_records = train_auxiliaries(
        settings, cache_dir, data_key, [pixels[train] for train, _ in aux_parts], [pixels[val] for _, val in aux_parts],
        progress,
    )  # fmt: skip
    closest = closest_auxiliary(settings)
    records: List[Dict[str, Any]] = []  # one per (seed, n, method)
    pair_records: List[Dict[str, Any]] = []  # one per (seed, n, pair, metric)
    sample_images: Dict[int, Dict[str, np.ndarray]] = {}
    fitted_example, auto_fits = None, []
    uniform_weights = [1.0 / num_aux] * num_aux
    for seed in settings.seeds:
        test = make_test_set(pixels, split, target_mix, settings.denoising_draws, seed)
        noise = torch.randn((settings.num_generated, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
        references = {}
        if seed == settings.seeds[0]:  # fixed models: other seeds would only redraw the estimator noise
            references.update({f"aux{i + 1}": (model, np.eye(num_aux)[i].tolist())
                               for i, model in enumerate(auxiliaries)})  # fmt: skip
        references["uniform"] = (FusedUNet(auxiliaries), uniform_weights)
        references["merge-uniform"] = (merge_unets(auxiliaries, uniform_weights), uniform_weights)
        reference_results = {name: dict(evaluate(model, settings, test, classifier, noise, seed), weights=weights)
                             for name, (model, weights) in references.items()}  # fmt: skip
        progress.update(1)
        for n in n_values:
            chosen = digit_data.draw_target_indices(split, n, target_mix, seed=1_000 * seed + n)
            parts = [digit_data.holdout(chosen[labels[chosen] == d], settings.target_val_fraction, 1_000 * seed + n)
                     for d in settings.digits]  # fmt: skip
            key = dict(data_key, target_train=[p[0].tolist() for p in parts], target_val=[p[1].tolist() for p in parts],
                       target_validation_draws=settings.target_validation_draws)  # fmt: skip
            trained = train_target_models(settings, cache_dir, key, [pixels[p[0]] for p in parts],
                                          [pixels[p[1]] for p in parts], auxiliaries[closest], f"aux{closest + 1}",
                                          seed)  # fmt: skip
            fused = FusedUNet(auxiliaries)
            fit_generator = torch.Generator().manual_seed(seed)
            latents = digit_data.dequantize(torch.as_tensor(pixels[chosen], dtype=torch.float32).unsqueeze(1),
                                            fit_generator)  # (n, 1, 8, 8) in [-1, 1], all n images  # fmt: skip
            fit_state = fit_generator.get_state()
            auto = fit_auto(auxiliaries, latents, fit_state, settings, auto_fits, seed, n)
            fit = fit_weights(fused, make_noise_scheduler(), latents, generator=fit_generator,
                              num_noise_draws=settings.fit_noise_draws, progress_bar=False)  # fmt: skip
            weights = fit.weights.tolist()
            if seed == settings.seeds[0] and n == n_values[-1]:
                fitted_example = weights
            candidates = {"scorefusion": (fused, weights, None),
                          "merge-fitted": (merge_unets(auxiliaries, weights), weights, None),
                          AUTO_METHOD: (*auto, None)}  # fmt: skip
            candidates.update({name: (model, None, record) for name, (model, record) in trained.items()})
            candidates.update(baked_models(auxiliaries, settings, latents, fused, fit_state, seed))
            results = {name: dict(evaluate(model, settings, test, classifier, noise, seed), weights=w, training=record)
                       for name, (model, w, record) in candidates.items()}  # fmt: skip
            results.update({name: dict(result, training=None) for name, result in reference_results.items()})
            for method, result in results.items():
                record = {key: result[key] for key in RECORD_KEYS}
                if method == "scorefusion":
                    record["weights_bootstrap_se"] = fit.standard_errors.tolist()
                records.append(dict(seed=seed, n=n, method=method, **record))
                if seed == settings.seeds[0] and n in (n_values[0], n_values[-1]):
                    sample_images.setdefault(n, {})[method] = result["images"]
            for first, second in PAIRS:
                for metric in ("nll", "denoising"):
                    pair_records.append(dict(seed=seed, n=n, pair=f"{first} - {second}", metric=metric,
                                             **paired_difference(results[first], results[second], test, metric)))
            progress.update(1)
    progress.close()
    spectrum, spectrum_labels = lambda_spectrum(auxiliaries, settings, fitted_example)
    fkc = digits_fkc_row(auxiliaries, fitted_example, classifier, settings)  # scorefusion sampled with FKC
    meta = dict(
        classifier_test_accuracy=classifier_accuracy, n_values=n_values, closest_auxiliary=f"aux{closest + 1}",
        split_sizes={name: {str(d): int(part[d].size) for d in settings.digits}
                     for name, part in split.indices.items()},
        auxiliary_validation_sizes={str(d): int(val.size) for d, (_, val) in zip(settings.digits, aux_parts)},
        auxiliary_training=training_records, wall_time_s=time.time() - started, settings=_settings_dict(settings),
        num_threads=torch.get_num_threads(), fkc=fkc,
        member_forwards_per_step=member_forwards_per_step(method_names(settings), num_aux),
        models_trained=len(_cached_models(cache_dir) - cached_before) if cache_dir is not None
        else 1 + num_aux + 2 * len(settings.seeds) * len(n_values),
    )  # fmt: skip
    payload = write_digits_outputs(out_dir, settings, method_names(settings), records, pair_records, meta,
                                   sample_images, spectrum, spectrum_labels)  # fmt: skip
    write_auto_outputs(out_dir, settings, auto_fits, records)
    return payload


def _cached_models(cache_dir: Optional[str]) -> set:
    """Names of the finished models in the cache (staging folders start with a dot)."""
    if cache_dir is None or not os.path.isdir(cache_dir):
        return set()
    return {name for name in os.listdir(cache_dir) if not name.startswith(".")}


def _settings_dict(settings: DigitsSettings) -> Dict[str, Any]:
    return {key: asdict(value) if isinstance(value, TrainingConfig) else value for key, value in vars(settings).items()}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--medium", action="store_true", help="5 seeds, n = 8..64, longer budgets (under an hour)")
    preset.add_argument("--full", action="store_true", help="10 seeds, bigger UNets, longest budgets (hours)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the preset's)")
    parser.add_argument("--n", nargs="+", default=None, help="target sizes, integers or 'all'")
    add_output_arguments(parser, "digits[-<preset>]")
    parser.add_argument("--num-threads", type=int, default=1,
                        help="torch CPU threads (default 1: these tiny UNets train ~4x faster on 1 thread than on 2 "
                             "when other processes share the cores)")  # fmt: skip
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> DigitsSettings:
    """The preset chosen by ``--medium`` / ``--full`` (else quick), with ``--seeds`` and ``--n`` applied."""
    settings = FULL if args.full else MEDIUM if args.medium else QUICK
    if args.seeds is not None:
        settings = replace(settings, seeds=tuple(args.seeds))
    if args.n is not None:
        settings = replace(settings, n_values=tuple(ALL if n == ALL else int(n) for n in args.n))
    return settings


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Command-line entry point: ``python -m diffusers_scorefusion.experiments.digits [--medium | --full] ...``."""
    args = parse_args(argv)
    if args.num_threads < 1:
        raise ValueError(f"--num-threads must be >= 1, got {args.num_threads}")
    torch.set_num_threads(args.num_threads)
    settings = settings_from_args(args)
    out, cache_dir = output_dirs(args, "digits" if settings.preset == "quick" else f"digits-{settings.preset}")
    results = run_digits(settings, out, cache_dir)
    print(f"wrote {out}/report.md ({results['meta']['wall_time_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
