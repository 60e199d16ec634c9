"""`scorefusion` command line: fit fusion weights to a folder of captioned images, and sample from a saved fusion.

    scorefusion fit --base BASE --unet A --unet B --data DIR --out FUSION_DIR               # Stable Diffusion 1/2, XL
    scorefusion fit --base BASE --transformer A --transformer B --data DIR --out FUSION_DIR # SD3, Flux
    scorefusion sample --fusion FUSION_DIR --prompt "..." --out samples/            # or --prompts FILE (one a line)
    accelerate launch -m diffusers_scorefusion.cli sample ...                        # the images split across GPUs
    scorefusion bake --fusion FUSION_DIR --out DIR --method merge   # one model, one forward per step (cli_bake.py)

The kind of base (and so the fusion pipeline and whether members are `--unet`s or `--transformer`s) is read from the
`_class_name` of the base's `model_index.json` (`BASE_PIPELINES`; other pipelines with a `unet` are taken as Stable
Diffusion). `sample` reads a saved fusion pipeline's `model_index.json` the same way.

A data folder holds images (`.png`, `.jpg`, `.jpeg`, `.webp`, `.bmp`) with their captions, either as
`metadata.jsonl` (one JSON object per line with `file_name` and `text`, as Hugging Face `imagefolder`) or, when
there is no `metadata.jsonl`, as pairs `name.png` + `name.txt`. Every file must lie inside the data folder. Every
failure exits with status 2 and one sentence naming the file or flag, and writes nothing; `--out` follows the saving
rules of `pipe.save_pretrained` (other files in the folder stay) and is checked before the fit runs.
"""

import argparse
import json
import math
import os
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import PIL.Image
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The fusion pipeline for each base pipeline (`_class_name` of its model_index.json); a saved fusion names its own.
BASE_PIPELINES = {
    "StableDiffusionPipeline": "ScoreFusionPipeline",
    "StableDiffusionXLPipeline": "ScoreFusionXLPipeline",
    "StableDiffusion3Pipeline": "ScoreFusionSD3Pipeline",
    "FluxPipeline": "ScoreFusionFluxPipeline",
}


def _inside(data_dir: str, name: Any, where: str) -> str:
    """The path of `name` in `data_dir`, refusing absolute names and names (or links) that lead outside it."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or name.startswith("~"):
        raise ValueError(f"{where}: file_name must be a relative path inside the data folder, got {name!r}")
    root = os.path.realpath(data_dir)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root or path == root:
        raise ValueError(f"{where}: {name!r} lies outside the data folder {data_dir!r}; data files must lie inside it")
    return path


def _read_metadata(data_dir: str, metadata: str) -> Dict[str, str]:
    """`{file_name: caption}` from `metadata.jsonl`, refusing malformed lines, names outside the folder, duplicates."""
    captions: Dict[str, str] = {}
    lines: Dict[str, int] = {}
    with open(metadata, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name, caption = entry["file_name"], entry["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{metadata} line {number} must be a JSON object with file_name and text, got {line.strip()!r}"
                ) from error
            where = f"{metadata} line {number}"
            _inside(data_dir, name, where)
            if not isinstance(caption, str):
                raise ValueError(f"{where}: the caption of {name!r} must be a string, got {caption!r}")
            key = os.path.normpath(name)
            if key in lines:
                raise ValueError(
                    f"{where}: {name!r} is listed twice (also on line {lines[key]}); give one caption per image"
                )
            captions[key], lines[key] = caption, number
    return captions


def _open_image(path: str, name: str) -> PIL.Image.Image:
    """An RGB copy of an image file; unreadable files and decompression bombs are refused with the file's name."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as image:
                return image.convert("RGB")
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as error:
        raise ValueError(f"image {name!r} is refused: {error}") from error
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises these for unreadable or truncated files
        raise ValueError(f"image {name!r} could not be read: {error}") from error


def read_image_folder(data_dir: Union[str, os.PathLike]) -> Tuple[List[PIL.Image.Image], List[str], List[str]]:
    """Images (RGB), captions and file names of a data folder, sorted by file name (see the module docstring).

    Every file must lie inside the folder (names and links that lead outside are refused), and every image is read
    before anything else happens.
    """
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data folder {data_dir!r} does not exist")
    metadata = os.path.join(data_dir, "metadata.jsonl")
    if os.path.isfile(metadata):
        captions = _read_metadata(data_dir, metadata)
    else:
        captions = {}
        for name in sorted(os.listdir(data_dir)):
            stem, extension = os.path.splitext(name)
            if extension.lower() not in IMAGE_EXTENSIONS:
                continue
            caption_path = os.path.join(data_dir, stem + ".txt")
            if not os.path.isfile(caption_path):
                raise ValueError(
                    f"image {name!r} in {data_dir!r} has no caption file {stem + '.txt'!r} "
                    "and the folder has no metadata.jsonl"
                )
            _inside(data_dir, stem + ".txt", f"caption of {name!r}")
            with open(caption_path, encoding="utf-8") as file:
                captions[name] = file.read().strip()
    if not captions:
        raise ValueError(f"data folder {data_dir!r} holds no captioned images ({', '.join(IMAGE_EXTENSIONS)})")
    names = sorted(captions)
    images = []
    for name in names:
        path = _inside(data_dir, name, f"image {name!r}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"metadata.jsonl names {name!r}, which is not in {data_dir!r}")
        images.append(_open_image(path, name))
    return images, [captions[name] for name in names], names


def _timestep_range(value: str) -> Union[str, Tuple[int, int], Tuple[float, float]]:
    """`full`, `small_t`, or two timesteps: ints (UNet timesteps, SD3's sigma x 1000) or numbers (Flux's sigma)."""
    if value in ("full", "small_t"):
        return value
    parts = value.split(",")
    try:
        if len(parts) != 2:
            raise ValueError(value)
        try:
            return int(parts[0]), int(parts[1])
        except ValueError:
            return float(parts[0]), float(parts[1])
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected full, small_t or T_MIN,T_MAX, got {value!r}") from error


def _num_timestep_bins(value: str) -> Union[int, str]:
    """A positive int, or `auto` (chosen by cross-validation)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a positive int or auto, got {value!r}") from error


def fusion_pipeline_class(path: str, flag: str) -> Tuple[type, Dict[str, Any]]:
    """The ScoreFusion pipeline class for a base model or a saved fusion pipeline (`path`, a folder or Hub id, given
    as `flag`), from the `_class_name` of its `model_index.json`, and that index."""
    from diffusers import DiffusionPipeline

    from . import pipelines

    try:
        index = DiffusionPipeline.load_config(path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{flag} {path!r} is not a Diffusers pipeline (no readable model_index.json): {error}"
        ) from error
    name = index.get("_class_name")
    fusion_name = name if name in BASE_PIPELINES.values() else BASE_PIPELINES.get(name)
    if fusion_name is None and isinstance(index.get("unet"), list):
        fusion_name = "ScoreFusionPipeline"  # other Stable Diffusion pipelines, read as before
    if fusion_name is None:
        raise ValueError(
            f"{flag} {path!r} is a {name!r}; scorefusion takes {', '.join(BASE_PIPELINES)} (or another pipeline with "
            "a unet) and the ScoreFusion pipelines saved from them"
        )
    return getattr(pipelines, fusion_name), index


def _members(args: argparse.Namespace) -> List[str]:
    """The members given with `--unet` or `--transformer` (one of the two, at least one member)."""
    if bool(args.unet) == bool(args.transformer):
        raise ValueError("give the members with --unet (Stable Diffusion 1/2, XL) or --transformer (SD3, Flux), not "
                         f"{'both' if args.unet else 'neither'}")  # fmt: skip
    return list(args.unet or args.transformer)


def _check_member_flag(args: argparse.Namespace, pipeline_class: type, base_class: Any) -> None:
    """Refuses members given with the flag of the other kind of base."""
    expected = f"--{pipeline_class.fused_component}"
    given = "--unet" if args.unet else "--transformer"
    if given != expected:
        kind = "UNet" if expected == "--unet" else "transformer"
        raise ValueError(
            f"--base {args.base!r} is a {base_class}, whose members are {kind}s: give them with {expected}, not {given}"
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scorefusion", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    fit = commands.add_parser("fit", help="fit the fusion weights to captioned images and save the fused pipeline")
    fit.add_argument(
        "--base", required=True, help="base pipeline (folder or Hub id: SD 1/2, SDXL, SD3, Flux): VAE, text encoders, "
        "scheduler"
    )  # fmt: skip
    fit.add_argument("--unet", action="append", help="a member UNet or pipeline (folder or Hub id); repeat")
    fit.add_argument("--transformer", action="append",
                     help="a member transformer or pipeline (folder or Hub id) of an SD3 or Flux base; repeat")
    fit.add_argument("--data", required=True, help="folder of images with captions")
    fit.add_argument("--out", required=True, help="folder to save the fitted pipeline to")
    fit.add_argument("--method", choices=("exact", "sgd"), default="exact")
    fit.add_argument("--num-noise-draws", type=int, default=8)
    fit.add_argument("--timestep-range", type=_timestep_range, default="full",
                     help="full, small_t or T_MIN,T_MAX in the model's timestep units")  # fmt: skip
    fit.add_argument("--weighting", choices=("uniform", "snr", "min_snr"), default="uniform")
    fit.add_argument("--timestep-density", choices=("uniform", "logit_normal"),
                     help="SD3, Flux: how timesteps are drawn (default: as the model was trained)")  # fmt: skip
    fit.add_argument("--guidance-scale", type=float,
                     help="Flux: the (distilled) guidance you sample with; default 3.5, as FluxPipeline")  # fmt: skip
    fit.add_argument("--num-timestep-bins", type=_num_timestep_bins, default=1,
                     help="weights per timestep bin; auto: bins and smoothness chosen by cross-validation")  # fmt: skip
    fit.add_argument("--batch-size", type=int, default=16)
    fit.add_argument("--num-bootstrap", type=int, default=200)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--height", type=int, help="resize the images to this height first")
    fit.add_argument("--width", type=int, help="resize the images to this width first")
    fit.add_argument("--device", default=device)
    fit.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    fit.add_argument("--no-progress", action="store_true", help="hide progress bars")

    sample = commands.add_parser("sample", help="generate images from a saved fusion")
    sample.add_argument("--fusion", required=True, help="a pipeline folder saved by `scorefusion fit`")
    prompts = sample.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt")
    prompts.add_argument("--prompts", metavar="FILE", help="a UTF-8 text file with one prompt per line")
    sample.add_argument("--negative-prompt")
    sample.add_argument("--out", required=True, help="folder for the PNGs, metadata.jsonl and grid.png")
    sample.add_argument("--num-images", type=int, default=4, help="images per prompt")
    sample.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    sample.add_argument("--num-inference-steps", type=int, default=25)
    sample.add_argument("--guidance-scale", type=float, help="default: the pipeline's own")
    sample.add_argument("--height", type=int)
    sample.add_argument("--width", type=int)
    sample.add_argument("--seed", type=int, default=0, help="image i (over all prompts) uses the seed SEED + i")
    sample.add_argument("--device", help="default: this process's device (accelerate's PartialState)")
    sample.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    sample.add_argument("--no-progress", action="store_true", help="hide progress bars")

    from .cli_bake import add_bake_parser

    add_bake_parser(commands, device)
    return parser


def _dtype_kwargs(dtype: str) -> dict:
    """`torch_dtype=` for `from_pretrained` (members read the same key), left out for the float32 default."""
    return {} if dtype == "float32" else {"torch_dtype": DTYPES[dtype]}


def _check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available on this machine")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device!r}: MPS is not available on this machine")


def _check_common(args: argparse.Namespace) -> None:
    """Checks of the flags both commands share, before anything is loaded or written."""
    _check_device(args.device)
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and (value <= 0 or value % 8):
            raise ValueError(f"--{flag} must be a positive multiple of 8, got {value}")


def _fit(args: argparse.Namespace) -> None:
    from .loaders.atomic_save import check_save_target
    from .loaders.pipeline_loading import MODEL_INDEX, PIPELINE_SAVE

    _check_common(args)
    members = _members(args)
    out = os.path.abspath(args.out)
    check_save_target(out, PIPELINE_SAVE, [MODEL_INDEX])  # refused before the fit, not after
    images, prompts, names = read_image_folder(args.data)
    print(f"{len(images)} target images from {args.data}", file=sys.stderr)
    pipeline_class, index = fusion_pipeline_class(args.base, "--base")
    _check_member_flag(args, pipeline_class, index.get("_class_name"))
    flux = pipeline_class.__name__ == "ScoreFusionFluxPipeline"
    if args.guidance_scale is not None and not flux:
        raise ValueError(f"--guidance-scale applies to Flux bases (the guidance they sample with); {args.base!r} is a "
                         f"{index.get('_class_name')}")  # fmt: skip
    components = [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
                  and value[0] is not None]  # fmt: skip
    check_save_target(out, PIPELINE_SAVE, [MODEL_INDEX, *components])
    pipe = pipeline_class.from_pretrained(args.base, **{f"{pipeline_class.fused_component}s": members},
                                          **_dtype_kwargs(args.dtype)).to(args.device)  # fmt: skip
    pipe.set_progress_bar_config(disable=args.no_progress)
    options = {key: value for key, value in (("timestep_density", args.timestep_density),
                                             ("guidance_scale", args.guidance_scale)) if value is not None}  # fmt: skip
    result = pipe.fit_weights(
        images, prompts, height=args.height, width=args.width, method=args.method, num_noise_draws=args.num_noise_draws,
        timestep_range=args.timestep_range, weighting=args.weighting, num_timestep_bins=args.num_timestep_bins,
        batch_size=args.batch_size, num_bootstrap=args.num_bootstrap, progress_bar=not args.no_progress,
        generator=torch.Generator().manual_seed(args.seed), set_weights=False, **options,
    )  # fmt: skip
    provenance = dict(result.provenance, data_dir=os.path.abspath(args.data), data_files=names, members=members,
                      base=args.base)  # fmt: skip
    pipe.fusion_model.set_weights(result.weights, timestep_bin_edges=result.timestep_bin_edges, provenance=provenance)
    pipe.save_pretrained(args.out)
    weights = result.weights.flatten().tolist()
    errors = None if result.standard_errors is None else result.standard_errors.flatten().tolist()
    shown = [f"{w:.4f}" if errors is None else f"{w:.4f} ± {e:.4f}" for w, e in zip(weights, errors or weights)]
    print(f"weights: {', '.join(shown)}; loss {result.loss:.6f} (members alone: "
          f"{', '.join(f'{v:.6f}' for v in result.per_model_loss.tolist())}); saved to {args.out}")  # fmt: skip
    if result.timestep_bin_selection is not None:
        choice = result.timestep_bin_selection
        print(f"auto bins: {choice['num_timestep_bins']} (relative smoothness {choice['relative_smoothness']:g}), "
              f"by {choice['num_folds']}-fold cross-validation")  # fmt: skip


def _sample(args: argparse.Namespace) -> None:
    from .pipelines import sampling_utils as sampling

    if args.device is not None:
        _check_device(args.device)
    state, args.device = sampling.process_state(args.device)  # one process, or one of `accelerate launch`'s
    _check_common(args)
    for flag in ("num_images", "batch_size", "num_inference_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise ValueError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    if os.path.lexists(args.out) and not os.path.isdir(args.out):
        raise FileExistsError(f"--out {args.out!r} is a file; expected a folder for the PNGs")
    prompts = sampling.read_prompts_file(args.prompts) if args.prompts is not None else [args.prompt]
    jobs = sampling.sample_jobs(prompts, args.num_images, args.seed)
    pipeline_class, _ = fusion_pipeline_class(args.fusion, "--fusion")
    pipe = pipeline_class.from_pretrained(args.fusion, **_dtype_kwargs(args.dtype)).to(args.device)
    # one bar per pipeline call for a single batch; over many, one bar over the images (main process only)
    pipe.set_progress_bar_config(disable=args.no_progress or not state.is_main_process or len(jobs) > args.batch_size)
    guidance = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    results = sampling.sample_across_processes(
        pipe, prompts, args.num_images, args.seed, args.batch_size, state, progress_bar=not args.no_progress,
        negative_prompt=args.negative_prompt, num_inference_steps=args.num_inference_steps, height=args.height,
        width=args.width, **guidance,
    )  # fmt: skip
    names = sampling.save_samples(args.out, jobs, results, state)
    if state.num_processes > 1:
        print(f"process {state.process_index} of {state.num_processes}: {len(results)} images", file=sys.stderr)
    if state.is_main_process:
        processes = f" by {state.num_processes} processes" if state.num_processes > 1 else ""
        print(f"{len(names)} images ({len(prompts)} prompts x {args.num_images}), metadata.jsonl and grid.png written "
              f"to {args.out}{processes}", file=sys.stderr)  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `scorefusion` console script; returns the exit status (2 for bad input)."""
    args = _parser().parse_args(argv)
    try:
        from .cli_bake import bake

        {"fit": _fit, "sample": _sample, "bake": bake}[args.command](args)
    except (ValueError, TypeError, OSError) as error:
        print(f"scorefusion {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001  (a sentence, never a traceback; the type says where it came from)
        print(f"scorefusion {args.command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
