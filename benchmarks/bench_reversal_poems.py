"""The LLaDA paper's reversal experiment on its own poem couplets, with models trained from scratch here.

Data: the paper's 469 classical Chinese couplets, `data/poem_data.json` of the official LLaDA repository
(ML-GSAI/LLaDA, MIT licence; fields `first`, `second`), read in place from where `--data` points; the
repository does not ship a copy. The protocol is the demo's (`llada_hf.demo`), on real text instead of invented words:

1. every couplet is seen as plain text ("A B.");
2. forward ("What follows A?") and reverse ("What precedes B?") questions are trained for a subset;
3. both directions are asked about the held-out couplets, seen only as plain text (greedy decoding,
   same token budget for both models). An answer counts when it starts with the expected line: the
   demo's `ask` gives the autoregressive model `min_new_tokens` = the budget, which forbids its
   end-of-turn token, so it cannot stop after the line (the demo's invented words end at a full stop;
   poem lines have none).

Models: a small `LladaForMaskedDiffusion` trained with `DiffusionSFTTrainer` and a `LlamaForCausalLM` of
the same dimensions trained with TRL's `SFTTrainer`, on the same rows with the same settings.

It also measures the spread of the ELBO (`log_likelihood`) on the trained LLaDA with and without
`balanced_masks`.

The defaults (100 of the couplets, 120 epochs) take about 12 minutes on a shared 2-core CPU;
`--couplets 469` uses them all. One thread per process is fastest on a busy CPU:

    OMP_NUM_THREADS=1 python benchmarks/bench_reversal_poems.py --data PATH/poem_data.json \
        --output-dir outputs/reversal-poems
"""

import argparse
import json
import os
import random
import time

import torch

from llada_hf.demo import (
    DemoSettings,
    answer_token_budget,
    chat_prompt,
    evaluate,
    forward_question,
    reverse_question,
    train_both,
    training_rows,
)
from llada_hf.evaluation import log_likelihood
from llada_hf.tokenization import EOT, train_tokenizer


PAPER = {  # docs/LLADA.md section 7: forward / reversal accuracy (%) on the same couplets
    "LLaDA 8B Instruct (paper)": (51.8, 45.6),
    "GPT-4o (paper)": (82.7, 34.3),
    "Qwen2.5-7B Instruct (paper)": (75.9, 38.0),
}
MAX_ROW_TOKENS = 64  # the training length `train_both` uses


def load_couplets(path: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        return [(item["first"], item["second"]) for item in json.load(f)]


def split_couplets(couplets, count: int, question_fraction: float, seed: int):
    """`count` couplets drawn at random (seeded), split into (couplets whose questions are trained,
    held-out couplets)."""
    shuffled = random.Random(seed).sample(couplets, min(count, len(couplets)))
    cut = int(len(shuffled) * question_fraction)
    return shuffled[:cut], shuffled[cut:]


def table(results: dict, suffix: str = "") -> list[str]:
    lines = ["| model | forward (what follows A?) | reverse (what precedes B?) |", "|---|---|---|"]
    return lines + [f"| {name}{suffix} | {r['forward']:.1f} | {r['reverse']:.1f} |" for name, r in results.items()]


def check_row_lengths(rows, tokenizer) -> None:
    longest = max(len(tokenizer(r["prompt"] + r["completion"], add_special_tokens=False).input_ids) for r in rows)
    if longest > MAX_ROW_TOKENS:
        raise ValueError(f"A training row has {longest} tokens (> {MAX_ROW_TOKENS}); raise --vocab-size.")


def elbo_spread(model, tokenizer, couplets, repeats: int, mc_num: int, batch_size: int) -> dict:
    """Mean over couplets of the standard deviation, over `repeats` independent estimates, of the ELBO
    of the reverse answer, with plain and with balanced masks."""
    prompts = [tokenizer(chat_prompt(tokenizer, reverse_question(b)), add_special_tokens=False).input_ids
               for _, b in couplets]
    answers = [tokenizer(a + EOT, add_special_tokens=False).input_ids for a, _ in couplets]
    spread = {}
    for balanced in (False, True):
        estimates = torch.tensor([
            log_likelihood(model, prompts, answers, mc_num=mc_num, batch_size=batch_size, balanced_masks=balanced,
                           generator=torch.Generator().manual_seed(seed))
            for seed in range(repeats)
        ])  # [repeats, couplets]
        spread["balanced" if balanced else "plain"] = float(estimates.std(dim=0).mean())
    spread["mean_answer_tokens"] = sum(map(len, answers)) / len(answers)
    return spread


def markdown_report(results: dict, spread: dict, args, seconds: float, sizes: dict) -> str:
    lines = table(results, ", trained here")
    for name, (forward, reverse) in PAPER.items():
        lines.append(f"| {name} | {forward} | {reverse} |")
    lines += [
        "",
        f"Couplets: {sizes['held_out']} held out, questions trained for {sizes['qa']}; models of "
        f"{sizes['parameters'] / 1e6:.2f}M parameters each, tokenizer of {sizes['vocab']} tokens; "
        f"{args.epochs} epochs; time {seconds / 60:.1f} min.",
        f"ELBO spread on the trained LLaDA (reverse answers of {spread['couplets']} held-out couplets, "
        f"{spread['mean_answer_tokens']:.1f} tokens on average, mc_num={args.elbo_mc_num}, "
        f"batch_size={args.elbo_batch_size}, std over {args.elbo_repeats} estimates): plain masks "
        f"{spread['plain']:.3f} nats, balanced masks {spread['balanced']:.3f} nats "
        f"({spread['plain'] / spread['balanced']:.2f}x smaller).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="poem_data.json of the official LLaDA repository")
    parser.add_argument("--output-dir", default="outputs/reversal-poems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--couplets", type=int, default=100, help="how many of the 469 couplets to use")
    parser.add_argument("--question-fraction", type=float, default=0.5)
    parser.add_argument("--vocab-size", type=int, default=1400)  # about one token per character
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--elbo-repeats", type=int, default=6)
    parser.add_argument("--elbo-mc-num", type=int, default=32)
    parser.add_argument("--elbo-batch-size", type=int, default=16)
    parser.add_argument("--elbo-couplets", type=int, default=40)
    args = parser.parse_args()

    started = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    couplets = load_couplets(args.data)
    qa_couplets, held_out = split_couplets(couplets, args.couplets, args.question_fraction, args.seed)
    couplets = qa_couplets + held_out
    corpus = [f"{a} {b}." for a, b in couplets]
    corpus += [forward_question(a) for a, _ in couplets] + [reverse_question(b) for _, b in couplets]
    tokenizer = train_tokenizer(corpus, vocab_size=args.vocab_size)
    rows = training_rows(couplets, qa_couplets, tokenizer)
    check_row_lengths(rows, tokenizer)
    print(f"{len(couplets)} couplets ({len(qa_couplets)} with questions, {len(held_out)} held out), "
          f"{len(rows)} training rows, tokenizer of {len(tokenizer)} tokens", flush=True)

    settings = DemoSettings(
        pairs=len(couplets), question_fraction=args.question_fraction, hidden_size=args.hidden_size,
        layers=args.layers, heads=args.heads, vocab_size=args.vocab_size, epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, eval_pairs=len(held_out),
    )
    diffusion_trainer, llama = train_both(rows, tokenizer, settings, args.output_dir, args.seed)  # side by side
    llada, llama = diffusion_trainer.model.eval(), llama.eval()
    trained_at = time.perf_counter()

    budget = answer_token_budget(tokenizer, couplets)
    models = {"LLaDA (masked diffusion)": (llada, True), "Llama (autoregressive)": (llama, False)}
    # A couplet answer counts when it starts with the expected line
    results = evaluate(models, tokenizer, held_out, budget, match=str.startswith)
    trained = evaluate(models, tokenizer, qa_couplets, budget, match=str.startswith)  # sanity: trained questions
    spread = elbo_spread(llada, tokenizer, held_out[: args.elbo_couplets], args.elbo_repeats, args.elbo_mc_num,
                         args.elbo_batch_size)
    spread["couplets"] = min(args.elbo_couplets, len(held_out))
    seconds = time.perf_counter() - started

    sizes = {"held_out": len(held_out), "qa": len(qa_couplets), "vocab": len(tokenizer),
             "parameters": sum(p.numel() for p in llada.parameters())}
    report = markdown_report(results, spread, args, seconds, sizes)
    summary = {"args": vars(args), "held_out": results, "trained_questions": trained, "elbo_spread": spread,
               "sizes": sizes, "seconds": seconds, "training_seconds": trained_at - started}
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    print("\nHeld-out couplets (% of answers that start with the expected line):\n" + report)
    print("\nCouplets whose questions were trained (sanity check):\n" + "\n".join(table(trained)))


if __name__ == "__main__":
    main()
