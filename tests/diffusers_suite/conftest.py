"""Without the upstream tests (see upstream.py) this folder's test modules are not collected; the harness itself is
the plugin `upstream_harness.py`, loaded by tests/conftest.py."""

from upstream import upstream_root

if upstream_root() is None:
    collect_ignore_glob = ["test_*.py"]
