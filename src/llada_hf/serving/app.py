"""The FastAPI app: OpenAI-compatible endpoints over the engine loop, metrics, and the live web page.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`,
`GET /metrics` (Prometheus text format) and the page at `/` (static files, no build step). Each route is one
line that calls its handler object (`handlers.py`); errors are answered in OpenAI's shape.
"""

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..loading import is_vision_processor, text_tokenizer
from .handlers import (
    Authorization,
    ChatCompletionHandler,
    CompletionHandler,
    ServerConfig,
    ServerInfo,
    VisionChatCompletionHandler,
)
from .middleware import BodyLimit, CountPreparing
from .protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from .scheduler import Scheduler


STATIC = Path(__file__).parent / "static"


def create_app(model, processor, scheduler: Scheduler, config: ServerConfig) -> FastAPI:
    """The app of a text model (`processor`: its tokenizer) or of LLaDA-V (its `LladaVProcessor`: chat messages may
    hold images); its lifespan starts the scheduler's thread and stops it."""

    @asynccontextmanager
    async def lifespan(app):
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
    _answer_errors_as_openai(app)
    authorized = [Depends(Authorization(config.api_key))]
    vision = is_vision_processor(processor)
    info = ServerInfo(model, scheduler, config, takes_images=vision)
    chat = (VisionChatCompletionHandler if vision else ChatCompletionHandler)(model, processor, scheduler, config)
    completion = CompletionHandler(model, text_tokenizer(processor), scheduler, config)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        return await chat(body, http)

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: CompletionRequest, http: Request):
        return await completion(body, http)

    @app.get("/v1/models", dependencies=authorized)
    async def models():
        return info.models()

    @app.get("/metrics", dependencies=authorized)
    async def metrics():
        return info.metrics()

    @app.get("/health")
    async def health():
        return info.health()

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    if config.api_key:
        @app.get("/openapi.json", include_in_schema=False, dependencies=authorized)
        async def openapi_schema():
            return JSONResponse(app.openapi())

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _answer_errors_as_openai(app: FastAPI) -> None:
    """Every error the app answers has OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        return JSONResponse(OpenAIError.from_validation(error.errors()).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return JSONResponse(OpenAIError(error.status_code, str(error.detail)).body(), status_code=error.status_code,
                            headers=getattr(error, "headers", None))
