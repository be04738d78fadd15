import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import `helpers` and `reference_llada` as modules
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread is much faster than two (no cross-thread synchronisation per small op), and
# subprocesses started by tests inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
