"""`fit_weights(target="merge")`: weights for the weight-space merge, refined from the exact QP solution."""

import copy

import pytest
import torch
from _gaussian_members import SHAPE, GaussianNoisePredictor, barycenter_samples, gaussian_fusion, member_means
from torch import nn

from diffusers_scorefusion import FusedUNet
from diffusers_scorefusion.fitting import fit_weights
from diffusers_scorefusion.fitting.merge_fitting import MergedPredictor, minimise_merge_loss, project_to_simplex
from diffusers_scorefusion.testing.unet_parts import get_dummy_scheduler, get_dummy_unet


class GaussianStdMember(GaussianNoisePredictor):
    """The exact predictor of ``N(mean, std^2 I)`` with `std` a parameter: the merge ``sum_i lambda_i std_i`` enters the
    prediction non-linearly, and the merged model is exact for data of std ``s*`` iff ``sum_i lambda_i std_i = s*``."""

    def __init__(self, mean, std, alphas_cumprod):
        super().__init__(mean, std, alphas_cumprod)
        self.std = nn.Parameter(torch.tensor(float(std)))


def std_fusion(stds, scheduler):
    mean = torch.zeros(SHAPE)
    return FusedUNet([GaussianStdMember(mean, s, scheduler.alphas_cumprod) for s in stds])


def test_project_to_simplex():
    assert torch.equal(project_to_simplex(torch.tensor([0.2, 0.8], dtype=torch.float64)),
                       torch.tensor([0.2, 0.8], dtype=torch.float64))  # fmt: skip
    assert torch.allclose(project_to_simplex(torch.tensor([2.0, 0.0, -1.0])), torch.tensor([1.0, 0.0, 0.0]))
    projected = project_to_simplex(torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(projected, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_merge_refit_finds_the_known_optimum_of_a_nonlinear_merge():
    scheduler = get_dummy_scheduler()
    stds, data_std = (0.3, 0.9), 0.5
    fused = std_fusion(stds, scheduler)
    latents = data_std * torch.randn((128, *SHAPE), generator=torch.Generator().manual_seed(3))
    result = fit_weights(fused, scheduler, latents, num_noise_draws=4, batch_size=256, timestep_range=(0, 400),
                         target="merge", generator=torch.Generator().manual_seed(0), num_bootstrap=0,
                         progress_bar=False)  # fmt: skip
    known = (stds[1] - data_std) / (stds[1] - stds[0])  # lambda_1 with lambda . stds = data_std
    refit = result.provenance["merge_refit"]
    assert abs(result.weights[0].item() - known) < 0.01, (result.weights, known)
    assert abs(refit["start_weights"][0] - known) > 0.05  # the QP's fusion weights are not the merge's
    history = refit["loss_history"]
    assert all(later < earlier for earlier, later in zip(history, history[1:]))
    assert result.loss == history[-1] < refit["start_loss"]
    num_batches = 128 * 4 // 256  # forwards and backwards count batches of the merged model
    assert refit["num_merged_backward_passes"] == num_batches * len(history)
    assert refit["num_merged_forward_passes"] >= 2 * num_batches * (len(history) - 1)
    assert fused.config.weights_provenance["target"] == "merge"
    assert torch.allclose(fused.fusion_weights, result.weights)


def test_merge_of_members_linear_in_their_parameters_keeps_the_qp_weights():
    # Members that differ only in their mean predict linearly in it: the merge is the fusion, the QP its optimum.
    means = member_means(3)
    fused = gaussian_fusion(means)
    latents = barycenter_samples(means, [0.5, 0.3, 0.2], 32)
    result = fit_weights(fused, get_dummy_scheduler(), latents, num_noise_draws=4, target="merge", num_bootstrap=0,
                         generator=torch.Generator().manual_seed(0), progress_bar=False)  # fmt: skip
    refit = result.provenance["merge_refit"]
    assert refit["start_loss"] == pytest.approx(refit["fusion_loss_at_start"], rel=1e-5)
    assert torch.allclose(result.weights, torch.tensor(refit["start_weights"], dtype=torch.float64), atol=1e-3)
    assert result.loss <= refit["start_loss"]


def test_merge_loss_never_increases_for_unet_fine_tunes():
    unets = [get_dummy_unet(0), get_dummy_unet(1)]
    fused = FusedUNet(unets)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((3, 4, 16, 16), generator=generator)
    hidden = torch.randn((3, 5, 32), generator=generator)
    result = fit_weights(fused, get_dummy_scheduler(), latents, hidden, num_noise_draws=2, target="merge",
                         merge_max_iterations=3, num_bootstrap=0, generator=generator, progress_bar=False)  # fmt: skip
    refit = result.provenance["merge_refit"]
    history = refit["loss_history"]
    assert all(later < earlier for earlier, later in zip(history, history[1:]))
    assert result.loss <= refit["start_loss"] and refit["iterations"] <= 3
    assert torch.isclose(result.weights.sum(), torch.tensor(1.0, dtype=torch.float64)) and (result.weights >= 0).all()


def test_merged_predictor_matches_the_merged_checkpoint():
    unets = [get_dummy_unet(0), get_dummy_unet(1), get_dummy_unet(2)]
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    merged = copy.deepcopy(unets[0])
    states = [unet.state_dict() for unet in unets]
    merged.load_state_dict({name: sum(w.item() * s[name] for w, s in zip(weights, states)) for name in states[0]})
    generator = torch.Generator().manual_seed(0)
    sample, hidden = torch.randn((2, 4, 16, 16), generator=generator), torch.randn((2, 5, 32), generator=generator)
    timestep = torch.tensor([10, 700])
    predicted = MergedPredictor(FusedUNet(unets))(weights, sample, timestep, encoder_hidden_states=hidden)
    expected = merged(sample, torch.tensor([10, 700]), encoder_hidden_states=hidden).sample
    assert torch.allclose(predicted, expected, atol=1e-5)


def test_merged_predictor_of_a_lora_fusion_is_set_adapters_with_the_weights():
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = get_dummy_unet(0)
    loras = []
    for seed, alpha in ((10, 8), (11, 4)):
        torch.manual_seed(seed)
        adapted = copy.deepcopy(base)
        adapted.add_adapter(LoraConfig(r=4, lora_alpha=alpha, target_modules=["to_q", "to_v", "proj_in"],
                                       init_lora_weights=False))  # fmt: skip
        loras.append({f"unet.{k}": v for k, v in get_peft_model_state_dict(adapted).items()})
    fused = FusedUNet.from_lora(base, loras)
    weights = torch.tensor([0.7, 0.3], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    sample, hidden = torch.randn((2, 4, 16, 16), generator=generator), torch.randn((2, 5, 32), generator=generator)
    predicted = MergedPredictor(fused)(weights, sample, torch.tensor(400), encoder_hidden_states=hidden)
    assert base.active_adapters() == ["member_1"] or base.active_adapters() == ["member_0"]
    base.set_adapters(["member_0", "member_1"], weights.tolist())
    expected = base(sample, torch.tensor(400), encoder_hidden_states=hidden).sample
    base.set_adapters(["member_0", "member_1"], [1.0, 1.0])
    assert torch.allclose(predicted, expected, atol=1e-5)
    assert not torch.allclose(predicted, fused(sample, torch.tensor(400), encoder_hidden_states=hidden).sample,
                              atol=1e-5)  # a merge, not the fusion  # fmt: skip
    base.set_adapter("member_1")
    latents, hidden = torch.randn((2, 4, 16, 16), generator=generator), torch.randn((2, 5, 32), generator=generator)
    result = fit_weights(fused, get_dummy_scheduler(), latents, hidden, num_noise_draws=2, target="merge",
                         merge_max_iterations=2, num_bootstrap=0, generator=generator, progress_bar=False)  # fmt: skip
    refit = result.provenance["merge_refit"]
    assert refit["merge_kind"] == "lora" and result.loss <= refit["start_loss"]
    assert base.active_adapters() == ["member_1"]  # the merged forwards leave the base's adapters as they were


def test_merge_refit_of_flow_matching_members_linear_in_their_parameters():
    from _gaussian_flow_members import barycenter_samples as flow_samples
    from _gaussian_flow_members import gaussian_flow_fusion
    from _gaussian_flow_members import member_means as flow_means
    from diffusers import FlowMatchEulerDiscreteScheduler

    means = flow_means(3)
    fused = gaussian_flow_fusion(means)
    result = fit_weights(fused, FlowMatchEulerDiscreteScheduler(shift=3.0), flow_samples(means, [0.5, 0.3, 0.2], 16),
                         num_noise_draws=4, target="merge", num_bootstrap=0, progress_bar=False,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    refit = result.provenance["merge_refit"]
    assert refit["start_loss"] == pytest.approx(refit["fusion_loss_at_start"], rel=1e-5)
    assert torch.allclose(result.weights, torch.tensor(refit["start_weights"], dtype=torch.float64), atol=1e-3)


def test_minimise_merge_loss_stops_where_no_step_helps():
    target = torch.tensor([0.25, 0.75], dtype=torch.float64)

    def objective(weights, with_gradient):
        return float(((weights - target) ** 2).sum()), 2 * (weights - target) if with_gradient else None

    weights, history = minimise_merge_loss(objective, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(weights, target, atol=1e-3) and history[-1] < history[0]
    weights, history = minimise_merge_loss(objective, target.clone())
    assert torch.equal(weights, target) and history == [0.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target="merged"), "target must be one of"),
        (dict(target="merge", method="sgd"), "starts from the exact QP solution"),
        (dict(target="merge", num_timestep_bins=2), "one weight vector"),
        (dict(target="merge", merge_max_iterations=-1), "merge_max_iterations must be"),
    ],
)
def test_merge_target_bad_inputs(kwargs, message):
    fused = gaussian_fusion(member_means(2))
    with pytest.raises(ValueError, match=message):
        fit_weights(fused, get_dummy_scheduler(), torch.zeros((2, *SHAPE)), progress_bar=False, **kwargs)


def test_merge_target_refuses_members_of_different_architectures():
    fused = FusedUNet([get_dummy_unet(0), get_dummy_unet(0, layers_per_block=2)])
    with pytest.raises(ValueError, match="different architectures: parameter"):
        fit_weights(fused, get_dummy_scheduler(), torch.zeros((2, 4, 16, 16)), torch.zeros((2, 5, 32)),
                    target="merge", progress_bar=False)  # fmt: skip


def test_merge_target_refuses_nested_fusions():
    fused = FusedUNet([FusedUNet([get_dummy_unet(0), get_dummy_unet(1)]), get_dummy_unet(2)])
    with pytest.raises(ValueError, match=r"members \[0\] are fusions themselves"):
        MergedPredictor(fused)
