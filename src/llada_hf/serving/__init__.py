"""`llada-hf serve`: an OpenAI-compatible server over the step engine, with streamed drafts and a live web page.

- `scheduler.py`: the engine loop thread (`Scheduler`): requests join at step boundaries and leave when done.
- `protocol.py`: the request bodies (pydantic), OpenAI-style errors, the committed text of an answer.
- `app.py`: the FastAPI app (`create_app`): endpoints, streaming, limits, metrics, the page.
- `server.py`: the command's flags, model loading (tensor parallel under torchrun) and uvicorn (`serve`).
- `static/`: the web page (plain HTML/JS/CSS).

FastAPI and uvicorn come with `pip install -e '.[serve]'` (in the llada-hf checkout); importing this package does
not need them.
"""

from .scheduler import Event, QueueFull, Request, Scheduler, ShuttingDown


__all__ = ["Event", "QueueFull", "Request", "Scheduler", "ShuttingDown"]
