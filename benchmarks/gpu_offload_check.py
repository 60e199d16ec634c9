"""Peak GPU memory and step time of a FusedUNet of k SDXL-sized UNets: all on the GPU, model / sequential CPU offload,
group offload.

Members are built from the SDXL base UNet config with random weights (nothing is downloaded) in float16. Each mode
gets a fresh fusion (same seeds, same weights) and runs `--steps` timed forwards of one denoising step: batch 2 (as with
classifier-free guidance), 1024 x 1024 images (128 x 128 latents), 77 text tokens. Every mode's output is compared with
the all-on-GPU output. A last check puts member 0 on the GPU and member 1 on the CPU (tiny float32 members) and
compares with both on the GPU: FusedUNet moves inputs to each member's device and outputs back. A mode that raises is
recorded with its error and the others still run.

Usage (CUDA machine; a few minutes on one H100 with k = 2, estimated: not yet run on a GPU):
    python benchmarks/gpu_offload_check.py [--num-members 2] [--steps 3]
Without a GPU, `--dry-run` runs the same code with tiny members on the CPU (offload device = onload device = CPU).
Prints a table and writes `benchmarks/results/gpu_offload_check.json` (or `--output`).
"""

import argparse
import gc
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import diffusers
import torch
from accelerate import cpu_offload, cpu_offload_with_hook
from diffusers import UNet2DConditionModel

from diffusers_scorefusion import FusedUNet
from diffusers_scorefusion.testing.unet_parts import SDXL_BASE_UNET_CONFIG

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_offload_check.json")
SDXL_UNET_CONFIG = SDXL_BASE_UNET_CONFIG  # stable-diffusion-xl-base-1.0's UNet (random weights)
TINY_XL_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=64,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
    norm_num_groups=32,
)  # fmt: skip


def build_fusion(config: Dict[str, Any], num_members: int, dtype: torch.dtype, init_device: torch.device) -> FusedUNet:
    """k members with random weights (seeds 0..k-1), initialised on `init_device` (fast on a GPU), left there."""
    members = []
    for seed in range(num_members):
        torch.manual_seed(seed)
        with torch.device(init_device):
            members.append(UNet2DConditionModel(**config).to(dtype).eval())
    return FusedUNet(members)


def make_inputs(config: Dict[str, Any], dtype: torch.dtype, device: torch.device, batch: int = 2) -> Dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    size = config["sample_size"]
    pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    inputs = dict(
        sample=torch.randn(batch, 4, size, size, generator=gen), timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(batch, 77, config["cross_attention_dim"], generator=gen),
        added_cond_kwargs={"text_embeds": torch.randn(batch, pooled_dim, generator=gen),
                           "time_ids": torch.tensor([[size * 8.0, size * 8, 0, 0, size * 8, size * 8]] * batch)},
    )  # fmt: skip
    return {key: _to(value, device, dtype) for key, value in inputs.items()}


def _to(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(value, dict):
        return {key: _to(item, device, dtype) for key, item in value.items()}
    return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fused: FusedUNet, inputs: Dict[str, Any], steps: int, device: torch.device) -> Dict[str, Any]:
    """First-call time (includes any onloading), median of `steps` further calls, peak GPU memory, the output."""
    gc.collect()  # earlier modes' fusions (hooks hold reference cycles)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.no_grad():
        for _ in range(steps + 1):
            _sync(device)
            start = time.perf_counter()
            output = fused(**inputs, return_dict=False)[0]
            _sync(device)
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"first_call_s": times[0], "step_s": statistics.median(times[1:]), "peak_memory_gib": peak,
            "output": output.float().cpu()}  # fmt: skip


def run_modes(config: Dict[str, Any], num_members: int, steps: int, device: torch.device, dtype: torch.dtype,
              use_stream: bool) -> Dict[str, Dict[str, Any]]:  # fmt: skip
    """Each offloading mode on a fresh fusion with the same weights."""
    offload = torch.device("cpu")

    def all_on_device(fused: FusedUNet) -> None:
        pass

    def model_cpu_offload(fused: FusedUNet) -> None:  # what pipe.enable_model_cpu_offload() does to the unet
        fused.to(offload)
        cpu_offload_with_hook(fused, execution_device=device)

    def sequential_cpu_offload(fused: FusedUNet) -> None:  # what pipe.enable_sequential_cpu_offload() does to the unet
        fused.to(offload)
        cpu_offload(fused, device, offload_buffers=len(fused._parameters) > 0)

    def group_offload_per_member(fused: FusedUNet) -> None:  # FusedUNet applies it to each member's blocks
        fused.to(offload)
        fused.enable_group_offload(device, offload_device=offload, offload_type="block_level", num_blocks_per_group=1,
                                   use_stream=use_stream)  # fmt: skip

    def leaf_group_offload_per_member(fused: FusedUNet) -> None:
        fused.to(offload)
        fused.enable_group_offload(device, offload_device=offload, offload_type="leaf_level", use_stream=use_stream)

    modes: Dict[str, Callable[[FusedUNet], None]] = {
        "all_on_device": all_on_device, "model_cpu_offload": model_cpu_offload,
        "sequential_cpu_offload": sequential_cpu_offload,
        "group_offload_per_member": group_offload_per_member,
        "leaf_group_offload_per_member": leaf_group_offload_per_member,
    }  # fmt: skip
    inputs = make_inputs(config, dtype, device)
    results, reference = {}, None
    for name, prepare in modes.items():
        fused = build_fusion(config, num_members, dtype, init_device=device)
        try:
            prepare(fused)
            result = measure(fused, inputs, steps, device)
        except Exception as error:  # noqa: BLE001 (recorded: one broken mode must not hide the others' figures)
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            print(f"{name:36s} FAILED: {results[name]['error'][:200]}")
            del fused
            continue
        output = result.pop("output")
        reference = output if reference is None else reference
        result["max_abs_diff_vs_all_on_device"] = float((output - reference).abs().max())
        result["finite"] = bool(torch.isfinite(output).all())
        results[name] = result
        print(f"{name:36s} peak {_gib(result['peak_memory_gib'])}  first {result['first_call_s']:7.3f} s  "
              f"step {result['step_s']:7.3f} s  max|diff| {result['max_abs_diff_vs_all_on_device']:.3g}")
        del fused
    return results


def cross_device_check(device: torch.device) -> Optional[Dict[str, Any]]:
    """Member 1 on the CPU, member 0 and the inputs on `device`: equals both members on `device` (float32)."""
    if device.type != "cuda":
        return None
    fused = build_fusion(TINY_XL_UNET_CONFIG, 2, torch.float32, init_device=torch.device("cpu"))
    inputs = make_inputs(TINY_XL_UNET_CONFIG, torch.float32, device)
    with torch.no_grad():
        expected = fused.to(device)(**inputs).sample
        fused.unets[1].to("cpu")
        actual = fused(**inputs).sample
    result = {"output_device": str(actual.device), "max_abs_diff": float((actual - expected).abs().max())}
    print(f"cross-device check: output on {result['output_device']}, max|diff| {result['max_abs_diff']:.3g}")
    return result


def _gib(value: Optional[float]) -> str:
    return "   n/a   " if value is None else f"{value:6.2f} GiB"


def parameter_count(config: Dict[str, Any]) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in UNet2DConditionModel(**config).parameters())


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-members", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed calls after the first")
    parser.add_argument("--dry-run", action="store_true", help="tiny members on the CPU (no GPU needed)")
    parser.add_argument("--no-stream", action="store_true", help="group offloading without CUDA-stream prefetching")
    parser.add_argument("--output", default=RESULTS_PATH)
    args = parser.parse_args(argv)
    if args.num_members < 1 or args.steps < 1:
        parser.error(f"--num-members and --steps must be >= 1, got {args.num_members} and {args.steps}")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --dry-run for a tiny CPU run")
    device = torch.device("cpu") if args.dry_run else torch.device("cuda")
    config, dtype = (TINY_XL_UNET_CONFIG, torch.float32) if args.dry_run else (SDXL_UNET_CONFIG, torch.float16)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "dry_run": args.dry_run,
        "num_members": args.num_members, "dtype": str(dtype), "parameters_per_member": parameter_count(config),
        "batch": 2, "latent_size": config["sample_size"], "steps": args.steps,
    }  # fmt: skip
    billions = report["parameters_per_member"] / 1e9
    print(f"{args.num_members} members of {billions:.3f} B parameters on {report['device']}")
    use_stream = not args.no_stream and device.type == "cuda"
    report["modes"] = run_modes(config, args.num_members, args.steps, device, dtype, use_stream=use_stream)
    report["cross_device_check"] = cross_device_check(device)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(report, file, indent=2)
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
