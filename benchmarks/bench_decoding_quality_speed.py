"""Decoding quality and speed: every decoder against autoregression, at equal quality (issues 17 and 28).

1. Trains (once; cached under benchmarks/outputs/ with a `training.json` of its compute; checkpoints every
   `--save-steps`, so an interrupted training resumes) a LLaDA (hidden 128, 4 layers, rotary theta 10000) with
   DiffusionSFTTrainer and a LlamaForCausalLM of the same sizes with TRL's SFTTrainer, on the same rows of a task with
   long, checkable answers: shift each of 20-60 letters by one ("shift: c a p . . =" -> "d b a"; the list is
   right-filled with "." so each answer letter sits at a fixed distance from its source). LLaDA's answers are
   EOS-padded to 128 tokens as in its SFT. Both reach 100 % exact match in 400 steps at this size (the earlier
   hidden 256 x 6 layers LLaDA did not learn the task in 1000); the ratio of their training compute is printed.
2. Quality: exact match and letter accuracy of the official sampler (on a subset: it is slow), of every fast
   decoder and of the AR model (greedy, KV cache) on held-out rows, at lengths 256 and 512.
3. Speed: answer tokens/s (up to the first EOS, summed over the batch) at lengths 256 and 512, batch 1 and 8,
   every fast setting side by side with the AR model, in one run; the official sampler's time is measured on
   its first block and multiplied by the number of blocks (each of its steps is the same full forward).
   The race: speed and exact match side by side, and the fastest setting within 1 point of the AR model's exact match.
4. The caches' arithmetic: at equal steps (one token per step, no threshold; the first blocks), the speed-up
   of the prefix and dual caches over the official sampler against the speed-up their FLOP count allows
   (benchmarks/bench_roofline.py puts them against the machine's measured matrix-product rates).
5. torch.compile of the forward: eager against compiled, for the cached decoders.
6. `llada_hf.evaluation.tune` on a dev set: its Pareto front (table and PNG); its choice joins the table.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_decoding_quality_speed.py
    .venv/bin/python benchmarks/bench_decoding_quality_speed.py --device cuda   # on a GPU
"""

import argparse
import json
import os
import random
import string
import time

import torch
from bench_fast_decoding import answer_tokens, sync, timed


HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = 32

# Decoders compared (each an option set of the same `generate`). "official" is the paper's sampler.
SETTINGS = {
    "official": {},
    "prefix": {"kv_cache": "prefix"},
    "dual": {"kv_cache": "dual"},
    "dual+tau0.9": {"kv_cache": "dual", "confidence_threshold": 0.9},
    "dual+tau0.9+exit": {"kv_cache": "dual", "confidence_threshold": 0.9, "early_exit": True},
    "dual+tau0.9+exit+tail32": {"kv_cache": "dual", "confidence_threshold": 0.9, "early_exit": True,
                                "canvas_tail": 32},
    "dual+eb0.1+exit+tail32": {"kv_cache": "dual", "entropy_bound": 0.1, "early_exit": True, "canvas_tail": 32},
    "dual+tau0.9+exit+tail32+block64": {"kv_cache": "dual", "confidence_threshold": 0.9, "early_exit": True,
                                        "canvas_tail": 32, "block_length": 64},
    "dual+tau0.9+exit+tail32+refresh4": {"kv_cache": "dual", "confidence_threshold": 0.9, "early_exit": True,
                                         "canvas_tail": 32, "cache_refresh_interval": 4},
    "dual+tau0.9+exit+tail16+block16+refresh8": {"kv_cache": "dual", "confidence_threshold": 0.9, "early_exit": True,
                                                 "canvas_tail": 16, "block_length": 16, "cache_refresh_interval": 8},
}
# Equal-steps settings (one token per step): the caches' arithmetic.
EQUAL_STEPS = ("official", "prefix", "dual")


def task_example(rng: random.Random, args) -> tuple[str, str]:
    """("shift: c a p . . =", "d b a") with --alphabet letters: each letter replaced by the next (p -> a)."""
    alphabet = string.ascii_lowercase[:args.alphabet]
    letters = [rng.choice(alphabet) for _ in range(rng.randint(args.min_letters, args.max_letters))]
    shifted = [alphabet[(alphabet.index(c) + 1) % len(alphabet)] for c in letters]
    filler = ["."] * (args.max_letters - len(letters))
    return "shift: " + " ".join(letters + filler) + " =", " ".join(shifted)


def model_sizes(args) -> dict:
    return dict(hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                num_attention_heads=4, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta})


def train_rows(args) -> list[tuple[str, str]]:
    rng = random.Random(0)
    return [task_example(rng, args) for _ in range(args.train_rows)]


def recipe_folder(kind: str, args, phase: int = 2) -> str:
    recipe = (f"{args.alphabet}-{args.min_letters}-{args.max_letters}-{args.hidden}-{args.layers}-{args.lr}-"
              f"{args.train_steps}-{args.batch_size}-{args.pad_answers_to}-{args.rope_theta:g}")
    if phase == 2 and args.more_steps:
        recipe += f"-then-{args.more_steps}"
    return os.path.join(HERE, "outputs", f"shift-{kind}-{recipe}")


def trainer_settings(folder: str, args, phase: int = 1) -> dict:
    """Phase 1: `train_steps` at `lr` (cosine); phase 2 (LLaDA, which learns the task more slowly): `more_steps`
    more at half the rate, from phase 1's weights."""
    steps, rate = (args.train_steps, args.lr) if phase == 1 else (args.more_steps, args.lr / 2)
    return dict(
        output_dir=os.path.join(folder, "trainer"), max_steps=steps, per_device_train_batch_size=args.batch_size,
        learning_rate=rate, lr_scheduler_type="cosine", warmup_steps=50 if phase == 1 else 10, weight_decay=0.0,
        logging_steps=50, save_strategy="steps", save_steps=args.save_steps, save_total_limit=1, report_to="none",
        bf16=False, dataloader_pin_memory=False, seed=phase - 1, include_num_input_tokens_seen="all",
    )


def load_or_train_tokenizer(args):
    from transformers import AutoTokenizer

    from llada_hf.tokenization import train_tokenizer

    folder = os.path.join(HERE, "outputs", f"shift-tokenizer-{args.alphabet}-{args.max_letters}")
    if os.path.isdir(folder):
        return AutoTokenizer.from_pretrained(folder)
    # 300 entries: every letter (and ".") with its leading space is one token, so positions line up
    tokenizer = train_tokenizer([p + " " + a for p, a in train_rows(args)[:2000]], vocab_size=300)
    tokenizer.save_pretrained(folder)
    return tokenizer


def train_llada(tokenizer, args, phase: int = 2):
    from datasets import Dataset

    from transformers import AutoModel

    import llada_hf  # noqa: F401
    from llada_hf import LladaConfig, LladaForMaskedDiffusion
    from llada_hf.tokenization import model_token_ids
    from llada_hf.trainers import DiffusionSFTConfig, DiffusionSFTTrainer

    folder = recipe_folder("llada", args, phase)
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return AutoModel.from_pretrained(folder).eval()
    if phase == 2 and args.more_steps:
        model = train_llada(tokenizer, args, phase=1).train()
    else:
        phase = 1
        torch.manual_seed(0)
        model = LladaForMaskedDiffusion(LladaConfig(**model_sizes(args), **model_token_ids(tokenizer)))

    def completion(answer: str) -> str:  # LLaDA's SFT: the answer, then EOS up to a fixed length
        return " " + answer + tokenizer.eos_token * (args.pad_answers_to - len(tokenizer(" " + answer).input_ids))

    data = Dataset.from_list([{"prompt": p, "completion": completion(a)} for p, a in train_rows(args)])
    trainer = DiffusionSFTTrainer(model=model, args=DiffusionSFTConfig(**trainer_settings(folder, args, phase)),
                                  train_dataset=data, processing_class=tokenizer)
    return train_and_save(trainer, folder, f"LLaDA phase {phase}")


def train_and_save(trainer, folder: str, label: str):
    """Train (from the last checkpoint of an interrupted run, if any), save, and record the training compute beside
    the model (`training.json`: steps, tokens, seconds, FLOPs = 6 x parameters x tokens)."""
    checkpoints = os.path.join(folder, "trainer")
    resume = os.path.isdir(checkpoints) and any(name.startswith("checkpoint-") for name in os.listdir(checkpoints))
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    seconds = time.perf_counter() - started
    model = trainer.model.eval()
    model.save_pretrained(folder)
    parameters = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    tokens = int(trainer.state.num_input_tokens_seen)  # every position of every batch: what the forwards ran
    record = {"label": label, "steps": trainer.state.global_step, "tokens": tokens, "seconds": round(seconds),
              "resumed": resume, "parameters": parameters, "flops": 6 * parameters * tokens}
    with open(os.path.join(folder, "training.json"), "w") as file:
        json.dump(record, file)
    print(f"{label} trained in {seconds:.0f} s ({record['flops']:.3g} FLOPs)", flush=True)
    return model



def train_llama(tokenizer, args):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from transformers import LlamaConfig, LlamaForCausalLM

    folder = recipe_folder("llama", args, phase=1)
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return LlamaForCausalLM.from_pretrained(folder).eval()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        **model_sizes(args), vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id))
    data = Dataset.from_list([{"prompt": p, "completion": " " + a + tokenizer.eos_token}
                              for p, a in train_rows(args)])
    trainer = SFTTrainer(model=model, args=SFTConfig(**trainer_settings(folder, args), completion_only_loss=True),
                         train_dataset=data, processing_class=tokenizer)
    return train_and_save(trainer, folder, "Llama")


def print_training_compute(args) -> None:
    """Both models' training (each phase's `training.json`) and the ratio of their compute."""
    records = {}
    for kind, phases in (("llada", (1, 2) if args.more_steps else (1,)), ("llama", (1,))):
        for phase in phases:
            path = os.path.join(recipe_folder(kind, args, phase), "training.json")
            if os.path.isfile(path):
                with open(path) as file:
                    records.setdefault(kind, []).append(json.load(file))
    for kind, phases in records.items():
        for record in phases:
            print(f"training: {record['label']}: {record['steps']} steps, {record['tokens']} tokens, "
                  f"{record['flops']:.3g} FLOPs, {record['seconds']} s" + (" (resumed)" if record["resumed"] else ""))
    if len(records) == 2:
        flops = {kind: sum(record["flops"] for record in phases) for kind, phases in records.items()}
        seconds = {kind: sum(record["seconds"] for record in phases) for kind, phases in records.items()}
        print(f"training compute, LLaDA / Llama: {flops['llada'] / flops['llama']:.2f}x the FLOPs, "
              f"{seconds['llada'] / seconds['llama']:.2f}x the seconds", flush=True)


def encode(tokenizer, prompts, device):
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return batch.input_ids.to(device), batch.attention_mask.to(device)


def exact_match(tokenizer, answer_ids: torch.Tensor, answers: list[str]) -> list[bool]:
    texts = tokenizer.batch_decode(answer_ids, skip_special_tokens=True)
    return [text.strip() == answer for text, answer in zip(texts, answers)]


class FlopCounter:
    """Counts the matmul FLOPs of every forward of a LLaDA: projections, MLP, attention scores and values, and
    the LM head over the window the sampler keeps. A forward with a cache runs q queries against all keys."""

    def __init__(self, model):
        self.config, self.flops = model.config, 0
        self.handle = model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        c = self.config
        rows, queries = kwargs["input_ids"].shape
        cache, keep = kwargs.get("cache"), kwargs.get("logits_to_keep")
        layer = cache.layers[0] if cache is not None and cache.layers else None
        keys = layer.keys.shape[-2] if layer is not None and layer.query_start else queries
        kv = c.num_key_value_heads * c.head_dim
        per_query = c.num_hidden_layers * (2 * c.hidden_size * (2 * c.hidden_size + 2 * kv)
                                           + 6 * c.hidden_size * c.intermediate_size + 4 * keys * c.hidden_size)
        window = keep.numel() if torch.is_tensor(keep) else queries
        self.flops += rows * (queries * per_query + 2 * window * c.hidden_size * c.vocab_size)

    def remove(self):
        self.handle.remove()


def first_blocks(model, ids, mask, length: int, blocks: int, extra: dict) -> tuple[float, int]:
    """Seconds and FLOPs of the first `blocks` blocks of `generate` at one token per step (the engine's state
    stepped by hand, so a slow sampler need not run to the end)."""
    counter = FlopCounter(model)
    try:
        state = model.prepare_decoding(ids, attention_mask=mask, max_new_tokens=length, steps=length,
                                       block_length=BLOCK, **extra)
        sync(ids.device)
        started = time.perf_counter()
        while not state.done and state.block_index < blocks:
            state.step()
        sync(ids.device)
        return time.perf_counter() - started, counter.flops
    finally:
        counter.remove()


@torch.no_grad()
def cache_arithmetic(model, tokenizer, prompts, args) -> None:
    """Measured speed-up of the caches over the official sampler at equal steps, against their FLOP ratio."""
    for length in args.lengths:
        for batch in args.batches:
            ids, mask = encode(tokenizer, prompts[:batch], args.device)
            measured = {name: first_blocks(model, ids, mask, length, args.arithmetic_blocks, SETTINGS[name])
                        for name in EQUAL_STEPS}
            base_seconds, base_flops = measured["official"]
            for name in EQUAL_STEPS[1:]:
                seconds, flops = measured[name]
                speedup, allowed = base_seconds / seconds, base_flops / flops
                print(f"| {length} | {batch} | {name} | {speedup:.2f}x | {allowed:.2f}x | {speedup / allowed:.2f} |",
                      flush=True)


def answers_of(tokenizer, out_ids: torch.Tensor) -> list[str]:
    """The answers as text, each cut at its first EOS (what a diffusion model commits after it is not part of
    the answer; the official evaluation cuts there too)."""
    from llada_hf import truncate_at_eos

    answers = truncate_at_eos(out_ids, [tokenizer.eos_token_id])
    return [text.strip() for text in tokenizer.batch_decode(answers, skip_special_tokens=True)]


@torch.no_grad()
def diffusion_run(model, ids, mask, length: int, extra: dict):
    """`generate` with a setting; "steps_per_token" (the tuner's choice, made at another length) scales."""
    settings = {"block_length": BLOCK} | extra
    blocks = -(-length // settings["block_length"])
    settings["steps"] = max(blocks, round(length * settings.pop("steps_per_token", 1.0)))
    return model.generate(ids, attention_mask=mask, max_new_tokens=length, return_dict_in_generate=True, **settings)


@torch.no_grad()
def ar_run(llama, ids, mask, length: int):
    return llama.generate(ids, attention_mask=mask, max_new_tokens=length, do_sample=False,
                          pad_token_id=llama.config.pad_token_id, eos_token_id=llama.config.eos_token_id)


def letter_accuracy(answer: str, reference: str) -> float:
    """Fraction of positions whose letter is right (a missing or extra letter counts as wrong)."""
    got, want = answer.split(), reference.split()
    return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want))


def scored(tokenizer, out_ids: torch.Tensor, chunk) -> tuple[int, float]:
    """(exact matches, summed letter accuracy) of a batch of answers."""
    answers = answers_of(tokenizer, out_ids)
    return (sum(a == r for a, (_, r) in zip(answers, chunk)),
            sum(letter_accuracy(a, r) for a, (_, r) in zip(answers, chunk)))


def quality(llada, llama, tokenizer, tests, settings: dict, args) -> dict:
    """Exact match and letter accuracy (%) of each setting (and "AR") per length; the official sampler on its own
    smaller subset (it is slow)."""
    table = {}
    for length in args.lengths:
        runs = {name: (lambda ids, mask, extra=extra: diffusion_run(llada, ids, mask, length, extra).sequences)
                for name, extra in settings.items()
                if name != "official" or length in args.official_lengths}
        runs["AR"] = lambda ids, mask: ar_run(llama, ids, mask, length)
        for name, run in runs.items():
            subset = tests[: args.official_examples] if name == "official" else tests
            exact, letters = 0, 0.0
            for start in range(0, len(subset), args.eval_batch):
                chunk = subset[start : start + args.eval_batch]
                ids, mask = encode(tokenizer, [p for p, _ in chunk], args.device)
                right, share = scored(tokenizer, run(ids, mask)[:, ids.shape[1]:], chunk)
                exact, letters = exact + right, letters + share
            table[(name, length)] = (100 * exact / len(subset), 100 * letters / len(subset), len(subset))
            print(f"| {name} | {length} | {table[(name, length)][0]:.1f} | {table[(name, length)][1]:.1f} | "
                  f"{len(subset)} |", flush=True)
    return table


def speed(llada, llama, tokenizer, prompts, settings: dict, args, label: str = "") -> dict:
    """Answer tokens/s (and NFE) of every setting and of the AR model per (length, batch). The official
    sampler's time is its first block's, times the number of blocks (all its steps are the same full forward);
    its tokens are those of the AR model's answers (both models answer these prompts correctly)."""
    eos = llada.config.eos_token_id
    table = {}
    for length in args.lengths:
        for batch in args.batches:
            ids, mask = encode(tokenizer, prompts[:batch], args.device)
            ar_out, ar_seconds = timed(lambda: ar_run(llama, ids, mask, length), args.device)
            ar_tokens = answer_tokens(ar_out[:, ids.shape[1]:], eos)
            table[("AR", length, batch)] = (ar_tokens / ar_seconds, ar_out.shape[1] - ids.shape[1])
            for name, extra in settings.items():
                if name == "official":
                    seconds, _ = first_blocks(llada, ids, mask, length, 1, extra)
                    table[(name, length, batch)] = (ar_tokens / (seconds * length / BLOCK), length)
                    continue
                out, seconds = timed(lambda: diffusion_run(llada, ids, mask, length, extra), args.device)
                tokens = answer_tokens(out.sequences[:, ids.shape[1]:], eos)
                table[(name, length, batch)] = (tokens / seconds, out.nfe)
            cells = " | ".join(f"{table[(n, length, batch)][0]:.1f} ({table[(n, length, batch)][1]})"
                               for n in [*settings, "AR"])
            print(f"| {label}{length} | {batch} | {cells} |", flush=True)
    return table


def race(quality_table: dict, speed_table: dict, args) -> None:
    """Speed and exact match side by side per (length, batch): every diffusion setting against the AR model, and
    the fastest setting whose exact match is within 1 point of the AR model's (the issue's goal)."""
    print("\nThe race: answer tokens/s and exact match, diffusion settings against AR (greedy, KV cache)\n\n"
          "| length | batch | setting | exact match % | tok/s | vs AR | NFE |\n|---|---|---|---|---|---|---|",
          flush=True)
    for length in args.lengths:
        ar_exact = quality_table[("AR", length)][0]
        for batch in args.batches:
            ar_speed = speed_table[("AR", length, batch)][0]
            names = [name for name, at in quality_table if at == length and name not in ("AR", "official")]
            rows = [(name, quality_table[(name, length)][0], *speed_table[(name, length, batch)]) for name in names]
            for name, exact, speed, nfe in rows:
                print(f"| {length} | {batch} | {name} | {exact:.1f} | {speed:.1f} | {speed / ar_speed:.2f}x | {nfe} |")
            print(f"| {length} | {batch} | AR | {ar_exact:.1f} | {ar_speed:.1f} | 1.00x | - |")
            equal = [(speed, name) for name, exact, speed, _ in rows if exact >= ar_exact - 1]
            best = max(equal, default=None)
            verdict = (f"{best[1]}: {best[0] / ar_speed:.2f}x the AR model" if best else
                       "no setting is within 1 point of the AR model's exact match")
            print(f"| {length} | {batch} | **best at equal quality** | | | {verdict} | |", flush=True)


def compiled_speed(llada, tokenizer, prompts, args) -> None:
    """Eager against `model.forward = torch.compile(model.forward)` for the cached decoders at the first length
    (compilation excluded: one warm-up call per case first)."""
    length = args.lengths[0]
    cases = [(batch, name, *encode(tokenizer, prompts[:batch], args.device))
             for batch in args.batches for name in ("dual", "dual+tau0.9", args.best)]

    def seconds_of(name, ids, mask) -> float:
        return timed(lambda: diffusion_run(llada, ids, mask, length, SETTINGS[name]), args.device)[1]

    eager = [seconds_of(name, ids, mask) for _, name, ids, mask in cases]
    forward = llada.forward
    llada.forward = torch.compile(forward)  # shapes that change (rows leaving the batch) become dynamic
    try:
        started = time.perf_counter()
        for _, name, ids, mask in cases:
            diffusion_run(llada, ids, mask, length, SETTINGS[name])  # compiles each new shape once
        print(f"compilation (first calls): {time.perf_counter() - started:.0f} s", flush=True)
        for (batch, name, ids, mask), before in zip(cases, eager):
            after = seconds_of(name, ids, mask)
            print(f"| {length} | {batch} | {name} | {before:.3f} | {after:.3f} | {before / after:.2f}x |", flush=True)
    finally:
        llada.forward = forward


def tuned_setting(llada, tokenizer, tests, args) -> dict:
    """Run `llada_hf.evaluation.tune` on a dev set (scored by letter accuracy), print and draw its Pareto front;
    returns the chosen setting. The trials are kept beside the model: a rerun redraws them instead of searching
    again (the search is seeded; its speeds are this machine's)."""
    import dataclasses
    import json

    from llada_hf.evaluation.tune import Trial, best_setting, front_table, plot_front, tune

    saved = recipe_folder("llada", args) + f"-tune-{args.tune_trials}-{args.tune_examples}-{args.tune_length}.json"
    dev = tests[: args.tune_examples]
    if os.path.isfile(saved):
        with open(saved) as file:
            results = [Trial(**trial) for trial in json.load(file)]
    else:
        results = tune(llada, tokenizer, [p for p, _ in dev], [a for _, a in dev], max_new_tokens=args.tune_length,
                       trials=args.tune_trials, score=letter_accuracy, batch_size=8, seed=0)
        with open(saved, "w") as file:
            json.dump([dataclasses.asdict(trial) for trial in results], file)
    path = os.path.join(HERE, "outputs", "decoding_pareto.png")
    plot_front(results, path)
    print(f"\nTuner ({args.tune_trials} trials, {len(dev)} dev rows, max_new_tokens {args.tune_length}; plot: "
          f"{path})\n\n{front_table(results)}", flush=True)
    chosen = dict(best_setting(results).settings)
    chosen["steps_per_token"] = chosen.pop("steps", args.tune_length) / args.tune_length
    return chosen


def add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """The flags of the race models' recipe (they name the cache folders; bench_roofline.py reads the same)."""
    # hidden 128 x 4 layers learns the task in 300 steps (LLaDA: 99.98 % masked-token accuracy, 32/32 exact); hidden
    # 256 x 6 layers was at 85 % after 400 steps at 1e-3 and 84 % after 200 at 5e-4 (and 66 % letters after 1000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--alphabet", type=int, default=16)
    parser.add_argument("--min-letters", type=int, default=20)
    parser.add_argument("--max-letters", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    # LLaDA's 500000 left the model at chance on the letters after 600 steps; 10000 learned within 200
    parser.add_argument("--rope-theta", type=float, default=10000.0)
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--more-steps", type=int, default=0, help="LLaDA's second phase (0: none)")
    parser.add_argument("--train-rows", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pad-answers-to", type=int, default=128)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    add_recipe_options(parser)
    parser.add_argument("--save-steps", type=int, default=100, help="checkpoint interval: an interrupted training "
                                                                     "resumes from its last checkpoint")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--quality-examples", type=int, default=64)
    parser.add_argument("--official-examples", type=int, default=8)
    parser.add_argument("--official-lengths", type=int, nargs="+", default=[256])
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--arithmetic-blocks", type=int, default=2)
    parser.add_argument("--tune-examples", type=int, default=32)
    parser.add_argument("--tune-length", type=int, default=64)
    parser.add_argument("--tune-trials", type=int, default=16)
    parser.add_argument("--best", default="dual+tau0.9+exit+tail32", help="the setting compiled alongside dual")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--skip", nargs="*", default=[], choices=["quality", "speed", "arithmetic", "compile",
                                                                  "tune"])
    args = parser.parse_args()
    started = time.perf_counter()
    tokenizer = load_or_train_tokenizer(args)
    prompt, _ = task_example(random.Random(1), args)
    assert len(tokenizer(prompt).input_ids) == args.max_letters + 3, "each letter must be one token"
    llada = train_llada(tokenizer, args).to(args.device)
    llama = train_llama(tokenizer, args).to(args.device)
    if args.train_only:
        return
    print_training_compute(args)
    body = sum(p.numel() for n, p in llada.named_parameters() if ".layers." in n)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}; LLaDA and Llama "
          f"{body / 1e6:.2f}M body parameters, vocabulary {llada.config.vocab_size}", flush=True)
    rng = random.Random(123)
    tests = [task_example(rng, args) for _ in range(max(args.quality_examples, args.tune_examples))]
    prompts = [p for p, _ in tests]
    settings = dict(SETTINGS)
    if "tune" not in args.skip:
        settings["tuned"] = SETTINGS["tuned"] = tuned_setting(llada, tokenizer, tests, args)
        print(f"tuned: {settings['tuned']}", flush=True)
    fast = {name: extra for name, extra in settings.items() if name not in EQUAL_STEPS}
    if "quality" not in args.skip:
        print("\nQuality\n\n| setting | length | exact match % | letters right % | rows |\n|---|---|---|---|---|",
              flush=True)
        accuracy = quality(llada, llama, tokenizer, tests[: args.quality_examples], {"official": {}} | fast, args)
    if "speed" not in args.skip:
        print("\nSpeed: answer tokens/s (NFE; for AR: new tokens per row)\n", flush=True)
        print("| length | batch | " + " | ".join(["official", *fast, "AR"]) + " |", flush=True)
        speeds = speed(llada, llama, tokenizer, prompts, {"official": {}} | fast, args)
        if "quality" not in args.skip:
            race(accuracy, speeds, args)
    if "arithmetic" not in args.skip:
        print(f"\nCaches at equal steps, first {args.arithmetic_blocks} blocks: measured speed-up over the official "
              "sampler, the speed-up the FLOPs allow, and their ratio\n\n| length | batch | cache | measured | "
              "FLOP ratio | reached |\n|---|---|---|---|---|---|", flush=True)
        cache_arithmetic(llada, tokenizer, prompts, args)
    if "compile" not in args.skip:
        print("\ntorch.compile(model.forward): seconds per generate call, eager vs compiled\n\n| length | batch | "
              "setting | eager s | compiled s | speed-up |\n|---|---|---|---|---|---|", flush=True)
        compiled_speed(llada, tokenizer, prompts, args)
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
