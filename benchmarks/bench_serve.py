"""`llada-hf serve`: 8 concurrent clients against 8 sequential requests (issue 16).

A small randomly initialised LLaDA (hidden 256, 4 layers by default; the vocabulary of a small trained
tokenizer) is saved to a temporary folder and served by `llada-hf serve` in a subprocess on a loopback port.
Every request is a /v1/completions call with the same settings (temperature 0, `logits_eos_inf` so that every
answer has exactly `max_tokens` tokens). Sequential: one request after the other, each sent when the previous
answer arrived. Concurrent: `--clients` threads send one request each at the same moment. Throughput = answer
tokens / wall seconds; the ratio concurrent / sequential is what step-level batching buys. Phases alternate,
`--repeats` times; medians are reported, with the forward passes the server ran (from /metrics).

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py                                   # RESULTS.md
    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py --kv-cache dual --block-length 8
    python benchmarks/bench_serve.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16 --max-tokens 128
"""

import argparse
import concurrent.futures
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


def build_model(args, folder):
    import torch

    from llada_hf import LladaConfig, LladaForMaskedDiffusion
    from llada_hf.tokenization import model_token_ids, train_tokenizer

    texts = [f"the {a} sat on the {c} mat and said {w}" for a in ("cat", "dog", "bird", "fox")
             for c in ("red", "blue", "green") for w in ("hello", "thanks", "good night")]
    tokenizer = train_tokenizer(texts * 3, vocab_size=300)
    torch.manual_seed(0)
    config = LladaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, max_position_embeddings=1024,
                         **model_token_ids(tokenizer))
    model = LladaForMaskedDiffusion(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # spread the logits: no near-ties everywhere
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url, body, timeout=600):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def forward_passes(base) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("llada_forward_passes_total "):
                return float(line.split()[-1])
    return float("nan")


PROMPTS = ["the cat sat on the", "a dog said", "the bird", "the fox sat on the red mat and", "good night",
           "the green mat", "hello", "the blue"]


def body(args, index):
    settings = {"model": "bench", "prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": args.max_tokens,
                "steps": args.steps or args.max_tokens, "temperature": 0, "logits_eos_inf": True}
    if args.block_length:
        settings["block_length"] = args.block_length
    if args.kv_cache:
        settings["kv_cache"] = args.kv_cache
    return settings


def sequential(args, base):
    started = time.perf_counter()
    tokens = sum(post(base + "/v1/completions", body(args, i))["usage"]["completion_tokens"]
                 for i in range(args.clients))
    return tokens, time.perf_counter() - started


def concurrent_clients(args, base):
    barrier = threading.Barrier(args.clients)

    def one(i):
        barrier.wait(60)
        return post(base + "/v1/completions", body(args, i))["usage"]["completion_tokens"]

    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        started = time.perf_counter()
        tokens = sum(pool.map(one, range(args.clients)))
    return tokens, time.perf_counter() - started


def engine_ceiling(args) -> float:
    """The same work without HTTP, in this process: the step engine on one left-padded batch of `clients` rows
    against `clients` single rows one after the other (median of `repeats`): what batching can buy on this machine
    whatever the server does."""
    import torch

    from transformers import AutoModel, AutoTokenizer

    import llada_hf  # noqa: F401  (registers the Auto classes)
    from llada_hf.decoding_llada import DiffusionEngine, left_pad

    with tempfile.TemporaryDirectory() as folder:
        build_model(args, folder)
        model = AutoModel.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [tokenizer(body(args, i)["prompt"], add_special_tokens=False).input_ids for i in range(args.clients)]
    settings = {key: value for key, value in body(args, 0).items() if key not in ("model", "prompt")}
    settings["max_new_tokens"] = settings.pop("max_tokens")

    def run(batches):
        engine = DiffusionEngine(model)
        started = time.perf_counter()
        for rows in batches:
            ids, mask = left_pad(rows, model.config.pad_token_id)
            row_ids = engine.add(ids, attention_mask=mask if len(rows) > 1 else None, **settings)
            while engine.has_unfinished:
                engine.step()
            for row_id in row_ids:
                engine.pop(row_id)
        return time.perf_counter() - started

    if args.server_threads is not None:
        torch.set_num_threads(args.server_threads)  # as many threads as the server had
    ratios = []
    with torch.no_grad():
        run([prompts[:1]])  # warm-up
        for _ in range(args.repeats):
            ratios.append(run([[prompt] for prompt in prompts]) / run([prompts]))
    return round(statistics.median(ratios), 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="default: max_tokens")
    parser.add_argument("--block-length", type=int, default=None)
    parser.add_argument("--kv-cache", choices=["prefix", "dual"], default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="the server's flag (default: its own)")
    parser.add_argument("--server-threads", type=int, default=None,
                        help="OMP_NUM_THREADS of the server process (default: this process's environment)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table row")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        build_model(args, folder)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-c", "import sys; from llada_hf.cli import main; sys.exit(main())", "serve",
                   folder, "--port", str(port), "--served-model-name", "bench", "--device", args.device,
                   "--dtype", args.dtype, "--max-batch", str(max(args.clients, 1)), "--log-level", "warning",
                   "--max-tokens-limit", str(args.max_tokens)]
        if args.batch_wait_ms is not None:
            command += ["--batch-wait-ms", str(args.batch_wait_ms)]
        env = dict(os.environ)
        if args.server_threads is not None:
            env["OMP_NUM_THREADS"] = str(args.server_threads)
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    urllib.request.urlopen(base + "/health", timeout=2)
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("the server did not start: " + server.stderr.read()[-2000:])
                    time.sleep(0.2)
            post(base + "/v1/completions", body(args, 0))  # warm-up
            rows = {"sequential": [], "concurrent": []}
            for _ in range(args.repeats):
                for name, run in (("sequential", sequential), ("concurrent", concurrent_clients)):
                    before = forward_passes(base)
                    tokens, seconds = run(args, base)
                    rows[name].append((tokens / seconds, seconds, forward_passes(base) - before))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)

    def median(name, column):
        return statistics.median(row[column] for row in rows[name])

    ratios = [conc[0] / seq[0] for seq, conc in zip(rows["sequential"], rows["concurrent"])]  # paired: same load
    result = {
        "model": f"hidden {args.hidden}, {args.layers} layers", "max_tokens": args.max_tokens,
        "steps": args.steps or args.max_tokens, "block_length": args.block_length, "kv_cache": args.kv_cache,
        "clients": args.clients, "device": args.device, "dtype": args.dtype,
        "server_threads": args.server_threads or os.environ.get("OMP_NUM_THREADS"),
        "sequential_tok_s": round(median("sequential", 0), 1), "concurrent_tok_s": round(median("concurrent", 0), 1),
        "sequential_forwards": median("sequential", 2), "concurrent_forwards": median("concurrent", 2),
        "ratio": round(statistics.median(ratios), 2), "ratios": [round(r, 2) for r in ratios],
        "engine_ratio": engine_ceiling(args) if args.device == "cpu" else None,
    }
    if args.json:
        print(json.dumps(result))
        return
    print("| model | block | kv_cache | server threads | sequential tok/s | concurrent tok/s | ratio (each repeat) | "
          "forwards seq / conc | engine alone |")
    print("|---|---|---|---|---|---|---|---|---|")
    engine = f"{result['engine_ratio']}x" if result["engine_ratio"] else "-"
    print(f"| {result['model']} | {args.block_length or '-'} | {args.kv_cache or '-'} | {result['server_threads']} | "
          f"{result['sequential_tok_s']} | {result['concurrent_tok_s']} | **{result['ratio']}x** "
          f"({', '.join(str(r) for r in result['ratios'])}) | {result['sequential_forwards']:.0f} / "
          f"{result['concurrent_forwards']:.0f} | {engine} |")

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
