"""`llada-hf export MODEL OUT --format official|gguf`: the official GSAI-ML layout or a GGUF file for llama.cpp."""

import argparse

from ..export import export_checkpoint
from ..loading import check_model_path


def run(args: argparse.Namespace) -> None:
    """Write the export and print where it went."""
    check_model_path(args.model)
    print(export_checkpoint(args.model, args.output, format=args.format, dtype=args.dtype, overwrite=args.overwrite,
                            ship_bundle=args.ship_bundle, tokenizer_pre=args.tokenizer_pre, code_repo=args.code_repo))
