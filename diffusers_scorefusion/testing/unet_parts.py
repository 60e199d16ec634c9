"""Tiny, seeded, offline Stable Diffusion parts for tests, examples and benchmarks (random weights)."""

import string
from typing import Any, Dict, Optional

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..models.modeling_fused_unet import FusedUNet

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2.57 B parameters): for the GPU check scripts, built with
# random weights (nothing is downloaded).
SDXL_BASE_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)  # fmt: skip

def get_dummy_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A character-level CLIP tokenizer built in memory (no download)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for char in string.ascii_lowercase + string.digits + ".,!?'-":
        for token in (char, char + "</w>"):
            vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token="!", model_max_length=model_max_length)


def _text_config(hidden_size: int = 32, **overrides: Any) -> CLIPTextConfig:
    config = dict(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  vocab_size=1000, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    return CLIPTextConfig(**{**config, **overrides})


def get_dummy_text_encoder(seed: int = 0, hidden_size: int = 32) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(_text_config(hidden_size)).eval()


def get_dummy_unet(seed: int = 0, **overrides: Any) -> UNet2DConditionModel:
    """A tiny `UNet2DConditionModel` (latents 4 x 16 x 16, cross-attention dim 32)."""
    config = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=(2, 4), norm_num_groups=32)  # fmt: skip
    config.update(overrides)
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def get_dummy_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=32, sample_size=32).eval()  # fmt: skip


def get_dummy_scheduler(**overrides: Any) -> DDIMScheduler:
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    return DDIMScheduler(**{**config, **overrides})


def get_dummy_components(seed: int = 0, num_members: int = 2, weights: Optional[list] = None) -> Dict[str, Any]:
    """Components of a tiny `ScoreFusionPipeline` whose members are UNets seeded `seed`, `seed + 1`, ..."""
    unets = [get_dummy_unet(seed + i) for i in range(num_members)]
    return dict(vae=get_dummy_vae(seed), text_encoder=get_dummy_text_encoder(seed), tokenizer=get_dummy_tokenizer(),
                unet=FusedUNet(unets, weights=weights), scheduler=get_dummy_scheduler(), safety_checker=None,
                feature_extractor=None, image_encoder=None, requires_safety_checker=False)  # fmt: skip


def get_dummy_xl_unet(seed: int = 0) -> UNet2DConditionModel:
    """A tiny SDXL UNet (text_time additional embedding; two text encoders of width 32)."""
    return get_dummy_unet(seed, addition_embed_type="text_time", addition_time_embed_dim=8,
                          projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
                          transformer_layers_per_block=(1, 2))  # fmt: skip


def get_dummy_xl_components(seed: int = 0, num_members: int = 2) -> Dict[str, Any]:
    """Components of a tiny `StableDiffusionXLPipeline` whose `unet` is a FusedUNet of `num_members` members."""
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection_dim=32)).eval()
    return dict(vae=get_dummy_vae(seed), text_encoder=get_dummy_text_encoder(seed), tokenizer=get_dummy_tokenizer(),
                text_encoder_2=text_encoder_2, tokenizer_2=get_dummy_tokenizer(),
                unet=FusedUNet([get_dummy_xl_unet(seed + i) for i in range(num_members)]),
                scheduler=get_dummy_scheduler(), image_encoder=None, feature_extractor=None)  # fmt: skip
