"""Members with closed-form noise predictions, for fitting tests with a known answer.

For data ``N(mu, s^2 I)`` and ``x_t = alpha_t x0 + sigma_t eps`` the exact noise predictor is
``eps(x_t) = sigma_t (x_t - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2)``. With a common ``s`` the barycenter
``prod_i N(mu_i, s^2 I)^lambda_i`` is ``N(sum_i lambda_i mu_i, s^2 I)``, so the fit must recover ``lambda``.
"""

from types import SimpleNamespace
from typing import Sequence

import torch
from torch import nn

from diffusers_scorefusion import FusedUNet
from diffusers_scorefusion.testing.unet_parts import get_dummy_scheduler

SHAPE = (4, 8, 8)
STD = 0.5


class GaussianNoisePredictor(nn.Module):
    """The exact epsilon predictor of ``N(mean, std^2 I)`` under a DDPM noise schedule."""

    def __init__(self, mean: torch.Tensor, std: float, alphas_cumprod: torch.Tensor, cond_scale: float = 1.0):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64).clone())
        self.std, self.cond_scale = std, cond_scale
        self.config = SimpleNamespace(in_channels=mean.shape[0], out_channels=mean.shape[0], sample_size=mean.shape[-1])
        self.num_calls = 0

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs):
        self.num_calls += 1
        a = self.alphas_cumprod[torch.as_tensor(timestep).to(self.mean.device).long().flatten()]
        a = a.expand(sample.shape[0]).reshape(-1, 1, 1, 1)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        shift = 0.0  # conditional members: the mean moves by cond_scale x the mean of the conditioning, per sample
        if encoder_hidden_states is not None:
            shift = encoder_hidden_states.double().mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        added_cond_kwargs = kwargs.get("added_cond_kwargs")
        if added_cond_kwargs is not None:
            if added_cond_kwargs["time_ids"].shape != (1, 6):
                raise ValueError(
                    f"time_ids must be passed as is, got shape {tuple(added_cond_kwargs['time_ids'].shape)}"
                )
            shift = shift + added_cond_kwargs["text_embeds"].double().mean(dim=1).reshape(-1, 1, 1, 1)
        eps = (
            sigma
            * (sample.double() - alpha * (self.mean.double() + self.cond_scale * shift))
            / (a * self.std**2 + sigma**2)
        )
        return (eps.to(sample.dtype),)


def member_means(num_members: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn((num_members, *SHAPE), generator=generator)  # (k, C, H, W)


def gaussian_fusion(means: torch.Tensor, scheduler=None, cond_scales: Sequence[float] = None) -> FusedUNet:
    scheduler = scheduler or get_dummy_scheduler()
    cond_scales = cond_scales or [1.0] * len(means)
    return FusedUNet([GaussianNoisePredictor(m, STD, scheduler.alphas_cumprod, s) for m, s in zip(means, cond_scales)])


def barycenter_samples(means: torch.Tensor, weights: Sequence[float], num_samples: int, seed: int = 1) -> torch.Tensor:
    """Samples of ``N(sum_i weights_i mu_i, STD^2 I)``: ``(N, C, H, W)``."""
    generator = torch.Generator().manual_seed(seed)
    center = torch.einsum("k,kchw->chw", torch.tensor(weights, dtype=torch.float32), means)
    return center + STD * torch.randn((num_samples, *SHAPE), generator=generator)
