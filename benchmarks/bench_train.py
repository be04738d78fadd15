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

Vision case (`--vision`, issue 15): DiffusionSFTTrainer on `LladaVForConditionalGeneration` against SFTTrainer on
transformers' `LlavaForConditionalGeneration` (Llama language model), the same SigLIP tower, projector and language
model weights (LLaDA-V's names are LLaVA's, plus `image_newline`). Each row holds two `--image-size` pictures (so
LLaDA-V, like LLaVA, runs one crop per picture), text words and an answer; LLaVA's prompt gets the two extra text
tokens that LLaDA-V spends on its image newlines, so both sequences have `--seq-len` tokens. Images go through each
trainer's own collator (processor) at every step, as in real training.

Run (defaults: a ~7M-parameter model, fp32, CPU, batch 4 x 128 tokens):

    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --vision
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
import trl
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import transformers
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from llada_hf import LladaConfig, LladaForMaskedDiffusion
from llada_hf.tokenization import train_tokenizer
from llada_hf.trainers import DiffusionSFTConfig, DiffusionSFTTrainer


TRAINERS = ("diffusion", "sft")
NAMES = {"sft": "SFTTrainer + LlamaForCausalLM", "diffusion": "DiffusionSFTTrainer + LladaForMaskedDiffusion"}
VISION_NAMES = {"sft": "SFTTrainer + LlavaForConditionalGeneration",
                "diffusion": "DiffusionSFTTrainer + LladaVForConditionalGeneration"}
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
    parser.add_argument("--prompt-len", type=int, default=None,
                        help="prompt tokens per row, image placeholders included "
                             "(never masked; default 32, vision 48)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps per run (>= 1)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per trainer (alternating)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (TRL's default on GPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default; off here by default")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision", action="store_true", help="LLaDA-V against LLaVA, two pictures per row")
    parser.add_argument("--image-size", type=int, default=56, help="vision: picture and crop size (pixels)")
    parser.add_argument("--patch-size", type=int, default=14, help="vision: SigLIP patch size")
    parser.add_argument("--vision-hidden-size", type=int, default=128, help="vision: SigLIP hidden size")
    parser.add_argument("--vision-layers", type=int, default=2, help="vision: SigLIP layers")
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)  # internal: run one measurement
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prompt_len is None:
        args.prompt_len = 48 if args.vision else 32
    return args


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
    if args.vision:
        return build_vision_trainer(kind, args, output_dir)
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


def train_settings(args: argparse.Namespace, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        learning_rate=1e-4, bf16=args.bf16, use_cpu=args.device == "cpu",
        gradient_checkpointing=args.gradient_checkpointing, report_to="none",
        save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False, seed=args.seed,
    )


def build_vision_trainer(kind: str, args: argparse.Namespace, output_dir: str):
    """LLaDA-V + DiffusionSFTTrainer or LLaVA + SFTTrainer: same weights, rows of `--seq-len` tokens,
    2 pictures each."""
    from PIL import Image

    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from llada_hf import LladaVConfig, LladaVForConditionalGeneration
    from llada_hf.processing_llada_v import LladaVProcessor, official_image_processor

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokenizer = train_tokenizer([" " + " ".join(letters)] * 4, vocab_size=300)  # " x": one token per letter
    llada_v_processor = LladaVProcessor(official_image_processor(args.image_size, [[args.image_size] * 2]),
                                        tokenizer, num_image_tokens=(args.image_size // args.patch_size) ** 2)
    image_id = llada_v_processor.image_token_id
    per_image = (args.image_size // args.patch_size) ** 2  # LLaVA; LLaDA-V adds one newline per picture
    dims = dict(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq_len, 512), tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    vision = dict(hidden_size=args.vision_hidden_size, intermediate_size=4 * args.vision_hidden_size,
                  num_hidden_layers=args.vision_layers, num_attention_heads=4, image_size=args.image_size,
                  patch_size=args.patch_size, vision_use_head=False)
    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(LlavaConfig(
        vision_config={"model_type": "siglip_vision_model", **vision}, text_config=LlamaConfig(**dims),
        image_token_id=image_id, vision_feature_select_strategy="full", vision_feature_layer=-1,
        projector_hidden_act="gelu", image_seq_length=per_image))
    processor = LlavaProcessor(
        SiglipImageProcessorPil(size={"height": args.image_size, "width": args.image_size}, image_mean=[0.5] * 3,
                                image_std=[0.5] * 3), tokenizer, patch_size=args.patch_size,
        vision_feature_select_strategy="full")
    if kind == "diffusion":
        llada_v = LladaVForConditionalGeneration(LladaVConfig(
            text_config=LladaConfig(**dims, mask_token_id=tokenizer.mask_token_id), vision_config=vision,
            image_token_id=image_id, image_grid_pinpoints=[[args.image_size] * 2], vision_aspect_ratio="anyres"))
        missing = llada_v.load_state_dict(model.state_dict(), strict=False).missing_keys
        assert missing == ["model.image_newline"], missing  # every other weight is LLaVA's
        model, processor = llada_v, llada_v_processor

    generator = torch.Generator().manual_seed(args.seed)
    image_tokens = 2 * (per_image + 1)  # LLaDA-V's count; LLaVA's prompt gets the 2 newlines as text
    words, answer = args.prompt_len - image_tokens, args.seq_len - args.prompt_len - 1  # - 1: EOS
    if words < 0 or answer < 1:
        raise SystemExit(f"--prompt-len must hold the {image_tokens} image tokens, and --seq-len an answer after it.")
    rows = args.batch_size * (args.warmup + args.steps)

    def text(n: int) -> str:
        return "".join(" " + letters[i] for i in torch.randint(0, 26, (n,), generator=generator).tolist())

    images = [Image.fromarray((torch.rand(args.image_size, args.image_size, 3, generator=generator) * 255)
                              .to(torch.uint8).numpy()) for _ in range(8)]
    extra = 0 if kind == "diffusion" else 2
    dataset = Dataset.from_dict({
        "images": [[images[i % 8], images[(i + 1) % 8]] for i in range(rows)],
        "prompt": ["<image><image>" + text(words + extra) for _ in range(rows)],
        "completion": [text(answer) + tokenizer.eos_token for _ in range(rows)],
    })  # fmt: skip
    settings = train_settings(args, output_dir) | {"max_length": None}
    if kind == "diffusion":
        return DiffusionSFTTrainer(model=model, args=DiffusionSFTConfig(**settings), train_dataset=dataset,
                                   processing_class=processor)
    return SFTTrainer(model=model, args=SFTConfig(**settings), train_dataset=dataset, processing_class=processor)


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
        kind: {key: statistics.median(run[key] for run in results) for key in METRICS}
        for kind, results in runs.items()
    }
    print("| trainer | tokens/s | tokens/CPU-s | train memory (MiB) |")
    print("|---|---|---|---|")
    for kind in ("sft", "diffusion"):
        tokens_per_s, tokens_per_cpu_s, memory = (medians[kind][key] for key in METRICS)
        name = (VISION_NAMES if args.vision else NAMES)[kind]
        print(f"| {name} | {tokens_per_s:,.0f} | {tokens_per_cpu_s:,.0f} | {memory:,.1f} |")
    ratios = [medians["diffusion"][key] / medians["sft"][key] for key in METRICS]
    print("| ratio diffusion / SFT | " + " | ".join(f"{ratio:.3f}" for ratio in ratios) + " |")


if __name__ == "__main__":
    main()
