"""Merged checkpoints of full fine-tunes (sum_i lambda_i theta_i), the per-bin adapter schedule of LoRA fusions, and
the bake's refusals (one sentence, nothing written)."""

import copy

import numpy as np
import pytest
import torch
from _bake_loras import save_lora_folders
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel

from diffusers_scorefusion import FusedUNet, LoraMember, ScoreFusionPipeline
from diffusers_scorefusion.baking import (
    bake_lora_schedule,
    load_lora_schedule,
    merge_checkpoints,
    merge_lora,
    save_lora_schedule,
    save_merged_checkpoint,
    save_merged_lora,
)
from diffusers_scorefusion.testing.unet_parts import get_dummy_components, get_dummy_unet

WEIGHTS = [0.5, 0.2, 0.3]
CALL = dict(prompt="a photo", num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="np")


def images(pipe, **kwargs):
    return pipe(**CALL, **kwargs, generator=torch.Generator().manual_seed(0)).images


def test_merged_checkpoint_is_the_weighted_parameter_sum_and_a_stock_pipeline(tmp_path):
    components = get_dummy_components(num_members=3, weights=WEIGHTS)
    fused = components["unet"]
    model = merge_checkpoints(fused)
    assert type(model) is UNet2DConditionModel
    expected = {name: sum(w * unet.state_dict()[name] for w, unet in zip(WEIGHTS, fused.unets))
                for name in fused.unets[0].state_dict()}  # fmt: skip
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-6)

    save_merged_checkpoint(model, tmp_path / "unet")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in loaded.state_dict().items())

    save_merged_checkpoint(model, tmp_path / "pipe", pipeline=ScoreFusionPipeline(**components))
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert type(pipe) is StableDiffusionPipeline and type(pipe.unet) is UNet2DConditionModel
    reference_unet = get_dummy_unet(0)
    reference_unet.load_state_dict(expected)
    stock = StableDiffusionPipeline(**{**components, "unet": reference_unet})
    np.testing.assert_allclose(images(pipe), images(stock), atol=1e-5)


def test_merged_checkpoint_refusals_write_nothing(tmp_path):
    out = tmp_path / "out"
    other = FusedUNet([get_dummy_unet(0), get_dummy_unet(1, layers_per_block=2)])
    with pytest.raises(ValueError, match=r"do not share one architecture: parameter "
                                         r"'up_blocks.0.resnets.1.norm1.weight' has shape \(96,\) in member 0 and "
                                         r"\(128,\) in member 1"):
        merge_checkpoints(other)
    deeper = FusedUNet([get_dummy_unet(0), get_dummy_unet(1, down_block_types=("DownBlock2D", "DownBlock2D"))])
    with pytest.raises(ValueError, match="member 0 has parameter 'down_blocks.1.attentions.0.norm.weight' "
                                         r"\(64,\), member 1 has none"):
        merge_checkpoints(deeper)
    heads = FusedUNet([get_dummy_unet(0), get_dummy_unet(1, attention_head_dim=(2, 8))])  # same shapes
    with pytest.raises(ValueError, match=r"config 'attention_head_dim' is \[2, 4\] in member 0 and \[2, 8\] in "
                                         "member 1"):
        merge_checkpoints(heads)
    table = FusedUNet([get_dummy_unet(0), get_dummy_unet(1)], weights=[[1.0, 0.0], [0.25, 0.75]],
                      timestep_bin_edges=[0, 500, 1000])  # fmt: skip
    with pytest.raises(ValueError, match="table over 2 timestep bins.*pass row="):
        merge_checkpoints(table)
    row = merge_checkpoints(table, row=1)
    name = "conv_in.weight"
    torch.testing.assert_close(row.state_dict()[name], 0.25 * table.unets[0].state_dict()[name]
                               + 0.75 * table.unets[1].state_dict()[name])  # fmt: skip
    with pytest.raises(ValueError, match="row must be an integer from 0 to 1, got 2"):
        merge_checkpoints(table, row=2)
    assert not out.exists()


def test_lora_refusals_write_nothing(tmp_path):
    base = get_dummy_unet(0)
    folders = save_lora_folders(base, tmp_path)
    fused = FusedUNet.from_lora(copy.deepcopy(base), folders)
    with pytest.raises(ValueError, match=r"rank must be an integer from 1 to the members' total rank 9 \(ranks "
                                         r"\[2, 4, 3\]\), got 10"):
        merge_lora(fused, rank=10)
    with pytest.raises(ValueError, match="merge them with merge_lora"):
        merge_checkpoints(fused)
    with pytest.raises(ValueError, match="weights are one row.*merge_lora"):
        bake_lora_schedule(fused)
    other = FusedUNet.from_lora(copy.deepcopy(base), folders[:1], adapter_names=["other"])
    split = FusedUNet([fused.unets[0], LoraMember(other.unets[0].base, "other")])
    with pytest.raises(ValueError, match="members do not share a base: member 1's UNet2DConditionModel is another"):
        merge_lora(split)
    with pytest.raises(ValueError, match="format must be 'diffusers' or 'kohya', got 'ckpt'"):
        save_merged_lora(merge_lora(fused), tmp_path / "out", format="ckpt")
    full = FusedUNet([get_dummy_unet(0), get_dummy_unet(1)])
    with pytest.raises(ValueError, match="member 0 is a full model"):
        merge_lora(full)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "pytorch_lora_weights.safetensors").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="already holds"):
        save_merged_lora(merge_lora(fused), tmp_path / "taken")
    assert (tmp_path / "taken" / "pytorch_lora_weights.safetensors").read_bytes() == b"mine"
    assert not (tmp_path / "out").exists()


def test_adapter_schedule_equals_the_per_bin_merged_models(tmp_path):
    """A (num_bins, k) table on a LoRA fusion: the stock pipeline with the k adapters and the schedule callback equals
    the fusion's merged-weights counterpart (at each step, the base with the LoRAs merged with that bin's row)."""
    components = get_dummy_components(num_members=1)
    base = components["unet"].unets[0]
    folders = save_lora_folders(base, tmp_path)
    table, edges = [[0.6, 0.1, 0.3], [0.1, 0.7, 0.2]], [0, 500, 1000]  # DDIM, 4 steps: t = 751, 501 | 251, 1
    fused = FusedUNet.from_lora(copy.deepcopy(base), folders)
    fused.set_weights(table, timestep_bin_edges=edges)
    save_lora_schedule(bake_lora_schedule(fused), tmp_path / "baked")

    per_bin = []
    for row in table:  # PEFT's own merge of the original LoRAs, row by row
        unet = copy.deepcopy(base)
        for i, folder in enumerate(folders):
            unet.load_lora_adapter(folder, prefix="unet", adapter_name=f"m{i}", use_safetensors=True)
        unet.set_adapters(["m0", "m1", "m2"], weights=row)
        unet.fuse_lora(adapter_names=["m0", "m1", "m2"])
        unet.unload_lora()
        per_bin.append(unet)
    counterpart = FusedUNet(per_bin, weights=[[1.0, 0.0], [0.0, 1.0]], timestep_bin_edges=edges)
    expected = images(StableDiffusionPipeline(**{**components, "unet": counterpart}))

    pipe = StableDiffusionPipeline(**{**components, "unet": copy.deepcopy(base)})
    schedule = load_lora_schedule(pipe, tmp_path / "baked")
    schedule.prepare(pipe, CALL["num_inference_steps"])
    np.testing.assert_allclose(images(pipe, callback_on_step_end=schedule), expected, atol=2e-5)
    schedule.prepare(pipe, CALL["num_inference_steps"])
    without = images(pipe)  # the first bin's weights throughout
    assert np.abs(without - expected).max() > 1e-3


def test_merged_flux_checkpoint_is_the_stock_flux_pipeline(tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from diffusers_scorefusion import FusedTransformer, ScoreFusionFluxPipeline
    from diffusers_scorefusion.testing.transformer_parts import get_dummy_flux_components, get_dummy_flux_transformer

    components = get_dummy_flux_components()
    members = [get_dummy_flux_transformer(seed) for seed in (1, 2)]
    fused = FusedTransformer(members, weights=[0.25, 0.75])
    model = merge_checkpoints(fused)
    assert type(model) is FluxTransformer2DModel
    for name, value in model.state_dict().items():
        expected = 0.25 * members[0].state_dict()[name] + 0.75 * members[1].state_dict()[name]
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-6)
    save_merged_checkpoint(model, tmp_path / "pipe", pipeline=ScoreFusionFluxPipeline(**{**components,
                                                                                        "transformer": fused}))
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert type(pipe) is FluxPipeline and type(pipe.transformer) is FluxTransformer2DModel
    call = dict(prompt="a photo", num_inference_steps=2, height=16, width=16, output_type="np", max_sequence_length=16)
    stock = FluxPipeline(**{**components, "transformer": model})
    np.testing.assert_allclose(pipe(**call, generator=torch.Generator().manual_seed(0)).images,
                               stock(**call, generator=torch.Generator().manual_seed(0)).images, atol=1e-5)
