"""Outputs of the digits experiment: results.json, report.md, sample grids, NLL / proportion vs n, the λ-spectrum."""

import os
from typing import Any, Dict, List, Sequence

import numpy as np

from .reporting import (
    atomic_write_bytes,
    markdown_table,
    mean_and_se,
    plot_image_panels,
    plot_metric_vs_n,
    plot_spectrum,
    write_json,
)

UNITS = (
    "nll_bpd: test negative log-likelihood in bits per dimension of the 64-pixel images with 17 grey levels, from the "
    "probability-flow ODE density of the uniformly dequantised images scaled to [-1, 1], including the "
    "dequantisation jacobian (an upper bound on the discrete NLL), averaged over the target mix; proportion: share of "
    "generated samples the classifier labels as the first digit"
)


def aggregate(records: List[Dict[str, Any]], methods: Sequence[str]) -> List[Dict[str, Any]]:
    """One row per (n, method): means over seeds and their standard errors (NaN-free only with >= 2 seeds)."""
    rows = []
    for n in sorted({r["n"] for r in records}):
        for method in methods:
            chosen = [r for r in records if r["n"] == n and r["method"] == method]
            if not chosen:
                continue
            nll, nll_se = mean_and_se([r["nll_bpd"] for r in chosen])
            proportion, proportion_se = mean_and_se([r["proportion"] for r in chosen])
            weights = None
            if chosen[0]["weights"] is not None:
                weights = np.mean([r["weights"] for r in chosen], axis=0).round(4).tolist()
            row = dict(n=n, method=method, nll_bpd=nll, nll_se=nll_se, proportion=proportion,
                       proportion_se=proportion_se, weights=weights, num_seeds=len(chosen),
                       per_seed_nll_bpd=[r["nll_bpd"] for r in chosen])  # fmt: skip
            if "weights_bootstrap_se" in chosen[0]:
                row["weights_seed_se"] = np.std([r["weights"] for r in chosen], axis=0, ddof=1).round(4).tolist() \
                    if len(chosen) > 1 else None  # fmt: skip
            rows.append(row)
    return rows


def write_digits_outputs(out_dir: str, settings: Any, methods: Sequence[str], records: List[Dict[str, Any]],
                         meta: Dict[str, Any], sample_images: Dict[int, Dict[str, np.ndarray]],
                         spectrum: np.ndarray, spectrum_labels: Sequence[str]) -> Dict[str, Any]:  # fmt: skip
    """Writes every output file of the run to `out_dir` and returns the results.json payload."""
    rows = aggregate(records, methods)
    payload = dict(experiment="digits", units=UNITS, preset=settings.preset, rows=rows, records=records, meta=meta)
    write_json(os.path.join(out_dir, "results.json"), payload)
    figures = []
    for n, panels in sorted(sample_images.items()):
        name = f"samples_n{n}.png"
        ordered = {method: panels[method][:48] for method in methods if method in panels}
        plot_image_panels(ordered, columns=6, title=f"Generated digits, n = {n} target samples (seed "
                          f"{settings.seeds[0]}, same initial noise for every method)",
                          path=os.path.join(out_dir, name), vmax=16)  # fmt: skip
        figures.append(name)
    plot_metric_vs_n(rows, methods, "nll_bpd", "nll_se", "test NLL (bits/dim), lower is better",
                     "Digits: test NLL vs number of target samples", os.path.join(out_dir, "nll_vs_n.png"))  # fmt: skip
    plot_metric_vs_n(rows, methods, "proportion", "proportion_se", f"generated share of digit {settings.digits[0]}",
                     f"Digits: generated proportion (target {settings.target_proportion})",
                     os.path.join(out_dir, "proportion_vs_n.png"))  # fmt: skip
    plot_spectrum(spectrum, spectrum_labels, "λ-spectrum: same initial noise, weights moving from aux1 to "
                  f"aux{len(settings.auxiliary_proportions)}", os.path.join(out_dir, "lambda_spectrum.png"), vmax=16)
    figures += ["nll_vs_n.png", "proportion_vs_n.png", "lambda_spectrum.png"]
    report = report_markdown(settings, methods, rows, meta, figures)
    atomic_write_bytes(os.path.join(out_dir, "report.md"), report.encode())
    return payload


def report_markdown(settings: Any, methods: Sequence[str], rows: List[Dict[str, Any]], meta: Dict[str, Any],
                    figures: Sequence[str]) -> str:  # fmt: skip
    """The human-readable report: design, the NLL and proportion tables (rows n, columns methods), the weights."""
    first, second = settings.digits
    aux = ", ".join(f"aux{i + 1} = ({p:.1f}, {1 - p:.1f})" for i, p in enumerate(settings.auxiliary_proportions))
    seeds = len(settings.seeds)
    se_text = (f"± is the standard error over {seeds} seeds" if seeds > 1 else "one seed, so no standard error")
    fusion_rows = [r for r in rows if r["method"] == "scorefusion"]
    weight_lines = "\n".join(f"| {r['n']} | " + ", ".join(f"{w:.3f}" for w in r["weights"]) + " |" for r in fusion_rows)
    sizes = meta["split_sizes"]

    def pair(name: str) -> str:
        return f"{sizes[name][str(first)]}/{sizes[name][str(second)]}"

    aux_cfg, scratch_cfg = settings.auxiliary_training, settings.scratch_training
    lines = [
        f"# Digits experiment ({settings.preset} run)", "",
        (f"Real data: scikit-learn's bundled 8x8 digits, classes {first} and {second}. Per class, disjoint splits "
         f"(split seed {settings.split_seed}): test {pair('test')} images (NLL only), classifier {pair('classifier')} "
         f"(trains the proportion classifier only), auxiliary pool {pair('auxiliary')}, target pool {pair('target')}."),
        "",
        (f"Auxiliary populations (share of {first}, share of {second}): {aux}; one `UNet2DModel` "
         f"(block_out_channels {list(settings.block_out_channels)}) trained on each for {aux_cfg.steps} steps of batch "
         f"{aux_cfg.batch_size}. Target: ({settings.target_proportion:.1f}, {1 - settings.target_proportion:.1f}); "
         f"n target images drawn (stratified) from the target pool per seed. scratch: {scratch_cfg.steps} steps "
         f"(batch {scratch_cfg.batch_size}) from a fresh init on the n images; finetune: {meta['closest_auxiliary']} "
         f"(closest mix) fine-tuned {settings.finetune_training.steps} steps; scorefusion: the four auxiliaries with "
         f"weights fitted by `fit_weights` (exact simplex QP, {settings.fit_noise_draws} noise draws per image, whole "
         "timestep range); uniform and aux1..aux4 are references that do not use the target data."),
        "",
        (f"Units: {UNITS}. NLL: RK4 with {settings.nll_steps} steps ({4 * settings.nll_steps} evaluations) in "
        "log sigma, one Rademacher probe per image, one dequantisation draw per image, the same draws for every "
        f"method; {se_text} (each seed redraws the target sample, the training noise of scratch/finetune, the fit and "
        "the estimator noise; the auxiliaries are trained once). Proportion: "
        f"{settings.num_generated} samples per method and seed (DDIM, {settings.sampling_steps} steps), classified by "
        f"logistic regression (accuracy on the real test split: {meta['classifier_test_accuracy']:.3f})."),
        "",
        "## Test NLL (bits/dim, lower is better)", "",
        markdown_table(rows, methods, "nll_bpd", "nll_se", digits=3, best="min"), "",
        f"## Share of digit {first} among generated samples (target {settings.target_proportion})", "",
        markdown_table(rows, methods, "proportion", "proportion_se", digits=2, best=""), "",
        "## Fitted ScoreFusion weights (mean over seeds)", "",
        "| n | λ (aux1..aux4) |", "| ---: | --- |", weight_lines, "",
        "## Figures", "",
        *[f"![{name}]({name})" for name in figures], "",
        (f"Wall time of this run: {meta['wall_time_s']:.0f} s ({meta['models_trained']} models trained, the others "
         "loaded from the cache)."), "",
    ]  # fmt: skip
    return "\n".join(lines)
