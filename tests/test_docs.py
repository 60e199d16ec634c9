"""The documentation is true to the code (issue 17): every ```python block of README.md and docs/*.md runs, offline
on tiny parts, each in a fresh namespace in an empty working folder, unless the line right above it is
`<!-- requires: real weights -->`; every relative link (and #anchor) between the pages and to files of the
repository resolves; every page of docs/ is linked from the README; the README fits on a screen or two."""

import glob
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
MARKER = "<!-- requires: real weights -->"
FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)\s*$")
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
README_MAX_LINES = 200


def _relative(path):
    return os.path.relpath(path, ROOT)


def code_blocks(path):
    """`(line number of the fence, language, code, marked)` of every fenced block of a markdown file."""
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, fence, language = match.groups()
        end = index + 1
        while end < len(lines) and not (lines[end].strip() == fence and lines[end].startswith(indent)):
            end += 1
        code = "\n".join(line[len(indent):] for line in lines[index + 1 : end])
        marked = index > 0 and lines[index - 1].strip() == MARKER
        blocks.append((index + 1, language.lower(), code, marked))
        index = end + 1
    return blocks


def _python_blocks():
    found = []
    for path in PAGES:
        for line, language, code, marked in code_blocks(path):
            if language in ("python", "py") and not marked:
                found.append(pytest.param(path, line, code, id=f"{_relative(path)}:{line}"))
    return found


def _prose(path):
    """The page without its fenced code blocks and inline code (links there are examples, not links)."""
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    kept, fence = [], None
    for line in lines:
        match = FENCE.match(line)
        if match and fence is None:
            fence = match.group(2)
        elif fence is not None and line.strip() == fence:
            fence = None
        elif fence is None:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def anchors(path):
    """GitHub's heading anchors of a markdown page."""
    result = set()
    for line in _prose(path).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            result.add(text.replace(" ", "-"))
    return result


def test_the_pages_exist_and_python_blocks_are_found():
    names = {_relative(path) for path in PAGES}
    for page in ("getting-started", "fitting", "sampling", "saving-and-sharing", "flux-and-sd3", "works-like-diffusers",
                 "experiments", "cli", "benchmarks", "safety"):  # fmt: skip
        assert f"docs/{page}.md" in names
    assert len(_python_blocks()) >= 10


@pytest.mark.parametrize("path, line, code", _python_blocks())
def test_python_block_runs(path, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    try:
        exec(compile(code, f"{_relative(path)}:{line}", "exec"), {"__name__": "__docs__"})
    finally:
        torch.set_num_threads(threads)


def test_marked_blocks_are_python_and_marks_stand_right_above_a_block():
    for path in PAGES:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        for number, line in enumerate(lines):
            if line.strip() == MARKER:
                following = lines[number + 1] if number + 1 < len(lines) else ""
                assert following.strip() == "```python", f"{_relative(path)}:{number + 1}: a mark with no python block"


@pytest.mark.parametrize("path", PAGES, ids=[_relative(path) for path in PAGES])
def test_relative_links_resolve(path):
    broken = []
    for target in LINK.findall(_prose(path)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(resolved):
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{_relative(path)}: broken links: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    readme = _prose(os.path.join(ROOT, "README.md"))
    linked = {os.path.normpath(target.partition("#")[0]) for target in LINK.findall(readme)}
    missing = [_relative(path) for path in PAGES[1:] if _relative(path) not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_the_readme_fits_on_a_screen_or_two():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        assert len(handle.read().splitlines()) <= README_MAX_LINES
