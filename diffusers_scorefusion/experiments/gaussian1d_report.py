"""Outputs of the 1-D experiment: results.json, report.md and figures (W1 vs n, samples, what is sampled, corrector)."""

import math
import os
from typing import Any, Dict, List, Sequence

import numpy as np

from .reporting import atomic_write_bytes, mean_and_se, plot_metric_vs_n, pyplot, save_figure, write_json

METHODS = ("scratch", "scorefusion", "scorefusion-full", "scorefusion-auto", "aux1", "aux2")


def aggregate(records: List[Dict[str, Any]], fits: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (n, method): the mean over seeds of each seed's mean W1 over trials, the standard error over seeds, and
    the within-seed standard error over trials (root mean square over seeds); fitted weights: mean and sd over seeds."""
    rows = []
    for n in sorted({r["n"] for r in records}):
        for method in METHODS:
            chosen = [r for r in records if r["n"] == n and r["method"] == method]
            seeds = sorted({r["seed"] for r in chosen})
            per_seed = [[r["w1"] for r in chosen if r["seed"] == s] for s in seeds]
            w1, w1_se = mean_and_se([np.mean(v) for v in per_seed])
            trial_se = [mean_and_se(v)[1] for v in per_seed]
            row = dict(n=n, method=method, w1=w1, w1_se=w1_se, num_seeds=len(seeds), num_trials=len(per_seed[0]),
                       trial_se=float(np.sqrt(np.mean(np.square(trial_se)))) if len(per_seed[0]) > 1 else None)
            weights = [f["weights"] for f in fits if f["n"] == n and f["method"] == method]
            if weights:
                row["weights"] = np.mean(weights, axis=0).tolist()
                row["weights_seed_sd"] = np.std(weights, axis=0, ddof=1).tolist() if len(weights) > 1 else None
            if method == "scratch":
                training = {r["seed"]: r["training"] for r in chosen}
                row["best_step"] = [training[s]["best_step"] for s in seeds]
                row["steps_run"] = [training[s]["steps_run"] for s in seeds]
            rows.append(row)
    return rows


def plot_samples(histograms: Dict[int, Dict[str, np.ndarray]], target: Any, path: str) -> None:
    """Per n (first seed, first trial): histograms of scratch and both fusions against the target density."""
    plt = pyplot()
    ns = sorted(histograms)
    columns = min(3, len(ns))
    rows = math.ceil(len(ns) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.6 * rows), squeeze=False)
    grid = np.linspace(-15, 15, 600)
    for axis, n in zip(axes.flat, ns):
        for method in ("scratch", "scorefusion", "scorefusion-full"):
            axis.hist(histograms[n][method], bins=150, range=(-15, 15), density=True, histtype="step", label=method)
        axis.plot(grid, target.density(grid), "k--", lw=0.8, label="target")
        axis.set_title(f"n = {n}", fontsize=8)
        axis.tick_params(labelsize=6)
    for axis in list(axes.flat)[len(ns):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=6)
    save_figure(figure, path)


def plot_what_is_sampled(sampled: Dict[str, Any], marks: Dict[str, float], reference: Sequence[float], setup: str,
                         path: str) -> None:  # fmt: skip
    """W1 to the target vs lambda(aux1) (clean barycenter, exact-score and trained samplers); densities at a mark."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    lambdas = sampled["lambdas"]
    for key, label, style in (("barycenter_w1", "clean barycenter p1^λ p2^(1-λ) (grid)", "-"),
                              ("exact_sampler_w1", "fused DDIM sampler, exact scores", "-"),
                              ("trained_sampler_w1", "fused DDIM sampler, trained members", "--")):  # fmt: skip
        left.plot(lambdas, sampled[key], style, marker="o", markersize=3, label=label)
    for (name, a), colour in zip(marks.items(), ("tab:red", "tab:purple")):
        label = "fitted λ, small t" if name == "scorefusion" else "fitted λ, full range"
        left.axvline(a, color=colour, ls=":", lw=1.2, label=f"{label} ({a:.3f})")
    if setup == "paper":
        left.axvline(reference[0], color="grey", ls="-.", lw=1, label=f"reference notebook λ ({reference[0]:.3f})")
    left.set_xlabel("λ of aux1 (aux2 gets 1 - λ)")
    left.set_ylabel("W1 to the target (data units)")
    left.set_title(f"What is sampled ({setup} setup)", fontsize=9)
    left.grid(alpha=0.3)
    left.legend(fontsize=6)
    densities = sampled["densities"]
    x = np.asarray(densities["x"])
    right.plot(x, densities["target"], "k--", lw=1, label="target")
    right.plot(x, densities["barycenter"], lw=1.2, label="clean barycenter")
    right.step(x, densities["exact_sampler"], where="mid", lw=1, label="sampler, exact scores")
    right.step(x, densities["trained_sampler"], where="mid", lw=1, label="sampler, trained members")
    right.set_title(f"densities at the small-t fitted λ = {densities['a']:.3f}", fontsize=9)
    right.set_xlabel("x (data units)")
    right.legend(fontsize=6)
    save_figure(figure, path)


def plot_corrector(corrector: Dict[str, Any], path: str) -> None:
    """W1 to the clean barycenter and to the target against the number of corrector steps per noise level."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for case, label in (("exact", "reference mixtures, exact scores"), ("trained", "reference mixtures, trained")):
        rows = [r for r in corrector["rows"] if r["case"] == case]
        steps = [r["corrector_steps"] for r in rows]
        left.plot(steps, [r["w1_to_barycenter"] for r in rows], marker="o", markersize=3, label=label)
        right.plot(steps, [r["w1_to_target"] for r in rows], marker="o", markersize=3, label=label)
    control = corrector["control"]
    left.plot([r["corrector_steps"] for r in control["rows"]], [r["w1_to_barycenter"] for r in control["rows"]],
              marker="s", markersize=3, label="control: unimodal N(-1, 0.3²), N(1, 1), exact")  # fmt: skip
    left.axhline(corrector["barycenter_floor_w1"], color="tab:blue", ls=":", lw=1, label="sampling floor (mixtures)")
    left.axhline(control["floor_w1"], color="tab:green", ls=":", lw=1, label="sampling floor (control)")
    for axis, title in ((left, "W1 to the exact clean barycenter"), (right, "W1 to the target")):
        axis.set_xscale("symlog", linthresh=1)
        axis.set_xlim(left=-0.2)
        axis.set_yscale("log")
        axis.set_xlabel("corrector steps per noise level (M)")
        axis.set_title(f"{title} (λ = ({corrector['a']:.3f}, {1 - corrector['a']:.3f}))", fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    save_figure(figure, path)


def write_gaussian1d_outputs(out_dir: str, settings: Any, payload: Dict[str, Any],
                             histograms: Dict[int, Dict[str, np.ndarray]]) -> Dict[str, Any]:  # fmt: skip
    """Writes results.json, the figures and report.md; returns the payload with its aggregated rows."""
    from .gaussian1d_fkc import plot_fkc
    from .gaussian1d_text import report_markdown
    from .mixtures1d import Mixture1D

    payload["rows"] = aggregate(payload["records"], payload["fits"])
    write_json(os.path.join(out_dir, "results.json"), payload)
    target = Mixture1D(**payload["target"])
    plot_metric_vs_n(payload["rows"], METHODS, "w1", "w1_se", "W1 to held-out target samples (lower is better)",
                     f"1-D mixtures ({settings.setup} setup): W1 vs n", os.path.join(out_dir, "w1_vs_n.png"),
                     log_y=True)  # fmt: skip
    plot_samples(histograms, target, os.path.join(out_dir, "samples.png"))
    plot_what_is_sampled(payload["what_is_sampled"], payload["meta"]["lambda_marks"], payload["reference_weights"],
                         settings.setup, os.path.join(out_dir, "what_is_sampled.png"))  # fmt: skip
    plot_corrector(payload["corrector"], os.path.join(out_dir, "corrector.png"))
    plot_fkc(payload["fkc"], os.path.join(out_dir, "fkc.png"))
    atomic_write_bytes(os.path.join(out_dir, "report.md"), report_markdown(settings, payload).encode())
    return payload
