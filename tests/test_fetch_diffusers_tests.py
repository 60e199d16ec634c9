"""Finding and fetching Diffusers' own tests (issue 17): the lookup order, a real shallow sparse clone of a release
tag from a `file://` repository made here (offline), and soft, fast failures."""

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from diffusers_scorefusion.testing import fetch_diffusers_tests as fetch
from diffusers_scorefusion.testing.fetch_diffusers_tests import MARKER, fetch_diffusers_tests, find_diffusers_tests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = "0.42.1"


def _write(path, text="x = 1\n"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


def _git(cwd, *args):
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main", *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(fetch.ENV_VARIABLE, raising=False)
    monkeypatch.setenv(fetch.CACHE_VARIABLE, str(tmp_path / "default-cache"))


@pytest.fixture
def places(tmp_path):
    """A project beside `shared/diffusers-tests`, a checkout for the variable, a filled cache: all holding tests."""
    project = tmp_path / "work" / "project"
    project.mkdir(parents=True)
    shared = tmp_path / "work" / "shared" / "diffusers-tests"
    variable = tmp_path / "elsewhere"
    cache = tmp_path / "cache"
    for base in (shared, variable, cache / "diffusers-tests" / f"v{VERSION}"):
        _write(str(base / "tests" / MARKER))
    return dict(project=str(project), shared=str(shared), variable=str(variable), cache=str(cache))


def test_lookup_order_variable_then_shared_then_cache(places, monkeypatch):
    project, cache = places["project"], places["cache"]
    monkeypatch.setenv(fetch.ENV_VARIABLE, places["variable"])
    found = find_diffusers_tests(project, VERSION, cache)
    assert (found.path, found.source) == (os.path.join(places["variable"], "tests"), "$SCOREFUSION_DIFFUSERS_TESTS")
    monkeypatch.delenv(fetch.ENV_VARIABLE)
    found = find_diffusers_tests(project, VERSION, cache)
    assert (found.path, found.source) == (os.path.join(places["shared"], "tests"), "../shared/diffusers-tests")
    os.rename(places["shared"], places["shared"] + ".away")
    found = find_diffusers_tests(project, VERSION, cache)
    assert found.source == "cache"
    assert found.path == os.path.join(cache, "diffusers-tests", f"v{VERSION}", "tests")
    assert [place for place, _, _ in found.searched] == ["$SCOREFUSION_DIFFUSERS_TESTS", "../shared/diffusers-tests",
                                                         "cache"]  # fmt: skip
    found = find_diffusers_tests(project, "0.41.0", cache)  # another version's cache is not this one's
    assert found.path is None
    assert found.reason == ("not found at $SCOREFUSION_DIFFUSERS_TESTS (not set), ../shared/diffusers-tests "
                            "(missing), cache (missing)")  # fmt: skip


def test_a_variable_without_tests_is_not_silently_replaced(places, monkeypatch, tmp_path):
    monkeypatch.setenv(fetch.ENV_VARIABLE, str(tmp_path / "nothing"))
    found = find_diffusers_tests(places["project"], VERSION, places["cache"])
    assert found.path is None and "is set to" in found.reason and "nothing" in found.reason


def test_development_versions_have_no_release_tag():
    with pytest.raises(ValueError, match="'0.43.0.dev0' is a development version"):
        fetch.release_tag("0.43.0.dev0")
    assert fetch.release_tag(VERSION) == "v0.42.1"


@pytest.fixture
def remote(tmp_path):
    """A git repository laid out like Diffusers, tagged v0.42.1, with a later commit on main."""
    path = tmp_path / "remote"
    path.mkdir()
    _write(str(path / "tests" / MARKER), "TAGGED = True\n")
    _write(str(path / "tests" / "pipelines" / "flux" / "test_pipeline_flux.py"))
    _write(str(path / "src" / "diffusers" / "__init__.py"))
    _git(path, "init", "-q")
    _git(path, "config", "uploadpack.allowFilter", "true")  # as GitHub: the partial clone's filter is honoured
    _git(path, "add", "-A")
    _git(path, "commit", "-qm", "release")
    _git(path, "tag", f"v{VERSION}")
    tagged = _git(path, "rev-parse", "HEAD")
    _write(str(path / "tests" / MARKER), "TAGGED = False\n")
    _git(path, "commit", "-qam", "after the release")
    return dict(url=f"file://{path}", tagged=tagged)


def test_fetch_clones_only_tests_of_the_release_tag_shallowly(remote, tmp_path):
    cache = str(tmp_path / "cache")
    tests, message = fetch_diffusers_tests(VERSION, cache, repository=remote["url"], timeout=60)
    checkout = os.path.join(cache, "diffusers-tests", f"v{VERSION}")
    assert tests == os.path.join(checkout, "tests") and message.startswith("fetched Diffusers' tests (v0.42.1, ")
    with open(os.path.join(tests, MARKER)) as handle:
        assert handle.read() == "TAGGED = True\n"  # the tag's files, not the branch's newer ones
    assert os.path.isfile(os.path.join(tests, "pipelines", "flux", "test_pipeline_flux.py"))
    assert not os.path.exists(os.path.join(checkout, "src"))  # sparse: only tests/ is checked out
    assert _git(checkout, "rev-list", "--count", "HEAD") == "1"  # shallow
    assert fetch.fetched_record(tests) == {"repository": remote["url"], "tag": "v0.42.1", "commit": remote["tagged"]}
    assert fetch.last_fetch(cache)["ok"] is True
    assert [name for name in os.listdir(os.path.dirname(checkout)) if name.startswith(".fetching")] == []
    found = find_diffusers_tests(str(tmp_path / "project"), VERSION, cache)  # the harness now finds it
    assert (found.path, found.source) == (tests, "cache")
    again, message = fetch_diffusers_tests(VERSION, cache, repository="file:///nowhere", timeout=60)
    assert again == tests and "already in" in message  # no network needed once fetched


def test_fetch_fails_softly_and_fast_when_the_repository_cannot_be_reached(tmp_path):
    cache = str(tmp_path / "cache")
    start = time.monotonic()
    tests, message = fetch_diffusers_tests(VERSION, cache, repository=f"file://{tmp_path}/missing", timeout=60)
    assert time.monotonic() - start < 10
    assert tests is None and message.startswith("Diffusers' tests were not fetched (v0.42.1 of file://")
    assert "\n" not in message
    assert fetch.last_fetch(cache) == dict(fetch.last_fetch(cache), ok=False, message=message, version=VERSION)
    assert os.listdir(os.path.join(cache, "diffusers-tests")) == ["last-fetch.json"]  # nothing half-written
    found = find_diffusers_tests(str(tmp_path / "project"), VERSION, cache)
    assert found.path is None and f"cache (missing (last fetch: {message}))" in found.reason


def test_fetch_of_a_missing_tag_says_so(remote, tmp_path):
    tests, message = fetch_diffusers_tests("0.40.0", str(tmp_path / "cache"), repository=remote["url"], timeout=60)
    assert tests is None and message == f"Diffusers' tests were not fetched: {remote['url']} has no tag v0.40.0"


def test_the_command_exits_0_with_one_sentence_offline(tmp_path, places):
    env = dict(os.environ, PYTHONPATH=ROOT, SCOREFUSION_CACHE=str(tmp_path / "empty-cache"))
    env.pop(fetch.ENV_VARIABLE, None)
    command = [sys.executable, "-m", "diffusers_scorefusion.testing.fetch_diffusers_tests", "--repository",
               f"file://{tmp_path}/missing", "--project-root", str(tmp_path / "alone")]  # fmt: skip
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.count("\n") == 1 and "were not fetched" in completed.stdout



def test_the_command_fetches_nothing_when_the_tests_are_found(places, capsys):
    # ../shared/diffusers-tests is beside the project: nothing to fetch, no git run
    assert fetch.main(["--repository", "file:///nowhere", "--project-root", places["project"]]) == 0
    output = capsys.readouterr().out
    expected = f"Diffusers' own tests found at {places['shared']}/tests (../shared/diffusers-tests); nothing to fetch"
    assert output == expected + "\n"


def _pytest_summary(tmp_path, variable):
    env = dict(os.environ, PYTHONPATH=ROOT, SCOREFUSION_CACHE=str(tmp_path / "cache"), **{fetch.ENV_VARIABLE: variable})
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:randomly",
               os.path.join(ROOT, "tests", "test_output_folders.py"), "-k", "refused"]  # fmt: skip
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stdout[-2000:]
    return completed.stdout


def test_the_test_summary_says_when_the_suites_did_not_run_and_why(tmp_path):
    output = _pytest_summary(tmp_path, str(tmp_path / "nothing"))
    assert "Diffusers' own tests were NOT run: upstream tests not found" in output
    assert f"Diffusers' own suites did not run: $SCOREFUSION_DIFFUSERS_TESTS is set to '{tmp_path}/nothing'" in output
    assert "python -m diffusers_scorefusion.testing.fetch_diffusers_tests" in output


def test_the_test_summary_says_where_the_suites_were_found(tmp_path, monkeypatch):
    import upstream_harness  # tests/diffusers_suite, on sys.path (tests/conftest.py)

    _write(str(tmp_path / "checkout" / "tests" / MARKER))
    _write(str(tmp_path / "checkout" / "FETCHED.json"), json.dumps({"commit": "abc123"}))
    monkeypatch.setenv(fetch.ENV_VARIABLE, str(tmp_path / "checkout"))

    class Reporter:
        lines = []

        def write_sep(self, separator, text):
            self.lines.append(text)

        def write_line(self, text):
            self.lines.append(text)

    reporter = Reporter()
    upstream_harness.pytest_terminal_summary(reporter, SimpleNamespace())  # a session that selected none of them
    assert reporter.lines == [
        "Diffusers' own tests: none ran in this session",
        f"found at {tmp_path}/checkout/tests ($SCOREFUSION_DIFFUSERS_TESTS, commit abc123), but no test of "
        "tests/diffusers_suite was selected",
    ]


def test_a_git_that_hangs_is_stopped_by_the_timeout(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "git"
    _write(str(fake), "#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    start = time.monotonic()
    tests, message = fetch_diffusers_tests(VERSION, str(tmp_path / "cache"), repository="file:///x", timeout=1)
    assert time.monotonic() - start < 10
    assert tests is None and message == "Diffusers' tests were not fetched: git took longer than 1 s (v0.42.1 of file:///x)"
