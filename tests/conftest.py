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

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)
