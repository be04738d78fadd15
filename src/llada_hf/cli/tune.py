"""`llada-hf tune MODEL --dev DEV.jsonl`: measure decoding settings on a dev set, print the accuracy / speed Pareto
front, optionally save the best into the model's generation_config.json."""

import argparse
import os

from llada_hf_cli import CliError

from ..evaluation.tune import best_setting, front_table, plot_front, tune
from ..loading import check_generation_args, load_model_and_processor
from .dataset_files import check_json_records, load_local_dataset


def run(args: argparse.Namespace) -> None:
    """Measure, print the front and the chosen setting; with `--save`, write it into the model's folder."""
    check_generation_args(args)
    check_json_records(args.dev)
    records = load_local_dataset(args.dev)
    if not {"prompt", "completion"} <= set(records.column_names):
        raise CliError(f"--dev {args.dev}: each record needs 'prompt' and 'completion' fields.")
    model, tokenizer = load_model_and_processor(args.model, args.dtype, args.device)
    results = tune(model, tokenizer, records["prompt"], records["completion"], max_new_tokens=args.max_new_tokens,
                   trials=args.trials, batch_size=args.batch_size, seed=args.seed)
    print(front_table(results))
    if args.plot:
        plot_front(results, args.plot)
    chosen = best_setting(results)
    print(f"chosen (fastest within 1 point of the best accuracy): {chosen.settings or 'the defaults'} — "
          f"{chosen.accuracy:.1f} %, {chosen.tokens_per_second:.1f} answer tokens/s")
    if args.save:
        model.generation_config.update(max_new_tokens=args.max_new_tokens, **chosen.settings)
        model.generation_config.save_pretrained(args.model)
        print(f"saved into {os.path.join(args.model, 'generation_config.json')}")
