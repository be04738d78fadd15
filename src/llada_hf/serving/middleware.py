"""The app's ASGI middleware: the request body limit, and the count of completion requests being prepared."""

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import OpenAIError


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
