"""Upstream tests that pass on the stock pipeline and are not run on the fusion, each with its reason.

Allowed only where passing would break a promise of this package (never unpickling, never running code from a config)
or where the test inspects a single UNet's internals. README.md lists them; a test of ours checks the behaviour each
one stands for.
"""

EXCEPTIONS = {}
