"""Outputs of the digits experiment: results.json, report.md, sample grids, metrics vs n, paired differences."""

import math
import os
from typing import Any, Dict, List, Sequence

import numpy as np

from .digits_bake import bake_lines
from .reporting import (
    atomic_write_bytes,
    draw_metric_vs_n,
    markdown_table,
    mean_and_se,
    plot_image_panels,
    plot_metric_vs_n,
    plot_spectrum,
    pyplot,
    save_figure,
    write_json,
)

UNITS = (
    "nll_bpd: test negative log-likelihood in bits per dimension of the 64-pixel images with 17 grey levels, from the "
    "probability-flow ODE density of the uniformly dequantised images scaled to [-1, 1], including the "
    "dequantisation jacobian (an upper bound on the discrete NLL), averaged over the target mix; denoising_loss: "
    "held-out epsilon-prediction MSE per pixel on the test images (t uniform over the 1000 training steps, fixed "
    "draws), averaged over the target mix; proportion: share of generated samples the classifier labels as the first "
    "digit"
)
METRICS = (("nll_bpd", "nll_se"), ("denoising_loss", "denoising_se"), ("proportion", "proportion_se"))


def aggregate(records: List[Dict[str, Any]], methods: Sequence[str]) -> List[Dict[str, Any]]:
    """One row per (n, method): means over seeds and their standard errors (NaN-free only with >= 2 seeds)."""
    rows = []
    for n in sorted({r["n"] for r in records}):
        for method in methods:
            chosen = [r for r in records if r["n"] == n and r["method"] == method]
            if not chosen:
                continue
            row: Dict[str, Any] = dict(n=n, method=method, num_seeds=len(chosen))
            for value, se in METRICS:
                row[value], row[se] = mean_and_se([r[value] for r in chosen])
            row["weights"] = None
            if chosen[0]["weights"] is not None:
                row["weights"] = np.mean([r["weights"] for r in chosen], axis=0).round(4).tolist()
                row["weights_seed_sd"] = (np.std([r["weights"] for r in chosen], axis=0, ddof=1).round(4).tolist()
                                          if len(chosen) > 1 else None)  # fmt: skip
            if chosen[0]["training"] is not None:
                row["best_step"] = [r["training"]["best_step"] for r in chosen]
                row["steps_run"] = [r["training"]["steps_run"] for r in chosen]
            rows.append(row)
    return rows


def summarise_pairs(pair_records: List[Dict[str, Any]], confidence: float = 0.95) -> List[Dict[str, Any]]:
    """Per (n, pair, metric): the mean paired difference over seeds, its standard error over seeds and a two-sided
    t confidence interval (seeds are independent replications: new target sample, fit, training and estimator draws);
    also the root-mean-square within-seed standard error (over test images) and how many seeds had a negative one."""
    from scipy.stats import t as student_t

    summaries = []
    keys = sorted({(r["n"], r["pair"], r["metric"]) for r in pair_records}, key=lambda k: (k[1], k[2], k[0]))
    for n, pair, metric in keys:
        chosen = [r for r in pair_records if (r["n"], r["pair"], r["metric"]) == (n, pair, metric)]
        differences = [r["difference"] for r in chosen]
        mean, se = mean_and_se(differences)
        half = float(student_t.ppf(0.5 + confidence / 2, len(chosen) - 1) * se) if len(chosen) > 1 else float("nan")
        within = float(np.sqrt(np.mean([r["within_seed_se"] ** 2 for r in chosen])))
        summaries.append(dict(n=n, pair=pair, metric=metric, mean=mean, se=se, ci_low=mean - half, ci_high=mean + half,
                              confidence=confidence, within_seed_se=within, num_seeds=len(chosen),
                              num_negative=sum(d < 0 for d in differences)))  # fmt: skip
    return summaries


def _pair_table(summaries: List[Dict[str, Any]]) -> str:
    lines = ["| pair | metric | n | mean difference | 95% CI over seeds | within-seed s.e. | seeds < 0 |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: |"]  # fmt: skip
    for s in summaries:
        unit = "bits/dim" if s["metric"] == "nll" else "MSE"
        digits = 4 if s["metric"] == "nll" else 5
        verdict = "" if not math.isfinite(s["ci_low"]) else (" (excludes 0)" if s["ci_low"] > 0 or s["ci_high"] < 0
                                                              else " (includes 0)")  # fmt: skip
        interval = f"[{s['ci_low']:+.{digits}f}, {s['ci_high']:+.{digits}f}]{verdict}"
        lines.append(f"| {s['pair']} | {s['metric']} ({unit}) | {s['n']} | {s['mean']:+.{digits}f} | {interval} | "
                     f"{s['within_seed_se']:.{digits}f} | {s['num_negative']}/{s['num_seeds']} |")  # fmt: skip
    return "\n".join(lines)


def _fkc_section(meta: Dict[str, Any], rows: List[Dict[str, Any]], digit: int) -> List[str]:
    """The FKC row (`digits_fkc`), when the run made one."""
    if meta.get("fkc") is None:
        return []
    from .digits_fkc import fkc_report_lines

    largest = max((r for r in rows if r["method"] == "scorefusion"), key=lambda r: r["n"], default=None)
    nll = largest["nll_bpd"] if largest is not None else None
    return ["## Sampling the barycenter: Feynman-Kac correctors (SMC)", "",
            *fkc_report_lines(meta["fkc"], digit, nll), ""]  # fmt: skip


def _training_lines(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> List[str]:
    lines = ["| n | scratch: best step (per seed) | finetune: best step (per seed) |", "| ---: | --- | --- |"]
    for n in sorted({r["n"] for r in rows}):
        cells = []
        for method in ("scratch", "finetune"):
            row = next(r for r in rows if r["n"] == n and r["method"] == method)
            cells.append(", ".join(f"{b}/{s}" for b, s in zip(row["best_step"], row["steps_run"])))
        lines.append(f"| {n} | {cells[0]} | {cells[1]} |")
    auxiliary = ", ".join(f"{name} {r['best_step']}/{r['steps_run']}" for name, r in meta["auxiliary_training"].items())
    return lines + ["", f"Auxiliary side (best step / steps run): {auxiliary}."]


def plot_nll(rows: List[Dict[str, Any]], methods: Sequence[str], path: str) -> None:
    """Test NLL against n: every method, and a zoom on the methods that start from the auxiliaries."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    draw_metric_vs_n(left, rows, methods, "nll_bpd", "nll_se", "test NLL (bits/dim), lower is better",
                     "Digits: test NLL vs number of target samples")  # fmt: skip
    colors = {method: f"C{index % 10}" for index, method in enumerate(methods)}
    zoomed = [m for m in methods if m != "scratch"]
    draw_metric_vs_n(right, rows, zoomed, "nll_bpd", "nll_se", "test NLL (bits/dim)", "zoom: without scratch",
                     colors=colors)  # fmt: skip
    save_figure(figure, path)


def plot_pair_differences(summaries: List[Dict[str, Any]], path: str) -> None:
    """Mean paired differences with their confidence intervals against n, one panel per metric."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11.5, 3.8))
    figure.subplots_adjust(wspace=0.3)
    for axis, metric in zip(axes, ("nll", "denoising")):
        for pair in sorted({s["pair"] for s in summaries}):
            chosen = sorted((s for s in summaries if s["pair"] == pair and s["metric"] == metric), key=lambda s: s["n"])
            ns = np.array([s["n"] for s in chosen], dtype=float) * (1 + 0.04 * len(axis.lines))
            means = np.array([s["mean"] for s in chosen])
            errors = np.array([[m - s["ci_low"], s["ci_high"] - m] for m, s in zip(means, chosen)]).T
            axis.errorbar(ns, means, yerr=np.nan_to_num(errors), marker="o", markersize=3, capsize=3, label=pair)
        axis.axhline(0, color="k", lw=0.8)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("n (target training samples)")
        axis.set_ylabel("bits/dim" if metric == "nll" else "MSE per pixel")
        axis.set_title(f"paired difference, {metric} (95% CI over seeds; < 0: first is better)", fontsize=8)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    save_figure(figure, path)


def write_digits_outputs(out_dir: str, settings: Any, methods: Sequence[str], records: List[Dict[str, Any]],
                         pair_records: List[Dict[str, Any]], meta: Dict[str, Any],
                         sample_images: Dict[int, Dict[str, np.ndarray]], spectrum: np.ndarray,
                         spectrum_labels: Sequence[str]) -> Dict[str, Any]:  # fmt: skip
    """Writes every output file of the run to `out_dir` and returns the results.json payload."""
    rows = aggregate(records, methods)
    pairs = summarise_pairs(pair_records)
    payload = dict(experiment="digits", units=UNITS, preset=settings.preset, rows=rows, paired_differences=pairs,
                   records=records, pair_records=pair_records, meta=meta)  # fmt: skip
    write_json(os.path.join(out_dir, "results.json"), payload)
    figures = []
    for n, panels in sorted(sample_images.items()):
        name = f"samples_n{n}.png"
        ordered = {method: panels[method][:48] for method in methods if method in panels}
        plot_image_panels(ordered, columns=6, title=f"Generated digits, n = {n} target samples (seed "
                          f"{settings.seeds[0]}, same initial noise for every method)",
                          path=os.path.join(out_dir, name), vmax=16)  # fmt: skip
        figures.append(name)
    plot_nll(rows, methods, os.path.join(out_dir, "nll_vs_n.png"))
    plot_metric_vs_n(rows, methods, "proportion", "proportion_se", f"generated share of digit {settings.digits[0]}",
                     f"Digits: generated proportion (target {settings.target_proportion})",
                     os.path.join(out_dir, "proportion_vs_n.png"))  # fmt: skip
    plot_pair_differences(pairs, os.path.join(out_dir, "paired_differences.png"))
    plot_spectrum(spectrum, spectrum_labels, "λ-spectrum: same initial noise, weights moving from aux1 to "
                  f"aux{len(settings.auxiliary_proportions)}", os.path.join(out_dir, "lambda_spectrum.png"), vmax=16)
    figures += ["nll_vs_n.png", "paired_differences.png", "proportion_vs_n.png", "lambda_spectrum.png"]
    if meta.get("fkc") is not None:
        from .digits_fkc import plot_ess

        plot_ess(meta["fkc"], os.path.join(out_dir, "fkc_ess.png"))
        figures.append("fkc_ess.png")
    extra = bake_lines(records, meta["member_forwards_per_step"]) if "member_forwards_per_step" in meta else []
    report = report_markdown(settings, methods, rows, pairs, meta, figures, extra)
    atomic_write_bytes(os.path.join(out_dir, "report.md"), report.encode())
    return payload


def report_markdown(settings: Any, methods: Sequence[str], rows: List[Dict[str, Any]], pairs: List[Dict[str, Any]],
                    meta: Dict[str, Any], figures: Sequence[str], extra_lines: Sequence[str] = ()) -> str:  # fmt: skip
    """The human-readable report: design, the metric tables (rows n, columns methods), differences, weights, budgets."""
    first, second = settings.digits
    aux = ", ".join(f"aux{i + 1} = ({p:.1f}, {1 - p:.1f})" for i, p in enumerate(settings.auxiliary_proportions))
    seeds = len(settings.seeds)
    se_text = f"± is the standard error over {seeds} seeds" if seeds > 1 else "one seed, so no standard error"
    sizes, aux_val = meta["split_sizes"], meta["auxiliary_validation_sizes"]
    fusion_rows = [r for r in rows if r["method"] == "scorefusion"]
    weight_lines = [f"| {r['n']} | " + ", ".join(f"{w:.3f}" for w in r["weights"]) + " | " +
                    (", ".join(f"{w:.3f}" for w in r["weights_seed_sd"]) if r.get("weights_seed_sd") else "–") + " |"
                    for r in fusion_rows]  # fmt: skip

    def pair(name: str) -> str:
        return f"{sizes[name][str(first)]}/{sizes[name][str(second)]}"

    base, auxc, target = settings.base_training, settings.auxiliary_training, settings.target_training

    def budget(config: Any) -> str:
        return (f"at most {config.steps} steps of batch {config.batch_size}, validation every {config.eval_every} "
                f"steps, patience {config.patience}")  # fmt: skip

    lines = [
        f"# Digits experiment ({settings.preset} run)", "",
        (f"Real data: scikit-learn's bundled 8x8 digits, classes {first} and {second} (counts are "
         f"{first}/{second}). Disjoint splits (split seed {settings.split_seed}): test {pair('test')} images (NLL "
         f"and denoising loss only), target pool {pair('target')} (the class counts of the largest n, "
         f"{settings.max_n}), auxiliary pool {pair('auxiliary')} (everything else: as large as the data allows), of "
         f"which {aux_val[str(first)]}/{aux_val[str(second)]} are the auxiliaries' validation images. All four "
         "auxiliary populations are drawn from this one pool, reweighted: they share their images, so the paper's "
         "premise of plentiful, distinct auxiliary data is only met in that each auxiliary sees more images than any "
         "target model."),
        "",
        (f"Auxiliary populations (share of {first}, share of {second}): {aux}. A base `UNet2DModel` "
         f"(block_out_channels {list(settings.block_out_channels)}) is trained on the pooled auxiliary data "
         f"((0.5, 0.5), {budget(base)}, lr {base.learning_rate}); each auxiliary is the base fine-tuned on its mix "
         f"({budget(auxc)}, lr {auxc.learning_rate}), early-stopped on the auxiliary validation images weighted by its "
         f"mix among the checkpoints from step {auxc.min_steps} on (the denoising loss barely registers the class mix "
         "that sets the auxiliaries apart: without a minimum, early stopping kept the base for every auxiliary). "
         f"Target: ({settings.target_proportion:.1f}, {1 - settings.target_proportion:.1f}); n images drawn "
         f"(stratified) from the target pool per seed, of which a share of {settings.target_val_fraction} per class "
         "(at least one) is "
         f"held out for validation. scratch (fresh init, lr {target.learning_rate}) and finetune "
         f"({meta['closest_auxiliary']}, the closest mix, lr {settings.finetune_learning_rate}) train on the rest with "
         f"the same budget ({budget(target)}; {settings.target_validation_draws} fixed noised copies per validation "
         "image) and keep their best validation checkpoint. scorefusion: the four auxiliaries with weights fitted by "
         f"`fit_weights` on all n images (exact simplex QP, {settings.fit_noise_draws} noise draws per image, whole "
         "timestep range). merge-fitted: the auxiliaries' weights averaged with the fitted λ (weight-space merging, "
         "possible because they share the base); merge-uniform, uniform (fusion), aux1..aux4: references that do not "
         "use the target data."),
        "",
        (f"Units: {UNITS}. NLL: RK4 with {settings.nll_steps} steps ({4 * settings.nll_steps} evaluations) in "
         "log sigma, one Rademacher probe per image, one dequantisation draw per image; denoising loss: "
         f"{settings.denoising_draws} fixed noised copies per test image. Within a seed every method gets the same "
         f"draws. {se_text} (each seed redraws the target sample, its validation share, the training noise of "
         "scratch/finetune, the fit and the estimator draws; base and auxiliaries are trained once, and aux1..aux4 "
         "alone are evaluated on the first seed only). Proportion: "
         f"{settings.num_generated} samples per method and seed (DDIM, {settings.sampling_steps} steps), classified by "
         f"logistic regression trained on the auxiliary pool (accuracy on the test split: "
         f"{meta['classifier_test_accuracy']:.3f})."),
        "",
        *extra_lines,
        "## Test NLL (bits/dim, lower is better)", "",
        markdown_table(rows, methods, "nll_bpd", "nll_se", digits=3, best="min"), "",
        "## Held-out denoising loss (epsilon MSE per pixel on the test images, lower is better)", "",
        markdown_table(rows, methods, "denoising_loss", "denoising_se", digits=4, best="min"), "",
        f"## Share of digit {first} among generated samples (target {settings.target_proportion})", "",
        markdown_table(rows, methods, "proportion", "proportion_se", digits=2, best=""), "",
        "## Paired differences (first minus second; negative: the first is better)", "",
        ("Each seed compares the two methods on the same test draws; the confidence interval is a t interval over the "
         "seeds' differences (independent replications); the within-seed s.e. (over test images, root mean square "
         "over seeds) shows how much of the spread is estimator and test-set noise."), "",
        _pair_table(pairs), "",
        "## Fitted ScoreFusion weights (mean over seeds, and their standard deviation over seeds)", "",
        "| n | λ (aux1..aux4) | sd over seeds |", "| ---: | --- | --- |", *weight_lines, "",
        *_fkc_section(meta, rows, first),
        "## Early stopping: the step of the kept checkpoint / steps run, per seed", "",
        *_training_lines(rows, meta), "",
        "## Figures", "",
        *[f"![{name}]({name})" for name in figures], "",
        (f"Wall time of this run: {meta['wall_time_s']:.0f} s on {meta['num_threads']} torch thread(s) "
         f"({meta['models_trained']} models trained, the others loaded from the cache)."), "",
    ]  # fmt: skip
    return "\n".join(lines)
