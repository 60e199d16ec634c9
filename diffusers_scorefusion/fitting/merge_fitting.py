"""Merge-aware weights (`fit_weights(target="merge")`): the lambda whose weight-space merge has the lowest loss.

The fusion predicts ``sum_i lambda_i eps_i(x_t, t)``, linear in lambda, so its loss is the exact QP. The merged model
``eps(x_t, t; sum_i lambda_i theta_i)`` (full fine-tunes of one architecture) or the base with the merged LoRA delta
``sum_i lambda_i scale_i B_i A_i`` is not linear in lambda: starting from the QP solution, projected gradient descent on
the simplex with backtracking minimises the same loss of the merged model on the same noised samples, differentiating
through lambda only (`torch.func.functional_call`; the members stay frozen). Every accepted step lowers the loss, so
the result is never worse than the QP start on the data it fits.

Cost per iteration: one forward and backward of the merged model over the noised samples (the gradient) plus one
forward per trial step (usually one or two).
"""

from dataclasses import replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..fusion.modeling_fusion import FusedModelMixin
from ..models.modeling_fused_unet import FusedUNet
from .fitting_utils import _draws, _select, reduce_sum

TARGETS = ("fusion", "merge")
MERGE_MAX_ITERATIONS = 30
MERGE_MAX_BACKTRACKS = 8
MERGE_TOLERANCE = 1e-6  # stop when a step moves no weight by more than this
MERGE_RELATIVE_DECREASE = 1e-6  # or when an accepted step lowers the loss by less than this fraction
MERGE_FIRST_STEP = 0.1  # the first trial moves the weights by at most this much


def project_to_simplex(vector: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of `(k,)` onto the simplex (sort-based, Held et al. 1974; Duchi et al. 2008)."""
    ordered, _ = torch.sort(vector, descending=True)
    cumulative = ordered.cumsum(0) - 1
    index = torch.arange(1, vector.numel() + 1, dtype=vector.dtype)
    rho = int((ordered - cumulative / index > 0).nonzero().max())  # last index kept positive
    return (vector - cumulative[rho] / (rho + 1)).clamp(min=0)


class MergedPredictor:
    r"""
    The prediction of the weight-space merge of a fusion's members, differentiable in the weights.

    Full fine-tunes (members of one class with the same parameters): member 0 run with every floating parameter and
    buffer set to ``sum_i lambda_i theta_i``. LoRA fusions ([`LoraMember`]s of one base): the base with every member's
    adapter active and each adapter's ``B`` scaled by ``lambda_i``, i.e. the LoRA delta ``sum_i lambda_i scale_i B_i
    A_i``, what `set_adapters(names, adapter_weights=lambda)` runs and what a merged LoRA holds.
    """

    def __init__(self, fused: Any):
        from ..models.modeling_lora_member import LoraMember

        members = list(fused.fusion_members)
        nested = [i for i, member in enumerate(members) if isinstance(member, FusedModelMixin)]
        if nested:
            raise ValueError(f"members {nested} are fusions themselves: merge their members into one flat fusion first")
        if isinstance(fused, FusedUNet):
            if len(fused.text_encoders) > 0:
                raise ValueError("members with their own text encoders cannot be merged into one model: a merged "
                                 "model reads one prompt encoding")  # fmt: skip
            types = fused.config.member_prediction_types
            if len(set(types)) > 1:
                raise ValueError(f"members predict {types}: only members of one prediction type can be merged")
        self.fused = fused
        self.is_lora = isinstance(members[0], LoraMember)
        if any(isinstance(member, LoraMember) != self.is_lora for member in members):
            raise ValueError("a merge needs all members to be LoRAs of one base or all full models; got a mix "
                             f"({[type(member).__name__ for member in members]})")  # fmt: skip
        if self.is_lora:
            self._init_lora(members)
        else:
            self._init_full(members)

    def _init_full(self, members: Sequence[nn.Module]) -> None:
        classes = {type(member).__name__ for member in members}
        if len(classes) > 1:
            raise ValueError(f"members of different classes cannot be merged, got {sorted(classes)}")
        states = [dict(member.named_parameters(), **dict(member.named_buffers())) for member in members]
        for i, state in enumerate(states[1:], start=1):
            differing = next((name for name in states[0] if name not in state
                              or state[name].shape != states[0][name].shape), None)  # fmt: skip
            differing = differing or next((name for name in state if name not in states[0]), None)
            if differing is not None:
                shapes = [tuple(s[differing].shape) if differing in s else "missing" for s in (states[0], state)]
                raise ValueError(f"members 0 and {i} have different architectures: parameter {differing!r} is "
                                 f"{shapes[0]} vs {shapes[1]}")  # fmt: skip
        names = [name for name, value in states[0].items() if value.is_floating_point()]
        self.module = members[0]
        self.tensors = {name: [state[name].detach() for state in states] for name in names}

    def _init_lora(self, members: Sequence[nn.Module]) -> None:
        bases = {id(member.base) for member in members}
        if len(bases) > 1:
            raise ValueError(f"the LoRA members do not share one base model ({len(bases)} bases): only LoRAs of one "
                             "base can be merged")  # fmt: skip
        base = members[0].base
        self.adapters = [member.adapter_name for member in members]
        if len(set(self.adapters)) < len(self.adapters):
            raise ValueError(f"members repeat adapters {self.adapters}: each LoRA member needs its own adapter")
        for name in self.adapters:
            if getattr(base.peft_config[name], "use_dora", False):
                raise ValueError(f"adapter {name!r} is a DoRA adapter, whose delta is not linear in its weight")
        self.module = base
        self.tensors = {}  # parameter name -> (member index, B weight or bias)
        for name, value in base.named_parameters():
            for i, adapter in enumerate(self.adapters):
                if f".lora_B.{adapter}." in name:
                    self.tensors[name] = (i, value.detach())

    def parameters_for(self, weights: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The replaced tensors for `weights` `(k,)` (differentiable in `weights`)."""
        if self.is_lora:
            return {name: weights[i].to(value.dtype) * value for name, (i, value) in self.tensors.items()}
        return {name: sum(weights[i].to(value.dtype) * value for i, value in enumerate(values))
                for name, values in self.tensors.items()}  # fmt: skip

    def __call__(self, weights: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor, **kwargs: Any
                 ) -> torch.Tensor:  # fmt: skip
        """The merged model's prediction for `(sample, timestep, **kwargs)` in the fusion's parameterisation."""
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        if isinstance(self.fused, FusedUNet):
            args, call_kwargs = (sample, timestep), dict(kwargs, return_dict=False)
        else:
            names = list(self.fused._forward_signature.parameters)
            args, call_kwargs = (), {names[0]: sample, self.fused._timestep_argument: timestep, **kwargs}
            if "return_dict" in names:
                call_kwargs["return_dict"] = False
        if self.is_lora:
            previous = list(self.module.active_adapters())
            self.module.set_adapter(self.adapters)
        try:
            output = torch.func.functional_call(self.module, self.parameters_for(weights), args, call_kwargs)[0]
        finally:
            if self.is_lora:
                self.module.set_adapter(previous)
        if isinstance(self.fused, FusedUNet):
            output = self.fused._convert(output, sample, timestep, self.fused.config.member_prediction_types[0])
        return output


def _noised_batches(process: Any, latents: torch.Tensor, inputs: Tuple[Dict[str, Any], Dict[str, Any]],
                    indices: Sequence[int], seed: int, options: Dict[str, Any]
                    ) -> Iterator[Dict[str, Any]]:  # fmt: skip
    """The noised samples `fit_weights` fitted on (the same per-sample seeds), `batch_size` rows at a time."""
    rows: List[Tuple[int, torch.Tensor, torch.Tensor]] = []
    for index in indices:
        timesteps, noise = _draws(seed, index, options["num_noise_draws"], process, latents.shape[1:])
        rows.extend((index, timesteps[d], noise[d]) for d in range(timesteps.numel()))
    per_sample, shared = inputs
    for start in range(0, len(rows), options["batch_size"]):
        chunk = rows[start : start + options["batch_size"]]
        sample_index = torch.tensor([row[0] for row in chunk])  # (B,)
        timesteps = torch.stack([row[1] for row in chunk])  # (B,)
        noise = torch.stack([row[2] for row in chunk]).to(latents.device)  # (B, C, H, W)
        x0 = latents[sample_index.to(latents.device)]
        sample = process.noisy_sample(x0, noise, timesteps)  # x_t
        yield dict(sample=sample, timestep=process.model_timesteps(timesteps, sample),
                   target=process.target(x0, noise, timesteps), loss_weights=process.loss_weights(timesteps),
                   kwargs={**_select(per_sample, sample_index, latents.shape[0]), **shared})  # fmt: skip


class MergeObjective:
    """The merged model's mean weighted denoising loss over the noised samples (summed over processes), with counts of
    merged-model forwards and backwards (one per batch)."""

    def __init__(self, predictor: MergedPredictor, batches: Callable[[], Iterator[Dict[str, Any]]],
                 accelerator: Optional[Any]):  # fmt: skip
        self.predictor, self.batches, self.accelerator = predictor, batches, accelerator
        self.num_forward_passes = self.num_backward_passes = 0

    def __call__(self, weights: torch.Tensor, with_gradient: bool) -> Tuple[float, Optional[torch.Tensor]]:
        total = torch.zeros(2, dtype=torch.float64)  # (loss sum, rows)
        gradient = torch.zeros_like(weights)
        for batch in self.batches():
            variable = weights.detach().clone().requires_grad_(with_gradient)
            with torch.set_grad_enabled(with_gradient):
                prediction = self.predictor(variable, batch["sample"], batch["timestep"], **batch["kwargs"])
                error = (prediction.double() - batch["target"].double()).pow(2).flatten(1).mean(1)  # (B,)
                loss_sum = (batch["loss_weights"].to(error) * error).sum()  # sum_rows w(t) |f - target|^2 / D
            self.num_forward_passes += 1
            if with_gradient:
                gradient += torch.autograd.grad(loss_sum, variable)[0]
                self.num_backward_passes += 1
            total += torch.tensor([loss_sum.item(), error.numel()], dtype=torch.float64)
        total = reduce_sum(total, self.accelerator)
        if not torch.isfinite(total[0]):
            raise ValueError(f"the merged model's loss is not finite at weights {weights.tolist()}")
        gradient = reduce_sum(gradient, self.accelerator) / total[1] if with_gradient else None
        return float(total[0] / total[1]), gradient


def minimise_merge_loss(objective: Callable[[torch.Tensor, bool], Tuple[float, Optional[torch.Tensor]]],
                        start: torch.Tensor, max_iterations: int = MERGE_MAX_ITERATIONS,
                        progress: Any = None) -> Tuple[torch.Tensor, List[float]]:  # fmt: skip
    """Projected gradient descent on the simplex from `start`, halving a rejected step and doubling an accepted one.

    Stops after `max_iterations` steps, when no trial step lowers the loss, or when a step lowers it by less than a
    fraction `MERGE_RELATIVE_DECREASE`. Only steps that lower the loss are taken, so ``history`` (the loss after each
    accepted step, the start first) decreases strictly. Returns the final weights `(k,)` (float64) and the history.
    """
    weights = start.to(torch.float64)
    loss, gradient = objective(weights, True)
    history = [loss]
    spread = float((gradient - gradient.mean()).abs().max())
    step = MERGE_FIRST_STEP / spread if spread > 0 else 0.0
    for _ in range(max_iterations if step > 0 else 0):
        accepted = None
        for _ in range(MERGE_MAX_BACKTRACKS):
            candidate = project_to_simplex(weights - step * gradient)
            if float((candidate - weights).abs().max()) < MERGE_TOLERANCE:
                break
            candidate_loss, _ = objective(candidate, False)
            if candidate_loss < loss:
                accepted = candidate
                break
            step /= 2
        if progress is not None:
            progress.update(1)
        if accepted is None:
            break
        weights = accepted
        loss, gradient = objective(weights, True)  # the same loss as the trial (same samples), plus the gradient
        history.append(loss)
        if history[-2] - loss < MERGE_RELATIVE_DECREASE * abs(history[-2]):
            break
        step *= 2
    return weights, history


def fit_merge_weights(fused: Any, start: torch.Tensor, process: Any, latents: torch.Tensor,
                      inputs: Tuple[Dict[str, Any], Dict[str, Any]], indices: Sequence[int], seed: int,
                      options: Dict[str, Any], accelerator: Optional[Any],
                      progress: Any = None) -> Tuple[torch.Tensor, Dict[str, Any]]:  # fmt: skip
    """Refits the QP weights `start` `(k,)` for the merged model on `fit_weights`' noised samples; returns the
    weights and a provenance record (losses, iterations, merged-model forwards and backwards)."""
    predictor = MergedPredictor(fused)
    objective = MergeObjective(predictor, lambda: _noised_batches(process, latents, inputs, indices, seed, options),
                               accelerator)  # fmt: skip
    weights, history = minimise_merge_loss(objective, start, options["merge_max_iterations"], progress)
    record = dict(
        optimizer="projected gradient descent on the simplex with backtracking (gradient through the weights only)",
        merge_kind="lora" if predictor.is_lora else "full", start_weights=start.tolist(), start_loss=history[0],
        loss=history[-1], iterations=len(history) - 1, loss_history=history,
        num_merged_forward_passes=int(reduce_sum(torch.tensor([float(objective.num_forward_passes)]), accelerator)),
        num_merged_backward_passes=int(reduce_sum(torch.tensor([float(objective.num_backward_passes)]), accelerator)),
        max_iterations=options["merge_max_iterations"],
    )  # fmt: skip
    return weights, record


def check_merge_target(fused: Any, target: str, method: str, num_timestep_bins: int, max_iterations: Any) -> None:
    """Refuses, before any member runs, a merge refit that cannot be done (also checks that the members merge)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if method != "exact":
        raise ValueError(f"target='merge' starts from the exact QP solution; got method={method!r} (use 'exact')")
    if num_timestep_bins != 1:
        raise ValueError(f"target='merge' fits one weight vector (a merged model has one set of parameters), got "
                         f"num_timestep_bins={num_timestep_bins}")  # fmt: skip
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 0:
        raise ValueError(f"merge_max_iterations must be an int >= 0, got {max_iterations!r}")
    MergedPredictor(fused)


def refit_for_merge(fused: Any, result: Any, process: Any, latents: torch.Tensor,
                    inputs: Tuple[Dict[str, Any], Dict[str, Any]], indices: Sequence[int], seed: int,
                    options: Dict[str, Any], accelerator: Optional[Any], progress_bar: bool) -> Any:  # fmt: skip
    """`result` (the exact fit) with the weights refitted for the merged model, its loss, and the provenance."""
    from tqdm.auto import tqdm

    with tqdm(total=options["merge_max_iterations"], desc="fit_weights (merge refit)", disable=not progress_bar) as bar:
        weights, record = fit_merge_weights(fused, result.weights, process, latents, inputs, indices, seed, options,
                                            accelerator, bar)  # fmt: skip
    record["fusion_loss_at_start"] = result.loss  # the QP (fusion) loss of the start weights, for comparison
    provenance = dict(result.provenance, target="merge", merge_refit=record,
                      num_forward_passes=result.num_forward_passes, standard_errors=None)  # fmt: skip
    if options["set_weights"]:
        fused.set_weights(weights, provenance=provenance)
    return replace(result, weights=weights, loss=record["loss"], standard_errors=None, provenance=provenance)
