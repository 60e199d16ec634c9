import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
# A private Hugging Face cache: nothing here can be downloaded, and tests that need a Hub repo (Diffusers' own tests
# load a few tiny ones) get stand-ins built in code and written here (tests/diffusers_suite/hub_stand_ins.py). Set
# before anything imports huggingface_hub, which reads it once.
_HF_HOME = tempfile.mkdtemp(prefix="scorefusion-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = _HF_HOME
os.environ.pop("HF_HUB_CACHE", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while waiting make 2-thread forwards ~100x slower when other processes share the 2 cores
# (measured: 3.9 s vs 0.04-0.07 s for a tiny UNet forward at load 7). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The harness of Diffusers' own tests is a plugin, not that folder's conftest, so that the process that prints the
# summary loads it too (pytest-xdist's controller never collects, so it never loads a subfolder's conftest).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "diffusers_suite"))
pytest_plugins = ["upstream_harness"]

# one thread per pytest-xdist worker (`-n 2` on 2 cores), two otherwise
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)

