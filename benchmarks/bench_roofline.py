"""The KV caches against a roofline (issue 28, item 4): how close each decoder's forwards come to the time their
matrix products need on this machine.

1. Rates: `F.linear` is timed for every distinct (in, out) shape of the model's linear layers (LM head included) at
   M = 1, 2, 4, ... `--max-rows` rows (median of repeats, >= 20 ms per point), and `F.scaled_dot_product_attention`
   for every attention shape the forwards use (rows, heads, queries, keys, head_dim, with the mask the model passes),
   on random tensors of the model's dtype.
2. Forwards: the first `--blocks` blocks (block 32) at one token per step (equal steps for every setting) of the
   official sampler (no cache), the prefix cache, the dual cache and the dual cache refreshed every 4th block, on the
   race LLaDA of bench_decoding_quality_speed.py (its cached training; `--untrained`, or a missing cache: a randomly
   initialised model of the same sizes: the timing does not depend on the weights at equal steps). Hooks on the model
   time every forward (synchronised before and after) and record its shapes; the step loop is also timed without
   hooks.
3. Roofline of a forward: its linear layers at M = rows x queries, its attention (one SDPA call per layer) and the LM
   head at M = rows x kept positions (`logits_to_keep`), each at the measured rate for that shape (linear
   interpolation in M between measured points; proportional beyond the last one).

Efficiency = roofline / measured: 1.0 means the forwards take exactly what their matrix products take; the rest is
everything else (embedding, norms, rotary, masks, cache writes, Python). Roofline / step loop also counts the
sampler's own work between forwards. The issue's goal: >= 0.85.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_roofline.py
    .venv/bin/python benchmarks/bench_roofline.py --device cuda   # on a GPU
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_roofline.py --untrained --lengths 64 --batches 1 --blocks 1 \
        --max-rows 64   # a smoke test
"""

import argparse
import json
import os
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from bench_decoding_quality_speed import (
    BLOCK,
    EQUAL_STEPS,
    SETTINGS,
    add_recipe_options,
    encode,
    first_blocks,
    load_or_train_tokenizer,
    model_sizes,
    recipe_folder,
    task_example,
)
from bench_fast_decoding import sync
from torch import nn


GOAL = 0.85
# Equal steps (one token per step, no threshold): the caches' own cost per step
TIMED_SETTINGS = {name: SETTINGS[name] for name in EQUAL_STEPS} | {
    "dual+refresh4": {"kv_cache": "dual", "cache_refresh_interval": 4}
}


def seconds_per_call(fn, device, min_seconds: float = 0.02, min_repeats: int = 5) -> float:
    """Median seconds of one call of `fn`. Calls run in batches of >= 1 ms between synchronisations (a lone small
    kernel would time the clock and the sync), batches repeat until `min_seconds` have run."""
    fn()  # warm-up: allocations, kernel choice
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    inner = max(1, int(1e-3 / max(time.perf_counter() - started, 1e-7)))
    per_call, elapsed = [], 0.0
    while len(per_call) < min_repeats or elapsed < min_seconds:
        sync(device)
        started = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        batch = time.perf_counter() - started
        per_call.append(batch / inner)
        elapsed += batch
    return statistics.median(per_call)


def rows_sweep(max_rows: int) -> list[int]:
    """1, 2, 4, ... up to `max_rows` (included)."""
    rows = [1 << i for i in range(max_rows.bit_length()) if 1 << i < max_rows]
    return rows + [max_rows]


class LinearRates:
    """Measured seconds of `F.linear` per (in, out) shape at each M of a sweep; `linear_seconds` interpolates."""

    def __init__(self, shapes: list[tuple[int, int]], rows: list[int], device, dtype: torch.dtype):
        self.rows = rows
        self.table: dict[tuple[int, int], list[float]] = {}
        for fan_in, fan_out in shapes:
            weight = torch.randn(fan_out, fan_in, device=device, dtype=dtype)
            inputs = {m: torch.randn(m, fan_in, device=device, dtype=dtype) for m in rows}
            self.table[(fan_in, fan_out)] = [
                seconds_per_call(lambda x=inputs[m]: F.linear(x, weight), device) for m in rows]

    def linear_seconds(self, m: int, fan_in: int, fan_out: int) -> float:
        """Seconds of an [m, fan_in] x [fan_in, fan_out] product: linear in M between the measured points, at the
        last point's rate beyond it."""
        times = self.table[(fan_in, fan_out)]
        if m >= self.rows[-1]:
            return times[-1] * m / self.rows[-1]
        upper = next(i for i, rows in enumerate(self.rows) if rows >= m)
        if upper == 0:
            return times[0]
        low, high = self.rows[upper - 1], self.rows[upper]
        return times[upper - 1] + (times[upper] - times[upper - 1]) * (m - low) / (high - low)

    def gflops(self, fan_in: int, fan_out: int) -> list[float]:
        return [2 * m * fan_in * fan_out / seconds / 1e9
                for m, seconds in zip(self.rows, self.table[(fan_in, fan_out)])]


@dataclass(frozen=True)
class AttentionShape:
    """One SDPA call of a forward: query rows, positions, keys, and the mask's shape and dtype (None: no mask)."""

    rows: int
    queries: int
    keys: int
    mask: tuple[tuple[int, ...], str] | None


def attention_seconds(shape: AttentionShape, mask: torch.Tensor | None, config, device, dtype) -> float:
    """One SDPA call on random q/k/v of `shape` with the model's heads, and the mask the model passed."""
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    query = torch.randn(shape.rows, heads, shape.queries, head_dim, device=device, dtype=dtype)
    key, value = (torch.randn(shape.rows, kv_heads, shape.keys, head_dim, device=device, dtype=dtype)
                  for _ in range(2))
    return seconds_per_call(lambda: F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, enable_gqa=heads != kv_heads), device)


def attention_flops(shape: AttentionShape, config) -> int:
    return 4 * shape.rows * config.num_attention_heads * shape.queries * shape.keys * config.head_dim


@dataclass
class Forward:
    """One forward of the model: its shapes and measured seconds. `head_rows`: the positions the LM head runs on,
    all rows together."""

    rows: int
    queries: int
    keys: int
    head_rows: int
    attention: AttentionShape | None = None
    seconds: float = 0.0

    @property
    def shape(self) -> tuple:
        return self.rows, self.queries, self.keys, self.head_rows, self.attention


def key_width(cache, queries: int) -> int:
    """Keys a forward's queries attend to: the cache's width when the queries are part of the sequence (a cached
    pass: `query_start` is not the int 0), else the queries themselves (a full pass)."""
    layer = cache.layers[0] if cache is not None and cache.layers else None
    if layer is None or isinstance(layer.query_start, int) and layer.query_start == 0:
        return queries
    return layer.keys.shape[-2]


def head_rows(keep, rows: int, queries: int) -> int:
    """Positions the LM head runs on (all rows), as `slice_logits_to_keep` reads `logits_to_keep`."""
    if not torch.is_tensor(keep):
        return rows * (keep or queries)
    if keep.dim() == 2 and keep.dtype == torch.bool:
        return int(keep.sum())
    return rows * keep.shape[-1]


class ForwardRecorder:
    """Hooks on the model: every forward's shapes and seconds (synchronised before and after), and one sample of
    each attention mask shape (layer 0's, as every layer gets the same) for the SDPA timing."""

    def __init__(self, model, device):
        self.device = device
        self.forwards: list[Forward] = []
        self.masks: dict[AttentionShape, torch.Tensor | None] = {}
        self.started = 0.0
        self.handles = [
            model.register_forward_pre_hook(self.begin, with_kwargs=True),
            model.model.layers[0].self_attn.register_forward_pre_hook(self.attention, with_kwargs=True),
            model.register_forward_hook(self.end),
        ]

    def begin(self, module, args, kwargs):
        tokens = kwargs.get("input_ids")
        rows, queries = (tokens if tokens is not None else kwargs["inputs_embeds"]).shape[:2]
        keys = key_width(kwargs.get("cache"), queries)
        self.forwards.append(Forward(rows, queries, keys, head_rows(kwargs.get("logits_to_keep", 0), rows, queries)))
        sync(self.device)
        self.started = time.perf_counter()

    def attention(self, module, args, kwargs):
        forward, mask = self.forwards[-1], kwargs.get("attention_mask")
        described = None if mask is None else (tuple(mask.shape), str(mask.dtype).removeprefix("torch."))
        forward.attention = AttentionShape(forward.rows, forward.queries, forward.keys, described)
        self.masks.setdefault(forward.attention, mask)

    def end(self, module, args, output):
        sync(self.device)
        self.forwards[-1].seconds = time.perf_counter() - self.started

    def remove(self):
        for handle in self.handles:
            handle.remove()


def load_model(tokenizer, args):
    """The race LLaDA of bench_decoding_quality_speed.py (its cached training), or a randomly initialised one of the
    same sizes with `--untrained` or when the cache is missing; and a line that says which."""
    from transformers import AutoModel

    import llada_hf  # noqa: F401  (registers the model with AutoModel)
    from llada_hf import LladaConfig, LladaForMaskedDiffusion
    from llada_hf.tokenization import model_token_ids

    folder = recipe_folder("llada", args)
    if not args.untrained and os.path.isfile(os.path.join(folder, "model.safetensors")):
        return AutoModel.from_pretrained(folder).eval(), f"trained ({os.path.relpath(folder)})"
    torch.manual_seed(0)
    model = LladaForMaskedDiffusion(LladaConfig(**model_sizes(args), **model_token_ids(tokenizer))).eval()
    reason = "--untrained" if args.untrained else f"no trained model at {os.path.relpath(folder)}"
    return model, f"untrained, randomly initialised, same sizes ({reason})"


def linear_shapes(model) -> tuple[list[tuple[int, int]], dict[tuple[int, int], list[str]]]:
    """The (in, out) shape of every linear layer of the body (one entry per module), and each distinct shape's
    module names (LM head included)."""
    body, names = [], {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            shape = (module.in_features, module.out_features)
            if module is not model.lm_head:
                body.append(shape)
            short = name.rsplit(".", 1)[-1]
            if short not in names.setdefault(shape, []):
                names[shape].append(short)
    return body, names


@torch.no_grad()
def recorded_forwards(model, ids, mask, length: int, extra: dict, args) -> tuple[list[Forward], dict]:
    """The forwards of `--repeats` runs of the first blocks (after one warm-up run): per forward, its shapes and the
    median of its seconds over the runs; and a sample mask per attention shape."""
    first_blocks(model, ids, mask, length, args.blocks, extra)  # warm-up
    runs, masks = [], {}
    for _ in range(args.repeats):
        recorder = ForwardRecorder(model, args.device)
        try:
            first_blocks(model, ids, mask, length, args.blocks, extra)
        finally:
            recorder.remove()
        runs.append(recorder.forwards)
        masks |= recorder.masks
    if any([f.shape for f in run] != [f.shape for f in runs[0]] for run in runs):
        raise RuntimeError("The runs took different forwards; the decoding is not deterministic.")
    for index, forward in enumerate(runs[0]):
        forward.seconds = statistics.median(run[index].seconds for run in runs)
    return runs[0], masks


@torch.no_grad()
def step_loop_seconds(model, ids, mask, length: int, extra: dict, args) -> float:
    """The median over `--repeats` runs of the first blocks' step loop, without hooks."""
    return statistics.median(first_blocks(model, ids, mask, length, args.blocks, extra)[0]
                             for _ in range(args.repeats))


def roofline_parts(forward: Forward, model, rates: LinearRates, attention: dict[AttentionShape, float],
                   body: list[tuple[int, int]]) -> dict[str, float]:
    """Seconds the forward's matrix products need at the measured rates: linear layers, attention, LM head."""
    head = model.lm_head
    return {
        "linear": sum(rates.linear_seconds(forward.rows * forward.queries, *shape) for shape in body),
        "attention": model.config.num_hidden_layers * attention[forward.attention],
        "lm_head": rates.linear_seconds(forward.head_rows, head.in_features, head.out_features),
    }


def typical_forward(forwards: list[Forward]) -> tuple[Forward, int]:
    """The most common shape among `forwards` (with the median of its seconds) and how many forwards have it."""
    shape, count = Counter(f.shape for f in forwards).most_common(1)[0]
    same = [f for f in forwards if f.shape == shape]
    return Forward(*shape, seconds=statistics.median(f.seconds for f in same)), count


def case_result(name: str, forwards: list[Forward], loop: float, parts) -> dict:
    """A setting's numbers at one (length, batch): forwards, measured and roofline seconds, the typical forward's
    breakdown."""
    measured = sum(f.seconds for f in forwards)
    roofline = sum(sum(parts(f).values()) for f in forwards)
    typical, count = typical_forward(forwards)
    typical_parts = parts(typical)
    return {
        "setting": name, "forwards": len(forwards), "measured_forward_s": measured, "roofline_s": roofline,
        "efficiency_forwards": roofline / measured, "step_loop_s": loop, "efficiency_step_loop": roofline / loop,
        "typical": {"rows": typical.rows, "queries": typical.queries, "keys": typical.keys,
                    "lm_head_rows": typical.head_rows, "count": count, "measured_s": typical.seconds,
                    **{f"{part}_s": seconds for part, seconds in typical_parts.items()},
                    "other_s": typical.seconds - sum(typical_parts.values())},
    }


def print_linear_rates(rates: LinearRates, names: dict[tuple[int, int], list[str]]) -> None:
    print("\nMatrix-product rates: F.linear, GFLOP/s at M rows\n\n| layers | in x out | "
          + " | ".join(f"M={m}" for m in rates.rows) + " |\n|---|---|" + "---|" * len(rates.rows))
    for (fan_in, fan_out), layers in names.items():
        cells = " | ".join(f"{g:.1f}" for g in rates.gflops(fan_in, fan_out))
        print(f"| {'/'.join(layers)} | {fan_in} x {fan_out} | {cells} |")


def print_attention_rates(attention: dict[AttentionShape, float], config) -> None:
    print(f"\nAttention: one F.scaled_dot_product_attention call ({config.num_attention_heads} heads, "
          f"{config.num_key_value_heads} key/value heads, head_dim {config.head_dim})\n\n"
          "| rows | queries | keys | mask | ms | GFLOP/s |\n|---|---|---|---|---|---|")
    for shape, seconds in sorted(attention.items(), key=lambda item: (item[0].rows, item[0].queries, item[0].keys)):
        mask = "none" if shape.mask is None else f"{list(shape.mask[0])} {shape.mask[1]}"
        print(f"| {shape.rows} | {shape.queries} | {shape.keys} | {mask} | {seconds * 1e3:.3f} | "
              f"{attention_flops(shape, config) / seconds / 1e9:.1f} |")


def print_case(length: int, batch: int, results: list[dict], blocks: int) -> None:
    print(f"\nLength {length}, batch {batch}: the first {blocks} block(s) at one token per step. Roofline = the "
          f"forwards' matrix products at the measured rates; goal roofline/measured >= {GOAL}\n\n"
          "| setting | forwards | measured forward s | roofline s | roofline/measured (forwards) | step loop s | "
          "outside forwards s | roofline/step loop |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        flag = "" if r["efficiency_forwards"] >= GOAL else " (below goal)"
        print(f"| {r['setting']} | {r['forwards']} | {r['measured_forward_s']:.4f} | {r['roofline_s']:.4f} | "
              f"{r['efficiency_forwards']:.2f}{flag} | {r['step_loop_s']:.4f} | "
              f"{r['step_loop_s'] - r['measured_forward_s']:.4f} | {r['efficiency_step_loop']:.2f} |")
    print("\nOne typical forward of each setting (its most common shape; ms): where the time goes. other = measured - "
          "roofline (embedding, norms, rotary, mask, cache writes, Python)\n\n| setting | forwards of this shape | "
          "rows x queries -> keys | LM head rows | measured | linear | attention | LM head | other | "
          "roofline/measured |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        t = r["typical"]
        roofline = t["linear_s"] + t["attention_s"] + t["lm_head_s"]
        print(f"| {r['setting']} | {t['count']} | {t['rows']} x {t['queries']} -> {t['keys']} | {t['lm_head_rows']} | "
              f"{t['measured_s'] * 1e3:.3f} | {t['linear_s'] * 1e3:.3f} | {t['attention_s'] * 1e3:.3f} | "
              f"{t['lm_head_s'] * 1e3:.3f} | {t['other_s'] * 1e3:.3f} | {roofline / t['measured_s']:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--blocks", type=int, default=2, help="blocks of 32 decoded per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (medians over them)")
    parser.add_argument("--max-rows", type=int, default=4096, help="the largest M of the F.linear sweep")
    parser.add_argument("--untrained", action="store_true", help="a randomly initialised model of the same sizes")
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON document instead")
    add_recipe_options(parser)  # the race model's recipe: it names its cache folder
    args = parser.parse_args()

    tokenizer = load_or_train_tokenizer(args)
    model, origin = load_model(tokenizer, args)
    model = model.to(args.device)
    dtype = model.dtype
    body, names = linear_shapes(model)
    rates = LinearRates(list(names), rows_sweep(args.max_rows), args.device, dtype)
    rng = random.Random(123)
    prompts = [task_example(rng, args)[0] for _ in range(max(args.batches))]

    cases, masks = [], {}
    for length in args.lengths:
        for batch in args.batches:
            ids, mask = encode(tokenizer, prompts[:batch], args.device)
            for name, extra in TIMED_SETTINGS.items():
                forwards, seen = recorded_forwards(model, ids, mask, length, extra, args)
                masks |= seen
                cases.append((length, batch, name, forwards, step_loop_seconds(model, ids, mask, length, extra, args)))
    attention = {shape: attention_seconds(shape, mask, model.config, args.device, dtype)
                 for shape, mask in masks.items()}

    def parts(forward: Forward) -> dict[str, float]:
        return roofline_parts(forward, model, rates, attention, body)

    results = [{"length": length, "batch": batch, **case_result(name, forwards, loop, parts)}
               for length, batch, name, forwards, loop in cases]
    header = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "model": origin, "dtype": str(dtype).removeprefix("torch."),
              "attention_implementation": model.config._attn_implementation, "block_length": BLOCK,
              "blocks": args.blocks, "repeats": args.repeats}
    if args.json:
        print(json.dumps({
            **header,
            "linear_gflops": {f"{i}x{o}": dict(zip(rates.rows, rates.gflops(i, o))) for i, o in names},
            "attention_s": [{"rows": s.rows, "queries": s.queries, "keys": s.keys, "mask": s.mask, "seconds": t}
                            for s, t in attention.items()],
            "cases": results,
        }, indent=1))
        return
    print(", ".join(f"{key} {value}" for key, value in header.items()))
    print_linear_rates(rates, names)
    print_attention_rates(attention, model.config)
    for length in args.lengths:
        for batch in args.batches:
            print_case(length, batch, [r for r in results if (r["length"], r["batch"]) == (length, batch)],
                       args.blocks)


if __name__ == "__main__":
    main()
