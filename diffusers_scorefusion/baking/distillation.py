"""Distilling a fusion into one model: a student that samples at the cost of one member forward per step.

The student regresses the fusion's (the teacher's) prediction on noised latents: ``min E || s_theta(x_t, t) -
sum_i lambda_i eps_i(x_t, t) ||^2`` with ``x_t`` drawn from the target samples and from samples the fusion generates
(a regression on the teacher, so without the variance of the noise target). The teacher runs once per noised latent
(k member forwards); the student is early-stopped on held-out teacher targets. Students:

- ``"merged"`` (full fine-tunes of one architecture): the members' class with parameters ``sum_i lambda_i theta_i``,
  every parameter fine-tuned;
- ``"lora"`` (LoRA fusions): a new PEFT LoRA of rank `rank` named ``"distilled"`` on the fusion's base, started from the
  rank-`rank` SVD of the merged delta ``sum_i lambda_i scale_i B_i A_i`` (exact when `rank >= sum_i r_i`); only its
  factors are trained.
"""

import copy
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from diffusers.utils import BaseOutput
from torch import nn
from tqdm.auto import tqdm

from ..fitting.fitting_schedules import noising_process
from ..fitting.fitting_utils import check_tensor, member_inputs, reduce_sum
from ..fitting.merge_fitting import MergedPredictor
from ..models.modeling_fused_unet import FusedUNet

STUDENTS = ("merged", "lora")
ADAPTER_NAME = "distilled"


@dataclass
class DistillOutput(BaseOutput):
    r"""
    Output of [`distill`].

    Args:
        model (`torch.nn.Module`): the student: a model of the members' class (`"merged"`), or the fusion's base model
            with the adapter `adapter_name` active (`"lora"`; the base is shared with the fusion's members).
        adapter_name (`str` or `None`): `"distilled"` for a LoRA student, else `None`.
        initial_validation_loss (`float`): the held-out teacher loss of the un-distilled starting point.
        validation_loss (`float`): the held-out teacher loss of the returned (best) student.
        best_step (`int`): the training step of the returned student (0: the starting point was never beaten).
        history (`list[dict]`): `{"step", "train_loss", "validation_loss"}` at every evaluation.
        num_teacher_forward_passes (`int`): member forwards spent on generating samples and on teacher targets.
        num_generated (`int`): samples the fusion generated for the regression set.
    """

    model: nn.Module
    adapter_name: Optional[str]
    initial_validation_loss: float
    validation_loss: float
    best_step: int
    history: List[Dict[str, float]]
    num_teacher_forward_passes: int
    num_generated: int


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_student(fused: FusedUNet, student: str) -> MergedPredictor:
    """The fusion's merge (refusing members that cannot be merged), checked against the student kind."""
    predictor = MergedPredictor(fused)
    if student == "merged" and predictor.is_lora:
        raise ValueError("student='merged' needs full fine-tunes; this fusion's members are LoRAs of one base: use "
                         "student='lora' with a rank")  # fmt: skip
    if student == "lora" and not predictor.is_lora:
        raise ValueError("student='lora' needs a LoRA fusion (FusedUNet.from_lora); these members are full models: "
                         "use student='merged'")  # fmt: skip
    if student == "lora" and ADAPTER_NAME in predictor.module.peft_config:
        raise ValueError(f"the base already has an adapter named {ADAPTER_NAME!r}; delete it first")
    return predictor


def _merged_student(predictor: MergedPredictor, weights: torch.Tensor) -> Tuple[nn.Module, List[nn.Parameter]]:
    """A copy of member 0 with ``sum_i lambda_i theta_i``; every parameter trainable."""
    student = copy.deepcopy(predictor.module)
    merged = predictor.parameters_for(weights)
    with torch.no_grad():
        for name, tensor in list(student.named_parameters()) + list(student.named_buffers()):
            if name in merged:
                tensor.copy_(merged[name])
    student.requires_grad_(True)
    return student, list(student.parameters())


def _lora_student(predictor: MergedPredictor, weights: torch.Tensor, rank: int
                  ) -> Tuple[nn.Module, List[nn.Parameter]]:  # fmt: skip
    """Adds the adapter "distilled" (rank `rank`, the modules any member adapts) to the base, initialised with the
    rank-`rank` truncated SVD of the merged delta; returns the base and the adapter's parameters."""
    from peft import LoraConfig

    from ..fusion.merge_utils import truncate_lora
    from .lora_merge import adapter_factors, merge_factors

    base, adapters = predictor.module, predictor.adapters
    # the exact merged LoRA (scale 1), then its best rank-`rank` factors (zero-padded where the merge has fewer)
    merged, _, _ = merge_factors([adapter_factors(base, adapter) for adapter in adapters], weights.tolist())
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in merged})
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, init_lora_weights=True)
    with warnings.catch_warnings():  # several adapters in one base is the point of a LoRA fusion
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        base.add_adapter(config, adapter_name=ADAPTER_NAME)
    layers = dict(base.named_modules())
    with torch.no_grad():
        for name in modules:
            down, up, _ = truncate_lora(merged[f"{name}.lora_A.weight"], merged[f"{name}.lora_B.weight"], rank)
            layers[name].lora_A[ADAPTER_NAME].weight.copy_(down)
            layers[name].lora_B[ADAPTER_NAME].weight.copy_(up)
    base.set_adapter(ADAPTER_NAME)
    trainable = [param for name, param in base.named_parameters() if f".{ADAPTER_NAME}." in name]
    return base, trainable


@torch.no_grad()
def _generate(fused: FusedUNet, scheduler: Any, shape: Tuple[int, ...], hidden: Optional[torch.Tensor],
              num_inference_steps: int, generator: torch.Generator) -> torch.Tensor:  # fmt: skip
    """Samples of the fusion with Diffusers' DDIM sampler (eta = 0) on the fitting scheduler's schedule."""
    from diffusers import DDIMScheduler

    sampler = DDIMScheduler.from_config(scheduler.config)
    sampler.set_timesteps(num_inference_steps)
    sample = torch.randn(shape, generator=generator).to(fused.device, fused.dtype) * sampler.init_noise_sigma
    for timestep in sampler.timesteps:
        noise_pred = fused(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]
        sample = sampler.step(noise_pred, timestep, sample).prev_sample
    return sample


def _regression_set(fused: FusedUNet, process: Any, clean: torch.Tensor, hidden: Optional[torch.Tensor],
                    num_draws: int, batch_size: int, generator: torch.Generator) -> Dict[str, Any]:  # fmt: skip
    """`num_draws` noised copies of each clean sample and the teacher's prediction on each, `(M, ...)`."""
    rows = clean.repeat_interleave(num_draws, dim=0)  # (M, C, H, W)
    hidden_rows = None if hidden is None else hidden.repeat_interleave(num_draws, dim=0)
    timesteps = process.draw(rows.shape[0], generator)  # (M,)
    noise = torch.randn(rows.shape, generator=generator).to(rows)
    noisy = process.noisy_sample(rows, noise, timesteps)  # x_t
    model_timesteps = process.model_timesteps(timesteps, noisy)
    teacher = []
    with torch.no_grad():
        for start in range(0, rows.shape[0], batch_size):
            chunk = slice(start, start + batch_size)
            teacher.append(fused(noisy[chunk], model_timesteps[chunk], return_dict=False,
                                 encoder_hidden_states=None if hidden_rows is None else hidden_rows[chunk])[0])
    return dict(noisy=noisy, timesteps=model_timesteps, hidden=hidden_rows, teacher=torch.cat(teacher))


def _student_loss(student: nn.Module, fused: FusedUNet, data: Dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
    """Mean squared distance to the teacher over `rows` (per dimension), in the fusion's parameterisation."""
    sample, timesteps = data["noisy"][rows], data["timesteps"][rows]
    hidden = None if data["hidden"] is None else data["hidden"][rows]
    kwargs = {} if hidden is None else {"encoder_hidden_states": hidden}
    output = student(sample, timesteps, return_dict=False, **kwargs)[0]
    output = fused._convert(output, sample, timesteps, fused.config.member_prediction_types[0])
    return (output.float() - data["teacher"][rows].float()).pow(2).mean()


def _validation_loss(student: nn.Module, fused: FusedUNet, data: Dict[str, Any], batch_size: int,
                     accelerator: Optional[Any]) -> float:  # fmt: skip
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, data["noisy"].shape[0], batch_size):
            rows = torch.arange(start, min(start + batch_size, data["noisy"].shape[0]))
            total += torch.tensor([_student_loss(student, fused, data, rows).item() * rows.numel(), rows.numel()],
                                  dtype=torch.float64)  # fmt: skip
    total = reduce_sum(total, accelerator)
    return float(total[0] / total[1])


def distill(
    fused: FusedUNet,
    scheduler: Any,
    samples: torch.Tensor,
    *,
    student: str = "merged",
    rank: Optional[int] = None,
    encoder_hidden_states: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    progress_bar: bool = True,
    num_generated: Optional[int] = None,
    num_inference_steps: int = 20,
    num_noise_draws: int = 16,
    validation_fraction: float = 0.25,
    max_steps: int = 500,
    batch_size: int = 32,
    learning_rate: float = 1e-4,
    eval_every: int = 25,
    patience: int = 4,
    accelerator: Optional[Any] = None,
) -> DistillOutput:
    r"""
    Trains one model to predict what the fusion predicts: one member forward per sampling step instead of k.

    Args:
        fused ([`FusedUNet`]): the teacher, with its fitted weights (one weight vector, or a table over timestep bins:
            the teacher is the fusion as it samples). Left unchanged, except that a LoRA student is added to its base.
        scheduler (`SchedulerMixin`): the members' training noise schedule (as for `fit_weights`).
        samples (`torch.Tensor`): target samples in model space `(N, C, H, W)` (latents; pixels in [-1, 1]).
        student (`str`): `"merged"` (full fine-tunes: the members' class with ``sum_i lambda_i theta_i``, fine-tuned)
            or `"lora"` (LoRA fusions: a new adapter `"distilled"` of rank `rank` on the base).
        rank (`int`, *optional*): the LoRA student's rank (`student="lora"` only).
        encoder_hidden_states (`torch.Tensor`, *optional*): per-sample conditioning `(N, L, D)`; generated samples reuse
            them in turn.
        generator (`torch.Generator`, *optional*): makes generation, noising, the split and batches reproducible.
        progress_bar (`bool`): tqdm progress bars (main process only).
        num_generated (`int`, *optional*): samples the fusion generates for the regression set (default N; 0: none).
        num_inference_steps (`int`): DDIM steps per generated sample.
        num_noise_draws (`int`): noised copies (timestep and noise) per clean sample.
        validation_fraction (`float`): share of the clean samples (target and generated, at least one) held out for
            early stopping.
        max_steps, batch_size, learning_rate, eval_every, patience: Adam steps, noised latents per step, its learning
            rate, steps between held-out evaluations, evaluations without improvement before stopping.
        accelerator (`accelerate.Accelerator`, *optional*): data-parallel training: `prepare`d student and optimizer,
            `accelerator.backward`, the regression set sharded over processes, held-out losses summed over them.

    Returns:
        [`DistillOutput`]: the best student on the held-out teacher targets and its training history.
    """
    if not isinstance(fused, FusedUNet):
        raise TypeError(f"fused must be a FusedUNet (distillation of transformer fusions is not supported), got "
                        f"{type(fused).__name__}")  # fmt: skip
    if student not in STUDENTS:
        raise ValueError(f"student must be one of {STUDENTS}, got {student!r}")
    if (student == "lora") != (rank is not None):
        raise ValueError(f"rank is required for student='lora' and only for it; got student={student!r}, rank={rank!r}")
    rank = None if rank is None else _check_int(rank, "rank", 1)
    check_tensor(samples, "samples")
    if samples.ndim != 4 or samples.shape[0] == 0:
        raise ValueError(f"samples must be a non-empty batch (N, C, H, W) of target samples, got shape "
                         f"{tuple(samples.shape)}")  # fmt: skip
    num_generated = samples.shape[0] if num_generated is None else _check_int(num_generated, "num_generated", 0)
    for name, value in (("num_inference_steps", num_inference_steps), ("num_noise_draws", num_noise_draws),
                        ("max_steps", max_steps), ("batch_size", batch_size), ("eval_every", eval_every),
                        ("patience", patience)):  # fmt: skip
        _check_int(value, name, 1)
    if isinstance(validation_fraction, bool) or not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, numbers.Real) or not learning_rate > 0:
        raise ValueError(f"learning_rate must be a number > 0, got {learning_rate!r}")
    if samples.shape[0] + num_generated < 2:
        raise ValueError("distillation needs at least 2 clean samples (one to train on, one held out): got 1 sample "
                         "and num_generated=0")  # fmt: skip
    inputs, _ = member_inputs(fused, samples, encoder_hidden_states, None)
    predictor = _check_student(fused, student)
    hidden = inputs.get("encoder_hidden_states")
    # a weight table over timestep bins: the student starts from the merge with its mean row (the teacher keeps it)
    weights = fused.fusion_weights if fused.fusion_weights.ndim == 1 else fused.fusion_weights.mean(0)
    process = noising_process(fused, scheduler, "full", "uniform", 5.0, None, None)
    if generator is None:  # as fit_weights: a seed from torch's global generator
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    is_main = accelerator is None or accelerator.is_main_process
    num_members = fused.config.num_members

    # 1. the clean pool: the target samples and samples of the teacher
    pool, pool_hidden = [samples], None if hidden is None else [hidden]
    if num_generated > 0:
        reuse = torch.arange(num_generated) % samples.shape[0]
        generated_hidden = None if hidden is None else hidden[reuse.to(hidden.device)]
        pool.append(_generate(fused, scheduler, (num_generated, *samples.shape[1:]), generated_hidden,
                              num_inference_steps, generator))  # fmt: skip
        if pool_hidden is not None:
            pool_hidden.append(generated_hidden)
    clean, clean_hidden = torch.cat(pool), None if pool_hidden is None else torch.cat(pool_hidden)
    order = torch.randperm(clean.shape[0], generator=generator)
    num_validation = max(1, int(round(validation_fraction * clean.shape[0])))
    split = {"validation": order[:num_validation], "train": order[num_validation:]}
    if accelerator is not None:  # each process holds its share of the rows
        split = {key: rows[accelerator.process_index :: accelerator.num_processes] for key, rows in split.items()}
    data = {key: _regression_set(fused, process, clean[rows], None if clean_hidden is None else clean_hidden[rows],
                                 num_noise_draws, batch_size, generator) for key, rows in split.items()}  # fmt: skip
    num_teacher = num_members * (num_generated * num_inference_steps + sum(
        math.ceil(d["noisy"].shape[0] / batch_size) for d in data.values()))  # fmt: skip

    # 2. the student and its training
    model, trainable = (_lora_student(predictor, weights, rank) if student == "lora"
                         else _merged_student(predictor, weights))  # fmt: skip
    frozen = [param for param in model.parameters() if param.requires_grad and not any(param is t for t in trainable)]
    for param in frozen:
        param.requires_grad_(False)
    optimizer = torch.optim.Adam(trainable, lr=learning_rate)
    trained = model
    if accelerator is not None:
        trained, optimizer = accelerator.prepare(model, optimizer)
    named = [(name, param) for name, param in model.named_parameters() if any(param is t for t in trainable)]

    def snapshot() -> Dict[str, torch.Tensor]:
        return {name: param.detach().clone() for name, param in named}

    best_state = snapshot()
    initial = best = _validation_loss(model, fused, data["validation"], batch_size, accelerator)
    history, best_step, stale, running = [dict(step=0, train_loss=float("nan"), validation_loss=initial)], 0, 0, []
    num_train = data["train"]["noisy"].shape[0]
    try:
        with tqdm(total=max_steps, desc=f"distill ({student})", disable=not (progress_bar and is_main)) as bar:
            for step in range(1, max_steps + 1):
                trained.train()
                rows = torch.randint(num_train, (min(batch_size, num_train),), generator=generator)
                loss = _student_loss(trained, fused, data["train"], rows)
                optimizer.zero_grad()
                loss.backward() if accelerator is None else accelerator.backward(loss)
                optimizer.step()
                running.append(loss.item())
                bar.update(1)
                if step % eval_every and step != max_steps:
                    continue
                trained.eval()
                current = _validation_loss(model, fused, data["validation"], batch_size, accelerator)
                history.append(dict(step=step, train_loss=sum(running) / len(running), validation_loss=current))
                running = []
                bar.set_postfix(validation=f"{current:.5f}", best=f"{min(best, current):.5f}")
                if current < best:
                    best, best_step, stale = current, step, 0
                    best_state = snapshot()
                else:
                    stale += 1
                    if stale >= patience:
                        break
    finally:
        for param in frozen:
            param.requires_grad_(True)
        with torch.no_grad():
            for name, param in named:
                param.copy_(best_state[name])
    model.eval()
    return DistillOutput(model=model, adapter_name=ADAPTER_NAME if student == "lora" else None,
                         initial_validation_loss=initial, validation_loss=best, best_step=best_step, history=history,
                         num_teacher_forward_passes=num_teacher, num_generated=num_generated)  # fmt: skip
