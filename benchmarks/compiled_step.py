"""Times one denoising step of a 2-member FusedUNet with its members compiled (`fused.compile()`, inductor) against
the same fusion uncompiled (CPU, float32, batch 2, the mid-size UNet of `fused_step.py`).

Usage: `python benchmarks/compiled_step.py [--repeats 7] [--threads 2] [--mode default]`. Prints the compile time,
both step times and their ratio, checks that the compiled output matches, and writes
`benchmarks/results/compiled_step.json`.
"""

import argparse
import copy
import os
import platform
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see fused_step.py

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fused_step import BATCH_SIZE, SEQUENCE_LENGTH, UNET_CONFIG, make_unet, paired_timings, write_json_atomically  # noqa: E402

from diffusers_scorefusion import FusedUNet  # noqa: E402

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compiled_step.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", default="default", help="torch.compile mode")
    parser.add_argument("--output", default=RESULTS_PATH)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    members = [make_unet(seed) for seed in range(2)]
    eager = FusedUNet(members, weights=[0.3, 0.7])
    compiled = FusedUNet(copy.deepcopy(members), weights=[0.3, 0.7])
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(BATCH_SIZE, 4, 32, 32, generator=generator)  # (B, C, H, W)
    hidden = torch.randn(BATCH_SIZE, SEQUENCE_LENGTH, 64, generator=generator)  # (B, L, D)
    timestep = torch.tensor(500)

    def step(fused: FusedUNet, weights=None):
        with fused.override_weights(weights):
            return fused(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]

    with torch.no_grad():
        compiled.compile(mode=args.mode)
        start = time.perf_counter()
        first = step(compiled)  # compiles both members
        compile_s = time.perf_counter() - start
        max_difference = (first - step(eager)).abs().max().item()
        start = time.perf_counter()
        step(compiled, [0.6, 0.4])  # other weights: the fusion's loop is eager, the members are not recompiled
        reweighted_s = time.perf_counter() - start
        timing = paired_timings(lambda: step(compiled), lambda: step(eager), args.warmup, args.repeats)

    print(f"2-member FusedUNet step, batch {BATCH_SIZE}, float32, CPU ({args.threads} threads), compile mode "
          f"{args.mode!r}, {args.repeats} paired rounds")  # fmt: skip
    print(f"first compiled call (compilation) {compile_s:.1f} s; next call with other weights {reweighted_s:.2f} s")
    print(f"compiled {1e3 * timing['fused_s']:.1f} ms vs eager {1e3 * timing['baseline_s']:.1f} ms: ratio "
          f"{timing['ratio']:.3f} (cpu ratio {timing['cpu_ratio']:.3f}); max |compiled - eager| {max_difference:.2e}")
    write_json_atomically(
        {"benchmark": "compiled_step", "unet_config": {k: list(v) if isinstance(v, tuple) else v
                                                       for k, v in UNET_CONFIG.items()},
         "num_members": 2, "batch_size": BATCH_SIZE, "mode": args.mode, "threads": args.threads,
         "compile_s": compile_s, "reweighted_call_s": reweighted_s, "max_abs_difference": max_difference,
         "torch": torch.__version__, "platform": platform.platform(), "load_average": os.getloadavg(),
         "compiled_vs_eager": timing},  # fmt: skip
        args.output,
    )
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; wrote {args.output}")


if __name__ == "__main__":
    main()
