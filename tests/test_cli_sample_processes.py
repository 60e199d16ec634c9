"""`scorefusion sample` across processes (issue 17): 2 CPU processes under torchrun write the same images as one
process, each image with its own seed; `--prompts FILE`; the Python helper behind it."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_scorefusion import FusedUNet, ScoreFusionPipeline
from diffusers_scorefusion.cli import main
from diffusers_scorefusion.pipelines.sampling_utils import (
    batch_jobs,
    read_prompts_file,
    sample_across_processes,
    sample_jobs,
)
from diffusers_scorefusion.testing.unet_parts import get_dummy_components, get_dummy_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red cat", "a blue dog", "a green bird"]


def _pipe():
    fused = FusedUNet([get_dummy_unet(1), get_dummy_unet(2)], weights=[0.3, 0.7])
    pipe = ScoreFusionPipeline(**{**get_dummy_components(), "unet": fused})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def fusion_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fusion") / "pipeline"
    _pipe().save_pretrained(str(folder))
    prompts = folder.parent / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:1] + ["", "  "] + PROMPTS[1:]) + "\n")  # blank lines are skipped
    return folder


def _argv(folder, out, *extra):
    return ["sample", "--fusion", str(folder), "--prompts", str(folder.parent / "prompts.txt"), "--out", str(out),
            "--num-images", "2", "--batch-size", "2", "--num-inference-steps", "2", "--seed", "5", *extra]  # fmt: skip


def _pixels(folder):
    return {name: np.asarray(PIL.Image.open(folder / name)) for name in sorted(os.listdir(folder))
            if name.startswith("sample_")}  # fmt: skip


def test_two_processes_write_the_images_of_one_process(fusion_folder, tmp_path, capsys):
    single = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process below (OMP_NUM_THREADS=1)
    try:
        assert main(_argv(fusion_folder, single, "--no-progress")) == 0
    finally:
        torch.set_num_threads(threads)
    assert "6 images (3 prompts x 2), metadata.jsonl and grid.png written to" in capsys.readouterr().err

    double = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "diffusers_scorefusion.cli", *_argv(fusion_folder, double)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)  # a hang fails here
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    # 3 batches of 2 images: process 0 runs two, process 1 one; the progress bar is the main process's only
    assert "process 0 of 2: 4 images" in completed.stderr and "process 1 of 2: 2 images" in completed.stderr
    assert "written to" in completed.stderr and "by 2 processes" in completed.stderr
    # one bar over process 0's 4 images; none on process 1 (2 images) and no per-call bars (2 steps) anywhere
    assert "| 4/4 [" in completed.stderr and "| 2/2 [" not in completed.stderr
    assert sorted(os.listdir(double)) == sorted(os.listdir(single)) == [
        "grid.png", "metadata.jsonl", *(f"sample_{i:03d}.png" for i in range(6))]  # fmt: skip
    one, two = _pixels(single), _pixels(double)
    for name in one:
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)
    assert (single / "metadata.jsonl").read_text() == (double / "metadata.jsonl").read_text()
    records = [json.loads(line) for line in (single / "metadata.jsonl").read_text().splitlines()]
    assert records == [{"file_name": f"sample_{i:03d}.png", "text": PROMPTS[i // 2], "seed": 5 + i} for i in range(6)]
    assert not np.array_equal(one["sample_000.png"], one["sample_001.png"])  # every image has its own seed
    with PIL.Image.open(single / "grid.png") as grid:
        assert grid.size == (4 * 32, 2 * 32)


def test_the_helper_gives_each_image_the_seed_it_has_alone():
    pipe = _pipe()
    results = sample_across_processes(pipe, PROMPTS[:2], num_images_per_prompt=2, seed=3, batch_size=3,
                                      num_inference_steps=2, output_type="np", progress_bar=False)  # fmt: skip
    assert [(job.index, job.prompt, job.seed) for job, _ in results] == [
        (0, PROMPTS[0], 3), (1, PROMPTS[0], 4), (2, PROMPTS[1], 5), (3, PROMPTS[1], 6)]  # fmt: skip
    # image 2 alone, from its seed: equal to its place in the batch up to batched-float rounding
    alone = pipe(PROMPTS[1], num_inference_steps=2, generator=torch.Generator().manual_seed(5), output_type="np")
    np.testing.assert_allclose(results[2][1], alone.images[0], atol=1e-5)


def test_jobs_and_batches():
    jobs = sample_jobs(["a", "b"], num_images_per_prompt=3, seed=10)
    assert [(job.index, job.prompt, job.seed) for job in jobs] == [(i, "ab"[i // 3], 10 + i) for i in range(6)]
    assert [[job.index for job in batch] for batch in batch_jobs(jobs, 4)] == [[0, 1, 2, 3], [4, 5]]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sample_jobs([], 1), "prompts must be a non-empty list of strings, got []"),
        (lambda: sample_jobs(["a"], 0), "num_images_per_prompt must be an integer >= 1, got 0"),
        (lambda: batch_jobs(sample_jobs("a"), 0), "batch_size must be an integer >= 1, got 0"),
        (lambda: sample_across_processes(None, "a", generator=torch.Generator()),
         "prompt, generator and num_images_per_prompt are set per image"),
        (lambda: sample_across_processes(None, "a", negative_prompt=["x"]), "negative_prompt must be one string"),
    ],
)
def test_helper_bad_input(call, message):
    with pytest.raises((ValueError, TypeError), match=None) as error:
        call()
    assert message in str(error.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--num-images", "0"], "--num-images must be >= 1, got 0"),
        (["--prompts-file-empty"], "holds no prompts; expected one prompt per line"),
        (["--prompts-file-missing"], "No such file or directory"),
    ],
)
def test_sample_refuses_bad_flags_with_a_sentence_and_writes_nothing(extra, message, tmp_path, capsys):
    argv = ["sample", "--fusion", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "--prompts"]
    if extra == ["--prompts-file-empty"]:
        (tmp_path / "empty.txt").write_text("\n  \n")
        argv += [str(tmp_path / "empty.txt")]
    elif extra == ["--prompts-file-missing"]:
        argv += [str(tmp_path / "missing.txt")]
    else:
        (tmp_path / "p.txt").write_text("a cat\n")
        argv += [str(tmp_path / "p.txt"), *extra]
    before = sorted(os.listdir(tmp_path))
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert sorted(os.listdir(tmp_path)) == before


def test_prompts_file_is_read_one_prompt_per_line(tmp_path):
    (tmp_path / "p.txt").write_text("  a cat \n\nan owl\n", encoding="utf-8")
    assert read_prompts_file(str(tmp_path / "p.txt")) == ["a cat", "an owl"]
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_prompts_file(str(tmp_path / "bad.txt"))


def test_process_state_of_a_single_cpu_process():
    from diffusers_scorefusion.pipelines.sampling_utils import process_state

    state, device = process_state()
    assert (state.num_processes, state.process_index, device) == (1, 0, str(state.device))
    assert process_state("cpu")[1] == "cpu"
