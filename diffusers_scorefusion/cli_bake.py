"""`scorefusion bake`: a saved fusion pipeline baked into one model that samples at the cost of one member forward.

    scorefusion bake --fusion FUSION_DIR --out DIR [--method merge|merge-refit|distill] [--rank R]
                     [--format diffusers|kohya] [--data DIR] [--row N]

A LoRA fusion (`FusedUNet.from_lora`, `FusedTransformer.from_lora`) becomes one LoRA file for its base
(`pytorch_lora_weights.safetensors`, or `lora_kohya.safetensors` with `--format kohya`); weights over timestep bins
become the k adapters plus `adapter_weight_schedule.json` (see `baking.schedule`). A fusion of full fine-tunes becomes
the stock pipeline (`StableDiffusionPipeline`, ...) with the merged model. `--method merge-refit` first refits the
weights for the merged model on `--data` (`fit_weights(..., target="merge")`); `--method distill` trains a student on
the fusion's predictions (`baking.distillation.distill`). `bake.json` records what was done. Bad input exits with
status 2 and one sentence, before anything is written.
"""

import argparse
import inspect
import json
import os
from typing import Any, Dict, List, Tuple

import torch

METHODS = ("merge", "merge-refit", "distill")


def add_bake_parser(commands: Any, device: str) -> None:
    """Adds the `bake` subcommand to the `scorefusion` parser."""
    bake = commands.add_parser("bake", help="bake a saved fusion into one model (one forward per sampling step)")
    bake.add_argument("--fusion", required=True, help="a pipeline folder saved by `scorefusion fit`")
    bake.add_argument("--out", required=True, help="folder for the baked LoRA or pipeline (other files stay)")
    bake.add_argument("--method", choices=METHODS, default="merge")
    bake.add_argument("--rank", type=int, help="LoRA fusions: truncate the merged LoRA to this rank by SVD")
    bake.add_argument("--format", choices=("diffusers", "kohya"), default="diffusers",
                      help="LoRA file format: Diffusers, or Kohya / A1111 keys (UNet LoRAs)")  # fmt: skip
    bake.add_argument("--data", help="merge-refit, distill: folder of images with captions")
    bake.add_argument("--row", type=int, help="weights over timestep bins: merge this bin's weights")
    bake.add_argument("--max-steps", type=int, help="distill: most training steps of the student (default 500)")
    bake.add_argument("--num-generated", type=int,
                      help="distill: samples the fusion generates for the regression set (default: as many as --data "
                           "has images)")  # fmt: skip
    bake.add_argument("--seed", type=int, default=0)
    bake.add_argument("--device", default=device)
    bake.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    bake.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _read_json(path: str, what: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"{what} {path!r} could not be read: {error}") from error


def _inspect_fusion(args: argparse.Namespace) -> Tuple[bool, bool, int, Dict[str, Any]]:
    """`(lora, table, num_members, model_index)` read from the saved fusion's JSON files only (no weights)."""
    from .cli import fusion_pipeline_class

    pipeline_class, index = fusion_pipeline_class(args.fusion, "--fusion")
    component = pipeline_class.fused_component
    config = _read_json(os.path.join(args.fusion, component, "config.json"), f"--fusion {component} config")
    if config.get("_class_name") not in ("FusedUNet", "FusedTransformer"):
        raise ValueError(f"--fusion {args.fusion!r} holds a {config.get('_class_name')!r} as {component}, not a fusion")
    lora, table = bool(config.get("lora_bases")), config.get("timestep_bin_edges") is not None
    return lora, table, int(config.get("num_members", 0)), index


def _check_flags(args: argparse.Namespace, lora: bool, table: bool) -> None:
    """Refuses flags that do not fit the method or the kind of fusion."""
    if args.method == "merge" and args.data is not None:
        raise ValueError("--data is read by --method merge-refit and distill; --method merge uses the fitted weights")
    if args.method != "merge" and args.data is None:
        raise ValueError(f"--method {args.method} needs --data (a folder of images with captions)")
    for flag, value, minimum in (("--max-steps", args.max_steps, 1), ("--num-generated", args.num_generated, 0)):
        if value is not None and args.method != "distill":
            raise ValueError(f"{flag} applies to --method distill, not to --method {args.method}")
        if value is not None and value < minimum:
            raise ValueError(f"{flag} must be >= {minimum}, got {value}")
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank must be >= 1, got {args.rank}")
    if args.row is not None and args.row < 0:
        raise ValueError(f"--row must be >= 0, got {args.row}")
    if not lora and (args.rank is not None and args.method != "distill"):
        raise ValueError("--rank applies to LoRA fusions (from_lora) and to distill; this fusion's members are full "
                         "models, merged parameter by parameter")  # fmt: skip
    if not lora and args.format == "kohya":
        raise ValueError("--format kohya writes LoRA files; this fusion's members are full models, saved as a "
                         "Diffusers pipeline")  # fmt: skip
    if table and args.row is None and not lora and args.method == "merge":
        raise ValueError("the fusion's weights are a table over timestep bins, which one merged model of full "
                         "fine-tunes cannot follow: pass --row N to merge bin N's weights")  # fmt: skip
    if table and args.row is None and lora and args.method == "merge" and (args.rank or args.format == "kohya"):
        raise ValueError("the fusion's weights are a table over timestep bins, baked as the k adapters plus a weight "
                         "schedule (Diffusers format, full rank): drop --rank and --format kohya, or pass --row N")


def _entries(args: argparse.Namespace, lora: bool, table: bool, num_members: int, index: Dict[str, Any]) -> List[str]:
    """The entries the bake will write into --out (checked before any work)."""
    from .baking.bake_saving import LORA_WEIGHT_NAME
    from .baking.kohya import KOHYA_WEIGHT_NAME
    from .baking.schedule import SCHEDULE_NAME

    if lora and args.method == "merge" and table and args.row is None:
        return [f"adapter_{i}" for i in range(num_members)] + [SCHEDULE_NAME]
    if lora:
        return [KOHYA_WEIGHT_NAME if args.format == "kohya" else LORA_WEIGHT_NAME]
    components = [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
                  and value[0] is not None]  # fmt: skip
    return ["model_index.json", *components]


def _check_available(method: str) -> None:
    """Refuses, before any work, a method whose implementation this installation lacks."""
    if method == "merge-refit":
        from .fitting import weight_fitting

        if "target" not in inspect.signature(weight_fitting.fit_weights).parameters:
            raise ValueError("--method merge-refit needs fit_weights(..., target='merge'), which this installation "
                             "of diffusers-scorefusion lacks")  # fmt: skip
    if method == "distill":
        try:
            from .baking.distillation import distill  # noqa: F401
        except ImportError as error:
            raise ValueError(f"--method distill needs diffusers_scorefusion.baking.distillation, which this "
                             f"installation lacks ({error})") from error  # fmt: skip


def _refit(pipe: Any, images: List[Any], prompts: List[str], args: argparse.Namespace) -> Tuple[Any, Dict]:
    result = pipe.fit_weights(images, prompts, target="merge", set_weights=False, progress_bar=not args.no_progress,
                              generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    return result.weights, {"method": "merge-refit", "provenance": getattr(result, "provenance", None)}


def _distill(pipe: Any, images: List[Any], prompts: List[str], args: argparse.Namespace, lora: bool) -> Any:
    from .baking.distillation import distill

    latents, prompt_embeds, computed = pipe._fitting_inputs(images, prompts, None, None, {})
    options = {name: value for name, value in (("rank", args.rank), ("max_steps", args.max_steps),
                                               ("num_generated", args.num_generated)) if value is not None}
    return distill(pipe.fusion_model, pipe.scheduler, latents, student="lora" if lora else "merged",
                   encoder_hidden_states=prompt_embeds, generator=torch.Generator().manual_seed(args.seed),
                   progress_bar=not args.no_progress, **computed, **options).model  # fmt: skip


def _save_distilled(model: Any, pipe: Any, args: argparse.Namespace, record: Dict[str, Any]) -> str:
    from .baking import save_merged_checkpoint, save_merged_lora
    from .baking.lora_merge import MergedLora, lora_config_for
    from .models.modeling_lora_member import lora_format

    if "distilled" not in getattr(model, "peft_config", {}):
        save_merged_checkpoint(model, args.out, pipeline=pipe, record=record)
        return "the stock pipeline with the distilled model"
    from peft.utils import get_peft_model_state_dict

    state_dict = get_peft_model_state_dict(model, adapter_name="distilled")
    rank = next(value.shape[0] for key, value in state_dict.items() if ".lora_A." in key)
    scaled = {}  # the adapter's scale folded into lora_B, so the file's config is rank = alpha
    scales = {name: float(module.scaling["distilled"]) for name, module in model.named_modules()
              if hasattr(module, "scaling") and "distilled" in module.scaling}  # fmt: skip
    for key, value in state_dict.items():
        module = key.rsplit(".lora_", 1)[0]
        scaled[key] = value * scales[module] if ".lora_B." in key else value
    merged = MergedLora(state_dict=scaled, lora_config=lora_config_for(scaled, rank), prefix=lora_format(model)[0],
                        weights=[], rank=rank, base_class=type(model).__name__, record=record)  # fmt: skip
    save_merged_lora(merged, args.out, format=args.format)
    return "one distilled LoRA"


def bake(args: argparse.Namespace) -> None:
    """Runs `scorefusion bake` (see the module docstring); every check comes before anything is written."""
    from . import baking
    from .baking.bake_saving import check_bake_target
    from .baking.lora_merge import fusion_weights_row
    from .cli import _check_device, _dtype_kwargs, fusion_pipeline_class, read_image_folder

    _check_device(args.device)
    lora, table, num_members, index = _inspect_fusion(args)
    _check_flags(args, lora, table)
    out = os.path.abspath(args.out)
    check_bake_target(out, _entries(args, lora, table, num_members, index))
    images, prompts = (read_image_folder(args.data)[:2]) if args.data is not None else (None, None)
    _check_available(args.method)
    pipeline_class, _ = fusion_pipeline_class(args.fusion, "--fusion")
    pipe = pipeline_class.from_pretrained(args.fusion, **_dtype_kwargs(args.dtype)).to(args.device)
    pipe.set_progress_bar_config(disable=args.no_progress)
    fused = pipe.fusion_model
    record: Dict[str, Any] = {"method": args.method, "fusion": os.path.abspath(args.fusion)}
    if args.method == "distill":
        what = _save_distilled(_distill(pipe, images, prompts, args, lora), pipe, args, record)
        print(f"baked {what} into {args.out}")
        return
    weights = None
    if args.method == "merge-refit":
        weights, extra = _refit(pipe, images, prompts, args)
        record.update(extra)
    if lora and table and args.row is None and weights is None:
        baking.save_lora_schedule(baking.bake_lora_schedule(fused), out)
        print(f"baked the {fused.config.num_members} adapters and their weight schedule into {args.out}")
        return
    if lora:
        merged = baking.merge_lora(fused, weights=weights, rank=args.rank, row=args.row)
        merged.record.update(record)
        baking.save_merged_lora(merged, out, format=args.format)
        errors = merged.relative_errors
        detail = "" if errors is None else f", largest relative error per layer {max(errors.values()):.4f}"
        print(f"baked one LoRA of rank {merged.rank} (weights {[round(w, 4) for w in merged.weights]}{detail}) "
              f"into {args.out}")  # fmt: skip
        return
    model = baking.merge_checkpoints(fused, weights=weights, row=args.row)
    record["weights"] = [float(w) for w in fusion_weights_row(fused, weights, args.row, lora=False)]
    baking.save_merged_checkpoint(model, out, pipeline=pipe, record=record)
    print(f"baked one {type(model).__name__} into the stock pipeline at {args.out}")
