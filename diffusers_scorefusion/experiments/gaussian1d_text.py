"""The 1-D experiment's report.md: design, W1 table, fitted weights, what is sampled, corrector measurements."""

from typing import Any, Dict, List

from .gaussian1d_fkc import fkc_lines
from .reporting import markdown_table


def _weights_cell(row: Dict[str, Any]) -> str:
    if row.get("weights") is None:
        return "–"
    text = ", ".join(f"{w:.3f}" for w in row["weights"])
    if row.get("weights_seed_sd"):
        text += " (sd " + ", ".join(f"{w:.3f}" for w in row["weights_seed_sd"]) + ")"
    return text


def _setup_text(settings: Any, payload: Dict[str, Any]) -> str:
    coords = payload["meta"]["auxiliary_coordinates"]
    if settings.setup == "paper":
        return ("**paper setup**: every data set is standardised by its own sample mean and std, as the reference "
                "notebook does: each auxiliary's score is learned in its own coordinates (aux1: shift "
                f"{coords[0]['shift']:.3f}, scale {coords[0]['scale']:.3f}; aux2: shift {coords[1]['shift']:.3f}, "
                f"scale {coords[1]['scale']:.3f}), fused in the target's (its n training points' mean and std), and "
                "samples are mapped back with the target's. The fusion therefore combines the auxiliaries' "
                "*standardised* shapes, not the auxiliary distributions themselves.")  # fmt: skip
    return (f"**common-scale setup**: every data set is divided by {settings.common_scale} (no centring), so the "
            "fusion combines the auxiliary distributions themselves.")


def _what_is_sampled_lines(sampled: Dict[str, Any], marks: Dict[str, float]) -> List[str]:
    lines = ["| λ(aux1) | clean barycenter (grid) | fused sampler, exact scores | fused sampler, trained members |",
             "| ---: | ---: | ---: | ---: |"]  # fmt: skip
    for i, a in enumerate(sampled["lambdas"]):
        if i % 2 == 0:  # every 0.1
            lines.append(f"| {a:.2f} | {sampled['barycenter_w1'][i]:.3f} | {sampled['exact_sampler_w1'][i]:.3f} | "
                         f"{sampled['trained_sampler_w1'][i]:.3f} |")  # fmt: skip
    best = {key: sampled[f"{key}_min"] for key in ("barycenter_w1", "exact_sampler_w1", "trained_sampler_w1")}
    lines += ["", (f"Closest to the target over the λ grid (step {sampled['lambdas'][1]:.2f}): clean barycenter W1 "
                   f"{best['barycenter_w1']['w1']:.3f} at λ = {best['barycenter_w1']['a']:.2f}; exact-score sampler "
                   f"{best['exact_sampler_w1']['w1']:.3f} at λ = {best['exact_sampler_w1']['a']:.2f}; trained sampler "
                   f"{best['trained_sampler_w1']['w1']:.3f} at λ = {best['trained_sampler_w1']['a']:.2f}. Fitted "
                   f"λ(aux1) at the largest n (mean over seeds): {marks['scorefusion']:.3f} (small t), "
                   f"{marks['scorefusion-full']:.3f} (full range).")]  # fmt: skip
    return lines


def _plain_words(sampled: Dict[str, Any], corrector: Dict[str, Any]) -> str:
    """The what-is-sampled finding in one paragraph, worded from the numbers of this run."""
    bary, exact = sampled["barycenter_w1_min"], sampled["exact_sampler_w1_min"]
    plain = next(r for r in corrector["rows"] if r["case"] == "exact" and r["corrector_steps"] == 0)
    closer = "closer to" if exact["w1"] < bary["w1"] else "no closer to"
    return (f"In plain words: the fused sampler does not sample the barycenter p1^λ p2^(1-λ) it is named after. With "
            f"exact auxiliary scores it comes within W1 {exact['w1']:.3f} of the target (at λ = {exact['a']:.2f}), "
            f"while the clean barycenter is never closer than {bary['w1']:.3f} (at λ = {bary['a']:.2f}): the sampler "
            f"is {closer} the target than any barycenter. At the small-t fitted λ = {corrector['a']:.3f} the clean "
            f"barycenter puts {corrector['barycenter_right_share']:.3f} of its mass on the right mode, the sampler "
            f"{plain['right_share']:.3f}, the target {corrector['target_right_share']:.3f}. A sampler fixes the modes' "
            "weights at high noise levels, where the fused score is not the score of the (noised) barycenter, and "
            "local moves at low noise cannot shift mass between separated modes. What a user gets depends on the "
            "sampler, not only on λ.")


def _corrector_lines(corrector: Dict[str, Any], num_generated: int) -> List[str]:
    lines = [("| scores | M | member forwards per sample | W1 to clean barycenter | W1 to target | share of the right "
              "mode |"), "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in corrector["rows"]:
        lines.append(f"| {r['case']} | {r['corrector_steps']} | {r['member_forwards']} | {r['w1_to_barycenter']:.3f} | "
                     f"{r['w1_to_target']:.3f} | {r['right_share']:.3f} |")  # fmt: skip
    control = corrector["control"]
    lines += ["", (f"Share of the right mode (above x = {corrector['midpoint']:.1f}): target "
                   f"{corrector['target_right_share']:.3f}, clean barycenter "
                   f"{corrector['barycenter_right_share']:.3f}. "
                   f"Sampling floor (W1 of {num_generated} exact draws of the barycenter to its own CDF): "
                   f"{corrector['barycenter_floor_w1']:.3f}."), "",
              (f"Control with a known answer: members N(-1, 0.3²) and N(1, 1²), λ = (0.5, 0.5), exact scores; their "
               f"barycenter is N({control['mean']:.4f}, {control['std']:.4f}²). Sampling floor "
               f"{control['floor_w1']:.4f}."), "",
              "| M | W1 to the barycenter | sample mean | sample std |", "| ---: | ---: | ---: | ---: |"]  # fmt: skip
    lines += [f"| {r['corrector_steps']} | {r['w1_to_barycenter']:.4f} | {r['mean']:.4f} | {r['std']:.4f} |"
              for r in control["rows"]]  # fmt: skip
    return lines


def report_markdown(settings: Any, payload: Dict[str, Any]) -> str:
    """The human-readable report of one 1-D run."""
    rows, meta = payload["rows"], payload["meta"]
    methods = ["scratch", "scorefusion", "scorefusion-full", "aux1", "aux2"]
    fusion = {(r["n"], r["method"]): r for r in rows if r["method"].startswith("scorefusion")}
    weight_lines = [f"| {n} | {_weights_cell(fusion[(n, 'scorefusion')])} | "
                    f"{_weights_cell(fusion[(n, 'scorefusion-full')])} |" for n in settings.n_values]  # fmt: skip
    scratch = [r for r in rows if r["method"] == "scratch"]
    trial_se = max((r["trial_se"] or 0.0) for r in rows)
    aux_training = ", ".join(f"aux{i + 1} {t['best_step']}/{t['steps_run']}"
                             for i, t in enumerate(meta["auxiliary_training"]))  # fmt: skip
    ref = payload["reference_weights"]
    lines = [
        f"# 1-D Gaussian mixtures ({settings.setup} setup, {settings.preset} run)", "",
        (f"Target {asdict_text(payload['target'])}; auxiliaries "
         f"{', '.join(asdict_text(a) for a in payload['auxiliaries'])} (the reference notebook's values). Auxiliary "
         f"sets {settings.auxiliary_sizes[0]} train / {settings.auxiliary_sizes[1]} validation points; target n "
         "training points plus n/4 validation points. "
         f"{_setup_text(settings, payload)}"), "",
        (f"Score networks: MLPs (hidden {settings.hidden_size}), DDPM epsilon loss (1000 steps, linear betas), "
         f"early-stopped on their validation points (held-out denoising loss, fixed draws): auxiliaries at most "
         f"{settings.auxiliary_training.steps} steps of batch {settings.auxiliary_training.batch_size}, scratch at "
         f"most {settings.scratch_training.steps} steps of batch {settings.scratch_training.batch_size}. scorefusion: "
         "`fit_weights` on the n target points with `timestep_range=\"small_t\"` (sigma_t <= 0.1, the paper's 1-D "
         "setting; the reference fits t in [1e-7, 1e-4] of its VE SDE); scorefusion-full: the same over the whole "
         f"range. Metric: W1 between {settings.num_generated} generated samples (DDIM, {settings.sampling_steps} "
         f"steps) and {settings.num_test} held-out target points, data units; {settings.num_trials} sampling trials "
         f"per model. ± is the standard error over {len(settings.seeds)} seeds of each seed's mean over trials "
         "(each seed redraws the target sample, the scratch training and the fit); the within-seed standard error "
         f"over trials is at most {trial_se:.3f}."), "",
        "## W1 to the target (lower is better)", "",
        markdown_table(rows, methods, "w1", "w1_se", digits=3, best="min"), "",
        "## Fitted weights λ (aux1, aux2): mean (and sd) over seeds", "",
        "| n | small t | full range |", "| ---: | --- | --- |", *weight_lines, "",
        f"Reference notebook at n = 1024 (paper setup, small t, SGD on softmax logits): {ref[0]:.3f}, {ref[1]:.3f}.",
        "",
        ("One-forward bakes do not apply here: the two auxiliaries are trained independently (from different random "
         "initialisations, not fine-tuned from one base), so averaging their weights (a merged model, "
         "`fit_weights(target=\"merge\")`) does not give a model of either population; the digits experiment "
         "measures merging and distillation."), "",
        "Early stopping of scratch (kept step / steps run, per seed): " + "; ".join(
            f"n = {r['n']}: " + ", ".join(f"{b}/{s}" for b, s in zip(r["best_step"], r["steps_run"])) for r in scratch)
        + f". Auxiliaries: {aux_training}.", "",
        "## What the fused sampler samples", "",
        ("W1 to the target (exact target CDF, data units) of (a) the clean barycenter p1^λ p2^(1-λ) of the "
         "auxiliaries as the fusion sees them (in the target's model coordinates), normalised on a grid; (b) the fused "
         "DDIM sampler with the auxiliaries' exact scores; (c) the fused sampler with the trained auxiliaries; one "
         f"sample of {settings.num_generated} per λ, the same initial noise for every λ. Coordinates: the first seed's "
         "largest target sample."), "",
        *_what_is_sampled_lines(payload["what_is_sampled"], meta["lambda_marks"]), "",
        _plain_words(payload["what_is_sampled"], payload["corrector"]), "",
        "![what is sampled](what_is_sampled.png)", "",
        "## Langevin corrector", "",
        (f"The fused sampler at the small-t fitted λ with M Langevin corrector steps (snr 0.16) after each of its "
         f"{settings.sampling_steps} DDIM steps but the last; member forwards per sample = 2 x "
         f"({settings.sampling_steps} + {settings.sampling_steps - 1} M). W1 to the exact clean barycenter (grid CDF) "
         "and to the target (exact CDF)."), "",
        *_corrector_lines(payload["corrector"], settings.num_generated), "",
        "![corrector](corrector.png)", "",
        "## Feynman-Kac correctors (SMC)", "", *fkc_lines(payload["fkc"]), "", "![FKC](fkc.png)", "",
        "## Figures", "", "![W1 vs n](w1_vs_n.png)", "", "![samples](samples.png)", "",
        f"Wall time: {meta['wall_time_s']:.0f} s on {meta['num_threads']} torch thread(s).", "",
    ]  # fmt: skip
    return "\n".join(lines)


def asdict_text(mixture: Dict[str, Any]) -> str:
    """``means (-6, 6), std 0.8, weights (0.6, 0.4)``."""
    def numbers(values: Any) -> str:
        return ", ".join(f"{v:g}" for v in values)

    return f"means ({numbers(mixture['means'])}), std {mixture['std']:g}, weights ({numbers(mixture['weights'])})"

