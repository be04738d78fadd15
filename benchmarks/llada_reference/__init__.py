"""Independent, deliberately plain reference implementations of the official LLaDA algorithms.

Written from docs/LLADA.md, not from `llada_hf`'s code, and never importing it: tests check the package
against these, and benchmarks measure against them.

- `llada`: the official architecture as a function of an official-layout state dict (`reference_logits`)
  and the official sampler (`reference_generate`).
- `likelihood`: the official Monte-Carlo ELBO and greedy decoding, and the estimator's exact expectation.

It lives beside the benchmarks so that `python benchmarks/bench_*.py` imports it as is; pytest finds it
through `pythonpath` in pyproject.toml.
"""

from .likelihood import (
    exact_expected_estimate,
    guided_logits_fn,
    masked_loss_by_count,
    model_logits_fn,
    reference_greedy_decode,
    reference_log_likelihood,
    reference_mask_counts,
)
from .llada import reference_generate, reference_logits


__all__ = [
    "exact_expected_estimate",
    "guided_logits_fn",
    "masked_loss_by_count",
    "model_logits_fn",
    "reference_generate",
    "reference_greedy_decode",
    "reference_log_likelihood",
    "reference_logits",
    "reference_mask_counts",
]
