"""The engine loop: one thread owns a `DiffusionEngine` and steps it; requests join at the next step boundary.

Requests are queued by the web handlers (`Scheduler.submit`); at each step boundary the loop admits the queued
requests that fit (`max_batch` rows), adds them to the engine, runs one denoising step for every running row,
and reports to each request through its `sink` (called on this thread; the web app forwards the events to its
event loop). This thread decides where each answer ends and what its text is (`output.AnswerOutput`): the web
handlers only format the events.

- `Event("progress", index, text=..., draft=...)` after a step, for streams: `text` is the text that became final
  (masked diffusion never changes a committed token, and the decided prefix grows left to right), `draft` the
  canvas (only for requests that asked for drafts);
- `Event("finished", index, text=..., finish_reason=..., answer=...)` when a row is done: the rest of its text
  (all of it when the request does not stream), why it ended, and its answer ids (cut at the first end token);
- `Event("error", status=..., message=...)` when the request fails (the other requests go on).

A row leaves the engine when it is finished, when its decided prefix holds an end token (EOS / EoT: the rest of
the answer can no longer change what is returned) or a stop string, or when its request is cancelled
(`Request.cancel`: the client disconnected), always at a step boundary. After each step the loop reads each
state's canvas in one device-to-host copy, however many rows it holds.

Batching (continuous): each admitted request is added to the engine at the next step boundary, whatever its
arrival time and settings. A request with the settings of a running one joins its decoding state (one batch for the
per-row work of a step), and every step runs all rows in as few forward passes as their shapes allow, with and
without caches; each answer is the one `generate` gives alone. A sampling request with its own `seed` gets a state
(and generator) of its own. When a state's forward raises (e.g. out of memory), a state of one request fails that
request; a state shared by several requests is split and each starts again (once; only when its tokens are
reproducible), so only the request that cannot run fails.

Under `torchrun` with tensor parallelism, every rank must run the same forwards: rank 0 (the one serving HTTP)
broadcasts each engine operation before running it, and the other ranks run `follow` to replay them.
"""

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..decoding_llada import DiffusionEngine
from ..streaming_llada import end_token_ids as find_end_token_ids
from .output import AnswerOutput, TokenPieces


logger = logging.getLogger("llada_hf.serve")


class QueueFull(Exception):
    """The queue holds `max_queue` requests already: answer 429 and ask the client to retry."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests."""


@dataclass
class Event:
    """What the loop tells a request (see the module docstring). kind: "progress", "finished" or "error"; index:
    the row (choice); nfe: the row's forward passes so far."""

    kind: str
    index: int = 0
    text: str = ""
    draft: dict | None = None
    finish_reason: str | None = None
    answer: list[int] | None = None
    nfe: int = 0
    status: int = 500
    message: str = ""
    code: str | None = None


def _no_sink(event: Event) -> None:
    pass


@dataclass
class Request:
    """One request: `n` rows (choices) of the same prompt (its ids and the model's other `inputs`), decoded with
    `settings` (any `generate` keyword); each answer ends before the first of the `stop` strings."""

    prompt_ids: list[int]
    settings: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)  # the model's other inputs (LLaDA-V: `pixel_values`, ...)
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False  # send "progress" events as text becomes final; False: only "finished" / "error"
    drafts: bool = False  # add the canvas to the "progress" events
    sink: Callable[[Event], None] = _no_sink
    id: int = field(default_factory=itertools.count().__next__)
    arrived: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished_rows: int = 0
    failed: bool = False
    cancelled: bool = False
    _restarted: bool = False
    _outputs: list[AnswerOutput] = field(default_factory=list)  # one per row; kept when the request starts again
    _cancel_step: int | None = None  # the engine's step count when the cancel came
    _queued_step: int = 0  # the engine's step count when the request was queued
    _scheduler: "Scheduler | None" = None

    def cancel(self) -> None:
        """Stop decoding the request's rows at the next step boundary (its client went away)."""
        if self._scheduler is not None and not self.cancelled:
            self._cancel_step = self._scheduler.step_index
        self.cancelled = True
        if self._scheduler is not None:
            self._scheduler._wake()

    @property
    def sampling(self) -> bool:
        return bool(self.settings.get("temperature")) or self.settings.get("do_sample") is True


@dataclass
class _Row:
    request: Request
    index: int  # the choice
    row_id: int  # the engine's id
    output: AnswerOutput
    nfe: int = 0


class _Stats:
    """Counters read by /metrics (written by the loop thread and the handlers; plain ints are enough)."""

    def __init__(self):
        self.requests = collections.Counter()  # outcome -> count
        self.steps = 0
        self.forward_passes = 0
        self.rows_cancelled = 0
        self.restarted = 0  # requests started again alone after a shared step failed
        self.cancel_delay_steps = 0  # most steps between a cancel and its row leaving (1: the step then running)
        self.generated_tokens = 0
        self.busy_seconds = 0.0
        self.peak_rows = 0  # most rows decoded in one step
        self.recent = collections.deque()  # (time, tokens) of finished rows, for tokens/s

    def finished_row(self, tokens: int) -> None:
        now = time.monotonic()
        self.generated_tokens += tokens
        self.recent.append((now, tokens))
        while self.recent and self.recent[0][0] < now - 10.0:
            self.recent.popleft()

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        tokens = sum(count for moment, count in list(self.recent) if moment >= now - window)
        return tokens / window


class Scheduler:
    """Owns the engine and its thread. See the module docstring for the events and the batching rules.

    Args:
        model: a model with `prepare_decoding` (`LladaForMaskedDiffusion`).
        tokenizer: decodes the answers (on this thread: the web handlers only format text).
        end_token_ids: ids that end an answer (EOS, EoT): a row whose committed prefix holds one is done. Default:
            those of the tokenizer and the model's generation config (`end_token_ids`).
        max_batch: rows decoded at once; more requests wait in the queue.
        max_queue: requests waiting beyond the running rows; `submit` raises `QueueFull` past it.
        batch_wait: when the engine is idle and a request comes while others are still being prepared by the web
            handlers (`preparing` > 0: requests sent together), wait up to this many seconds for them, so that
            they start together. A lone request never waits.
        join_wait: hold a queued request back for up to this many steps, until some running row starts a block
            (`DiffusionEngine.steps_to_block_start`): with caches, a request that joins mid-block adds a forward
            pass at every step where its blocks start out of phase with the others'; one that joins in phase
            shares them. A request joins at once when nothing runs, when it has no cache, or when no block starts
            within its wait. 0: every request joins at the next step.
        step_delay: seconds to pause after every step (to watch a tiny model denoise; 0 in production).
        seed: seed of the generator shared by the sampling requests that bring no `seed`.
        mirror: a `RankMirror` under tensor parallelism (rank 0 broadcasts what it runs), else None.
    """

    def __init__(self, model, tokenizer, end_token_ids: list[int] | None = None, max_batch: int = 32,
                 max_queue: int = 256, batch_wait: float = 0.0, join_wait: int = 8, step_delay: float = 0.0,
                 seed: int = 0, mirror=None):
        self.model = model
        self.tokenizer = tokenizer
        self.engine = DiffusionEngine(model)
        if end_token_ids is None:
            end_token_ids = find_end_token_ids(tokenizer, model.generation_config)
        self.end_token_ids = set(end_token_ids)
        self.pieces = TokenPieces(tokenizer, model.config.get_text_config().mask_token_id)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        self.preparing = 0  # requests received by the web app and not yet submitted (counted by the app)
        self.join_wait = join_wait
        self.step_delay = step_delay
        self.seed = seed
        self.generator = torch.Generator(device=model.device).manual_seed(seed)
        self.mirror = mirror
        self.stats = _Stats()
        self._queue: collections.deque[Request] = collections.deque()
        self._rows: dict[int, _Row] = {}  # engine row id -> row
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining_until: float | None = None  # graceful shutdown: finish running rows until then
        self.step_index = 0

    # ---- called by the web handlers --------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queue a request; it joins the engine at the next step boundary. Raises QueueFull or ShuttingDown."""
        if request.n > self.max_batch:
            raise ValueError(f"`n` ({request.n}) exceeds the server's batch ({self.max_batch} rows, --max-batch).")
        with self._condition:
            if self.draining:
                raise ShuttingDown("The server is shutting down.")
            if len(self._queue) >= self.max_queue:
                self.stats.requests["rejected"] += 1
                raise QueueFull(f"The queue is full ({self.max_queue} requests waiting); retry shortly.")
            request._scheduler = self
            request._queued_step = self.step_index
            self._queue.append(request)
            self._condition.notify()
        return request

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running_rows(self) -> int:
        return len(self._rows)

    @property
    def draining(self) -> bool:
        """Shutting down: running rows may finish, no new request is taken."""
        return self._stopping or self._draining_until is not None

    def retry_after(self) -> int:
        """Seconds a rejected client should wait before retrying (the `Retry-After` header of a 429)."""
        return 1

    # ---- life cycle ------------------------------------------------------------------------------

    def start(self) -> "Scheduler":
        """Start the loop thread (once: a scheduler already started, e.g. by a test, keeps its thread)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llada-engine", daemon=True)
            self._thread.start()
        return self

    def begin_shutdown(self, grace: float) -> None:
        """Take no new requests; let running rows finish for `grace` seconds, then cancel what is left."""
        with self._condition:
            if self._draining_until is None:
                self._draining_until = time.monotonic() + grace
            self._condition.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything left (its clients get an error) and end the loop thread."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _wake(self) -> None:
        with self._condition:
            self._condition.notify()

    # ---- the loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.no_grad():
            try:
                while True:
                    if not self._wait_for_work():
                        break
                    started = time.monotonic()
                    self._admit()
                    self._apply_cancellations()
                    if self.engine.has_unfinished:
                        self._step()
                    self.stats.busy_seconds += time.monotonic() - started
                    if self.step_delay:
                        time.sleep(self.step_delay)
            except Exception:  # a bug in the loop itself: fail what is left rather than hang the clients
                logger.exception("The engine loop failed")
                self._fail_everything(500, "The engine loop failed; see the server log.")
            finally:
                self._fail_everything(503, "The server is shutting down.", code="server_shutting_down")
                if self.mirror is not None:
                    self.mirror.broadcast(("stop",))

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; False when the loop must end."""
        with self._condition:
            while True:
                if self._stopping:
                    return False
                if self._draining_until is not None:
                    self._fail_queued(503, "The server is shutting down.", code="server_shutting_down")
                    if time.monotonic() >= self._draining_until:
                        return False
                    if not self._rows:
                        return False
                if self._rows or self._queue:
                    break
                self._condition.wait(timeout=1.0)
                if self.mirror is not None and not (self._rows or self._queue):
                    self.mirror.broadcast(("noop",))  # keeps the other ranks' collectives alive
        if self.batch_wait and not self._rows and self._queue:
            self._gather()
        return True

    def _gather(self) -> None:
        """The engine is idle and a request came: while other requests are being prepared (received, not yet
        submitted), wait for them (at most `batch_wait`, until `max_batch` rows wait), so that requests sent
        together start together: one state, one forward per step."""
        deadline = time.monotonic() + self.batch_wait
        while self.preparing > 0 and time.monotonic() < deadline and not self._stopping:
            with self._condition:
                if sum(request.n for request in self._queue) >= self.max_batch:
                    return
            time.sleep(0.0005)

    def _admit(self) -> None:
        """Move the queued requests that fit into the engine: each joins the running batch at the next step (or, with
        `join_wait`, at the step where running rows start a block)."""
        if self._queue and not self._time_to_join():
            return
        admitted = []
        with self._condition:
            free = self.max_batch - len(self._rows)
            while self._queue and self._queue[0].n <= free:
                request = self._queue.popleft()
                if request.cancelled:
                    self.stats.requests["cancelled"] += 1
                    continue
                admitted.append(request)
                free -= request.n
        for request in admitted:
            self._add(request)

    def _time_to_join(self) -> bool:
        """Whether the queued requests join at the next step: no `join_wait`, nothing running, the oldest request
        without a cache (every step of it is a whole-canvas pass: waiting saves nothing), some running row starting a
        block at that step, or none within what is left of the oldest request's wait."""
        if not self.join_wait or not self._rows or not self._uses_cache(self._queue[0]):
            return True
        steps = self.engine.steps_to_block_start()
        waited = self.step_index - self._queue[0]._queued_step
        return steps is None or steps == 0 or steps > self.join_wait - waited

    def _uses_cache(self, request: Request) -> bool:
        settings = request.settings
        kv_cache = settings.get("kv_cache", getattr(self.model.generation_config, "kv_cache", None))
        return bool(kv_cache) and settings.get("use_cache") is not False

    def _add(self, request: Request) -> None:
        """Add the request's `n` rows (its prompt, prepared once and repeated) to the engine; a request started again
        after a failed step decodes in a state of its own, so that a request that cannot run fails alone."""
        input_ids = torch.tensor([request.prompt_ids], dtype=torch.long)
        settings = {**request.settings, **request.inputs, "num_return_sequences": request.n}
        seed = request.seed if request.sampling else None  # a sampling request with a seed: a generator of its own
        try:
            row_ids = self._engine_add(input_ids, settings, seed, join=not request._restarted)
        except Exception as error:  # bad settings slipped through validation, or no memory for the prompt
            self._fail(request, _status_of(error), _message_of(error))
            return
        request.started = time.monotonic()
        # A request started again after a failed step keeps its outputs: it decodes the same tokens again, and its
        # client must not get the text it already has twice.
        request._outputs = request._outputs or [
            AnswerOutput(self.tokenizer, self.pieces, self.end_token_ids, request.stop, request.drafts)
            for _ in range(request.n)]
        for index, (row_id, output) in enumerate(zip(row_ids, request._outputs)):
            self._rows[row_id] = _Row(request, index, row_id, output)

    def _apply_cancellations(self) -> None:
        for row in [row for row in self._rows.values() if row.request.cancelled]:
            self._engine_remove(row.row_id)
            del self._rows[row.row_id]
            self.stats.rows_cancelled += 1
            delay = self.step_index - row.request._cancel_step
            self.stats.cancel_delay_steps = max(self.stats.cancel_delay_steps, delay)
            self._row_done(row)

    def _step(self) -> None:
        before = getattr(self.engine, "forward_passes", None)
        self.stats.peak_rows = max(self.stats.peak_rows, len(self._rows))
        failures = self._engine_step()
        self.step_index += 1
        self.stats.steps += 1
        after = getattr(self.engine, "forward_passes", None)
        if before is not None and after is not None:
            self.stats.forward_passes += after - before
        failed = {id(state) for state, _ in failures}
        stepped = [row for row in self._rows.values() if id(self.engine.state_of(row.row_id)[0]) not in failed]
        if failures:
            self._recover(failures)
        for state, rows in self._by_state(stepped):
            canvases, active = _read_state(state)
            for row, position in rows:
                row.nfe += 1
                self._report(row, canvases[position], finished=state.done or not active[position])

    def _recover(self, failures: list[tuple[Any, Exception]]) -> None:
        """States whose step raised: a state of one request fails it; a state shared by several requests is split,
        each request starting again alone (once), so that only the one that cannot run fails."""
        for state, error in failures:
            rows = [row for row in self._rows.values() if self.engine.state_of(row.row_id)[0] is state]
            requests = list({id(row.request): row.request for row in rows}.values())
            for row in rows:
                self._engine_remove(row.row_id)
                del self._rows[row.row_id]
            for request in requests:
                if len(requests) > 1 and _restartable(request) and self.mirror is None:
                    logger.warning("A shared step failed (%s); request %s starts again alone", error, request.id)
                    request._restarted = True
                    self.stats.restarted += 1
                    self._add(request)
                else:
                    self._fail(request, _status_of(error), _message_of(error))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _by_state(self, rows: list[_Row]) -> list[tuple[Any, list[tuple[_Row, int]]]]:
        """The rows grouped by the engine state that holds them: (state, [(row, its index in the state)])."""
        groups: dict[int, tuple[Any, list[tuple[_Row, int]]]] = {}
        for row in rows:
            state, position = self.engine.state_of(row.row_id)
            groups.setdefault(id(state), (state, []))[1].append((row, position))
        return list(groups.values())

    def _report(self, row: _Row, canvas: list[int], finished: bool) -> None:
        """Tell the row's request what the step decided (`canvas`: its answer, masks in place; `finished`: the
        engine is done with it); the row leaves when its answer is decided."""
        step = row.output.update(canvas, finished)
        if row.output.done:
            self._finish(row, finished, step.text)
        elif row.request.stream and (step.text or step.draft is not None):
            self._send(row.request, Event("progress", row.index, text=step.text, draft=step.draft, nfe=row.nfe))

    def _finish(self, row: _Row, finished: bool, last_text: str) -> None:
        """The row's answer is decided: it leaves the engine, and its request gets the rest of the text
        (`last_text`, what this step made final)."""
        if finished:
            self._engine_pop(row.row_id)
        else:
            self._engine_remove(row.row_id)  # decided up to its end: the rest cannot change the answer
        del self._rows[row.row_id]
        output = row.output
        self.stats.finished_row(len(output.ids))
        # a stream has had the text before `last_text`; a request that does not stream gets all of it now
        text = last_text if row.request.stream else output.text
        self._row_done(row)  # counted before the client hears of it: /metrics never lags behind an answer
        self._send(row.request, Event("finished", row.index, text=text, finish_reason=output.finish_reason,
                                      answer=list(output.ids), nfe=row.nfe))

    def _row_done(self, row: _Row) -> None:
        request = row.request
        request.finished_rows += 1
        if request.finished_rows == request.n and not request.failed:
            self.stats.requests["cancelled" if request.cancelled else "ok"] += 1

    # ---- failures ----------------------------------------------------------------------------------

    def _fail(self, request: Request, status: int, message: str, code: str | None = None) -> None:
        if request.failed:
            return
        request.failed = True
        self.stats.requests["error"] += 1
        for row in [row for row in self._rows.values() if row.request is request]:
            self._engine_remove(row.row_id)
            del self._rows[row.row_id]
        self._send(request, Event("error", status=status, message=message, code=code))

    def _fail_queued(self, status: int, message: str, code: str | None = None) -> None:
        while self._queue:
            self._fail(self._queue.popleft(), status, message, code)

    def _fail_everything(self, status: int, message: str, code: str | None = None) -> None:
        with self._condition:
            self._fail_queued(status, message, code)
        for request in {row.request.id: row.request for row in list(self._rows.values())}.values():
            self._fail(request, status, message, code)

    def _send(self, request: Request, event: Event) -> None:
        try:
            request.sink(event)
        except Exception:  # a closed event loop (the server is stopping): nobody is listening any more
            logger.debug("Could not deliver an event to request %s", request.id, exc_info=True)

    # ---- engine operations (mirrored to the other ranks under tensor parallelism) ------------------

    def _engine_add(self, input_ids, settings: dict, seed: int | None, join: bool) -> list[int]:
        if self.mirror is not None:
            self.mirror.broadcast(("add", input_ids, settings, seed, join))
        return apply_add(self.engine, self.generator, input_ids, settings, seed, join)

    def _engine_remove(self, row_id: int) -> None:
        if self.mirror is not None:
            self.mirror.broadcast(("remove", row_id))
        self.engine.remove(row_id)

    def _engine_pop(self, row_id: int) -> None:
        if self.mirror is not None:
            self.mirror.broadcast(("pop", row_id))
        self.engine.pop(row_id)

    def _engine_step(self) -> list[tuple[Any, Exception]]:
        if self.mirror is not None:
            self.mirror.broadcast(("step",))
        return apply_step(self.engine, isolate=self.mirror is None)


# ---- engine operations shared by rank 0 and the ranks that follow it -------------------------------


def apply_add(engine: DiffusionEngine, shared_generator, input_ids, settings: dict, seed: int | None,
              join: bool) -> list[int]:
    model = engine.model
    generator = shared_generator if seed is None else torch.Generator(device=model.device).manual_seed(seed)
    settings = {name: _on_device(value, model) for name, value in settings.items()}
    return engine.add(input_ids.to(model.device), generator=generator, join=join, **settings)


def _on_device(value, model):
    """A model input (LLaDA-V's `pixel_values`, ...) on the model's device, pixels in its dtype."""
    if not torch.is_tensor(value):
        return value
    return value.to(model.device, dtype=model.dtype if value.is_floating_point() else value.dtype)


def apply_step(engine: DiffusionEngine, isolate: bool = True) -> list[tuple[Any, Exception]]:
    """One step for every request. When the step raises, step each state alone so that only the states whose
    forward fails are reported (a state stepped twice in one round loses nothing: its tokens do not depend on
    the other states). Without `isolate` (tensor parallelism: every rank must run the same forwards), every
    unfinished state is reported as failed."""
    try:
        engine.step()
        return []
    except Exception as first_error:
        if not isolate:
            logger.error("A step failed (%s); every running request fails", first_error)
            return [(state, first_error) for state in engine.states if not state.done]
        logger.warning("A step failed (%s); stepping each request alone", first_error)
    failures = []
    for state in list(engine.states):
        if state.done:
            continue
        try:
            state.step()
        except Exception as error:
            failures.append((state, error))
    return failures


def follow(engine: DiffusionEngine, mirror, seed: int = 0) -> None:
    """The loop of a rank other than 0 under tensor parallelism: replay rank 0's engine operations."""
    import signal

    for name in ("SIGTERM", "SIGINT"):  # torchrun forwards signals to every rank: rank 0 decides when to stop
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    generator = torch.Generator(device=engine.model.device).manual_seed(seed)
    with torch.no_grad():
        while True:
            operation = mirror.receive()
            kind = operation[0]
            try:
                if kind == "stop":
                    return
                if kind == "add":
                    apply_add(engine, generator, *operation[1:])
                elif kind == "remove":
                    engine.remove(operation[1])
                elif kind == "pop":
                    engine.pop(operation[1])
                elif kind == "step":
                    apply_step(engine, isolate=False)
            except Exception:  # rank 0 sees the same failure and answers the client
                logger.debug("Replayed operation %s failed", kind, exc_info=True)


class RankMirror:
    """Broadcasts engine operations from rank 0 to the other ranks (torch.distributed, any backend)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist

    def broadcast(self, operation: tuple) -> None:
        self.dist.broadcast_object_list([_to_cpu(operation)], src=0)

    def receive(self) -> tuple:
        box = [None]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]


def _to_cpu(operation: tuple) -> tuple:
    return tuple(item.cpu() if isinstance(item, torch.Tensor) else item for item in operation)


# ---- small helpers ----------------------------------------------------------------------------------


def _restartable(request: Request) -> bool:
    """Whether decoding the request again from the start gives what its client has already seen: not restarted
    before, no row finished, and its tokens reproducible (greedy, or sampling with its own seed)."""
    reproducible = not request.sampling or request.seed is not None
    return not request._restarted and request.finished_rows == 0 and reproducible and not request.failed


def _read_state(state) -> tuple[list[list[int]], list[bool]]:
    """Every row's answer (mask ids where still masked) and whether the row is still being decoded, in ONE
    device-to-host copy: a copy per row would wait for the device once per row."""
    answers = state.x[:, state.answer_start :]
    host = torch.cat([answers, state.active[:, None].long()], dim=1).tolist()
    return [row[:-1] for row in host], [bool(row[-1]) for row in host]


def _status_of(error: Exception) -> int:
    if isinstance(error, (ValueError, TypeError)):
        return 400
    if isinstance(error, torch.OutOfMemoryError):
        return 503
    return 500


def _message_of(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, torch.OutOfMemoryError):
        return f"Out of memory while decoding this request; retry with a shorter prompt or answer ({text})."
    if isinstance(error, (ValueError, TypeError)):
        return text
    return f"Decoding failed: {type(error).__name__}: {text}"
