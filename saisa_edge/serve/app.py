"""The FastAPI application: routes, authentication, bounded bodies, errors in OpenAI's shape."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from saisa_edge.errors import SaisaError
from saisa_edge.inputs.image import preprocess
from saisa_edge.runtime.batcher import Slot
from saisa_edge.runtime.session import PromptTooLong, Request, Session, check_context
from saisa_edge.serve import protocol as proto
from saisa_edge.serve.images import decode_image, image_bytes
from saisa_edge.serve.metrics import Metrics
from saisa_edge.serve.protocol import ApiError, ChatRequest
from saisa_edge.serve.scheduler import Scheduler, Ticket
from saisa_edge.strict import loads_json


@dataclass(frozen=True)
class ServeOptions:
    """Everything `saisa-edge serve` sets beside the model (see the package docstring)."""

    model_name: str = "saisa-edge"
    max_batch: int = 8
    max_queue: int = 64
    max_prefill_tokens: int = 512
    timeout_s: float = 600.0
    api_key: str | None = None
    allow_local_images: Path | None = None
    max_body_bytes: int = 32 << 20
    max_image_bytes: int = 20 << 20
    default_max_tokens: int = 256


def create_app(session: Session, options: ServeOptions = ServeOptions()) -> FastAPI:
    """An OpenAI-compatible app around `session`; its scheduler thread runs while the app does."""
    metrics = Metrics()
    scheduler = Scheduler(session, metrics, options.max_batch, options.max_queue, options.max_prefill_tokens,
                          options.timeout_s)
    _register_gauges(metrics, scheduler, session)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="saisa-edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.options = scheduler, metrics, options

    def count(status: str) -> None:
        with metrics.lock:
            metrics.requests.inc(status)

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, e: ApiError) -> JSONResponse:
        if request.url.path == "/v1/chat/completions":
            count(str(e.status))
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers())

    @app.exception_handler(SaisaError)
    async def bad_input(request: HttpRequest, e: SaisaError) -> JSONResponse:
        too_long = isinstance(e, PromptTooLong)
        return await api_error(request, ApiError(413 if too_long else 400, str(e), "prompt_too_long" if too_long else None))

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, e: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal(request: HttpRequest, e: Exception) -> JSONResponse:
        return await api_error(request, ApiError(500, f"internal error ({type(e).__name__})"))

    def authorize(request: HttpRequest) -> None:
        if options.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
            raise ApiError(401, "invalid API key: send `Authorization: Bearer KEY`", "invalid_api_key")

    page = _page()

    @app.get("/")
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.alive
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: HttpRequest) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": options.model_name, "object": "model", "created": 0,
                                            "owned_by": "saisa-edge"}]}

    def prepare(chat: ChatRequest) -> tuple[list[int], Request]:
        """Image decoding and preprocessing, the prompt's ids and its fit (a worker thread's job)."""
        pixels = None
        if chat.image is not None:
            cfg = session.backend.config
            img = decode_image(image_bytes(chat.image, options.max_image_bytes, options.allow_local_images))
            pixels = preprocess(img, cfg.vision, cfg.mm.pads_images)
        template = session.template if chat.system is None else replace(session.template, system=chat.system)
        ids = session.tokenizer.encode(template.prompt(chat.turns))
        check_context(session.backend, ids, pixels is not None)
        return ids, Request(chat.question, pixels, chat.params, chat.max_tokens or options.default_max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest) -> Response:
        authorize(request)
        chat = proto.parse_chat(loads_json(await _body(request, options.max_body_bytes), "request body"))
        if chat.model is not None and chat.model != options.model_name:
            raise ApiError(404, f"model {chat.model!r} is not served here; GET /v1/models lists "
                                f"{options.model_name!r}", "model_not_found")
        ids, req = await run_in_threadpool(prepare, chat)
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        def emit(kind: str, payload: Any) -> None:  # called on the scheduler's thread
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        ticket = scheduler.submit(ids, req, chat.stop, emit)
        cid = proto.completion_id()
        if chat.stream:
            return StreamingResponse(_stream(ticket, events, cid, chat), media_type="text/event-stream")
        while True:
            try:
                kind, payload = await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    scheduler.cancel(ticket)
                    count("cancelled")
                    return Response(status_code=499)
                continue
            if kind == "error":
                raise payload
            if kind == "done":
                usage, saisa = _finished(payload)
                count("200")
                return JSONResponse(proto.completion(cid, options.model_name, payload.result, usage, saisa))

    def _finished(slot: Slot) -> tuple[dict[str, int], dict[str, Any]]:
        """Usage and the `saisa` extension of a finished request; its metrics recorded."""
        result = slot.result
        assert result is not None
        visual = session.backend.config.num_visual_tokens if slot.request.pixels is not None else 0
        usage = proto.usage(result, visual)
        with metrics.lock:
            metrics.tokens.inc(by=usage["completion_tokens"])
            metrics.prompt_tokens.inc(by=usage["prompt_tokens"])
            if result.visual_cache != "none":
                metrics.cache.inc(result.visual_cache)
            if "first_token" in result.timings_ms:
                metrics.ttft.observe(result.timings_ms["first_token"] / 1000)
        return usage, proto.extension(result, slot.prefix_reused)

    async def _stream(ticket: Ticket, events: asyncio.Queue[tuple[str, Any]], cid: str,
                      chat: ChatRequest) -> AsyncIterator[str]:
        model, ended = options.model_name, False
        try:
            yield _sse(proto.chunk(cid, model, {"role": "assistant", "content": ""}))
            while True:
                kind, payload = await events.get()
                if kind == "text":
                    yield _sse(proto.chunk(cid, model, {"content": payload}))
                    continue
                ended = True
                if kind == "done":
                    usage, saisa = _finished(payload)
                    assert payload.result is not None
                    yield _sse(proto.chunk(cid, model, {}, payload.result.finish_reason, {"saisa": saisa}))
                    if chat.include_usage:
                        yield _sse(proto.chunk(cid, model, None, extra={"usage": usage}))
                    count("200")
                else:
                    error = payload if isinstance(payload, ApiError) else ApiError(500, "internal error")
                    count(str(error.status))
                    yield _sse(error.body())
                yield "data: [DONE]\n\n"
                return
        finally:
            if not ended:  # the client went away (the response task was cancelled)
                scheduler.cancel(ticket)
                count("cancelled")

    return app


def _page() -> str:
    """The chat page (one static file, bundled as package data like saisa_edge/assets)."""
    path = resources.files("saisa_edge.serve").joinpath("static", "chat.html")
    if not path.is_file():
        raise SaisaError(f"{path}: bundled data is missing; reinstall saisa-edge")
    return path.read_text("utf-8")


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _body(request: HttpRequest, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is over `limit` bytes, declared or sent."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body over {limit >> 20} MiB", "body_too_large")
    chunks, n = [], 0
    async for piece in request.stream():
        n += len(piece)
        if n > limit:
            raise ApiError(413, f"request body over {limit >> 20} MiB", "body_too_large")
        chunks.append(piece)
    return b"".join(chunks)


def _register_gauges(metrics: Metrics, scheduler: Scheduler, session: Session) -> None:
    metrics.gauge("saisa_queue_depth", "Requests waiting to join the batch.", lambda: len(scheduler.queue))
    metrics.gauge("saisa_running_requests", "Requests in the batch (prefill or decode).", lambda: scheduler.running)
    cache = session.cache
    if cache is None:
        return
    stats = cache.stats
    metrics.gauge("saisa_visual_cache_hits_total", "Visual K/V cache hits (a wait on another request's "
                  "computation of the same image included).", lambda: stats.hits, "counter")
    metrics.gauge("saisa_visual_cache_misses_total", "Visual K/V computations (vision + visual K/V).",
                  lambda: stats.misses, "counter")
    metrics.gauge("saisa_visual_cache_evictions_total", "Entries evicted from memory.", lambda: stats.evictions,
                  "counter")
    metrics.gauge("saisa_visual_cache_bytes", "Bytes of visual K/V held in memory.", lambda: cache.nbytes)
    metrics.gauge("saisa_visual_cache_entries", "Images held in memory.", lambda: len(cache))
