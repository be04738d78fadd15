"""`llada-hf demo`: the reversal experiment in miniature (the main job), or with `--vision` the LLaDA-V miniature."""

import argparse

from llada_hf_cli import DEMO_OUTPUT_DIR, CliError

from ..demo import DEFAULT, LARGE, QUICK, run_demo
from ..demo_vision import DEFAULT_VISION, QUICK_VISION, run_vision_demo


VISION_OUTPUT_DIR = "outputs/demo-vision"


def run(args: argparse.Namespace) -> None:
    """Run the demo of the chosen size; its results go to `--output-dir`."""
    if args.vision:
        run_vision(args)
        return
    settings = QUICK if args.quick else LARGE if args.large else DEFAULT
    run_demo(args.output_dir, seed=args.seed, settings=settings)


def run_vision(args: argparse.Namespace) -> None:
    """The LLaDA-V miniature, in its own folder unless `--output-dir` names one."""
    if args.large:
        raise CliError("--large has no vision variant: use `llada-hf demo --vision` or `--vision --quick`.")
    output_dir = VISION_OUTPUT_DIR if args.output_dir == DEMO_OUTPUT_DIR else args.output_dir
    run_vision_demo(output_dir, seed=args.seed, settings=QUICK_VISION if args.quick else DEFAULT_VISION)
