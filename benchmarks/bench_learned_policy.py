"""The learned unmasking policy against hand-set settings on the demo's model, and with `--race` on the race's
LLaDA (the equal-quality race of bench_decoding_quality_speed.py), at answer lengths 64, 256 and 512 (issue 29).

Model: the demo's (`llada_hf.demo`): its data (`make_data`, default settings, seed 0) and its LLaDA trained as
`llada-hf demo` trains it (`train_llada`), then a second phase that teaches it to end an answer on a long canvas: the
same rows with EOS-padded answers (`pad_answers_with_eos=True`, `pad_to_multiple_of=96`), 40 epochs at 5e-4. The
demo's model alone is trained on 3-token canvases without EOS padding and answers nothing right on a canvas of 16 or
more positions (0 % at 16, 64, 256 and 512, measured); trained with EOS padding from the start it learns the padding,
not the words (6 % on its trained questions, measured). Cached under benchmarks/outputs/; `--demo-model FOLDER`
starts the second phase from a model `llada-hf demo` saved (default settings and seed), `--model FOLDER` takes a
finished one (with its tokenizer).

Questions: the demo's trained questions, both ways ("What follows A?", "What precedes B?"), answered as the demo
reads answers (`clean_answer`: the word before the end of turn): the model knows these facts, so the accuracy says
what a decoder loses. The questions of the first `--dev-pairs` pairs are the user's prompts: the policy learns from
them and the tuner searches on them; those of the next `--eval-pairs` pairs are scored.

Settings, each the same `generate`; all but the default run blocks of 32 with a bounded canvas (`canvas_tail=32`: the
prompt, the block and 32 positions, what the model was trained on; without it this model answers nothing at 256 and
512), and "adaptive" means `steps` unset (one per position as the bound):
- default: the library defaults, `generate(max_new_tokens=L)`: one block, one token per step (the official sampler);
- exact: one token per step, the decoder the policy learns from;
- tau X: `confidence_threshold` X, adaptive; "best tau": the fastest whose accuracy is within 1 point of exact's;
- eb X: `entropy_bound` X, adaptive; "best eb" likewise;
- tuned: `llada_hf.evaluation.tune` at length 64 on the dev prompts, its pick with its steps per token kept;
- learned: ONE policy, learned once at length 64 (block 32, whole canvas) from the exact decoder's traces on the dev
  prompts, adaptive, at every length;
- "+exit": the best tau and the policy with `early_exit=True` (a row stops once its answer is decided up to an EOS).

Race mode (`--race`): the same settings and measurements on the race's LLaDA and task (imported from
bench_decoding_quality_speed.py: its recipe flags at their defaults name the cached model and tokenizer,
`recipe_folder`, `load_or_train_tokenizer`; train them there with `--train-only` if missing; `--model` takes another
LLaDA with the race's tokenizer). Rows: "shift each letter by one" (`task_example`), held out as the race's (seed 123;
its training rows are seed 0, checked disjoint): the first `--eval-rows` (64; the race's quality rows) are scored,
the next `--dev-rows` (32) are the dev prompts. Score: exact match of the whole answer cut at its first EOS, as the
race scores. The model was trained on answers EOS-padded to 128 positions; every setting but the default runs the
geometry of the race's best setting (dual + tau 0.9 + early exit + tail 32, block 64): `block_length=64`,
`canvas_tail=32`, `kv_cache="dual"`, and the policy learns at block 64 (at length 64 the whole canvas; its traces are
the exact decoder's, without a cache). The default (the library's: one block, one token per step, whole canvas) is
scored on the first `--default-rows` (8) rows only, as the race scores its official sampler: at 512 it costs about
4 minutes per 16 rows on one thread. About 20 minutes on one thread; writes outputs/learned_policy_race.json and
outputs/learned_policy_race_fronts.png.

Answer tokens/s count the answer up to its end token, summed over the batch (`measure_setting`, as the tuner); a
setting whose run takes under `--repeat-below` seconds runs `--repeats` times, and the fastest run counts. It also
measures the policy's cost per step: the exact decoder with and without a copy of the policy that never fires (same
tokens, same steps), alternated.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_learned_policy.py [--demo-model outputs/demo/llada-reversal]
    .venv/bin/python benchmarks/bench_learned_policy.py --device cuda   # on a GPU
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_learned_policy.py --race   # the race's LLaDA
"""

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from bench_decoding_quality_speed import (
    add_recipe_options,
    load_or_train_tokenizer,
    recipe_folder,
    task_example,
    train_rows,
)

from llada_hf.demo import (
    DEFAULT,
    chat_prompt,
    clean_answer,
    forward_question,
    make_data,
    quiet_trainer,
    reverse_question,
    train_llada,
    training_arguments,
)
from llada_hf.evaluation.tune import best_setting, exact_match, measure_setting, tune
from llada_hf.trainers.policy import PolicyTrainingConfig, learn_decoding_policy


HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = 32
BASE = {"block_length": BLOCK, "canvas_tail": 32}  # every setting but the default
# --race: the geometry of the race's best setting (dual + tau 0.9 + early exit + tail 32, block 64), every setting
# but the default; its held-out rows are drawn with this seed (its training rows: seed 0)
RACE_BASE = {"block_length": 64, "canvas_tail": 32, "kv_cache": "dual"}
RACE_ROWS_SEED = 123
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
ENTROPY_BOUNDS = (0.01, 0.1, 0.5, 1.0)


# ---- the model and the questions -------------------------------------------------------------------------------


def model_folder(args) -> str:
    """The demo's LLaDA taught to end answers on long canvases, trained once and cached (or `--model`)."""
    if args.model:
        return args.model
    folder = os.path.join(HERE, "outputs", f"policy-demo-seed{args.seed}-eos{args.pad_to}x{args.eos_epochs}")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    from datasets import Dataset

    from transformers import AutoModel

    from llada_hf.generation_llada import DiffusionGenerationConfig
    from llada_hf.trainers import DiffusionSFTConfig, DiffusionSFTTrainer

    data = make_data(DEFAULT, args.seed)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        if args.demo_model:
            model = AutoModel.from_pretrained(args.demo_model)
        else:
            print("training the demo's LLaDA as `llada-hf demo` does", flush=True)
            model = train_llada(data.rows, data.tokenizer, DEFAULT, scratch, args.seed).model
        print(f"second phase: EOS-padded answers ({args.pad_to} positions), {args.eos_epochs} epochs", flush=True)
        model.config.max_position_embeddings = 1024  # rotary positions: lengths up to 512 need no more than a flag
        settings = replace(DEFAULT, epochs=args.eos_epochs, learning_rate=args.eos_lr)
        config = DiffusionSFTConfig(output_dir=scratch, pad_answers_with_eos=True, pad_to_multiple_of=args.pad_to,
                                    **training_arguments(settings, args.seed + 1, len(data.rows)))
        trainer = DiffusionSFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(data.rows),
                                      processing_class=data.tokenizer)
        quiet_trainer(trainer, "LLaDA").train()
    model = trainer.model
    model.generation_config = DiffusionGenerationConfig.from_model_config(model.config)  # the library's defaults
    model.save_pretrained(folder)
    data.tokenizer.save_pretrained(folder)
    print(f"trained in {time.perf_counter() - began:.0f} s", flush=True)
    return folder


def questions(tokenizer, pairs) -> tuple[list[str], list[str]]:
    """Chat prompts of the forward and reverse questions about `pairs`, and the expected words."""
    prompts, expected = [], []
    for a, b in pairs:
        prompts += [chat_prompt(tokenizer, forward_question(a)), chat_prompt(tokenizer, reverse_question(b))]
        expected += [b, a]
    return prompts, expected


def word_match(answer: str, expected: str) -> bool:
    return clean_answer(answer) == expected


@dataclass
class Task:
    """A model and its questions: all the measurement knows of either mode."""

    model: object
    tokenizer: object
    dev_prompts: list[str]  # the policy learns from them, the tuner searches on them
    dev_expected: list[str]
    prompts: list[str]  # scored
    expected: list[str]
    score: Callable[[str, str], bool]  # score(answer, expected): the answer is cut at its end token
    base: dict  # every setting but the default: block, canvas (and cache); the policy learns at this block
    summary: str  # the first line printed


def demo_task(args) -> Task:
    """The demo's model (trained and cached, or `--model`) and its trained questions."""
    from transformers import AutoModel, AutoTokenizer

    import llada_hf  # noqa: F401  (registers the Auto classes)

    folder = model_folder(args)
    model = AutoModel.from_pretrained(folder).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = make_data(DEFAULT, args.seed)
    dev_prompts, dev_expected = questions(tokenizer, data.qa_pairs[: args.dev_pairs])
    eval_pairs = data.qa_pairs[args.dev_pairs : args.dev_pairs + args.eval_pairs]
    prompts, expected = questions(tokenizer, eval_pairs)
    return Task(model, tokenizer, dev_prompts, dev_expected, prompts, expected, word_match, BASE,
                f"model {folder}; {len(dev_prompts)} dev prompts, {len(prompts)} scored questions")


def race_task(args) -> Task:
    """The race's LLaDA (bench_decoding_quality_speed.py's recipe at its defaults, as cached there; or `--model`)
    and its task's held-out rows: the first `--eval-rows` are scored (the race's quality rows), the next `--dev-rows`
    are the dev set. Scored by exact match of the whole answer, as the race scores."""
    from transformers import AutoModel

    import llada_hf  # noqa: F401  (registers the Auto classes)

    recipe_parser = argparse.ArgumentParser()
    add_recipe_options(recipe_parser)
    recipe = recipe_parser.parse_args([])  # the flags that name the race's cached model and tokenizer
    tokenizer = load_or_train_tokenizer(recipe)
    folder = args.model or recipe_folder("llada", recipe)
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise SystemExit(f"no model at {folder}: train it with bench_decoding_quality_speed.py --train-only")
    model = AutoModel.from_pretrained(folder).to(args.device).eval()
    rng = random.Random(RACE_ROWS_SEED)
    rows = [task_example(rng, recipe) for _ in range(args.eval_rows + args.dev_rows)]
    prompts = [prompt for prompt, _ in rows]
    trained = {prompt for prompt, _ in train_rows(recipe)}
    assert len(set(prompts)) == len(prompts) and not trained & set(prompts), "dev, scored and training rows overlap"
    scored, dev = rows[: args.eval_rows], rows[args.eval_rows :]
    return Task(model, tokenizer, [p for p, _ in dev], [a for _, a in dev], [p for p, _ in scored],
                [a for _, a in scored], exact_match, RACE_BASE,
                f"race model {folder}; {len(dev)} dev rows, {len(scored)} scored rows (held-out, seed "
                f"{RACE_ROWS_SEED}); settings but the default: {RACE_BASE}")


# ---- measuring ------------------------------------------------------------------------------------------------------


def measure(task: Task, settings: dict, length: int, args, rows: int | None = None) -> dict:
    """Accuracy, answer tokens/s (the fastest of `--repeats` runs when a run is short) and forward passes per batch,
    on the task's scored prompts (the first `rows` of them if given)."""
    settings = dict(settings, allow_beyond_context=True)
    best = None
    for _ in range(args.repeats):
        began = time.perf_counter()
        trial = measure_setting(task.model, task.tokenizer, task.prompts[:rows], task.expected[:rows], settings,
                                score=task.score, batch_size=args.batch_size, max_new_tokens=length)
        seconds = time.perf_counter() - began
        if best is None or trial.tokens_per_second > best.tokens_per_second:
            best = trial
        if seconds >= args.repeat_below:
            break
    return {"accuracy": best.accuracy, "tokens_per_second": best.tokens_per_second, "nfe": best.nfe}


def scaled(settings: dict, length: int) -> dict:
    """A setting chosen at length 64, for `length`: its steps per token kept."""
    settings = dict(settings)
    if "steps" in settings:
        block = min(settings.get("block_length", 64), length)
        settings["steps"] = max(-(-length // block), round(length * settings["steps"] / 64))
    return settings


def step_overhead(task: Task, policy: dict, length: int, args, repeats: int = 5) -> float:
    """Seconds per step of the exact decoder with a never-firing copy of `policy` over seconds per step without it,
    minus 1 (the runs alternate; the fastest of `repeats` each)."""
    from llada_hf.decoding_llada import left_pad

    silent = json.loads(json.dumps(policy))
    silent["threshold"] = 1.0
    if "block_done" in silent:
        silent["block_done"]["threshold"] = 1.0
    model = task.model
    rows = [task.tokenizer(prompt, add_special_tokens=False).input_ids for prompt in task.prompts[: args.batch_size]]
    ids, mask = left_pad(rows, model.generation_config.pad_token_id)
    settings = dict(task.base, attention_mask=mask.to(model.device), max_new_tokens=length, steps=length,
                    allow_beyond_context=True)
    times = {"without": [], "with": []}
    outputs = {}
    for _ in range(repeats):
        for name, extra in (("without", {}), ("with", {"decoding_policy": silent})):
            began = time.perf_counter()
            outputs[name] = model.generate(ids.to(model.device), **settings, **extra)
            times[name].append(time.perf_counter() - began)
    assert torch.equal(outputs["with"], outputs["without"]), "a never-firing policy changed the tokens"
    return min(times["with"]) / min(times["without"]) - 1


# ---- the run --------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--race", action="store_true", help="the race's LLaDA and task (bench_decoding_quality_speed)"
                        " instead of the demo's")
    parser.add_argument("--model", help="a llada-hf model folder with its tokenizer (default: trained and cached); "
                        "with --race: the race's LLaDA (default: its cached one; the tokenizer is the race's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo-model", help="start the second phase from this `llada-hf demo` model folder")
    parser.add_argument("--pad-to", type=int, default=96, help="second phase: answers EOS-padded to this length")
    parser.add_argument("--eos-epochs", type=int, default=40, help="second phase: epochs")
    parser.add_argument("--eos-lr", type=float, default=5e-4, help="second phase: learning rate")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--dev-pairs", type=int, default=16, help="pairs whose questions the policy and tuner see")
    parser.add_argument("--eval-pairs", type=int, default=24, help="pairs whose questions are scored")
    parser.add_argument("--dev-rows", type=int, default=32, help="--race: held-out rows the policy and tuner see")
    parser.add_argument("--eval-rows", type=int, default=64, help="--race: held-out rows scored")
    parser.add_argument("--default-rows", type=int, help="score the default (the slow official sampler) on the first "
                        "this many scored prompts only (default: all; with --race 8, as the race does)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--trials", type=int, default=12, help="the tuner's trials")
    parser.add_argument("--target-precision", type=float, default=0.99)
    parser.add_argument("--repeat-below", type=float, default=20.0, help="rerun a setting whose run took less (s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of such a setting; the fastest counts")
    parser.add_argument("--output", help="the results (default: outputs/learned_policy.json, with --race "
                        "outputs/learned_policy_race.json)")
    parser.add_argument("--plot", help="the Pareto fronts with the policy's points (default: "
                        "learned_policy_fronts.png, with --race outputs/learned_policy_race_fronts.png)")
    parser.add_argument("--plot-from", metavar="JSON", help="only redraw the plot from a saved --output file")
    args = parser.parse_args()
    if args.race:
        args.output = args.output or os.path.join(HERE, "outputs", "learned_policy_race.json")
        args.plot = args.plot or os.path.join(HERE, "outputs", "learned_policy_race_fronts.png")
        args.default_rows = 8 if args.default_rows is None else args.default_rows
    else:
        args.output = args.output or os.path.join(HERE, "outputs", "learned_policy.json")
        args.plot = args.plot or os.path.join(HERE, "learned_policy_fronts.png")
    if args.plot_from:
        with open(args.plot_from) as f:
            plot_fronts(json.load(f)["results"], args.plot)
        return
    torch.manual_seed(args.seed)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    task = race_task(args) if args.race else demo_task(args)
    model, tokenizer, dev_prompts = task.model, task.tokenizer, task.dev_prompts
    print(f"{task.summary}; device {args.device}, {torch.get_num_threads()} thread(s)", flush=True)

    began = time.perf_counter()
    policy = learn_decoding_policy(model, tokenizer, dev_prompts, PolicyTrainingConfig(
        max_new_tokens=64, block_length=task.base["block_length"], batch_size=args.batch_size,
        target_precision=args.target_precision, seed=args.seed))
    learn_seconds = time.perf_counter() - began
    info = policy["info"]
    print(f"policy learned in {learn_seconds:.1f} s from {info['positions']} positions: threshold "
          f"{policy['threshold']:.4f} (held-out precision {info['commit_held_out_precision']}, recall "
          f"{info['commit_held_out_recall']:.3f}); block done: "
          f"{policy['block_done']['threshold'] if 'block_done' in policy else 'none'}", flush=True)

    began = time.perf_counter()
    trials = tune(model, tokenizer, dev_prompts, task.dev_expected, max_new_tokens=64, trials=args.trials,
                  score=task.score, batch_size=args.batch_size, seed=args.seed)
    tuned = best_setting(trials).settings
    print(f"tuner ({args.trials} trials at 64, {time.perf_counter() - began:.0f} s): {tuned or 'the defaults'}",
          flush=True)

    overhead = {length: step_overhead(task, policy, length, args) for length in (64, 256)}
    print("policy cost per step (exact decoder, never-firing copy): "
          + ", ".join(f"{100 * value:+.1f} % at {length}" for length, value in overhead.items()), flush=True)

    results = {}
    for length in args.lengths:
        base = task.base
        settings = {"default": {}, "exact": {**base, "steps": length}}
        settings.update({f"tau {t}": {**base, "confidence_threshold": t} for t in THRESHOLDS})
        settings.update({f"eb {g}": {**base, "entropy_bound": g} for g in ENTROPY_BOUNDS})
        settings["tuned"] = scaled(tuned, length)
        settings["learned"] = {**base, "decoding_policy": policy}
        results[length] = row = {}
        for name, setting in settings.items():
            row[name] = measure(task, setting, length, args, args.default_rows if name == "default" else None)
            show(length, name, row[name])
        # early exit is a hand-set flag of its own (Learn2PD's end-of-text rule): with the best tau and the policy
        tau = best_of(row, "tau", row["exact"]["accuracy"])
        for name, setting in ((f"{tau} +exit", settings[tau]), ("learned +exit", settings["learned"])):
            row[name] = measure(task, dict(setting, early_exit=True), length, args)
            show(length, name, row[name])
    print()
    print(report(results, tuned, policy, overhead, args.default_rows))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"results": results, "tuned": tuned, "policy": policy, "overhead": overhead,
                   "args": vars(args)}, f, indent=1)
    plot_fronts(results, args.plot)


def plot_fronts(results: dict, path: str) -> None:
    """One panel per length: accuracy against answer tokens/s of every hand-set setting (the Pareto front of those
    joined by a line) and the learned policy's points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for axes, (length, row) in zip(panels[0], results.items()):
        hand = {name: r for name, r in row.items() if not name.startswith("learned") and r["tokens_per_second"] > 0}
        axes.scatter([r["tokens_per_second"] for r in hand.values()], [r["accuracy"] for r in hand.values()],
                     color="0.6", label="hand-set settings")
        front = sorted((r for r in hand.values() if not _dominated(r, hand.values())),
                       key=lambda r: r["tokens_per_second"])
        axes.plot([r["tokens_per_second"] for r in front], [r["accuracy"] for r in front], "-", color="C0",
                  label="their Pareto front")
        for name, marker in (("learned", "*"), ("learned +exit", "P")):
            axes.scatter(row[name]["tokens_per_second"], row[name]["accuracy"], marker=marker, s=160, color="C3",
                         zorder=3, label=f"policy{name[7:]}")
        axes.set_xscale("log")
        axes.set_ylim(-5, 105)
        axes.set_title(f"max_new_tokens {length}")
        axes.set_xlabel("answer tokens / s")
        axes.set_ylabel("accuracy (%)")
    panels[0][0].legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _dominated(point: dict, others) -> bool:
    return any(o["accuracy"] >= point["accuracy"] and o["tokens_per_second"] > point["tokens_per_second"]
               for o in others)


def show(length: int, name: str, r: dict) -> None:
    print(f"  {length:>4} {name:<14} {r['accuracy']:5.1f} %  {r['tokens_per_second']:8.1f} tok/s  NFE {r['nfe']:.1f}",
          flush=True)


def best_of(row: dict, prefix: str, reference: float) -> str:
    """The fastest setting named `prefix ...` within 1 point of `reference` accuracy (the most accurate when none)."""
    named = {name: r for name, r in row.items() if name.startswith(prefix + " ") and "+exit" not in name}
    close = {name: r for name, r in named.items() if r["accuracy"] >= reference - 1.0}
    if close:
        return max(close, key=lambda name: close[name]["tokens_per_second"])
    return max(named, key=lambda name: (named[name]["accuracy"], named[name]["tokens_per_second"]))


def report(results: dict, tuned: dict, policy: dict, overhead: dict, default_rows: int | None = None) -> str:
    default = "default" if default_rows is None else f"default ({default_rows} rows)"
    lines = [f"| length | {default} | exact | best tau | best entropy bound | tuned | learned | learned / best tau | "
             "learned / default | best tau + exit | learned + exit |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for length, row in results.items():
        reference = row["exact"]["accuracy"]
        tau, eb = best_of(row, "tau", reference), best_of(row, "eb", reference)

        def cell(name, label=""):
            r = row[name]
            return f"{label}{r['accuracy']:.1f} % / {r['tokens_per_second']:.1f} ({r['nfe']:.0f})"

        def ratio(name):
            if row[name]["accuracy"] == 0:
                return "- (0 % right)"
            return f"{row['learned']['tokens_per_second'] / row[name]['tokens_per_second']:.2f}x"

        lines.append(f"| {length} | {cell('default')} | {cell('exact')} | {cell(tau, tau[4:] + ': ')} | "
                     f"{cell(eb, eb[3:] + ': ')} | {cell('tuned')} | {cell('learned')} | {ratio(tau)} | "
                     f"{ratio('default')} | {cell(tau + ' +exit')} | {cell('learned +exit')} |")
    lines.append("")
    lines.append("cells: accuracy / answer tokens/s (forward passes per batch of 16)")
    lines.append(f"tuned (at 64): {tuned}")
    lines.append(f"policy: threshold {policy['threshold']:.4f}, block done "
                 f"{policy['block_done']['threshold'] if 'block_done' in policy else 'none'}; cost per step "
                 + ", ".join(f"{100 * v:+.1f} % at {k}" for k, v in overhead.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
