"""The demos write to an untracked folder by default, and nothing tracked lies in a git-ignored folder (issue 17)."""

import os
import shutil
import subprocess

import pytest

from diffusers_scorefusion.experiments import digits, gaussian1d
from diffusers_scorefusion.experiments.output_dirs import output_dirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args):
    return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "argv, out, cache",
    [
        ([], "outputs/digits", "outputs/digits/cache"),
        (["--medium"], "outputs/digits-medium", "outputs/digits-medium/cache"),
        (["--update-results"], "results/digits", "outputs/digits/cache"),
        (["--out", "/tmp/x"], "/tmp/x", "/tmp/x/cache"),
        (["--out", "/tmp/x", "--cache-dir", "/tmp/c"], "/tmp/x", "/tmp/c"),
        (["--no-cache"], "outputs/digits", None),
    ],
)
def test_digits_demo_writes_an_untracked_folder_by_default(argv, out, cache):
    args = digits.parse_args(argv)
    settings = digits.settings_from_args(args)
    name = "digits" if settings.preset == "quick" else f"digits-{settings.preset}"
    assert output_dirs(args, name) == (os.path.normpath(out), cache and os.path.normpath(cache))


def test_gaussian1d_demo_writes_an_untracked_folder_by_default():
    assert output_dirs(gaussian1d.parse_args([]), "gaussian1d") == ("outputs/gaussian1d", "outputs/gaussian1d/cache")
    args = gaussian1d.parse_args(["--setup", "common-scale", "--update-results"])
    assert output_dirs(args, "gaussian1d-common-scale")[0] == "results/gaussian1d-common-scale"


def test_out_and_update_results_together_are_refused():
    with pytest.raises(ValueError, match="--out '/tmp/x' and --update-results"):
        output_dirs(digits.parse_args(["--out", "/tmp/x", "--update-results"]), "digits")


@pytest.mark.skipif(shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")),
                    reason="not a git checkout")  # fmt: skip
def test_default_output_folders_are_ignored_and_hold_nothing_tracked():
    for path in ("outputs/digits/report.md", "outputs/quickstart/grid.png", "quickstart-output/grid.png",
                 "results/digits/cache/model.safetensors"):  # fmt: skip
        assert _git("check-ignore", "-q", "--no-index", path).returncode == 0, f"{path} is not git-ignored"
    for path in ("results/digits/report.md", "results/digits/results.json"):
        assert _git("check-ignore", "-q", "--no-index", path).returncode == 1, f"{path} is git-ignored"
    tracked_but_ignored = _git("ls-files", "--cached", "--ignored", "--exclude-standard").stdout.split()
    assert tracked_but_ignored == [], f"tracked files in git-ignored folders: {tracked_but_ignored[:10]}"
