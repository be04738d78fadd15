"""The objects behind the routes of `create_app` (each route is one line that calls one of them).

- `Authorization`: the API key check of /v1/* and /metrics (a FastAPI dependency).
- `ServerInfo`: `GET /health`, `GET /v1/models`, `GET /metrics` (Prometheus text format).
- `ChatCompletionHandler`, `CompletionHandler`: `POST /v1/chat/completions` and `POST /v1/completions`: check the
  body, turn it into `generate` settings and prompts, queue one engine request per prompt, and answer with the
  engine's events (`responses.Answers`). `VisionChatCompletionHandler` (LLaDA-V) also takes `image_url` parts.

Each is built once with what it needs (model, tokenizer, scheduler, `ServerConfig`: what the server enforces) and
can be called without the app.
"""

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..tokenization import chat_prompt_ids
from .images import ImageLimits, check_image_count, read_image
from .middleware import CountPreparing
from .protocol import ChatCompletionRequest, CompletionRequest, ImagePart, OpenAIError, TextPart, check_generate_kwargs
from .responses import Answers
from .scheduler import QueueFull, Scheduler, ShuttingDown
from .scheduler import Request as EngineRequest


@dataclass
class ServerConfig:
    """What the server enforces and its defaults.

    Args:
        model_name: the id clients pass as `model` (and that /v1/models lists).
        api_key: when set, /v1/* and /metrics need `Authorization: Bearer <api_key>` (401 otherwise).
        defaults: `generate` keywords used when a request does not set them (`max_new_tokens`, `steps`, ...).
        max_tokens_limit: the largest `max_tokens` a request may ask for.
        max_body_bytes: the largest request body (413 beyond).
        context: prompt + answer positions the model takes (`max_position_embeddings`).
        trust_special_tokens: tokenize chat messages with their special tokens (`<|mdm_mask|>`, `<|eot_id|>`, ...)
            as control tokens. Off by default: message text is text, special tokens come only from the chat template
            (a client cannot inject masks or fake turns). /v1/completions takes its prompt as the client wrote
            it, control tokens included: it is the raw-prompt endpoint.
        images: what a request may send as images (LLaDA-V servers).
    """

    model_name: str
    api_key: str | None = None
    defaults: dict = field(default_factory=dict)
    max_tokens_limit: int = 1024
    max_body_bytes: int = 1 << 20
    context: int | None = None
    trust_special_tokens: bool = False
    images: ImageLimits = field(default_factory=ImageLimits)


@dataclass
class Prompt:
    """One prompt of a request: its ids, and the other inputs of the model (LLaDA-V: `pixel_values`, ...)."""

    ids: list[int]
    inputs: dict[str, Any] = field(default_factory=dict)


class Authorization:
    """Requires `Authorization: Bearer <api_key>` (401 otherwise); no key: everyone may call."""

    def __init__(self, api_key: str | None):
        self.api_key = api_key

    def __call__(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise OpenAIError(401, "Incorrect or missing API key: pass `Authorization: Bearer <key>`.",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class ServerInfo:
    """What the server is and how it is doing: health (and the page's defaults), the model list, the metrics."""

    def __init__(self, model, scheduler: Scheduler, config: ServerConfig, takes_images: bool = False):
        self.scheduler = scheduler
        self.config = config
        self.takes_images = takes_images
        self.defaults = _public_defaults(model, config)
        self.created = int(time.time())

    def health(self) -> JSONResponse:
        draining = self.scheduler.draining
        body = {"status": "shutting_down" if draining else "ok", "model": self.config.model_name,
                "queued": self.scheduler.queued, "running": self.scheduler.running_rows,
                "auth": self.config.api_key is not None, "defaults": self.defaults, "world_size": _world_size(),
                "images": self._image_limits()}
        return JSONResponse(body, status_code=503 if draining else 200)

    def _image_limits(self) -> dict | None:
        """What the page may send as images (None: a text model)."""
        if not self.takes_images:
            return None
        limits = self.config.images
        return {"max_images": limits.max_images, "max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model", "created": self.created,
                                            "owned_by": "llada-hf"}]}

    def metrics(self) -> PlainTextResponse:
        return PlainTextResponse(render_metrics(self.scheduler), media_type="text/plain; version=0.0.4")


class _CompletionHandler:
    """What both completion endpoints do; a subclass says how a body becomes prompt ids (`prompts`)."""

    kind: ClassVar[str]  # "chat" or "text": the objects of the answers

    def __init__(self, model, tokenizer, scheduler: Scheduler, config: ServerConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.config = config
        self.defaults = {"max_new_tokens": model.generation_config.max_new_tokens or 128, **config.defaults}
        self.vocab = len(tokenizer)

    async def __call__(self, body, http: Request):
        """Answer one request: JSON, or a stream of server-sent events."""
        self.check_body(body)
        settings = body.to_generate_kwargs(self.defaults)
        self.check_length(settings)
        stop = body.stop_strings()
        prompts = await self.prompts(body, settings)
        check_generate_kwargs(self.model, settings)
        queue: asyncio.Queue = asyncio.Queue()
        await asyncio.sleep(0)  # requests that arrived with this one enter the app (and are counted) first
        try:
            requests = self.submit(body, prompts, settings, stop, queue)
        finally:
            CountPreparing.done(http.scope, self.scheduler)
        answers = Answers(self.kind, body, sum(len(prompt.ids) for prompt in prompts), requests,
                          self.config.model_name)
        if body.stream:
            return StreamingResponse(answers.stream(queue), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await answers.collect(queue, http)

    async def prompts(self, body, settings: dict) -> list[Prompt]:
        """The prompts of the request (checked)."""
        raise NotImplementedError

    # ---- checks ---------------------------------------------------------------------------------

    def check_body(self, body) -> None:
        """The model asked for, the fields this server cannot honour, the rows it asks for."""
        if body.model != self.config.model_name:
            raise OpenAIError(404, f"The model `{body.model}` does not exist; this server serves "
                                   f"`{self.config.model_name}` (see /v1/models).", param="model",
                              code="model_not_found")
        refused = body.refused()
        if refused is not None:
            name, why = refused
            raise OpenAIError(400, f"`{name}` is not supported by this server: {why}.", param=name,
                              code="unsupported_parameter")
        if body.n > self.scheduler.max_batch:
            raise OpenAIError(400, f"`n` ({body.n}) exceeds this server's batch ({self.scheduler.max_batch} rows).",
                              param="n")

    def check_length(self, settings: dict) -> None:
        """The answer length against `--max-tokens-limit`."""
        if settings["max_new_tokens"] > self.config.max_tokens_limit:
            raise OpenAIError(400, f"`max_tokens` ({settings['max_new_tokens']}) exceeds this server's limit "
                                   f"({self.config.max_tokens_limit}, --max-tokens-limit).", param="max_tokens")

    def check_prompt(self, ids: list[int], settings: dict) -> None:
        """A prompt: not empty, ids of the vocabulary, and room for the answer in the model's context."""
        if not ids:
            raise OpenAIError(400, "The prompt is empty.", param="prompt")
        if any(not 0 <= token < self.vocab for token in ids):
            raise OpenAIError(400, f"Token ids must lie in [0, {self.vocab}).", param="prompt")
        context, total = self.config.context, len(ids) + settings["max_new_tokens"]
        if context is not None and total > context:
            raise OpenAIError(400, f"This model's context is {context} positions; the prompt ({len(ids)} tokens) + "
                                   f"max_tokens ({settings['max_new_tokens']}) = {total}. Shorten the prompt or "
                                   "lower max_tokens.", param="messages", code="context_length_exceeded")

    # ---- queueing ---------------------------------------------------------------------------------

    def submit(self, body, prompts: list[Prompt], settings: dict, stop: list[str],
               queue: asyncio.Queue) -> list[EngineRequest]:
        """One engine request per prompt (`n` rows each), whose events come to `queue` on this event loop; all or
        none are queued (429 when the queue is full, 503 while shutting down)."""
        loop = asyncio.get_running_loop()
        requests = []
        try:
            for number, prompt in enumerate(prompts):
                def sink(event, base=number * body.n):
                    loop.call_soon_threadsafe(queue.put_nowait, (base, event))

                requests.append(self.scheduler.submit(EngineRequest(
                    prompt.ids, dict(settings), inputs=prompt.inputs, n=body.n, seed=body.seed, stop=stop,
                    stream=body.stream, drafts=body.stream and body.drafts, sink=sink)))
        except QueueFull as error:
            self._cancel(requests)
            raise OpenAIError(429, str(error), code="rate_limit_exceeded",
                              headers={"Retry-After": str(self.scheduler.retry_after())}) from None
        except ShuttingDown as error:
            self._cancel(requests)
            raise OpenAIError(503, str(error), code="server_shutting_down") from None
        return requests

    @staticmethod
    def _cancel(requests: list[EngineRequest]) -> None:
        for request in requests:
            request.cancel()


class ChatCompletionHandler(_CompletionHandler):
    """`POST /v1/chat/completions`: the messages through the tokenizer's chat template."""

    kind = "chat"

    async def prompts(self, body: ChatCompletionRequest, settings: dict) -> list[Prompt]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise OpenAIError(400, "This model's tokenizer has no chat template; use /v1/completions.",
                              param="messages")
        if any(message.has_images() for message in body.messages):
            raise OpenAIError(400, "This model takes no images: it is a text model. Send text content only.",
                              param="messages")
        messages = [{"role": _role(m.role), "content": m.text()} for m in body.messages]
        ids = chat_prompt_ids(self.tokenizer, messages, trust_special_tokens=self.config.trust_special_tokens)
        self.check_prompt(ids, settings)
        return [Prompt(ids)]


class VisionChatCompletionHandler(ChatCompletionHandler):
    """`POST /v1/chat/completions` for LLaDA-V: text and `image_url` parts, in LLaDA-V's chat format.

    The images are read within the server's `ImageLimits` and packed by the processor off the event loop; each
    `<image>` of the prompt becomes its placeholders (`image_token_counts`). The vision tower runs once per request,
    in the engine (`LladaVForConditionalGeneration.prepare_decoding`), however many choices (`n`) it asks for.
    """

    def __init__(self, model, processor, scheduler: Scheduler, config: ServerConfig):
        super().__init__(model, processor.tokenizer, scheduler, config)
        self.processor = processor
        self.image_token_id = processor.image_token_id

    async def prompts(self, body: ChatCompletionRequest, settings: dict) -> list[Prompt]:
        messages, urls = _vision_messages(body)
        check_image_count(len(urls), self.config.images)
        ids = chat_prompt_ids(self.tokenizer, messages, trust_special_tokens=self.config.trust_special_tokens,
                              chat_template=self.processor.chat_template)  # one `<image>` per image
        if ids.count(self.image_token_id) != len(urls):
            raise OpenAIError(400, f"The messages spell `{self.processor.image_token}` themselves; send images as "
                                   "`image_url` parts.", param="messages")
        if not urls:
            self.check_prompt(ids, settings)
            return [Prompt(ids)]
        inputs = await asyncio.to_thread(self._image_inputs, urls)
        counts = iter(self.processor.image_token_counts(inputs["image_sizes"], inputs["batch_num_images"]))
        ids = [expanded for token in ids
               for expanded in ([token] * next(counts) if token == self.image_token_id else [token])]
        self.check_prompt(ids, settings)
        return [Prompt(ids, inputs)]

    def _image_inputs(self, urls: list[str]) -> dict:
        images = [read_image(url, self.config.images) for url in urls]
        return self.processor.image_inputs(images)


class CompletionHandler(_CompletionHandler):
    """`POST /v1/completions`: the prompt as written (the raw-prompt endpoint), or token ids."""

    kind = "text"

    async def prompts(self, body: CompletionRequest, settings: dict) -> list[Prompt]:
        prompts = [self.tokenizer(prompt, add_special_tokens=False).input_ids if isinstance(prompt, str) else prompt
                   for prompt in body.prompts()]
        for ids in prompts:
            self.check_prompt(ids, settings)
        if not prompts:
            raise OpenAIError(400, "The prompt is empty.", param="prompt")
        if len(prompts) * body.n > self.scheduler.max_batch:
            raise OpenAIError(400, f"{len(prompts)} prompts x n={body.n} exceed this server's batch "
                                   f"({self.scheduler.max_batch} rows).", param="prompt")
        return [Prompt(ids) for ids in prompts]


def _role(role: str) -> str:
    return "system" if role == "developer" else role


def _vision_messages(body: ChatCompletionRequest) -> tuple[list[dict], list[str]]:
    """The messages with LLaDA-V's content parts (`{"type": "image"}` where an image goes, adjacent text parts
    joined), and the images' URLs in prompt order."""
    messages, urls = [], []
    for message in body.messages:
        if not isinstance(message.content, list):
            messages.append({"role": _role(message.role), "content": message.text()})
            continue
        parts = []
        for part in message.content:
            if isinstance(part, TextPart):
                if parts and parts[-1]["type"] == "text":
                    parts[-1]["text"] += part.text
                else:
                    parts.append({"type": "text", "text": part.text})
            else:
                urls.append(_image_url(part))
                parts.append({"type": "image"})
        messages.append({"role": _role(message.role), "content": parts})
    return messages, urls


def _image_url(part: ImagePart) -> str:
    unknown = sorted(set(part.image_url) - {"url", "detail"})
    if unknown:
        raise OpenAIError(400, f"Unrecognized image_url field: {unknown[0]}.", param="messages")
    url = part.image_url.get("url")
    if not isinstance(url, str) or not url:
        raise OpenAIError(400, "An image_url part needs `url`: a data: URL (base64) or a URL.", param="messages")
    return url


# ---- small helpers ---------------------------------------------------------------------------------


def _world_size() -> int:
    """Processes serving the model together (tensor parallelism under torchrun), 1 otherwise."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _public_defaults(model, config: ServerConfig) -> dict:
    """The settings a request gets when it sets none, under the request's names (the page shows them)."""
    generation = model.generation_config
    defaults = {"max_tokens": generation.max_new_tokens, "steps": generation.steps,
                "block_length": generation.block_length, "temperature": generation.temperature,
                "confidence_threshold": generation.confidence_threshold, "kv_cache": generation.kv_cache}
    for name, value in config.defaults.items():
        defaults["max_tokens" if name == "max_new_tokens" else name] = value
    defaults["max_tokens_limit"] = config.max_tokens_limit
    return defaults


def render_metrics(scheduler: Scheduler) -> str:
    """The scheduler's counters in Prometheus' text format."""
    stats = scheduler.stats
    lines = []

    def metric(name, kind, help_text, samples):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value}")

    outcomes = ("ok", "error", "cancelled", "rejected")
    metric("llada_requests_total", "counter", "Requests by outcome (rejected: 429, queue full).",
           [(f'{{outcome="{outcome}"}}', stats.requests.get(outcome, 0)) for outcome in outcomes])
    metric("llada_queue_length", "gauge", "Requests waiting to join the engine.", [("", scheduler.queued)])
    metric("llada_running_rows", "gauge", "Rows being decoded.", [("", scheduler.running_rows)])
    metric("llada_peak_running_rows", "gauge", "Most rows decoded together in one step.", [("", stats.peak_rows)])
    metric("llada_steps_total", "counter", "Denoising steps run by the engine loop.", [("", stats.steps)])
    metric("llada_forward_passes_total", "counter", "Model forward passes.", [("", stats.forward_passes)])
    metric("llada_rows_cancelled_total", "counter", "Rows cancelled (client gone).", [("", stats.rows_cancelled)])
    metric("llada_requests_restarted_total", "counter", "Requests started again alone after a shared step failed.",
           [("", stats.restarted)])
    metric("llada_generated_tokens_total", "counter", "Answer tokens returned (up to the end token).",
           [("", stats.generated_tokens)])
    metric("llada_tokens_per_second", "gauge", "Answer tokens per second over the last 10 seconds.",
           [("", round(stats.tokens_per_second(), 3))])
    metric("llada_busy_seconds_total", "counter", "Seconds the engine loop spent working.",
           [("", round(stats.busy_seconds, 3))])
    return "\n".join(lines) + "\n"
