"""Test settings and the shared tiny builders as fixtures (the builders: helpers.py and sft_helpers.py).

`helpers`, `sft_helpers` and the reference implementations (`llada_reference`, in benchmarks/) are importable
as top-level modules through `pythonpath` in pyproject.toml. The fixtures import them on first use, so the
environment below is set before transformers is imported.
"""

import os

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread is much faster than two (no cross-thread synchronisation per small op), and
# subprocesses started by tests inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_llada():
    """A fresh `helpers.tiny_model()`: ids only, vocabulary EMBEDDING_ROWS, mask MASK_ID, eval mode."""
    from helpers import tiny_model

    return tiny_model()


@pytest.fixture(scope="session")
def text_tokenizer():
    """A small byte-level BPE tokenizer with LLaDA's special tokens (`sft_helpers.build_tokenizer`). Shared:
    do not change it."""
    from sft_helpers import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def text_model(text_tokenizer):
    """A fresh `helpers.tokenizer_model(text_tokenizer)`, eval mode."""
    from helpers import tokenizer_model

    return tokenizer_model(text_tokenizer)
