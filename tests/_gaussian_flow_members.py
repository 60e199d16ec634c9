"""Flow-matching members with closed-form velocities, for tests with a known answer.

For data ``N(mu, s^2 I)`` and ``x_t = (1 - t) x0 + t eps``: ``x_t ~ N((1 - t) mu, D I)`` with
``D = (1 - t)^2 s^2 + t^2``; the exact velocity is
``E[eps - x0 | x_t] = (t - (1 - t) s^2) (x_t - (1 - t) mu) / D - mu``.
It is affine in ``mu``, so with a common ``s`` the fused velocity of members ``mu_i`` is the velocity of
``N(sum_i lambda_i mu_i, s^2 I)``, the barycenter ``prod_i N(mu_i, s^2 I)^lambda_i``.
"""

from types import SimpleNamespace

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

SHAPE = (16, 4, 4)  # (C, H, W): an SD3-shaped latent
STD = 0.5


def gaussian_velocity(sample: torch.Tensor, sigma: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """The exact velocity of ``N(mean, std^2 I)`` at ``x_t`` = `sample` `(B, ...)`, ``t`` = `sigma` `(B,)`; float64."""
    t = sigma.to(torch.float64).reshape((-1,) + (1,) * (sample.ndim - 1))
    mean = mean.to(torch.float64)
    variance = (1 - t) ** 2 * std**2 + t**2
    return (t - (1 - t) * std**2) * (sample.to(torch.float64) - (1 - t) * mean) / variance - mean


def gaussian_score(sample: torch.Tensor, sigma: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """The exact score of the noised ``N(mean, std^2 I)``: ``-(x_t - (1 - t) mean) / D``; float64."""
    t = sigma.to(torch.float64).reshape((-1,) + (1,) * (sample.ndim - 1))
    variance = (1 - t) ** 2 * std**2 + t**2
    return -(sample.to(torch.float64) - (1 - t) * mean.to(torch.float64)) / variance


class GaussianVelocityTransformer(nn.Module):
    """A member with an SD3-style calling convention whose output is the exact velocity of ``N(mean, std^2 I)``.

    `timestep` is ``sigma * timestep_scale`` (1000 as SD3's pipeline passes it). `encoder_hidden_states`, when given,
    shifts the mean by its per-sample mean (a conditional member). The shapes of `pooled_projections` it receives are
    recorded (to check which inputs are indexed per batch).
    """

    def __init__(self, mean: torch.Tensor, std: float = STD, timestep_scale: float = 1000.0):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.std, self.timestep_scale = std, timestep_scale
        self.config = SimpleNamespace(in_channels=mean.shape[0], out_channels=mean.shape[0], sample_size=mean.shape[-1],
                                      patch_size=1)  # fmt: skip
        self.num_calls, self.pooled_shapes = 0, []

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                joint_attention_kwargs=None, return_dict=True):  # fmt: skip
        self.num_calls += 1
        if pooled_projections is not None:
            self.pooled_shapes.append(tuple(pooled_projections.shape))
        sigma = torch.as_tensor(timestep, dtype=torch.float64).flatten().expand(hidden_states.shape[0])
        mean = self.mean.to(torch.float64).expand(hidden_states.shape)
        if encoder_hidden_states is not None:
            mean = mean + encoder_hidden_states.double().mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        velocity = gaussian_velocity(hidden_states, sigma / self.timestep_scale, mean, self.std).to(hidden_states.dtype)
        return Transformer2DModelOutput(sample=velocity) if return_dict else (velocity,)


def member_means(num_members: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn((num_members, *SHAPE), generator=generator)  # (k, C, H, W)


def barycenter_samples(means: torch.Tensor, weights, num_samples: int, seed: int = 1) -> torch.Tensor:
    """Samples of ``N(sum_i weights_i mu_i, STD^2 I)``: `(N, C, H, W)`."""
    generator = torch.Generator().manual_seed(seed)
    center = torch.einsum("k,kchw->chw", torch.tensor(weights, dtype=torch.float32), means)
    return center + STD * torch.randn((num_samples, *SHAPE), generator=generator)


def gaussian_flow_fusion(means: torch.Tensor, weights=None, timestep_scale: float = 1000.0, shift: float = 3.0):
    """A `FusedTransformer` of exact Gaussian velocity members trained (nominally) with
    `FlowMatchEulerDiscreteScheduler(shift=shift)`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_scorefusion import FusedTransformer

    members = [GaussianVelocityTransformer(mean, timestep_scale=timestep_scale) for mean in means]
    schedulers = [FlowMatchEulerDiscreteScheduler(shift=shift)] * len(members)
    return FusedTransformer(members, weights=weights, member_schedulers=schedulers)
