"""LoRA fusions of transformers: one base with k adapters equals k merged copies; community Flux formats are converted
as `FluxPipeline.load_lora_weights` converts them."""

import copy

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from diffusers_scorefusion import FusedTransformer, LoraMember
from diffusers_scorefusion.testing.transformer_parts import (
    get_dummy_flux_components,
    get_dummy_flux_transformer,
    get_dummy_sd3_components,
)

peft = pytest.importorskip("peft")
from peft.utils import get_peft_model_state_dict  # noqa: E402
from test_lora_members import merged, random_lora_unet  # noqa: E402  (generic: copy, random adapter; fuse)
from test_modeling_fused_transformer import flux_inputs  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_out", "proj_mlp"]
INNER = 32  # the tiny Flux transformer's width (2 heads x 16)


def random_lora(base, seed, alpha=8):
    return random_lora_unet(base, seed, alpha=alpha, targets=TARGETS)


def _outputs(model, **kwargs):
    inputs = flux_inputs()
    with torch.no_grad():
        return model(**{**inputs, **kwargs})[0]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A base Flux transformer, 3 LoRA copies, and the LoRAs as: adapter folder, `.safetensors` file, state dict."""
    tmp_path = tmp_path_factory.mktemp("loras")
    base = get_dummy_flux_transformer(0)
    adapted = [random_lora(base, 10 + i, alpha=8 if i < 2 else 4) for i in range(3)]
    adapted[0].save_lora_adapter(str(tmp_path / "a"))
    layers = get_peft_model_state_dict(adapted[1])
    config = adapted[1].peft_config["default"].to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    FluxPipeline.save_lora_weights(str(tmp_path / "b"), transformer_lora_layers=layers,
                                   transformer_lora_adapter_metadata=metadata)  # fmt: skip
    state_dict = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(adapted[2]).items()}  # alpha = rank
    sources = [str(tmp_path / "a"), str(tmp_path / "b" / "pytorch_lora_weights.safetensors"), state_dict]
    return base, adapted, sources


def test_from_lora_matches_merged_copies_with_one_base_in_memory(loras):
    base, adapted, sources = loras
    weights = [0.2, 0.5, 0.3]
    reference = FusedTransformer([merged(model) for model in adapted], weights=weights)
    fused = FusedTransformer.from_lora(copy.deepcopy(base), sources, weights=weights)
    inputs = flux_inputs()
    hidden_states, timestep = inputs.pop("hidden_states"), inputs.pop("timestep")
    inputs.pop("return_dict")
    with torch.no_grad():
        expected = reference.member_outputs(hidden_states, timestep, **inputs)  # (3, B, L, C)
        members = fused.member_outputs(hidden_states, timestep, members=[2, 0, 1], **inputs)  # the adapter switches
    torch.testing.assert_close(members, expected[[2, 0, 1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_outputs(fused), torch.einsum("k,kbld->bld", torch.tensor(weights), expected),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    assert min((expected[i] - expected[j]).abs().max() for i, j in [(0, 1), (0, 2), (1, 2)]) > 1e-2
    assert all(isinstance(m, LoraMember) and m.base is fused.transformers[0].base for m in fused.transformers)
    base_size = sum(p.numel() for p in base.parameters())
    adapter_size = sum(v.numel() for v in get_peft_model_state_dict(adapted[0]).values())
    assert sum(p.numel() for p in fused.parameters()) == base_size + 3 * adapter_size
    assert fused.config.member_class == "FluxTransformer2DModel" and fused.config.in_channels == base.config.in_channels


def _kohya_lora(seed, rank=4):
    """A Kohya (sd-scripts) Flux LoRA for the tiny transformer: fused qkv, an output projection, a single block."""
    generator = torch.Generator().manual_seed(seed)

    def pair(key, fan_in, fan_out):
        return {f"{key}.lora_down.weight": 0.3 * torch.randn(rank, fan_in, generator=generator),
                f"{key}.lora_up.weight": 0.3 * torch.randn(fan_out, rank, generator=generator),
                f"{key}.alpha": torch.tensor(2.0 * rank)}  # fmt: skip

    return {**pair("lora_unet_double_blocks_0_img_attn_qkv", INNER, 3 * INNER),
            **pair("lora_unet_double_blocks_0_img_attn_proj", INNER, INNER),
            **pair("lora_unet_single_blocks_0_linear2", INNER + 4 * INNER, INNER)}  # fmt: skip


def _xlabs_lora(seed, rank=4):
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for name, fan_in, fan_out in [("qkv_lora1", INNER, 3 * INNER), ("proj_lora1", INNER, INNER),
                                  ("qkv_lora2", INNER, 3 * INNER), ("proj_lora2", INNER, INNER)]:  # fmt: skip
        lora[f"double_blocks.0.processor.{name}.down.weight"] = 0.3 * torch.randn(rank, fan_in, generator=generator)
        lora[f"double_blocks.0.processor.{name}.up.weight"] = 0.3 * torch.randn(fan_out, rank, generator=generator)
    return lora


def test_kohya_and_xlabs_flux_loras_are_converted_as_the_flux_pipeline_converts_them():
    base = get_dummy_flux_transformer(0)
    community = [_kohya_lora(1), _xlabs_lora(2)]
    expected = []
    for lora in community:
        components = get_dummy_flux_components(0)
        pipe = FluxPipeline(**components)
        pipe.load_lora_weights(copy.deepcopy(lora))
        expected.append(_outputs(pipe.transformer))
    fused = FusedTransformer.from_lora(copy.deepcopy(base), [copy.deepcopy(lora) for lora in community])
    for i, output in enumerate(expected):
        with fused.override_weights([1.0 - i, float(i)]):
            torch.testing.assert_close(_outputs(fused), output, rtol=0, atol=1e-6)
    assert (expected[0] - _outputs(base)).abs().max() > 1e-2  # the LoRAs change the output


def test_lora_scale_reaches_the_lora_members(loras):
    base, adapted, sources = loras
    fused = FusedTransformer.from_lora(copy.deepcopy(base), sources[:1])
    stock = copy.deepcopy(base)
    stock.load_lora_adapter(sources[0], prefix=None, use_safetensors=True)
    for scale in (0.5, 1.0):
        kwargs = dict(joint_attention_kwargs={"scale": scale})
        torch.testing.assert_close(_outputs(fused, **kwargs), _outputs(stock, **kwargs), rtol=0, atol=0)
    assert (_outputs(fused, joint_attention_kwargs={"scale": 0.5}) - _outputs(fused)).abs().max() > 1e-3


def test_sd3_pipeline_with_a_lora_fusion_matches_the_stock_pipeline_with_the_lora(tmp_path):
    components = get_dummy_sd3_components(0)
    adapted = random_lora(components["transformer"], 5)
    layers = get_peft_model_state_dict(adapted)
    StableDiffusion3Pipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=layers)
    call = dict(prompt="a cat", height=8, width=8, max_sequence_length=16, num_inference_steps=2, output_type="pt")
    stock = StableDiffusion3Pipeline(**{**components, "transformer": copy.deepcopy(components["transformer"])})
    stock.load_lora_weights(str(tmp_path))
    expected = stock(**call, generator=torch.Generator().manual_seed(0)).images
    fused = FusedTransformer.from_lora(copy.deepcopy(components["transformer"]), [str(tmp_path), str(tmp_path)],
                                       weights=[0.0, 1.0])  # fmt: skip
    pipe = StableDiffusion3Pipeline(**{**components, "transformer": fused})
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0)).images, expected)


def test_lora_member_writes_a_transformer_lora_folder(loras, tmp_path):
    base, _, sources = loras
    fused = FusedTransformer.from_lora(copy.deepcopy(base), sources[:2], weights=[0.0, 1.0])
    fused.transformers[1].save_lora_weights(tmp_path)
    reloaded = FusedTransformer.from_lora(copy.deepcopy(base), [str(tmp_path)])
    torch.testing.assert_close(_outputs(reloaded), _outputs(fused), rtol=0, atol=0)


def test_bad_loras_are_refused_and_nothing_is_loaded(loras):
    base, adapted, sources = loras
    target = copy.deepcopy(base)
    text_encoder = {**sources[2], "text_encoder.layer.lora_A.weight": torch.zeros(4, 32)}
    with pytest.raises(ValueError, match="also adapts \\['text_encoder'\\]: a fusion member can only change the "
                                         "transformer"):  # fmt: skip
        FusedTransformer.from_lora(target, [sources[0], text_encoder])
    wrong_shape = dict(sources[2])
    key = next(k for k in wrong_shape if k.endswith("to_q.lora_A.weight"))
    wrong_shape[key] = torch.zeros(4, INNER + 1)
    with pytest.raises(ValueError, match="does not fit the base transformer.*33 vs 32"):
        FusedTransformer.from_lora(target, [sources[0], wrong_shape])
    assert not getattr(target, "peft_config", {})
    with pytest.raises(TypeError, match="with LoRA support .* got Linear"):
        FusedTransformer.from_lora(torch.nn.Linear(2, 2), sources[:1])
