"""Fast diffusion decoding (issue 4): speed and quality of KV caches, parallel decoding and early exit.

1. Trains (once; cached under benchmarks/outputs/) a small LLaDA with DiffusionSFTTrainer on a task with a
   checkable answer of variable length: reverse a list of letters. The list is left-filled with "." so that
   "=" sits at the same position in every prompt (a model this small learns the reversal within minutes that
   way; with ragged prompts it had not after 1200 steps). Answers are padded with EOS up to the quality
   generation length, as in LLaDA's SFT, so the model learns to fill the tail with EOS.
2. Quality: exact-match accuracy for {baseline, prefix, dual} x {no threshold, tau = 0.9}.
3. Speed at max_new_tokens 128/256/512, block_length 32, batch 1 and 8, for the same settings plus early
   exit, against the baseline `generate` in the same run, and against an autoregressive yardstick: a
   LlamaForCausalLM of the same size doing greedy `generate` with its KV cache for exactly `max_new_tokens`
   new tokens (its tokens/s: new tokens per wall second).

tokens/s = answer tokens up to (not including) the first EOS, summed over the batch, per wall second.
NFE = forward passes. The baseline is `generate` with its defaults (the official sampler, token for token).
A call shorter than a second is repeated and its median time taken (see `timed`).

    .venv/bin/python benchmarks/bench_fast_decoding.py
    .venv/bin/python benchmarks/bench_fast_decoding.py --device cuda --lengths 256 --batches 1 8
"""

import argparse
import os
import random
import string
import time

import torch


HERE = os.path.dirname(os.path.abspath(__file__))

SETTINGS = {
    "baseline": {},
    "prefix": {"kv_cache": "prefix"},
    "dual": {"kv_cache": "dual"},
    "tau=0.9": {"confidence_threshold": 0.9},
    "prefix+tau": {"kv_cache": "prefix", "confidence_threshold": 0.9},
    "dual+tau": {"kv_cache": "dual", "confidence_threshold": 0.9},
    "dual+tau+early_exit": {"kv_cache": "dual", "confidence_threshold": 0.9, "early_exit": True},
}
QUALITY_SETTINGS = ("baseline", "prefix", "dual", "tau=0.9", "prefix+tau", "dual+tau")


def task_example(rng: random.Random, args) -> tuple[str, str]:
    """("reverse: . . c a f =", "f a c"): the prompt (without " =") and the answer."""
    alphabet = string.ascii_lowercase[:args.alphabet]
    letters = [rng.choice(alphabet) for _ in range(rng.randint(args.min_letters, args.max_letters))]
    filler = ["."] * (args.max_letters - len(letters))
    return "reverse: " + " ".join(filler + letters), " ".join(reversed(letters))


def train_model(args):
    """Train (or load) the task model and its tokenizer."""
    from datasets import Dataset

    from transformers import AutoModel, AutoTokenizer

    import llada_hf  # noqa: F401
    from llada_hf import LladaConfig, LladaForMaskedDiffusion
    from llada_hf.tokenization import model_token_ids, train_tokenizer
    from llada_hf.trainers import DiffusionSFTConfig, DiffusionSFTTrainer

    recipe = (f"{args.alphabet}-{args.min_letters}-{args.max_letters}-{args.hidden}-{args.layers}-{args.lr}-"
              f"{args.train_steps}-{args.quality_length}")
    folder = os.path.join(HERE, "outputs", f"reverse-task-{recipe}")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    rng = random.Random(0)
    rows = [task_example(rng, args) for _ in range(8000)]
    # 300 tokens: every letter with its leading space becomes one token
    tokenizer = train_tokenizer([p + " = " + c for p, c in rows], vocab_size=300)
    torch.manual_seed(0)
    model = LladaForMaskedDiffusion(LladaConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
        num_attention_heads=4, max_position_embeddings=2048, **model_token_ids(tokenizer)))

    # LLaDA's SFT pads every answer with EOS: pad each to `quality_length` tokens, so that the model learns to
    # fill the tail of a generation window with EOS.
    def completion(answer: str) -> str:
        return " " + answer + tokenizer.eos_token * (args.quality_length - len(tokenizer(" " + answer).input_ids))

    data = Dataset.from_list([{"prompt": p + " =", "completion": completion(c)} for p, c in rows])
    trainer = DiffusionSFTTrainer(
        model=model,
        args=DiffusionSFTConfig(output_dir=os.path.join(folder, "trainer"), max_steps=args.train_steps,
                                per_device_train_batch_size=32, learning_rate=args.lr, lr_scheduler_type="cosine",
                                warmup_steps=30, weight_decay=0.0, logging_steps=100, save_strategy="no",
                                report_to="none", bf16=False, gradient_checkpointing=False,
                                max_length=args.quality_length + 32, dataloader_pin_memory=False, seed=0),
        train_dataset=data, processing_class=tokenizer,
    )
    trainer.train()
    model = trainer.model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def encode(tokenizer, prompts, device):
    tokenizer.padding_side = "left"
    batch = tokenizer([p + " =" for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    return batch.input_ids.to(device), batch.attention_mask.to(device)


def answer_tokens(answer_ids: torch.Tensor, eos_id: int) -> int:
    """Answer tokens up to (not including) the first EOS, summed over the batch."""
    total = 0
    for row in answer_ids.tolist():
        total += row.index(eos_id) if eos_id in row else len(row)
    return total


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, min_seconds: float = 1.0, max_repeats: int = 7):
    """Run `fn` and return (its output, seconds). A call shorter than `min_seconds` is repeated (up to
    `max_repeats` calls in all, or `min_seconds` of calls) and the median is taken, so that one-off costs and
    noise do not decide the fast settings' figures; the long baseline runs once."""
    times = []
    while True:
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if len(times) >= max_repeats or sum(times) >= min_seconds:
            return out, sorted(times)[len(times) // 2]


def quality(model, tokenizer, args):
    rng = random.Random(123)
    tests = [task_example(rng, args) for _ in range(args.quality_examples)]
    ids, mask = encode(tokenizer, [p for p, _ in tests], args.device)
    rows = []
    for name in QUALITY_SETTINGS:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=args.quality_length, block_length=32,
                             steps=args.quality_length, return_dict_in_generate=True, **SETTINGS[name])
        answers = tokenizer.batch_decode(out.sequences[:, ids.shape[1]:], skip_special_tokens=True)
        accuracy = 100 * sum(a.strip() == c for a, (_, c) in zip(answers, tests)) / len(tests)
        rows.append((name, accuracy, out.nfe))
    return rows


def llama_yardstick(model, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=2048, pad_token_id=c.pad_token_id,
        eos_token_id=c.eos_token_id, bos_token_id=c.bos_token_id)).to(args.device).eval()
    return llama


def speed(model, tokenizer, args):
    llama = llama_yardstick(model, args)
    rng = random.Random(7)
    eos = model.config.eos_token_id
    rows = []
    for length in args.lengths:
        for batch in args.batches:
            prompts = [task_example(rng, args)[0] for _ in range(batch)]
            ids, mask = encode(tokenizer, prompts, args.device)
            results = {}
            for name, extra in SETTINGS.items():
                run = lambda: model.generate(ids, attention_mask=mask, max_new_tokens=length, block_length=32,  # noqa: E731
                                             steps=length, return_dict_in_generate=True, **extra)
                out, seconds = timed(run, args.device)
                tokens = answer_tokens(out.sequences[:, ids.shape[1]:], eos)
                results[name] = (tokens / seconds, out.nfe, seconds)
            ar_run = lambda: llama.generate(ids, attention_mask=mask, max_new_tokens=length, min_new_tokens=length,  # noqa: E731
                                            do_sample=False, pad_token_id=tokenizer.pad_token_id)
            _, ar_seconds = timed(ar_run, args.device)
            rows.append((length, batch, results, batch * length / ar_seconds))
            base = results["baseline"][0]
            cells = " | ".join(f"{tps:.1f} ({tps / base:.1f}x, {nfe})" for tps, nfe, _ in results.values())
            print(f"| {length} | {batch} | {cells} | {batch * length / ar_seconds:.1f} |", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--alphabet", type=int, default=8, help="letters drawn from the first N of a-z")
    parser.add_argument("--min-letters", type=int, default=3)
    parser.add_argument("--max-letters", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--quality-examples", type=int, default=200)
    parser.add_argument("--quality-length", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    started = time.perf_counter()
    model, tokenizer = train_model(args)
    model.to(args.device)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    print(f"\nQuality: reverse {args.min_letters}-{args.max_letters} of {args.alphabet} letters, "
          f"{args.quality_examples} examples, max_new_tokens {args.quality_length}, "
          "block_length 32\n\n| setting | exact match % | NFE |\n|---|---|---|")
    for name, accuracy, nfe in quality(model, tokenizer, args):
        print(f"| {name} | {accuracy:.1f} | {nfe} |")
    print("\nSpeed: answer tokens (up to the first EOS) per second; (speed-up over baseline, NFE); the last "
          "column is LlamaForCausalLM greedy generate with KV cache, new tokens per second\n")
    print("| max_new_tokens | batch | " + " | ".join(SETTINGS) + " | AR yardstick tok/s |")
    print("|---" * (len(SETTINGS) + 3) + "|")
    speed(model, tokenizer, args)
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
