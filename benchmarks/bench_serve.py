"""`llada-hf serve` under load: requests arriving at random times (issue 30), or a burst of clients (issue 16).

A small randomly initialised LLaDA (hidden 256, 4 layers by default; the vocabulary of a small trained
tokenizer) is saved to a temporary folder and served by `llada-hf serve` in a subprocess on a loopback port.
Every request is a /v1/completions call at temperature 0 with `logits_eos_inf` (so that every answer has exactly
`max_tokens` tokens).

`--arrivals` (continuous batching): `--requests` requests, each with the settings of `--mix` ("mixed": block lengths,
caches and a confidence threshold in turn; "same": one setting), are first served one at a time (each sent when the
previous answer arrived), then sent at Poisson arrival times at each `--loads` multiple of that one-at-a-time rate.
For each run: answer tokens per second (first arrival to last answer), time to first token (the first streamed
text), p50/p99 latency (arrival to answer), the mean number of requests in flight (total latency / span) and the
forward passes the server ran and its engine loop's busy milliseconds per step (from /metrics). Ratios are against
the one-at-a-time run. `--in-process` drives the server's scheduler in this process instead of over HTTP (on a
2-core machine the web thread and the HTTP client otherwise share the engine's cores).

Default (burst): sequential (one request after the other) against concurrent (`--clients` threads send one request
each at the same moment), phases alternating `--repeats` times, medians reported, with the ratio the engine alone
reaches on the same rows without HTTP.

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py --arrivals --hidden 64 --layers 2       # issue 30
    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py --arrivals --in-process --hidden 64 --layers 2 --mix same \
        --block-length 8 --kv-cache dual --loads 3 4 5
    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py --arrivals --hidden 256 --layers 4
    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py --hidden 64 --layers 2                  # issue 16 (burst)
    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py --kv-cache dual --block-length 8
    python benchmarks/bench_serve.py --arrivals --device cuda --dtype bfloat16 --hidden 2048 --layers 16 \
        --max-tokens 128 --loads 2 4 8 16 --max-batch 64
    python benchmarks/bench_serve.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16 --max-tokens 128
"""

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import random
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
    return server_counters(base)["forwards"]


def server_counters(base) -> dict:
    """The engine loop's forward passes, steps and busy seconds, from /metrics."""
    names = {"llada_forward_passes_total": "forwards", "llada_steps_total": "steps",
             "llada_busy_seconds_total": "busy"}
    counters = dict.fromkeys(names.values(), float("nan"))
    with urllib.request.urlopen(base + "/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            name, _, value = line.partition(" ")
            if name in names:
                counters[names[name]] = float(value)
    return counters


PROMPTS = ["the cat sat on the", "a dog said", "the bird", "the fox sat on the red mat and", "good night",
           "the green mat", "hello", "the blue"]


def body(args, index):
    settings = {"model": "bench", "prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": args.max_tokens,
                "steps": args.steps or args.max_tokens, "temperature": 0, "logits_eos_inf": True}
    if args.block_length:
        settings["block_length"] = args.block_length
    if args.kv_cache:
        settings["kv_cache"] = args.kv_cache
    if args.cache_refresh_interval:
        settings["cache_refresh_interval"] = args.cache_refresh_interval
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


MIXED = [  # --mix mixed: the settings requests take in turn (steps = max_tokens)
    {"block_length": 8, "kv_cache": "dual"},
    {},  # one block, no cache
    {"block_length": 8, "kv_cache": "prefix"},
    {"block_length": 8, "kv_cache": "dual", "confidence_threshold": 0.9},
    {"block_length": 16},
]


def arrival_body(args, index):
    settings = body(args, index)
    if args.mix == "mixed":
        settings.update(MIXED[index % len(MIXED)])
    return settings


def streamed(url, request_body) -> tuple[float, float, int]:
    """Send one streaming request: (seconds to its first text, seconds to its end, answer tokens)."""
    started = time.perf_counter()
    data = json.dumps({**request_body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    first, tokens = None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
            if first is None and any(choice.get("text") for choice in chunk.get("choices", [])):
                first = time.perf_counter() - started
    return first, time.perf_counter() - started, tokens


class InProcessClient:
    """`--in-process`: the server's `Scheduler` (engine thread and all) in this process, without HTTP: requests are
    submitted as the web handlers submit them. On a small machine this takes the web thread and the HTTP client off
    the cores the engine runs on."""

    def __init__(self, args, folder):
        from transformers import AutoTokenizer

        from llada_hf import LladaForMaskedDiffusion
        from llada_hf.serving.scheduler import Scheduler

        self.model = LladaForMaskedDiffusion.from_pretrained(folder, dtype=args.dtype).to(args.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        options = {} if args.join_wait is None else {"join_wait": args.join_wait}
        self.scheduler = Scheduler(self.model, self.tokenizer, max_batch=max(args.clients, args.max_batch or 1),
                                   max_queue=max(256, args.requests), **options).start()

    def send(self, request_body) -> tuple[float, float, int]:
        """As `streamed`: (seconds to its first text, seconds to its end, answer tokens)."""
        import threading

        from llada_hf.serving.scheduler import Request

        started, first, done, answer = time.perf_counter(), [], threading.Event(), []

        def sink(event):
            if event.text and not first:
                first.append(time.perf_counter() - started)
            if event.kind in ("finished", "error"):
                answer.extend(event.answer or [])
                done.set()

        settings = {("max_new_tokens" if key == "max_tokens" else key): value for key, value in request_body.items()
                    if key not in ("model", "prompt")}
        self.scheduler.submit(Request(self.tokenizer(request_body["prompt"]).input_ids, settings, sink=sink,
                                      stream=True))
        done.wait()
        return (first[0] if first else None), time.perf_counter() - started, len(answer)

    def counters(self) -> dict:
        stats = self.scheduler.stats
        return {"forwards": stats.forward_passes, "steps": stats.steps, "busy": stats.busy_seconds}

    def close(self) -> None:
        self.scheduler.stop()


def one_at_a_time(args, send) -> dict:
    """Every request after the previous answer: the latency of a request alone, and the rate the server keeps."""
    started, results = time.perf_counter(), []
    for index in range(args.requests):
        results.append((0.0, *send(arrival_body(args, index))))
    return summary(results, time.perf_counter() - started)


def poisson_arrivals(args, send, rate: float, seed: int) -> dict:
    """The requests sent at Poisson arrival times (`rate` per second), each by a thread of its own."""
    draw = random.Random(seed)
    arrivals, moment = [], 0.0
    for _ in range(args.requests):
        arrivals.append(moment)
        moment += draw.expovariate(rate)
    started = time.perf_counter()

    def one(index):
        time.sleep(max(0.0, started + arrivals[index] - time.perf_counter()))
        sent = time.perf_counter() - started
        return (sent, *send(arrival_body(args, index)))

    with concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
        results = list(pool.map(one, range(args.requests)))
    return summary(results, max(sent + latency for sent, _, latency, _ in results))


def summary(results: list[tuple[float, float, float, int]], span: float) -> dict:
    """(sent, time to first text, latency, tokens) per request -> the run's figures."""
    latencies = sorted(latency for _, _, latency, _ in results)
    first_texts = sorted(first for _, first, _, _ in results if first is not None)
    return {"tok_s": sum(tokens for *_, tokens in results) / span, "ttft_p50": percentile(first_texts, 50),
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "in_flight": sum(latencies) / span, "span": span}


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile of sorted values."""
    return values[max(0, math.ceil(q / 100 * len(values)) - 1)]


def run_arrivals(args, send, counters) -> list[dict]:
    """One at a time, then each load; the engine loop's counters around each run (`send(body)`: one request, as
    `streamed`; `counters()`: as `server_counters`)."""
    rows = []

    def measured(load, rate, run):
        before = counters()
        figures = run()
        after = counters()
        step_ms = 1000 * (after["busy"] - before["busy"]) / max(1.0, after["steps"] - before["steps"])
        rows.append({"load": load, "rate": rate or args.requests / figures["span"], **figures,
                     "forwards": after["forwards"] - before["forwards"], "step_ms": step_ms})
        return figures

    alone = measured("one at a time", None, lambda: one_at_a_time(args, send))
    for load in args.loads:
        rate = load * args.requests / alone["span"]
        measured(f"{load:g}x", rate, lambda: poisson_arrivals(args, send, rate, seed=int(load * 1000)))
    for row in rows:
        row["throughput_ratio"] = row["tok_s"] / alone["tok_s"]
        row["p99_over_alone_p50"] = row["p99"] / alone["p50"]
        row["p99_over_alone_p99"] = row["p99"] / alone["p99"]
    return rows


def print_arrivals(args, rows) -> None:
    print(f"model hidden {args.hidden}, {args.layers} layers; mix {args.mix}; {args.requests} requests of "
          f"{args.max_tokens} tokens; server threads {args.server_threads or os.environ.get('OMP_NUM_THREADS')}; "
          f"{'in process (no HTTP)' if args.in_process else 'over HTTP'}; join wait "
          f"{'default' if args.join_wait is None else args.join_wait}; "
          f"load average {' '.join(f'{value:.1f}' for value in os.getloadavg())}")
    print("| arrivals | rate (req/s) | in flight | tok/s | vs one at a time | TTFT p50 (ms) | latency p50 (ms) | "
          "p99 (ms) | p99 / alone p50, p99 | forward passes | engine ms / step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['load']} | {row['rate']:.1f} | {row['in_flight']:.1f} | {row['tok_s']:.0f} | "
              f"{row['throughput_ratio']:.2f}x | {row['ttft_p50'] * 1000:.0f} | {row['p50'] * 1000:.0f} | "
              f"{row['p99'] * 1000:.0f} | {row['p99_over_alone_p50']:.2f}, {row['p99_over_alone_p99']:.2f} | "
              f"{row['forwards']:.0f} | {row['step_ms']:.2f} |")


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


@contextlib.contextmanager
def serving(args):
    """The model of `args`, served by `llada-hf serve` in a subprocess; yields its base URL."""
    with tempfile.TemporaryDirectory() as folder:
        build_model(args, folder)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        rows = max(args.clients, args.max_batch or 1)
        command = [sys.executable, "-c", "import sys; from llada_hf.cli import main; sys.exit(main())", "serve",
                   folder, "--port", str(port), "--served-model-name", "bench", "--device", args.device,
                   "--dtype", args.dtype, "--max-batch", str(rows), "--max-queue", str(max(256, args.requests)),
                   "--log-level", "warning", "--max-tokens-limit", str(args.max_tokens)]
        if args.batch_wait_ms is not None:
            command += ["--batch-wait-ms", str(args.batch_wait_ms)]
        if args.join_wait is not None:
            command += ["--join-wait", str(args.join_wait)]
        env = dict(os.environ)
        if args.server_threads is not None:
            env["OMP_NUM_THREADS"] = str(args.server_threads)
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        try:
            wait_until_up(server, base)
            for index in range(3):  # warm-up
                post(base + "/v1/completions", arrival_body(args, index))
            yield base
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)


def wait_until_up(server, base) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start: " + server.stderr.read()[-2000:])
            time.sleep(0.2)


def run_burst(args, base) -> dict:
    """Sequential and concurrent phases, alternating `repeats` times; medians and the paired ratios."""
    rows = {"sequential": [], "concurrent": []}
    for _ in range(args.repeats):
        for name, run in (("sequential", sequential), ("concurrent", concurrent_clients)):
            before = forward_passes(base)
            tokens, seconds = run(args, base)
            rows[name].append((tokens / seconds, seconds, forward_passes(base) - before))

    def median(name, column):
        return statistics.median(row[column] for row in rows[name])

    ratios = [conc[0] / seq[0] for seq, conc in zip(rows["sequential"], rows["concurrent"])]  # paired: same load
    return {
        "model": f"hidden {args.hidden}, {args.layers} layers", "max_tokens": args.max_tokens,
        "steps": args.steps or args.max_tokens, "block_length": args.block_length, "kv_cache": args.kv_cache,
        "clients": args.clients, "device": args.device, "dtype": args.dtype,
        "server_threads": args.server_threads or os.environ.get("OMP_NUM_THREADS"),
        "sequential_tok_s": round(median("sequential", 0), 1), "concurrent_tok_s": round(median("concurrent", 0), 1),
        "sequential_forwards": median("sequential", 2), "concurrent_forwards": median("concurrent", 2),
        "ratio": round(statistics.median(ratios), 2), "ratios": [round(r, 2) for r in ratios],
    }


def print_burst(args, result) -> None:
    print("| model | block | kv_cache | server threads | sequential tok/s | concurrent tok/s | ratio (each repeat) | "
          "forwards seq / conc | engine alone |")
    print("|---|---|---|---|---|---|---|---|---|")
    engine = f"{result['engine_ratio']}x" if result["engine_ratio"] else "-"
    print(f"| {result['model']} | {args.block_length or '-'} | {args.kv_cache or '-'} | {result['server_threads']} | "
          f"{result['sequential_tok_s']} | {result['concurrent_tok_s']} | **{result['ratio']}x** "
          f"({', '.join(str(r) for r in result['ratios'])}) | {result['sequential_forwards']:.0f} / "
          f"{result['concurrent_forwards']:.0f} | {engine} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="default: max_tokens")
    parser.add_argument("--block-length", type=int, default=None)
    parser.add_argument("--kv-cache", choices=["prefix", "dual"], default=None)
    parser.add_argument("--cache-refresh-interval", type=int, default=None, help="with --kv-cache: refresh every N-th "
                                                                                 "block (default: every block)")
    parser.add_argument("--arrivals", action="store_true", help="Poisson arrivals instead of a burst")
    parser.add_argument("--mix", choices=["mixed", "same"], default="mixed", help="--arrivals: the requests' settings")
    parser.add_argument("--requests", type=int, default=48, help="--arrivals: requests per run")
    parser.add_argument("--loads", type=float, nargs="+", default=[2, 4, 6, 8],
                        help="--arrivals: arrival rates, as multiples of the one-at-a-time rate")
    parser.add_argument("--max-batch", type=int, default=None, help="the server's flag (default: --clients, 32 "
                                                                     "with --arrivals)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="the server's flag (default: its own)")
    parser.add_argument("--join-wait", type=int, default=None, help="the server's flag (default: its own)")
    parser.add_argument("--in-process", action="store_true",
                        help="--arrivals: drive the server's scheduler in this process, without HTTP")
    parser.add_argument("--server-threads", type=int, default=None,
                        help="OMP_NUM_THREADS of the server process (default: this process's environment)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args()
    if args.arrivals and args.max_batch is None:
        args.max_batch = 32
    if not args.arrivals:
        args.mix = "same"  # the burst compares one setting
        if args.in_process:
            parser.error("--in-process runs with --arrivals")

    if args.in_process:
        with tempfile.TemporaryDirectory() as folder:
            build_model(args, folder)
            client = InProcessClient(args, folder)
            try:
                for index in range(3):  # warm-up
                    client.send(arrival_body(args, index))
                result = run_arrivals(args, client.send, client.counters)
            finally:
                client.close()
    else:
        with serving(args) as base:
            if args.arrivals:
                result = run_arrivals(args, lambda body: streamed(base + "/v1/completions", body),
                                      lambda: server_counters(base))
            else:
                result = run_burst(args, base)
    if not args.arrivals:
        result["engine_ratio"] = engine_ceiling(args) if args.device == "cpu" else None
    if args.json:
        print(json.dumps(result))
    elif args.arrivals:
        print_arrivals(args, result)
    else:
        print_burst(args, result)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
