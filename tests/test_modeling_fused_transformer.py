"""`FusedTransformer`: the fused output, arguments reaching every member, weights and bins, config mirroring,
validation and the drop-in helpers."""

import copy

import pytest
import torch
from _gaussian_flow_members import GaussianVelocityTransformer, member_means
from diffusers.hooks import FirstBlockCacheConfig
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from diffusers_scorefusion import FusedTransformer
from diffusers_scorefusion.fusion.modeling_fusion import MemberHelperMissing
from diffusers_scorefusion.fusion.offload_utils import places_own_inputs
from diffusers_scorefusion.testing.transformer_parts import (
    get_dummy_flux_transformer,
    get_dummy_pixart_transformer,
    get_dummy_sd3_transformer,
)

BATCH = 2


@pytest.fixture(scope="module")
def members():
    return [get_dummy_flux_transformer(seed) for seed in range(3)]


def flux_inputs(batch=BATCH, timestep=0.6):
    """Keyword arguments as `FluxPipeline` passes them (8 x 8 image: 4 x 4 packed latents of 4 channels)."""
    generator = torch.Generator().manual_seed(0)
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(4).repeat_interleave(4), torch.arange(4).repeat(4)
    return dict(hidden_states=torch.randn(batch, 16, 4, generator=generator),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=generator),
                pooled_projections=torch.randn(batch, 32, generator=generator),
                timestep=torch.full((batch,), timestep), img_ids=img_ids, txt_ids=torch.zeros(6, 3),
                joint_attention_kwargs={}, return_dict=False)  # fmt: skip


def _run(model, **kwargs):
    with torch.no_grad():
        return model(**{**flux_inputs(), **kwargs})[0]


def _record_calls(module):
    """Records the keyword arguments of each forward call of `module`; returns the list and the hook handle."""
    calls = []
    handle = module.register_forward_pre_hook(lambda _, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    return calls, handle


# ------------------------------------------------------------------------------------------------ the fused output
@pytest.mark.parametrize("index", [0, 1, 2])
def test_one_hot_weights_reproduce_the_member_exactly(members, index):
    weights = [0.0] * 3
    weights[index] = 1.0
    fused = FusedTransformer(members, weights=weights)
    expected = _run(members[index])
    assert torch.equal(_run(fused), expected)
    with torch.no_grad():
        output = fused(**{**flux_inputs(), "return_dict": True})
    assert type(output) is Transformer2DModelOutput and torch.equal(output.sample, expected)


def test_mixed_weights_equal_the_weighted_sum(members):
    weights = [0.2, 0.5, 0.3]
    outputs = [_run(member).double() for member in members]
    assert not torch.allclose(outputs[0], outputs[1])  # the members differ, so the weights matter
    expected = sum(w * out for w, out in zip(weights, outputs))
    torch.testing.assert_close(_run(FusedTransformer(members, weights=weights)).double(), expected, rtol=0, atol=1e-6)


def test_zero_weight_members_are_never_called(members):
    fused = FusedTransformer(members, weights=[0.0, 1.0, 0.0])
    records = [_record_calls(member) for member in members]
    try:
        _run(fused)
        with fused.override_weights([0.5, 0.0, 0.5]):
            _run(fused)
    finally:
        for _, handle in records:
            handle.remove()
    assert [len(calls) for calls, _ in records] == [1, 1, 1]  # member 1 in the first call, 0 and 2 in the second


def test_every_argument_reaches_every_member_as_given(members):
    """Flux's keywords (and controlnet residuals) reach each member; each gets its own copy of dicts and lists."""
    fused = FusedTransformer(members[:2], weights=[0.5, 0.5])
    residuals = [torch.zeros(BATCH, 16, 32)]
    inputs = flux_inputs()
    inputs.update(joint_attention_kwargs={"scale": 1.0}, controlnet_block_samples=residuals)
    records = [_record_calls(member) for member in fused.transformers]
    try:
        with torch.no_grad():
            fused(**inputs)
    finally:
        for _, handle in records:
            handle.remove()
    received = [calls[0][1] for calls, _ in records]
    for kwargs in received:
        assert kwargs.keys() == inputs.keys()
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                assert kwargs[key] is value
            else:
                assert kwargs[key] == value
    assert received[0]["joint_attention_kwargs"] is not inputs["joint_attention_kwargs"]
    assert received[0]["joint_attention_kwargs"] is not received[1]["joint_attention_kwargs"]
    assert received[0]["controlnet_block_samples"] is not residuals
    assert inputs["joint_attention_kwargs"] == {"scale": 1.0}  # not consumed


def test_positional_arguments_as_pixart_passes_them():
    """PixArt's pipeline passes `hidden_states` positionally; the timestep is found by name for the bins."""
    members = [get_dummy_pixart_transformer(seed) for seed in range(2)]
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(BATCH, 4, 8, 8, generator=generator), torch.randn(BATCH, 5, 32, generator=generator)
    call = dict(encoder_hidden_states=text, timestep=torch.tensor([900, 900]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)  # fmt: skip
    fused = FusedTransformer(members, weights=[[1.0, 0.0], [0.0, 1.0]], timestep_bin_edges=[0, 500, 1000])
    with torch.no_grad():
        late = fused(latents, **call)[0]
        early = fused(latents, **{**call, "timestep": torch.tensor([100, 100])})[0]
        assert torch.equal(late, members[1](latents, **call)[0])
        assert torch.equal(early, members[0](latents, **{**call, "timestep": torch.tensor([100, 100])})[0])


def test_arguments_the_members_do_not_take_are_refused(members):
    fused = FusedTransformer(members[:2])
    calls, handle = _record_calls(members[0])
    try:
        with pytest.raises(TypeError, match="FluxTransformer2DModel members: .*unexpected keyword argument 'sample'"):
            _run(fused, sample=torch.zeros(1))
    finally:
        handle.remove()
    assert calls == []


# ------------------------------------------------------------------------------------------------ weights and bins
def test_timestep_bins_are_in_the_units_the_pipeline_passes(members):
    """Flux's pipeline passes sigma in [0, 1]: bins at 0.5 pick the row per sample."""
    fused = FusedTransformer(members[:2], weights=[[1.0, 0.0], [0.0, 1.0]], timestep_bin_edges=[0.0, 0.5, 1.0])
    late, early = torch.full((BATCH,), 0.9), torch.full((BATCH,), 0.1)
    assert torch.equal(_run(fused, timestep=late), _run(members[1], timestep=late))
    assert torch.equal(_run(fused, timestep=early), _run(members[0], timestep=early))
    mixed = torch.tensor([0.1, 0.9])
    expected = torch.stack([_run(members[0], timestep=mixed)[0], _run(members[1], timestep=mixed)[1]])
    assert torch.equal(_run(fused, timestep=mixed), expected)
    assert torch.equal(fused.fusion_weights, torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))


def test_override_weights_and_bad_weights(members):
    fused = FusedTransformer(members[:2], weights=[0.5, 0.5])
    with fused.override_weights([1.0, 0.0]):
        assert torch.equal(_run(fused), _run(members[0]))
    assert fused.fusion_weights.tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="must sum to 1"):
        FusedTransformer(members[:2], weights=[0.5, 0.6])
    with pytest.raises(ValueError, match="2 entries per row"):
        fused.set_weights([1.0])
    assert fused.fusion_weights.tolist() == [0.5, 0.5]


# ------------------------------------------------------------------------------------------------ config and checks
def test_config_and_attributes_mirror_the_members(members):
    fused = FusedTransformer(members[:2])
    member_config = members[0].config
    for key in ("in_channels", "out_channels", "patch_size", "guidance_embeds", "joint_attention_dim",
                "pooled_projection_dim", "num_layers"):  # fmt: skip
        assert fused.config[key] == member_config[key]
    assert list(fused.config.axes_dims_rope) == list(member_config.axes_dims_rope)
    assert fused.config.member_class == "FluxTransformer2DModel" and fused.config.num_members == 2
    assert fused.dtype == torch.float32 and fused.device.type == "cpu"
    assert fused.inner_dim == members[0].inner_dim  # a plain attribute of the members
    with pytest.raises(AttributeError, match="'pos_embed' is a FluxPosEmbed, which the fusion does not expose"):
        fused.pos_embed
    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        fused.no_such_thing
    assert not hasattr(fused, "peft_config")


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda m: [m[0], get_dummy_sd3_transformer(0)], ValueError,
         "member 1 is a SD3Transformer2DModel but member 0 is"),
        (lambda m: [m[0], get_dummy_flux_transformer(1, num_single_layers=2)], ValueError,
         "member 1's config differs.*num_single_layers=2 vs 1"),
        (lambda m: [m[0], copy.deepcopy(m[1]).to(torch.float64)], ValueError, "member 1 has dtype torch.float64"),
        (lambda m: [m[0], torch.nn.Linear(2, 2)], TypeError, "member 1 \\(Linear\\) needs a `config` with in_channels"),
        (lambda m: [m[0], "a/repo"], TypeError, "member 1 must be a torch.nn.Module"),
        (lambda m: [], ValueError, "at least one member"),
        (lambda m: m[0], TypeError, "a list of modules, got a single FluxTransformer2DModel"),
    ],
)  # fmt: skip
def test_bad_member_lists_are_refused(members, build, error, match):
    with pytest.raises(error, match=match):
        FusedTransformer(build(members))


def test_member_schedulers_must_be_flow_matching_and_agree(members):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    fused = FusedTransformer(members[:2], member_schedulers=[FlowMatchEulerDiscreteScheduler(shift=3.0)] * 2)
    assert fused.config.noise_schedule == {"num_train_timesteps": 1000, "shift": 3.0}
    dynamic = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)  # Flux: trained without shift
    assert FusedTransformer(members[:1], member_schedulers=[dynamic]).config.noise_schedule["shift"] == 1.0
    with pytest.raises(ValueError, match="member 1's noise schedule differs from member 0's: shift=1.0 vs 3.0"):
        FusedTransformer(members[:2], member_schedulers=[FlowMatchEulerDiscreteScheduler(shift=3.0), dynamic])
    with pytest.raises(ValueError, match="expected a flow-matching scheduler.*DDIMScheduler"):
        FusedTransformer(members[:1], member_schedulers=[DDIMScheduler()])


# ------------------------------------------------------------------------------------------------ helpers
def test_attention_helpers_reach_every_member(members):
    fused = FusedTransformer([copy.deepcopy(member) for member in members[:2]])
    assert fused.attn_processors.keys() == members[0].attn_processors.keys()
    processor = FluxAttnProcessor()
    fused.set_attn_processor(processor)
    assert all(p is processor for member in fused.transformers for p in member.attn_processors.values())
    expected = [_run(member) for member in fused.transformers]
    fused.fuse_qkv_projections()
    assert all(member.transformer_blocks[0].attn.fused_projections for member in fused.transformers)
    torch.testing.assert_close(_run(fused), 0.5 * expected[0] + 0.5 * expected[1], rtol=0, atol=1e-5)
    fused.unfuse_qkv_projections()
    assert not any(member.transformer_blocks[0].attn.fused_projections for member in fused.transformers)


def test_cache_helpers_reach_every_member(members):
    fused = FusedTransformer([copy.deepcopy(member) for member in members[:2]])
    with fused.cache_context("cond"):
        expected = _run(fused)
    fused.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # threshold 0: never reuses, so outputs are unchanged
    assert fused.is_cache_enabled and all(member.is_cache_enabled for member in fused.transformers)
    with fused.cache_context("cond"):
        assert torch.equal(_run(fused), expected)
    fused.disable_cache()
    assert not fused.is_cache_enabled


@pytest.mark.parametrize(
    "call, helper",
    [
        (lambda fused: fused.set_attn_processor(AttnProcessor2_0()), "set_attn_processor"),
        (lambda fused: fused.fuse_qkv_projections(), "fuse_qkv_projections"),
        (lambda fused: fused.cache_context("cond").__enter__(), "cache_context"),
        (lambda fused: fused.enable_forward_chunking(), "enable_forward_chunking"),
    ],
)
def test_helpers_raise_when_a_member_lacks_them(call, helper):
    fused = FusedTransformer([GaussianVelocityTransformer(mean) for mean in member_means(2)])
    with pytest.raises(
        (NotImplementedError, MemberHelperMissing),
        match=f"member 0 \\(GaussianVelocityTransformer\\).* has no {helper}",
    ):
        call(fused)


def test_sd3_members_have_no_cache_context_and_say_so():
    fused = FusedTransformer([get_dummy_sd3_transformer(0)])
    with pytest.raises(NotImplementedError, match="SD3Transformer2DModel\\) has no cache_context"):
        with fused.cache_context("cond"):
            pass


def test_group_offload_is_applied_per_member(members):
    fused = FusedTransformer([copy.deepcopy(member) for member in members[:2]], weights=[0.3, 0.7])
    expected = _run(fused)
    fused.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    assert all(places_own_inputs(member) for member in fused.transformers)
    assert torch.equal(_run(fused), expected)


def test_member_outputs_stack_each_members_prediction(members):
    inputs = flux_inputs()
    hidden_states, timestep = inputs.pop("hidden_states"), inputs.pop("timestep")
    inputs.pop("return_dict")
    fused = FusedTransformer(members[:2], weights=[1.0, 0.0])
    with torch.no_grad():
        stacked = fused.member_outputs(hidden_states, timestep, **inputs)
    assert stacked.shape == (2, BATCH, 16, 4)
    assert torch.equal(stacked[1], _run(members[1]))  # weight 0 does not matter here


class DeviceRecorder(torch.nn.Module):
    """A transformer-like member with its weights on `device`; records its inputs' devices, returns CPU zeros."""

    def __init__(self, device):
        super().__init__()
        self.config = {"in_channels": 4, "out_channels": 4}
        self.weight = torch.nn.Parameter(torch.zeros(1, device=device))
        self.seen = []

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, joint_attention_kwargs=None,
                return_dict=True):  # fmt: skip
        self.seen.append((hidden_states.device.type, encoder_hidden_states.device.type, timestep.device.type,
                          joint_attention_kwargs["extra"].device.type))  # fmt: skip
        return Transformer2DModelOutput(sample=torch.zeros(hidden_states.shape))


def test_a_member_elsewhere_gets_its_inputs_there_and_its_output_comes_back():
    elsewhere, here = DeviceRecorder("meta"), DeviceRecorder("cpu")
    fused = FusedTransformer([elsewhere, here])
    hidden_states = torch.ones(BATCH, 16, 4)
    output = fused(hidden_states, torch.ones(BATCH, 6, 32), torch.tensor([0.5, 0.5]),  # positional, PixArt-style
                   joint_attention_kwargs={"extra": torch.ones(1)})  # fmt: skip
    assert elsewhere.seen == [("meta",) * 4] and here.seen == [("cpu",) * 4]
    assert output.sample.device.type == "cpu" and output.sample.shape == hidden_states.shape
