"""Experiment 2 of the paper: 1-D Gaussian mixtures, ScoreFusion of two auxiliary score models vs training from scratch.

Run ``python -m diffusers_scorefusion.experiments.gaussian1d`` (about a minute on 2 CPU cores) or with ``--full``.
Target: means (-6, 6), std 0.8, weights (0.6, 0.4). Auxiliaries: means (-3, 10) and (-7, 9); PAPER.md does not give
their std and weights, we use the target's (0.8 and (0.6, 0.4)). Each auxiliary model is trained on fresh draws of its
mixture (plenty of data); per n and seed, a model is trained from scratch on the n target samples and the fusion
weights are fitted on the same n samples over small timesteps (``timestep_range="small_t"``, the paper's 1-D
setting). Metric: Wasserstein-1 distance between generated samples and held-out target samples (original units).
"""

import argparse
import os
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
from .reporting import (
    atomic_write_bytes,
    markdown_table,
    mean_and_se,
    plot_metric_vs_n,
    pyplot,  # fmt: skip
    save_figure,
    write_json,
)
from .training import TrainingConfig, generate, load_or_train, make_noise_scheduler, train_denoiser

DATA_SCALE = 5.0  # model space = original units / DATA_SCALE, so the data has roughly unit scale for the VP schedule


@dataclass(frozen=True)
class Mixture1D:
    """A 1-D Gaussian mixture with a shared standard deviation."""

    means: Tuple[float, ...]
    std: float
    weights: Tuple[float, ...]

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`(count,)` float64 draws in original units."""
        components = torch.multinomial(torch.tensor(self.weights, dtype=torch.float64), count, replacement=True,
                                       generator=generator)  # fmt: skip
        noise = torch.randn(count, generator=generator, dtype=torch.float64)
        return torch.tensor(self.means, dtype=torch.float64)[components] + self.std * noise

    def density(self, x: np.ndarray) -> np.ndarray:
        """Probability density at `x` (original units)."""
        parts = [w * np.exp(-0.5 * ((x - m) / self.std) ** 2) for m, w in zip(self.means, self.weights)]
        return sum(parts) / (self.std * np.sqrt(2 * np.pi))


TARGET = Mixture1D(means=(-6.0, 6.0), std=0.8, weights=(0.6, 0.4))
AUXILIARIES = (Mixture1D(means=(-3.0, 10.0), std=0.8, weights=(0.6, 0.4)),
               Mixture1D(means=(-7.0, 9.0), std=0.8, weights=(0.6, 0.4)))  # fmt: skip


def wasserstein1(samples: np.ndarray, reference: np.ndarray) -> float:
    """Exact W1 between two empirical 1-D distributions: ``int |F(x) - G(x)| dx`` over the merged sample points."""
    a, b = np.sort(np.asarray(samples, np.float64).ravel()), np.sort(np.asarray(reference, np.float64).ravel())
    if a.size == 0 or b.size == 0:
        raise ValueError(f"wasserstein1 needs two non-empty samples, got sizes {a.size} and {b.size}")
    points = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(a, points[:-1], side="right") / a.size
    cdf_b = np.searchsorted(b, points[:-1], side="right") / b.size
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(points)))


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
    """A run's settings; `QUICK_1D` and `FULL_1D` are the presets."""

    preset: str
    n_values: Tuple[int, ...]
    seeds: Tuple[int, ...]
    auxiliary_training: TrainingConfig
    scratch_training: TrainingConfig
    hidden_size: int = 128
    num_generated: int = 4000
    num_test: int = 4000
    sampling_steps: int = 50
    fit_noise_draws: int = 16


QUICK_1D = Gaussian1DSettings(
    preset="quick", n_values=(16, 64, 256, 1024), seeds=(0, 1, 2),
    auxiliary_training=TrainingConfig(steps=2000, learning_rate=2e-3, batch_size=256),
    scratch_training=TrainingConfig(steps=2000, learning_rate=2e-3, batch_size=256),
)  # fmt: skip
FULL_1D = replace(QUICK_1D, preset="full", n_values=(16, 64, 256, 1024, 4096), seeds=(0, 1, 2, 3, 4),
                  auxiliary_training=TrainingConfig(steps=5000, learning_rate=2e-3, batch_size=512),
                  scratch_training=TrainingConfig(steps=5000, learning_rate=2e-3, batch_size=512))  # fmt: skip


def _train_mlp(settings: Gaussian1DSettings, cache_dir: Optional[str], name: str, key: Dict[str, Any],
               draw_batch, config: TrainingConfig, seed: int) -> MLPDenoiser:  # fmt: skip
    def build() -> MLPDenoiser:
        torch.manual_seed(seed)
        return MLPDenoiser(hidden_size=settings.hidden_size)

    def train(model: MLPDenoiser) -> MLPDenoiser:
        return train_denoiser(model, draw_batch, make_noise_scheduler(), config, torch.Generator().manual_seed(seed),
                              description=name)  # fmt: skip

    settings_key = dict(key, config=config, seed=seed, hidden_size=settings.hidden_size, data_scale=DATA_SCALE)
    return load_or_train(cache_dir, name, settings_key, build, train, MLPDenoiser.from_pretrained)


def _generate(model: nn.Module, settings: Gaussian1DSettings, seed: int) -> np.ndarray:
    noise = torch.randn((settings.num_generated, 1), generator=torch.Generator().manual_seed(seed))
    sample = generate(model, make_noise_scheduler(clip_sample=False), noise, settings.sampling_steps)  # (m, 1)
    return sample[:, 0].numpy() * DATA_SCALE


def run_gaussian1d(settings: Gaussian1DSettings, out_dir: str, cache_dir: Optional[str]) -> Dict[str, Any]:
    """Runs the sweep and writes report.md, results.json and figures to `out_dir`; returns the results."""
    started = time.time()
    auxiliaries = []
    for i, mixture in enumerate(AUXILIARIES):
        def draw(batch_size: int, generator: torch.Generator, mixture: Mixture1D = mixture) -> torch.Tensor:
            return (mixture.sample(batch_size, generator) / DATA_SCALE).float()[:, None]

        auxiliaries.append(_train_mlp(settings, cache_dir, f"aux{i + 1}", dict(mixture=asdict(mixture)), draw,
                                      settings.auxiliary_training, seed=i))  # fmt: skip
    records, histograms = [], {}
    for seed in tqdm(settings.seeds, desc="seeds"):
        test = TARGET.sample(settings.num_test, torch.Generator().manual_seed(50_000 + seed)).numpy()
        for n in settings.n_values:
            target = TARGET.sample(n, torch.Generator().manual_seed(1_000 * seed + n))  # (n,) original units
            latents = (target / DATA_SCALE).float()[:, None]  # (n, 1) model space

            def draw(batch_size: int, generator: torch.Generator, latents: torch.Tensor = latents) -> torch.Tensor:
                return latents[torch.randint(0, latents.shape[0], (batch_size,), generator=generator)]

            scratch = _train_mlp(settings, cache_dir, "scratch", dict(target=target.tolist()), draw,
                                 settings.scratch_training, seed=100 + seed)  # fmt: skip
            fused = FusedUNet(auxiliaries)
            fit = fit_weights(fused, make_noise_scheduler(), latents, generator=torch.Generator().manual_seed(seed),
                              num_noise_draws=settings.fit_noise_draws, timestep_range="small_t", progress_bar=False)
            models = {"scratch": (scratch, None), "scorefusion": (fused, fit.weights.tolist())}
            models.update({f"aux{i + 1}": (m, np.eye(len(auxiliaries))[i].tolist()) for i, m in enumerate(auxiliaries)})
            for method, (model, weights) in models.items():
                generated = _generate(model, settings, seed)
                records.append(dict(seed=seed, n=n, method=method, w1=wasserstein1(generated, test), weights=weights))
                if seed == settings.seeds[0]:
                    histograms.setdefault(n, {})[method] = generated
    methods = ["scratch", "scorefusion"] + [f"aux{i + 1}" for i in range(len(auxiliaries))]
    rows = _aggregate(records, methods)
    spectrum = _spectrum(auxiliaries, settings)
    meta = dict(wall_time_s=time.time() - started, settings={k: (asdict(v) if isinstance(v, TrainingConfig) else v)
                                                              for k, v in vars(settings).items()})  # fmt: skip
    payload = dict(experiment="gaussian1d", units="w1: Wasserstein-1 distance in the data's original units",
                   preset=settings.preset, target=asdict(TARGET), auxiliaries=[asdict(a) for a in AUXILIARIES],
                   rows=rows, records=records, meta=meta)  # fmt: skip
    _write_outputs(out_dir, settings, methods, payload, histograms, spectrum)
    return payload


def _aggregate(records: List[Dict[str, Any]], methods: Sequence[str]) -> List[Dict[str, Any]]:
    rows = []
    for n in sorted({r["n"] for r in records}):
        for method in methods:
            chosen = [r for r in records if r["n"] == n and r["method"] == method]
            w1, w1_se = mean_and_se([r["w1"] for r in chosen])
            weights = None
            if chosen[0]["weights"] is not None:
                weights = np.mean([r["weights"] for r in chosen], axis=0).round(4).tolist()
            rows.append(dict(n=n, method=method, w1=w1, w1_se=w1_se, weights=weights, num_seeds=len(chosen)))
    return rows


def _spectrum(auxiliaries: Sequence[nn.Module], settings: Gaussian1DSettings) -> Dict[float, np.ndarray]:
    """Samples from one set of initial noises for ``lambda = (1 - a, a)``, a from 0 to 1."""
    fused = FusedUNet(auxiliaries)
    spectrum = {}
    for a in np.linspace(0, 1, 5):
        fused.set_weights([1 - a, a])
        spectrum[float(a)] = _generate(fused, settings, seed=777)
    return spectrum


def _write_outputs(out_dir: str, settings: Gaussian1DSettings, methods: Sequence[str], payload: Dict[str, Any],
                   histograms: Dict[int, Dict[str, np.ndarray]], spectrum: Dict[float, np.ndarray]) -> None:
    rows = payload["rows"]
    write_json(os.path.join(out_dir, "results.json"), payload)
    plot_metric_vs_n(rows, methods, "w1", "w1_se", "W1 to held-out target samples (lower is better)",
                     "1-D mixtures: W1 vs number of target samples", os.path.join(out_dir, "w1_vs_n.png"), log_y=True)
    plt = pyplot()
    grid = np.linspace(-14, 16, 600)
    ns = sorted(histograms)
    figure, axes = plt.subplots(1, len(ns) + 1, figsize=(3.3 * (len(ns) + 1), 2.8), squeeze=False)
    for axis, n in zip(axes[0], ns):
        for method in ("scratch", "scorefusion"):
            axis.hist(histograms[n][method], bins=120, range=(-14, 16), density=True, histtype="step", label=method)
        axis.plot(grid, TARGET.density(grid), "k--", lw=0.8, label="target")
        axis.set_title(f"n = {n}", fontsize=8)
    axis = axes[0][-1]
    for a, generated in spectrum.items():
        label = f"λ=({1 - a:.2f}, {a:.2f})"
        axis.hist(generated, bins=120, range=(-14, 16), density=True, histtype="step", label=label)
    axis.set_title("λ-spectrum: aux1 → aux2 (same noise)", fontsize=8)
    for axis in axes[0]:
        axis.legend(fontsize=6)
        axis.tick_params(labelsize=6)
    save_figure(figure, os.path.join(out_dir, "samples.png"))
    fusion = [r for r in rows if r["method"] == "scorefusion"]
    lines = [
        f"# 1-D Gaussian mixtures ({settings.preset} run)", "",
        (f"Target {asdict(TARGET)}; auxiliaries {[asdict(a) for a in AUXILIARIES]} (auxiliary std and weights are our "
        "assumption: PAPER.md gives only their means). Score networks: MLPs (hidden "
        f"{settings.hidden_size}), DDPM epsilon loss, data divided by {DATA_SCALE}; auxiliaries: "
        f"{settings.auxiliary_training.steps} steps on fresh draws; scratch: {settings.scratch_training.steps} steps "
        "on "
        "the n samples; scorefusion: `fit_weights` on the same n samples, small timesteps only (sigma_t <= 0.1). "
        f"Metric: W1 between {settings.num_generated} generated samples (DDIM, {settings.sampling_steps} steps) and "
        f"{settings.num_test} held-out target samples, original units; ± is the standard error over "
        f"{len(settings.seeds)} seeds."), "",
        "## W1 (lower is better)", "", markdown_table(rows, methods, "w1", "w1_se", digits=3, best="min"), "",
        "## Fitted weights (mean over seeds)", "", "| n | λ (aux1, aux2) |", "| ---: | --- |",
        *[f"| {r['n']} | {r['weights'][0]:.3f}, {r['weights'][1]:.3f} |" for r in fusion], "",
        "![W1 vs n](w1_vs_n.png)", "", "![samples](samples.png)", "",
        f"Wall time: {payload['meta']['wall_time_s']:.0f} s.", "",
    ]  # fmt: skip
    atomic_write_bytes(os.path.join(out_dir, "report.md"), "\n".join(lines).encode())


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Command-line entry point: ``python -m diffusers_scorefusion.experiments.gaussian1d [--full]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="n up to 4096, 5 seeds, longer training")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--out", default=os.path.join("results", "gaussian1d"))
    parser.add_argument("--cache-dir", default=None, help="trained-model cache (default: <out>/cache)")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--num-threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.num_threads < 1:
        raise ValueError(f"--num-threads must be >= 1, got {args.num_threads}")
    torch.set_num_threads(args.num_threads)
    settings = FULL_1D if args.full else QUICK_1D
    if args.seeds is not None:
        settings = replace(settings, seeds=tuple(args.seeds))
    cache_dir = None if args.no_cache else (args.cache_dir or os.path.join(args.out, "cache"))
    payload = run_gaussian1d(settings, args.out, cache_dir)
    print(f"wrote {args.out}/report.md ({payload['meta']['wall_time_s']:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
