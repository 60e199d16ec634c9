"""The digits experiment's cross-validated timestep bins (`num_timestep_bins="auto"`): the fit, and its report section
and per-bin weight figure.

`run_digits` adds the method ``scorefusion-auto`` (the auxiliaries with weights fitted with ``num_timestep_bins="auto"``
from the same noise as ``scorefusion``'s single weight vector), its paired differences to single λ and uniform, and
after the main report a section with the share of the first digit (paired over the same initial noises), the chosen
bins per seed and ``auto_weights.png`` (λ per timestep against single λ).
"""

import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..fitting import fit_weights
from ..fitting.cross_validation import MAX_AUTO_BINS
from ..models.modeling_fused_unet import FusedUNet
from .reporting import atomic_write_bytes, mean_and_se, pyplot, save_figure, write_json
from .training import make_noise_scheduler

AUTO_METHOD = "scorefusion-auto"
AUTO_PAIRS = ((AUTO_METHOD, "scorefusion"), (AUTO_METHOD, "uniform"))


def fit_auto(
    auxiliaries: Sequence[torch.nn.Module],
    latents: torch.Tensor,
    generator_state: torch.Tensor,
    settings: Any,
    fits: List[Dict[str, Any]],
    seed: int,
    n: int,
) -> Tuple[FusedUNet, List[List[float]]]:
    """Fits auto bins on `latents` with the noise of the single-λ fit (the generator in `generator_state`); appends
    the fit to `fits` and returns the fusion and its weights on the finest grid (`MAX_AUTO_BINS` rows, so that seeds
    with different choices average)."""
    generator = torch.Generator()
    generator.set_state(generator_state)
    fused = FusedUNet(auxiliaries)
    fit = fit_weights(fused, make_noise_scheduler(), latents, generator=generator, num_timestep_bins="auto",
                      num_noise_draws=settings.fit_noise_draws, progress_bar=False)  # fmt: skip
    table = fit.weights if fit.weights.ndim == 2 else fit.weights.unsqueeze(0)
    fine = table.repeat_interleave(MAX_AUTO_BINS // table.shape[0], dim=0)  # (16, k)
    selection = fit.timestep_bin_selection
    fits.append(dict(seed=seed, n=n, num_timestep_bins=selection["num_timestep_bins"],
                     relative_smoothness=selection["relative_smoothness"], minimum=selection["minimum"],
                     weights=table.tolist(), timestep_bin_edges=fit.timestep_bin_edges, curve=selection["curve"],
                     num_forward_passes=fit.num_forward_passes))  # fmt: skip
    return fused, fine.tolist()


def _share_lines(records: List[Dict[str, Any]], target: float) -> List[str]:
    """Share of the first digit per n: auto, single λ, uniform (mean ± s.e. over seeds), and auto - single λ paired
    over seeds (the same initial noises) with a 95% t interval."""
    from scipy.stats import t as student_t

    lines = ["| n | auto | single λ | uniform | auto − single λ (95% CI over seeds) | |auto − target| |",
             "| ---: | ---: | ---: | ---: | --- | ---: |"]  # fmt: skip
    for n in sorted({r["n"] for r in records}):
        share = {m: {r["seed"]: r["proportion"] for r in records if r["n"] == n and r["method"] == m}
                 for m in (AUTO_METHOD, "scorefusion", "uniform")}  # fmt: skip
        seeds = sorted(share[AUTO_METHOD])
        cells = [mean_and_se([share[m][s] for s in seeds]) for m in share]
        difference, se = mean_and_se([share[AUTO_METHOD][s] - share["scorefusion"][s] for s in seeds])
        half = float(student_t.ppf(0.975, len(seeds) - 1) * se) if len(seeds) > 1 else float("nan")
        text = " | ".join(f"{m:.3f} ± {e:.3f}" for m, e in cells)
        lines.append(f"| {n} | {text} | {difference:+.3f} [{difference - half:+.3f}, {difference + half:+.3f}] | "
                     f"{abs(cells[0][0] - target):.3f} |")  # fmt: skip
    return lines


def plot_auto_weights(fits: List[Dict[str, Any]], records: List[Dict[str, Any]], path: str) -> None:
    """λ_i against the timestep for each n: every seed's auto table (thin) and single λ (dashed, mean over seeds)."""
    plt = pyplot()
    n_values = sorted({f["n"] for f in fits})
    num_members = len(fits[0]["weights"][0])
    figure, axes = plt.subplots(1, len(n_values), figsize=(5 * len(n_values), 3.6), squeeze=False)
    for axis, n in zip(axes[0], n_values):
        single = np.mean([r["weights"] for r in records if r["n"] == n and r["method"] == "scorefusion"], axis=0)
        for fit in (f for f in fits if f["n"] == n):
            table = np.asarray(fit["weights"])
            edges = fit["timestep_bin_edges"] or [0, 1000]
            for i in range(num_members):
                axis.stairs(table[:, i], edges, color=f"C{i}", alpha=0.6, baseline=None)
        for i in range(num_members):
            axis.axhline(single[i], color=f"C{i}", linestyle="--", label=f"aux{i + 1} (dashed: single λ)")
        axis.set(title=f"n = {n}: auto-binned λ per seed", xlabel="timestep (0 = clean)", ylabel="λ", ylim=(-0.02, 1))
    axes[0][0].legend(fontsize=7)
    save_figure(figure, path)


def write_auto_outputs(out_dir: str, settings: Any, fits: List[Dict[str, Any]], records: List[Dict[str, Any]]) -> None:
    """`auto_bins.json`, `auto_weights.png` and a section appended to `report.md`."""
    write_json(os.path.join(out_dir, "auto_bins.json"), dict(fits=fits))
    plot_auto_weights(fits, records, os.path.join(out_dir, "auto_weights.png"))
    choices = ["| n | seed | bins | relative smoothness | minimum of the CV curve (bins, τ) |",
               "| ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    choices += [f"| {f['n']} | {f['seed']} | {f['num_timestep_bins']} | {f['relative_smoothness']:g} | "
                f"{f['minimum']['num_timestep_bins']}, {f['minimum']['relative_smoothness']:g} |"
                for f in fits]  # fmt: skip
    section = [
        "", "## Cross-validated timestep bins (scorefusion-auto)", "",
        ("`fit_weights(..., num_timestep_bins=\"auto\")` from the same noise as the single-λ fit: 5-fold "
         "cross-validation over the n images of the held-out denoising loss chooses 1-16 bins and the smoothness "
         "between neighbouring bins (one-standard-error rule); its NLL, denoising loss and paired differences are in "
         "the tables above."), "",
        f"### Share of digit {settings.digits[0]} (target {settings.target_proportion})", "",
        *_share_lines(records, settings.target_proportion), "",
        "### The choice per fit", "", *choices, "",
        "![auto_weights](auto_weights.png)", "",
    ]  # fmt: skip
    path = os.path.join(out_dir, "report.md")
    with open(path) as file:
        report = file.read()
    atomic_write_bytes(path, (report + "\n".join(section)).encode())
