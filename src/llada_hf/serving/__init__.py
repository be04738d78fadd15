"""`llada-hf serve`: an OpenAI-compatible server over the step engine, with streamed drafts and a live web page.

- `scheduler.py`: the engine loop thread (`Scheduler`): requests join at step boundaries and leave when done.
- `output.py`: what that thread makes of each answer after a step: where it ends, its new text, its draft.
- `protocol.py`: the request bodies (pydantic), the `generate` settings they turn into, OpenAI-style errors.
- `handlers.py`: the objects behind the routes (completions, chat completions, health, models, metrics, the API key).
- `responses.py`: the answers of one HTTP request as JSON or server-sent events (formatting only).
- `app.py`: the FastAPI app (`create_app`): one-line routes, OpenAI-shaped errors, the page;
  `middleware.py`: the body limit, and the count of requests being prepared.
- `server.py`: the command's flags, model loading (tensor parallel under torchrun) and uvicorn (`serve`).
- `static/`: the web page (plain HTML/JS/CSS).

FastAPI and uvicorn come with `pip install -e '.[serve]'` (in the llada-hf checkout); importing this package does
not need them.
"""

from .scheduler import Event, QueueFull, Request, Scheduler, ShuttingDown


__all__ = ["Event", "QueueFull", "Request", "Scheduler", "ShuttingDown"]
