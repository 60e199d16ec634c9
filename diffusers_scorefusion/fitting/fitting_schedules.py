"""The noising processes `fit_weights` draws from: a DDPM noise schedule (`FusedUNet`) or a rectified flow
(`FusedTransformer`).

Each process draws timesteps in the units the members take, noises target samples, and gives the regression target
and the loss weight of each noised sample. The maths lives in `fusion/fusion_utils.py` and
`fusion/flow_matching_utils.py`.
"""

import numbers
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from ..fusion.flow_matching_utils import (
    TIMESTEP_DENSITIES,
    flow_matching_noisy_sample,
    flow_matching_target,
    sample_sigmas,
)
from ..fusion.fusion_utils import alpha_sigma, denoising_target, loss_weighting
from ..fusion.member_utils import flow_schedule_of, is_flow_matching, scheduler_class_and_config
from ..models.modeling_fused_transformer import FusedTransformer, check_scheduler_matches_transformer
from ..models.modeling_fused_unet import FusedUNet, check_scheduler_matches
from .fitting_utils import SMALL_T_MAX_SIGMA, TIMESTEP_RANGES, resolve_timestep_range


class DiffusionProcess:
    """``x_t = alpha_t x0 + sigma_t eps`` on a DDPM schedule, integer timesteps drawn uniformly from a range; the
    target follows the members' `prediction_type`, weighted by w(t)."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str, timestep_range: Any, weighting: str,
                 snr_gamma: float):  # fmt: skip
        self.alphas_cumprod, self.prediction_type = alphas_cumprod, prediction_type
        self.weighting, self.snr_gamma = weighting, snr_gamma
        self.bounds = resolve_timestep_range(timestep_range, alphas_cumprod)

    def bin_edges(self, num_bins: int) -> torch.Tensor:
        t_min, t_max = self.bounds
        if num_bins > t_max - t_min + 1:
            raise ValueError(
                f"num_timestep_bins={num_bins} exceeds the {t_max - t_min + 1} timesteps in [{t_min}, {t_max}]"
            )
        return torch.linspace(t_min, t_max + 1, num_bins + 1, dtype=torch.float64)

    def draw(self, num_draws: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(self.bounds[0], self.bounds[1] + 1, (num_draws,), generator=generator)

    def model_timesteps(self, timesteps: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return timesteps.to(sample.device)

    def noisy_sample(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        alpha_t, sigma_t = alpha_sigma(self.alphas_cumprod, timesteps)  # (B,)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        alpha, sigma = alpha_t.to(x0.device).reshape(shape), sigma_t.to(x0.device).reshape(shape)
        return (alpha * x0.to(torch.float64) + sigma * noise.to(torch.float64)).to(x0.dtype)  # x_t

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        alpha_t, sigma_t = alpha_sigma(self.alphas_cumprod, timesteps)
        return denoising_target(x0, noise, alpha_t, sigma_t, self.prediction_type)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        return loss_weighting(timesteps, self.alphas_cumprod, self.weighting, self.snr_gamma)  # w(t), (B,)

    def record(self) -> Dict[str, Any]:
        return {"timestep_range": list(self.bounds)}


class FlowMatchingProcess:
    """``x_t = (1 - t) x0 + t eps`` with ``t`` drawn as Diffusers' training scripts draw it (`density`, then the
    scheduler's training `shift`); the members get ``timestep = t * timestep_scale``; the target is ``eps - x0``,
    every timestep weighted 1."""

    def __init__(self, shift: float, timestep_range: Any, density: str, timestep_scale: float):
        if density not in TIMESTEP_DENSITIES:
            raise ValueError(f"timestep_density must be one of {TIMESTEP_DENSITIES}, got {density!r}")
        if isinstance(timestep_scale, bool) or not isinstance(timestep_scale, numbers.Real) or not timestep_scale > 0:
            raise ValueError(f"timestep_scale must be a positive number, got {timestep_scale!r}")
        self.shift, self.density, self.scale = shift, density, float(timestep_scale)
        self.sigma_range = self._sigma_range(timestep_range)

    def _sigma_range(self, timestep_range: Union[str, Sequence[float]]) -> Tuple[float, float]:
        """`"full"`: t in [0, 1]; `"small_t"`: t <= 0.1; `(low, high)`: timesteps in the members' units."""
        if isinstance(timestep_range, str):
            if timestep_range not in TIMESTEP_RANGES:
                raise ValueError(
                    f"timestep_range must be one of {TIMESTEP_RANGES} or (low, high), got {timestep_range!r}"
                )
            return (0.0, 1.0) if timestep_range == "full" else (0.0, SMALL_T_MAX_SIGMA)
        bounds = list(timestep_range) if isinstance(timestep_range, (list, tuple)) else []
        if len(bounds) != 2 or not all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in bounds):
            raise TypeError(
                f"timestep_range must be {TIMESTEP_RANGES} or two numbers (low, high), got {timestep_range!r}"
            )
        if not 0 <= bounds[0] < bounds[1] <= self.scale:
            raise ValueError(
                f"timestep_range must satisfy 0 <= low < high <= {self.scale:g} (timesteps as the members take them: "
                f"sigma * timestep_scale), got {timestep_range!r}"
            )
        return bounds[0] / self.scale, bounds[1] / self.scale

    def bin_edges(self, num_bins: int) -> torch.Tensor:
        low, high = self.sigma_range
        return torch.linspace(low * self.scale, high * self.scale, num_bins + 1, dtype=torch.float64)

    def draw(self, num_draws: int, generator: torch.Generator) -> torch.Tensor:
        sigmas = sample_sigmas(num_draws, self.density, self.shift, self.sigma_range, generator)  # t, (D,)
        return sigmas * self.scale  # the members' timesteps, float64

    def model_timesteps(self, timesteps: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return timesteps.to(device=sample.device, dtype=torch.float32)  # as the schedulers' timesteps

    def noisy_sample(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return flow_matching_noisy_sample(x0, noise, timesteps.to(torch.float64) / self.scale)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return flow_matching_target(x0, noise)  # eps - x0

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        return torch.ones(timesteps.shape[0], dtype=torch.float64)

    def record(self) -> Dict[str, Any]:
        low, high = self.sigma_range
        return {"objective": "flow_matching", "timestep_range": [low * self.scale, high * self.scale],
                "timestep_density": self.density, "shift": self.shift, "timestep_scale": self.scale}  # fmt: skip


def check_flow_scheduler(fused: FusedTransformer, noise_scheduler: Any) -> Dict[str, Any]:
    """The flow schedule to fit with: `noise_scheduler`'s, refused if it is not flow-matching or differs from the
    members' (their `num_train_timesteps` and training shift)."""
    if noise_scheduler is None or not is_flow_matching(noise_scheduler):
        name = "None" if noise_scheduler is None else scheduler_class_and_config(noise_scheduler)[0]
        raise TypeError(
            f"fitting a FusedTransformer needs the members' flow-matching training scheduler (e.g. "
            f"FlowMatchEulerDiscreteScheduler), got {name}"
        )
    check_scheduler_matches_transformer(fused, noise_scheduler)
    schedule = flow_schedule_of(noise_scheduler)
    members = fused.config.noise_schedule
    if members is not None and schedule["shift"] != members["shift"]:
        raise ValueError(
            f"the scheduler's training shift is {schedule['shift']} but the members were trained with shift "
            f"{members['shift']}: timesteps would be drawn from another density; use "
            f"`FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift={members['shift']})`"
        )
    return schedule


def noising_process(
    fused: Any,
    noise_scheduler: Any,
    timestep_range: Any,
    weighting: str,
    snr_gamma: float,
    timestep_density: Optional[str],
    timestep_scale: Optional[float],
) -> Union[DiffusionProcess, FlowMatchingProcess]:
    """The process to fit `fused` with, after checking `noise_scheduler` against it."""
    if isinstance(fused, FusedTransformer):
        schedule = check_flow_scheduler(fused, noise_scheduler)
        if weighting != "uniform":
            raise ValueError(
                f"weighting={weighting!r} applies to diffusion (UNet) fits; flow-matching fits weight every timestep "
                "equally, as the training scripts' default: choose where timesteps fall with timestep_density"
            )
        scale = schedule["num_train_timesteps"] if timestep_scale is None else timestep_scale
        return FlowMatchingProcess(schedule["shift"], timestep_range, timestep_density or "uniform", scale)
    if not isinstance(fused, FusedUNet):
        raise TypeError(f"fused must be a FusedUNet or a FusedTransformer, got {type(fused).__name__}")
    if timestep_density is not None or timestep_scale is not None:
        raise ValueError("timestep_density and timestep_scale apply to flow-matching (FusedTransformer) fits only")
    alphas_cumprod = getattr(noise_scheduler, "alphas_cumprod", None)
    if not isinstance(alphas_cumprod, torch.Tensor) or not hasattr(noise_scheduler, "config"):
        raise TypeError(
            "noise_scheduler must be a Diffusers scheduler with alphas_cumprod (a DDPM-family scheduler), got "
            f"{type(noise_scheduler).__name__} {noise_scheduler!r:.80}"
        )
    if alphas_cumprod.numel() == 0 or not (torch.isfinite(alphas_cumprod).all() and (alphas_cumprod >= 0).all()
                                            and (alphas_cumprod <= 1).all()):  # fmt: skip
        raise ValueError(
            f"noise_scheduler.alphas_cumprod must be finite numbers in [0, 1], got {alphas_cumprod[:5]}..."
        )
    check_scheduler_matches(fused, noise_scheduler)
    return DiffusionProcess(alphas_cumprod, fused.config.prediction_type, timestep_range, weighting, snr_gamma)
