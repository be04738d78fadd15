"""Moved: the reference implementations are the `llada_reference` package (benchmarks/llada_reference/).

This module only keeps `from reference_llada import ...` working in test files not yet updated; import from
`llada_reference` instead.
"""

from llada_reference import reference_generate, reference_logits  # noqa: F401
