"""Forward throughput of LladaForMaskedDiffusion against transformers' LlamaForCausalLM of the same size.

Both models get the same dimensions, the same weights (LLaDA uses Llama's parameter names, so Llama's
state dict loads as is), the same input and the same attention backend. Timings alternate between the
two models inside one run, after a warm-up, and the median of each is compared; the ratio
LLaDA / Llama in tokens/s is the number we track (goal: >= 0.95).

The models differ in one thing only: LLaDA attends bidirectionally, Llama causally. Both are run
without a padding mask and with `use_cache=False`, so neither builds a key/value cache.

Run (defaults: a ~58M-parameter model, fp32, CPU, sdpa and eager):

    python benchmarks/bench_forward.py
    python benchmarks/bench_forward.py --threads 1 --clock cpu   # on a machine shared with other jobs
    python benchmarks/bench_forward.py --device cuda --dtype bfloat16 --batch-size 8 --seq-len 1024
"""

import argparse
import platform
import statistics
import time

import torch

import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from llada_hf import LladaConfig, LladaForMaskedDiffusion


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate-size", type=int, default=1408)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--attn", nargs="+", default=["sdpa", "eager"], help="attention backends to compare")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=3, help="untimed forwards per model before timing")
    parser.add_argument("--repeats", type=int, default=15, help="timed forwards per model (alternating)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=list(CLOCKS),
        help="wall: elapsed time. cpu: this process's CPU time, which time spent waiting for a core does not "
        "inflate; use it with --threads 1 on a machine shared with other jobs (CPU only)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def shared_dimensions(args: argparse.Namespace) -> dict:
    """The config fields that mean the same thing in LlamaConfig and LladaConfig."""
    return dict(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq_len, 512),
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        pad_token_id=1,
        eos_token_id=1,
        bos_token_id=2,
    )


def build_models(args: argparse.Namespace, attn: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A Llama and a LLaDA with identical dimensions and weights, in eval mode on the target device."""
    dtype = getattr(torch, args.dtype)
    dims = shared_dimensions(args)
    torch.manual_seed(args.seed)
    llama = LlamaForCausalLM(LlamaConfig(**dims, attn_implementation=attn))
    llada = LladaForMaskedDiffusion(
        LladaConfig(**dims, mask_token_id=args.vocab_size - 1, attn_implementation=attn)
    )
    llada.load_state_dict(llama.state_dict(), strict=True)  # same parameter names: same weights
    return tuple(m.to(device=args.device, dtype=dtype).eval() for m in (llama, llada))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_forward(model: torch.nn.Module, input_ids: torch.Tensor, clock) -> float:
    """Seconds for one forward pass (logits for every position)."""
    synchronize(str(input_ids.device))
    start = clock()
    model(input_ids=input_ids, use_cache=False)
    synchronize(str(input_ids.device))
    return clock() - start


@torch.no_grad()
def compare(args: argparse.Namespace, attn: str) -> dict:
    """Median tokens/s of each model, timed alternately (which model goes first alternates too).

    The ratio is the median over the repeats of (Llama time / LLaDA time) of the two back-to-back forwards
    of one repeat: both ran under the same load, so a slow spell of the machine cancels out. Its quartiles
    show how much the measurement can be trusted.
    """
    llama, llada = build_models(args, attn)
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, args.vocab_size - 1, (args.batch_size, args.seq_len), generator=generator)
    input_ids = input_ids.to(args.device)
    models = {"llama": llama, "llada": llada}
    clock = CLOCKS[args.clock]
    for _ in range(args.warmup):
        for model in models.values():
            time_forward(model, input_ids, clock)
    times = {name: [] for name in models}
    for repeat in range(args.repeats):
        order = list(models) if repeat % 2 == 0 else list(reversed(models))  # cancels drift and cache effects
        for name in order:
            times[name].append(time_forward(models[name], input_ids, clock))
    tokens = args.batch_size * args.seq_len
    ratios = [llama_time / llada_time for llama_time, llada_time in zip(times["llama"], times["llada"])]
    quartiles = statistics.quantiles(ratios, n=4)
    return {
        "attn": attn,
        "llama_tok_s": tokens / statistics.median(times["llama"]),
        "llada_tok_s": tokens / statistics.median(times["llada"]),
        "ratio": statistics.median(ratios),  # LLaDA tokens/s over Llama tokens/s
        "ratio_quartiles": (quartiles[0], quartiles[2]),
        "params_m": sum(p.numel() for p in llada.parameters()) / 1e6,
    }


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        accelerator = torch.cuda.get_device_name(device)
    else:
        accelerator = f"{torch.get_num_threads()} torch threads"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {accelerator}, torch {torch.__version__}, transformers {transformers.__version__}"


def main() -> None:
    args = parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        raise SystemExit("--clock cpu measures CPU work; on an accelerator use --clock wall.")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine_description(args.device)}")
    print(
        f"shape: batch {args.batch_size} x {args.seq_len} tokens, hidden {args.hidden_size}, layers {args.layers}, "
        f"heads {args.heads}/{args.kv_heads} kv, intermediate {args.intermediate_size}, vocab {args.vocab_size}, "
        f"{args.dtype} on {args.device}, warm-up {args.warmup}, repeats {args.repeats}, {args.clock} clock"
    )
    unit = "tokens/s" if args.clock == "wall" else "tokens/CPU-s"
    print(f"| attention | params (M) | Llama {unit} | LLaDA {unit} | ratio LLaDA/Llama | ratio quartiles |")
    print("|---|---|---|---|---|---|")
    for attn in args.attn:
        row = compare(args, attn)
        print(
            f"| {row['attn']} | {row['params_m']:.1f} | {row['llama_tok_s']:,.0f} | {row['llada_tok_s']:,.0f} "
            f"| {row['ratio']:.3f} | {row['ratio_quartiles'][0]:.3f} – {row['ratio_quartiles'][1]:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
