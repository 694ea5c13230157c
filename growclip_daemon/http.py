"""The HTTP API (DESIGN §4): health, metrics, embeddings, zero-shot ranking, model status, admin.

``build_app(state)`` is a pure factory: everything the app needs is in :class:`AppState`, so tests
build it around a small model and a fresh metrics registry, and nothing is global.

Model work runs in sync (``def``) endpoints, hence in the threadpool, never on the event loop;
a semaphore bounds how many requests run the model at once so that serving cannot starve the
trainer of CPU. Each request reads ``store.current`` once and answers with that snapshot only, so
a growth published mid-request never mixes two models in one answer; the answer names the model
it came from in its ``model`` field and in the ``X-Growclip-Model-Version`` header.

Request bodies are bounded twice: by the declared ``Content-Length`` before reading, and by the
bytes actually read (a chunked or lying client is cut off at the limit). Every error is a JSON
``{"error": {"message", "type", "code", "param"}}`` with a 4xx or 5xx status.

:class:`HttpServer` runs uvicorn in a thread around a socket it binds before returning from
``start``, so ``/healthz`` answers while the rest of the daemon is still starting.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from growclip_daemon.metrics import Metrics
from growclip_stream.data.records import RecordLimits
from growclip_stream.serving import ImageItemError, ModelSnapshot, SnapshotStore, json_safe

log = logging.getLogger(__name__)

MODEL_VERSION_HEADER = "X-Growclip-Model-Version"
MODEL_PREFIX = "growclip@"
ENCODING_FORMATS = ("float", "base64")

_EMBEDDINGS_FIELDS = frozenset({"input", "model", "encoding_format", "user", "dimensions"})
_RANK_FIELDS = frozenset({"image", "texts", "model"})
_PARSE_INLINE_BYTES = 256 * 1024  # request bodies smaller than this are parsed on the event loop
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class ServeLimits:
    max_request_bytes: int = 8 * 1024 * 1024  # whole request body, checked declared and as read
    max_items: int = 256  # inputs per embeddings request; texts per rank request
    max_text_chars: int = 4096  # per text; the tokenizer truncates far earlier, this bounds work
    records: RecordLimits = field(default_factory=RecordLimits)  # image pixel and side limits
    max_concurrent_inference: int = 2  # requests running the model at once; others queue


class Controls(Protocol):
    """What the admin routes may ask of the daemon. Each returns a JSON-safe dict for the client;
    raising :class:`ControlRejected` answers 409 with its message."""

    def request_grow(self) -> dict[str, Any]: ...
    def request_checkpoint(self) -> dict[str, Any]: ...
    def pause(self) -> dict[str, Any]: ...
    def resume(self) -> dict[str, Any]: ...


class ControlRejected(Exception):
    """The daemon cannot do what an admin route asked, now (already growing, stopping, ...)."""


@dataclass
class AppState:
    store: SnapshotStore
    metrics: Metrics
    limits: ServeLimits = field(default_factory=ServeLimits)
    controls: Controls | None = None
    admin_token: str | None = None  # None or empty: admin routes answer 403 "admin API disabled"
    status_extra: Callable[[], dict[str, Any]] | None = None  # merged into GET /v1/model


class ApiError(Exception):
    """An error answer: ``status`` and the OpenAI-style error object."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers


def error_response(
    status: int,
    message: str,
    code: str,
    *,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "code": code, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------
# app


def build_app(state: AppState) -> FastAPI:
    """The API around ``state``. Pure: no globals, no background tasks."""
    limits = state.limits
    metrics = state.metrics
    inference_slots = threading.BoundedSemaphore(limits.max_concurrent_inference)

    app = FastAPI(
        title="growclip-stream",
        summary="Embeddings from a CLIP-style model that trains and grows online.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(_RequestMetrics, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, param=exc.param, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(exc.status_code, message, code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, f"invalid request: {exc.errors()}", "invalid_request")

    async def json_body(request: Request) -> Any:
        """The request body parsed as JSON, read up to ``max_request_bytes``."""
        limit = limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                declared_bytes = int(declared)
            except ValueError:
                raise ApiError(
                    400, f"Content-Length {declared!r:.40} is not a number", "bad_request"
                ) from None
            if declared_bytes > limit:
                raise ApiError(
                    413, f"request body is {declared_bytes} bytes, limit {limit}", "request_too_large"
                )
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(
                        413, f"request body exceeds the limit of {limit} bytes", "request_too_large"
                    )
                chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(400, "client disconnected before sending the whole body", "bad_request") from None
        if size == 0:
            raise ApiError(400, "request body is empty; expected a JSON object", "invalid_json")
        data = b"".join(chunks)
        try:
            if len(data) < _PARSE_INLINE_BYTES:
                return json.loads(data)
            return await run_in_threadpool(json.loads, data)  # megabytes of JSON: keep the loop free
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_json") from None

    def require_snapshot() -> ModelSnapshot:
        snap = state.store.current
        if snap is None:
            raise ApiError(503, "no model is published yet; the trainer is starting", "model_not_ready")
        return snap

    def model_headers(snap: ModelSnapshot) -> dict[str, str]:
        return {MODEL_VERSION_HEADER: snap.version}

    # --- health and metrics -------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        snap = require_snapshot()
        return JSONResponse(
            {"status": "ready", "model": MODEL_PREFIX + snap.version}, headers=model_headers(snap)
        )

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        # On the event loop (it takes about a millisecond): a scrape must not queue behind model work
        # in the threadpool, or the metrics would go dark exactly when the API is busiest.
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- model routes -------------------------------------------------------------------------

    @app.post("/v1/embeddings")
    def embeddings(body: Any = Depends(json_body)) -> JSONResponse:
        snap = require_snapshot()
        with _versioned_errors(snap):
            req = _parse_embeddings(body, limits, snap)
            metrics.serve_batch_size.observe(len(req.items))
            with inference_slots:
                out = _embed_items(snap, req.items, limits)  # (N, D)
        if req.encoding_format == "base64":
            encoded: list[Any] = [
                base64.b64encode(row.numpy().astype("<f4").tobytes()).decode("ascii") for row in out
            ]
        else:
            encoded = out.tolist()
        texts = [item for item in req.items if isinstance(item, str)]
        tokens = sum(snap.text_token_counts(texts)) if texts else 0
        tokens += (len(req.items) - len(texts)) * snap.image_tokens  # patches and class token per image
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": emb} for i, emb in enumerate(encoded)
                ],
                "model": MODEL_PREFIX + snap.version,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            headers=model_headers(snap),
        )

    @app.post("/v1/rank")
    def rank(body: Any = Depends(json_body)) -> JSONResponse:
        snap = require_snapshot()
        with _versioned_errors(snap):
            image, texts = _parse_rank(body, limits)
            with inference_slots:
                try:
                    image_emb = snap.embed_images([image], limits.records)  # (1, D)
                except ImageItemError as e:
                    raise _bad_image(e, "image") from None
                text_emb = snap.embed_texts(texts)  # (N, D)
        scores = snap.logit_scale * (image_emb @ text_emb.T)[0]  # (N,)
        probabilities = torch.softmax(scores.double(), dim=0)
        return JSONResponse(
            {
                "object": "rank",
                "model": MODEL_PREFIX + snap.version,
                "scores": scores.tolist(),
                "probabilities": probabilities.tolist(),
            },
            headers=model_headers(snap),
        )

    @app.get("/v1/model")
    def model_status() -> JSONResponse:
        snap = require_snapshot()
        answer: dict[str, Any] = {"model": MODEL_PREFIX + snap.version}
        if state.status_extra is not None:
            try:
                answer.update(json_safe(state.status_extra()))
            except Exception as e:  # a broken status source must not take the model status down
                log.exception("status_extra failed")
                answer["status_error"] = f"{type(e).__name__}: {e}"
        answer.update(snap.describe())  # the snapshot's own fields win over any extra of that name
        return JSONResponse(answer, headers=model_headers(snap))

    # --- admin --------------------------------------------------------------------------------

    def require_admin(request: Request) -> Controls:
        token = state.admin_token
        if not token:
            raise ApiError(403, "admin API disabled: no admin token is configured", "admin_disabled")
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(
                401,
                "missing admin token: send 'Authorization: Bearer <token>'",
                "invalid_token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(401, "wrong admin token", "invalid_token", headers={"WWW-Authenticate": "Bearer"})
        if state.controls is None:
            raise ApiError(503, "daemon controls are not attached", "controls_unavailable")
        return state.controls

    def run_control(name: str, action: Callable[[], dict[str, Any]]) -> JSONResponse:
        try:
            result = action()
        except ControlRejected as e:
            raise ApiError(409, f"{name} rejected: {e}", "conflict") from None
        return JSONResponse({"action": name, "result": json_safe(result)})

    @app.post("/admin/grow")
    def admin_grow(controls: Controls = Depends(require_admin)) -> JSONResponse:
        return run_control("grow", controls.request_grow)

    @app.post("/admin/checkpoint")
    def admin_checkpoint(controls: Controls = Depends(require_admin)) -> JSONResponse:
        return run_control("checkpoint", controls.request_checkpoint)

    @app.post("/admin/pause")
    def admin_pause(controls: Controls = Depends(require_admin)) -> JSONResponse:
        return run_control("pause", controls.pause)

    @app.post("/admin/resume")
    def admin_resume(controls: Controls = Depends(require_admin)) -> JSONResponse:
        return run_control("resume", controls.resume)

    return app


# ---------------------------------------------------------------------------------------------
# request parsing


@dataclass(frozen=True)
class _EmbeddingsRequest:
    items: list[str | bytes]  # in input order: a text, or the encoded bytes of an image
    encoding_format: str


def _embed_items(snap: ModelSnapshot, items: list[str | bytes], limits: ServeLimits) -> torch.Tensor:
    """(N, D) embeddings of mixed texts and images, in item order: one batch per modality."""
    text_at = [i for i, item in enumerate(items) if isinstance(item, str)]
    image_at = [i for i, item in enumerate(items) if isinstance(item, bytes)]
    texts = [item for item in items if isinstance(item, str)]
    images = [item for item in items if isinstance(item, bytes)]
    out = torch.empty((len(items), snap.arch.embed_dim), dtype=torch.float32)  # (N, D)
    if images:
        try:
            out[image_at] = snap.embed_images(images, limits.records)
        except ImageItemError as e:
            raise _bad_image(e, f"input[{image_at[e.index]}]") from None
    if texts:
        out[text_at] = snap.embed_texts(texts)
    return out


@contextmanager
def _versioned_errors(snap: ModelSnapshot) -> Iterator[None]:
    """Errors raised while answering from ``snap`` name its version too, like its answers do."""
    try:
        yield
    except ApiError as e:
        e.headers = {**(e.headers or {}), MODEL_VERSION_HEADER: snap.version}
        raise


def _parse_embeddings(body: Any, limits: ServeLimits, snap: ModelSnapshot) -> _EmbeddingsRequest:
    if not isinstance(body, dict):
        raise ApiError(400, f"request body is a JSON {_json_type(body)}, expected an object", "wrong_type")
    unknown = sorted(set(body) - _EMBEDDINGS_FIELDS)
    if unknown:
        raise ApiError(
            400, f"unknown field(s) {unknown}; accepted: {sorted(_EMBEDDINGS_FIELDS)}", "unknown_field"
        )
    _check_model_field(body)
    encoding_format = body.get("encoding_format", "float")
    if encoding_format not in ENCODING_FORMATS:
        raise ApiError(
            400,
            f"encoding_format {encoding_format!r:.40} is not one of {list(ENCODING_FORMATS)}",
            "bad_encoding_format",
            param="encoding_format",
        )
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != snap.arch.embed_dim:
        raise ApiError(
            400,
            f"dimensions {dimensions!r:.40} is not supported; this model embeds in {snap.arch.embed_dim}",
            "bad_dimensions",
            param="dimensions",
        )
    if "input" not in body:
        raise ApiError(400, "field 'input' is missing", "missing_field", param="input")
    raw = body["input"]
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif isinstance(raw, list):
        items = raw
    else:
        raise ApiError(
            400,
            f"input is a JSON {_json_type(raw)}; expected a string or a list of strings and image objects",
            "wrong_type",
            param="input",
        )
    if not items:
        raise ApiError(400, "input is an empty list", "empty_input", param="input")
    if len(items) > limits.max_items:
        raise ApiError(
            400, f"input has {len(items)} items, limit {limits.max_items}", "too_many_items", param="input"
        )
    parsed: list[str | bytes] = []
    for i, item in enumerate(items):
        where = "input" if isinstance(raw, str) else f"input[{i}]"
        if isinstance(item, str):
            _check_text(item, where, limits)
            parsed.append(item)
        elif isinstance(item, dict):
            if set(item) != {"image"}:
                raise ApiError(
                    400,
                    f"{where} is an object with keys {sorted(item)}; an image item is {{'image': base64}}",
                    "wrong_type",
                    param=where,
                )
            parsed.append(_decode_base64_image(item["image"], where))
        elif (isinstance(item, int) and not isinstance(item, bool)) or isinstance(item, list):
            raise ApiError(
                400,
                f"{where}: token arrays are not supported; send text as strings",
                "wrong_type",
                param=where,
            )
        else:
            raise ApiError(
                400,
                f"{where} is a JSON {_json_type(item)}; expected a string or {{'image': base64}}",
                "wrong_type",
                param=where,
            )
    return _EmbeddingsRequest(parsed, encoding_format)


def _parse_rank(body: Any, limits: ServeLimits) -> tuple[bytes, list[str]]:
    if not isinstance(body, dict):
        raise ApiError(400, f"request body is a JSON {_json_type(body)}, expected an object", "wrong_type")
    unknown = sorted(set(body) - _RANK_FIELDS)
    if unknown:
        raise ApiError(400, f"unknown field(s) {unknown}; accepted: {sorted(_RANK_FIELDS)}", "unknown_field")
    _check_model_field(body)
    for name in ("image", "texts"):
        if name not in body:
            raise ApiError(400, f"field {name!r} is missing", "missing_field", param=name)
    image = _decode_base64_image(body["image"], "image")
    texts = body["texts"]
    if not isinstance(texts, list):
        raise ApiError(
            400,
            f"texts is a JSON {_json_type(texts)}, expected a list of strings",
            "wrong_type",
            param="texts",
        )
    if not texts:
        raise ApiError(400, "texts is an empty list", "empty_input", param="texts")
    if len(texts) > limits.max_items:
        raise ApiError(
            400, f"texts has {len(texts)} items, limit {limits.max_items}", "too_many_items", param="texts"
        )
    for i, text in enumerate(texts):
        where = f"texts[{i}]"
        if not isinstance(text, str):
            raise ApiError(
                400, f"{where} is a JSON {_json_type(text)}, expected a string", "wrong_type", param=where
            )
        _check_text(text, where, limits)
    return image, texts


def _check_model_field(body: dict[str, Any]) -> None:
    # Any name is accepted (OpenAI clients always send one); the answer names the model used.
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(
            400, f"model is a JSON {_json_type(model)}, expected a string", "wrong_type", param="model"
        )


def _check_text(text: str, where: str, limits: ServeLimits) -> None:
    if not text:
        raise ApiError(400, f"{where} is an empty string", "empty_input", param=where)
    if len(text) > limits.max_text_chars:
        raise ApiError(
            400,
            f"{where} is {len(text)} characters, limit {limits.max_text_chars}",
            "text_too_long",
            param=where,
        )


def _decode_base64_image(value: Any, where: str) -> bytes:
    """Bytes of a base64 string or a ``data:<type>;base64,<data>`` URI."""
    if not isinstance(value, str):
        raise ApiError(
            400,
            f"{where}: image is a JSON {_json_type(value)}, expected a base64 string",
            "wrong_type",
            param=where,
        )
    data = value
    if data.startswith("data:"):
        header, sep, data = data.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(
                400, f"{where}: a data URI must be 'data:<type>;base64,<data>'", "bad_base64", param=where
            )
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{where}: image is not valid base64 ({e})", "bad_base64", param=where) from None
    if not decoded:
        raise ApiError(400, f"{where}: image is empty", "empty_input", param=where)
    return decoded


def _bad_image(e: ImageItemError, where: str) -> ApiError:
    return ApiError(400, f"{where}: bad image ({e.reason}): {e.cause.detail}", e.reason, param=where)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# ---------------------------------------------------------------------------------------------
# request metrics


class _RequestMetrics:
    """ASGI middleware: counts every HTTP request by route template, method and status code, and
    times it. The route is the matched template (``/v1/embeddings``), ``unmatched`` otherwise, so
    a client probing random paths cannot grow the label set.

    It also turns an unexpected exception into a JSON 500 (logged with its traceback here; the
    client gets the exception type only). Answering here, rather than letting the exception reach
    the server, keeps the client's connection open for its next request.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.http_in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        except Exception as exc:
            log.exception("unhandled error answering %s %s", scope.get("method"), scope.get("path"))
            if status is not None:  # the answer has begun: nothing to do but drop the connection
                raise
            response = error_response(500, f"internal error ({type(exc).__name__})", "internal_error")
            await response(scope, receive, send_status)
        finally:
            self.metrics.http_in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "OTHER")
            method = method if method in _KNOWN_METHODS else "OTHER"
            code = str(status if status is not None else 500)
            self.metrics.http_requests.labels(route=route, method=method, code=code).inc()
            self.metrics.http_latency.labels(route=route).observe(time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# server


class HttpServer:
    """uvicorn serving ``app`` from a thread. ``start`` binds (``port`` 0 picks a free port) and
    listens before it returns; ``stop`` finishes in-flight requests and joins the thread."""

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        *,
        graceful_timeout_s: float = 5.0,
        start_timeout_s: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self._app = app
        self._graceful_timeout_s = graceful_timeout_s
        self._start_timeout_s = start_timeout_s
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("HttpServer already started")
            sock = _listen(self.host, self.port)
            self.port = sock.getsockname()[1]
            config = uvicorn.Config(
                self._app,
                log_config=None,  # leave logging to the daemon; uvicorn logs through its loggers
                access_log=False,  # requests are counted in metrics; no log line per request
                timeout_graceful_shutdown=max(1, round(self._graceful_timeout_s)),
                server_header=False,
            )
            server = uvicorn.Server(config)
            thread = threading.Thread(
                target=server.run, kwargs={"sockets": [sock]}, name="http-server", daemon=True
            )
            self._sock, self._server, self._thread = sock, server, thread
            thread.start()
            deadline = time.monotonic() + self._start_timeout_s
            while not server.started:
                if not thread.is_alive():
                    self._release()
                    raise RuntimeError(f"HTTP server on {self.host}:{self.port} failed to start")
                if time.monotonic() > deadline:
                    self._stop_locked()
                    raise RuntimeError(f"HTTP server on {self.host}:{self.port} did not start in time")
                time.sleep(0.01)
            log.info("HTTP API listening on %s:%d", self.host, self.port)

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(self._graceful_timeout_s + 5.0)
        if thread.is_alive():  # a request that will not finish: cut the connections
            server.force_exit = True
            thread.join(5.0)
        if thread.is_alive():
            log.error("HTTP server thread did not stop")
        self._release()

    def _release(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._server = None
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def _listen(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        # Lets a restarted daemon bind the port while old connections sit in TIME_WAIT. (It does
        # not let two live servers share a port: that needs SO_REUSEPORT.)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock
