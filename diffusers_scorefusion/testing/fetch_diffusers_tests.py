"""Find, or fetch, Diffusers' own `tests/` folder for the installed Diffusers version.

The project's harness (`tests/diffusers_suite/`) runs Diffusers' own fast pipeline tests against the fusion. The
package index ships no pipeline tests, so they come from a checkout of Diffusers, looked up in this order:

1. `$SCOREFUSION_DIFFUSERS_TESTS`, when set (a Diffusers checkout or its `tests/` folder; when it is set and holds no
   tests, nothing else is searched: the variable says where they must be);
2. `../shared/diffusers-tests` beside the project (its `tests/` folder);
3. the cache filled by this command: `<cache>/diffusers-tests/v<version>/tests`, where `<cache>` is
   `$SCOREFUSION_CACHE`, else `$XDG_CACHE_HOME/diffusers-scorefusion`, else `~/.cache/diffusers-scorefusion`.

    python -m diffusers_scorefusion.testing.fetch_diffusers_tests [--cache-dir DIR] [--force] [--timeout SECONDS]

makes a shallow, sparse `git clone` of the installed version's release tag (`v0.42.1` for Diffusers 0.42.1) holding
only `tests/`, into a hidden folder of the cache that is renamed into place when complete. It needs `git` and access
to GitHub. When the tests are already found, or when the clone fails (offline, no `git`, a development version of
Diffusers that has no release tag), it prints one sentence and exits with status 0, so that a test command can run
it unconditionally; the sentence of a failure is kept in `<cache>/diffusers-tests/last-fetch.json`, and pytest's
closing summary repeats it when the suites did not run.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import List, Optional, Sequence, Tuple

REPOSITORY = "https://github.com/huggingface/diffusers.git"
ENV_VARIABLE = "SCOREFUSION_DIFFUSERS_TESTS"
CACHE_VARIABLE = "SCOREFUSION_CACHE"
SHARED_FOLDER = os.path.join("..", "shared", "diffusers-tests")
FETCHED_RECORD = "FETCHED.json"  # written beside the fetched tests/: repository, tag, commit, time
LAST_FETCH = "last-fetch.json"  # the outcome of the last fetch, in <cache>/diffusers-tests/
MARKER = os.path.join("pipelines", "test_pipelines_common.py")  # a folder holding this is Diffusers' tests/
PROBE_TIMEOUT = 20.0  # seconds for `git ls-remote`: an unreachable network fails here, fast


@dataclass
class DiffusersTestsLocation:
    """Where Diffusers' tests were found (`path`, the `tests/` folder, and `source`, how it was found), or why not.

    `searched` lists `(place, path, what was there)` in lookup order; `reason` is one sentence when `path` is `None`.
    """

    path: Optional[str]
    source: Optional[str]
    searched: List[Tuple[str, str, str]] = field(default_factory=list)
    reason: Optional[str] = None


def installed_diffusers_version() -> str:
    try:
        return version("diffusers")
    except PackageNotFoundError as error:
        raise ValueError("Diffusers is not installed; install the project first (pip install -e .)") from error


def release_tag(diffusers_version: str) -> str:
    """The git tag of a Diffusers release (`"0.42.1"` -> `"v0.42.1"`); development versions have none."""
    if not diffusers_version or any(part in diffusers_version for part in ("dev", "+")):
        raise ValueError(
            f"Diffusers {diffusers_version!r} is a development version with no release tag; clone its tests yourself "
            f"and set {ENV_VARIABLE} to the checkout"
        )
    return f"v{diffusers_version}"


def default_cache_dir() -> str:
    """`$SCOREFUSION_CACHE`, else `$XDG_CACHE_HOME/diffusers-scorefusion`, else `~/.cache/diffusers-scorefusion`."""
    if os.environ.get(CACHE_VARIABLE):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_VARIABLE]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.abspath(os.path.join(base, "diffusers-scorefusion"))


def cached_checkout(diffusers_version: Optional[str] = None, cache_dir: Optional[str] = None) -> str:
    """The folder a fetch of `diffusers_version` (default: the installed one) writes: it holds `tests/`."""
    tag = release_tag(diffusers_version or installed_diffusers_version())
    return os.path.join(cache_dir or default_cache_dir(), "diffusers-tests", tag)


def _tests_folder(base: str) -> Optional[str]:
    """`base/tests` or `base` itself, whichever is Diffusers' `tests/` folder."""
    for candidate in (os.path.join(base, "tests"), base):
        if os.path.isfile(os.path.join(candidate, MARKER)):
            return os.path.abspath(candidate)
    return None


def find_diffusers_tests(
    project_root: str, diffusers_version: Optional[str] = None, cache_dir: Optional[str] = None
) -> DiffusersTestsLocation:
    """Looks for Diffusers' tests in the order of the module docstring; `project_root` is this project's folder."""
    searched: List[Tuple[str, str, str]] = []
    variable = os.environ.get(ENV_VARIABLE)
    if variable:
        found = _tests_folder(variable)
        if found:
            return DiffusersTestsLocation(found, f"${ENV_VARIABLE}", [(f"${ENV_VARIABLE}", variable, "found")])
        searched.append((f"${ENV_VARIABLE}", variable, "no Diffusers tests there"))
        return DiffusersTestsLocation(None, None, searched, (
            f"${ENV_VARIABLE} is set to {variable!r}, which holds no Diffusers tests (no tests/{MARKER})"
        ))  # fmt: skip
    searched.append((f"${ENV_VARIABLE}", "", "not set"))
    shared = os.path.normpath(os.path.join(os.path.abspath(project_root), SHARED_FOLDER))
    found = _tests_folder(shared)
    if found:
        return DiffusersTestsLocation(found, SHARED_FOLDER, searched + [(SHARED_FOLDER, shared, "found")])
    searched.append((SHARED_FOLDER, shared, "missing"))
    try:
        cached = cached_checkout(diffusers_version, cache_dir)
    except ValueError as error:
        searched.append(("cache", "", str(error)))
        return DiffusersTestsLocation(None, None, searched, str(error))
    found = _tests_folder(cached)
    if found:
        return DiffusersTestsLocation(found, "cache", searched + [("cache", cached, "found")])
    last = last_fetch(cache_dir)
    state = "missing" + (f" (last fetch: {last['message']})" if last and not last.get("ok") else "")
    searched.append(("cache", cached, state))
    reason = "not found at " + ", ".join(f"{place} ({what})" for place, _, what in searched)
    return DiffusersTestsLocation(None, None, searched, reason)


def last_fetch(cache_dir: Optional[str] = None) -> Optional[dict]:
    """The recorded outcome of the last fetch (`{"ok", "message", "version", "time"}`), if any."""
    path = os.path.join(cache_dir or default_cache_dir(), "diffusers-tests", LAST_FETCH)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def fetched_record(tests_path: str) -> Optional[dict]:
    """What a fetch recorded beside the `tests/` folder it wrote (repository, tag, commit), if it was fetched."""
    try:
        with open(os.path.join(os.path.dirname(tests_path), FETCHED_RECORD), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _record_outcome(cache_dir: str, diffusers_version: str, ok: bool, message: str) -> None:
    folder = os.path.join(cache_dir, "diffusers-tests")
    try:
        os.makedirs(folder, exist_ok=True)
        record = {"ok": ok, "message": message, "version": diffusers_version,
                  "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".last-fetch-")
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(record, file)
        os.replace(temporary, os.path.join(folder, LAST_FETCH))
    except OSError:
        pass  # a cache that cannot be written is reported by the fetch itself


def _git(arguments: Sequence[str], timeout: float, cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="", SSH_ASKPASS="")
    return subprocess.run(["git", *arguments], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _first_error_line(completed: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (completed.stderr or completed.stdout or "").splitlines() if line.strip()]
    fatal = [line for line in lines if line.lower().startswith(("fatal", "error"))]
    return (fatal or lines or [f"git exited with status {completed.returncode}"])[-1]


def fetch_diffusers_tests(
    diffusers_version: Optional[str] = None,
    cache_dir: Optional[str] = None,
    repository: str = REPOSITORY,
    timeout: float = 300.0,
    force: bool = False,
) -> Tuple[Optional[str], str]:
    """Clones the `tests/` folder of Diffusers' release tag into the cache; returns `(tests folder or None, sentence)`.

    Never raises for a network, `git` or disk failure: the sentence says what went wrong (and is recorded for the
    test summary). `force=True` fetches again over an earlier fetch.
    """
    diffusers_version = diffusers_version or installed_diffusers_version()
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    try:
        tag = release_tag(diffusers_version)
    except ValueError as error:
        return None, str(error)
    destination = cached_checkout(diffusers_version, cache_dir)
    if not force and _tests_folder(destination):
        return _tests_folder(destination), f"Diffusers {diffusers_version}'s tests are already in {destination}"
    ok, message = False, ""
    try:
        tests, message = _clone(repository, tag, destination, timeout)
        ok = tests is not None
        return tests, message
    finally:
        _record_outcome(cache_dir, diffusers_version, ok, message)


def _clone(repository: str, tag: str, destination: str, timeout: float) -> Tuple[Optional[str], str]:
    if shutil.which("git") is None:
        return None, "Diffusers' tests were not fetched: git is not installed"
    where = f"{tag} of {repository}"
    try:
        probe = _git(["ls-remote", "--tags", repository, f"refs/tags/{tag}"], min(timeout, PROBE_TIMEOUT))
        if probe.returncode != 0:
            return None, f"Diffusers' tests were not fetched ({where} unreachable: {_first_error_line(probe)})"
        if not probe.stdout.strip():
            return None, f"Diffusers' tests were not fetched: {repository} has no tag {tag}"
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        staging = tempfile.mkdtemp(dir=os.path.dirname(destination), prefix=f".fetching-{tag}-")
        try:
            checkout = os.path.join(staging, "diffusers")
            clone = _git(["-c", "advice.detachedHead=false", "clone", "--quiet", "--depth", "1", "--filter=blob:none",
                          "--sparse", "--single-branch", "--branch", tag, repository, checkout], timeout)  # fmt: skip
            if clone.returncode != 0:
                return None, f"Diffusers' tests were not fetched (git clone of {where}: {_first_error_line(clone)})"
            sparse = _git(["sparse-checkout", "set", "tests"], timeout, cwd=checkout)
            if sparse.returncode != 0 or not _tests_folder(checkout):
                return None, f"Diffusers' tests were not fetched ({where} has no tests/{MARKER}: " \
                             f"{_first_error_line(sparse)})"  # fmt: skip
            commit = _git(["rev-parse", "HEAD"], timeout, cwd=checkout).stdout.strip()
            with open(os.path.join(checkout, FETCHED_RECORD), "w", encoding="utf-8") as handle:
                json.dump({"repository": repository, "tag": tag, "commit": commit}, handle)
            if os.path.lexists(destination):  # --force: the earlier fetch goes only once the new one is complete
                old = os.path.join(staging, "old")
                os.replace(destination, old)
            os.replace(checkout, destination)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except subprocess.TimeoutExpired as error:
        return None, f"Diffusers' tests were not fetched: git took longer than {error.timeout:.0f} s ({where})"
    except OSError as error:
        return None, f"Diffusers' tests were not fetched: {error}"
    return _tests_folder(destination), f"fetched Diffusers' tests ({tag}, {commit[:12]}) into {destination}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Finds the tests, or fetches them; prints one sentence. Exit status 0 unless the flags are wrong (2)."""
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_scorefusion.testing.fetch_diffusers_tests", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--cache-dir", default=None, help=f"cache root (default: {default_cache_dir()})")
    parser.add_argument("--project-root", default=os.getcwd(),
                        help=f"the project checkout, for {SHARED_FOLDER} (default: the current folder)")  # fmt: skip
    parser.add_argument("--repository", default=REPOSITORY, help="the Diffusers git repository (default: GitHub)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds the clone may take (default 300)")
    parser.add_argument("--force", action="store_true", help="fetch again even when the tests are found")
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    try:
        diffusers_version = installed_diffusers_version()
    except ValueError as error:
        print(f"fetch_diffusers_tests: {error}", file=sys.stderr)
        return 0
    if not args.force:
        found = find_diffusers_tests(args.project_root, diffusers_version, args.cache_dir)
        if found.path is not None:
            print(f"Diffusers' own tests found at {found.path} ({found.source}); nothing to fetch")
            return 0
        if os.environ.get(ENV_VARIABLE):
            print(f"Diffusers' tests were not fetched: {found.reason} (unset it to use the cache)")
            return 0
    tests, message = fetch_diffusers_tests(diffusers_version, args.cache_dir, args.repository, args.timeout,
                                           args.force)  # fmt: skip
    print(message if tests else f"{message}; the test run will say that Diffusers' own suites did not run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
