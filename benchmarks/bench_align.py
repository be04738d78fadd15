"""Alignment miniature (issue 18): DPO (VRPO) and diffu-GRPO improve a small LLaDA SFT-trained here.

Task: reverse four letters ("reverse a c b h =" -> " h b c a"). A tiny `LladaForMaskedDiffusion` is SFT-trained
with `DiffusionSFTTrainer` on a budget that leaves it mediocre on held-out prompts (never seen in any stage).
From that SFT model, two separate runs:

- DPO (VRPO, `DiffusionDPOTrainer`): preference pairs on training prompts, chosen = the correct reversal,
  rejected = the SFT model's own greedy answer when it is wrong, else the correct answer with two letters swapped.
- GRPO (diffu-GRPO, `DiffusionGRPOTrainer`): rollouts sampled at temperature 1 from the model's diffusion
  `generate`, rewarded with partial credit (the fraction of the four positions that are right; an exact-match
  reward alone gives whole groups the same reward, hence zero advantage, on a model this weak).

Held-out metrics (greedy decoding): exact match and per-position accuracy, before and after each run, and along
training (the curves go to `<output-dir>/align_curves.png`, the numbers to `<output-dir>/align_results.json`).

The defaults take about 8 minutes on one CPU thread:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_align.py --output-dir benchmarks/outputs
"""

import argparse
import copy
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset

from transformers import PreTrainedTokenizerBase, TrainerCallback

from llada_hf import (
    DiffusionDPOConfig,
    DiffusionDPOTrainer,
    DiffusionGRPOConfig,
    DiffusionGRPOTrainer,
    DiffusionSFTConfig,
    DiffusionSFTTrainer,
    LladaConfig,
    LladaForMaskedDiffusion,
    end_token_ids,
    truncate_at_eos,
)
from llada_hf.tokenization import model_token_ids, train_tokenizer


ALPHABET = "abcdefgh"
WORD_LENGTH = 4
ANSWER_TOKENS = WORD_LENGTH + 1  # one token per letter, then EOS


@dataclass
class Task:
    """Training and held-out rows of the reversal task (lists of letters)."""

    train: list[list[str]]
    held_out: list[list[str]]


@dataclass
class Curve:
    """Held-out scores along one training run."""

    steps: list[int] = field(default_factory=list)
    exact: list[float] = field(default_factory=list)
    positions: list[float] = field(default_factory=list)


def prompt_of(row: list[str]) -> str:
    return "reverse " + " ".join(row) + " ="


def answer_of(row: list[str]) -> str:
    return " " + " ".join(reversed(row))


def make_task(n_train: int, n_held_out: int, seed: int) -> Task:
    """Distinct random words of `WORD_LENGTH` letters, split into disjoint training and held-out sets."""
    rng = random.Random(seed)
    words: set[tuple[str, ...]] = set()
    while len(words) < n_train + n_held_out:
        words.add(tuple(rng.choices(ALPHABET, k=WORD_LENGTH)))
    rows = [list(word) for word in sorted(words)]
    rng.shuffle(rows)
    return Task(train=rows[:n_train], held_out=rows[n_train:])


def position_score(completion: str, answer: str) -> float:
    """The fraction of answer positions that the completion gets right (partial credit)."""
    got, want = completion.split(), answer.split()
    return sum(g == w for g, w in zip(got, want)) / len(want)


def partial_credit(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """GRPO reward: fraction of correct positions, so that the completions of a group differ in reward."""
    return [position_score(c, a) for c, a in zip(completions, answer)]


@torch.no_grad()
def greedy_answers(
    model, tokenizer: PreTrainedTokenizerBase, rows: list[list[str]], batch_size: int = 128
) -> list[str]:
    """The model's greedy answers to the rows' prompts (all prompts have the same length)."""
    was_training = model.training
    model.eval()
    answers, ends = [], end_token_ids(tokenizer)
    for start in range(0, len(rows), batch_size):
        ids = tokenizer([prompt_of(r) for r in rows[start : start + batch_size]], return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=ANSWER_TOKENS, steps=ANSWER_TOKENS, block_length=ANSWER_TOKENS)
        answers += tokenizer.batch_decode(truncate_at_eos(out[:, ids.shape[1] :], ends))
    model.train(was_training)
    return answers


def score(model, tokenizer: PreTrainedTokenizerBase, rows: list[list[str]]) -> tuple[float, float]:
    """(exact match, position accuracy) of greedy answers on `rows`."""
    answers = greedy_answers(model, tokenizer, rows)
    exact = sum(a.split() == answer_of(r).split() for a, r in zip(answers, rows)) / len(rows)
    positions = sum(position_score(a, answer_of(r)) for a, r in zip(answers, rows)) / len(rows)
    return exact, positions


# What every trainer of this script shares: CPU, no checkpoints, no reports, quiet logs.
QUIET = dict(bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=10,
             disable_tqdm=True)


def train_with_curve(trainer, callback: "HeldOutCurve") -> "Curve":
    """Train, scoring the trainer's own model on the held-out rows at step 0 and every `callback.every` steps."""
    callback.model = trainer.model
    callback.record(0)
    trainer.train()
    return callback.curve


class HeldOutCurve(TrainerCallback):
    """Scores the trainer's model on the held-out rows every `every` optimizer steps."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, rows: list[list[str]], every: int, name: str):
        self.tokenizer, self.rows, self.every, self.name = tokenizer, rows, every, name
        self.curve, self.model = Curve(), None

    def record(self, step: int) -> None:
        exact, positions = score(self.model, self.tokenizer, self.rows)
        self.curve.steps.append(step)
        self.curve.exact.append(exact)
        self.curve.positions.append(positions)
        print(f"  [{self.name}] step {step:4d}: held-out exact {exact:.3f}, positions {positions:.3f}", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.record(state.global_step)


def make_tokenizer(task: Task) -> PreTrainedTokenizerBase:
    rows = task.train + task.held_out
    tokenizer = train_tokenizer([prompt_of(r) + answer_of(r) for r in rows], vocab_size=300)
    lengths = {len(tokenizer(answer_of(r)).input_ids) for r in rows}
    assert lengths == {WORD_LENGTH}, f"each letter must be one token, got answer lengths {lengths}"
    return tokenizer


def sft(
    task: Task, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace, out: Path
) -> LladaForMaskedDiffusion:
    """A small LLaDA trained with `DiffusionSFTTrainer` for `args.sft_steps` steps (mediocre on purpose)."""
    torch.manual_seed(args.seed)
    model = LladaForMaskedDiffusion(
        LladaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            **model_token_ids(tokenizer),
        )
    )
    data = Dataset.from_dict(
        {"prompt": [prompt_of(r) for r in task.train], "completion": [answer_of(r) for r in task.train]}
    )
    trainer = DiffusionSFTTrainer(
        model=model,
        args=DiffusionSFTConfig(
            output_dir=str(out / "sft"),
            max_steps=args.sft_steps,
            per_device_train_batch_size=32,
            learning_rate=3e-3,
            lr_scheduler_type="cosine",
            warmup_steps=20,
            seed=args.seed,
            bf16=False,
            gradient_checkpointing=False,
            report_to="none",
            save_strategy="no",
            logging_steps=50,
            disable_tqdm=True,
        ),
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.train()
    return model


def corrupt(row: list[str], rng: random.Random) -> str:
    """The correct reversal with two different letters swapped: a near miss."""
    letters = list(reversed(row))
    pairs = [(i, j) for i in range(WORD_LENGTH) for j in range(i + 1, WORD_LENGTH) if letters[i] != letters[j]]
    i, j = rng.choice(pairs)
    letters[i], letters[j] = letters[j], letters[i]
    return " " + " ".join(letters)


def preference_pairs(model, tokenizer: PreTrainedTokenizerBase, rows: list[list[str]], seed: int) -> Dataset:
    """chosen = the correct answer; rejected = the model's own wrong greedy answer, or a corrupted correct one."""
    rng, own_mistakes = random.Random(seed), 0
    rejected = []
    for row, answer in zip(rows, greedy_answers(model, tokenizer, rows)):
        wrong = answer.split() != answer_of(row).split() and answer.strip()
        own_mistakes += bool(wrong)
        rejected.append(" " + " ".join(answer.split()) if wrong else corrupt(row, rng))
    print(f"  preference pairs: {len(rows)}, rejected = the model's own mistake in {own_mistakes}", flush=True)
    return Dataset.from_dict(
        {"prompt": [prompt_of(r) for r in rows], "chosen": [answer_of(r) for r in rows], "rejected": rejected}
    )


def sft_continued(
    sft_model,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Dataset,
    args: argparse.Namespace,
    seed: int,
    task: Task,
    out: Path,
) -> Curve:
    """Control: the SFT model trained on the pairs' chosen answers with DPO's steps, batch and learning rate."""
    model = copy.deepcopy(sft_model)
    callback = HeldOutCurve(tokenizer, task.held_out, args.eval_every, "SFT continued")
    trainer = DiffusionSFTTrainer(
        model=model,
        args=DiffusionSFTConfig(
            output_dir=str(out / "sft-continued"),
            max_steps=args.dpo_steps,
            per_device_train_batch_size=16,
            learning_rate=args.dpo_lr,
            seed=seed,
            **QUIET,
        ),
        train_dataset=Dataset.from_dict({"prompt": pairs["prompt"], "completion": pairs["chosen"]}),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    return train_with_curve(trainer, callback)


def dpo(
    sft_model,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Dataset,
    args: argparse.Namespace,
    seed: int,
    task: Task,
    out: Path,
) -> Curve:
    """DPO with VRPO's defaults (8 timesteps x 1 mask per ELBO, antithetic sampling) from the SFT model."""
    model = copy.deepcopy(sft_model)
    callback = HeldOutCurve(tokenizer, task.held_out, args.eval_every, "DPO")
    trainer = DiffusionDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(sft_model),
        args=DiffusionDPOConfig(
            output_dir=str(out / "dpo"),
            max_steps=args.dpo_steps,
            per_device_train_batch_size=16,
            learning_rate=args.dpo_lr,
            beta=args.dpo_beta,
            n_time=8,
            n_mask=1,
            antithetic_sampling=True,
            seed=seed,
            **QUIET,
        ),
        train_dataset=pairs,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    return train_with_curve(trainer, callback)


def grpo(
    sft_path: str, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace, seed: int, task: Task, out: Path
) -> Curve:
    """diffu-GRPO from the saved SFT model (also the KL reference), partial-credit reward, temperature-1 rollouts."""
    rows = task.train[: args.grpo_prompts]
    data = Dataset.from_dict({"prompt": [prompt_of(r) for r in rows], "answer": [answer_of(r) for r in rows]})
    callback = HeldOutCurve(tokenizer, task.held_out, args.eval_every, "GRPO")
    trainer = DiffusionGRPOTrainer(
        model=sft_path,
        reward_funcs=partial_credit,
        args=DiffusionGRPOConfig(
            output_dir=str(out / "grpo"),
            max_steps=args.grpo_steps,
            per_device_train_batch_size=32,
            num_generations=8,
            num_iterations=args.grpo_iterations,
            learning_rate=args.grpo_lr,
            temperature=1.0,
            max_completion_length=ANSWER_TOKENS,
            diffusion_steps=ANSWER_TOKENS,
            block_length=ANSWER_TOKENS,
            beta=0.04,
            seed=seed,
            **QUIET,
        ),
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    return train_with_curve(trainer, callback)


def plot(curves: dict[str, list[Curve]], sft_exact: float, path: Path) -> None:
    """Held-out exact match (solid) and position accuracy (dashed) along each run, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.6), squeeze=False)
    for axis, (name, runs) in zip(axes[0], curves.items()):
        for k, curve in enumerate(runs):
            color = f"C{k}"
            axis.plot(curve.steps, curve.exact, color=color, marker="o", markersize=3, label=f"exact, seed +{k}")
            axis.plot(curve.steps, curve.positions, color=color, linestyle="--", alpha=0.6)
        axis.axhline(sft_exact, color="gray", linewidth=0.8, label="SFT exact")
        axis.set_title(f"{name} (held-out prompts)")
        axis.set_xlabel("optimizer step")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def summary(runs: list[Curve]) -> dict:
    """Final held-out scores of the repeats, and their means."""
    exact, positions = [c.exact[-1] for c in runs], [c.positions[-1] for c in runs]
    return {
        "exact": exact,
        "positions": positions,
        "mean_exact": sum(exact) / len(exact),
        "mean_positions": sum(positions) / len(positions),
        "curves": [vars(c) for c in runs],
    }


def run_methods(
    model, sft_path: str, tokenizer: PreTrainedTokenizerBase, task: Task, args: argparse.Namespace, out: Path
) -> dict[str, list[Curve]]:
    """Every method from the same SFT model, `args.repeats` times with different trainer seeds."""
    curves: dict[str, list[Curve]] = {}
    pairs = preference_pairs(model, tokenizer, task.train[: args.dpo_pairs], args.seed)
    for k in range(args.repeats):
        seed = args.seed + k
        if "control" not in args.skip:
            print(f"2. control: SFT continued on the chosen answers, {args.dpo_steps} steps, seed {seed}", flush=True)
            curves.setdefault("SFT continued (control)", []).append(
                sft_continued(model, tokenizer, pairs, args, seed, task, out)
            )
        if "dpo" not in args.skip:
            print(f"3. DPO (VRPO), {args.dpo_steps} steps, seed {seed}", flush=True)
            curves.setdefault("DPO (VRPO)", []).append(dpo(model, tokenizer, pairs, args, seed, task, out))
        if "grpo" not in args.skip:
            print(f"4. GRPO, {args.grpo_steps} steps, seed {seed}", flush=True)
            curves.setdefault("GRPO", []).append(grpo(sft_path, tokenizer, args, seed, task, out))
    return curves


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="benchmarks/outputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-rows", type=int, default=1500)
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--sft-steps", type=int, default=220)
    parser.add_argument("--dpo-pairs", type=int, default=512)
    parser.add_argument("--dpo-steps", type=int, default=60)
    parser.add_argument("--dpo-lr", type=float, default=3e-4)
    parser.add_argument("--dpo-beta", type=float, default=0.1)
    parser.add_argument("--grpo-prompts", type=int, default=512)
    parser.add_argument("--grpo-steps", type=int, default=300)
    parser.add_argument("--grpo-iterations", type=int, default=2)
    parser.add_argument("--grpo-lr", type=float, default=5e-4)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method (trainer seeds seed..seed+k)")
    parser.add_argument("--skip", choices=["control", "dpo", "grpo"], action="append", default=[])
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    task = make_task(args.train_rows, args.held_out, args.seed)
    tokenizer = make_tokenizer(task)
    print(f"1. SFT ({args.sft_steps} steps on {len(task.train)} rows)", flush=True)
    model = sft(task, tokenizer, args, out)
    sft_exact, sft_positions = score(model, tokenizer, task.held_out)
    print(f"  SFT held-out: exact {sft_exact:.3f}, positions {sft_positions:.3f}", flush=True)
    sft_path = str(out / "align-sft-model")
    model.save_pretrained(sft_path)
    tokenizer.save_pretrained(sft_path)
    curves = run_methods(model, sft_path, tokenizer, task, args, out)
    results: dict = {"settings": vars(args), "SFT": {"exact": sft_exact, "positions": sft_positions}}
    results |= {name: summary(runs) for name, runs in curves.items()}
    results["seconds"] = time.perf_counter() - start
    (out / "align_results.json").write_text(json.dumps(results, indent=2))
    if curves:
        plot(curves, sft_exact, out / "align_curves.png")
    print(f"\nheld-out exact match ({len(task.held_out)} prompts; per repeat, then mean), position accuracy (mean)")
    print(f"{'SFT':<26} {sft_exact:.3f}                          {sft_positions:.3f}")
    for name, runs in curves.items():
        row = summary(runs)
        finals = " ".join(f"{x:.3f}" for x in row["exact"])
        print(f"{'+' + name:<26} {finals}  mean {row['mean_exact']:.3f}   {row['mean_positions']:.3f}")
    print(f"total {results['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
