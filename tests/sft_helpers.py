"""Builders for the trainer tests, also imported by the script that the two-process test launches.

The task: reverse a string of letters, `"reverse a b c d ="` -> `" d c b a"`, checkable by exact match.
"""

import functools
import random

from datasets import Dataset
from helpers import tokenizer_model

from llada_hf import LladaForMaskedDiffusion
from llada_hf.tokenization import train_tokenizer
from llada_hf.trainers import DiffusionSFTConfig


LETTERS = "abcdef"


def reversal_pairs(n: int, length: int = 4, seed: int = 0) -> list[tuple[str, str]]:
    """n (prompt, completion) pairs of the reversal task."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        letters = [rng.choice(LETTERS) for _ in range(length)]
        pairs.append(("reverse " + " ".join(letters) + " =", " " + " ".join(reversed(letters))))
    return pairs


def reversal_dataset(n: int, length: int = 4, seed: int = 0) -> Dataset:
    pairs = reversal_pairs(n, length, seed)
    return Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})


@functools.cache
def build_tokenizer():
    """A small BPE tokenizer with LLaDA's special tokens; every letter (with its space) is one token."""
    texts = [p + c for p, c in reversal_pairs(300, seed=123)]
    texts += ["the quick brown fox jumps over the lazy dog", "user assistant system hello there how are you"]
    return train_tokenizer(texts * 3, vocab_size=300)


def build_model(tokenizer=None, seed: int = 0, **overrides) -> LladaForMaskedDiffusion:
    """`tokenizer_model` for `build_tokenizer()` (by default), a little wider, in training mode as a fresh model."""
    sizes = dict(hidden_size=64, intermediate_size=128, max_position_embeddings=128)
    return tokenizer_model(tokenizer or build_tokenizer(), seed, **{**sizes, **overrides}).train()


def build_args(output_dir, **overrides) -> DiffusionSFTConfig:
    """CPU-friendly settings: float32, no checkpointing, no reporting, log every step, save nothing."""
    kwargs = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, max_steps=3, learning_rate=1e-3,
        bf16=False, gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no",
        disable_tqdm=True, max_length=64,
    )
    kwargs.update(overrides)
    return DiffusionSFTConfig(**kwargs)


def logged_losses(trainer) -> dict[int, float]:
    """The training loss logged at each step."""
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
