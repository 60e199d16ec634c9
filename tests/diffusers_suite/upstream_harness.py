"""The harness that runs Diffusers' own fast pipeline tests against the fusion (see upstream.py and
docs/works-like-diffusers.md): a pytest plugin that tests/conftest.py loads in every process, the pytest-xdist
controller included.

Per upstream test it records the stock result (from the committed baseline of the installed Diffusers version, or
rerun with `--upstream-stock`) and the fusion results, and prints the table at the end. A fusion test whose stock
twin did not pass is skipped (it says nothing about the fusion); a fusion test that skips while its stock twin
passed is a failure (it would hide a difference), unless it is a listed exception (exceptions.py).
"""

import json
import os
import platform
from typing import Any, Dict, List, Optional

import diffusers
import pytest
import torch
from exceptions import exception_reason  # this folder is on sys.path, as for every test module here
from hub_stand_ins import write_stand_ins
from upstream import FUSION_VARIANTS, VARIANTS, upstream_commit, upstream_location, upstream_root

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINE = os.path.join(HERE, "baseline", f"diffusers-{diffusers.__version__}.json")
STOCK_OPTION = "--upstream-stock"
REPORT_OPTION = "--upstream-report"
ALL_VARIANTS_OPTION = "--upstream-all-variants"


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("diffusers-suite", "Diffusers' own tests against the fusion")
    group.addoption(STOCK_OPTION, action="store_true", default=False,
                    help="also run the stock upstream classes and rewrite the baseline file of this Diffusers version")
    group.addoption(REPORT_OPTION, default=None, help="write the stock-vs-fusion table (markdown) to this file")
    group.addoption(ALL_VARIANTS_OPTION, action="store_true", default=False,
                    help="run the whole suite on the two-member fusion for every pipeline (by default it runs for the "
                         "ScoreFusion pipelines, and the stock comparison for the others)")  # fmt: skip

_CONFIG: Dict[str, Any] = {}


def pytest_configure(config: Any) -> None:
    _CONFIG["config"] = config
    if upstream_root() is None:
        return
    write_stand_ins(os.path.join(os.environ["HF_HOME"], "hub"))
    _register_upstream_markers(config)
    config._upstream_results = {}  # {upstream test id: {variant: outcome}}, filled from the reports
    config._upstream_ours = {}  # {variant: {test id: outcome}} of the harness's own stock-equality tests
    baseline = _load_baseline()
    config._upstream_run_stock = config.getoption(STOCK_OPTION) or baseline is None
    config._upstream_baseline = baseline or {}


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    """Diffusers' model loader sets torch's default dtype and restores it only when loading succeeds: a test failing
    inside it would change every later test in the process. Each test starts with the dtype it found."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


def _register_upstream_markers(config: Any) -> None:
    """Registers every `pytest.mark.<name>` the upstream tests use (this project runs pytest with --strict-markers)."""
    import re

    known = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}
    names = set()
    for folder, _, files in os.walk(upstream_root()):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    names.update(re.findall(r"pytest\.mark\.([A-Za-z_]+)", handle.read()))
    for name in sorted(names - known):
        config.addinivalue_line("markers", f"{name}: used by Diffusers' own tests")


def _load_baseline() -> Optional[Dict[str, str]]:
    if not os.path.isfile(BASELINE):
        return None
    with open(BASELINE, encoding="utf-8") as handle:
        return json.load(handle)["results"]


def _variant(item: Any) -> Optional[str]:
    return getattr(getattr(item, "cls", None), "upstream_variant", None)


def _is_ours(test_name: str) -> bool:
    """Tests the harness adds to each fusion class (not upstream tests: no stock twin, not in the table)."""
    return test_name.startswith("test_scorefusion_")


def upstream_id(item: Any) -> str:
    """`pipelines/.../test_x.py::UpstreamClass::test_name[params]` of a derived test item."""
    return f"{item.cls.upstream_test}::{item.name}"


def pytest_collection_modifyitems(config: Any, items: List[Any]) -> None:
    if upstream_root() is None:
        return
    baseline, run_stock = config._upstream_baseline, config._upstream_run_stock
    kept, deselected = [], []
    for item in items:
        variant = _variant(item)
        if variant is None:  # not a harness test (the hook sees the whole session's items)
            kept.append(item)
            continue
        if variant == "stock" and not run_stock:
            deselected.append(item)
            continue
        if not (item.cls.upstream_full_suite or _is_ours(item.name) or config.getoption(ALL_VARIANTS_OPTION)):
            deselected.append(item)
            continue
        kept.append(item)
        if variant in FUSION_VARIANTS and not run_stock and not _is_ours(item.name):
            stock = baseline.get(upstream_id(item))
            if stock is None:
                item.add_marker(pytest.mark.skip(reason="not in the stock baseline: rerun with --upstream-stock"))
            elif stock != "passed":
                item.add_marker(pytest.mark.skip(reason=f"stock {stock}"))
            elif (reason := exception_reason(upstream_id(item), variant)) is not None:
                item.add_marker(pytest.mark.skip(reason=f"listed exception: {reason}"))
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


def _outcome(report: Any) -> str:
    if report.failed:
        return "failed"
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        return "skipped: " + reason.replace("Skipped: ", "")
    return "passed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any):
    outcome = yield
    variant = _variant(item)
    if variant is None:
        return
    report = outcome.get_result()
    config = item.config
    key = upstream_id(item)
    stock = config._upstream_baseline.get(key) if not config._upstream_run_stock else None
    own_skip = any(mark.name == "skip" for mark in item.iter_markers())
    if variant in FUSION_VARIANTS and report.skipped and stock == "passed" and not own_skip:
        report.outcome = "failed"  # a skip only on the fusion hides a difference
        report.longrepr = f"fusion-only skip (the stock pipeline passes this test): {report.longrepr}"
    # carried to the process that prints the table (also from pytest-xdist workers)
    report.user_properties.append(("upstream", (key, variant)))


def pytest_runtest_logreport(report: Any) -> None:
    found = [value for name, value in report.user_properties if name == "upstream"]
    config = _CONFIG.get("config")
    if not found or config is None:
        return
    key, variant = found[-1]
    if _is_ours(key.rsplit("::", 1)[-1]):
        if report.when == "call" or report.failed:
            config._upstream_ours.setdefault(variant, {})[key] = _outcome(report)
        return
    results = config._upstream_results.setdefault(key, {})
    previous = results.get(variant)
    if previous is None or previous == "passed" or report.failed:
        if report.when == "call" or report.failed or report.skipped or previous is None:
            results[variant] = _outcome(report)


def _short(outcome: Optional[str]) -> str:
    if outcome is None:
        return "-"
    if outcome.startswith("skipped: listed exception"):
        return "exception"
    return outcome if not outcome.startswith("skipped") else "skipped"


def _table(config: Any) -> List[str]:
    results = config._upstream_results
    baseline = config._upstream_baseline
    lines = ["| upstream test | stock | fusion (1 member) | fusion (2 members, one-hot) |", "| --- | --- | --- | --- |"]
    for key in sorted(results):
        stock = results[key].get("stock") or baseline.get(key)
        cells = [_short(stock)] + [_short(results[key].get(variant)) for variant in FUSION_VARIANTS]
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    return lines


def _suite_table(config: Any) -> List[str]:
    """One row per upstream test file: how many of its tests pass on the stock pipeline and on each fusion."""
    rows: Dict[str, Dict[str, int]] = {}
    for key, by_variant in config._upstream_results.items():
        stock = by_variant.get("stock") or config._upstream_baseline.get(key)
        row = rows.setdefault(key.split("::", 1)[0], {})
        row["stock passed"] = row.get("stock passed", 0) + (stock == "passed")
        for variant in FUSION_VARIANTS:
            outcome = by_variant.get(variant)
            if outcome is None or stock != "passed":
                continue
            short = _short(outcome)
            row[f"{variant} run"] = row.get(f"{variant} run", 0) + 1
            row[f"{variant} {short}"] = row.get(f"{variant} {short}", 0) + 1
    lines = ["| upstream suite | stock passed | fusion, 1 member: passed / listed exception / failed | "
             "fusion, 2 members one-hot: run / passed / listed exception / failed |",
             "| --- | --- | --- | --- |"]  # fmt: skip
    for suite in sorted(rows):
        row = rows[suite]
        cells = [str(row["stock passed"])]
        for variant in FUSION_VARIANTS:
            run, passed, excepted = (row.get(f"{variant} {name}", 0) for name in ("run", "passed", "exception"))
            counts = [passed, excepted, run - passed - excepted]
            cells.append(" / ".join(map(str, counts if variant == "fusion1" else [run] + counts)))
        lines.append(f"| `{suite}` | " + " | ".join(cells) + " |")
    return lines


def _counts(config: Any) -> Dict[str, Dict[str, int]]:
    counts: Dict[str, Dict[str, int]] = {}
    for key, by_variant in config._upstream_results.items():
        stock = by_variant.get("stock") or config._upstream_baseline.get(key)
        for variant in VARIANTS:
            outcome = stock if variant == "stock" else by_variant.get(variant)
            if outcome is None:
                continue
            bucket = counts.setdefault(variant, dict.fromkeys(("passed", "failed", "skipped", "exception"), 0))
            bucket[_short(outcome)] += 1
            if variant != "stock":
                bucket.setdefault("fusion-only failures", 0)
                if stock == "passed" and outcome != "passed" and exception_reason(key, variant) is None:
                    bucket["fusion-only failures"] += 1
    return counts


def pytest_terminal_summary(terminalreporter: Any, config: Any) -> None:
    location = upstream_location()
    if location.path is None:
        terminalreporter.write_sep("=", "Diffusers' own tests were NOT run: upstream tests not found")
        terminalreporter.write_line(f"Diffusers' own suites did not run: {location.reason}.")
        terminalreporter.write_line("Fetch them (needs git and access to GitHub) with "
                                    "`python -m diffusers_scorefusion.testing.fetch_diffusers_tests`, or set "
                                    "SCOREFUSION_DIFFUSERS_TESTS to a Diffusers checkout.")  # fmt: skip
        return
    source = f"{location.path} ({location.source}, commit {upstream_commit() or 'unknown'})"
    if not getattr(config, "_upstream_results", None) and not getattr(config, "_upstream_ours", None):
        terminalreporter.write_sep("=", "Diffusers' own tests: none ran in this session")
        terminalreporter.write_line(f"found at {source}, but no test of tests/diffusers_suite was selected")
        return
    terminalreporter.write_sep("=", "Diffusers' own tests: stock vs fusion")
    suites = sorted({key.split("::", 1)[0] for key in config._upstream_results})
    plural = "s" * (len(suites) != 1)
    terminalreporter.write_line(f"ran {len(suites)} upstream suite{plural} (rows below) from {source}")
    counts = _counts(config)
    for variant, bucket in counts.items():
        terminalreporter.write_line(f"{variant}: " + ", ".join(f"{name} {n}" for name, n in bucket.items()))
    for variant, outcomes in config._upstream_ours.items():
        passed = sum(outcome == "passed" for outcome in outcomes.values())
        terminalreporter.write_line(f"{variant}: output equals the stock pipeline's bit for bit in {passed} of "
                                    f"{len(outcomes)} suites")  # fmt: skip
    for line in _suite_table(config):
        terminalreporter.write_line(line)
    if config.getoption("verbose") > 0:
        for line in _table(config):
            terminalreporter.write_line(line)
    report_path = config.getoption(REPORT_OPTION)
    if report_path:
        _write_report(config, report_path, counts)
    if config._upstream_run_stock:
        _write_baseline(config)


def _write_report(config: Any, path: str, counts: Dict[str, Dict[str, int]]) -> None:
    header = [
        f"Diffusers {diffusers.__version__}, torch {torch.__version__}, upstream tests at {upstream_commit()}",
        "",
    ]
    columns = ("passed", "failed", "skipped", "exception", "fusion-only failures")
    header += ["| variant | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    header += [f"| {variant} | " + " | ".join(str(bucket.get(name, "-")) for name in columns) + " |"
               for variant, bucket in counts.items()]  # fmt: skip
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(header + [""] + _suite_table(config) + [""] + _table(config)) + "\n")


def _write_baseline(config: Any) -> None:
    results = dict(_load_baseline() or {})
    results.update({key: by_variant["stock"] for key, by_variant in config._upstream_results.items()
                    if "stock" in by_variant})  # fmt: skip
    record = {"diffusers": diffusers.__version__, "torch": torch.__version__, "python": platform.python_version(),
              "upstream_commit": upstream_commit(), "results": dict(sorted(results.items()))}  # fmt: skip
    os.makedirs(os.path.dirname(BASELINE), exist_ok=True)
    temporary = BASELINE + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
        handle.write("\n")
    os.replace(temporary, BASELINE)
