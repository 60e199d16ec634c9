"""What Diffusers users do to a pipeline's `unet`, done to a fusion: LoRA for all members, IP-Adapter, compilation.
Each is checked against the members doing the same thing on their own. (Sequential CPU offload needs an accelerator:
accelerate's hooks cannot offload to the CPU itself, for the stock text encoder either.)"""

import copy

import pytest
import torch
from accelerate import cpu_offload
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffusers_scorefusion import FusedUNet, ScoreFusionPipeline
from diffusers_scorefusion.testing.unet_parts import get_dummy_components, get_dummy_unet

WEIGHTS = [0.3, 0.7]


def _inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, 16, 16, generator=generator)
    hidden = torch.randn(batch, 7, 32, generator=generator)
    return sample, torch.tensor(500), hidden


def _weighted(members, *args, **kwargs):
    with torch.no_grad():
        return sum(w * member(*args, **kwargs).sample for w, member in zip(WEIGHTS, members))


def _lora_state_dict(seed: int = 3):
    """A LoRA for the tiny UNet (PEFT keys, no prefix) with non-zero B, so it changes the output."""
    unet = get_dummy_unet(0)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    unet.add_adapter(config)
    return get_peft_model_state_dict(unet)


def _pipe(num_members=2):
    pipe = ScoreFusionPipeline(**get_dummy_components(num_members=num_members, weights=WEIGHTS[:num_members]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, **kwargs):
    return pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                **kwargs).images  # fmt: skip


def test_a_lora_loaded_into_the_fusion_reaches_every_member():
    members = [get_dummy_unet(seed) for seed in range(2)]
    references = copy.deepcopy(members)
    state_dict = _lora_state_dict()
    for reference in references:
        reference.load_lora_adapter(state_dict, prefix=None, adapter_name="style")
    fused = FusedUNet(members, weights=WEIGHTS)
    fused.load_lora_adapter(state_dict, prefix=None, adapter_name="style")
    sample, timestep, hidden = _inputs()
    with torch.no_grad():
        fused_output = fused(sample, timestep, hidden).sample
    torch.testing.assert_close(fused_output, _weighted(references, sample, timestep, hidden), rtol=1e-5, atol=1e-5)
    assert fused.active_adapters() == ["style"] and list(fused.peft_config) == ["style"]
    # a state dict taken from the fusion (`unets.0...` keys) loads back as it is
    again = FusedUNet(copy.deepcopy([get_dummy_unet(seed) for seed in range(2)]), weights=WEIGHTS)
    again.load_lora_adapter(get_peft_model_state_dict(fused, adapter_name="style"), prefix=None, adapter_name="style")
    with torch.no_grad():
        torch.testing.assert_close(again(sample, timestep, hidden).sample, fused_output)


def test_pipeline_lora_calls_work_on_a_fusion():
    pipe = _pipe()
    before = _generate(pipe)
    pipe.load_lora_weights({f"unet.{key}": value for key, value in _lora_state_dict().items()}, adapter_name="style")
    with_lora = _generate(pipe)
    assert (with_lora - before).abs().max() > 1e-3
    pipe.set_adapters(["style"], adapter_weights=[0.0])
    torch.testing.assert_close(_generate(pipe), before, rtol=1e-5, atol=1e-5)
    pipe.set_adapters(["style"], adapter_weights=[{"down": 1.0, "mid": 1.0, "up": 1.0}])  # block-wise scales
    torch.testing.assert_close(_generate(pipe), with_lora, rtol=1e-5, atol=1e-5)
    pipe.fuse_lora()
    torch.testing.assert_close(_generate(pipe), with_lora, rtol=1e-4, atol=1e-4)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    torch.testing.assert_close(_generate(pipe), before, rtol=1e-5, atol=1e-5)


def test_a_lora_for_all_members_is_refused_on_lora_member_fusions():
    base = get_dummy_unet(0)
    fused = FusedUNet.from_lora(base, [_lora_state_dict(3), _lora_state_dict(4)])
    with pytest.raises(ValueError, match="members are LoRA adapters of one base"):
        fused.load_lora_adapter(_lora_state_dict(5), prefix=None, adapter_name="style")
    with pytest.raises(ValueError, match="members are LoRA adapters of one base"):
        fused.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="style")
    assert sorted(base.peft_config) == ["member_0", "member_1"]


def _ip_adapter_state_dict(unet):
    """IP-Adapter weights for a UNet's layout: `image_proj` and `to_k_ip`/`to_v_ip` for each cross-attention layer."""
    torch.manual_seed(0)
    width = unet.config.cross_attention_dim
    projection = ImageProjection(cross_attention_dim=width, image_embed_dim=width, num_image_text_embeds=4).state_dict()
    image_proj = {"proj.weight": projection["image_embeds.weight"], "proj.bias": projection["image_embeds.bias"],
                  "norm.weight": projection["norm.weight"], "norm.bias": projection["norm.bias"]}  # fmt: skip
    ip_adapter, key_id = {}, 1
    channels = unet.config.block_out_channels
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block = int(name.split(".")[1]) if not name.startswith("mid_block") else None
        hidden = (channels[-1] if block is None else
                  list(reversed(channels))[block] if name.startswith("up_blocks") else channels[block])  # fmt: skip
        processor = IPAdapterAttnProcessor2_0(hidden_size=hidden, cross_attention_dim=width, scale=1.0).state_dict()
        ip_adapter[f"{key_id}.to_k_ip.weight"] = torch.randn_like(processor["to_k_ip.0.weight"])
        ip_adapter[f"{key_id}.to_v_ip.weight"] = torch.randn_like(processor["to_v_ip.0.weight"])
        key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def test_ip_adapter_is_shared_by_every_member():
    pipe = _pipe()
    embeds = [torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(1))]  # (negative, positive) image embeds
    before = _generate(pipe)
    pipe.load_ip_adapter(_ip_adapter_state_dict(pipe.unet.unets[0]), subfolder="", weight_name="",
                         image_encoder_folder=None)  # fmt: skip
    first, second = pipe.unet.unets
    assert second.encoder_hid_proj is first.encoder_hid_proj is pipe.unet.encoder_hid_proj
    shared = [name for name, proc in first.attn_processors.items() if isinstance(proc, IPAdapterAttnProcessor2_0)]
    assert shared and all(second.attn_processors[name] is first.attn_processors[name] for name in shared)
    pipe.set_ip_adapter_scale(0.0)
    torch.testing.assert_close(_generate(pipe, ip_adapter_image_embeds=embeds), before, rtol=1e-5, atol=1e-5)
    pipe.set_ip_adapter_scale(1.0)
    assert all(first.attn_processors[name].scale == [1.0] for name in shared)
    assert (_generate(pipe, ip_adapter_image_embeds=embeds) - before).abs().max() > 1e-3
    # the fused prediction with the adapter is the weighted sum of the members' predictions with it
    sample, timestep, hidden = _inputs(1)
    image_embeds = [torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(2))]
    added = {"image_embeds": image_embeds}
    with torch.no_grad():
        fused = pipe.unet(sample, timestep, hidden, added_cond_kwargs=added).sample
    torch.testing.assert_close(fused, _weighted([first, second], sample, timestep, hidden, added_cond_kwargs=added))
    pipe.unload_ip_adapter()
    assert first.encoder_hid_proj is None and second.encoder_hid_proj is None
    torch.testing.assert_close(_generate(pipe), before, rtol=1e-5, atol=1e-5)


def test_compiled_members_and_compiled_fusion_give_the_same_images():
    pipe = _pipe()
    expected = _generate(pipe, fusion_weights=[0.0, 1.0])
    pipe.unet.compile(backend="eager")  # each member compiled in place; the fusion's loop stays eager
    assert all(member._compiled_call_impl is not None for member in pipe.unet.unets)
    torch.testing.assert_close(_generate(pipe, fusion_weights=[0.0, 1.0]), expected)
    compiled = _pipe()
    compiled.unet = torch.compile(compiled.unet, backend="eager")  # the usual `pipe.unet = torch.compile(...)`
    torch.testing.assert_close(_generate(compiled, fusion_weights=[0.0, 1.0]), expected)
    with pytest.raises(ValueError, match="fusion_weights must sum to 1"):
        _generate(compiled, fusion_weights=[0.5, 0.6])


def test_sequential_cpu_offload_of_a_fusion_gives_the_same_images():
    """What `pipe.enable_sequential_cpu_offload()` does: accelerate's `cpu_offload` on every component, so weights sit
    on the meta device until their submodule runs. Diffusers names the CPU `cpu:0`, to which accelerate 1.15 cannot
    offload any model (a plain UNet neither), so the hooks are applied here as Diffusers applies them, with `cpu`."""
    pipe = _pipe()
    expected, expected_one_hot = _generate(pipe), _generate(pipe, fusion_weights=[0.0, 1.0])
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            cpu_offload(component, torch.device("cpu"), offload_buffers=len(component._parameters) > 0)
    assert {p.device.type for member in pipe.unet.unets for p in member.parameters()} == {"meta"}
    torch.testing.assert_close(_generate(pipe), expected, rtol=0, atol=0)
    torch.testing.assert_close(_generate(pipe, fusion_weights=[0.0, 1.0]), expected_one_hot, rtol=0, atol=0)


def test_fusion_pipeline_with_a_stock_pipeline_class():
    """The stock pipeline takes a fusion as its `unet` and samples exactly as ScoreFusionPipeline does."""
    components = get_dummy_components(num_members=2, weights=WEIGHTS)
    stock = StableDiffusionPipeline(**{**components, "requires_safety_checker": False})
    stock.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_generate(stock), _generate(ScoreFusionPipeline(**components)))


def _flux_fusion_pipe():
    from diffusers import FluxPipeline

    from diffusers_scorefusion import FusedTransformer
    from diffusers_scorefusion.testing.transformer_parts import get_dummy_flux_components, get_dummy_flux_transformer

    components = get_dummy_flux_components(0, num_layers=2, num_single_layers=2)
    second = get_dummy_flux_transformer(1, num_layers=2, num_single_layers=2)
    pipe = FluxPipeline(**{**components, "transformer": FusedTransformer([components["transformer"], second])})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _hooks(module, name):
    found = [
        (path, m._diffusers_hook.get_hook(name))
        for path, m in module.named_modules()
        if hasattr(m, "_diffusers_hook")
    ]
    return [(path, hook) for path, hook in found if hook is not None]


def test_caches_apply_to_every_member_and_reset_after_sampling():
    """Diffusers' cache methods on a transformer fusion: each member gets the hooks one transformer gets (the upstream
    tests that count hooks in `pipe.transformer.modules()` or expect the hook at its root are listed exceptions)."""
    from diffusers import FasterCacheConfig, PyramidAttentionBroadcastConfig

    pipe = _flux_fusion_pipe()
    fused = pipe.transformer
    config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                             spatial_attention_timestep_skip_range=(100, 800),
                                             spatial_attention_block_identifiers=["transformer_blocks"],
                                             current_timestep_callback=lambda: pipe.current_timestep)  # fmt: skip
    fused.enable_cache(config)
    for member in fused.transformers:
        assert len(_hooks(member, "pyramid_attention_broadcast")) == 2 + 2  # double- and single-stream blocks
    pipe("a cat", num_inference_steps=4, height=16, width=16, generator=torch.Generator().manual_seed(0))
    assert all(hook.state.cache is None for _, hook in _hooks(fused, "pyramid_attention_broadcast"))  # reset
    fused.disable_cache()
    assert not _hooks(fused, "pyramid_attention_broadcast") and not fused.is_cache_enabled

    fused.enable_cache(FasterCacheConfig(spatial_attention_block_skip_range=2,
                                         spatial_attention_timestep_skip_range=(-1, 901),
                                         unconditional_batch_skip_range=2, attention_weight_callback=lambda _: 0.5,
                                         is_guidance_distilled=True,
                                         current_timestep_callback=lambda: pipe.current_timestep))  # fmt: skip
    roots = [_hooks(member, "faster_cache_denoiser") for member in fused.transformers]
    assert all(len(hooks) == 1 and hooks[0][0] == "" for hooks in roots)  # each member is a denoiser with its hook
    seen = []

    def check(pipe, i, t, kwargs):
        seen.append([hooks[0][1].state.iteration for hooks in roots])
        return {}

    pipe("a cat", num_inference_steps=3, height=16, width=16, callback_on_step_end=check)
    assert seen == [[1, 1], [2, 2], [3, 3]]
    assert all(hooks[0][1].state.iteration == 0 for hooks in roots)  # reset after sampling
