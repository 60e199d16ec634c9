"""Offloading and per-member placement: outputs stay identical; inputs reach members on other devices."""

import numpy as np
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from diffusers.hooks.group_offloading import _is_group_offload_enabled
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from diffusers_scorefusion import FusedUNet, ScoreFusionPipeline
from diffusers_scorefusion.fusion.offload_utils import places_own_inputs, to_device
from diffusers_scorefusion.testing.unet_parts import get_dummy_components, get_dummy_unet

CPU = torch.device("cpu")


def unet_inputs(batch=2):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, 16, 16, generator=gen), torch.tensor(400), torch.randn(batch, 7, 32, generator=gen)


def test_group_offload_per_member_matches_plain_fusion():
    fused = FusedUNet([get_dummy_unet(0), get_dummy_unet(1)], weights=[0.3, 0.7])
    sample, timestep, hidden = unet_inputs()
    with torch.no_grad():
        expected = fused(sample, timestep, encoder_hidden_states=hidden).sample
        assert not any(places_own_inputs(member) for member in fused.unets)
        for member in fused.unets:
            member.enable_group_offload(CPU, offload_device=CPU, offload_type="block_level", num_blocks_per_group=1)
        assert all(places_own_inputs(member) for member in fused.unets)
        actual = fused(sample, timestep, encoder_hidden_states=hidden).sample
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_pipeline_group_offload_offloads_each_member_by_blocks():
    components = get_dummy_components(num_members=2, weights=[0.4, 0.6])
    call = dict(prompt="a cat", num_inference_steps=2, guidance_scale=5.0, output_type="np")
    expected = ScoreFusionPipeline(**components)(**call, generator=torch.Generator().manual_seed(0)).images
    pipe = ScoreFusionPipeline(**components)
    pipe.enable_group_offload(CPU, offload_device=CPU, offload_type="block_level", num_blocks_per_group=1)
    for member in pipe.unet.unets:  # groups are the members' blocks, not whole members (which Diffusers won't move)
        group = member.down_blocks[0]._diffusers_hook.get_hook("group_offloading").group
        assert group.modules == [member.down_blocks[0]] and _is_group_offload_enabled(member)
    actual = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(actual, expected)


def test_model_cpu_offload_moves_the_fusion_as_one_component():
    components = get_dummy_components(num_members=2, weights=[0.4, 0.6])
    call = dict(prompt="a cat", num_inference_steps=2, guidance_scale=5.0, output_type="np")
    expected = ScoreFusionPipeline(**components)(**call, generator=torch.Generator().manual_seed(0)).images
    pipe = ScoreFusionPipeline(**components)
    pipe.enable_model_cpu_offload(device="cpu")
    # one hook on the whole FusedUNet; the members are moved with it and need none of their own
    assert pipe.unet._hf_hook is not None and not any(places_own_inputs(member) for member in pipe.unet.unets)
    actual = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(actual, expected)


class DeviceRecorder(nn.Module):
    """A member whose weights sit on `device`; it records the devices of its inputs and returns zeros on the CPU."""

    def __init__(self, device):
        super().__init__()
        self.config = {"in_channels": 4, "out_channels": 4, "sample_size": 16, "cross_attention_dim": 32}
        self.weight = nn.Parameter(torch.zeros(1, device=device))
        self.seen = []

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True):
        self.seen.append((sample.device.type, timestep.device.type, encoder_hidden_states.device.type,
                          added_cond_kwargs["text_embeds"].device.type))  # fmt: skip
        return UNet2DConditionOutput(sample=torch.zeros(sample.shape))


def test_member_elsewhere_gets_its_inputs_unless_its_hooks_move_them():
    elsewhere, hooked = DeviceRecorder("meta"), DeviceRecorder("meta")
    add_hook_to_module(hooked, ModelHook())  # stands for accelerate's offloading hooks, which move inputs themselves
    fused = FusedUNet([elsewhere, hooked, DeviceRecorder("cpu")])
    sample, timestep, hidden = unet_inputs()
    output = fused(sample, timestep, encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": torch.ones(2, 3)})
    assert elsewhere.seen == [("meta",) * 4] and hooked.seen == [("cpu",) * 4]
    assert fused.unets[2].seen == [("cpu",) * 4] and output.sample.device == CPU


def test_to_device_keeps_structure():
    value = (torch.ones(1), {"a": [torch.zeros(2), 3]}, UNet2DConditionOutput(sample=torch.ones(2)))
    moved = to_device(value, CPU)
    assert isinstance(moved[2], UNet2DConditionOutput) and moved[1]["a"][1] == 3
    assert moved[0] is value[0]  # nothing to move: the same tensor
