"""The answers of one HTTP request, built from the engine thread's events: OpenAI's JSON body, or the server-sent
events of a stream (standard `chat.completion.chunk` / `text_completion` chunks, plus `event: draft` frames).

Formatting only: where an answer ends, its text and its finish reason come with the events (see
`scheduler.Event`); nothing here decodes tokens.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse

from .protocol import OpenAIError
from .scheduler import Event
from .scheduler import Request as EngineRequest


@dataclass
class Choice:
    """One choice as the client has it so far."""

    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0  # answer tokens, up to the end token
    nfe: int = 0
    done: bool = False


class Answers:
    """The choices of one HTTP request: applies the engine's events, answers with JSON or a stream.

    Args:
        kind: "chat" (chat completion objects) or "text" (completion objects).
        body: the request body (`n`, `stream_options`).
        prompt_tokens: the prompts' tokens, for `usage`.
        requests: the engine requests (one per prompt, `n` rows each), cancelled when the client goes away.
        model_name: the served name.
    """

    def __init__(self, kind: str, body, prompt_tokens: int, requests: list[EngineRequest], model_name: str):
        self.kind = kind
        self.body = body
        self.requests = requests
        self.model_name = model_name
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.choices = [Choice() for _ in range(len(requests) * body.n)]
        self.arrived = time.monotonic()
        self.error: OpenAIError | None = None

    @property
    def done(self) -> bool:
        return self.error is not None or all(choice.done for choice in self.choices)

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    def apply(self, base: int, event: Event) -> None:
        """Take one event of the engine request whose first choice is `base`."""
        if event.kind == "error":
            self.error = OpenAIError(event.status, event.message, code=event.code)
            return
        choice = self.choices[base + event.index]
        choice.nfe = max(choice.nfe, event.nfe)
        choice.text += event.text
        if event.kind == "finished":
            choice.finish_reason, choice.tokens, choice.done = event.finish_reason, len(event.answer), True

    # ---- a whole response -------------------------------------------------------------------------

    async def collect(self, queue: asyncio.Queue, http: Request):
        """Wait for every choice (or an error); a client that goes away cancels its rows (499)."""
        try:
            while not self.done:
                try:
                    self.apply(*await asyncio.wait_for(queue.get(), timeout=0.5))
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return JSONResponse({}, status_code=499)
        finally:
            if not self.done:
                self.cancel()
        return self.response()

    def response(self):
        if self.error is not None:
            return JSONResponse(self.error.body(), status_code=self.error.status)
        if self.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": choice.text}, "logprobs": None,
                        "finish_reason": choice.finish_reason} for i, choice in enumerate(self.choices)]
        else:
            choices = [{"index": i, "text": choice.text, "logprobs": None, "finish_reason": choice.finish_reason}
                       for i, choice in enumerate(self.choices)]
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model_name, "system_fingerprint": None, "choices": choices,
                "usage": self.usage()}

    def usage(self) -> dict:
        completion = sum(choice.tokens for choice in self.choices)
        elapsed = time.monotonic() - self.arrived
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion, "nfe": max(c.nfe for c in self.choices),
                "elapsed_seconds": round(elapsed, 4),
                "tokens_per_second": round(completion / elapsed, 2) if elapsed > 0 else None}

    # ---- a stream ---------------------------------------------------------------------------------

    async def stream(self, queue: asyncio.Queue) -> AsyncIterator[str]:
        """The server-sent events: the role, then text deltas (and drafts) as the engine sends them, the usage when
        asked for, and `[DONE]`; an error event when the request fails."""
        try:
            if self.kind == "chat":
                yield self.chunk([self.delta_choice(i, None, None, role=True) for i in range(len(self.choices))])
            while not self.done:
                base, event = await queue.get()
                self.apply(base, event)
                for message in self.messages(base, event):
                    yield message
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

    def messages(self, base: int, event: Event) -> list[str]:
        """The server-sent events of one engine event: its draft, then its text (with the finish reason)."""
        if event.kind == "error":
            return []
        index = base + event.index
        choice = self.choices[index]
        messages = [_sse(self.draft(index, event), event="draft")] if event.draft is not None else []
        if event.text or choice.done:
            messages.append(self.chunk([self.delta_choice(index, event.text, choice.finish_reason)]))
        return messages

    def draft(self, index: int, event: Event) -> dict:
        """The canvas after a step (see `output.StepOutput`), as an `event: draft` body."""
        kind = "chat.completion.draft" if self.kind == "chat" else "text_completion.draft"
        return {"id": self.id, "object": kind, "index": index, "step": event.nfe, **event.draft}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model_name,
                "system_fingerprint": None, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return _sse(body)

    def delta_choice(self, index: int, text: str | None, finish_reason: str | None, role: bool = False) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


def _sse(body: dict, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(body, ensure_ascii=False)}\n\n"
