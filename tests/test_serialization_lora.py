"""Saving and loading LoRA fusions (`FusedUNet.from_lora`): one base folder plus one LoRA folder per member."""

import copy
import json
import os

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusers_scorefusion import FusedUNet, LoraMember
from diffusers_scorefusion.testing.unet_parts import get_dummy_unet

pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402


def _random_lora(base, seed):
    torch.manual_seed(seed)
    unet = copy.deepcopy(base)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "proj_in"], init_lora_weights=False))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    return {f"unet.{key}": value for key, value in get_peft_model_state_dict(unet).items()}


@pytest.fixture(scope="module")
def lora_fusion():
    base = get_dummy_unet(0)
    loras = [_random_lora(base, seed) for seed in (1, 2)]
    return FusedUNet.from_lora(copy.deepcopy(base), loras, weights=[0.3, 0.7]), base


def test_lora_fusion_round_trip(lora_fusion, tmp_path):
    fused, base = lora_fusion
    fused.save_pretrained(tmp_path / "fusion")
    assert sorted(os.listdir(tmp_path / "fusion")) == [
        "config.json", "lora_base_0.diffusers", "member_0.diffusers", "member_1.diffusers"
    ]
    assert os.listdir(tmp_path / "fusion" / "member_0.diffusers") == ["pytorch_lora_weights.safetensors"]
    # the base folder is the plain base UNet, without LoRA layers
    saved_base = UNet2DConditionModel.from_pretrained(tmp_path / "fusion" / "lora_base_0.diffusers")
    for (name, mine), theirs in zip(saved_base.state_dict().items(), base.state_dict().values()):
        assert torch.equal(mine, theirs), name
    loaded = FusedUNet.from_pretrained(tmp_path / "fusion")
    assert all(isinstance(unet, LoraMember) for unet in loaded.unets)
    assert loaded.unets[0].base is loaded.unets[1].base  # still one base
    assert loaded.config.weights == [0.3, 0.7]
    torch.manual_seed(0)
    sample, hidden = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    with torch.no_grad():
        assert torch.equal(loaded(sample, 400, hidden).sample, fused(sample, 400, hidden).sample)
        assert torch.equal(loaded.member_outputs(sample, 400, encoder_hidden_states=hidden),
                           fused.member_outputs(sample, 400, encoder_hidden_states=hidden))


def test_lora_fusion_refuses_reference_only_and_bad_base_index(lora_fusion, tmp_path):
    fused, _ = lora_fusion
    with pytest.raises(ValueError, match="reference_only=True is not supported for LoRA members"):
        fused.save_pretrained(tmp_path / "ref", reference_only=True)
    fused.save_pretrained(tmp_path / "fusion")
    config = json.loads((tmp_path / "fusion" / "config.json").read_text())
    config["members"][1]["lora"]["base"] = 3
    (tmp_path / "fusion" / "config.json").write_text(json.dumps(config))
    # checked before loading
    with pytest.raises(ValueError, match=r"members\[1\]\.lora must name a base index below 1"):
        FusedUNet.from_pretrained(tmp_path / "fusion")
