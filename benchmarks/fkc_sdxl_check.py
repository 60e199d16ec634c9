"""Feynman-Kac correctors with SDXL-sized members: cost, memory, resampling and finiteness on a GPU.

A `ScoreFusionXLPipeline` whose `unet` is a FusedUNet of k UNets with the SDXL base config (random weights, float16,
nothing downloaded), small random text encoders of the SDXL widths (768 and 1280) and a small 8x VAE (only latents
are returned). For each case: `--prompts` prompts x `--particles` images, 1024 x 1024, classifier-free guidance 5,
`EulerAncestralDiscreteScheduler`, `--steps` steps: plain sampling, then FKC without and with increment clamping.
Recorded: seconds per step, peak GPU memory, member forwards (must be equal: FKC adds none), resampling steps, ESS
trace, whether the latents stay finite, and whether any resampling crossed prompts (it must not).

Usage (CUDA machine; estimated a few minutes on one H100 with k = 2, not yet run on a GPU):
    python benchmarks/fkc_sdxl_check.py [--num-members 2] [--particles 4] [--prompts 2] [--steps 10]
Without a GPU, `--dry-run` runs the same code with tiny parts on the CPU. Writes
`benchmarks/results/fkc_sdxl_check.json` (or `--output`).
"""

import argparse
import json
import os
import time
from typing import Any, Dict, List, Optional

import torch
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffusers_scorefusion import FeynmanKacCorrector, FusedUNet, ScoreFusionXLPipeline
from diffusers_scorefusion.pipelines.fkc import SDXL_TENSOR_INPUTS
from diffusers_scorefusion.testing.unet_parts import SDXL_BASE_UNET_CONFIG, get_dummy_tokenizer, get_dummy_xl_components

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fkc_sdxl_check.json")
SDXL_UNET_CONFIG = SDXL_BASE_UNET_CONFIG  # stable-diffusion-xl-base-1.0's UNet (random weights)


def sdxl_sized_pipeline(num_members: int, dtype: torch.dtype, device: torch.device) -> ScoreFusionXLPipeline:
    """SDXL-sized fusion (random weights) with small text encoders of SDXL's widths and a small 8x VAE."""
    members = []
    for seed in range(num_members):
        torch.manual_seed(seed)
        with torch.device(device):
            members.append(UNet2DConditionModel(**SDXL_UNET_CONFIG).to(dtype).eval())

    def text_config(hidden: int, **extra: Any) -> CLIPTextConfig:
        return CLIPTextConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                              vocab_size=1000, bos_token_id=0, eos_token_id=1, pad_token_id=1, **extra)  # fmt: skip

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4)  # fmt: skip
    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                steps_offset=1, timestep_spacing="leading")  # fmt: skip
    pipe = ScoreFusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_config(768)), tokenizer=get_dummy_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(text_config(1280, projection_dim=1280)),
        tokenizer_2=get_dummy_tokenizer(), unet=FusedUNet(members), scheduler=scheduler,
    )  # fmt: skip
    return pipe.to(device=device, dtype=dtype)


def tiny_pipeline() -> ScoreFusionXLPipeline:
    components = get_dummy_xl_components()
    components["scheduler"] = EulerAncestralDiscreteScheduler.from_config(components["scheduler"].config)
    return ScoreFusionXLPipeline(**components)


def run_case(pipe: Any, prompts: List[str], particles: int, steps: int, size: int, fkc: Optional[FeynmanKacCorrector],
             device: torch.device) -> Dict[str, Any]:  # fmt: skip
    calls = [0] * len(pipe.unet.unets)
    hooks = [member.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, member in enumerate(pipe.unet.unets)]  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with pipe.unet.capture_member_predictions():
        latents = pipe(prompts, num_images_per_prompt=particles, num_inference_steps=steps, guidance_scale=5.0,
                       height=size, width=size, output_type="latent", callback_on_step_end=fkc,
                       generator=torch.Generator(device).manual_seed(0)).images  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    for hook in hooks:
        hook.remove()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    result = dict(step_s=elapsed / steps, member_forwards=calls, finite=bool(torch.isfinite(latents).all()),
                  peak_memory_gib=peak)  # fmt: skip
    if fkc is not None:
        crossed = any(bool((a >= particles).any()) for a in fkc.ancestors)
        result.update(resampling_steps=fkc.resampling_steps, ess=[e.tolist() for e in fkc.ess_history],
                      resampled_across_prompts=crossed)  # fmt: skip
    return result


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-members", type=int, default=2)
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dry-run", action="store_true", help="tiny parts on the CPU")
    parser.add_argument("--output", default=RESULTS_PATH)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for the CPU check with tiny parts")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        pipe, size = tiny_pipeline(), 32
    else:
        pipe, size = sdxl_sized_pipeline(args.num_members, torch.float16, device), 1024
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a portrait, variant {i}" for i in range(args.prompts)]
    cases = {"plain": None}
    for name, clamp in (("fkc", None), ("fkc_clamp_1", 1.0)):
        cases[name] = FeynmanKacCorrector(args.particles, increment_clamp=clamp, tensor_inputs=SDXL_TENSOR_INPUTS,
                                          generator=torch.Generator().manual_seed(1))  # fmt: skip
    report: Dict[str, Any] = dict(dry_run=args.dry_run, num_members=len(pipe.unet.unets), particles=args.particles,
                                  prompts=args.prompts, steps=args.steps, size=size, cases={})  # fmt: skip
    for name, fkc in cases.items():
        report["cases"][name] = run_case(pipe, prompts, args.particles, args.steps, size, fkc, device)
        case = report["cases"][name]
        print(f"{name:12s} {case['step_s']:.3f} s/step  forwards {case['member_forwards']}  finite {case['finite']}  "
              f"peak {case['peak_memory_gib']}  resamplings {len(case.get('resampling_steps', []))}")  # fmt: skip
    report["equal_member_forwards"] = len({tuple(c["member_forwards"]) for c in report["cases"].values()}) == 1
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=1)
    return report


if __name__ == "__main__":
    main()
