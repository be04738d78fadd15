"""Builders for the server tests: a tiny chat model saved to a folder, servers on a free loopback port (in this
process or as `llada-hf serve` subprocesses), and plain-HTTP clients (stdlib only: JSON and server-sent events).

Every wait is bounded; every server binds 127.0.0.1.
"""

import contextlib
import functools
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import torch

from llada_hf import LladaConfig, LladaForMaskedDiffusion
from llada_hf.tokenization import model_token_ids, train_tokenizer


HOST = "127.0.0.1"
LLADA_HF = [sys.executable, "-c", "import sys; from llada_hf.cli import main; sys.exit(main())"]  # = `llada-hf`
COLOURS = {"cat": "red", "dog": "blue", "bird": "green", "fox": "yellow"}
PAIRS = [(f"where did the {animal} sit?", f"The {animal} sat on the {colour} mat.")
         for animal, colour in COLOURS.items()]
PAIRS += [(f"what did the {animal} say?", f"The {animal} said hello.") for animal in COLOURS]
TEXTS = [f"the {animal} sat on the {colour} mat and said {word}" for animal in COLOURS
         for colour in ("red", "blue", "green", "yellow") for word in ("hello", "thanks", "good night")]


@functools.cache
def _trained_chat_model(seed: int, steps: int, two_turns: bool = False):
    """A tiny LLaDA (2 layers, hidden 64) trained for a few seconds on `PAIRS` in LLaDA's chat format (and on
    two-turn conversations of them with `two_turns`, four times slower), with a
    trained byte-level tokenizer: its answers are short English sentences that end with <|eot_id|>, so the
    tests see real endings, and different prompts get different answers."""
    tokenizer = train_tokenizer(TEXTS * 3 + [question + " " + answer for question, answer in PAIRS] * 3,
                                vocab_size=300)
    torch.manual_seed(seed)
    config = LladaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=256, **model_token_ids(tokenizer))
    model = LladaForMaskedDiffusion(config)
    answer_length = 16
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    conversations = [[(question, answer)] for question, answer in PAIRS]
    if two_turns:
        conversations += [[PAIRS[i], PAIRS[(i + shift) % len(PAIRS)]] for i in range(len(PAIRS)) for shift in (3, 5)]
    rows = []
    for turns in conversations:  # one or two turns: the page sends the whole conversation
        messages = [message for question, answer in turns[:-1]
                    for message in ({"role": "user", "content": question}, {"role": "assistant", "content": answer})]
        question, answer = turns[-1]
        text = tokenizer.apply_chat_template(messages + [{"role": "user", "content": question}],
                                             add_generation_prompt=True, tokenize=False)
        answer_ids = tokenizer(answer, add_special_tokens=False).input_ids + [eot]
        rows.append((tokenizer(text, add_special_tokens=False).input_ids,
                     answer_ids + [tokenizer.eos_token_id] * (answer_length - len(answer_ids))))
    width = max(len(prompt) for prompt, _ in rows)
    ids = torch.full((len(rows), width + answer_length), tokenizer.eos_token_id)
    attention_mask = torch.zeros_like(ids)
    for i, (prompt, answer) in enumerate(rows):
        ids[i, width - len(prompt) : width] = torch.tensor(prompt)
        ids[i, width:] = torch.tensor(answer)
        attention_mask[i, width - len(prompt) :] = 1
    is_answer = torch.zeros_like(ids, dtype=torch.bool)
    is_answer[:, width:] = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):  # LLaDA's SFT objective: mask answer tokens with probability t, weight by 1/t
        t = torch.rand(len(rows), 1, generator=generator).clamp(min=0.05).expand_as(ids)
        masked = (torch.rand(ids.shape, generator=generator) < t) & is_answer
        inputs = ids.masked_fill(masked, tokenizer.mask_token_id)
        logits = model(input_ids=inputs, attention_mask=attention_mask).logits
        loss = (torch.nn.functional.cross_entropy(logits[masked], ids[masked], reduction="none") / t[masked]).sum()
        optimizer.zero_grad()
        (loss / is_answer.sum()).backward()
        optimizer.step()
    model.eval()
    model.generation_config.max_new_tokens = 8
    model.generation_config.steps = 8
    return model, tokenizer


def save_chat_model(folder, seed: int = 0, steps: int = 500, two_turns: bool = False) -> str:
    """`_trained_chat_model` saved to `folder` (float32; answers of 8 tokens in 8 steps by default)."""
    model, tokenizer = _trained_chat_model(seed, steps, two_turns)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def load_chat_model(folder):
    from transformers import AutoModel, AutoTokenizer

    import llada_hf  # noqa: F401

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    return AutoModel.from_pretrained(folder).eval(), tokenizer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_until_healthy(base_url: str, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {process.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} did not become healthy in {timeout} s")


# ---- servers ------------------------------------------------------------------------------------------


class InProcessServer:
    """`create_app` under uvicorn on a thread of this process: the test can look at the scheduler."""

    def __init__(self, model, tokenizer, api_key=None, defaults=None, max_batch=32, max_queue=256,
                 max_tokens_limit=64, max_body_bytes=1 << 20, step_delay=0.0, batch_wait=0.02,
                 trust_special_tokens=False, images=None):
        """`tokenizer`: a text model's tokenizer, or LLaDA-V's processor; `images`: an `ImageLimits`."""
        import uvicorn

        from llada_hf.loading import text_tokenizer
        from llada_hf.serving.app import ServerConfig, create_app
        from llada_hf.serving.images import ImageLimits
        from llada_hf.serving.scheduler import Scheduler

        self.scheduler = Scheduler(model, text_tokenizer(tokenizer), max_batch=max_batch, max_queue=max_queue,
                                   batch_wait=batch_wait, step_delay=step_delay)
        config = ServerConfig(model_name="tiny", api_key=api_key, defaults=dict(defaults or {}),
                              max_tokens_limit=max_tokens_limit, max_body_bytes=max_body_bytes,
                              context=model.config.get_text_config().max_position_embeddings,
                              trust_special_tokens=trust_special_tokens, images=images or ImageLimits())
        self.app = create_app(model, tokenizer, self.scheduler, config)
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=HOST, port=self.port, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_until_healthy(self.url, timeout=30)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive(), "the in-process server did not stop"


@contextlib.contextmanager
def serve_process(model_dir, *flags, env=None, timeout: float = 90.0, launcher=None):
    """`llada-hf serve MODEL --port P FLAGS` as a subprocess; yields (process, base_url). Stopped by SIGTERM."""
    port = free_port()
    command = (launcher or LLADA_HF) + [
        "serve", str(model_dir), "--host", HOST, "--port", str(port), "--log-level", "warning", *flags]
    environment = dict(os.environ, **(env or {}))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                               start_new_session=True)
    try:
        wait_until_healthy(f"http://{HOST}:{port}", timeout=timeout, process=process)
        yield process, f"http://{HOST}:{port}"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


# ---- clients ------------------------------------------------------------------------------------------


def request_json(url: str, body=None, headers=None, method=None, timeout: float = 60.0, raw: bytes | None = None):
    """(status, headers, parsed JSON or text) of one request; HTTP errors are returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, response_headers, text = response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        status, response_headers, text = error.code, dict(error.headers), error.read().decode()
    try:
        return status, response_headers, json.loads(text)
    except json.JSONDecodeError:
        return status, response_headers, text


def stream_events(url: str, body, headers=None, timeout: float = 60.0, stop_after=None):
    """The server-sent events of a streamed POST as (event, data) pairs; `data` is parsed JSON or "[DONE]".

    `stop_after(events)` returning True closes the connection there (a client that goes away)."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    connection.request("POST", path, body=json.dumps(body),
                       headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    if response.status != 200:
        text = response.read().decode()
        connection.close()
        raise RuntimeError(f"HTTP {response.status}: {text}")
    events, event, data = [], None, []
    try:
        while True:
            line = response.readline()
            if not line:
                break
            line = line.decode().rstrip("\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                text = "\n".join(data)
                events.append((event, text if text == "[DONE]" else json.loads(text)))
                event, data = None, []
                if stop_after is not None and stop_after(events):
                    break
                if text == "[DONE]":
                    break
    finally:
        connection.close()
    return events


def chat_body(content: str, **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **fields}


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    raise KeyError(name + labels)
