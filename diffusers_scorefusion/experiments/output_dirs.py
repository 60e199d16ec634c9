"""Where the experiments write: an untracked folder by default, the committed `results/` only when asked.

A run writes `outputs/<name>/` (git-ignored), so running a demo never changes the checkout; `--update-results`
writes the committed `results/<name>/` instead (to refresh the published reports on purpose), and `--out DIR` any
folder. Trained models are cached in `outputs/<name>/cache` for the default and `--update-results` runs (so a
refresh reuses the models of an earlier run) and in `<DIR>/cache` for `--out DIR`; `--cache-dir` overrides both.
"""

import argparse
import os
from typing import Optional, Tuple

OUTPUTS = "outputs"  # untracked, git-ignored
RESULTS = "results"  # committed


def add_output_arguments(parser: argparse.ArgumentParser, name_help: str) -> None:
    """Adds `--out`, `--update-results`, `--cache-dir` and `--no-cache` to an experiment's parser."""
    parser.add_argument("--out", default=None,
                        help=f"output folder (default: {OUTPUTS}/{name_help}, untracked)")  # fmt: skip
    parser.add_argument("--update-results", action="store_true",
                        help=f"write the committed {RESULTS}/{name_help} instead (refresh the published report)")
    parser.add_argument("--cache-dir", default=None,
                        help=f"trained-model cache (default: {OUTPUTS}/{name_help}/cache, or <out>/cache with --out)")
    parser.add_argument("--no-cache", action="store_true", help="train everything, read and write no cache")


def output_dirs(args: argparse.Namespace, name: str) -> Tuple[str, Optional[str]]:
    """The output folder and the model cache (`None` with `--no-cache`) of an experiment run named `name`."""
    if args.out is not None and args.update_results:
        raise ValueError(
            f"--out {args.out!r} and --update-results both choose the output folder; give one of them"
        )
    default = os.path.join(OUTPUTS, name)
    if args.out is not None:
        out = args.out
    else:
        out = os.path.join(RESULTS, name) if args.update_results else default
    if args.no_cache:
        return out, None
    if args.cache_dir is not None:
        return out, args.cache_dir
    return out, os.path.join(args.out if args.out is not None else default, "cache")
