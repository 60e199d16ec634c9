"""Experiment 2 of the paper: 1-D Gaussian mixtures, ScoreFusion of two auxiliary score models vs training from scratch.

Run ``python -m diffusers_scorefusion.experiments.gaussian1d`` (``--setup paper``, the default) or with
``--setup common-scale`` (each about 15 minutes on one free CPU core: the 10 sampling trials of 8,096 samples per
model dominate; ``--trials`` lowers them); ``--full`` runs 5 seeds with longer training. The reference notebook's
setup: target means (-6, 6), std 0.8, weights (0.6, 0.4); auxiliary 1 means (-3, 10), std 1, weights (0.5, 0.5);
auxiliary 2 means (-7, 9), std 1, weights (0.7, 0.3); auxiliary sets 16,384 train / 4,096 validation; target n in
{32, ..., 1024} with n/4 validation points. ``paper``: every data set is standardised by its own sample mean and
std (the auxiliaries' scores are learned in their own coordinates and fused in the target's; samples are mapped
back with the target's); ``common-scale``: every data set is divided by one constant, so the fusion acts on the
distributions themselves.
Per n and seed: a model trained from scratch on the n target samples (early-stopped on the validation points) and
ScoreFusion with weights fitted on the same n samples over small timesteps (``timestep_range="small_t"``, the
paper's 1-D setting) and over the whole range. Metric: W1 between 8,096 generated samples and 8,096 held-out target
samples, in the data's units, over sampling trials. Then what the fused sampler samples (`gaussian1d_analysis`).
"""

import argparse
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn
from tqdm.auto import tqdm

from ..fitting import fit_weights
from ..models.modeling_fused_unet import FusedUNet
from .denoising import denoising_loss, make_noised_set
from .gaussian1d_analysis import corrector_study, what_is_sampled
from .gaussian1d_auto import FITS, append_auto_section, fit_record, record_weights
from .gaussian1d_fkc import FKC_CONFIGS, fkc_study
from .gaussian1d_report import write_gaussian1d_outputs
from .mixtures1d import Mixture1D, wasserstein1
from .output_dirs import add_output_arguments, output_dirs
from .training import TrainingConfig, generate, load_or_train, make_noise_scheduler, train_denoiser

__all__ = ["AUXILIARIES", "TARGET", "Mixture1D", "MLPDenoiser", "run_gaussian1d", "wasserstein1"]

TARGET = Mixture1D(means=(-6.0, 6.0), std=0.8, weights=(0.6, 0.4))
AUXILIARIES = (Mixture1D(means=(-3.0, 10.0), std=1.0, weights=(0.5, 0.5)),
               Mixture1D(means=(-7.0, 9.0), std=1.0, weights=(0.7, 0.3)))  # fmt: skip
SETUPS = ("paper", "common-scale")
REFERENCE_WEIGHTS = (0.578, 0.422)  # the reference notebook's fitted lambda at n = 1024 (paper setup)


class MLPDenoiser(ModelMixin, ConfigMixin):
    """A small epsilon-prediction network for `(B, 1)` samples with the Diffusers calling convention."""

    @register_to_config
    def __init__(self, hidden_size: int = 128, num_layers: int = 3, in_channels: int = 1, out_channels: int = 1,
                 sample_size: int = 1, num_train_timesteps: int = 1000):  # fmt: skip
        super().__init__()
        frequencies = torch.exp(torch.linspace(0, np.log(500.0), 16))
        self.register_buffer("frequencies", frequencies, persistent=False)
        layers: List[nn.Module] = [nn.Linear(in_channels + 32, hidden_size), nn.SiLU()]
        for _ in range(num_layers - 1):
            layers += [nn.Linear(hidden_size, hidden_size), nn.SiLU()]
        layers.append(nn.Linear(hidden_size, out_channels))
        self.net = nn.Sequential(*layers)

    def forward(self, sample: torch.Tensor, timestep: Any, return_dict: bool = True):
        if sample.ndim != 2 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"sample must have shape (B, {self.config.in_channels}), got {tuple(sample.shape)}")
        t = torch.as_tensor(timestep, dtype=sample.dtype, device=sample.device).reshape(-1).expand(sample.shape[0])
        angles = (t / self.config.num_train_timesteps)[:, None] * self.frequencies[None]  # (B, 16)
        features = torch.cat([sample, torch.sin(angles), torch.cos(angles)], dim=1)
        noise_pred = self.net(features)
        return UNet2DOutput(sample=noise_pred) if return_dict else (noise_pred,)


@dataclass(frozen=True)
class Gaussian1DSettings:
    """A run's settings; `QUICK_1D` and `FULL_1D` are the presets, `setup` chooses the coordinates."""

    preset: str
    setup: str
    n_values: Tuple[int, ...]
    seeds: Tuple[int, ...]
    auxiliary_training: TrainingConfig
    scratch_training: TrainingConfig
    hidden_size: int = 128
    auxiliary_sizes: Tuple[int, int] = (16384, 4096)  # train, validation
    validation_fraction: float = 0.25  # target validation points: n / 4
    validation_draws: int = 4  # noised copies per auxiliary validation point
    target_validation_draws: int = 64  # per target validation point (there are few)
    common_scale: float = 5.0  # common-scale setup: model space = data / common_scale
    num_test: int = 8096
    num_generated: int = 8096
    num_trials: int = 10
    sampling_steps: int = 50
    fit_noise_draws: int = 16
    lambda_grid: int = 21
    corrector_steps: Tuple[int, ...] = (0, 1, 2, 5, 10, 20, 50)
    trained_corrector_steps: Tuple[int, ...] = (0, 1, 5, 20)
    fkc_configs: Tuple[Tuple[Optional[int], int, Optional[float]], ...] = FKC_CONFIGS  # (particles, steps, clamp)

    def __post_init__(self):
        if self.setup not in SETUPS:
            raise ValueError(f"setup must be one of {SETUPS}, got {self.setup!r}")
        if min(self.n_values) * self.validation_fraction < 1:
            raise ValueError(f"n * validation_fraction must be >= 1 for every n, got n_values {self.n_values}")


QUICK_1D = Gaussian1DSettings(
    preset="quick", setup="paper", n_values=(32, 64, 128, 256, 512, 1024), seeds=(0, 1, 2),
    auxiliary_training=TrainingConfig(steps=4000, learning_rate=2e-3, batch_size=512, eval_every=200, patience=5),
    scratch_training=TrainingConfig(steps=3000, learning_rate=2e-3, batch_size=256, eval_every=100, patience=6),
)  # fmt: skip
FULL_1D = replace(QUICK_1D, preset="full", seeds=(0, 1, 2, 3, 4),
                  auxiliary_training=replace(QUICK_1D.auxiliary_training, steps=8000, patience=8),
                  scratch_training=replace(QUICK_1D.scratch_training, steps=6000, patience=10))  # fmt: skip


@dataclass(frozen=True)
class Coordinates:
    """Model space ``z = (x - shift) / scale`` of one data set."""

    shift: float
    scale: float

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.shift) / self.scale).float()[:, None]  # (m, 1)

    def to_data(self, z: np.ndarray) -> np.ndarray:
        return self.shift + self.scale * np.asarray(z, dtype=np.float64)


def coordinates(settings: Gaussian1DSettings, train: torch.Tensor) -> Coordinates:
    """``paper``: the training set's sample mean and std (as the reference standardises); else the common scale."""
    if settings.setup == "paper":
        return Coordinates(float(train.mean()), float(train.std()))
    return Coordinates(0.0, settings.common_scale)


def _train_mlp(settings: Gaussian1DSettings, cache_dir: Optional[str], name: str, key: Dict[str, Any],
               train: torch.Tensor, validation: torch.Tensor, config: TrainingConfig, draws: int,
               seed: int) -> Tuple[MLPDenoiser, Dict[str, Any]]:  # fmt: skip
    """An MLP trained on model-space points `train` `(m, 1)`, early-stopped on `validation` `(v, 1)`."""
    scheduler = make_noise_scheduler()
    noised = make_noised_set(validation, draws, scheduler, torch.Generator().manual_seed(seed + 31))

    def draw(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return train[torch.randint(0, train.shape[0], (batch_size,), generator=generator)]

    def build() -> MLPDenoiser:
        torch.manual_seed(seed)
        return MLPDenoiser(hidden_size=settings.hidden_size)

    def fit(model: MLPDenoiser) -> Tuple[MLPDenoiser, Dict[str, Any]]:
        return train_denoiser(model, draw, scheduler, config, torch.Generator().manual_seed(seed), description=name,
                              validation=lambda m: denoising_loss(m, noised))  # fmt: skip

    settings_key = dict(key, config=config, seed=seed, hidden_size=settings.hidden_size, draws=draws)
    return load_or_train(cache_dir, name, settings_key, build, fit, MLPDenoiser.from_pretrained)


def sample_model(model: nn.Module, settings: Gaussian1DSettings, noise_seed: int, **corrector: Any) -> np.ndarray:
    """`num_generated` DDIM samples in model space (optionally with Langevin corrector steps), float64."""
    noise = torch.randn((settings.num_generated, 1), generator=torch.Generator().manual_seed(noise_seed))
    sample = generate(model, make_noise_scheduler(clip_sample=False), noise, settings.sampling_steps, **corrector)
    return sample[:, 0].double().numpy()


def train_auxiliaries(settings: Gaussian1DSettings, cache_dir: Optional[str]) -> List[Dict[str, Any]]:
    """Each auxiliary's data, coordinates, trained model and training record."""
    auxiliaries = []
    for i, mixture in enumerate(AUXILIARIES):
        generator = torch.Generator().manual_seed(900 + i)
        train, val = (mixture.sample(size, generator) for size in settings.auxiliary_sizes)
        coords = coordinates(settings, train)
        key = dict(mixture=asdict(mixture), sizes=list(settings.auxiliary_sizes), data_seed=900 + i,
                   coordinates=asdict(coords))  # fmt: skip
        model, record = _train_mlp(settings, cache_dir, f"aux{i + 1}", key, coords.to_model(train),
                                   coords.to_model(val), settings.auxiliary_training, settings.validation_draws, seed=i)
        auxiliaries.append(dict(mixture=mixture, coordinates=coords, model=model, training=record))
    return auxiliaries


def run_gaussian1d(settings: Gaussian1DSettings, out_dir: str, cache_dir: Optional[str]) -> Dict[str, Any]:
    """Runs the sweep and the analyses; writes report.md, results.json and figures to `out_dir`; returns the results."""
    started = time.time()
    auxiliaries = train_auxiliaries(settings, cache_dir)
    members = [aux["model"] for aux in auxiliaries]
    aux_names = [f"aux{i + 1}" for i in range(len(members))]
    # the auxiliaries alone do not depend on the target data: their model-space samples are drawn once per trial
    aux_samples = {(name, trial): sample_model(model, settings, noise_seed=70_000 + trial)
                   for trial in range(settings.num_trials) for name, model in zip(aux_names, members)}  # fmt: skip
    records, fits, histograms, examples = [], [], {}, {}
    progress = tqdm(total=len(settings.seeds) * len(settings.n_values), desc="seeds x n")
    for seed in settings.seeds:
        test = TARGET.sample(settings.num_test, torch.Generator().manual_seed(50_000 + seed)).numpy()
        for n in settings.n_values:
            generator = torch.Generator().manual_seed(1_000 * seed + n)
            train = TARGET.sample(n, generator)
            val = TARGET.sample(max(1, int(round(n * settings.validation_fraction))), generator)
            coords = coordinates(settings, train)
            key = dict(target=train.tolist(), validation=val.tolist(), coordinates=asdict(coords))
            scratch, record = _train_mlp(settings, cache_dir, "scratch", key, coords.to_model(train),
                                         coords.to_model(val), settings.scratch_training,
                                         settings.target_validation_draws, seed=100 + seed)  # fmt: skip
            models: Dict[str, Tuple[nn.Module, Any]] = {"scratch": (scratch, None)}
            for method, timestep_range, num_timestep_bins in FITS:
                fused = FusedUNet(members)
                fit = fit_weights(fused, make_noise_scheduler(), coords.to_model(train),
                                  generator=torch.Generator().manual_seed(seed),
                                  num_noise_draws=settings.fit_noise_draws, timestep_range=timestep_range,
                                  num_timestep_bins=num_timestep_bins, progress_bar=False)  # fmt: skip
                models[method] = (fused, fit.weights.tolist())
                fits.append(dict(seed=seed, n=n, method=method, **fit_record(fit)))
            for trial in range(settings.num_trials):
                generated = {method: sample_model(model, settings, noise_seed=10_000 * seed + 100 * trial + n % 97)
                             for method, (model, _) in models.items()}  # fmt: skip
                generated.update({name: aux_samples[(name, trial)] for name in aux_names})
                for method, z in generated.items():
                    weights = models[method][1] if method in models else np.eye(len(members))[aux_names.index(method)]
                    records.append(dict(seed=seed, n=n, method=method, trial=trial,
                                        w1=wasserstein1(coords.to_data(z), test),
                                        weights=record_weights(weights),
                                        training=record if method == "scratch" else None))  # fmt: skip
                    if seed == settings.seeds[0] and trial == 0:
                        histograms.setdefault(n, {})[method] = coords.to_data(z)
            if seed == settings.seeds[0] and n == settings.n_values[-1]:
                examples = dict(coordinates=coords, test=test)
            progress.update(1)
    progress.close()
    largest = settings.n_values[-1]
    marks = {method: np.mean([f["weights"][0] for f in fits if f["n"] == largest and f["method"] == method])
             for method in ("scorefusion", "scorefusion-full")}  # fmt: skip
    sampled = what_is_sampled(settings, TARGET, auxiliaries, examples["coordinates"], marks["scorefusion"],
                              sample_model)  # fmt: skip
    corrected = corrector_study(settings, TARGET, auxiliaries, examples["coordinates"], marks["scorefusion"],
                                sample_model)  # fmt: skip
    fkc = fkc_study(settings, TARGET, auxiliaries, examples["coordinates"], marks["scorefusion"],
                    configs=settings.fkc_configs)  # fmt: skip
    meta = dict(wall_time_s=time.time() - started, num_threads=torch.get_num_threads(),
                auxiliary_coordinates=[asdict(a["coordinates"]) for a in auxiliaries],
                auxiliary_training=[a["training"] for a in auxiliaries], lambda_marks=marks,
                settings={k: (asdict(v) if isinstance(v, TrainingConfig) else v) for k, v in vars(settings).items()})
    payload = dict(experiment="gaussian1d", setup=settings.setup, preset=settings.preset,
                   units="w1: Wasserstein-1 distance in the data's original units", target=asdict(TARGET),
                   auxiliaries=[asdict(a) for a in AUXILIARIES], reference_weights=list(REFERENCE_WEIGHTS),
                   records=records, fits=fits, what_is_sampled=sampled, corrector=corrected, fkc=fkc,
                   meta=meta)  # fmt: skip
    payload = write_gaussian1d_outputs(out_dir, settings, payload, histograms)
    append_auto_section(out_dir, payload)
    return payload


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", choices=SETUPS, default="paper",
                        help="paper: each data set standardised by its own mean and std (the reference's); "
                             "common-scale: all data divided by one constant")  # fmt: skip
    parser.add_argument("--full", action="store_true", help="5 seeds, longer training")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--trials", type=int, default=None, help="sampling trials per model (default 10)")
    add_output_arguments(parser, "gaussian1d[-common-scale]")
    parser.add_argument("--num-threads", type=int, default=1,
                        help="torch CPU threads (default 1: these small MLPs run several times faster on 1 thread "
                             "than on 2 when other processes share the cores)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Command-line entry point: ``python -m diffusers_scorefusion.experiments.gaussian1d [--setup ...] [--full]``."""
    args = parse_args(argv)
    if args.num_threads < 1:
        raise ValueError(f"--num-threads must be >= 1, got {args.num_threads}")
    if args.trials is not None and args.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {args.trials}")
    torch.set_num_threads(args.num_threads)
    settings = replace(FULL_1D if args.full else QUICK_1D, setup=args.setup)
    if args.seeds is not None:
        settings = replace(settings, seeds=tuple(args.seeds))
    if args.trials is not None:
        settings = replace(settings, num_trials=args.trials)
    out, cache_dir = output_dirs(args, "gaussian1d" if args.setup == "paper" else f"gaussian1d-{args.setup}")
    payload = run_gaussian1d(settings, out, cache_dir)
    print(f"wrote {out}/report.md ({payload['meta']['wall_time_s']:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
