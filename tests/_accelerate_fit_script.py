"""Fits weights on a fixed conditional Gaussian problem and writes each process's result to `<out_dir>/rank<i>.json`.

Then fits again with a member that returns NaN on process 1 only, and records each process's error; and fits
flow-matching members (`run_flow`) the same way.

Run by tests/test_fitting_accelerate.py with `accelerate launch --num_processes 2 --cpu` (and imported for the
one-process reference). An odd number of samples makes the two shards unequal.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _gaussian_flow_members as flow  # noqa: E402
from _gaussian_members import barycenter_samples, gaussian_fusion, member_means  # noqa: E402

from diffusers_scorefusion import fit_weights  # noqa: E402
from diffusers_scorefusion.testing.unet_parts import get_dummy_scheduler  # noqa: E402

NUM_SAMPLES = 13


class NaNOnThisProcess(torch.nn.Module):
    """Wraps a member so that it returns NaN (on the process that builds it)."""

    def __init__(self, member):
        super().__init__()
        self.member, self.config, self.num_calls = member, member.config, 0

    def forward(self, sample, timestep, **kwargs):
        self.num_calls += 1
        return (torch.full_like(self.member(sample, timestep, **kwargs)[0], float("nan")),)


def run(accelerator=None, broken_member: bool = False) -> dict:
    """The fit on this process; returns what is compared across runs (JSON-ready)."""
    scheduler = get_dummy_scheduler()
    means = member_means(3)
    prompt_embeds = torch.randn(NUM_SAMPLES, 5, 8, generator=torch.Generator().manual_seed(7))
    latents = barycenter_samples(means, [0.2, 0.5, 0.3], NUM_SAMPLES) + prompt_embeds.mean(dim=(1, 2)).reshape(
        -1, 1, 1, 1
    )
    fused = gaussian_fusion(means, scheduler)
    if broken_member:
        fused.unets[1] = NaNOnThisProcess(fused.unets[1])
    result = fit_weights(
        fused,
        scheduler,
        latents,
        encoder_hidden_states=prompt_embeds,
        num_noise_draws=3,
        batch_size=4,
        num_timestep_bins=2,
        num_bootstrap=50,
        generator=torch.Generator().manual_seed(0),
        accelerator=accelerator,
        progress_bar=False,
    )
    return dict(
        weights=result.weights.tolist(),
        standard_errors=result.standard_errors.tolist(),
        loss=result.loss,
        per_model_loss=result.per_model_loss.tolist(),
        gram=result.gram.tolist(),
        linear=result.linear.tolist(),
        constant=result.constant.tolist(),
        num_forward_passes=result.num_forward_passes,
        fused_weights=fused.fusion_weights.tolist(),
        member_calls=sum(member.num_calls for member in fused.unets),
        provenance=result.provenance,
    )


def run_flow(accelerator=None) -> dict:
    """A flow-matching fit (exact Gaussian velocity members, logit-normal timesteps) on this process."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    means = flow.member_means(3)
    fused = flow.gaussian_flow_fusion(means)
    result = fit_weights(
        fused, FlowMatchEulerDiscreteScheduler(shift=3.0), flow.barycenter_samples(means, [0.2, 0.5, 0.3], NUM_SAMPLES),
        num_noise_draws=3, batch_size=4, num_timestep_bins=2, num_bootstrap=50, timestep_density="logit_normal",
        generator=torch.Generator().manual_seed(0), accelerator=accelerator, progress_bar=False,
    )  # fmt: skip
    return dict(weights=result.weights.tolist(), standard_errors=result.standard_errors.tolist(),
                gram=result.gram.tolist(), num_forward_passes=result.num_forward_passes,
                provenance=result.provenance)  # fmt: skip


def run_auto(accelerator=None) -> dict:
    """`num_timestep_bins="auto"` on members whose best weights change with the noise level, on this process."""
    from _noise_dependent_members import members, noise_dependent_problem, target_samples

    scheduler = get_dummy_scheduler()
    means, stds, std = noise_dependent_problem(scheduler)
    result = fit_weights(
        members(means, stds, scheduler), scheduler, target_samples(means, means[0], std, NUM_SAMPLES),
        num_noise_draws=16, batch_size=16, num_timestep_bins="auto", num_bootstrap=20,
        generator=torch.Generator().manual_seed(0), accelerator=accelerator, progress_bar=False,
    )  # fmt: skip
    return dict(weights=result.weights.tolist(), selection=result.timestep_bin_selection,
                edges=result.timestep_bin_edges, num_forward_passes=result.num_forward_passes)  # fmt: skip


if __name__ == "__main__":
    from accelerate import PartialState

    state = PartialState(cpu=True)  # torchrun on CPU: gloo
    output = run(state)
    output["flow"] = run_flow(state)
    output["auto"] = run_auto(state)
    try:  # a member fails on process 1 only: every process must raise, none may hang
        run(state, broken_member=state.process_index == 1)
        output["failure"] = None
    except ValueError as error:
        output["failure"] = str(error)
    path = os.path.join(sys.argv[1], f"rank{state.process_index}.json")
    with open(path + ".tmp", "w") as file:
        json.dump(dict(output, num_processes=state.num_processes), file)
    os.replace(path + ".tmp", path)
