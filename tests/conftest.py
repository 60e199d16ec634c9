import os

os.environ["HF_HUB_OFFLINE"] = "1"
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
