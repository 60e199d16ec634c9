"""LoRA fusions: one base UNet with k adapters equals k UNets with the LoRAs merged in."""

import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from diffusers_scorefusion import FusedUNet, LoraMember, ScoreFusionXLPipeline
from diffusers_scorefusion.fusion.modeling_fusion import MemberHelperMissing
from diffusers_scorefusion.models.modeling_lora_member import save_base_model
from diffusers_scorefusion.testing.unet_parts import get_dummy_unet, get_dummy_xl_components, get_dummy_xl_unet

peft = pytest.importorskip("peft")
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]


def random_lora_unet(base, seed, rank=4, alpha=8, targets=TARGETS):
    """A copy of `base` with a random LoRA adapter "default" (non-zero B; alpha != rank so scaling matters)."""
    torch.manual_seed(seed)
    unet = copy.deepcopy(base)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    return unet


def save_pipeline_format(unet, directory):
    """Diffusers pipeline LoRA format: `unet.`-prefixed, `lora.down`/`lora.up` keys, config in the metadata."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in unet.peft_config["default"].to_dict().items()}
    StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=layers,
                                              unet_lora_adapter_metadata=metadata)  # fmt: skip
    return directory


def merged(unet):
    unet = copy.deepcopy(unet)
    unet.fuse_lora()
    unet.unload_lora()
    return unet


def unet_inputs(unet, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    sample = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    kwargs = dict(encoder_hidden_states=torch.randn(batch, 7, cfg.cross_attention_dim, generator=gen))
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, text_dim, generator=gen),
                                           time_ids=torch.tensor([[16.0, 16, 0, 0, 16, 16]] * batch))
    return sample, torch.tensor(500), kwargs


@pytest.fixture
def loras(tmp_path):
    """A base UNet, 3 LoRA UNets and the same LoRAs as: pipeline-format folder, adapter-format folder, state dict."""
    base = get_dummy_unet(0)
    # A bare state dict carries no lora_alpha (Diffusers then uses alpha = rank): the third LoRA has alpha = rank.
    adapted = [random_lora_unet(base, 10 + i, alpha=8 if i < 2 else 4) for i in range(3)]
    adapted[0].save_lora_adapter(str(tmp_path / "a"))  # adapter format: PEFT keys without prefix
    sources = [str(tmp_path / "a"), str(save_pipeline_format(adapted[1], tmp_path / "b")),
               {f"unet.{k}": v for k, v in get_peft_model_state_dict(adapted[2]).items()}]
    return base, adapted, sources


def test_from_lora_matches_merged_copies(loras):
    base, adapted, sources = loras
    weights = [0.2, 0.5, 0.3]
    reference = FusedUNet([merged(unet) for unet in adapted], weights=weights)
    fused = FusedUNet.from_lora(copy.deepcopy(base), sources, weights=weights)
    sample, timestep, kwargs = unet_inputs(base)
    with torch.no_grad():
        expected = reference.member_outputs(sample, timestep, **kwargs)  # (3, B, C, H, W)
        members = fused.member_outputs(sample, timestep, members=[2, 0, 1], **kwargs)  # the adapter switches
        actual = fused(sample, timestep, **kwargs).sample
    torch.testing.assert_close(members, expected[[2, 0, 1]], atol=1e-5, rtol=1e-5)
    combined = torch.einsum("k,kbchw->bchw", torch.tensor(weights), expected)
    torch.testing.assert_close(actual, combined, atol=1e-5, rtol=1e-5)
    assert min((expected[i] - expected[j]).abs().max() for i, j in [(0, 1), (0, 2), (1, 2)]) > 1e-2
    assert all(isinstance(m, LoraMember) and m.base is fused.unets[0].base for m in fused.unets)


def test_from_lora_memory_is_one_base_plus_adapters(loras):
    base, adapted, sources = loras
    fused = FusedUNet.from_lora(copy.deepcopy(base), sources)
    base_size = sum(p.numel() for p in base.parameters())
    adapter_size = sum(v.numel() for v in get_peft_model_state_dict(adapted[0]).values())
    assert sum(p.numel() for p in fused.parameters()) == base_size + 3 * adapter_size
    separate = FusedUNet([merged(unet) for unet in adapted])
    assert sum(p.numel() for p in separate.parameters()) == 3 * base_size
    assert adapter_size < base_size / 10


def test_from_lora_to_dtype_and_xl(tmp_path):
    base = get_dummy_xl_unet(0)
    adapted = [random_lora_unet(base, 20 + i) for i in range(2)]
    for i, unet in enumerate(adapted):
        save_pipeline_format(unet, tmp_path / str(i))
    fused = FusedUNet.from_lora(copy.deepcopy(base), [tmp_path / "0", tmp_path / "1"], weights=[0.7, 0.3])
    reference = FusedUNet([merged(unet) for unet in adapted], weights=[0.7, 0.3])
    sample, timestep, kwargs = unet_inputs(base)
    with torch.no_grad():
        torch.testing.assert_close(fused(sample, timestep, **kwargs).sample,
                                   reference(sample, timestep, **kwargs).sample, atol=1e-5, rtol=1e-5)
    fused.to(torch.float64)
    assert {p.dtype for p in fused.unets[0].base.parameters()} == {torch.float64}
    assert fused.dtype == torch.float64


def test_xl_pipeline_with_lora_fusion_matches_stock_pipeline_with_merged_lora(tmp_path):
    """The paper's SDXL set-up: two LoRA fine-tunes of one base; a one-hot fusion is the merged LoRA's pipeline."""
    components = get_dummy_xl_components(num_members=1)
    base = components["unet"].unets[0]
    adapted = [random_lora_unet(base, 30 + i) for i in range(2)]
    sources = [save_pipeline_format(unet, tmp_path / str(i)) for i, unet in enumerate(adapted)]
    pipe = ScoreFusionXLPipeline(**{**components, "unet": FusedUNet.from_lora(copy.deepcopy(base), sources)})
    stock = StableDiffusionXLPipeline(**{**components, "unet": merged(adapted[1])})
    call = dict(prompt="a portrait", num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="np")
    expected = stock(**call, generator=torch.Generator().manual_seed(0)).images
    actual = pipe(**call, fusion_weights=[0.0, 1.0], generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_save_base_and_adapters_round_trip(loras, tmp_path):
    """How a LoRA fusion is saved: the base once (without adapters) plus one Diffusers LoRA folder per member."""
    base, _, sources = loras
    fused = FusedUNet.from_lora(copy.deepcopy(base), sources, weights=[0.2, 0.5, 0.3], adapter_names=["x", "y", "z"])
    save_base_model(fused.unets[0].base, tmp_path / "base", max_shard_size="200KB")  # sharded, as for SDXL
    for i, member in enumerate(fused.unets):
        member.save_lora_weights(tmp_path / f"lora_{i}")
    loaded_base = UNet2DConditionModel.from_pretrained(tmp_path / "base")
    expected_state = base.state_dict()
    assert loaded_base.state_dict().keys() == expected_state.keys()
    assert all(torch.equal(value, expected_state[key]) for key, value in loaded_base.state_dict().items())
    again = FusedUNet.from_lora(loaded_base, [tmp_path / f"lora_{i}" for i in range(3)], weights=[0.2, 0.5, 0.3])
    sample, timestep, kwargs = unet_inputs(base)
    with torch.no_grad():
        torch.testing.assert_close(again(sample, timestep, **kwargs).sample, fused(sample, timestep, **kwargs).sample,
                                   atol=0, rtol=0)
    assert [m.adapter_name for m in fused.unets] == ["x", "y", "z"]
    assert fused.unets[1].lora_metadata()["lora_alpha"] == 8


def test_from_lora_refuses_bad_input(loras, tmp_path):
    base, adapted, sources = loras
    with pytest.raises(ValueError, match="neither a local folder or file nor a Hub repo id"):
        FusedUNet.from_lora(copy.deepcopy(base), [str(tmp_path / "missing" / "x" / "y")])
    with pytest.raises(ValueError, match="could not read LoRA"):
        FusedUNet.from_lora(copy.deepcopy(base), [str(tmp_path)])  # a folder without a LoRA file
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(get_peft_model_state_dict(adapted[0]), pickled / "pytorch_lora_weights.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        FusedUNet.from_lora(copy.deepcopy(base), [pickled])
    assert isinstance(FusedUNet.from_lora(copy.deepcopy(base), [pickled], allow_pickle=True), FusedUNet)
    foreign = {"unet.down_blocks.9.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 64),
               "unet.down_blocks.9.attentions.0.proj_in.lora_B.weight": torch.zeros(64, 4)}
    with pytest.raises(ValueError, match="targets 1 modules the base UNet lacks"):
        FusedUNet.from_lora(copy.deepcopy(base), [foreign])
    wrong_size = {"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 65),
                  "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": torch.zeros(64, 4)}
    with pytest.raises(ValueError, match="does not fit the base UNet.*65 vs 64"):
        FusedUNet.from_lora(copy.deepcopy(base), [wrong_size])
    text = {**sources[2], "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}
    with pytest.raises(ValueError, match="also adapts \\['text_encoder'\\]"):
        FusedUNet.from_lora(copy.deepcopy(base), [text])
    with pytest.raises(ValueError, match="adapter_names must be 2 distinct"):
        FusedUNet.from_lora(copy.deepcopy(base), sources[:2], adapter_names=["a", "a"])
    with pytest.raises(ValueError, match="non-empty list"):
        FusedUNet.from_lora(copy.deepcopy(base), sources[0])
    target = copy.deepcopy(base)
    with pytest.raises(ValueError, match="targets 1 modules"):  # nothing is loaded when a later LoRA is bad
        FusedUNet.from_lora(target, [sources[0], foreign])
    assert not getattr(target, "peft_config", {})


def test_unet_helpers_reach_the_shared_base(loras):
    base, _, sources = loras
    fused = FusedUNet.from_lora(copy.deepcopy(base), sources[:2])
    shared = fused.unets[0].base
    assert fused.attn_processors == shared.attn_processors and len(shared.attn_processors) > 0  # one shared base
    fused.enable_freeu(s1=0.9, s2=0.2, b1=1.1, b2=1.2)
    assert shared.up_blocks[0].s1 == 0.9
    fused.disable_freeu()
    assert shared.up_blocks[0].s1 is None
    with pytest.raises(MemberHelperMissing, match="fuse_qkv_projections"):  # it would bypass the adapters
        fused.fuse_qkv_projections()
