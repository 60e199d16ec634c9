"""Generating many images across processes (`accelerate launch`, `torchrun`) with per-image seeds.

Every image has a global index (prompt `p`, image `j` of `num_images_per_prompt`: index `p * num_images_per_prompt
+ j`) and its own generator, seeded `seed + index`; the images are grouped into batches of `batch_size` in that order
(a batch may hold several prompts), and the batches are split between the processes with accelerate's
`PartialState.split_between_processes`. An image therefore does not depend on the number of processes: the same
batch is computed with the same seeds whichever process runs it, so the outputs of N processes equal those of one
(with the same `batch_size`, as for any batched sampling).
"""

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import PIL.Image
import torch
from tqdm.auto import tqdm

GRID_SIZE = 16  # images shown in grid.png


@dataclass(frozen=True)
class SampleJob:
    """One image to generate: its global `index`, its `prompt` and the `seed` of its generator."""

    index: int
    prompt: str
    seed: int


def sample_jobs(prompts: Union[str, Sequence[str]], num_images_per_prompt: int = 1, seed: int = 0) -> List[SampleJob]:
    """The images to generate, in global order, each with the seed `seed + index`."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    return [SampleJob(p * num_images_per_prompt + j, prompt, seed + p * num_images_per_prompt + j)
            for p, prompt in enumerate(prompts) for j in range(num_images_per_prompt)]  # fmt: skip


def batch_jobs(jobs: Sequence[SampleJob], batch_size: int) -> List[List[SampleJob]]:
    """Consecutive batches of `batch_size` jobs (the last may be shorter)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return [list(jobs[start : start + batch_size]) for start in range(0, len(jobs), batch_size)]


def process_state(device: Optional[str] = None) -> Tuple[Any, str]:
    """This process's `accelerate.PartialState` and the device it samples on.

    `device=None` gives the process's own device (`state.device`: `cuda:<local rank>` under `accelerate launch`). On a
    machine without an accelerator, for `device="cpu"` or under `accelerate launch --cpu`, the processes that
    `torchrun` starts join over gloo (`PartialState(cpu=True)`). Under several processes an explicit `device` must be
    the process's own.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    cpu = (device is not None and torch.device(device).type == "cpu") or not has_accelerator
    state = PartialState(cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
    if device is None:
        return state, str(state.device)
    if state.num_processes > 1 and torch.device(device) != state.device:
        raise ValueError(f"device {device!r}: under {state.num_processes} processes each samples on its own device "
                         f"({state.device} for process {state.process_index}); leave the device out")  # fmt: skip
    return state, device


def read_prompts_file(path: str) -> List[str]:
    """The prompts of a UTF-8 text file, one per line (surrounding whitespace stripped, blank lines skipped)."""
    try:
        with open(path, encoding="utf-8") as handle:
            prompts = [line.strip() for line in handle]
    except UnicodeDecodeError as error:
        raise ValueError(f"prompts file {path!r} is not UTF-8 text: {error}") from error
    prompts = [prompt for prompt in prompts if prompt]
    if not prompts:
        raise ValueError(f"prompts file {path!r} holds no prompts; expected one prompt per line")
    return prompts


def sample_across_processes(
    pipe: Any,
    prompts: Union[str, Sequence[str]],
    num_images_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 4,
    state: Optional[Any] = None,
    progress_bar: bool = True,
    **pipeline_kwargs: Any,
) -> List[Tuple[SampleJob, Any]]:
    """Generates this process's share of the images; returns `(job, image)` pairs in global order.

    Args:
        pipe: a Diffusers pipeline taking `prompt`, `generator` and `num_images_per_prompt` (any ScoreFusion or
            stock text-to-image pipeline), already on this process's device (`state.device`).
        prompts: one prompt or a list of prompts.
        num_images_per_prompt: images per prompt.
        seed: image `index` uses `torch.Generator().manual_seed(seed + index)` (CPU generators, as Diffusers
            recommends for reproducibility across devices).
        batch_size: images per pipeline call; results depend on it as batched sampling does, not on the number of
            processes.
        state: an `accelerate.PartialState` (default: `PartialState()`, one process unless launched by
            `accelerate launch` or `torchrun`).
        progress_bar: a bar over this process's images, on the main process only.
        **pipeline_kwargs: passed to every call (`num_inference_steps`, `guidance_scale`, `height`, ...); a string
            `negative_prompt` is used for every image.
    """
    if state is None:
        from accelerate import PartialState

        state = PartialState()
    if "generator" in pipeline_kwargs or "prompt" in pipeline_kwargs or "num_images_per_prompt" in pipeline_kwargs:
        raise ValueError("prompt, generator and num_images_per_prompt are set per image by sample_across_processes; "
                         f"got them in pipeline_kwargs: {sorted(pipeline_kwargs)}")  # fmt: skip
    batches = batch_jobs(sample_jobs(prompts, num_images_per_prompt, seed), batch_size)
    negative = pipeline_kwargs.pop("negative_prompt", None)
    if negative is not None and not isinstance(negative, str):
        raise TypeError(f"negative_prompt must be one string (used for every image) or None, got {negative!r}")
    results: List[Tuple[SampleJob, Any]] = []
    with state.split_between_processes(batches) as mine:
        bar = tqdm(total=sum(len(batch) for batch in mine), unit="image",
                   disable=not (progress_bar and state.is_main_process))  # fmt: skip
        for batch in mine:
            kwargs = dict(pipeline_kwargs)
            if negative is not None:
                kwargs["negative_prompt"] = [negative] * len(batch)
            images = pipe(
                prompt=[job.prompt for job in batch], num_images_per_prompt=1,
                generator=[torch.Generator().manual_seed(job.seed) for job in batch], **kwargs,
            ).images  # fmt: skip
            results.extend(zip(batch, images))
            bar.update(len(batch))
        bar.close()
    return results


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Writes `path` through a temporary file in its folder, renamed into place (no half-written file is left)."""
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def _grid(images: List[PIL.Image.Image], columns: int = 4) -> PIL.Image.Image:
    """`make_image_grid` of `images`, the last row filled with black cells."""
    from diffusers.utils import make_image_grid

    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    blank = [PIL.Image.new("RGB", images[0].size)] * (rows * columns - len(images))
    return make_image_grid(images + blank, rows=rows, cols=columns)


def save_samples(
    out_dir: str, jobs: Sequence[SampleJob], results: Sequence[Tuple[SampleJob, Any]], state: Any
) -> List[str]:
    """Writes this process's images as `sample_NNN.png` into `out_dir`; once every process is done, the main process
    writes `metadata.jsonl` (`file_name`, `text`, `seed` of every image: the captioned-folder layout
    `scorefusion fit --data` reads) and `grid.png` (the first 16 images). Returns every image's file name."""
    digits = max(3, len(str(len(jobs) - 1)))
    names = [f"sample_{job.index:0{digits}d}.png" for job in jobs]
    os.makedirs(out_dir, exist_ok=True)
    for job, image in results:
        _write_atomically(os.path.join(out_dir, names[job.index]), lambda path: image.save(path, format="PNG"))
    state.wait_for_everyone()
    if state.is_main_process:
        lines = "".join(json.dumps({"file_name": name, "text": job.prompt, "seed": job.seed}) + "\n"
                        for name, job in zip(names, jobs))  # fmt: skip
        _write_atomically(os.path.join(out_dir, "metadata.jsonl"), lambda path: _write_text(path, lines))
        shown = []
        for name in names[:GRID_SIZE]:
            with PIL.Image.open(os.path.join(out_dir, name)) as image:
                shown.append(image.convert("RGB"))
        _write_atomically(os.path.join(out_dir, "grid.png"), lambda path: _grid(shown).save(path, format="PNG"))
    return names
