"""The OpenAI-compatible HTTP API (FastAPI) in front of a :class:`~quickdraft.batching.BatchScheduler`.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming as
server-sent events exactly like OpenAI), ``GET /health`` and ``GET /metrics`` (Prometheus text).

Handlers never decode: they validate the request (:mod:`quickdraft.server.protocol`), submit it to the
scheduler thread, and read its events from an ``asyncio.Queue`` that the scheduler fills through
``loop.call_soon_threadsafe``. While waiting they also watch the connection: a client that disconnects
(mid-stream or while waiting for a non-streamed answer) is cancelled in the scheduler at once, which frees
its batch slot, cache row and drafter.

Every error is OpenAI's error JSON with the matching status: 400 invalid request, 401 missing or wrong API
key (when the server has one; checked on every request, ``Authorization: Bearer KEY``), 404 unknown model or
route, 405 wrong method, 413 body over the size limit, 503 overloaded or shutting down, 500 internal error.

Every accepted request ends with an answer or an error: one the scheduler cuts off or never reaches (it was
closed, or stopped) gets 503 ``shutting_down`` (mid-stream: an error event), never a truncated answer
reported as complete.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from quickdraft.batching import (
    SHUTDOWN_MESSAGE,
    BatchScheduler,
    Delta,
    Event,
    Failed,
    Finished,
    SchedulerBusy,
    SchedulerClosed,
    ServeRequest,
)
from quickdraft.server.metrics import ServerMetrics
from quickdraft.server.protocol import (
    DONE,
    APIError,
    ChunkWriter,
    ParsedRequest,
    completion_body,
    error_body,
    new_id,
    parse_chat,
    parse_completion,
    sse,
)

log = logging.getLogger(__name__)

#: Default request body limit.
MAX_BODY_BYTES = 1 << 20
#: Deepest nesting of arrays and objects accepted in a request body (OpenAI requests use about 5 levels).
MAX_JSON_DEPTH = 64
#: How often a request waiting for its next event checks that the scheduler still runs.
LIVENESS_SECONDS = 0.5


def create_app(scheduler: BatchScheduler, model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, metrics: ServerMetrics | None = None,
               aliases: tuple[str, ...] = ()) -> FastAPI:
    """The ASGI app. The caller starts and closes ``scheduler``."""
    metrics = metrics or ServerMetrics()
    metrics.bind(scheduler)
    served = {model_name, *aliases}
    app = FastAPI(title="quickdraft", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    _add_error_handlers(app)
    _add_status_routes(app, scheduler, metrics, model_name)
    _add_model_routes(app, served)
    _add_generation_routes(app, scheduler, metrics, served, max_body_bytes)
    app.add_middleware(_GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, routing ones and unexpected ones included, as OpenAI's error JSON."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = {404: f"Unknown route {request.method} {request.url.path}",
                   405: f"Method {request.method} is not allowed on {request.url.path}"}.get(
            error.status_code, str(error.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return _error_response(APIError(error.status_code, message, None, code))

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error_response(APIError(500, "The server had an error while processing your request.", None,
                                        "internal_error"))


def _add_status_routes(app: FastAPI, scheduler: BatchScheduler, metrics: ServerMetrics, model_name: str) -> None:
    """``/health`` (503 while the scheduler is not running) and ``/metrics``."""

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = scheduler.running
        body = {"status": "ok" if alive else "unavailable", "model": model_name, "active": scheduler.active,
                "queue_depth": scheduler.queue_depth, "max_batch": scheduler.max_batch,
                "drafter": scheduler.drafter_name}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _add_model_routes(app: FastAPI, served: set[str]) -> None:
    """``/v1/models`` and ``/v1/models/{name}`` for the served name and its aliases."""
    created = int(time.time())

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "quickdraft"}

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card(name) for name in sorted(served)]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> JSONResponse:
        if name not in served:
            raise APIError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return JSONResponse(model_card(name))


def _add_generation_routes(app: FastAPI, scheduler: BatchScheduler, metrics: ServerMetrics, served: set[str],
                           max_body_bytes: int) -> None:
    """``/v1/completions`` and ``/v1/chat/completions``: read, validate, then serve through the scheduler."""

    async def handle(request: Request, endpoint: str, parse: Callable[[Any, set[str]], ParsedRequest]) -> Response:
        started = time.perf_counter()
        try:
            body = await _read_json(request, max_body_bytes)
            parsed = parse(body, served)
            return await _serve(request, endpoint, parsed, scheduler, metrics, started)
        except APIError as error:
            metrics.request_done(endpoint, error.status)
            return _error_response(error)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, "completions", parse_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, "chat", parse_chat)


def _error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _read_json(request: Request, limit: int) -> Any:
    chunks = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(413, f"The request body is larger than the limit of {limit} bytes.", None,
                           "request_too_large")
        chunks.append(part)
    return _parse_json(b"".join(chunks))


def _parse_json(raw: bytes) -> Any:
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError as error:
        raise _nested_too_deep() from error
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(400, "We could not parse the JSON body of your request. (HINT: This likely means you "
                            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.) "
                            f"Parser error: {error}", None, "invalid_json") from error
    if _nesting_exceeds(body, MAX_JSON_DEPTH):
        raise _nested_too_deep()
    return body


def _nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays and objects in ``value`` nest more than ``limit`` levels deep (without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _nested_too_deep() -> APIError:
    return APIError(400, f"The JSON body of your request nests arrays or objects more than {MAX_JSON_DEPTH} "
                         "levels deep; send a flatter body.", None, "invalid_json")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class _Events:
    """A request's events from the scheduler thread, with the client's connection and the scheduler watched
    alongside: each wait ends with an event, with None once the client has gone, or with a Failed (503) once the
    scheduler has stopped without answering (closed while stuck in a step, or dead)."""

    def __init__(self, request: Request, scheduler_running: Callable[[], bool]) -> None:
        self._events: deque[Event] = deque()
        self._arrived = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.sink = lambda event: loop.call_soon_threadsafe(self._push, event)
        self._scheduler_running = scheduler_running
        self._receive = request.receive
        self._watcher: asyncio.Task | None = None
        self.disconnected = False
        self.finished = False  # a Finished or Failed event arrived: nothing left to cancel

    def _push(self, event: Event) -> None:
        self._events.append(event)
        self._arrived.set()

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return

    async def next(self) -> Event | None:
        """The next event, or None once the client has disconnected."""
        if self.disconnected:
            return None
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch())
        while not self._events:
            if not self._scheduler_running():
                await asyncio.sleep(0)  # what the scheduler sent before it stopped is delivered first
                if not self._events:
                    self._push(Failed(SHUTDOWN_MESSAGE, 503, "shutting_down"))
                break
            if not await self._wait():
                self.disconnected = True
                return None
        return self._seen(self._events.popleft())

    async def _wait(self) -> bool:
        """Wait up to LIVENESS_SECONDS for an event; False if the client disconnected instead."""
        self._arrived.clear()
        arrived = asyncio.ensure_future(self._arrived.wait())
        done, _ = await asyncio.wait({arrived, self._watcher}, timeout=LIVENESS_SECONDS,
                                     return_when=asyncio.FIRST_COMPLETED)
        arrived.cancel()
        return bool(self._events) or self._watcher not in done

    def _seen(self, event: Event) -> Event:
        if isinstance(event, (Finished, Failed)):
            self.finished = True
        return event

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()


async def _serve(request: Request, endpoint: str, parsed: ParsedRequest, scheduler: BatchScheduler,
                 metrics: ServerMetrics, started: float) -> Response:
    events = _Events(request, lambda: scheduler.running)
    serve_request = ServeRequest(parsed.prompt, parsed.max_tokens, parsed.params, parsed.stop, events.sink,
                                 fit_to_context=not parsed.max_tokens_given)
    try:
        ticket = scheduler.submit(serve_request)
    except SchedulerClosed as error:
        raise APIError(503, f"The server is not accepting requests: {error}", None, "shutting_down") from error
    except SchedulerBusy as error:
        raise APIError(503, f"The server is overloaded: {error}", None, "overloaded") from error

    def close() -> None:
        events.close()
        if not events.finished:
            scheduler.cancel(ticket)

    handed_over = False
    try:
        first = await events.next()
        if first is None:
            return _gone(metrics, endpoint)
        if isinstance(first, Failed):
            param = parsed.prompt_param if first.status == 400 else None
            raise APIError(first.status, first.message, param, first.code)
        if parsed.stream:
            handed_over = True  # the response closes the events and cancels if it ends early
            return _EventStreamResponse(_stream(events, parsed, metrics, endpoint, started), close)
        return await _collect(events, parsed, metrics, endpoint, started)
    finally:
        if not handed_over:
            close()


def _gone(metrics: ServerMetrics, endpoint: str) -> Response:
    metrics.disconnected()
    metrics.request_done(endpoint, 499)
    return Response(status_code=499)


async def _collect(events: _Events, parsed: ParsedRequest, metrics: ServerMetrics, endpoint: str,
                   started: float) -> Response:
    texts: list[str] = []
    while True:
        event = await events.next()
        if event is None:
            return _gone(metrics, endpoint)
        if isinstance(event, Delta):
            texts.append(event.text)
        elif isinstance(event, Failed):
            raise APIError(event.status, event.message, None, event.code)
        elif isinstance(event, Finished):
            extra = {"tau": round(event.stats.tau, 4), "drafter": event.stats.drafter,
                     "target_forwards": event.stats.target_forwards}
            body = completion_body(parsed, new_id(parsed.chat), int(time.time()), "".join(texts),
                                   event.finish_reason, event.prompt_tokens, event.completion_tokens, extra)
            metrics.request_done(endpoint, 200, time.perf_counter() - started)
            return JSONResponse(body)


async def _stream(events: _Events, parsed: ParsedRequest, metrics: ServerMetrics, endpoint: str,
                  started: float) -> AsyncIterator[bytes]:
    writer = ChunkWriter(parsed)
    first_text = True
    head = writer.start()
    if head:
        yield head
    while True:
        event = await events.next()
        if event is None:
            _gone(metrics, endpoint)
            return
        if isinstance(event, Delta):
            if event.text:
                if first_text:
                    metrics.first_token(endpoint, time.perf_counter() - started)
                    first_text = False
                yield writer.text(event.text)
        elif isinstance(event, Failed):
            kind = "server_error" if event.status >= 500 else "invalid_request_error"
            yield sse(error_body(event.message, kind, None, event.code))
            yield DONE
            metrics.request_done(endpoint, event.status)
            return
        elif isinstance(event, Finished):
            yield writer.finish(event.finish_reason)
            tail = writer.usage(event.prompt_tokens, event.completion_tokens)
            if tail:
                yield tail
            yield DONE
            metrics.request_done(endpoint, 200, time.perf_counter() - started)
            return


class _EventStreamResponse(Response):
    """Sends ``text/event-stream`` chunks. However the stream ends (finished, client gone, send failed),
    ``on_close`` runs: it cancels the request in the scheduler unless it had finished."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.chunks = chunks
        self.on_close = on_close

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            log.debug("client went away during a stream")
        finally:
            try:
                await self.chunks.aclose()
            finally:
                self.on_close()


class _GuardMiddleware:
    """Pure ASGI middleware (it does not buffer streams): API key on every request, and a declared body
    size over the limit refused with 413 before the body is read."""

    def __init__(self, app: Callable, api_key: str | None, max_body_bytes: int, metrics: ServerMetrics) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        error = self._check(headers)
        if error is not None:
            self.metrics.request_done(_endpoint(scope.get("path", "")), error.status)
            await _error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check(self, headers: dict[bytes, bytes]) -> APIError | None:
        if self.api_key is not None:
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if not auth:
                return APIError(401, "You didn't provide an API key. You need to provide your API key in an "
                                     "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                                None, "missing_api_key")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return APIError(401, "Incorrect API key provided.", None, "invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return APIError(400, "Invalid Content-Length header.", None, "invalid_request")
            if declared > self.max_body_bytes:
                return APIError(413, f"The request body is larger than the limit of {self.max_body_bytes} bytes.",
                                None, "request_too_large")
        return None


def _endpoint(path: str) -> str:
    return {"/v1/completions": "completions", "/v1/chat/completions": "chat"}.get(path, "other")
