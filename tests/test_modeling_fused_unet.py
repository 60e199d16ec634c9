"""`FusedUNet`: the fused prediction, weights, prediction-type conversion, validation and drop-in helpers."""

import copy
import types

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, SlicedAttnProcessor
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from diffusers_scorefusion import FusedUNet
from diffusers_scorefusion.fusion.modeling_fusion import MemberHelperMissing
from diffusers_scorefusion.testing.unet_parts import get_dummy_scheduler, get_dummy_unet, get_dummy_xl_unet

BATCH = 2


@pytest.fixture(scope="module")
def members():
    return [get_dummy_unet(seed) for seed in range(3)]


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(BATCH, 4, 16, 16, generator=generator)  # (B, C, H, W)
    encoder_hidden_states = torch.randn(BATCH, 7, 32, generator=generator)  # (B, L, D)
    return sample, torch.tensor(500), encoder_hidden_states


def _run(unet, sample, timestep, encoder_hidden_states, **kwargs):
    with torch.no_grad():
        return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **kwargs)[0]


def _count_calls(module):
    """Counts forward calls of `module` with a pre-hook; returns the counter list and the hook handle."""
    calls = []
    return calls, module.register_forward_pre_hook(lambda *_: calls.append(1))


# ------------------------------------------------------------------------------------------------ the fused output
@pytest.mark.parametrize("index", [0, 1, 2])
def test_one_hot_weights_reproduce_the_member_exactly(members, inputs, index):
    weights = [0.0, 0.0, 0.0]
    weights[index] = 1.0
    fused = FusedUNet(members, weights=weights)
    expected = _run(members[index], *inputs)
    assert torch.equal(_run(fused, *inputs), expected)
    with torch.no_grad():
        output = fused(*inputs)  # return_dict=True by default
    assert type(output) is UNet2DConditionOutput
    assert torch.equal(output.sample, expected)


def test_return_dict_false_gives_a_one_tuple(members, inputs):
    with torch.no_grad():
        output = FusedUNet(members[:2])(inputs[0], inputs[1], encoder_hidden_states=inputs[2], return_dict=False)
    assert isinstance(output, tuple) and len(output) == 1 and output[0].shape == (BATCH, 4, 16, 16)


def test_mixed_weights_equal_the_manual_weighted_sum(members, inputs):
    weights = [0.2, 0.5, 0.3]
    fused = _run(FusedUNet(members, weights=weights), *inputs)
    outputs = [_run(member, *inputs).double() for member in members]
    expected = sum(w * out for w, out in zip(weights, outputs))
    assert not torch.allclose(outputs[0], outputs[1])  # the members differ, so the weights matter
    # float32 accumulation of three products vs. a float64 reference: a few ulps of |output| ~ 1
    torch.testing.assert_close(fused.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identical_members_reproduce_the_member_for_any_weights(members, inputs, seed):
    weights = torch.distributions.Dirichlet(torch.ones(3)).sample() if seed else torch.tensor([0.1, 0.7, 0.2])
    weights = (weights.double() / weights.double().sum()).tolist()
    clones = [copy.deepcopy(members[0]) for _ in range(3)]
    fused = _run(FusedUNet(clones, weights=weights), *inputs)
    # sum_i lambda_i x in float32 equals x up to rounding (the lambdas are not dyadic)
    torch.testing.assert_close(fused, _run(members[0], *inputs), rtol=1e-6, atol=1e-6)


def test_zero_weight_members_are_never_called(members, inputs):
    fused = FusedUNet(members, weights=[0.0, 1.0, 0.0])
    counters = [_count_calls(member) for member in members]
    try:
        _run(fused, *inputs)
        _run(fused, *inputs)
        assert [len(calls) for calls, _ in counters] == [0, 2, 0]
        fused.set_weights([0.5, 0.0, 0.5])
        _run(fused, *inputs)
        assert [len(calls) for calls, _ in counters] == [1, 2, 1]
    finally:
        for _, handle in counters:
            handle.remove()


def test_zero_weight_skip_with_timestep_bins(members, inputs):
    sample, _, encoder_hidden_states = inputs
    fused = FusedUNet(members, weights=[[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]], timestep_bin_edges=[0, 500, 1000])
    counters = [_count_calls(member) for member in members]
    try:
        _run(fused, sample, torch.tensor(100), encoder_hidden_states)
        assert [len(calls) for calls, _ in counters] == [1, 0, 0]
        _run(fused, sample, torch.tensor(800), encoder_hidden_states)
        assert [len(calls) for calls, _ in counters] == [1, 1, 1]
        _run(fused, sample, torch.tensor([100, 100]), encoder_hidden_states)  # per-sample, both in bin 0
        assert [len(calls) for calls, _ in counters] == [2, 1, 1]
    finally:
        for _, handle in counters:
            handle.remove()


# ------------------------------------------------------------------------------------------------ timestep bins
def test_timestep_bins_select_the_row_for_scalar_timesteps(members, inputs):
    sample, _, encoder_hidden_states = inputs
    fused = FusedUNet(members, weights=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                      timestep_bin_edges=[0, 300, 700, 1000])  # fmt: skip
    cases = [(0, 0), (torch.tensor(299), 0), (torch.tensor(300.0), 1), (699, 1), (torch.tensor(700), 2), (999.0, 2)]
    for timestep, index in cases:
        expected = _run(members[index], sample, timestep, encoder_hidden_states)
        assert torch.equal(_run(fused, sample, timestep, encoder_hidden_states), expected), (timestep, index)


def test_timestep_bins_select_the_row_per_sample(members, inputs):
    sample, _, encoder_hidden_states = inputs
    fused = FusedUNet(members, weights=[[1.0, 0.0, 0.0], [0.0, 0.25, 0.75]], timestep_bin_edges=[0, 500, 1000])
    timesteps = torch.tensor([100, 900])
    fused_out = _run(fused, sample, timesteps, encoder_hidden_states)
    outputs = [_run(member, sample, timesteps, encoder_hidden_states) for member in members]
    assert torch.equal(fused_out[0], outputs[0][0])
    torch.testing.assert_close(fused_out[1], 0.25 * outputs[1][1] + 0.75 * outputs[2][1], rtol=0, atol=1e-6)
    assert not torch.allclose(fused_out[1], outputs[0][1])
    with pytest.raises(ValueError, match=r"scalar or have 2 entries, got shape \(3,\)"):
        _run(fused, sample, torch.tensor([100, 900, 900]), encoder_hidden_states)


def test_fusion_weights_property_and_override(members, inputs):
    fused = FusedUNet(members, weights=[0.2, 0.5, 0.3])
    assert fused.fusion_weights.tolist() == [0.2, 0.5, 0.3]
    assert fused.config.weights == [0.2, 0.5, 0.3]
    with fused.override_weights([0.0, 0.0, 1.0]):
        assert fused.fusion_weights.tolist() == [0.0, 0.0, 1.0]
        assert torch.equal(_run(fused, *inputs), _run(members[2], *inputs))
    assert fused.fusion_weights.tolist() == [0.2, 0.5, 0.3]
    assert FusedUNet(members).fusion_weights.tolist() == pytest.approx([1 / 3] * 3, abs=1e-15)


def test_override_weights_on_a_binned_fusion(members, inputs):
    sample, _, encoder_hidden_states = inputs
    fused = FusedUNet(members[:2], weights=[[1.0, 0.0], [0.0, 1.0]], timestep_bin_edges=[0, 500, 1000])
    with fused.override_weights([0.0, 1.0]):  # one row for every bin
        assert fused.fusion_weights.tolist() == [[0.0, 1.0], [0.0, 1.0]]
        expected = _run(members[1], sample, 100, encoder_hidden_states)
        assert torch.equal(_run(fused, sample, 100, encoder_hidden_states), expected)
    assert fused.fusion_weights.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match=r"fusion_weights must have shape \(k,\) or \(2, k\), got \(3, 2\)"):
        with fused.override_weights([[1.0, 0.0]] * 3):
            pass


# ------------------------------------------------------------------------------------------------ prediction types
def _to_epsilon(output, x_t, a, prediction_type):
    """The closed forms: eps = sqrt(a) v + sqrt(1 - a) x_t ;  eps = (x_t - sqrt(a) x0) / sqrt(1 - a)."""
    output, x_t = output.double(), x_t.double()
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * x_t
    return (x_t - a.sqrt() * output) / (1 - a).sqrt()


def _from_epsilon(eps, x_t, a, prediction_type):
    x_t = x_t.double()
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    return {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]


@pytest.mark.parametrize("output_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("timestep", [torch.tensor(500), torch.tensor([40, 950])], ids=["scalar", "per-sample"])
def test_mixed_prediction_types_are_converted_exactly(members, inputs, output_type, timestep):
    sample, _, encoder_hidden_states = inputs
    member_types = ["epsilon", "v_prediction", "sample"]
    schedulers = [get_dummy_scheduler(prediction_type=kind) for kind in member_types]
    weights = [0.2, 0.3, 0.5]
    fused = FusedUNet(members, weights=weights, prediction_type=output_type, member_schedulers=schedulers)
    assert fused.config.member_prediction_types == member_types
    a = schedulers[0].alphas_cumprod.double()[timestep].reshape(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
    raw = [_run(m, sample, timestep, encoder_hidden_states).double() for m in members]
    eps = [_to_epsilon(output, sample, a, kind) for output, kind in zip(raw, member_types)]
    expected = _from_epsilon(sum(w * e for w, e in zip(weights, eps)), sample, a, output_type)
    fused_out = _run(fused, sample, timestep, encoder_hidden_states)
    assert fused_out.dtype == torch.float32
    # float64 reference vs float32 output; x0 = (x_t - sigma eps) / alpha magnifies rounding by 1/alpha (<= 6.4 here)
    torch.testing.assert_close(fused_out.double(), expected, rtol=1e-6, atol=5e-6)
    # the conversion matters: the raw weighted sum is far off
    unconverted = _from_epsilon(sum(w * out for w, out in zip(weights, raw)), sample, a, output_type)
    assert (unconverted - expected).abs().max() > 0.1


@pytest.mark.parametrize("member_type", ["v_prediction", "sample"])
def test_one_hot_converted_member_matches_the_closed_form(members, inputs, member_type):
    sample, timestep, _ = inputs
    schedulers = [get_dummy_scheduler(), get_dummy_scheduler(prediction_type=member_type)]
    fused = FusedUNet(members[:2], weights=[0.0, 1.0], prediction_type="epsilon", member_schedulers=schedulers)
    raw = _run(members[1], *inputs)
    a = schedulers[1].alphas_cumprod.double()[timestep]
    expected = _to_epsilon(raw, sample, a, member_type).float()
    torch.testing.assert_close(_run(fused, *inputs), expected, rtol=1e-6, atol=1e-6)


def test_zero_terminal_snr_v_member_is_converted_at_the_last_timestep(members, inputs):
    sample, _, encoder_hidden_states = inputs
    scheduler = get_dummy_scheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    assert scheduler.alphas_cumprod[999] == 0
    fused = FusedUNet(members[:1], prediction_type="epsilon", member_schedulers=[scheduler])
    for timestep in (999, 998):
        a = scheduler.alphas_cumprod.double()[timestep]
        expected = _to_epsilon(_run(members[0], sample, timestep, encoder_hidden_states), sample, a, "v_prediction")
        torch.testing.assert_close(_run(fused, sample, timestep, encoder_hidden_states).double(), expected,
                                   rtol=1e-6, atol=1e-6)  # fmt: skip


def test_member_prediction_types_given_explicitly(members, inputs):
    schedulers = [get_dummy_scheduler(), get_dummy_scheduler()]  # epsilon by default; the explicit list must agree
    with pytest.raises(
        ValueError,
        match=r"member 1's scheduler says prediction_type='epsilon' but member_prediction_types\[1\]='v_prediction'",
    ):
        FusedUNet(members[:2], member_prediction_types=["epsilon", "v_prediction"], member_schedulers=schedulers)
    fused = FusedUNet(members[:2], member_prediction_types=["v_prediction", "v_prediction"])
    assert fused.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match=r"members predict \['epsilon', 'v_prediction'\] .*member_schedulers="):
        FusedUNet(members[:2], member_prediction_types=["epsilon", "v_prediction"], prediction_type="epsilon")
    with pytest.raises(ValueError, match=r"members predict \['epsilon', 'sample'\]: pass prediction_type="):
        FusedUNet(members[:2], member_schedulers=[get_dummy_scheduler(), get_dummy_scheduler(prediction_type="sample")])


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "weights,match",
    [
        ([0.5, 0.6], r"must sum to 1 .*got 1\.10000000"),
        ([0.4, 0.4], r"must sum to 1 .*got 0\.80000000"),
        ([1.2, -0.2], r"must be >= 0, got \[\[1\.2, -0\.2\]\]"),
        ([float("nan"), 1.0], r"must be finite, got \[\[nan, 1\.0\]\]"),
        ([1.0], r"must have 2 entries per row \(one per member\), got 1: \[\[1\.0\]\]"),
        ([0.2, 0.3, 0.5], r"must have 2 entries per row \(one per member\), got 3"),
    ],
)
def test_bad_weights_are_refused_not_renormalised(members, weights, match):
    with pytest.raises(ValueError, match=match):
        FusedUNet(members[:2], weights=weights)
    fused = FusedUNet(members[:2], weights=[0.5, 0.5])
    with pytest.raises(ValueError, match=match):
        fused.set_weights(weights)
    with pytest.raises(ValueError, match=match.replace("must", "fusion_weights must") if "sum" in match else match):
        with fused.override_weights(weights):
            pass
    assert fused.fusion_weights.tolist() == [0.5, 0.5]


def test_bad_timestep_bins_are_refused(members):
    table = [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match=r"weights with 2 rows need timestep_bin_edges \(3 numbers\)"):
        FusedUNet(members[:2], weights=table)
    with pytest.raises(ValueError, match=r"num_bins \+ 1 = 3 numbers, got \[0\.0, 1000\.0\]"):
        FusedUNet(members[:2], weights=table, timestep_bin_edges=[0, 1000])
    with pytest.raises(ValueError, match=r"strictly increasing, got \[0\.0, 700\.0, 300\.0\]"):
        FusedUNet(members[:2], weights=table, timestep_bin_edges=[0, 700, 300])
    with pytest.raises(ValueError, match=r"got 0\.50000000 in row 1: \[0\.5, 0\.0\]"):
        FusedUNet(members[:2], weights=[[1.0, 0.0], [0.5, 0.0]], timestep_bin_edges=[0, 500, 1000])


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(in_channels=8), r"member 1 has in_channels=8 but member 0 has in_channels=4"),
        (dict(out_channels=8), r"member 1 has out_channels=8 but member 0 has out_channels=4"),
        (dict(sample_size=32), r"member 1 has sample_size=32 but member 0 has sample_size=16"),
        (dict(cross_attention_dim=16), r"member 1 has cross_attention_dim=16 but member 0 has cross_attention_dim=32"),
        (dict(time_cond_proj_dim=8), r"member 1 has time_cond_proj_dim=8 but member 0 has time_cond_proj_dim=None"),
        (
            dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80),
            r"member 1 has addition_embed_type='text_time' but member 0 has addition_embed_type=None",
        ),
    ],
)
def test_members_that_disagree_are_refused(members, overrides, match):
    with pytest.raises(ValueError, match=match):
        FusedUNet([members[0], get_dummy_unet(1, **overrides)])


def test_members_with_different_noise_schedules_are_refused(members):
    schedulers = [get_dummy_scheduler(), get_dummy_scheduler(beta_schedule="linear")]
    with pytest.raises(
        ValueError,
        match=r"member 1's noise schedule differs from member 0's: beta_schedule='linear' vs 'scaled_linear'",
    ):
        FusedUNet(members[:2], member_schedulers=schedulers)
    schedulers = [get_dummy_scheduler(), {**get_dummy_scheduler().config, "num_train_timesteps": 500}]
    with pytest.raises(ValueError, match=r"member 1's noise schedule differs .*num_train_timesteps=500 vs 1000"):
        FusedUNet(members[:2], member_schedulers=schedulers)
    with pytest.raises(ValueError, match=r"member_schedulers must hold 2 entries \(one per member\), got 1"):
        FusedUNet(members[:2], member_schedulers=[get_dummy_scheduler()])


def test_bad_member_lists_are_refused(members):
    with pytest.raises(ValueError, match="at least one member, got an empty list"):
        FusedUNet([])
    with pytest.raises(TypeError, match="list of modules, got a single UNet2DConditionModel"):
        FusedUNet(members[0])
    with pytest.raises(TypeError, match="member 1 must be a torch.nn.Module, got str"):
        FusedUNet([members[0], "unet"])
    with pytest.raises(TypeError, match=r"member 0 \(Linear\) needs a `config`"):
        FusedUNet([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"member 1 has dtype torch.float16 but member 0 has dtype torch.float32"):
        FusedUNet([members[0], copy.deepcopy(members[1]).half()])
    with pytest.raises(ValueError, match=r"prediction_type must be one of .*got 'eps'"):
        FusedUNet(members[:2], prediction_type="eps")
    with pytest.raises(ValueError, match=r"member_prediction_types\[1\] must be one of .*got 'x0'"):
        FusedUNet(members[:2], member_prediction_types=["epsilon", "x0"], member_schedulers=[get_dummy_scheduler()] * 2)


# ------------------------------------------------------------------------------------------------ other member kinds
class ToyDenoiser(nn.Module):
    """A non-Diffusers module with the UNet calling convention (and no attention helpers)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.config = types.SimpleNamespace(in_channels=4, out_channels=4, sample_size=16)

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs):
        out = self.conv(sample) * (1 + torch.as_tensor(timestep, dtype=sample.dtype).reshape(-1, 1, 1, 1) / 1000)
        return UNet2DOutput(sample=out) if return_dict else (out,)


def test_custom_modules_and_unet2dmodel_members(inputs):
    sample, timestep, _ = inputs
    toys = [ToyDenoiser(0), ToyDenoiser(1)]
    with torch.no_grad():
        output = FusedUNet(toys, weights=[0.25, 0.75])(sample, timestep)
        expected = 0.25 * toys[0](sample, timestep, return_dict=False)[0] + 0.75 * toys[1](sample, timestep).sample
    assert type(output) is UNet2DOutput
    torch.testing.assert_close(output.sample, expected, rtol=0, atol=1e-6)

    def unet2d(seed):
        torch.manual_seed(seed)
        return UNet2DModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                           layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D")).eval()  # fmt: skip

    plain = [unet2d(0), unet2d(1)]
    with torch.no_grad():
        output = FusedUNet(plain, weights=[0.0, 1.0])(sample, timestep)
        expected = plain[1](sample, timestep).sample
    assert type(output) is UNet2DOutput
    assert torch.equal(output.sample, expected)
    refused = r"member 1 has cross_attention_dim=32 but member 0 has cross_attention_dim=None"
    with pytest.raises(ValueError, match=refused):
        FusedUNet([plain[0], get_dummy_unet(0)])


# ------------------------------------------------------------------------------------------- kwargs reach every member
def test_controlnet_residuals_reach_every_member(members, inputs):
    generator = torch.Generator().manual_seed(1)
    down = [
        torch.randn(BATCH, *shape, generator=generator)
        for shape in [(32, 16, 16), (32, 16, 16), (32, 8, 8), (64, 8, 8)]
    ]
    mid = torch.randn(BATCH, 64, 8, 8, generator=generator)
    residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    for index in range(2):
        weights = [1.0 if i == index else 0.0 for i in range(2)]
        with_residuals = _run(FusedUNet(members[:2], weights=weights), *inputs, **residuals)
        assert torch.equal(with_residuals, _run(members[index], *inputs, **residuals))
        assert (with_residuals - _run(members[index], *inputs)).abs().max() > 1e-2
    fused = _run(FusedUNet(members[:2], weights=[0.5, 0.5]), *inputs, **residuals)
    expected = 0.5 * _run(members[0], *inputs, **residuals) + 0.5 * _run(members[1], *inputs, **residuals)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-6)
    assert len(down) == 4


def test_t2i_adapter_residuals_reach_every_member(members, inputs):
    # UNet2DConditionModel pops from this list: a shared list would leave nothing for the second member
    generator = torch.Generator().manual_seed(2)
    adapter = [torch.randn(BATCH, 32, 8, 8, generator=generator), torch.randn(BATCH, 64, 8, 8, generator=generator)]
    fused = _run(
        FusedUNet(members[:2], weights=[0.5, 0.5]), *inputs, down_intrablock_additional_residuals=list(adapter)
    )
    outputs = [_run(m, *inputs, down_intrablock_additional_residuals=list(adapter)) for m in members[:2]]
    torch.testing.assert_close(fused, 0.5 * outputs[0] + 0.5 * outputs[1], rtol=0, atol=1e-6)
    assert (outputs[1] - _run(members[1], *inputs)).abs().max() > 1e-2
    given = list(adapter)
    _run(FusedUNet(members[:2], weights=[0.5, 0.5]), *inputs, down_intrablock_additional_residuals=given)
    assert len(given) == 2


class RecordingProcessor(AttnProcessor2_0):
    """Records the extra cross-attention kwarg `tag` it receives."""

    def __init__(self):
        super().__init__()
        self.tags = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, tag=None):
        self.tags.append(tag)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_cross_attention_kwargs_reach_every_member_and_are_not_consumed(inputs):
    members = [get_dummy_unet(seed) for seed in range(2)]
    fused = FusedUNet(members, weights=[0.5, 0.5])
    processors = [RecordingProcessor(), RecordingProcessor()]
    for member, processor in zip(members, processors):
        member.set_attn_processor(processor)
    kwargs = {"tag": "hello"}
    _run(fused, *inputs, cross_attention_kwargs=kwargs)
    assert kwargs == {"tag": "hello"}
    num_attention = len(members[0].attn_processors)
    assert [p.tags for p in processors] == [["hello"] * num_attention] * 2


def test_timestep_cond_and_added_cond_kwargs_reach_every_member(inputs):
    sample, timestep, _ = inputs
    lcm = [get_dummy_unet(seed, time_cond_proj_dim=8) for seed in range(2)]
    cond = torch.randn(BATCH, 8, generator=torch.Generator().manual_seed(3))
    fused = _run(FusedUNet(lcm, weights=[0.5, 0.5]), *inputs, timestep_cond=cond)
    outputs = [_run(m, *inputs, timestep_cond=cond) for m in lcm]
    torch.testing.assert_close(fused, 0.5 * outputs[0] + 0.5 * outputs[1], rtol=0, atol=1e-6)
    assert (outputs[1] - _run(lcm[1], *inputs)).abs().max() > 1e-3

    xl = [get_dummy_xl_unet(seed) for seed in range(2)]
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(BATCH, 7, 64, generator=generator)
    added = {
        "text_embeds": torch.randn(BATCH, 32, generator=generator),
        "time_ids": torch.rand(BATCH, 6, generator=generator) * 64,
    }
    other = {"text_embeds": added["text_embeds"], "time_ids": added["time_ids"] + 8}
    fused = _run(FusedUNet(xl, weights=[0.5, 0.5]), sample, timestep, hidden, added_cond_kwargs=added)
    outputs = [_run(m, sample, timestep, hidden, added_cond_kwargs=added) for m in xl]
    torch.testing.assert_close(fused, 0.5 * outputs[0] + 0.5 * outputs[1], rtol=0, atol=1e-6)
    assert (outputs[1] - _run(xl[1], sample, timestep, hidden, added_cond_kwargs=other)).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------ drop-in interface
def test_drop_in_interface(members):
    fused = FusedUNet(members[:2])
    for key in ("in_channels", "out_channels", "sample_size", "cross_attention_dim", "time_cond_proj_dim",
                "addition_time_embed_dim"):  # fmt: skip
        assert fused.config[key] == members[0].config[key], key
    assert fused.dtype == torch.float32 and fused.device == torch.device("cpu")
    xl = [get_dummy_xl_unet(seed) for seed in range(2)]
    fused_xl = FusedUNet(xl)
    assert fused_xl.config.addition_time_embed_dim == 8
    assert fused_xl.add_embedding is xl[0].add_embedding
    assert fused_xl.add_embedding.linear_1.in_features == 80


def _attention_modules(unet):
    return [module for module in unet.modules() if isinstance(module, Attention)]


def test_attention_slicing_and_processors_reach_every_member():
    members = [get_dummy_unet(seed) for seed in range(2)]
    fused = FusedUNet(members)
    fused.set_attention_slice(1)
    for member in members:
        processors = [module.processor for module in _attention_modules(member)]
        assert processors and all(isinstance(p, SlicedAttnProcessor) and p.slice_size == 1 for p in processors)
    fused.set_attn_processor(AttnProcessor2_0())
    assert all(type(p) is AttnProcessor2_0 for p in fused.attn_processors.values())
    # a UNet's processor names (as Diffusers' IP-Adapter and LoRA code expect); a dict reaches every member
    assert fused.attn_processors.keys() == members[0].attn_processors.keys()
    recording = {name: RecordingProcessor() for name in fused.attn_processors}
    fused.set_attn_processor(recording)
    for member in members:
        for name, processor in member.attn_processors.items():
            assert processor is recording[name]
    with pytest.raises(ValueError, match=r"unknown \['bogus'\]"):
        fused.set_attn_processor({**recording, "bogus": AttnProcessor2_0()})


def test_members_with_other_attention_layouts_get_prefixed_processor_names():
    members = [get_dummy_unet(0), get_dummy_unet(1, transformer_layers_per_block=2)]
    fused = FusedUNet(members)
    names = fused.attn_processors.keys()
    assert len(names) == sum(len(m.attn_processors) for m in members)
    assert all(name.startswith(("unets.0.", "unets.1.")) for name in names)
    recording = {name: RecordingProcessor() for name in names}
    fused.set_attn_processor(recording)
    for i, member in enumerate(members):
        for name, processor in member.attn_processors.items():
            assert processor is recording[f"unets.{i}.{name}"]


def test_freeu_and_qkv_fusion_reach_every_member(inputs):
    members = [get_dummy_unet(seed) for seed in range(2)]
    fused = FusedUNet(members, weights=[0.5, 0.5])
    before = _run(fused, *inputs)
    fused.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    for member in members:
        assert [(b.s1, b.s2, b.b1, b.b2) for b in member.up_blocks] == [(0.9, 0.2, 1.2, 1.4)] * len(member.up_blocks)
    fused.disable_freeu()
    for member in members:
        assert all(getattr(b, "s1", None) is None for b in member.up_blocks)
    fused.fuse_qkv_projections()
    for member in members:
        assert all(module.fused_projections for module in _attention_modules(member))
    # fused q/k/v projections compute the same maths in another order
    torch.testing.assert_close(_run(fused, *inputs), before, rtol=1e-5, atol=1e-5)
    fused.unfuse_qkv_projections()  # Diffusers restores the original processors (and leaves the fused weights)
    for member in members:
        assert all(type(module.processor) is AttnProcessor2_0 for module in _attention_modules(member))


@pytest.mark.parametrize(
    "call",
    [
        lambda f: f.fuse_qkv_projections(),
        lambda f: f.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4),
        lambda f: f.set_attention_slice(1),
        lambda f: f.set_attn_processor(AttnProcessor2_0()),
    ],
    ids=["qkv", "freeu", "slicing", "processor"],
)
def test_helpers_raise_when_a_member_lacks_them(call):
    fused = FusedUNet([ToyDenoiser(0), ToyDenoiser(1)])
    with pytest.raises(
        (NotImplementedError, MemberHelperMissing),
        match=r"member 0 \(ToyDenoiser\), member 1 \(ToyDenoiser\) has no",
    ):
        call(fused)


def test_helpers_the_members_lack_are_absent_as_on_a_model_without_them():
    """Diffusers asks `hasattr(model, "set_default_attn_processor")` and skips models without it: a fusion whose
    members lack a helper must answer False, and one whose members have it must have it."""
    lacking, having = FusedUNet([ToyDenoiser(0), ToyDenoiser(1)]), FusedUNet([get_dummy_unet(0), get_dummy_unet(1)])
    for name in ("set_default_attn_processor", "set_attention_slice", "enable_freeu", "fuse_qkv_projections"):
        assert not hasattr(lacking, name) and hasattr(having, name), name
