"""The digits experiment's one-forward models baked from the fitted fusion: ``merge-refit`` and ``distilled``.

- ``merge-refit``: the auxiliaries' weights averaged with ``fit_weights(..., target="merge")``: the λ that minimises the
  merged model's denoising loss on the n target images, refined from the fusion's exact QP λ (same noised samples);
- ``distilled``: `distill` with the merged student (the auxiliaries averaged with the fusion's fitted λ, fine-tuned to
  match the fusion's prediction on noised target images and on samples the fusion generates, early-stopped on held-out
  teacher targets).

Both sample with one member forward per step; the fusions (``scorefusion``, ``uniform``) need one per auxiliary.
"""

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..baking.distillation import distill
from ..fitting import fit_weights
from ..models.modeling_fused_unet import FusedUNet
from .digits_models import merge_unets
from .training import make_noise_scheduler

BAKED_METHODS = ("merge-refit", "distilled")
FUSION_METHODS = ("scorefusion", "scorefusion-auto", "uniform")
DESCRIPTION = (
    "merge-refit: the auxiliaries' weights averaged with λ refitted for the merge (`fit_weights(target=\"merge\")`: "
    "projected gradient on the merged model's denoising loss over the same noised target images, from the fusion's "
    "QP λ). distilled: the auxiliaries averaged with the fusion's λ, then fine-tuned by `distill` to match the "
    "fusion's prediction on noised target images and on samples the fusion generates (early-stopped on held-out "
    "teacher targets). Member forwards per sampling step: the fusions run every auxiliary (4), every other model one."
)


def member_forwards_per_step(methods: Sequence[str], num_auxiliaries: int) -> Dict[str, int]:
    """Member forwards one sampling step costs: every auxiliary for the fusions, one for every single model."""
    return {method: num_auxiliaries if method in FUSION_METHODS else 1 for method in methods}


def baked_models(auxiliaries: Sequence[nn.Module], settings: Any, latents: torch.Tensor, fused: FusedUNet,
                 fit_state: torch.Tensor, seed: int) -> Dict[str, Tuple[nn.Module, Any, Dict[str, Any]]]:  # fmt: skip
    """``{"merge-refit": (model, weights, record), "distilled": (...)}`` for one seed and n.

    `fit_state` is the state of the fusion fit's generator before `fit_weights`: the refit draws the same noised
    samples, so it starts from the fusion's λ. `fused` carries the fitted λ (the teacher).
    """
    generator = torch.Generator()
    generator.set_state(fit_state)
    refit = fit_weights(FusedUNet(auxiliaries), make_noise_scheduler(), latents, generator=generator,
                        num_noise_draws=settings.fit_noise_draws, target="merge", batch_size=256, num_bootstrap=0,
                        progress_bar=False)  # fmt: skip
    record = refit.provenance["merge_refit"]
    refit_record = dict(best_step=record["iterations"], steps_run=record["iterations"],
                        start_weights=record["start_weights"], start_loss=record["start_loss"], loss=record["loss"],
                        iterations=record["iterations"], merged_forwards=record["num_merged_forward_passes"],
                        merged_backwards=record["num_merged_backward_passes"])  # fmt: skip
    distilled = distill(fused, make_noise_scheduler(), latents, student="merged", progress_bar=False,
                        generator=torch.Generator().manual_seed(30_000 + seed), num_generated=settings.num_generated,
                        num_inference_steps=settings.sampling_steps, num_noise_draws=settings.fit_noise_draws,
                        max_steps=settings.distill_steps, batch_size=64, learning_rate=settings.finetune_learning_rate,
                        eval_every=25, patience=4)  # fmt: skip
    distill_record = dict(best_step=distilled.best_step, steps_run=distilled.history[-1]["step"],
                          initial_validation_loss=distilled.initial_validation_loss,
                          validation_loss=distilled.validation_loss,
                          teacher_forwards=distilled.num_teacher_forward_passes)  # fmt: skip
    return {"merge-refit": (merge_unets(auxiliaries, refit.weights.tolist()), refit.weights.tolist(), refit_record),
            "distilled": (distilled.model, fused.fusion_weights.tolist(), distill_record)}


def bake_lines(records: Sequence[Dict[str, Any]], forwards: Dict[str, int]) -> List[str]:
    """Report lines: member forwards per sampling step per method, and the bakes' own losses."""
    lines = ["## Cost of sampling: member forwards per sampling step", "", DESCRIPTION, "",
             "| method | member forwards per sampling step |", "| --- | ---: |"]  # fmt: skip
    lines += [f"| {method} | {count} |" for method, count in forwards.items()]
    lines += ["", "## Baking: the refit's merged-model loss on the fitting data, the student's held-out teacher loss",
              "", "| n | seed | merge: loss at the fusion's λ → refit λ (iterations, merged forwards/backwards) | "
              "distilled: held-out teacher loss start → best (best step / steps run) |", "| ---: | ---: | --- | --- |"]
    refits = {(r["seed"], r["n"]): r["training"] for r in records if r["method"] == "merge-refit"}
    students = {(r["seed"], r["n"]): r["training"] for r in records if r["method"] == "distilled"}
    for seed, n in sorted(refits, key=lambda key: (key[1], key[0])):
        refit, student = refits[(seed, n)], students.get((seed, n))
        cell = "–" if student is None else (f"{student['initial_validation_loss']:.5f} → "
                                            f"{student['validation_loss']:.5f} "
                                            f"({student['best_step']}/{student['steps_run']})")  # fmt: skip
        lines.append(f"| {n} | {seed} | {refit['start_loss']:.5f} → {refit['loss']:.5f} ({refit['iterations']}, "
                     f"{refit['merged_forwards']}/{refit['merged_backwards']}) | {cell} |")  # fmt: skip
    return lines + [""]
