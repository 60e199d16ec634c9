"""Saving and loading whole ScoreFusion pipelines: Diffusers' own folder layout, written crash-safe (`atomic_save`)."""

import contextlib
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from .atomic_save import SaveKind, atomic_save, check_save_target, reading, recover_legacy
from .fusion_config import CLASS_NAMES
from .integrity import needs_unpickling, unpickling_refused

MODEL_INDEX = "model_index.json"


def pipeline_entries(index: Dict[str, Any]) -> Optional[List[str]]:
    """The component folders of a fusion pipeline's `model_index.json` (`SaveKind.entries_of`); `None` for others.

    A fusion pipeline is one of this package's pipeline classes, or any pipeline with a `FusedUNet` or
    `FusedTransformer` component.
    """
    fused = any(isinstance(value, list) and len(value) == 2 and value[1] in CLASS_NAMES
                for name, value in index.items() if not name.startswith("_"))  # fmt: skip
    if not fused and not str(index.get("_class_name", "")).startswith("ScoreFusion"):
        return None
    components = [(name, value) for name, value in index.items() if not name.startswith("_")]
    return [name for name, value in components if isinstance(value, list) and len(value) == 2 and value[0] is not None]


PIPELINE_SAVE = SaveKind(description="ScoreFusion pipeline save", commit_file=MODEL_INDEX,
                         entries_of=pipeline_entries, keep_existing=("README.md",))  # fmt: skip


def save_pipeline(save: Callable[..., None], save_directory: str, components: Sequence[str], **kwargs: Any) -> None:
    """Runs Diffusers' `save_pretrained` (`save`) into a staging folder and moves the result into `save_directory`.

    `components` (the names of the components that will be saved) let a folder that cannot take the save be refused
    before anything is written. A Hub push keeps the folder's name as the default repo id.
    """
    save_directory = os.fspath(save_directory)
    if kwargs.get("push_to_hub"):
        kwargs.setdefault("repo_id", os.path.basename(os.path.normpath(save_directory)))
    check_save_target(save_directory, PIPELINE_SAVE, [MODEL_INDEX, *components])
    atomic_save(save_directory, lambda staging: save(staging, **kwargs), PIPELINE_SAVE)


def _check_variant_scan(folder: str, variant: Optional[str]) -> None:
    """Diffusers' variant scan fails with an IndexError on a `unet/` folder with an entry without a dot (pipelines
    saved by diffusers-scorefusion 0.1): say so instead."""
    unet = os.path.join(folder, "unet")
    if variant is None or not os.path.isdir(unet):
        return
    dotless = sorted(name for name in os.listdir(unet) if "." not in name)
    if dotless:
        raise ValueError(
            f"{unet} holds {dotless}, folders written by diffusers-scorefusion 0.1, which Diffusers' variant= scan "
            "cannot read: load it without variant=, then save it again"
        )


@contextlib.contextmanager
def loading_pipeline(pretrained_model_name_or_path: Any, variant: Optional[str] = None) -> Iterator[None]:
    """Around `DiffusionPipeline.from_pretrained` of a saved fusion pipeline: completes an interrupted save and holds a
    shared lock (local folders), and turns the refusal of a pickle that would run code into a sentence."""
    source = os.fspath(pretrained_model_name_or_path) if isinstance(pretrained_model_name_or_path, os.PathLike) else (
        pretrained_model_name_or_path)  # fmt: skip
    local = isinstance(source, str) and (os.path.isdir(source) or not os.path.lexists(source))
    if local and not os.path.lexists(source):
        recover_legacy(source)
    local = local and os.path.isdir(source)
    if local:
        _check_variant_scan(source, variant)
    try:
        with reading(source) if local else contextlib.nullcontext():
            yield
    except Exception as error:  # noqa: BLE001  (Diffusers wraps the refusal in several error types)
        if needs_unpickling(error):
            raise unpickling_refused(error, f"the pipeline at {source!r}") from error
        raise
