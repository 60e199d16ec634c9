"""The whole API on tiny random Stable Diffusion parts, offline, in under a minute on a CPU.

Builds three "fine-tuned" UNets, fuses them, samples, fits the weights to a few target images,
saves the fitted pipeline, reloads it through Diffusers and writes an image grid.

    python examples/quickstart_tiny.py                 # writes outputs/quickstart/ (git-ignored)
"""

import argparse
import os

import numpy as np
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.utils import make_image_grid

from diffusers_scorefusion import FusedUNet, ScoreFusionPipeline
from diffusers_scorefusion.testing.unet_parts import get_dummy_components, get_dummy_unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("outputs", "quickstart"),
                        help="folder for the grid and the saved pipeline (default: outputs/quickstart, git-ignored)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    components = get_dummy_components()  # tiny VAE, text encoder, tokenizer, scheduler (random weights)
    fused = FusedUNet([get_dummy_unet(seed) for seed in (1, 2, 3)], weights=[0.2, 0.5, 0.3])
    pipe = ScoreFusionPipeline(**{**components, "unet": fused})
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

    prompt, generator = "a photo of a cat", torch.Generator().manual_seed(0)
    images = pipe(prompt, num_inference_steps=10, generator=generator).images
    for weights in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]):
        images += pipe(prompt, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                       fusion_weights=weights).images  # fmt: skip

    targets = [np.random.default_rng(i).random((32, 32, 3)).astype(np.float32) for i in range(8)]
    result = pipe.fit_weights(targets, "a photo of a cat", generator=torch.Generator().manual_seed(0))
    print(f"fitted weights {result.weights.tolist()} ± {result.standard_errors.tolist()}, loss {result.loss:.4f}, "
          f"{result.num_forward_passes} member forwards")  # fmt: skip

    os.makedirs(args.out, exist_ok=True)
    pipe.save_pretrained(os.path.join(args.out, "pipeline"))
    reloaded = DiffusionPipeline.from_pretrained(os.path.join(args.out, "pipeline"))
    print(f"reloaded {type(reloaded).__name__} with weights {reloaded.unet.fusion_weights.tolist()}")
    grid = make_image_grid(images, rows=1, cols=len(images))
    grid.save(os.path.join(args.out, "grid.png"))
    print(f"fused, then each member alone: {os.path.join(args.out, 'grid.png')}")


if __name__ == "__main__":
    main()
