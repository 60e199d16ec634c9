"""Stand-ins for the tiny Hub repos Diffusers' fast tests load, built in code and written to the private HF cache.

Nothing can be downloaded here. `HF_HOME` points at a private folder (tests/conftest.py); each stand-in is written
in the Hub cache layout (`models--org--name/refs/main` + `snapshots/<commit>/`), so `from_pretrained("org/name")`
finds it offline. Stand-ins are not the real repos: tests that compare against numbers computed with the real files
fail on the stock pipelines too, which is why the harness compares fusion with stock, never with absolute numbers.
"""

import hashlib
import json
import os
import string
from typing import Callable, Dict

import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer, T5Config

from diffusers_scorefusion.testing.transformer_parts import get_dummy_t5_tokenizer
from diffusers_scorefusion.testing.unet_parts import (
    _text_config,
    get_dummy_text_encoder,
    get_dummy_unet,
    get_dummy_vae,
    get_dummy_xl_unet,
)


def _snapshot(cache_dir: str, repo_id: str) -> str:
    """The snapshot folder of `repo_id` in the Hub cache layout (created, with `refs/main` pointing at it)."""
    repo_folder = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"scorefusion stand-in for {repo_id}".encode()).hexdigest()
    os.makedirs(os.path.join(repo_folder, "refs"), exist_ok=True)
    with open(os.path.join(repo_folder, "refs", "main"), "w") as handle:
        handle.write(commit)
    snapshot = os.path.join(repo_folder, "snapshots", commit)
    os.makedirs(snapshot, exist_ok=True)
    return snapshot


def ascii_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer whose tokens are the printable ASCII characters (no merges): under 1000 ids, as the real
    `hf-internal-testing/tiny-random-clip`, and one token per character, so length-dependent tests behave alike."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for char in string.printable.strip():
        for token in (char, char + "</w>"):
            vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token="!", model_max_length=77)


def _tiny_random_clip(folder: str) -> None:
    ascii_clip_tokenizer().save_pretrained(folder)


def _safety_checker() -> StableDiffusionSafetyChecker:
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                           image_size=32, patch_size=4),
        projection_dim=32,
    )  # fmt: skip
    return StableDiffusionSafetyChecker(config).eval()


def _tiny_stable_diffusion(folder: str) -> None:
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True)
    pipe = StableDiffusionPipeline(
        vae=get_dummy_vae(0), text_encoder=get_dummy_text_encoder(0), tokenizer=ascii_clip_tokenizer(),
        unet=get_dummy_unet(0), scheduler=scheduler, safety_checker=_safety_checker(),
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32), image_encoder=None,
    )  # fmt: skip
    pipe.save_pretrained(folder)


def _tiny_stable_diffusion_xl(folder: str) -> None:
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection_dim=32)).eval()
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True)
    pipe = StableDiffusionXLPipeline(
        vae=get_dummy_vae(0), text_encoder=get_dummy_text_encoder(0), text_encoder_2=text_encoder_2,
        tokenizer=ascii_clip_tokenizer(), tokenizer_2=ascii_clip_tokenizer(), unet=get_dummy_xl_unet(0),
        scheduler=scheduler,
    )  # fmt: skip
    pipe.save_pretrained(folder)


def _tiny_clip_text(folder: str) -> None:
    # peft-internal-testing/tiny-clip-text-2: a CLIP text model of width 32 with a 32-wide projection, and its
    # tokenizer.
    torch.manual_seed(0)
    CLIPTextModelWithProjection(_text_config(projection_dim=32)).save_pretrained(folder)
    ascii_clip_tokenizer().save_pretrained(folder)


def _tiny_random_t5(folder: str) -> None:
    # The tests build `T5EncoderModel(AutoConfig.from_pretrained(...))`: the config (width 32, as the real repo's) and
    # a tokenizer (character-level, built from the `tokenizers` library: sentencepiece is not needed).
    T5Config(vocab_size=1103, d_model=32, d_ff=37, d_kv=8, num_layers=5, num_heads=4, relative_attention_num_buckets=8,
             pad_token_id=0, eos_token_id=1, decoder_start_token_id=0).save_pretrained(folder)  # fmt: skip
    get_dummy_t5_tokenizer().save_pretrained(folder)


STAND_INS: Dict[str, Callable[[str], None]] = {
    "hf-internal-testing/tiny-random-t5": _tiny_random_t5,
    "peft-internal-testing/tiny-clip-text-2": _tiny_clip_text,
    "hf-internal-testing/tiny-random-clip": _tiny_random_clip,
    "hf-internal-testing/tiny-stable-diffusion-torch": _tiny_stable_diffusion,
    "hf-internal-testing/tiny-stable-diffusion-pipe": _tiny_stable_diffusion,
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _tiny_stable_diffusion,
    "hf-internal-testing/tiny-stable-diffusion-xl-pipe": _tiny_stable_diffusion_xl,
}


def write_stand_ins(cache_dir: str) -> None:
    """Writes every stand-in into `cache_dir` (the Hub cache, `$HF_HOME/hub`); a complete one is kept."""
    for repo_id, build in STAND_INS.items():
        snapshot = _snapshot(cache_dir, repo_id)
        marker = os.path.join(snapshot, ".scorefusion-stand-in.json")
        if not os.path.isfile(marker):
            build(snapshot)
            with open(marker, "w") as handle:
                json.dump({"repo_id": repo_id}, handle)
