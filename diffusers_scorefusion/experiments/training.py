"""Training small Diffusers denoisers with the DDPM epsilon loss, fine-tuning them, and caching them on disk."""

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn
from tqdm.auto import tqdm

from ..fusion.corrector_utils import DEFAULT_SNR
from ..pipelines.corrector import langevin_correct

# Bump when the training code changes in a way that changes the trained weights: it is part of every cache key.
TRAINING_CODE_VERSION = 2


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation settings: Adam with a cosine learning-rate decay to zero, plain DDPM epsilon loss.

    With ``eval_every > 0`` the validation loss is measured every `eval_every` steps from `min_steps` on (step 0
    included when ``min_steps = 0``: a fine-tune may then keep its starting model); the model with the lowest one is
    kept (early stopping), and training stops after `patience` evaluations without improvement (``patience = 0``:
    never stops early, still keeps the best). `steps` is then the maximum budget.
    """

    steps: int
    learning_rate: float
    batch_size: int = 64
    warmup_steps: int = 0
    eval_every: int = 0
    patience: int = 0
    min_steps: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.learning_rate <= 0 or self.warmup_steps < 0:
            raise ValueError(f"steps, batch_size and learning_rate must be positive and warmup_steps >= 0, got {self}")
        if self.eval_every < 0 or self.patience < 0 or not 0 <= self.min_steps <= self.steps:
            raise ValueError(f"eval_every and patience must be >= 0 and 0 <= min_steps <= steps, got {self}")


def make_noise_scheduler(clip_sample: bool = True) -> DDPMScheduler:
    """The shared training noise schedule: DDPM, 1000 steps, linear betas 1e-4..0.02, epsilon prediction.

    `clip_sample` (Diffusers' default, True) clips predicted clean samples to [-1, 1] when sampling: right for images
    scaled to [-1, 1], wrong for data outside that range.
    """
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                         clip_sample=clip_sample)  # fmt: skip


def make_digit_unet(block_out_channels=(32, 64), seed: int = 0) -> UNet2DModel:
    """A tiny `UNet2DModel` for 1x8x8 images (two resolutions, one ResNet layer per block, no attention)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=8, in_channels=1, out_channels=1, block_out_channels=tuple(block_out_channels),
            layers_per_block=1, down_block_types=("DownBlock2D",) * len(block_out_channels),
            up_block_types=("UpBlock2D",) * len(block_out_channels), norm_num_groups=8, add_attention=False,
        )  # fmt: skip


def train_denoiser(
    model: nn.Module,
    draw_batch: Callable[[int, torch.Generator], torch.Tensor],
    noise_scheduler: DDPMScheduler,
    config: TrainingConfig,
    generator: torch.Generator,
    description: str = "training",
    validation: Optional[Callable[[nn.Module], float]] = None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Minimises ``E ||eps_theta(alpha_t x0 + sigma_t eps, t) - eps||^2`` over batches ``x0 = draw_batch(B, gen)``.

    `model(sample, timestep)` returns a Diffusers output (or tuple) whose first entry is the noise prediction. With
    ``config.eval_every > 0``, `validation(model)` (a held-out loss, lower is better) picks the weights kept (see
    `TrainingConfig`). The model is trained in place and returned in eval mode with a record: ``steps_run``,
    ``best_step`` (the step of the kept weights) and ``best_validation_loss`` (None without validation).
    """
    if config.eval_every > 0 and validation is None:
        raise ValueError(f"config.eval_every={config.eval_every} needs a validation function, got None")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    best = dict(loss=float("inf"), step=0, state=None)
    evaluations_since_best = 0

    def evaluate(step: int) -> bool:
        """Validates at `step`; True when training should stop (patience used up)."""
        nonlocal evaluations_since_best
        model.eval()
        loss = float(validation(model))
        model.train()
        if loss < best["loss"]:
            best.update(loss=loss, step=step, state=copy.deepcopy(model.state_dict()))
            evaluations_since_best = 0
        else:
            evaluations_since_best += 1
        return config.patience > 0 and evaluations_since_best >= config.patience

    def due(step: int) -> bool:
        if config.eval_every == 0 or step < config.min_steps:
            return False
        return step % config.eval_every == 0 or step == config.steps

    model.train()
    step, stopped = 0, due(0) and evaluate(0)
    progress = tqdm(total=config.steps, desc=description, leave=False, mininterval=1.0)
    while step < config.steps and not stopped:
        clean = draw_batch(config.batch_size, generator)  # x0
        noise = torch.randn(clean.shape, generator=generator)  # eps
        timesteps = torch.randint(0, num_train_timesteps, (clean.shape[0],), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)  # x_t = alpha_t x0 + sigma_t eps
        noise_pred = model(noisy, timesteps, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(noise_pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if due(step):
            stopped = evaluate(step)
    progress.close()
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    record = dict(steps_run=step, best_step=best["step"] if best["state"] is not None else step,
                  best_validation_loss=None if best["state"] is None else best["loss"])  # fmt: skip
    return model, record


def cache_key(settings: Dict[str, Any]) -> str:
    """A short stable hash of JSON-serialisable training settings (plus the training-code version)."""
    payload = json.dumps({"code_version": TRAINING_CODE_VERSION, **settings}, sort_keys=True, default=_jsonable)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if isinstance(value, TrainingConfig):
        return asdict(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot hash a {type(value).__name__} into a cache key")


def load_or_train(
    cache_dir: Optional[str],
    name: str,
    settings: Dict[str, Any],
    build: Callable[[], nn.Module],
    train: Callable[[nn.Module], Tuple[nn.Module, Dict[str, Any]]],
    load: Callable[[str], nn.Module],
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Loads ``<cache_dir>/<name>-<key>`` if present, else builds, trains and saves it (atomically: temp dir + rename).

    `build()` makes the untrained model, `train(model)` trains it and returns ``(model, record)`` (a JSON-serialisable
    dict, e.g. from `train_denoiser`), `load(path)` reads a saved model; the model must have `save_pretrained`.
    Returns ``(model, record)``; the record is saved beside the weights. With `cache_dir=None` nothing is read or
    written.
    """
    if cache_dir is None:
        return train(build())
    path = os.path.join(cache_dir, f"{name}-{cache_key(settings)}")
    if os.path.isdir(path):
        with open(os.path.join(path, "training.json")) as handle:
            return load(path).eval(), json.load(handle)
    model, record = train(build())
    os.makedirs(cache_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir)
    try:
        model.save_pretrained(staging)
        with open(os.path.join(staging, "settings.json"), "w") as handle:
            json.dump(settings, handle, sort_keys=True, default=_jsonable, indent=1)
        with open(os.path.join(staging, "training.json"), "w") as handle:
            json.dump(record, handle, sort_keys=True, indent=1)
        os.replace(staging, path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not os.path.isdir(path):  # another process may have won the race; only then is the error harmless
            raise
    return model, record


@torch.no_grad()
def generate(
    model: nn.Module,
    noise_scheduler: DDPMScheduler,
    noise: torch.Tensor,
    num_inference_steps: int = 50,
    num_corrector_steps: int = 0,
    snr: float = DEFAULT_SNR,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Deterministic DDIM sampling (Diffusers' `DDIMScheduler`, eta = 0) from the given initial noise ``x_T``.

    With ``num_corrector_steps > 0``, Langevin corrector steps (`langevin_correct`, noise from `generator`) follow
    every DDIM step but the last, at the next timestep's noise level: the same sampler as a pipeline with
    `callback_on_step_end=LangevinCorrector(num_corrector_steps, snr)`.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(noise_scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    sample = noise * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    for i, timestep in enumerate(timesteps):
        noise_pred = model(sample, timestep, return_dict=False)[0]
        sample = scheduler.step(noise_pred, timestep, sample).prev_sample
        if num_corrector_steps > 0 and i + 1 < len(timesteps):
            sample = langevin_correct(model, sample, timesteps[i + 1], scheduler, num_corrector_steps, snr, generator)
    return sample
