"""The digits experiment's FKC row: the fitted fusion sampled with Feynman-Kac correctors in 64 dimensions.

Same model as `scorefusion` (the four auxiliaries with the weights fitted on the largest n, first seed), so its test
NLL is scorefusion's: only sampling changes. Compared: the experiment's DDIM sampler, plain fused DDPM, and FKC (DDPM,
particles = `--particles` images per group, ESS-triggered systematic resampling) without and with increment clamping.
Reported: the share of the first digit (7) among generated images, the number of resamplings, and the ESS trace
(figure). In 64 dimensions the log-weight increments are sums over pixels, so the weights can degenerate (ESS near 1
after a few steps: the group collapses to a few ancestors); clamping the centred per-step increments bounds that.

Run (on the shared cache of trained models): ``python -m diffusers_scorefusion.experiments.digits_fkc
--cache-dir /work/cache/digits-quick --out /tmp/fkc-digits``.
"""

import argparse
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..fitting import fit_weights
from ..models.modeling_fused_unet import FusedUNet
from . import data as digit_data
from .digits_models import train_auxiliaries
from .gaussian1d_fkc import fkc_generate
from .training import generate, make_noise_scheduler


def fitted_fusion(settings: Any, cache_dir: Optional[str]) -> Dict[str, Any]:
    """The auxiliaries (from the cache when trained before), the classifier, and the fusion fitted on the largest n
    of the first seed, exactly as `run_digits` builds `scorefusion`."""
    from .digits import digits_setup

    pixels, labels, split, target_mix, n_values, classifier, _, aux_parts, data_key = digits_setup(settings)
    n = n_values[-1]
    auxiliaries, _ = train_auxiliaries(settings, cache_dir, data_key, [pixels[train] for train, _ in aux_parts],
                                       [pixels[val] for _, val in aux_parts])  # fmt: skip
    seed = settings.seeds[0]
    chosen = digit_data.draw_target_indices(split, n, target_mix, seed=1_000 * seed + n)
    fused = FusedUNet(auxiliaries)
    fit_generator = torch.Generator().manual_seed(seed)
    latents = digit_data.dequantize(torch.as_tensor(pixels[chosen], dtype=torch.float32).unsqueeze(1), fit_generator)
    fit = fit_weights(fused, make_noise_scheduler(), latents, generator=fit_generator,
                      num_noise_draws=settings.fit_noise_draws, progress_bar=False)  # fmt: skip
    fused.set_weights(fit.weights.tolist())
    return dict(fused=fused, classifier=classifier, n=n, weights=fit.weights.tolist())


def share_of_first_digit(images: torch.Tensor, classifier: Any, digit: int) -> float:
    """Share of generated `(g, 1, 8, 8)` samples in [-1, 1] that the classifier calls `digit`."""
    pixels = digit_data.quantize(images)[:, 0].reshape(images.shape[0], -1).numpy() / 16.0
    return float((classifier.predict(pixels) == digit).mean())


def digits_fkc_study(fused: FusedUNet, classifier: Any, settings: Any, num_generated: int, steps: int,
                     particles: int, clamps: Sequence[Optional[float]] = (None, 1.0, 0.1),
                     ) -> Dict[str, Any]:  # fmt: skip
    """Share of the first digit for DDIM (the experiment's sampler), plain DDPM and FKC with each clamp."""
    noise = torch.randn((num_generated, 1, 8, 8), generator=torch.Generator().manual_seed(settings.seeds[0]))
    digit = settings.digits[0]
    scheduler = make_noise_scheduler()  # clip_sample=True: images live in [-1, 1]
    with torch.no_grad():
        ddim = generate(fused, scheduler, noise, steps)
        rows: List[Dict[str, Any]] = [dict(sampler="DDIM (experiment's)", clamp=None, share=share_of_first_digit(
            ddim, classifier, digit), resamplings=0, ess=None, distinct_final=None)]  # fmt: skip
        configs = [("plain DDPM", None, None)] + [("FKC", particles, clamp) for clamp in clamps]
        for sampler, num_particles, clamp in tqdm(configs, desc="FKC digits", leave=False):
            generator = torch.Generator().manual_seed(99)
            images, info = fkc_generate(fused, noise, steps, num_particles, increment_clamp=clamp, generator=generator,
                                        noise_scheduler=scheduler)  # fmt: skip
            rows.append(dict(sampler=sampler, clamp=clamp, share=share_of_first_digit(images, classifier, digit),
                             resamplings=info["resamplings"], ess=info["ess"] or None,
                             distinct_final=info["distinct_final"]))  # fmt: skip
    return dict(particles=particles, steps=steps, num_generated=num_generated, rows=rows)


def digits_fkc_row(auxiliaries: Sequence[Any], weights: Sequence[float], classifier: Any, settings: Any,
                   particles: int = 16) -> Dict[str, Any]:
    """The FKC study run inside `run_digits`: the experiment's steps and image count, groups of
    ``gcd(particles, num_generated)`` particles, clamps none and 1."""
    group = math.gcd(particles, settings.num_generated)
    if group < 2:
        raise ValueError(f"num_generated ({settings.num_generated}) must share a factor >= 2 with {particles}")
    fused = FusedUNet(list(auxiliaries), weights=list(weights))
    return digits_fkc_study(fused, classifier, settings, settings.num_generated, settings.sampling_steps, group,
                            clamps=(None, 1.0))  # fmt: skip


def fkc_report_lines(study: Dict[str, Any], digit: int, scorefusion_nll: Optional[float]) -> List[str]:
    """The report's FKC section: the share of `digit` per sampler, resamplings, final ESS, distinct ancestors."""
    nll = f"{scorefusion_nll:.4f} bits/dim" if scorefusion_nll is not None else "scorefusion's"
    lines = [
        (f"The scorefusion model of the largest n (first seed) sampled with Feynman-Kac correctors: DDPM, "
         f"{study['steps']} steps, {study['num_generated']} images in groups of {study['particles']} particles "
         f"(resampling when ESS < N/2 and at the end). Same model, so the test NLL is scorefusion's ({nll}); only "
         f"sampling changes. ESS trace: fkc_ess.png."), "",
        f"| sampler | increment clamp | share of {digit}s | resamplings | final ESS | distinct ancestors at the end |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for row in study["rows"]:
        ess = f"{row['ess'][-1]:.2f}" if row["ess"] else "-"
        distinct = f"{row['distinct_final']:.1f}" if row["distinct_final"] is not None else "-"
        clamp = row["clamp"] if row["clamp"] is not None else "-"
        lines.append(f"| {row['sampler']} | {clamp} | {row['share']:.3f} | {row['resamplings']} | {ess} | {distinct} |")
    return lines


def plot_ess(study: Dict[str, Any], path: str) -> None:
    """ESS (mean over groups) after each step, per clamp."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for row in study["rows"]:
        if row["ess"]:
            axis.plot(row["ess"], label=f"clamp {row['clamp']}" if row["clamp"] is not None else "no clamp")
    axis.axhline(study["particles"] / 2, color="grey", ls=":", lw=1, label="resampling threshold (N/2)")
    axis.set_xlabel("sampler step")
    axis.set_ylabel(f"ESS (of {study['particles']} particles)")
    axis.set_title("digits (64-D): FKC effective sample size", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    from .digits import MEDIUM, QUICK

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--medium", action="store_true")
    parser.add_argument("--cache-dir", required=True, help="the digits experiment's trained-model cache")
    parser.add_argument("--out", required=True)
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--num-generated", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--weights", type=float, nargs="+", default=None, help="other weights than the fitted ones")
    parser.add_argument("--num-threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    settings = MEDIUM if args.medium else QUICK
    built = fitted_fusion(settings, args.cache_dir)
    if args.weights is not None:
        built["fused"].set_weights(args.weights)
        built["weights"] = args.weights
    study = digits_fkc_study(built["fused"], built["classifier"], settings, args.num_generated, args.steps,
                             args.particles)  # fmt: skip
    study.update(n=built["n"], weights=built["weights"], target_share=settings.target_proportion)
    os.makedirs(args.out, exist_ok=True)
    plot_ess(study, os.path.join(args.out, "fkc_ess.png"))
    with open(os.path.join(args.out, "fkc.json"), "w") as handle:
        json.dump(study, handle, indent=1)
    for row in study["rows"]:
        ess = f"min ESS {min(row['ess']):.2f}, distinct ancestors at the end {row['distinct_final']:.1f}" if row[
            "ess"] else ""  # fmt: skip
        print(f"{row['sampler']:22s} clamp {row['clamp']!s:5s} share of {settings.digits[0]}s {row['share']:.3f} "
              f"resamplings {row['resamplings']:3d} {ess}")  # fmt: skip
    print(f"target share {settings.target_proportion}, fitted weights {np.round(built['weights'], 3).tolist()}")
    return study


if __name__ == "__main__":
    main()
