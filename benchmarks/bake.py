"""Sampling time per image of a k = 3 fusion against its baked model on the same Stable Diffusion pipeline (CPU,
float32), and the cost of baking.

Usage: `python benchmarks/bake.py [--repeats 3] [--steps 10] [--threads 2]`. Prints a table, writes
`benchmarks/results/bake.json` and `bake.png`. Cases: a LoRA fusion (`FusedUNet.from_lora`, 3 adapters of rank 8 on
the attention projections) against the stock pipeline with the merged LoRA loaded (adapter active, and fused into the
weights with `pipe.fuse_lora()`), and a fusion of 3 full fine-tunes against the merged checkpoint. Target: baked /
fusion about 1/k (the text encoder and VAE run once per image in both, so slightly above). The UNet is the mid-size
one of `fused_step.py` (latents 4 x 32 x 32), with the tiny test text encoder and VAE.
"""

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from typing import Callable, Dict, List

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see fused_step.py

import torch  # noqa: E402
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fused_step import UNET_CONFIG, paired_timings, write_json_atomically  # noqa: E402

from diffusers_scorefusion import FusedUNet, ScoreFusionPipeline  # noqa: E402
from diffusers_scorefusion.baking import merge_checkpoints, merge_lora, save_merged_lora  # noqa: E402
from diffusers_scorefusion.testing.unet_parts import (  # noqa: E402
    get_dummy_scheduler,
    get_dummy_text_encoder,
    get_dummy_tokenizer,
    get_dummy_vae,
)

K = 3
WEIGHTS = [0.5, 0.3, 0.2]
RANK = 8
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG).eval()


def components(unet: torch.nn.Module) -> Dict:
    text_encoder = get_dummy_text_encoder(0, hidden_size=UNET_CONFIG["cross_attention_dim"])
    return dict(vae=get_dummy_vae(0), text_encoder=text_encoder, tokenizer=get_dummy_tokenizer(), unet=unet,
                scheduler=get_dummy_scheduler(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)  # fmt: skip


def lora_state_dicts(base: UNet2DConditionModel) -> List[Dict[str, torch.Tensor]]:
    """3 random LoRAs of rank 8 on the attention projections (non-zero B), as `unet.*` state dicts."""
    loras = []
    for seed in range(K):
        torch.manual_seed(100 + seed)
        model = copy.deepcopy(base)
        model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))  # fmt: skip
        loras.append({f"unet.{key}": value for key, value in get_peft_model_state_dict(model).items()})
    return loras


def sampler(pipe: StableDiffusionPipeline, steps: int) -> Callable[[], object]:
    pipe.set_progress_bar_config(disable=True)
    size = pipe.vae_scale_factor * UNET_CONFIG["sample_size"]  # latents 4 x 32 x 32 (the test VAE scales by 2)
    call = dict(prompt="a photo of a cat", num_inference_steps=steps, guidance_scale=5.0, height=size, width=size,
                output_type="np")  # fmt: skip
    return lambda: pipe(**call, generator=torch.Generator().manual_seed(0))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def figure(rows: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 2.8))
    labels = [row["case"] for row in rows]
    ax.barh(labels, [row["cpu_ratio"] for row in rows], color="tab:blue")
    ax.axvline(1 / K, color="tab:red", linestyle="--", label=f"1/k = {1 / K:.2f}")
    ax.set_xlabel("baked / fusion, CPU time per image")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(RESULTS, "bake.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = make_unet(0)
    costs: Dict[str, float] = {}
    rows = []
    with torch.no_grad():
        lora_fusion = FusedUNet.from_lora(copy.deepcopy(base), lora_state_dicts(base), weights=WEIGHTS)
        costs["merge_lora exact (s)"] = timed(lambda: merge_lora(lora_fusion))
        costs["merge_lora rank 8 by SVD (s)"] = timed(lambda: merge_lora(lora_fusion, rank=RANK))
        with tempfile.TemporaryDirectory() as folder:
            costs["save merged LoRA (s)"] = timed(lambda: save_merged_lora(merge_lora(lora_fusion), folder))
            fusion_pipe = ScoreFusionPipeline(**components(lora_fusion))
            baked_pipe = StableDiffusionPipeline(**components(copy.deepcopy(base)))
            baked_pipe.load_lora_weights(folder)
        timing = paired_timings(sampler(baked_pipe, args.steps), sampler(fusion_pipe, args.steps), args.warmup,
                                args.repeats)  # fmt: skip
        rows.append({"case": "LoRA fusion vs baked LoRA (adapter active)", **timing})
        baked_pipe.fuse_lora()
        timing = paired_timings(sampler(baked_pipe, args.steps), sampler(fusion_pipe, args.steps), args.warmup,
                                args.repeats)  # fmt: skip
        rows.append({"case": "LoRA fusion vs baked LoRA fused into the weights", **timing})
        fusion_pipe = baked_pipe = lora_fusion = None  # free the LoRA fusion before the full fine-tunes

        full_fusion = FusedUNet([make_unet(seed) for seed in range(1, K + 1)], weights=WEIGHTS)
        costs["merge_checkpoints (s)"] = timed(lambda: merge_checkpoints(full_fusion))
        merged = merge_checkpoints(full_fusion)
        timing = paired_timings(sampler(StableDiffusionPipeline(**components(merged)), args.steps),
                                sampler(ScoreFusionPipeline(**components(full_fusion)), args.steps), args.warmup,
                                args.repeats)  # fmt: skip
        rows.append({"case": "3 full fine-tunes vs merged checkpoint", **timing})

    print(f"sampling one image (latents 4 x 32 x 32), {args.steps} steps, guidance 5, float32, CPU "
          f"({args.threads} threads), {args.repeats} paired rounds; medians; k = {K}; ratio = baked / fusion (target "
          f"about 1/k = {1 / K:.2f})")  # fmt: skip
    print(f"{'case':<52}{'fusion s':>9}{'baked s':>9}{'ratio':>7}{'cpu ratio':>10}")
    for row in rows:
        print(f"{row['case']:<52}{row['baseline_s']:>9.2f}{row['fused_s']:>9.2f}{row['ratio']:>7.3f}"
              f"{row['cpu_ratio']:>10.3f}")  # fmt: skip
    for name, value in costs.items():
        print(f"{name:<40}{value:>8.3f}")
    parameters = sum(p.numel() for p in base.parameters())
    write_json_atomically(
        {"benchmark": "bake", "k": K, "weights": WEIGHTS, "lora_rank": RANK, "unet_parameters": parameters,
         "steps": args.steps, "guidance_scale": 5.0, "latent_size": UNET_CONFIG["sample_size"],
         "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__, "platform": platform.platform(),
         "load_average": os.getloadavg(), "note": "in each row 'fused_*' is the baked model, 'baseline_*' the fusion",
         "rows": rows, "costs_s": costs},  # fmt: skip
        args.output,
    )
    figure(rows, os.path.splitext(args.output)[0] + ".png")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; wrote {args.output}")


if __name__ == "__main__":
    main()
