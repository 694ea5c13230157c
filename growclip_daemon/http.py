"""The HTTP API (DESIGN §4): health, metrics, embeddings, models, zero-shot ranking, model status, admin.

``build_app(state)`` is a pure factory: everything the app needs is in :class:`AppState`, so tests
build it around a small model and a fresh metrics registry, and nothing is global. The app owns
one :class:`~growclip_daemon.batching.Batcher` per modality, started and stopped with the server.

Every route is ``async`` and never blocks the event loop: model work is queued to the batchers'
threads and awaited; large bodies are parsed, and admin actions run, in the threadpool. So
``/healthz``, ``/readyz``, ``/metrics``, ``/v1/model`` and the admin routes answer while the
embedding queues are full. When they are, embedding requests are refused at once with 429 (queue
full) or 503 (deadline), with ``Retry-After``, instead of piling up.

Each request takes one snapshot (the current one, or the older generation it pins with
``model: growclip@N``) and answers with that snapshot only, so a growth published mid-request
never mixes two models in one answer; the answer names the model in its ``model`` field and in
the ``X-Growclip-Model-Version`` header.

Request bodies are bounded twice: by the declared ``Content-Length`` before reading, and by the
bytes actually read (a chunked or lying client is cut off at the limit); the images of one request
by their total pixels (read from their headers before any decoding). Every error is OpenAI's
shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx or 5xx status.

:class:`HttpServer` runs uvicorn in a thread around a socket it binds before returning from
``start``, so ``/healthz`` answers while the rest of the daemon is still starting.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from growclip_daemon import openapi
from growclip_daemon.batching import Batcher, BatchLimits, Overloaded
from growclip_daemon.metrics import Metrics
from growclip_stream.data.records import RecordLimits
from growclip_stream.serving import (
    ImageItemError,
    ModelSnapshot,
    SnapshotStore,
    TokenIds,
    claimed_pixels,
    json_safe,
)

log = logging.getLogger(__name__)

MODEL_VERSION_HEADER = "X-Growclip-Model-Version"
KEEP_ALIVE_S = 75  # seconds an idle client connection is kept open
MODEL_NAME = "growclip"
MODEL_PREFIX = MODEL_NAME + "@"
ENCODING_FORMATS = ("float", "base64")
BYTE_TOKEN_MAX = 255  # token ids are the byte tokenizer's: the UTF-8 bytes 0..255

_EMBEDDINGS_FIELDS = frozenset({"input", "model", "encoding_format", "user", "dimensions"})
_RANK_FIELDS = frozenset({"image", "texts", "model"})
_PARSE_INLINE_BYTES = 256 * 1024  # request bodies smaller than this are parsed on the event loop
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}

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
    records: RecordLimits = field(default_factory=RecordLimits)  # per-image pixel and side limits (data.*)
    max_request_pixels: int = 16_000_000  # all images of one request together, from their headers
    batch: BatchLimits = field(default_factory=BatchLimits)  # dynamic batching and queue bounds
    device: str = "cpu"  # where the batchers run the model (a CUDA device gets its own stream)


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
    drift_status: Callable[[], dict[str, Any]] | None = None  # GET /v1/model "drift"


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


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    if status >= 500:
        return "server_error"
    return _ERROR_TYPES.get(status, "invalid_request_error")


def error_response(
    status: int,
    message: str,
    code: str,
    *,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _json(body: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)


# ---------------------------------------------------------------------------------------------
# app


def build_app(state: AppState) -> FastAPI:
    """The API around ``state``. Pure: no globals; its batcher threads live as long as the server."""
    limits = state.limits
    metrics = state.metrics
    device = torch.device(limits.device)
    text_batcher: Batcher[str | TokenIds] = Batcher(
        "text",
        prepare=_prepare_texts,
        forward=_forward_texts,
        limits=limits.batch,
        metrics=metrics,
        device=device,
    )
    image_batcher: Batcher[bytes] = Batcher(
        "image",
        prepare=lambda snap, images: snap.decode_images(images, limits.records),
        forward=_forward_images,
        limits=limits.batch,
        metrics=metrics,
        device=device,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        text_batcher.start()
        image_batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(text_batcher.close)
            await run_in_threadpool(image_batcher.close)

    app = FastAPI(
        title="growclip-stream",
        summary="Embeddings from a CLIP-style model that trains and grows online.",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
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

    async def json_body(request: Request) -> tuple[Any, int]:
        """The request body parsed as JSON, read up to ``max_request_bytes``, and its size."""
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
                return json.loads(data), size
            return await run_in_threadpool(json.loads, data), size  # megabytes: keep the loop free
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_json") from None

    async def off_loop_if_large(size: int, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` inline for small bodies, in the threadpool for large ones (base64 of MBs)."""
        if size < _PARSE_INLINE_BYTES:
            return fn(*args)
        return await run_in_threadpool(fn, *args)

    def require_snapshot() -> ModelSnapshot:
        snap = state.store.current
        if snap is None:
            raise ApiError(503, "no model is published yet; the trainer is starting", "model_not_ready")
        return snap

    def choose_snapshot(body: Any) -> ModelSnapshot:
        """The snapshot a request asked for: the current one, or a held one it pins."""
        snap = require_snapshot()
        model = body.get("model") if isinstance(body, dict) else None
        if model is None:
            return snap
        if not isinstance(model, str):
            raise ApiError(
                400,
                f"model is a JSON {_json_type(model)}, expected a string",
                "wrong_type",
                param="model",
                headers=model_headers(snap),
            )
        if not model.startswith(MODEL_PREFIX):
            return snap  # any other name means the current model (OpenAI clients always send one)
        pinned = state.store.get(model[len(MODEL_PREFIX) :])
        if pinned is None:
            held = [MODEL_PREFIX + str(s.generation) for s in state.store.held()]
            raise ApiError(
                404,
                f"model {model!r:.60} is not served (any more); held: {held} "
                f"(serve.keep_versions generations are kept)",
                "model_not_found",
                param="model",
                headers={MODEL_VERSION_HEADER: snap.version},
            )
        return pinned

    def model_headers(snap: ModelSnapshot) -> dict[str, str]:
        return {MODEL_VERSION_HEADER: snap.version}

    async def embed(
        snap: ModelSnapshot, texts: Sequence[str | TokenIds], images: Sequence[bytes]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Embeddings of ``texts`` and ``images`` from the batchers, awaited concurrently."""
        try:
            text_job = text_batcher.submit(snap, texts) if texts else None
            image_job = image_batcher.submit(snap, images) if images else None
        except Overloaded as e:
            raise _overloaded(e) from None
        text_out: torch.Tensor | None = None
        image_out: torch.Tensor | None = None
        try:
            if text_job is not None:
                text_out = await asyncio.wrap_future(text_job)
            if image_job is not None:
                image_out = await asyncio.wrap_future(image_job)
        except Overloaded as e:
            raise _overloaded(e) from None
        return text_out, image_out

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
        # On the event loop (it takes about a millisecond): a scrape must not queue behind any work.
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- model routes -------------------------------------------------------------------------

    def model_card(snap: ModelSnapshot, model_id: str) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": int(snap.published_at),
            "owned_by": "growclip-stream",
            "version": snap.version,
            "generation": snap.generation,
            "embed_dim": snap.arch.embed_dim,
        }

    def model_list() -> list[dict[str, Any]]:
        snap = require_snapshot()
        cards = [model_card(snap, MODEL_NAME)]  # the alias that always follows the newest model
        cards += [model_card(s, MODEL_PREFIX + str(s.generation)) for s in reversed(state.store.held())]
        return cards

    @app.get("/v1/models", openapi_extra=openapi.MODELS)
    async def models() -> Response:
        return _json({"object": "list", "data": model_list()})

    @app.get("/v1/models/{model_id}", openapi_extra=openapi.MODEL)
    async def model_by_id(model_id: str) -> Response:
        for card in model_list():
            if card["id"] == model_id:
                return _json(card)
        raise ApiError(404, f"model {model_id!r:.60} is not served", "model_not_found", param="model")

    @app.post("/v1/embeddings", openapi_extra=openapi.EMBEDDINGS)
    async def embeddings(request: Request) -> Response:
        body, size = await json_body(request)
        snap = choose_snapshot(body)
        with _versioned_errors(snap):
            req = await off_loop_if_large(size, _parse_embeddings, body, limits, snap)
            text_at = [i for i, item in enumerate(req.items) if not isinstance(item, bytes)]
            image_at = [i for i, item in enumerate(req.items) if isinstance(item, bytes)]
            texts = [req.items[i] for i in text_at]
            images = [req.items[i] for i in image_at]
            try:
                text_out, image_out = await embed(snap, texts, images)
            except ImageItemError as e:
                raise _bad_image(e, f"input[{image_at[e.index]}]") from None
        out = np.empty((len(req.items), snap.arch.embed_dim), dtype=np.float32)  # (N, D)
        if text_out is not None:
            out[text_at] = text_out.numpy()
        if image_out is not None:
            out[image_at] = image_out.numpy()
        if (
            req.dimensions is not None and req.dimensions != out.shape[1]
        ):  # pragma: no cover - refused at parse
            raise ApiError(400, "dimensions", "bad_dimensions")
        encoded: list[Any]
        if req.encoding_format == "base64":
            encoded = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in out]
        else:
            encoded = out.tolist()
        tokens = sum(snap.text_token_counts(texts)) if texts else 0
        tokens += len(images) * snap.image_tokens  # patches and class token per image
        return _json(
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

    @app.post("/v1/rank", openapi_extra=openapi.RANK)
    async def rank(request: Request) -> Response:
        body, size = await json_body(request)
        snap = choose_snapshot(body)
        with _versioned_errors(snap):
            image, texts = await off_loop_if_large(size, _parse_rank, body, limits)
            try:
                text_emb, image_emb = await embed(snap, texts, [image])
            except ImageItemError as e:
                raise _bad_image(e, "image") from None
        assert text_emb is not None and image_emb is not None  # both were submitted
        scores = snap.logit_scale * (image_emb @ text_emb.T)[0]  # (N,)
        probabilities = torch.softmax(scores.double(), dim=0)
        return _json(
            {
                "object": "rank",
                "model": MODEL_PREFIX + snap.version,
                "scores": scores.tolist(),
                "probabilities": probabilities.tolist(),
            },
            headers=model_headers(snap),
        )

    @app.get("/v1/model", openapi_extra=openapi.MODEL_STATUS)
    async def model_status() -> Response:
        snap = require_snapshot()
        answer: dict[str, Any] = {"model": MODEL_PREFIX + snap.version}
        if state.status_extra is not None:
            try:
                answer.update(json_safe(state.status_extra()))
            except Exception as e:  # a broken status source must not take the model status down
                log.exception("status_extra failed")
                answer["status_error"] = f"{type(e).__name__}: {e}"
        answer.update(snap.describe())  # the snapshot's own fields win over any extra of that name
        answer["serving"] = {
            "versions_held": [MODEL_PREFIX + s.version for s in state.store.held()],
            "keep_versions": state.store.keep_versions,
            "batching": limits.batch.batching,
            "max_batch_items": limits.batch.max_batch_items,
            "queued_items": {"text": text_batcher.queued_items, "image": image_batcher.queued_items},
            "gil_switch_interval_ms": round(sys.getswitchinterval() * 1000, 3),  # see serve.* of that name
        }
        if state.drift_status is not None:
            try:
                answer["drift"] = json_safe(state.drift_status())
            except Exception as e:
                log.exception("drift_status failed")
                answer["drift"] = {"error": f"{type(e).__name__}: {e}"}
            _merge_drift_into_history(answer)
        _merge_evaluation_into_history(answer)
        return _json(answer, headers=model_headers(snap))

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

    async def run_control(request: Request, name: str) -> Response:
        controls = require_admin(request)
        action: Callable[[], dict[str, Any]] = {
            "grow": controls.request_grow,
            "checkpoint": controls.request_checkpoint,
            "pause": controls.pause,
            "resume": controls.resume,
        }[name]
        try:
            result = await run_in_threadpool(action)  # a checkpoint waits for the training thread
        except ControlRejected as e:
            raise ApiError(409, f"{name} rejected: {e}", "conflict") from None
        return _json({"action": name, "result": json_safe(result)})

    @app.post("/admin/grow", openapi_extra=openapi.ADMIN)
    async def admin_grow(request: Request) -> Response:
        return await run_control(request, "grow")

    @app.post("/admin/checkpoint", openapi_extra=openapi.ADMIN)
    async def admin_checkpoint(request: Request) -> Response:
        return await run_control(request, "checkpoint")

    @app.post("/admin/pause", openapi_extra=openapi.ADMIN)
    async def admin_pause(request: Request) -> Response:
        return await run_control(request, "pause")

    @app.post("/admin/resume", openapi_extra=openapi.ADMIN)
    async def admin_resume(request: Request) -> Response:
        return await run_control(request, "resume")

    return app


def _overloaded(e: Overloaded) -> ApiError:
    return ApiError(
        e.status,
        str(e),
        "rate_limit_exceeded" if e.status == 429 else "overloaded",
        headers={"Retry-After": e.retry_after},
    )


def _merge_drift_into_history(answer: dict[str, Any]) -> None:
    """Each growth event in ``growth_history`` gets the drift measured when its generation was
    first served (``drift.by_generation``), so the history says how far each growth moved things."""
    drift = answer.get("drift")
    by_generation = drift.get("by_generation", {}) if isinstance(drift, dict) else {}
    for event in answer.get("growth_history") or []:
        if isinstance(event, dict):
            found = by_generation.get(str(event.get("generation")))
            if found is not None:
                event["drift"] = found


def _merge_evaluation_into_history(answer: dict[str, Any]) -> None:
    """Each growth event in ``growth_history`` gets the first evaluation of the generation it
    produced (``evaluation.by_generation``, from the evaluator in ``status_extra``)."""
    evaluation = answer.get("evaluation")
    by_generation = evaluation.get("by_generation", {}) if isinstance(evaluation, dict) else {}
    for event in answer.get("growth_history") or []:
        if isinstance(event, dict) and (found := by_generation.get(str(event.get("generation")))):
            event["evaluation"] = found


# ---------------------------------------------------------------------------------------------
# model work (on the batchers' threads)


def _prepare_texts(snap: ModelSnapshot, texts: Sequence[str | TokenIds]) -> torch.Tensor:
    return snap.tokenize(texts)


def _forward_texts(snap: ModelSnapshot, tokens: torch.Tensor) -> torch.Tensor:
    return snap.embed_tokens(tokens)


def _forward_images(snap: ModelSnapshot, pixels: torch.Tensor) -> torch.Tensor:
    return snap.embed_pixels(pixels)


# ---------------------------------------------------------------------------------------------
# request parsing


@dataclass(frozen=True)
class _EmbeddingsRequest:
    items: list[str | TokenIds | bytes]  # in input order: a text, token ids, or an image's bytes
    encoding_format: str
    dimensions: int | None


@contextmanager
def _versioned_errors(snap: ModelSnapshot) -> Iterator[None]:
    """Errors raised while answering from ``snap`` name its version too, like its answers do."""
    try:
        yield
    except ApiError as e:
        e.headers = {**(e.headers or {}), MODEL_VERSION_HEADER: snap.version}
        raise


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(value: list[Any], where: str) -> TokenIds:
    """A token array: ids of the byte tokenizer (UTF-8 bytes 0..255). Ids of other tokenizers
    (e.g. tiktoken's, which some OpenAI clients send) mean nothing to this model: 400."""
    if not value:
        raise ApiError(400, f"{where} is an empty token array", "empty_input", param=where)
    for j, tok in enumerate(value):
        if not _is_int(tok):
            raise ApiError(
                400,
                f"{where}[{j}] is a JSON {_json_type(tok)}; a token array holds integers",
                "wrong_type",
                param=where,
            )
        if not 0 <= tok <= BYTE_TOKEN_MAX:
            raise ApiError(
                400,
                f"{where}[{j}] = {tok}: token ids are this model's byte tokenizer's (UTF-8 bytes "
                f"0..{BYTE_TOKEN_MAX}); ids of another tokenizer (e.g. tiktoken) cannot be read, "
                "send the text as a string",
                "bad_token_id",
                param=where,
            )
    return TokenIds(value)


def _parse_embeddings(body: Any, limits: ServeLimits, snap: ModelSnapshot) -> _EmbeddingsRequest:
    if not isinstance(body, dict):
        raise ApiError(400, f"request body is a JSON {_json_type(body)}, expected an object", "wrong_type")
    unknown = sorted(set(body) - _EMBEDDINGS_FIELDS)
    if unknown:
        raise ApiError(
            400, f"unknown field(s) {unknown}; accepted: {sorted(_EMBEDDINGS_FIELDS)}", "unknown_field"
        )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(
            400, f"user is a JSON {_json_type(user)}, expected a string", "wrong_type", param="user"
        )
    encoding_format = body.get("encoding_format", "float")
    if encoding_format is None:
        encoding_format = "float"
    if encoding_format not in ENCODING_FORMATS:
        raise ApiError(
            400,
            f"encoding_format {encoding_format!r:.40} is not one of {list(ENCODING_FORMATS)}",
            "bad_encoding_format",
            param="encoding_format",
        )
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if not _is_int(dimensions) or dimensions < 1:
            raise ApiError(
                400,
                f"dimensions {dimensions!r:.40} is not a positive integer",
                "bad_dimensions",
                param="dimensions",
            )
        if dimensions != snap.arch.embed_dim:
            raise ApiError(
                400,
                f"dimensions {dimensions} is not supported: this model embeds in {snap.arch.embed_dim} "
                "dimensions and was not trained for shorter (nested) embeddings, so a truncated "
                f"vector would not be a meaningful embedding; omit dimensions or send {snap.arch.embed_dim}",
                "bad_dimensions",
                param="dimensions",
            )
    if "input" not in body:
        raise ApiError(400, "field 'input' is missing", "missing_field", param="input")
    raw = body["input"]
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif isinstance(raw, list) and raw and all(_is_int(x) for x in raw):
        items = [raw]  # one token array
    elif isinstance(raw, list):
        items = raw
    else:
        raise ApiError(
            400,
            f"input is a JSON {_json_type(raw)}; expected a string, a token array, or a list of "
            "strings, token arrays and image objects",
            "wrong_type",
            param="input",
        )
    if not items:
        raise ApiError(400, "input is an empty list", "empty_input", param="input")
    if len(items) > limits.max_items:
        raise ApiError(
            400, f"input has {len(items)} items, limit {limits.max_items}", "too_many_items", param="input"
        )
    single = not isinstance(raw, list) or items[0] is raw
    parsed: list[str | TokenIds | bytes] = []
    pixels = 0
    for i, item in enumerate(items):
        where = "input" if single else f"input[{i}]"
        if isinstance(item, str):
            _check_text(item, where, limits)
            parsed.append(item)
        elif isinstance(item, list):
            parsed.append(_token_ids(item, where))
        elif isinstance(item, dict):
            if set(item) != {"image"}:
                raise ApiError(
                    400,
                    f"{where} is an object with keys {sorted(item)}; an image item is {{'image': base64}}",
                    "wrong_type",
                    param=where,
                )
            data = _decode_base64_image(item["image"], where)
            pixels += claimed_pixels(data)
            if pixels > limits.max_request_pixels:
                raise ApiError(
                    400,
                    f"the images up to {where} hold {pixels} pixels, over the limit of "
                    f"{limits.max_request_pixels} per request (serve.max_request_pixels); send fewer "
                    "or smaller images",
                    "too_many_pixels",
                    param=where,
                )
            parsed.append(data)
        else:
            raise ApiError(
                400,
                f"{where} is a JSON {_json_type(item)}; expected a string, a token array or "
                "{'image': base64}",
                "wrong_type",
                param=where,
            )
    return _EmbeddingsRequest(parsed, encoding_format, dimensions)


def _parse_rank(body: Any, limits: ServeLimits) -> tuple[bytes, list[str]]:
    if not isinstance(body, dict):
        raise ApiError(400, f"request body is a JSON {_json_type(body)}, expected an object", "wrong_type")
    unknown = sorted(set(body) - _RANK_FIELDS)
    if unknown:
        raise ApiError(400, f"unknown field(s) {unknown}; accepted: {sorted(_RANK_FIELDS)}", "unknown_field")
    for name in ("image", "texts"):
        if name not in body:
            raise ApiError(400, f"field {name!r} is missing", "missing_field", param=name)
    image = _decode_base64_image(body["image"], "image")
    pixels = claimed_pixels(image)
    if pixels > limits.max_request_pixels:
        raise ApiError(
            400,
            f"image holds {pixels} pixels, over the limit of {limits.max_request_pixels} per request",
            "too_many_pixels",
            param="image",
        )
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


CONTROL_ROUTES = frozenset({"/healthz", "/readyz", "/metrics", "/v1/model", "/v1/models"})
CONTROL_PREFIXES = ("/v1/models/", "/admin/")


def control_only(app: ASGIApp) -> ASGIApp:
    """``app`` answering only the control routes (``CONTROL_ROUTES`` and under ``CONTROL_PREFIXES``);
    any other path gets 404 naming the main port. For the control listener: its loop never parses
    an embedding request, so a probe there waits only for its turn at the GIL."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path not in CONTROL_ROUTES and not path.startswith(CONTROL_PREFIXES):
            message = f"{path[:80]!r} is not a control route; it is served on serve.port"
            await error_response(404, message, "not_found")(scope, receive, send)
            return
        await app(scope, receive, send)

    return wrapped


class HttpServer:
    """uvicorn serving ``app`` from a thread. ``start`` binds (``port`` 0 picks a free port) and
    listens before it returns; ``stop`` finishes in-flight requests and joins the thread.
    ``lifespan`` False: the app's startup and shutdown are another server's (the same app served
    twice starts its batchers once)."""

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        *,
        lifespan: bool = True,
        name: str = "http-server",
        graceful_timeout_s: float = 5.0,
        start_timeout_s: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self._app = app
        self._lifespan = lifespan
        self._name = name
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
                # Longer than clients' idle-connection expiry (httpx: 5 s, load balancers: 60 s), so
                # the server never closes a kept-alive connection just as a client reuses it.
                timeout_keep_alive=KEEP_ALIVE_S,
                server_header=False,
                lifespan="auto" if self._lifespan else "off",
            )
            server = uvicorn.Server(config)
            thread = threading.Thread(
                target=server.run, kwargs={"sockets": [sock]}, name=self._name, daemon=True
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
            log.info("%s listening on %s:%d", self._name, self.host, self.port)

    @property
    def alive(self) -> bool:
        """Whether the server thread runs (a watchdog checks it)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

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
