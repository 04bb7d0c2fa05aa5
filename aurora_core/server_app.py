"""The ASGI application of ``aurora serve``: routes, limits, the JSON error model and HTTP metrics.

``create_app(pipeline, ServerConfig())`` returns a FastAPI app that serves one ``Pipeline``. It knows
nothing about sockets or signals (that is ``aurora_core.server``), so tests and users can mount it in
any ASGI server.

Every response to ``/v1/classify`` is either a prediction or one JSON error body::

    {"request_id": "...", "error": {"code": "corrupt_image", "reason": "truncated", "status": 422,
                                    "message": "..."}}

``code`` is stable and coarse: the class-level ``reason`` of an ``aurora_core.errors`` error, or one
of ``SERVER_CODES``. ``reason`` is the finer stable cause the error carries (equal to ``code`` when
there is none). A stack trace is logged on the server, never sent.

Connections are not this app's business: ``aurora_core.server`` caps and sheds them (see
``server_connections``) and answers a connection refused at its cap with this module's JSON 503
``too_many_connections``. A request that is not HTTP gets uvicorn's plain-text 400.

Admission is the pipeline's queue. The body is read asynchronously on the event loop before the
request is submitted, so a slow client holds one coroutine and one connection slot, never a
pipeline slot or a thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from dataclasses import dataclass

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from aurora_core import errors
from aurora_core.records import STAGES

log = logging.getLogger("aurora_core.server")

#: Error codes the server itself produces, with their HTTP status. Pipeline errors add their ``reason``.
SERVER_CODES: dict[str, int] = {
    "malformed_request": 400,
    "empty_body": 400,
    "malformed_multipart": 400,
    "missing_image": 400,
    "not_found": 404,
    "method_not_allowed": 405,
    "body_timeout": 408,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "too_many_requests": 503,
    "too_many_connections": 503,
    "not_ready": 503,
    "internal_error": 500,
}

# Statuses a client may retry after a pause; they carry Retry-After.
_RETRYABLE = {503}
_PROBE_PATHS = {"/healthz", "/readyz", "/metrics"}
_KNOWN_PATHS = {"/v1/classify", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"}
_RAW_TYPES = {"application/octet-stream", ""}
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_MAX_MULTIPART_PARTS = 16
# Generated request ids: a random per-process prefix and a counter. uuid4 costs an urandom syscall
# per request, which measured 0.5 ms on this loaded box.
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"


@dataclass
class ServerConfig:
    """Limits and timeouts of the HTTP server (all overridable from ``aurora serve`` flags)."""

    max_body_bytes: int = 16 << 20        # 413 above this, from Content-Length or while streaming
    request_timeout_s: float = 5.0        # default deadline of one inference (504 after it)
    max_request_timeout_s: float = 30.0   # cap on a client's ``timeout_ms``
    body_timeout_s: float = 10.0          # whole body must arrive within this (408 otherwise)
    max_concurrent_requests: int = 256    # in-flight /v1/classify requests, body reading included
    retry_after_s: int = 1                # Retry-After on 503
    top_k: int = 5                        # default k returned; never more than the pipeline computes

    def __post_init__(self):
        for name in ("max_body_bytes", "max_concurrent_requests", "top_k", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerConfig: expected {name} >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "max_request_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerConfig: expected {name} > 0, got {getattr(self, name)}")


class HTTPError(Exception):
    """A request that ends in a JSON error; ``code`` is stable, ``message`` is for humans."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class ClassifyClass(BaseModel):
    class_index: int
    probability: float


class ClassifyResponse(BaseModel):
    request_id: str
    top_k: list[ClassifyClass]
    timings: dict[str, float | int | str] = Field(
        description="milliseconds per stage (queue, decode, preprocess, h2d, compute, d2h, total, "
        "server_total) plus batch_id, batch_size, bucket, queue_depth and device"
    )


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, machine-readable: " + ", ".join(sorted(SERVER_CODES)) + ", or the "
                      "class of an aurora_core error (image_error, unsupported_format, corrupt_image, "
                      "image_too_large, overloaded, deadline_exceeded, device_lost, resource_exhausted, "
                      "pipeline_closed)")
    reason: str = Field(description="the finer stable cause (e.g. 'truncated', 'too_many_pixels'); "
                        "equals code when there is none")
    status: int
    message: str


class ErrorBody(BaseModel):
    request_id: str
    error: ErrorDetail


_ERROR_RESPONSES = {
    s: {"model": ErrorBody, "description": d}
    for s, d in {
        400: "malformed request", 408: "body not received in time", 413: "body or image over the limit",
        415: "unsupported media type or image format", 422: "corrupt image",
        500: "internal error", 503: "overloaded, not ready or device lost (see Retry-After)",
        504: "deadline passed",
    }.items()
}

_CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "description": "the encoded image (JPEG or PNG) as the raw body, or a multipart form with a file "
                       "field named 'image' (or 'file')",
        "content": {
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": {"type": "string", "format": "binary"}},
                    "required": ["image"],
                }
            },
        },
    }
}


def error_response(status: int, code: str, message: str, request_id: str, retry_after: int | None = None,
                   reason: str | None = None):
    headers = {"X-Request-Id": request_id}
    if status in _RETRYABLE and retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    body = {"request_id": request_id,
            "error": {"code": code, "reason": reason or code, "status": status, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def _request_id(scope) -> str:
    for k, v in scope.get("headers", ()):
        if k == b"x-request-id":
            rid = v.decode("latin-1")
            if _REQUEST_ID_RE.match(rid):
                return rid
            break
    return new_request_id()


class _Metrics:
    """HTTP-level metrics; pipeline-level ones come from the Prometheus exporter sharing the registry."""

    def __init__(self, registry: CollectorRegistry, pipeline, state):
        self.requests = Counter("aurora_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=registry)
        self.latency = Histogram("aurora_http_request_duration_seconds", "HTTP request latency by route",
                                 ["route"], registry=registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.in_flight = Gauge("aurora_http_in_flight_requests", "classify requests in flight",
                               registry=registry)
        ready = Gauge("aurora_server_ready", "1 when /readyz answers 200", registry=registry)
        ready.set_function(lambda: 1.0 if state.is_ready() else 0.0)
        depth = Gauge("aurora_server_queue_depth", "requests waiting in the pipeline queue", registry=registry)
        depth.set_function(lambda: float(_safe(pipeline.queue_depth, -1)))


def _safe(fn, default):
    try:
        return fn()
    except Exception:  # a scrape or a probe must never fail because the pipeline is closing
        return default


class _State:
    """What the probes report. ``draining`` is set on SIGTERM; ``fault`` by the device watchdog."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.draining = False
        self.fault: str | None = None
        self.in_flight = 0

    def is_ready(self) -> bool:
        return not self.draining and self.fault is None and bool(_safe(lambda: self.pipeline.ready, False))


class _Guard:
    """Outermost ASGI layer: request id, the in-flight cap, metrics and the last-resort 500.

    It is pure ASGI (not BaseHTTPMiddleware) so it adds no task or thread per request and sees the
    response status as it is sent.
    """

    def __init__(self, app, state: _State, metrics: _Metrics, config: ServerConfig):
        self.app, self.state, self.metrics, self.config = app, state, metrics, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid
        path = scope["path"]
        route = path if path in _KNOWN_PATHS else "other"
        started = False
        status = 0
        t0 = time.perf_counter()

        async def send_wrapper(message):
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
            await send(message)

        capped = path not in _PROBE_PATHS
        if capped and self.state.in_flight >= self.config.max_concurrent_requests:
            resp = error_response(503, "too_many_requests", "too many concurrent requests; retry later", rid,
                                  self.config.retry_after_s)
            await resp(scope, receive, send_wrapper)
            self._observe(route, status, t0)
            return
        if capped:
            self.state.in_flight += 1
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            log.exception("unhandled error on %s (request %s)", path, rid)
            if not started:
                try:
                    await error_response(500, "internal_error", "internal error", rid)(scope, receive, send_wrapper)
                except Exception:  # the client is gone; nothing left to tell it
                    pass
        finally:
            if capped:
                self.state.in_flight -= 1
                self.metrics.in_flight.dec()
            self._observe(route, status, t0)

    def _observe(self, route, status, t0):
        # 499: the client went away before any response was sent (nginx's convention).
        self.metrics.requests.labels(route, str(status or 499)).inc()
        self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, refusing more than ``limit`` bytes before reading them in full.

    Content-Length is checked first; a chunked or lying body is counted as it streams and reading
    stops at the first byte over the limit.
    """
    cl = request.headers.get("content-length")
    if cl is not None:
        if not cl.isdigit():
            raise HTTPError(400, "malformed_request", "Content-Length is not a number")
        if int(cl) > limit:
            raise HTTPError(413, "body_too_large", f"body of {int(cl)} bytes exceeds the limit of {limit}")

    async def _read() -> bytes:
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise HTTPError(413, "body_too_large", f"body exceeds the limit of {limit} bytes")
        return bytes(buf)

    try:
        return await asyncio.wait_for(_read(), timeout_s)
    except asyncio.TimeoutError:
        raise HTTPError(408, "body_timeout", f"body not received within {timeout_s:g} s") from None


def extract_multipart_image(content_type: str, body: bytes) -> bytes:
    """The image of a multipart/form-data body: the part named 'image' or 'file', else the first file.

    Parsed in memory (the body is already bounded by the size limit): no temporary files and no
    thread pool, so file descriptors and threads stay flat however many uploads arrive.
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPError(400, "malformed_multipart", "multipart body without a boundary parameter")
    parts: list[tuple[dict[bytes, bytes], bytearray]] = []
    hdr = {"field": bytearray(), "value": bytearray()}
    ended = []

    def on_part_begin():
        if len(parts) >= _MAX_MULTIPART_PARTS:
            raise HTTPError(400, "malformed_multipart", f"more than {_MAX_MULTIPART_PARTS} parts")
        parts.append(({}, bytearray()))

    def on_header_field(data, start, end):
        hdr["field"] += data[start:end]

    def on_header_value(data, start, end):
        hdr["value"] += data[start:end]

    def on_header_end():
        parts[-1][0][bytes(hdr["field"]).lower()] = bytes(hdr["value"])
        hdr["field"], hdr["value"] = bytearray(), bytearray()

    def on_part_data(data, start, end):
        parts[-1][1].extend(data[start:end])

    callbacks = {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_part_data": on_part_data, "on_end": lambda: ended.append(True),
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError) as e:
        raise HTTPError(400, "malformed_multipart", f"malformed multipart body: {e}") from None
    if not ended:
        raise HTTPError(400, "malformed_multipart", "multipart body ends before its closing boundary")
    chosen = None
    for headers, data in parts:
        _, disp = parse_options_header(headers.get(b"content-disposition", b""))
        name = disp.get(b"name", b"")
        if name in (b"image", b"file"):
            chosen = data
            break
        if chosen is None and b"filename" in disp:
            chosen = data
    if chosen is None:
        raise HTTPError(400, "missing_image", "multipart body has no 'image' field and no file part")
    return bytes(chosen)


def _timings(record, server_ns: int) -> dict:
    out: dict[str, float | int | str] = {}
    if record is not None:
        for stage in STAGES:
            ns = record.stage_ns(stage)
            if ns >= 0:
                out[f"{stage}_ms"] = round(ns / 1e6, 4)
        for f in ("batch_id", "batch_size", "bucket", "queue_depth", "device"):
            out[f] = getattr(record, f)
    out["server_total_ms"] = round(server_ns / 1e6, 4)
    return out


async def _until_disconnect(request: Request) -> None:
    """Return when the client disconnects (after the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _top_k_json(top_k):
    return [{"class_index": int(c), "probability": float(p)} for c, p in top_k]


def create_app(pipeline, config: ServerConfig | None = None, *, registry: CollectorRegistry | None = None) -> FastAPI:
    """The FastAPI app serving ``pipeline``. ``registry`` is exposed at /metrics (a fresh one if None).

    ``app.state.server`` is the ``_State`` the probes read; ``aurora_core.server`` sets ``draining`` on
    SIGTERM and ``fault`` from its device watchdog.
    """
    config = config or ServerConfig()
    registry = registry if registry is not None else CollectorRegistry()
    state = _State(pipeline)
    metrics = _Metrics(registry, pipeline, state)

    app = FastAPI(
        title="aurora_core reference server",
        description="Image classification over HTTP with dynamic batching. Errors share one JSON schema "
                    "with a stable `code`.",
        version=_version(),
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.server = state
    app.state.config = config

    def rid_of(request: Request) -> str:
        return request.scope.get("state", {}).get("request_id") or new_request_id()

    @app.exception_handler(StarletteHTTPException)
    async def _http_exc(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "malformed_request")
        status = exc.status_code if code != "malformed_request" else 400
        return error_response(status, code, str(exc.detail), rid_of(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        msgs = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return error_response(400, "malformed_request", msgs or "invalid request", rid_of(request))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.error("internal error (request %s)", rid_of(request), exc_info=exc)
        return error_response(500, "internal_error", "internal error", rid_of(request))

    @app.get("/healthz", summary="liveness: the process serves HTTP")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz", summary="readiness: model warmed up, device healthy, not draining",
             responses={503: {"model": ErrorBody}})
    async def readyz(request: Request):
        if state.is_ready():
            return {"status": "ready"}
        why = "draining" if state.draining else (state.fault or "pipeline not ready")
        return error_response(503, "not_ready", why, rid_of(request), config.retry_after_s)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/classify", summary="classify one image", response_model=ClassifyResponse,
              responses=_ERROR_RESPONSES, openapi_extra=_CLASSIFY_BODY)
    async def classify(
        request: Request,
        k: int | None = Query(None, ge=1, le=1000, description="classes to return (default and maximum: the server's top-k)"),
        timeout_ms: int | None = Query(None, ge=1, le=3_600_000, description="deadline; capped by the server"),
        priority: int = Query(0, ge=0, le=1, description="0 normal, 1 high"),
    ):
        t0 = time.monotonic_ns()
        rid = rid_of(request)
        try:
            data = await _read_image(request, config)
            timeout = config.request_timeout_s if timeout_ms is None else timeout_ms / 1000
            timeout = min(timeout, config.max_request_timeout_s)
            pred = await _infer(request, pipeline, data, timeout, priority)
            if pred is None:  # the client left; nobody reads this response
                return Response(status_code=499)
        except HTTPError as e:
            return error_response(e.status, e.code, e.message, rid, config.retry_after_s)
        except errors.AuroraError as e:
            # code: the error's class (stable, few); reason: the finer cause the decoder names.
            return error_response(e.http_status, type(e).reason, str(e), rid, config.retry_after_s, reason=e.reason)
        except ClientDisconnect:
            return Response(status_code=499)
        top = _top_k_json(pred.top_k[: (k or config.top_k)])
        return JSONResponse(
            {"request_id": rid, "top_k": top, "timings": _timings(pred.timings, time.monotonic_ns() - t0)},
            headers={"X-Request-Id": rid},
        )

    app.add_middleware(_Guard, state=state, metrics=metrics, config=config)
    return app


async def _read_image(request: Request, config: ServerConfig) -> bytes:
    ctype_full = request.headers.get("content-type", "")
    ctype = ctype_full.split(";", 1)[0].strip().lower()
    multipart = ctype == "multipart/form-data"
    if not (multipart or ctype in _RAW_TYPES or ctype.startswith("image/")):
        raise HTTPError(415, "unsupported_media_type",
                        f"Content-Type {ctype!r} is not accepted; send image bytes or multipart/form-data")
    body = await read_body(request, config.max_body_bytes, config.body_timeout_s)
    if multipart:
        body = extract_multipart_image(ctype_full, body)
    if not body:
        raise HTTPError(400, "empty_body", "the request carries no image bytes")
    return body


async def _infer(request: Request, pipeline, data: bytes, timeout: float, priority: int):
    """The prediction, or None when the client disconnected first (then the request is cancelled,
    and the pipeline never computes it if it has not started)."""
    try:
        fut = pipeline.submit(data, timeout=timeout, priority=priority)
    except (ValueError, TypeError) as e:  # e.g. a priority level this pipeline does not have
        raise HTTPError(400, "malformed_request", str(e)) from None
    afut = asyncio.wrap_future(fut)
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        # The pipeline enforces the deadline; the margin only guards against a pipeline that hangs.
        done, _ = await asyncio.wait({afut, gone}, timeout=timeout + max(1.0, timeout),
                                     return_when=asyncio.FIRST_COMPLETED)
        if afut in done:
            return afut.result()
        fut.cancel()
        if gone in done:
            return None
        raise errors.DeadlineExceeded(f"classify: no result within {timeout:g} s")
    finally:
        gone.cancel()
        if not afut.done():
            afut.cancel()
        elif not afut.cancelled():
            afut.exception()  # mark retrieved: a late error after a disconnect is not worth a log line


def _version() -> str:
    from aurora_core import __version__

    return __version__


__all__ = ["ServerConfig", "HTTPError", "create_app", "error_response", "read_body",
           "extract_multipart_image", "SERVER_CODES"]
