"""Training throughput and peak memory: DiffusionSFTTrainer (LLaDA) against TRL's SFTTrainer (Llama).

Both trainers get models of identical dimensions and weights (LLaDA uses Llama's parameter names, so
Llama's state dict loads as is), the same pre-tokenized prompt-completion data (every row of the same
length, so neither trainer pads), the same batch, optimizer and settings. Each measurement runs in a
fresh child process, so that one run's allocator state cannot leak into the other's memory figure;
the two trainers alternate, `--repeats` times each, and the medians are compared (goal of issue 5:
throughput ratio >= 0.95, memory ratio <= 1.05).

- tokens/s: every token of every batch (prompt and answer), over the steps after `--warmup`, timed
  from the end of one optimizer step to the end of the next (data fetching, noising, forward,
  backward and optimizer step included). Also per CPU-second of the process (user + system time),
  which a machine shared with other jobs disturbs less than wall-clock time (on CPU).
- memory: on CUDA the peak of allocated memory during `train()`; on CPU the peak resident set size
  during `train()` minus the resident set size just before it.

Run (defaults: a ~7M-parameter model, fp32, CPU, batch 4 x 128 tokens):

    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --device cuda --bf16 --hidden-size 1024 --layers 8 --seq-len 1024 --batch-size 8
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import psutil
import torch
import transformers
import trl
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer

from llada_hf import LladaConfig, LladaForMaskedDiffusion
from llada_hf.tokenization import train_tokenizer
from llada_hf.trainers import DiffusionSFTConfig, DiffusionSFTTrainer


TRAINERS = ("diffusion", "sft")
NAMES = {"sft": "SFTTrainer + LlamaForCausalLM", "diffusion": "DiffusionSFTTrainer + LladaForMaskedDiffusion"}
METRICS = ("tokens_per_s", "tokens_per_cpu_s", "memory_mb")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=704)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per row (prompt + answer)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per row (never masked)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps per run (>= 1)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per trainer (alternating)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (TRL's default on GPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default; off here by default")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)  # internal: run one measurement
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args()


# ---- one measurement (child process) ----


class StepTimer(TrainerCallback):
    """Wall-clock and process CPU time at the end of each optimizer step."""

    def __init__(self, device: str):
        self.device, self.ends = device, []

    def on_step_end(self, args, state, control, **kwargs):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.ends.append((time.perf_counter(), time.process_time()))


def build_trainer(kind: str, args: argparse.Namespace, output_dir: str):
    """The trainer `kind` with its model, the shared data and the shared settings."""
    tokenizer = train_tokenizer(["a b c"], vocab_size=300)  # only its pad/eos/mask ids are used
    dims = dict(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq_len, 512), tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(**dims))
    if kind == "diffusion":
        llada = LladaForMaskedDiffusion(LladaConfig(**dims, mask_token_id=tokenizer.mask_token_id))
        llada.load_state_dict(model.state_dict(), strict=True)  # same parameter names: same weights
        model = llada

    generator = torch.Generator().manual_seed(args.seed)
    rows = args.batch_size * (args.warmup + args.steps)
    input_ids = torch.randint(10, args.vocab_size, (rows, args.seq_len), generator=generator)
    labels = input_ids.clone()
    labels[:, : args.prompt_len] = -100  # the prompt: not trained (SFT), never masked (diffusion)
    dataset = Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist()})

    settings = dict(
        output_dir=output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        learning_rate=1e-4, bf16=args.bf16, use_cpu=args.device == "cpu",
        gradient_checkpointing=args.gradient_checkpointing, max_length=args.seq_len, report_to="none",
        save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False, seed=args.seed,
    )
    if kind == "diffusion":
        return DiffusionSFTTrainer(
            model=model, args=DiffusionSFTConfig(**settings), train_dataset=dataset, processing_class=tokenizer
        )
    return SFTTrainer(model=model, args=SFTConfig(**settings), train_dataset=dataset, processing_class=tokenizer)


def current_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    return psutil.Process().memory_info().rss / 2**20


def measure(args: argparse.Namespace) -> dict:
    """Train `args.worker` once; return its tokens/s and the memory `train()` took."""
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(args.worker, args, output_dir)
        timer = StepTimer(args.device)
        trainer.add_callback(timer)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before = current_memory_mb(args.device)
        trainer.train()
        if args.device == "cuda":
            memory = torch.cuda.max_memory_allocated() / 2**20 - before
        else:
            memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10 - before  # ru_maxrss is in KiB
    (wall_start, cpu_start), (wall_end, cpu_end) = timer.ends[args.warmup - 1], timer.ends[-1]  # after warm-up
    tokens = args.batch_size * args.seq_len * args.steps
    return {
        "tokens_per_s": tokens / (wall_end - wall_start),
        "tokens_per_cpu_s": tokens / (cpu_end - cpu_start),
        "memory_mb": memory,
    }


# ---- the comparison (parent process) ----


def run_child(kind: str, argv: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [sys.executable, os.path.abspath(__file__), *argv, "--worker", kind, "--result", result.name]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(result.name) as f:
            return json.load(f)


def machine_description(args: argparse.Namespace) -> str:
    if args.device == "cuda":
        accelerator = torch.cuda.get_device_name()
    else:
        accelerator = f"{os.cpu_count()} CPU cores, {args.threads or torch.get_num_threads()} torch threads"
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    return f"{platform.processor() or platform.machine()}, {accelerator}, {versions}"


def main() -> None:
    args = parse_args()
    if args.worker:
        with open(args.result, "w") as f:
            json.dump(measure(args), f)
        return

    argv = sys.argv[1:]
    print(f"machine: {machine_description(args)}")
    print(
        f"shape: batch {args.batch_size} x {args.seq_len} tokens (prompt {args.prompt_len}), "
        f"hidden {args.hidden_size}, layers {args.layers}, heads {args.heads}, "
        f"intermediate {args.intermediate_size}, vocab {args.vocab_size}, "
        f"{'bf16' if args.bf16 else 'fp32'} on {args.device}, gradient checkpointing {args.gradient_checkpointing}, "
        f"warm-up {args.warmup} + {args.steps} timed steps, {args.repeats} runs per trainer"
    )
    runs = {kind: [] for kind in TRAINERS}
    for repeat in range(args.repeats):
        order = TRAINERS if repeat % 2 == 0 else tuple(reversed(TRAINERS))  # cancels drift
        for kind in order:
            runs[kind].append(run_child(kind, argv))
            print(f"  run {repeat + 1} {kind}: {runs[kind][-1]}", flush=True)
    medians = {
        kind: {key: statistics.median(run[key] for run in results) for key in METRICS} for kind, results in runs.items()
    }
    print("| trainer | tokens/s | tokens/CPU-s | train memory (MiB) |")
    print("|---|---|---|---|")
    for kind in ("sft", "diffusion"):
        tokens_per_s, tokens_per_cpu_s, memory = (medians[kind][key] for key in METRICS)
        print(f"| {NAMES[kind]} | {tokens_per_s:,.0f} | {tokens_per_cpu_s:,.0f} | {memory:,.1f} |")
    ratios = [medians["diffusion"][key] / medians["sft"][key] for key in METRICS]
    print("| ratio diffusion / SFT | " + " | ".join(f"{ratio:.3f}" for ratio in ratios) + " |")


if __name__ == "__main__":
    main()
