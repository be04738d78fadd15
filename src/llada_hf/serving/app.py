"""The FastAPI app: OpenAI-compatible endpoints over the engine loop, metrics, and the live web page.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`,
`GET /metrics` (Prometheus text format) and the page at `/` (static files, no build step).
"""

import asyncio
import re
import secrets
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..tokenization import chat_prompt_ids
from .protocol import (
    AnswerText,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    settings_of,
)
from .scheduler import Event, QueueFull, Scheduler, ShuttingDown
from .scheduler import Request as EngineRequest


STATIC = Path(__file__).parent / "static"


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
    """

    model_name: str
    api_key: str | None = None
    defaults: dict = field(default_factory=dict)
    max_tokens_limit: int = 1024
    max_body_bytes: int = 1 << 20
    context: int | None = None
    trust_special_tokens: bool = False


def create_app(model, tokenizer, scheduler: Scheduler, config: ServerConfig, end_token_ids: list[int]) -> FastAPI:
    """The app; its lifespan starts the scheduler's thread and stops it."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if scheduler._thread is None:
            scheduler.start()
        yield
        scheduler.stop()

    # With an API key the schema is served behind it too (below), not to anyone who asks.
    app = FastAPI(title="llada-hf", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None if config.api_key else "/openapi.json")
    app.state.scheduler = scheduler
    app.state.config = config
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(CountPreparing, scheduler=scheduler)
    created = int(time.time())
    vocab = len(tokenizer)

    # ---- errors: always OpenAI's shape ---------------------------------------------------------------

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problem = error.errors()[0] if error.errors() else {}
        location = [str(part) for part in problem.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        if problem.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif problem.get("type") in ("json_invalid", "model_attributes_type") or not location:
            message = "The body must be a JSON object (" + problem.get("msg", "invalid JSON") + ")."
        else:
            message = f"Invalid value for `{param}`: {problem.get('msg', 'invalid')}."
        return JSONResponse(OpenAIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return JSONResponse(OpenAIError(error.status_code, str(error.detail)).body(), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise OpenAIError(401, "Incorrect or missing API key: pass `Authorization: Bearer <key>`.",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    if config.api_key:
        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorize)])
        async def openapi_schema():
            return JSONResponse(app.openapi())

    # ---- the page, health, models, metrics --------------------------------------------------------

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        draining = scheduler._draining_until is not None or scheduler._stopping
        body = {"status": "shutting_down" if draining else "ok", "model": config.model_name,
                "queued": scheduler.queued, "running": scheduler.running_rows, "auth": config.api_key is not None,
                "defaults": _public_defaults(model, config), "world_size": _world_size()}
        return JSONResponse(body, status_code=503 if draining else 200)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created,
                                            "owned_by": "llada-hf"}]}

    @app.get("/metrics", dependencies=[Depends(authorize)])
    async def metrics():
        return PlainTextResponse(render_metrics(scheduler), media_type="text/plain; version=0.0.4")

    # ---- completions ------------------------------------------------------------------------------

    def check_common(body) -> tuple[dict, list[str]]:
        if body.model != config.model_name:
            raise OpenAIError(404, f"The model `{body.model}` does not exist; this server serves "
                                   f"`{config.model_name}` (see /v1/models).", param="model", code="model_not_found")
        refused = body.refused()
        if refused is not None:
            name, why = refused
            raise OpenAIError(400, f"`{name}` is not supported by this server: {why}.", param=name,
                              code="unsupported_parameter")
        settings = {**config.defaults, **settings_of(body)}
        answer_length = body.answer_length()
        if answer_length is not None:
            settings["max_new_tokens"] = answer_length
        settings.setdefault("max_new_tokens", model.generation_config.max_new_tokens or 128)
        if settings["max_new_tokens"] > config.max_tokens_limit:
            raise OpenAIError(400, f"`max_tokens` ({settings['max_new_tokens']}) exceeds this server's limit "
                                   f"({config.max_tokens_limit}, --max-tokens-limit).", param="max_tokens")
        if body.n > scheduler.max_batch:
            raise OpenAIError(400, f"`n` ({body.n}) exceeds this server's batch ({scheduler.max_batch} rows).",
                              param="n")
        return settings, body.stop_strings()

    def check_prompt(ids: list[int], settings: dict) -> None:
        if not ids:
            raise OpenAIError(400, "The prompt is empty.", param="prompt")
        if any(not 0 <= token < vocab for token in ids):
            raise OpenAIError(400, f"Token ids must lie in [0, {vocab}).", param="prompt")
        total = len(ids) + settings["max_new_tokens"]
        if config.context is not None and total > config.context:
            raise OpenAIError(400, f"This model's context is {config.context} positions; the prompt ({len(ids)} "
                                   f"tokens) + max_tokens ({settings['max_new_tokens']}) = {total}. Shorten the "
                                   "prompt or lower max_tokens.", param="messages", code="context_length_exceeded")
        try:  # the engine's own checks (settings, plan), before the request is queued
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.prepare_decoding([ids], **settings)
        except (ValueError, TypeError) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            named = re.match(r"`(\w+)", message)  # the engine's messages start with the setting they refuse
            param = "max_tokens" if named and named.group(1) == "max_new_tokens" else named and named.group(1)
            raise OpenAIError(400, message, param=param or None, code="invalid_settings") from None

    def submit(prompts: list[list[int]], settings: dict, body, queue: asyncio.Queue) -> list[EngineRequest]:
        loop = asyncio.get_running_loop()
        requests = []
        try:
            for number, ids in enumerate(prompts):
                def sink(event, base=number * body.n):
                    loop.call_soon_threadsafe(queue.put_nowait, (base, event))

                requests.append(scheduler.submit(EngineRequest(
                    ids, dict(settings), n=body.n, seed=body.seed, drafts=bool(body.stream and body.drafts),
                    progress=bool(body.stream or body.stop), sink=sink)))
        except QueueFull as error:
            for request in requests:
                request.cancel()
            raise OpenAIError(429, str(error), code="rate_limit_exceeded",
                              headers={"Retry-After": str(scheduler.retry_after())}) from None
        except ShuttingDown as error:
            for request in requests:
                request.cancel()
            raise OpenAIError(503, str(error), code="server_shutting_down") from None
        return requests

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        settings, stop = check_common(body)
        if getattr(tokenizer, "chat_template", None) is None:
            raise OpenAIError(400, "This model's tokenizer has no chat template; use /v1/completions.",
                              param="messages")
        if any(message.has_images() for message in body.messages):
            raise OpenAIError(400, "This model takes no images: it is a text model. Send text content only.",
                              param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        ids = chat_prompt_ids(tokenizer, messages, trust_special_tokens=config.trust_special_tokens)
        check_prompt(ids, settings)
        return await respond("chat", body, [ids], settings, stop, http)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, http: Request):
        settings, stop = check_common(body)
        prompts = []
        for prompt in body.prompts():
            ids = tokenizer(prompt, add_special_tokens=False).input_ids if isinstance(prompt, str) else prompt
            check_prompt(ids, settings)
            prompts.append(ids)
        if not prompts:
            raise OpenAIError(400, "The prompt is empty.", param="prompt")
        if len(prompts) * body.n > scheduler.max_batch:
            raise OpenAIError(400, f"{len(prompts)} prompts x n={body.n} exceed this server's batch "
                                   f"({scheduler.max_batch} rows).", param="prompt")
        return await respond("text", body, prompts, settings, stop, http)

    async def respond(kind: str, body, prompts: list[list[int]], settings: dict, stop: list[str], http: Request):
        queue: asyncio.Queue = asyncio.Queue()
        await asyncio.sleep(0)  # requests that arrived with this one enter the app (and are counted) first
        try:
            requests = submit(prompts, settings, body, queue)
        finally:
            CountPreparing.done(http.scope, scheduler)
        answers = Answers(kind, body, prompts, requests, tokenizer, end_token_ids, stop, config.model_name)
        if body.stream:
            return StreamingResponse(answers.stream(queue), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while not answers.done:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        answers.cancel()
                        return JSONResponse({}, status_code=499)
                    continue
                answers.apply(*item)
        finally:
            if not answers.done:
                answers.cancel()
        return answers.response()

    return app


# ---- the answers of one HTTP request -------------------------------------------------------------------


class Answers:
    """The choices of one HTTP request: applies the loop's events, builds chunks, drafts and the response."""

    def __init__(self, kind: str, body, prompts, requests, tokenizer, end_token_ids, stop, model_name):
        self.kind = kind  # "chat" or "text"
        self.body = body
        self.requests = requests
        self.tokenizer = tokenizer
        self.end_token_ids = set(end_token_ids)
        self.model_name = model_name
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        count = len(prompts) * body.n
        self.texts = [AnswerText(tokenizer, end_token_ids, stop) for _ in range(count)]
        self.nfe = [0] * count
        self.arrived = time.monotonic()
        self.error: OpenAIError | None = None

    @property
    def done(self) -> bool:
        return self.error is not None or all(text.done for text in self.texts)

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    def apply(self, base: int, event: Event) -> list:
        """Apply one event; returns what to stream: ("delta", index, text, finish_reason) and ("draft", payload)."""
        out = []
        if event.kind == "error":
            self.error = OpenAIError(event.status, event.message, code=event.code)
            return out
        index = base + event.index
        text = self.texts[index]
        self.nfe[index] = max(self.nfe[index], event.nfe)
        if event.kind == "finished":
            delta = text.update(event.answer, final=True)
        else:
            if event.draft is not None:
                out.append(("draft", self.draft_payload(index, event)))
            delta = text.update(event.committed)
            if text.done:  # a stop string: the answer is whole, stop decoding its row
                self.requests[base // self.body.n].cancel(event.index, complete=True)
        if delta or text.done:
            out.append(("delta", index, delta, text.finish_reason if text.done else None))
        return out

    def draft_payload(self, index: int, event: Event) -> dict:
        """The whole canvas after a step: `tokens` holds each position's text, null where still masked;
        `end_at` is the first committed end token (EOS / EoT), after which nothing belongs to the answer."""
        ids = event.draft
        mask_id = self.requests[0]._scheduler.mask_id if self.requests[0]._scheduler else None
        pieces = self.tokenizer.batch_decode([[token] for token in ids], skip_special_tokens=True,
                                             clean_up_tokenization_spaces=False)
        tokens = [None if token == mask_id else piece for token, piece in zip(ids, pieces)]
        end_at = next((i for i, token in enumerate(ids) if token in self.end_token_ids), None)
        return {"id": self.id, "object": "chat.completion.draft" if self.kind == "chat" else "text_completion.draft",
                "index": index, "step": event.nfe, "tokens": tokens, "end_at": end_at,
                "committed": len(event.committed or [])}

    def usage(self) -> dict:
        completion = sum(text.tokens for text in self.texts)
        elapsed = time.monotonic() - self.arrived
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion, "nfe": max(self.nfe, default=0),
                "elapsed_seconds": round(elapsed, 4),
                "tokens_per_second": round(completion / elapsed, 2) if elapsed > 0 else None}

    def response(self):
        if self.error is not None:
            return JSONResponse(self.error.body(), status_code=self.error.status)
        if self.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": text.sent}, "logprobs": None,
                        "finish_reason": text.finish_reason} for i, text in enumerate(self.texts)]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": text.sent, "logprobs": None, "finish_reason": text.finish_reason}
                       for i, text in enumerate(self.texts)]
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name,
                "system_fingerprint": None, "choices": choices, "usage": self.usage()}

    # ---- streaming ------------------------------------------------------------------------------

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model_name,
                "system_fingerprint": None, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return _sse(body)

    def delta_choice(self, index: int, text: str | None, finish_reason: str | None, role: bool = False) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    async def stream(self, queue: asyncio.Queue):
        try:
            if self.kind == "chat":
                yield self.chunk([self.delta_choice(i, None, None, role=True) for i in range(len(self.texts))])
            while not self.done:
                for item in self.apply(*(await queue.get())):
                    if item[0] == "draft":
                        yield _sse(item[1], event="draft")
                    else:
                        _, index, text, finish_reason = item
                        yield self.chunk([self.delta_choice(index, text, finish_reason)])
            if self.error is not None:
                yield _sse(self.error.body())
                return
            options = self.body.stream_options
            if options is not None and options.include_usage:
                yield self.chunk([], usage=self.usage())
            yield "data: [DONE]\n\n"
        finally:
            if not self.done:  # the client went away: its rows leave at the next step
                self.cancel()


def _sse(body: dict, event: str | None = None) -> str:
    import json

    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _world_size() -> int:
    """Processes serving the model together (tensor parallelism under torchrun), 1 otherwise."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _public_defaults(model, config: ServerConfig) -> dict:
    generation = model.generation_config
    defaults = {"max_tokens": generation.max_new_tokens, "steps": generation.steps,
                "block_length": generation.block_length, "temperature": generation.temperature,
                "confidence_threshold": generation.confidence_threshold, "kv_cache": generation.kv_cache}
    for name, value in config.defaults.items():
        defaults["max_tokens" if name == "max_new_tokens" else name] = value
    defaults["max_tokens_limit"] = config.max_tokens_limit
    return defaults


# ---- metrics ----------------------------------------------------------------------------------------------


def render_metrics(scheduler: Scheduler) -> str:
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


# ---- request body limit -----------------------------------------------------------------------------------


class CountPreparing:
    """Counts the completion requests received and not yet submitted (`scheduler.preparing`): an idle engine
    waits for them when one request is submitted, so that requests sent together start together."""

    PATHS = ("/v1/chat/completions", "/v1/completions")

    def __init__(self, app, scheduler):
        self.app = app
        self.scheduler = scheduler

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.PATHS:
            return await self.app(scope, receive, send)
        scope["llada_counted"] = True
        self.scheduler.preparing += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.done(scope, self.scheduler)

    @staticmethod
    def done(scope, scheduler) -> None:
        """Uncount the request (once): it was submitted, or it failed before."""
        if scope.pop("llada_counted", False):
            scheduler.preparing -= 1


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413: by Content-Length before reading, or as a chunked body
    arrives (raised as an HTTPException, which FastAPI passes to the app's handler)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse(OpenAIError(413, self.message()).body(), status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise StarletteHTTPException(413, self.message())
            return message

        await self.app(scope, limited_receive, send)

    def message(self) -> str:
        return f"The request body exceeds {self.max_bytes} bytes (--max-body-bytes)."
