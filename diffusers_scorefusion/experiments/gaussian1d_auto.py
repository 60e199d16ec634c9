"""The 1-D experiment's cross-validated timestep bins (`num_timestep_bins="auto"`): fit options, fit record and the
report section (W1 of the auto fit against single λ, paired over seeds, and the chosen bins)."""

import os
from typing import Any, Dict

import numpy as np
import torch

from ..fitting.cross_validation import MAX_AUTO_BINS
from .reporting import atomic_write_bytes, mean_and_se

AUTO_METHOD = "scorefusion-auto"
# (method, timestep_range, num_timestep_bins) of every fit the 1-D sweep runs on the target points
FITS = (("scorefusion", "small_t", 1), ("scorefusion-full", "full", 1), (AUTO_METHOD, "full", "auto"))


def fit_record(fit: Any) -> Dict[str, Any]:
    """The weights on the finest grid (`MAX_AUTO_BINS` rows when binned, so that seeds average) and the choice."""
    if fit.timestep_bin_selection is None:
        return dict(weights=fit.weights.tolist(), standard_errors=fit.standard_errors.tolist())
    table = fit.weights if fit.weights.ndim == 2 else fit.weights.unsqueeze(0)
    selection = fit.timestep_bin_selection
    fine = table.repeat_interleave(MAX_AUTO_BINS // table.shape[0], dim=0)
    return dict(weights=fine.tolist(), standard_errors=None, num_timestep_bins=selection["num_timestep_bins"],
                table=table.tolist(), relative_smoothness=selection["relative_smoothness"],
                timestep_bin_edges=fit.timestep_bin_edges)  # fmt: skip


def record_weights(weights: Any) -> Any:
    """A record's weights: the single vector, or None for a bin table (kept in the fits)."""
    return None if weights is None or torch.as_tensor(weights).ndim != 1 else list(map(float, weights))


def append_auto_section(out_dir: str, payload: Dict[str, Any]) -> None:
    """Appends W1 of the auto fit against both single-λ fits (paired over seeds, 95% t interval) and the choices."""
    from scipy.stats import t as student_t

    records, fits = payload["records"], payload["fits"]
    lines = ["", "## Cross-validated timestep bins (scorefusion-auto)", "",
             ("`fit_weights(..., num_timestep_bins=\"auto\")` over the whole range (5-fold cross-validation of the "
              "held-out denoising loss over the n points chooses 1-16 bins and their smoothness), against single λ "
              "fitted over small t (scorefusion) and over the whole range (scorefusion-full). W1 per seed is the mean "
              "over sampling trials; differences are paired within seeds (same target points and sampling noise)."),
             "", "| n | auto: W1 | single λ small t | single λ full | auto − small t (95% CI) | auto − full (95% CI) | "
             "bins chosen per seed |", "| ---: | ---: | ---: | ---: | --- | --- | --- |"]  # fmt: skip
    for n in sorted({r["n"] for r in records}):
        per_seed = {}
        for method in (AUTO_METHOD, "scorefusion", "scorefusion-full"):
            chosen = [r for r in records if r["n"] == n and r["method"] == method]
            per_seed[method] = {s: np.mean([r["w1"] for r in chosen if r["seed"] == s])
                                for s in sorted({r["seed"] for r in chosen})}  # fmt: skip
        seeds = sorted(per_seed[AUTO_METHOD])
        cells = [mean_and_se([per_seed[m][s] for s in seeds]) for m in per_seed]
        gaps = []
        for other in ("scorefusion", "scorefusion-full"):
            mean, se = mean_and_se([per_seed[AUTO_METHOD][s] - per_seed[other][s] for s in seeds])
            half = float(student_t.ppf(0.975, len(seeds) - 1) * se) if len(seeds) > 1 else float("nan")
            gaps.append(f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]")
        bins = [f["num_timestep_bins"] for f in fits if f["n"] == n and f["method"] == AUTO_METHOD]
        lines.append(f"| {n} | " + " | ".join(f"{m:.4f} ± {e:.4f}" for m, e in cells) + f" | {' | '.join(gaps)} | "
                     f"{', '.join(map(str, bins))} |")  # fmt: skip
    path = os.path.join(out_dir, "report.md")
    with open(path) as file:
        report = file.read()
    atomic_write_bytes(path, (report + "\n".join(lines) + "\n").encode())
