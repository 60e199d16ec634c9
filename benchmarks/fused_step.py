"""Times one denoising step of a FusedUNet and of a FusedTransformer against separate single-member forwards (CPU,
float32, batch 2).

Usage: `python benchmarks/fused_step.py [--repeats 7] [--threads 2] [--models unet transformer]`. Prints a table and
writes `benchmarks/results/fused_step.json`. Targets: fused / (sum of singles) <= 1.05 and a one-hot 4-member fusion
<= 1.05 x one single forward. The transformer is Flux-shaped (double- and single-stream blocks, rotary ids, packed
latents) at a mid size comparable to the UNet's.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Callable, Dict, List

# On a shared CPU, OpenMP threads that spin while waiting make 2-thread forwards up to 100x slower; passive waiting
# keeps the timings about the model. Set before torch is imported; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from diffusers import FluxTransformer2DModel, UNet2DConditionModel  # noqa: E402

from diffusers_scorefusion import FusedTransformer, FusedUNet  # noqa: E402

BATCH_SIZE = 2
SEQUENCE_LENGTH = 77
UNET_CONFIG = dict(
    block_out_channels=(64, 128, 256), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
    attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
# Flux-shaped: 2 double-stream and 4 single-stream blocks of width 256 (4 heads of 64); 32 x 32 latents of 16 channels
# packed into 256 tokens of 64 channels; 77 text tokens.
TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
    joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=False, axes_dims_rope=(8, 28, 28),
)  # fmt: skip
IMAGE_TOKENS = 256
RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fused_step.json")


def make_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG).eval()


def make_transformer(seed: int) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG).eval()


def unet_call(generator: torch.Generator) -> Callable[[torch.nn.Module], Callable[[], object]]:
    """One SD-style UNet step: latents 4 x 32 x 32, 77 text tokens."""
    sample = torch.randn(BATCH_SIZE, 4, 32, 32, generator=generator)  # (B, C, H, W)
    encoder_hidden_states = torch.randn(BATCH_SIZE, SEQUENCE_LENGTH, 64, generator=generator)  # (B, L, D)
    timestep = torch.tensor(500)
    return lambda model: lambda: model(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)


def transformer_call(generator: torch.Generator) -> Callable[[torch.nn.Module], Callable[[], object]]:
    """One Flux-style step, with the keyword arguments `FluxPipeline` passes."""
    side = int(IMAGE_TOKENS**0.5)
    img_ids = torch.zeros(IMAGE_TOKENS, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)
    kwargs = dict(
        hidden_states=torch.randn(BATCH_SIZE, IMAGE_TOKENS, 64, generator=generator),  # (B, L_img, C)
        encoder_hidden_states=torch.randn(BATCH_SIZE, SEQUENCE_LENGTH, 256, generator=generator),  # (B, L_txt, D)
        pooled_projections=torch.randn(BATCH_SIZE, 128, generator=generator), timestep=torch.full((BATCH_SIZE,), 0.5),
        img_ids=img_ids, txt_ids=torch.zeros(SEQUENCE_LENGTH, 3), joint_attention_kwargs={}, return_dict=False,
    )  # fmt: skip
    return lambda model: lambda: model(**kwargs)


def model_rows(
    name: str, members: List[torch.nn.Module], fusion_class: type, single: Callable, warmup: int, repeats: int
) -> List[Dict]:
    """Rows for k = 1, 2, 4 uniform fusions (vs k separate forwards) and a one-hot 4-member fusion (vs one forward)."""
    rows = []
    for k in (1, 2, 4):
        timing = paired_timings(single(fusion_class(members[:k])), lambda k=k: [single(m)() for m in members[:k]],
                                warmup, repeats)  # fmt: skip
        rows.append({"model": name, "case": f"k={k} uniform", "k": k, "baseline": f"{k} separate forwards",
                     "target": 1.05, **timing})  # fmt: skip
    one_hot = fusion_class(members, weights=[1.0, 0.0, 0.0, 0.0])
    timing = paired_timings(single(one_hot), single(members[0]), warmup, repeats)
    rows.append({"model": name, "case": "k=4 weights [1, 0, 0, 0]", "k": 4, "baseline": "1 single forward",
                 "target": 1.05, **timing})  # fmt: skip
    return rows


def paired_timings(fused: Callable[[], object], baseline: Callable[[], object], warmup: int, repeats: int) -> Dict:
    """Times `fused` and `baseline` alternately (order flipped each round) so that load drift on a shared CPU hits
    both alike. Wall time and process CPU time (all threads) per call; the CPU time is the steadier figure when other
    processes share the cores. Ratios are medians of the per-round ratios."""
    for _ in range(warmup):
        fused(), baseline()
    times = {"fused": [], "baseline": []}
    cpu_times = {"fused": [], "baseline": []}
    for round_index in range(repeats):
        order = [("fused", fused), ("baseline", baseline)]
        for name, fn in order if round_index % 2 == 0 else order[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - wall)
            cpu_times[name].append(time.process_time() - cpu)
    ratios = [f / b for f, b in zip(times["fused"], times["baseline"])]
    cpu_ratios = [f / b for f, b in zip(cpu_times["fused"], cpu_times["baseline"])]
    return {"fused_s": statistics.median(times["fused"]), "baseline_s": statistics.median(times["baseline"]),
            "ratio": statistics.median(ratios), "fused_cpu_s": statistics.median(cpu_times["fused"]),
            "baseline_cpu_s": statistics.median(cpu_times["baseline"]), "cpu_ratio": statistics.median(cpu_ratios),
            "fused_all_s": times["fused"], "baseline_all_s": times["baseline"],
            "fused_all_cpu_s": cpu_times["fused"], "baseline_all_cpu_s": cpu_times["baseline"]}  # fmt: skip


def write_json_atomically(data: Dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, temp_path = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".fused_step.", suffix=".json")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(data, file, indent=2)
            file.write("\n")
        os.replace(temp_path, path)
    except BaseException:
        os.unlink(temp_path)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=RESULTS_PATH)
    parser.add_argument("--models", nargs="+", choices=("unet", "transformer"), default=["unet", "transformer"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows: List[Dict] = []
    parameters = {}
    with torch.no_grad():
        if "unet" in args.models:
            unets = [make_unet(seed) for seed in range(4)]
            parameters["unet"] = sum(p.numel() for p in unets[0].parameters())
            rows += model_rows("unet", unets, FusedUNet, unet_call(torch.Generator().manual_seed(0)), args.warmup,
                               args.repeats)  # fmt: skip
            del unets
        if "transformer" in args.models:
            transformers = [make_transformer(seed) for seed in range(4)]
            parameters["transformer"] = sum(p.numel() for p in transformers[0].parameters())
            call = transformer_call(torch.Generator().manual_seed(0))
            rows += model_rows("transformer", transformers, FusedTransformer, call, args.warmup, args.repeats)

    print(f"one denoising step, batch {BATCH_SIZE}, float32, CPU ({args.threads} threads), {args.repeats} paired "
          "rounds; medians; ratios = median of per-round ratios; cpu = process CPU time of all threads")  # fmt: skip
    print(f"{'model':<12}{'case':<26} {'baseline':>20} {'fused ms':>9} {'base ms':>8} {'ratio':>6} {'fused cpu':>9} "
          f"{'base cpu':>8} {'cpu ratio':>9}  target")  # fmt: skip
    for row in rows:
        verdict = "ok" if row["cpu_ratio"] <= row["target"] else "MISSED"
        print(f"{row['model']:<12}{row['case']:<26} {row['baseline']:>20} {1e3 * row['fused_s']:>9.1f} "
              f"{1e3 * row['baseline_s']:>8.1f} "
              f"{row['ratio']:>6.3f} {1e3 * row['fused_cpu_s']:>9.1f} {1e3 * row['baseline_cpu_s']:>8.1f} "
              f"{row['cpu_ratio']:>9.3f}  <= {row['target']} (cpu) {verdict}")  # fmt: skip
    write_json_atomically(
        {
            "benchmark": "fused_step",
            "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
            "transformer_config": {k: list(v) if isinstance(v, tuple) else v for k, v in TRANSFORMER_CONFIG.items()},
            "transformer_tokens": {"image": IMAGE_TOKENS, "text": SEQUENCE_LENGTH},
            "parameters_per_member": parameters,
            "batch_size": BATCH_SIZE, "dtype": "float32", "device": "cpu", "threads": args.threads,
            "repeats": args.repeats, "warmup": args.warmup, "torch": torch.__version__, "platform": platform.platform(),
            "load_average": os.getloadavg(), "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "rows": rows,
        },  # fmt: skip
        args.output,
    )  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; wrote {args.output}")


if __name__ == "__main__":
    main()
