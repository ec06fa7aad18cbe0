"""The FastAPI application: OpenAI-compatible routes over one engine, behind the scheduler.

A generation request is checked whole (JSON, model name, parameters, prompt against the context) before
it queues; then it waits for its turn (503 + Retry-After if that takes longer than the queue timeout)
and is answered as one JSON body or as server-sent events. A client that disconnects, while waiting
or while its tokens stream, cancels its job, and the engine moves on to the next request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from dymoe.serve import api_errors
from dymoe.serve.api_errors import APIError
from dymoe.serve.config import ServeConfig
from dymoe.serve.metrics import ServerMetrics
from dymoe.serve.prompts import chat_prompt_ids, check_model, completion_prompt_ids, sampling_params
from dymoe.serve.responses import ChatShape, CompletionShape, sse
from dymoe.serve.scheduler import Finished, Job, Scheduler, job_events
from dymoe.serve.schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("dymoe.serve")

ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(engine, tokenizer, config: ServeConfig, engine_thread: bool = True) -> FastAPI:
    """An app serving ``engine`` (any :class:`~dymoe.engine.engine.Engine`, whatever its expert runtime).

    With ``engine_thread`` the app starts its own engine thread; without it the caller runs
    ``app.state.scheduler.run()`` on a thread of its choice (``dymoe serve``: the main one).
    """
    if tokenizer.has_chat_template:
        tokenizer.chat_template()  # compile once now: a broken template fails at start-up, not per request
    metrics = ServerMetrics(queue_length=lambda: scheduler.queued, busy=lambda: float(scheduler.busy),
                            experts=getattr(engine.model, "experts", None))
    scheduler = Scheduler(engine, tokenizer, metrics, config.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine_thread:
            scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="dymoe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics
    api_errors.install(app)
    app.add_middleware(RequestGuard, metrics=metrics)
    context_len = engine.model.context_len
    models = _Models(config.model_name, context_len)
    app.add_api_route("/v1/models", models.list, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", models.get, methods=["GET"])

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "busy": scheduler.busy, "queued": scheduler.queued}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = _parse(CompletionRequest, await read_json(request, config.max_body_bytes))
        check_model(body.model, config.model_name)
        ids = completion_prompt_ids(body, tokenizer)
        params = sampling_params(body, body.max_tokens, len(ids), context_len, config.sampling_defaults, "prompt")
        return await answer(request, ids, params, CompletionShape(config.model_name), body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = _parse(ChatCompletionRequest, await read_json(request, config.max_body_bytes))
        check_model(body.model, config.model_name)
        ids = chat_prompt_ids(body, tokenizer)
        params = sampling_params(body, body.max_new_tokens, len(ids), context_len, config.sampling_defaults,
                                 "messages")
        return await answer(request, ids, params, ChatShape(config.model_name), body)

    async def answer(request: Request, ids, params, shape, body):
        job = scheduler.submit(ids, params)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, scheduler, job))
        try:
            await scheduler.wait_for_turn(job, config.queue_timeout_s)
            if body.stream:
                watcher.cancel()  # from here Starlette's StreamingResponse listens for the disconnect
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return _EventStream(_stream(job, shape, include_usage), scheduler, job)
            text, finished = await _collect(job)
            return JSONResponse(shape.whole(text, finished))
        except BaseException:
            scheduler.cancel(job)
            raise
        finally:
            watcher.cancel()

    return app


class _Models:
    def __init__(self, name: str, context_len: int):
        self.card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "dymoe",
                     "max_model_len": context_len}

    async def list(self):
        return {"object": "list", "data": [self.card]}

    async def get(self, model_id: str):
        check_model(model_id, self.card["id"])
        return self.card


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object; 413 past ``limit`` bytes (declared or streamed), 400 if not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise _too_large(len(raw), limit)
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                       code="invalid_json") from None
    except UnicodeDecodeError:
        raise APIError(400, "the body is not valid JSON: it is not UTF-8 text", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the body must be a JSON object, got a JSON {type(body).__name__}", code="invalid_json")
    return body


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the body has {size} bytes or more; this server accepts at most {limit} "
                    "(dymoe serve --max-body-bytes)", code="body_too_large")


def _parse(schema: type[BaseModel], body: dict):
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        raise api_errors.from_validation(exc) from None


async def _cancel_on_disconnect(request: Request, scheduler: Scheduler, job: Job) -> None:
    """Wait for the client to hang up (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    scheduler.cancel(job)


async def _collect(job: Job) -> tuple[str, Finished]:
    pieces = []
    async for event in job_events(job):
        if isinstance(event, Finished):
            return "".join(pieces), event
        pieces.append(event)
    raise RuntimeError("the job ended without a Finished event")


async def _stream(job: Job, shape, include_usage: bool):
    for chunk in shape.opening_chunks():
        yield sse(chunk)
    try:
        async for event in job_events(job):
            if isinstance(event, Finished):
                yield sse(shape.chunk("", event.finish_reason))
                if include_usage:
                    yield sse(shape.usage_chunk(event))
            else:
                yield sse(shape.chunk(event))
    except Exception:  # the status line is sent already: report in the stream, OpenAI's way
        log.exception("generation failed while streaming")
        yield sse(APIError(500, "internal error during generation; the server log has the details").body())
    yield sse("[DONE]")


class _EventStream(StreamingResponse):
    """Server-sent events that cancel their job however the response ends (done, disconnect, error)."""

    def __init__(self, content, scheduler: Scheduler, job: Job):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._scheduler, self._job = scheduler, job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._scheduler.cancel(self._job)


class RequestGuard:
    """Pure ASGI middleware: counts answers by route and status, and turns a bug into a 500 answer.

    Starlette's own handler for ``Exception`` re-raises after answering, which made uvicorn reset the
    connection; here the traceback is logged and the client gets OpenAI's error JSON. (A pure ASGI
    middleware rather than BaseHTTPMiddleware, which would buffer the event streams.)
    """

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def send_counting(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if status is None:
                await APIError(500, "internal error while serving the request; the server log has the details"
                               ).response()(scope, receive, send_counting)
        finally:
            path = scope.get("path", "")
            route = path if path in ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
            self.metrics.request_answered(route, status or 500)
