import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import `helpers` and `reference_llada` as modules
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
