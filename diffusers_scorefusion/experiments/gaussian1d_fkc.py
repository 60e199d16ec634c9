"""Feynman-Kac corrector (SMC) rows of the 1-D experiment: does FKC sample the exact clean barycenter?

`fkc_generate` is the hand-written-loop form of [`FeynmanKacCorrector`]: DDPM ancestral sampling with a fusion whose
per-member predictions weight the particles (no extra forwards), systematic resampling within groups of
`num_particles`. `fkc_study` compares, at the same weights, the plain fused DDPM sampler and FKC (particles, sampler
steps, increment clamping) on the Gaussian control (known barycenter) and on the setup's mixtures (exact scores and,
inside the full experiment, the trained auxiliaries): W1 to the exact clean barycenter and to the target.

Standalone (exact scores only, no training, a few minutes):
``python -m diffusers_scorefusion.experiments.gaussian1d_fkc --setup paper --out /tmp/fkc-1d``.
"""

import argparse
import json
import os
import time
from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from diffusers import DDPMScheduler
from scipy.stats import norm
from tqdm.auto import tqdm

from ..fusion.fusion_utils import alpha_sigma
from ..fusion.smc_utils import fkc_log_weight_increment, fkc_step_factor, group_gather_indices, reweight_and_resample
from ..models.modeling_fused_unet import FusedUNet
from .gaussian1d_analysis import CONTROL, CONTROL_WEIGHTS, GRID, _barycenter_cdf, _exact_fusion, _model_space_mixtures
from .mixtures1d import grid_cdf, sample_from_grid, wasserstein1_to_cdf
from .training import make_noise_scheduler

# (particles, sampler steps, increment clamp): the study's rows; particles None is the plain fused DDPM sampler
FKC_CONFIGS: Tuple[Tuple[Optional[int], int, Optional[float]], ...] = (
    (None, 100, None), (64, 100, None), (512, 100, None), (8192, 100, None), (8192, 100, 1.0),
    (None, 1000, None), (512, 1000, None), (8192, 1000, None),
)  # fmt: skip


@torch.no_grad()
def fkc_generate(
    model: FusedUNet,
    noise: torch.Tensor,
    num_inference_steps: int,
    num_particles: Optional[int] = None,
    ess_threshold: float = 0.5,
    increment_clamp: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    noise_scheduler: Optional[DDPMScheduler] = None,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """DDPM sampling from `noise` `(B, ...)`; with `num_particles`, FKC weights and resampling within each block of
    `num_particles` consecutive samples (and a final resampling). The schedule is `noise_scheduler`'s (default: the
    experiments' without sample clipping). Returns the samples and `ess` (mean ESS per step), `resamplings` (steps
    with at least one group resampled), `distinct_final` (mean distinct ancestors per group in the final
    resampling), `member_forwards` (per member)."""
    noise_scheduler = noise_scheduler or make_noise_scheduler(clip_sample=False)
    scheduler = DDPMScheduler.from_config(noise_scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    timesteps, alphas_cumprod = scheduler.timesteps, scheduler.alphas_cumprod
    batch = noise.shape[0]
    groups = batch // num_particles if num_particles else batch
    log_weights = torch.zeros(groups, num_particles or 1, dtype=torch.float64)
    sample, info = noise.clone(), dict(ess=[], resamplings=0, member_forwards=0, distinct_final=None)
    with model.capture_member_predictions():
        for i, t in enumerate(timesteps):
            model_output = model(sample, t, return_dict=False)[0]
            info["member_forwards"] += 1
            captured = model.last_member_predictions
            sample = scheduler.step(model_output, t, sample, generator=generator).prev_sample
            if not num_particles:
                continue
            abar_t = float(alpha_sigma(alphas_cumprod, t.reshape(1))[0] ** 2)
            abar_prev = float(alpha_sigma(alphas_cumprod, timesteps[i + 1 : i + 2])[0] ** 2) if i + 1 < len(
                timesteps) else 1.0  # fmt: skip
            increments = fkc_log_weight_increment(torch.stack(captured.predictions), captured.weights,
                                                   fkc_step_factor(abar_t, abar_prev))  # fmt: skip
            log_weights, ess, ancestors = reweight_and_resample(
                log_weights, increments.reshape(groups, num_particles), ess_threshold, increment_clamp,
                force=i + 1 == len(timesteps), generator=generator,
            )  # fmt: skip
            info["ess"].append(float(ess.mean()))
            if ancestors is not None:
                sample = sample[group_gather_indices(ancestors)]
                info["resamplings"] += 1
                info["distinct_final"] = float(np.mean([len(set(row.tolist())) for row in ancestors]))
    return sample, info


def _row(z: np.ndarray, to_data: Any, cdfs: Dict[str, Tuple[np.ndarray, np.ndarray]], midpoint: float,
         **fields: Any) -> Dict[str, Any]:  # fmt: skip
    x = to_data(z)
    row = dict(fields, right_share=float((x > midpoint).mean()), mean=float(x.mean()), std=float(x.std()))
    for name, (grid, cdf) in cdfs.items():
        row[f"w1_to_{name}"] = wasserstein1_to_cdf(x, grid, cdf)
    return row


def _sweep(case: str, fused: FusedUNet, num_generated: int, to_data: Any, cdfs: Dict[str, Any], midpoint: float,
           configs: Sequence[Tuple[Optional[int], int, Optional[float]]], progress: Any,
           ) -> List[Dict[str, Any]]:  # fmt: skip
    rows = []
    for particles, steps, clamp in configs:
        count = particles * max(1, num_generated // particles) if particles else num_generated  # whole groups
        noise = torch.randn((count, 1), generator=torch.Generator().manual_seed(31_337))
        z, info = fkc_generate(fused, noise, steps, particles, increment_clamp=clamp,
                               generator=torch.Generator().manual_seed(4_242 + steps))  # fmt: skip
        rows.append(_row(z[:, 0].double().numpy(), to_data, cdfs, midpoint, case=case,
                         sampler="plain DDPM" if particles is None else "FKC", particles=particles, steps=steps,
                         clamp=clamp, samples=count, resamplings=info["resamplings"],
                         min_mean_ess=min(info["ess"]) if info["ess"] else None,
                         member_forwards=info["member_forwards"]))  # fmt: skip
        progress.update(1)
    return rows


def fkc_study(settings: Any, target: Any, auxiliaries: Sequence[Dict[str, Any]], coords: Any, a: float,
              trained: bool = True, configs: Sequence[Tuple[Optional[int], int, Optional[float]]] = FKC_CONFIGS,
              ) -> Dict[str, Any]:  # fmt: skip
    """Plain fused DDPM vs FKC at ``lambda = (a, 1 - a)`` on the control and on the setup's mixtures (exact scores,
    and the trained auxiliaries if `trained`): W1 to the exact clean barycenter and to the target."""
    mixtures = _model_space_mixtures(auxiliaries)
    data_grid = coords.to_data(GRID)
    barycenter = _barycenter_cdf(mixtures, a)
    midpoint = float(np.mean(target.means))
    floor_draws = sample_from_grid(GRID, barycenter, settings.num_generated, np.random.default_rng(5))
    floor = wasserstein1_to_cdf(coords.to_data(floor_draws), data_grid, barycenter)
    cdfs = dict(barycenter=(data_grid, barycenter), target=(data_grid, target.cdf(data_grid)))
    cases = [("exact", _exact_fusion(mixtures, [a, 1 - a]))]
    if trained:
        cases.append(("trained", FusedUNet([aux["model"] for aux in auxiliaries], weights=[a, 1 - a])))
    precision = sum(w / m.std**2 for w, m in zip(CONTROL_WEIGHTS, CONTROL))
    mean = sum(w * m.means[0] / m.std**2 for w, m in zip(CONTROL_WEIGHTS, CONTROL)) / precision
    control_cdf = grid_cdf(GRID, norm.pdf(GRID, loc=mean, scale=np.sqrt(1 / precision)))
    progress = tqdm(total=len(configs) * (len(cases) + 1), desc="FKC", leave=False)
    rows = _sweep("control", _exact_fusion(CONTROL, CONTROL_WEIGHTS), settings.num_generated, lambda z: z,
                  dict(barycenter=(GRID, control_cdf)), 0.0, configs, progress)  # fmt: skip
    for name, fused in cases:
        rows += _sweep(name, fused, settings.num_generated, coords.to_data, cdfs, midpoint, configs, progress)
    progress.close()
    control_draws = np.random.default_rng(6).normal(mean, np.sqrt(1 / precision), settings.num_generated)
    control_floor = wasserstein1_to_cdf(control_draws, GRID, control_cdf)
    return dict(a=a, midpoint=midpoint, barycenter_floor_w1=floor, control_floor_w1=control_floor,
                control_mean=float(mean), control_std=float(np.sqrt(1 / precision)),
                barycenter_right_share=float(1 - np.interp(midpoint, data_grid, barycenter)),
                target_right_share=float(1 - target.cdf(np.array(midpoint))), rows=rows)  # fmt: skip


def fkc_lines(fkc: Dict[str, Any]) -> List[str]:
    """The report's FKC section: a table per case, plain DDPM beside FKC."""
    lines = [
        (f"Plain fused DDPM sampler vs Feynman-Kac correctors (SMC: particle weights from the member predictions "
         f"already made, no extra forwards; systematic resampling when ESS < N/2 and once at the end) at λ = "
         f"({fkc['a']:.3f}, {1 - fkc['a']:.3f}); the control at λ = (0.5, 0.5) with its exact barycenter "
         f"N({fkc['control_mean']:.4f}, {fkc['control_std']:.4f}²). W1 in the data's units; floors (W1 of exact "
         f"barycenter draws to their own CDF): control {fkc['control_floor_w1']:.4f}, mixtures "
         f"{fkc['barycenter_floor_w1']:.4f}. Right-mode share: barycenter {fkc['barycenter_right_share']:.3f}, "
         f"target {fkc['target_right_share']:.3f}."), "",
        "| scores | sampler | particles | steps | clamp | W1 to clean barycenter | W1 to target | right share | "
        "resamplings | min mean ESS |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for r in fkc["rows"]:
        to_target = f"{r['w1_to_target']:.3f}" if "w1_to_target" in r else "-"
        ess = f"{r['min_mean_ess']:.1f}" if r["min_mean_ess"] is not None else "-"
        lines.append(f"| {r['case']} | {r['sampler']} | {r['particles'] or '-'} | {r['steps']} | "
                     f"{r['clamp'] if r['clamp'] is not None else '-'} | {r['w1_to_barycenter']:.3f} | {to_target} | "
                     f"{r['right_share']:.3f} | {r['resamplings']} | {ess} |")  # fmt: skip
    return lines


def plot_fkc(fkc: Dict[str, Any], path: str) -> None:
    """W1 to the exact clean barycenter, plain fused DDPM vs FKC (no clamp), against sampler steps, per case."""
    from .reporting import pyplot, save_figure

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    for case in dict.fromkeys(r["case"] for r in fkc["rows"]):
        for sampler, style in (("plain DDPM", "--"), ("FKC", "-")):
            rows: Dict[int, Dict[str, Any]] = {}  # per step count, the row with the most particles
            for r in fkc["rows"]:
                if r["case"] == case and r["sampler"] == sampler and r["clamp"] is None:
                    if r["steps"] not in rows or (r["particles"] or 0) > (rows[r["steps"]]["particles"] or 0):
                        rows[r["steps"]] = r
            steps = sorted(rows)
            axis.plot(steps, [rows[s]["w1_to_barycenter"] for s in steps], style, marker="o", markersize=3,
                      label=f"{case}: {sampler}")  # fmt: skip
    axis.axhline(fkc["barycenter_floor_w1"], color="grey", ls=":", lw=1, label="sampling floor (mixtures)")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("sampler steps")
    axis.set_ylabel("W1 to the exact clean barycenter")
    axis.set_title(f"Feynman-Kac correctors vs the plain fused sampler (λ = ({fkc['a']:.3f}, {1 - fkc['a']:.3f}))",
                   fontsize=9)  # fmt: skip
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6)
    save_figure(figure, path)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Exact-score FKC rows for one setup, without training: writes fkc.json and fkc.md to `--out`."""
    from .gaussian1d import AUXILIARIES, QUICK_1D, SETUPS, TARGET, coordinates

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", choices=SETUPS, default="paper")
    parser.add_argument("--a", type=float, default=None, help="lambda(aux1) (default: the setup's fitted value "
                        "recorded in results/<setup>/results.json, else 0.566)")  # fmt: skip
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    settings = replace(QUICK_1D, setup=args.setup)
    folder = "gaussian1d" if args.setup == "paper" else f"gaussian1d-{args.setup}"
    a = args.a
    if a is None:
        recorded = os.path.join("results", folder, "results.json")
        a = 0.566
        if os.path.exists(recorded):
            with open(recorded) as handle:
                a = json.load(handle)["meta"]["lambda_marks"]["scorefusion"]
    auxiliaries = []
    for i, mixture in enumerate(AUXILIARIES):  # the coordinates train_auxiliaries uses, without the training
        train = mixture.sample(settings.auxiliary_sizes[0], torch.Generator().manual_seed(900 + i))
        auxiliaries.append(dict(mixture=mixture, coordinates=coordinates(settings, train)))
    n = settings.n_values[-1]
    coords = coordinates(settings, TARGET.sample(n, torch.Generator().manual_seed(1_000 * settings.seeds[0] + n)))
    started = time.time()
    fkc = fkc_study(settings, TARGET, auxiliaries, coords, float(a), trained=False)
    fkc["wall_time_s"] = time.time() - started
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fkc.json"), "w") as handle:
        json.dump(fkc, handle, indent=1)
    plot_fkc(fkc, os.path.join(args.out, "fkc.png"))
    with open(os.path.join(args.out, "fkc.md"), "w") as handle:
        handle.write("\n".join([f"# FKC rows, setup {args.setup} (exact scores)", "", *fkc_lines(fkc), "",
                                 "![FKC](fkc.png)", ""]))
    print("\n".join(fkc_lines(fkc)))
    return fkc


if __name__ == "__main__":
    main()
