"""`llada-hf tune MODEL --dev DEV.jsonl`: measure decoding settings on a dev set, print the accuracy / speed Pareto
front, optionally save the best into the model's generation_config.json. With `--learn`: learn a decoding policy from
the model's own exact decoding of the dev prompts instead, compare it with the defaults, optionally save it."""

import argparse
import os

from llada_hf_cli import CliError

from ..evaluation.tune import best_setting, front_table, measure_setting, plot_front, tune
from ..loading import check_generation_args, load_model_and_processor
from .dataset_files import check_json_records, load_local_dataset


DEFAULT_TRIALS = 12


def run(args: argparse.Namespace) -> None:
    """Measure, print the front and the chosen setting; with `--save`, write it into the model's folder."""
    check_generation_args(args)
    if args.learn and (args.trials is not None or args.plot):
        raise CliError("--learn learns one policy and compares it with the defaults: drop --trials and --plot (they "
                       "belong to the search of hand-set settings).")
    check_json_records(args.dev)
    records = load_local_dataset(args.dev)
    if not {"prompt", "completion"} <= set(records.column_names):
        raise CliError(f"--dev {args.dev}: each record needs 'prompt' and 'completion' fields.")
    model, tokenizer = load_model_and_processor(args.model, args.dtype, args.device)
    if args.learn:
        return learn(args, model, tokenizer, records)
    results = tune(model, tokenizer, records["prompt"], records["completion"], max_new_tokens=args.max_new_tokens,
                   trials=args.trials or DEFAULT_TRIALS, batch_size=args.batch_size, seed=args.seed)
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


def learn(args: argparse.Namespace, model, tokenizer, records) -> None:
    """`--learn`: traces of the exact decoder on the dev prompts -> a policy; the defaults, the exact decoder and the
    policy measured on the dev set; with `--save`, the policy (and its block length) into generation_config.json."""
    from ..trainers.policy import PolicyTrainingConfig, learn_decoding_policy

    config = PolicyTrainingConfig(max_new_tokens=args.max_new_tokens, block_length=args.block_length,
                                  batch_size=args.batch_size, hidden_size=args.hidden_size,
                                  target_precision=args.target_precision, seed=args.seed)
    prompts, references = records["prompt"], records["completion"]
    policy = learn_decoding_policy(model, tokenizer, prompts, config)
    info = policy["info"]
    print(f"learned from {info['positions']} masked positions of {info['prompts']} prompts (exact decoder, "
          f"{args.max_new_tokens} tokens, block {args.block_length}); commit threshold {policy['threshold']:.4f}, "
          f"held-out precision {_percent(info['commit_held_out_precision'])}, recall "
          f"{_percent(info['commit_held_out_recall'])}; block-done head: "
          + (f"threshold {policy['block_done']['threshold']:.4f}" if "block_done" in policy else "none"))
    exact = {"block_length": args.block_length, "steps": args.max_new_tokens}
    settings = [{}, exact, {**exact, "decoding_policy": policy}]
    results = [measure_setting(model, tokenizer, prompts, references, setting, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens) for setting in settings]
    print(front_table(results, every_trial=True))
    if args.save:
        model.generation_config.update(decoding_policy=policy, block_length=args.block_length)
        model.generation_config.save_pretrained(args.model)
        print(f"saved the policy (and block_length={args.block_length}) into "
              f"{os.path.join(args.model, 'generation_config.json')}: generate uses it from now on")


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"
