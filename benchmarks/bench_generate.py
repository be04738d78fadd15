"""generate() vs the naive official sampler: tokens/s, peak memory and identical tokens (issue 3).

Both run on the same randomly initialised LLaDA (vocabulary 32k by default), with the same settings, in
the same invocation. The reference is `llada_reference.reference_generate` (benchmarks/llada_reference/,
shared with the tests): the official algorithm as published (full-sequence logits, full [B, L, V] float64
tensors, a per-row topk loop).

Each measurement runs in a fresh subprocess so that its peak memory (CPU: max RSS above the loaded
model; GPU: torch.cuda.max_memory_allocated) is its own.

    .venv/bin/python benchmarks/bench_generate.py                   # the table in RESULTS.md
    .venv/bin/python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --hidden 1024 --layers 8
"""

import argparse
import json
import multiprocessing as mp
import resource
import time

import torch


def build_model(args):
    from llada_hf import LladaConfig, LladaForMaskedDiffusion

    torch.manual_seed(0)
    config = LladaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, mask_token_id=args.vocab - 1,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, max_position_embeddings=4096,
    )
    dtype = getattr(torch, args.dtype)
    model = LladaForMaskedDiffusion(config).to(device=args.device, dtype=dtype).eval()
    with torch.no_grad():  # spread the logits so the argmax is not a near-tie everywhere
        model.lm_head.weight.normal_(0, 0.5)
    return model


def prompts(args, batch):
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, args.vocab - 1, (batch, args.prompt_length), generator=g).to(args.device)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(args, impl, gen_length, batch, queue):
    from llada_reference import reference_generate

    model = build_model(args)
    ids = prompts(args, batch)
    settings = dict(steps=gen_length, block_length=args.block_length)

    def run():
        if impl == "generate":
            return model.generate(ids, max_new_tokens=gen_length, **settings)
        model_fn = lambda x, mask: model(x, attention_mask=mask).logits  # noqa: E731
        return reference_generate(model_fn, ids, gen_length=gen_length, mask_id=model.config.mask_token_id, **settings)

    with torch.no_grad():
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        sync(args.device)
        start = time.perf_counter()
        out = run()
        sync(args.device)
        seconds = time.perf_counter() - start
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    queue.put({"tokens": out[:, -gen_length:].cpu().tolist(), "seconds": seconds, "peak_mb": peak / 2**20})


def run_isolated(args, impl, gen_length, batch):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(args, impl, gen_length, batch, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, dtype {args.dtype}, "
          f"vocab {args.vocab}, hidden {args.hidden}, layers {args.layers}")
    print("| max_new_tokens | batch | reference tok/s | generate tok/s | speed-up | reference peak MB | "
          "generate peak MB | identical tokens |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for gen_length in args.lengths:
        for batch in args.batches:
            ref = run_isolated(args, "reference", gen_length, batch)
            ours = run_isolated(args, "generate", gen_length, batch)
            tokens = batch * gen_length
            row = {
                "max_new_tokens": gen_length, "batch": batch,
                "reference_tok_s": tokens / ref["seconds"], "generate_tok_s": tokens / ours["seconds"],
                "reference_peak_mb": ref["peak_mb"], "generate_peak_mb": ours["peak_mb"],
                "identical": ref["tokens"] == ours["tokens"],
            }
            rows.append(row)
            print(f"| {gen_length} | {batch} | {row['reference_tok_s']:.1f} | {row['generate_tok_s']:.1f} | "
                  f"{row['generate_tok_s'] / row['reference_tok_s']:.2f}x | {row['reference_peak_mb']:.0f} | "
                  f"{row['generate_peak_mb']:.0f} | {row['identical']} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
