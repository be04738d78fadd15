"""Evaluation of masked diffusion LMs: the Monte-Carlo ELBO likelihood and greedy answer matching.

The lm-evaluation-harness model lives in `llada_hf.evaluation.lm_eval_adapter` (optional extra `eval`),
imported on demand so that `lm_eval` is needed only there.
"""

from .likelihood import greedy_match, log_likelihood


__all__ = ["log_likelihood", "greedy_match"]
