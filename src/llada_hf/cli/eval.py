"""`llada-hf eval`: lm-evaluation-harness's own command line with the `llada_hf` model registered."""

import argparse
import sys

from llada_hf_cli import CliError


def run(args: argparse.Namespace) -> None:
    """Run lm_eval's command line on `args.flags`, with `--model llada_hf` unless they name a model."""
    try:
        from lm_eval.__main__ import cli_evaluate

        from ..evaluation import lm_eval_adapter  # noqa: F401  (registers the `llada_hf` model)
    except ImportError as error:
        raise CliError(f"`llada-hf eval` needs lm-eval: pip install -e '.[eval]' in the llada-hf checkout "
                       f"({error}).") from None
    flags = args.flags
    if "--model" not in flags and not any(flag.startswith("--model=") for flag in flags):
        flags = ["--model", "llada_hf", *flags]
    sys.argv = ["llada-hf eval", *flags]  # lm_eval parses sys.argv
    cli_evaluate()
