"""Saves killed at any instant (issue 11): the folder then loads as the complete old save or the complete new one.

A forked child process saves and is killed with SIGKILL just before or just after a rename or removal of the save
protocol (the points are found by recording the file-system calls of a save), or after a random delay. The parent then
loads the folder, which completes an interrupted save, and checks every tensor and the fusion weights against the two
saves. Files of the user in the folder must survive every kill; the next complete save leaves no leftovers.

The fast run kills a fusion save at every point and LoRA-fusion and pipeline saves at the key points (the protocol is
one function), and FusedTransformer and Flux-pipeline saves at the key points; `-m slow` kills all of them at every
point and at 20-30 random delays each.
"""

import copy
import os
import random
import signal
import time

import pytest
import torch

from diffusers_scorefusion import FusedTransformer, FusedUNet, ScoreFusionFluxPipeline, ScoreFusionPipeline
from diffusers_scorefusion.loaders.atomic_save import JOURNAL_NAME, LEFTOVER_PREFIXES
from diffusers_scorefusion.testing import transformer_parts as parts
from diffusers_scorefusion.testing.unet_parts import get_dummy_components, get_dummy_unet

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills forked saving processes (POSIX)")
FS_CALLS = ("replace", "unlink", "rmdir")


def _state_dict(model):
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _perturbed(fused, weights):
    other = copy.deepcopy(fused)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.01)
    other.set_weights(weights)
    return other


def _is_journal_write(name, paths, folder):
    return name == "replace" and paths[-1].endswith(JOURNAL_NAME) and os.path.dirname(paths[-1]) == folder


class Recorder:
    """Wraps `os.replace`, `os.unlink` and `os.rmdir`: records each call, or kills the process at `kill_at`,
    `(offset, "before" | "after")`, counted from the rename that writes the save journal of `folder` (the calls before
    it, such as removing leftovers of earlier crashed saves, vary from save to save)."""

    def __init__(self, folder, kill_at=None):
        self.folder, self.kill_at, self.events, self.originals, self.anchor = (
            os.path.realpath(folder),
            kill_at,
            [],
            {},
            None,
        )

    def __enter__(self):
        for name in FS_CALLS:
            self.originals[name] = getattr(os, name)
            setattr(os, name, self._wrap(name, self.originals[name]))
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(os, name, original)

    def _wrap(self, name, original):
        def call(*args, **kwargs):
            index = len(self.events)
            paths = [os.path.realpath(arg) if "dir_fd" not in kwargs else os.fspath(arg) for arg in args
                     if isinstance(arg, (str, os.PathLike))]  # fmt: skip
            self.events.append((name, paths))
            if self.anchor is None and _is_journal_write(name, paths, self.folder):
                self.anchor = index
            offset = None if self.anchor is None else index - self.anchor
            if self.kill_at == (offset, "before"):
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            if self.kill_at == (offset, "after"):
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return call


def _run_child(save, folder, kill_at=None, delay=None):
    """Forks a process that runs `save()` (killed at `kill_at`, or by the parent after `delay` seconds)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            torch.set_num_threads(1)  # OpenMP thread pools do not survive fork
            with Recorder(folder, kill_at):
                save()
            status = 0
        finally:
            os._exit(status)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the saving child hung")


def _kill_points(recorder, every):
    """Offsets from the journal's rename (the commit point). With `every`: before and after it, each rename of the
    swap and the journal's removal, and three points of the cleanup. Otherwise the key ones: around the commit point,
    before the first move, around the last (the commit file moving in), before the journal's removal, mid-cleanup."""
    events, top, anchor = recorder.events, recorder.folder, recorder.anchor
    renames = [i for i, (name, paths) in enumerate(events)
               if name == "replace" and i >= anchor and any(os.path.dirname(p) == top for p in paths)]  # fmt: skip
    journal_removed = next(i for i, (name, paths) in enumerate(events)
                           if name == "unlink" and paths == [os.path.join(top, JOURNAL_NAME)])  # fmt: skip
    cleanup = list(range(journal_removed + 1, len(events)))
    if every:
        indices = [(i, when) for i in renames + [journal_removed] for when in ("before", "after")]
        indices += [(cleanup[k], "before") for k in sorted({0, len(cleanup) // 2, len(cleanup) - 1})]
    else:
        indices = [(anchor, "before"), (anchor, "after"), (renames[1], "before"), (renames[-1], "before")]
        indices += [(renames[-1], "after"), (journal_removed, "before"), (cleanup[len(cleanup) // 2], "before")]
    return [(i - anchor, when) for i, when in indices]


def _crash_everywhere(folder, saves, load, classify, seed, num_random, every=True):
    """Saves `saves[0]`, records one save of `saves[1]`, then kills saves at every point and at random delays."""
    folder.mkdir()
    (folder / "precious.txt").write_text("the user's own file")
    saves[0](folder)
    current = 0
    with Recorder(folder) as recorder:
        started = time.monotonic()
        saves[1](folder)
        duration = time.monotonic() - started
    current = 1
    assert classify(load(folder)) == 1
    points = _kill_points(recorder, every)
    rng = random.Random(seed)
    cases = [("point", point) for point in points] + [
        ("delay", rng.uniform(0, 1.3 * duration)) for _ in range(num_random)
    ]
    for kind, where in cases:
        target = 1 - current
        _run_child(lambda: saves[target](folder), folder, kill_at=where if kind == "point" else None,
                   delay=where if kind == "delay" else None)  # fmt: skip
        state = classify(load(folder))
        assert state in (current, target), (kind, where)
        if kind == "point":  # the journal's rename is the commit point: before it the old save, after it the new
            offset, when = where
            expected_new = offset > 0 or (offset == 0 and when == "after")
            assert state == (target if expected_new else current), (where, recorder.events[recorder.anchor + offset])
        assert not (folder / JOURNAL_NAME).exists()  # the load completed any interrupted save
        leftovers = [name for name in os.listdir(folder) if name.startswith(LEFTOVER_PREFIXES)]
        assert len(leftovers) <= 2, leftovers  # at most this crash's; each save removes the earlier ones
        assert (folder / "precious.txt").read_text() == "the user's own file"
        current = state
    saves[1 - current](folder)
    assert not [name for name in os.listdir(folder) if name.startswith(LEFTOVER_PREFIXES)]
    assert classify(load(folder)) == 1 - current
    return len(points)


def _fusion_classifier(versions):
    def classify(loaded):
        def equal(version):
            pairs = zip(_state_dict(loaded).values(), _state_dict(version).values())
            return loaded.config.weights == version.config.weights and all(torch.equal(a, b) for a, b in pairs)

        matches = [i for i, version in enumerate(versions) if equal(version)]
        assert len(matches) == 1, "the folder holds neither complete save"
        return matches[0]

    return classify


def _pipeline_classifier(pipes, component):
    """Which of `pipes` a loaded pipeline is: its fusion (`component`) must be that save's, and its VAE too."""
    vaes = [_state_dict(pipe.vae) for pipe in pipes]
    classify_fusion = _fusion_classifier([getattr(pipe, component) for pipe in pipes])

    def classify(loaded):
        state = classify_fusion(getattr(loaded, component))
        assert all(torch.equal(a, b) for a, b in zip(_state_dict(loaded.vae).values(), vaes[state].values()))
        return state

    return classify


@pytest.mark.parametrize("thorough", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fused_unet_survives_a_kill_at_any_point(tmp_path, thorough):
    fused = FusedUNet([get_dummy_unet(0), get_dummy_unet(1)], weights=[0.3, 0.7])
    versions = [fused, _perturbed(fused, [0.6, 0.4])]
    saves = [lambda folder, v=v: v.save_pretrained(folder) for v in versions]
    count = _crash_everywhere(tmp_path / "fusion", saves, FusedUNet.from_pretrained, _fusion_classifier(versions),
                              seed=0, num_random=30 if thorough else 3)  # fmt: skip
    assert count >= 2 * 7  # journal + 3 entries out + 3 entries in, before and after each


@pytest.mark.parametrize("thorough", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_lora_fusion_survives_a_kill_at_any_point(tmp_path, thorough):
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = get_dummy_unet(0)
    loras = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        adapted = copy.deepcopy(base)
        adapted.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights=False))
        loras.append({f"unet.{key}": value for key, value in get_peft_model_state_dict(adapted).items()})
    versions = [FusedUNet.from_lora(copy.deepcopy(base), loras, weights=[0.3, 0.7]),
                FusedUNet.from_lora(copy.deepcopy(base), loras[::-1], weights=[0.5, 0.5])]  # fmt: skip
    saves = [lambda folder, v=v: v.save_pretrained(folder) for v in versions]
    _crash_everywhere(tmp_path / "fusion", saves, FusedUNet.from_pretrained, _fusion_classifier(versions),
                      seed=1, num_random=20 if thorough else 1, every=thorough)  # fmt: skip


@pytest.mark.parametrize("thorough", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_pipeline_survives_a_kill_at_any_point(tmp_path, thorough):
    pipes = [ScoreFusionPipeline(**get_dummy_components(weights=[0.3, 0.7]))]
    other = get_dummy_components(seed=5, weights=[0.8, 0.2])
    pipes.append(ScoreFusionPipeline(**other))
    classify = _pipeline_classifier(pipes, "unet")
    saves = [lambda folder, p=p: p.save_pretrained(folder) for p in pipes]
    _crash_everywhere(tmp_path / "pipe", saves, ScoreFusionPipeline.from_pretrained, classify, seed=2,
                      num_random=20 if thorough else 1, every=thorough)  # fmt: skip


@pytest.mark.parametrize("thorough", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fused_transformer_survives_a_kill_at_any_point(tmp_path, thorough):
    fused = FusedTransformer([parts.get_dummy_flux_transformer(0), parts.get_dummy_flux_transformer(1)],
                             weights=[0.3, 0.7])  # fmt: skip
    versions = [fused, _perturbed(fused, [0.6, 0.4])]
    saves = [lambda folder, v=v: v.save_pretrained(folder) for v in versions]
    _crash_everywhere(tmp_path / "fusion", saves, FusedTransformer.from_pretrained, _fusion_classifier(versions),
                      seed=3, num_random=30 if thorough else 1, every=thorough)  # fmt: skip


@pytest.mark.parametrize("thorough", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_flux_pipeline_survives_a_kill_at_any_point(tmp_path, thorough):
    pipes = []
    for seed, weights in ((0, [0.3, 0.7]), (5, [0.8, 0.2])):
        components = parts.get_dummy_flux_components(seed)
        members = [components["transformer"], parts.get_dummy_flux_transformer(seed + 1)]
        fused = FusedTransformer(members, weights=weights)
        pipes.append(ScoreFusionFluxPipeline(**{**components, "transformer": fused}))
    classify = _pipeline_classifier(pipes, "transformer")
    saves = [lambda folder, p=p: p.save_pretrained(folder) for p in pipes]
    _crash_everywhere(tmp_path / "pipe", saves, ScoreFusionFluxPipeline.from_pretrained, classify, seed=4,
                      num_random=20 if thorough else 1, every=thorough)  # fmt: skip


def test_concurrent_saves_leave_one_complete_save(tmp_path):
    fused = FusedUNet([get_dummy_unet(0), get_dummy_unet(1)], weights=[0.3, 0.7])
    versions = [fused, _perturbed(fused, [0.6, 0.4])]
    folder = tmp_path / "fusion"
    pids = []
    for version in versions:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                torch.set_num_threads(1)
                version.save_pretrained(folder)
            finally:
                os._exit(0)
        pids.append(pid)
    assert all(os.waitpid(pid, 0)[1] == 0 for pid in pids)
    assert _fusion_classifier(versions)(FusedUNet.from_pretrained(folder)) in (0, 1)
    assert sorted(os.listdir(folder)) == ["config.json", "member_0.diffusers", "member_1.diffusers"]
