"""Tiny, seeded, offline parts of transformer pipelines (SD3, Flux, Chroma, PixArt-Sigma, Sana) for tests, examples and
benchmarks: random weights, tokenizers built in memory (no download, no sentencepiece)."""

import string
from typing import Any, Dict, List, Tuple

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    ChromaTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from .unet_parts import get_dummy_tokenizer

CHARACTERS = string.ascii_lowercase + string.digits + ".,!?'-"


def get_dummy_t5_tokenizer() -> T5Tokenizer:
    """A character-level T5 (Unigram) tokenizer built in memory: `<pad>` 0, `</s>` 1, `<unk>` 2, ids below 100."""
    vocab: List[Tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for char in CHARACTERS:
        vocab += [(char, -5.0), ("▁" + char, -4.0)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def get_dummy_t5_encoder(seed: int = 0, d_model: int = 32) -> T5EncoderModel:
    config = T5Config(vocab_size=100, d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)  # fmt: skip
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _clip_config(**overrides: Any) -> CLIPTextConfig:
    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=1000,
                  bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32)  # fmt: skip
    return CLIPTextConfig(**{**config, **overrides})


def get_dummy_flow_vae(seed: int = 0, latent_channels: int = 4) -> AutoencoderKL:
    """A tiny `AutoencoderKL` with SD3/Flux's shift and scaling factors (no downsampling: 8 x 8 images, 8 x 8
    latents)."""
    torch.manual_seed(seed)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()  # fmt: skip


# ----------------------------------------------------------------------------------------------- Flux
def get_dummy_flux_transformer(seed: int = 0, **overrides: Any) -> FluxTransformer2DModel:
    """A tiny `FluxTransformer2DModel` (packed latents of 4 channels, text width 32)."""
    config = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                  axes_dims_rope=[4, 4, 8])  # fmt: skip
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**config, **overrides}).eval()


def get_dummy_flux_components(seed: int = 0, **transformer_overrides: Any) -> Dict[str, Any]:
    """Components of a tiny `FluxPipeline` (its `transformer` a plain `FluxTransformer2DModel`)."""
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config()).eval()
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder, tokenizer=get_dummy_tokenizer(),
                text_encoder_2=get_dummy_t5_encoder(seed), tokenizer_2=get_dummy_t5_tokenizer(),
                transformer=get_dummy_flux_transformer(seed, **transformer_overrides),
                vae=get_dummy_flow_vae(seed, latent_channels=1), image_encoder=None,
                feature_extractor=None)  # fmt: skip


# ----------------------------------------------------------------------------------------------- Chroma
def get_dummy_chroma_transformer(seed: int = 0) -> ChromaTransformer2DModel:
    torch.manual_seed(seed)
    return ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    axes_dims_rope=[4, 4, 8], approximator_hidden_dim=32, approximator_layers=1,
                                    approximator_num_channels=16).eval()  # fmt: skip


def get_dummy_chroma_components(seed: int = 0) -> Dict[str, Any]:
    """Components of a tiny `ChromaPipeline` (a Flux derivative with a T5 encoder only)."""
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=get_dummy_t5_encoder(seed),
                tokenizer=get_dummy_t5_tokenizer(), transformer=get_dummy_chroma_transformer(seed),
                vae=get_dummy_flow_vae(seed, latent_channels=1), image_encoder=None,
                feature_extractor=None)  # fmt: skip


# ----------------------------------------------------------------------------------------------- SD3
def get_dummy_sd3_transformer(seed: int = 0, **overrides: Any) -> SD3Transformer2DModel:
    """A tiny `SD3Transformer2DModel` (latents 4 channels, text width 32, pooled width 64)."""
    config = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                  num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
                  out_channels=4)  # fmt: skip
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**{**config, **overrides}).eval()


def get_dummy_sd3_components(seed: int = 0) -> Dict[str, Any]:
    """Components of a tiny `StableDiffusion3Pipeline` (its `transformer` a plain `SD3Transformer2DModel`)."""
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_config()).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config()).eval()
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=text_encoder,
                text_encoder_2=text_encoder_2, text_encoder_3=get_dummy_t5_encoder(seed),
                tokenizer=get_dummy_tokenizer(), tokenizer_2=get_dummy_tokenizer(),
                tokenizer_3=get_dummy_t5_tokenizer(),
                transformer=get_dummy_sd3_transformer(seed), vae=get_dummy_flow_vae(seed, latent_channels=4),
                image_encoder=None, feature_extractor=None)  # fmt: skip


# ----------------------------------------------------------------------------------------------- PixArt-Sigma
def get_dummy_pixart_transformer(seed: int = 0) -> PixArtTransformer2DModel:
    """A tiny PixArt-Sigma transformer (noise prediction with learned variance: 8 output channels)."""
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                    num_attention_heads=3, caption_channels=32, in_channels=4, cross_attention_dim=24,
                                    out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                                    num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                    norm_elementwise_affine=False, norm_eps=1e-6).eval()  # fmt: skip


def get_dummy_pixart_components(seed: int = 0) -> Dict[str, Any]:
    """Components of a tiny `PixArtSigmaPipeline` but the scheduler (the caller chooses it)."""
    return dict(transformer=get_dummy_pixart_transformer(seed), vae=get_dummy_flow_vae(seed, latent_channels=4),
                text_encoder=get_dummy_t5_encoder(seed), tokenizer=get_dummy_t5_tokenizer())  # fmt: skip


# ----------------------------------------------------------------------------------------------- Sana
def get_dummy_sana_transformer(seed: int = 0) -> SanaTransformer2DModel:
    torch.manual_seed(seed)
    return SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
                                  attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                  cross_attention_dim=8, caption_channels=8, sample_size=32).eval()  # fmt: skip


def get_dummy_sana_components(seed: int = 0) -> Dict[str, Any]:
    """Components of a tiny `SanaPipeline` but the scheduler; the Gemma tokenizer maps every text to `<unk>`."""
    torch.manual_seed(seed)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407).eval()  # fmt: skip
    torch.manual_seed(seed)
    config = Gemma2Config(head_dim=16, hidden_size=8, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                          num_key_value_heads=2, vocab_size=8, max_position_embeddings=8192,
                          attn_implementation="eager")  # fmt: skip
    text_encoder = Gemma2Model(config).eval()
    return dict(transformer=get_dummy_sana_transformer(seed), vae=vae, text_encoder=text_encoder,
                tokenizer=GemmaTokenizer())  # fmt: skip
