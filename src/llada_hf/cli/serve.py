"""`llada-hf serve MODEL`: the OpenAI-compatible server (the flags: `llada_hf_cli.add_serve_options`)."""

import argparse

from ..serving.server import run_from_args


def run(args: argparse.Namespace) -> None:
    """Load the model and serve until SIGINT/SIGTERM."""
    run_from_args(args)
