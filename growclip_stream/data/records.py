"""Image-text records on the wire: codec and envelope validation.

Two wire formats (DESIGN §4):

- JSON value (UTF-8): ``{"id": str, "caption": str, "image": base64 of encoded JPEG/PNG/WebP, "ts"?: number}``
- binary value: the encoded image bytes, with Kafka headers ``id``, ``caption`` (UTF-8) and
  ``content-type`` (``image/jpeg``, ``image/png``, ``image/webp``), optionally ``ts``.

This module validates the envelope only (size, encoding, fields, types, base64, content type).
The image bytes themselves are checked by :func:`growclip_stream.data.images.decode_image`, which
produces the image reasons (``not_an_image``, ``truncated_image``, ``decompression_bomb``,
``bad_image``). Every failure is a :class:`RecordError` whose ``reason`` is one of :data:`REASONS`,
a stable code used for dead-letter headers and metrics labels.

Record ids may carry a repetition suffix after ``#`` (``"fmnist-train-000123#e1"`` is the second
pass over ``"fmnist-train-000123"``): it keeps ids unique when a finite dataset is streamed
repeatedly, and :func:`is_held_out` ignores it, so every repetition of a sample lands on the same
side of the train / held-out split.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pybase64

REASONS = (
    "too_large",
    "bad_utf8",
    "bad_json",
    "wrong_type",
    "missing_field",
    "empty_caption",
    "caption_too_long",
    "bad_base64",
    "bad_content_type",
    "not_an_image",
    "truncated_image",
    "decompression_bomb",
    "bad_image",
)

CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp")
# Non-standard spellings seen in the wild, mapped to the registered type.
_CONTENT_TYPE_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg"}

REPEAT_SEPARATOR = "#"
"""Separates a record id from its repetition suffix; see the module docstring."""

_MAX_ID_CHARS = 512


@dataclass(frozen=True)
class Record:
    id: str
    caption: str
    image: bytes  # encoded PNG / JPEG / WebP bytes, not pixels
    ts: float | None = None  # producer's timestamp (seconds since the epoch), when it sent one


@dataclass(frozen=True)
class RecordLimits:
    max_message_bytes: int = 2_000_000  # whole Kafka value (+ headers for the binary format)
    max_caption_chars: int = 1000
    max_image_pixels: int = 4_000_000  # width * height, checked from the header before decoding
    max_image_side: int = 4096  # longest side, likewise


class RecordError(ValueError):
    """A record that cannot be used. ``reason`` is one of :data:`REASONS`; ``detail`` is for humans."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown record error reason {reason!r}; expected one of {REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# encoding


def sniff_content_type(image: bytes) -> str:
    """The content type of encoded image bytes, from their magic number.

    Raises ``RecordError("not_an_image")`` for anything that is not PNG, JPEG or WebP.
    """
    if image.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if image.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(image) >= 12 and image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "image/webp"
    raise RecordError("not_an_image", "bytes are not PNG, JPEG or WebP")


def encode_json(rec: Record) -> bytes:
    obj: dict[str, Any] = {
        "id": rec.id,
        "caption": rec.caption,
        "image": base64.b64encode(rec.image).decode("ascii"),
    }
    if rec.ts is not None:
        obj["ts"] = rec.ts
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def encode_binary(rec: Record, content_type: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The record as (Kafka value, Kafka headers) in the binary format."""
    ctype = _normalise_content_type(content_type)
    if ctype is None:
        raise ValueError(f"content type {content_type!r} is not one of {CONTENT_TYPES}")
    headers = [
        ("id", rec.id.encode("utf-8")),
        ("caption", rec.caption.encode("utf-8")),
        ("content-type", ctype.encode("ascii")),
    ]
    if rec.ts is not None:
        headers.append(("ts", repr(float(rec.ts)).encode("ascii")))
    return rec.image, headers


# ---------------------------------------------------------------------------------------------
# decoding


def decode_json(value: bytes, limits: RecordLimits) -> Record:
    # orjson and pybase64 (C, SIMD) rather than json and base64: on the ingest path, reading the
    # envelope of a 20 KB record drops from ~82 to ~12 us (bench/decode_stages.py).
    _check_size(len(value), limits)
    try:
        obj = orjson.loads(value)  # also rejects invalid UTF-8, told apart below
    except orjson.JSONDecodeError as e:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as u:
            raise RecordError("bad_utf8", f"value is not UTF-8 at byte {u.start}") from None
        raise RecordError("bad_json", f"{e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(obj, dict):
        raise RecordError("wrong_type", f"value is a JSON {type(obj).__name__}, expected an object")

    rec_id = _check_id(_required_str(obj, "id"))
    caption = _check_caption(_required_str(obj, "caption"), limits)
    image_b64 = _required_str(obj, "image")
    try:
        image = pybase64.b64decode(image_b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RecordError("bad_base64", f"image is not valid base64: {e}") from None
    ts = obj.get("ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts)):
        raise RecordError("wrong_type", f"ts is {type(ts).__name__} {ts!r:.40}, expected a finite number")
    return Record(id=rec_id, caption=caption, image=image, ts=None if ts is None else float(ts))


def decode_binary(value: bytes, headers: Sequence[tuple[str, bytes]], limits: RecordLimits) -> Record:
    size = len(value) + sum(len(k) + len(v or b"") for k, v in headers)
    _check_size(size, limits)
    fields: dict[str, bytes | None] = {}
    for key, raw in headers:
        fields.setdefault(key, raw)  # first occurrence wins

    rec_id = _check_id(_header_str(fields, "id"))
    caption = _check_caption(_header_str(fields, "caption"), limits)
    ctype_raw = _header_str(fields, "content-type")
    if _normalise_content_type(ctype_raw) is None:
        raise RecordError("bad_content_type", f"content-type {ctype_raw!r:.80} is not one of {CONTENT_TYPES}")
    ts: float | None = None
    if fields.get("ts") is not None:
        ts_text = _header_str(fields, "ts")
        try:
            ts = float(ts_text)
        except ValueError:
            raise RecordError("wrong_type", f"ts header {ts_text!r:.40} is not a number") from None
        if not math.isfinite(ts):
            raise RecordError("wrong_type", f"ts header {ts_text!r:.40} is not finite")
    return Record(id=rec_id, caption=caption, image=bytes(value), ts=ts)


def decode_message(
    value: bytes | None, headers: Sequence[tuple[str, bytes]] | None, limits: RecordLimits
) -> Record:
    """Decodes a Kafka message: binary when a ``content-type`` header is present, else JSON."""
    if value is None:  # a tombstone
        raise RecordError("missing_field", "message has no value")
    headers = headers or ()
    if any(key == "content-type" for key, _ in headers):
        return decode_binary(value, headers, limits)
    return decode_json(value, limits)


# ---------------------------------------------------------------------------------------------
# held-out split


def is_held_out(record_id: str, fraction: float) -> bool:
    """Whether a record belongs to the held-out validation split.

    A stable hash (blake2b) of the id without its repetition suffix: the same answer in every
    process, run and Python version, and for every repetition of a sample.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1], got {fraction}")
    base_id = record_id.split(REPEAT_SEPARATOR, 1)[0]
    digest = hashlib.blake2b(base_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


# ---------------------------------------------------------------------------------------------
# helpers


def _check_size(size: int, limits: RecordLimits) -> None:
    if size > limits.max_message_bytes:
        raise RecordError("too_large", f"message is {size} bytes, limit {limits.max_message_bytes}")


def _required_str(obj: dict[str, Any], key: str) -> str:
    if key not in obj or obj[key] is None:
        raise RecordError("missing_field", f"field {key!r} is missing")
    val = obj[key]
    if not isinstance(val, str):
        raise RecordError("wrong_type", f"field {key!r} is {type(val).__name__}, expected a string")
    return val


def _header_str(fields: dict[str, bytes | None], key: str) -> str:
    raw = fields.get(key)
    if raw is None:
        raise RecordError("missing_field", f"header {key!r} is missing")
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError("bad_utf8", f"header {key!r} is not UTF-8 at byte {e.start}") from None


def _check_id(rec_id: str) -> str:
    if not rec_id:
        raise RecordError("missing_field", "id is empty")
    if len(rec_id) > _MAX_ID_CHARS:
        raise RecordError("too_large", f"id is {len(rec_id)} characters, limit {_MAX_ID_CHARS}")
    return rec_id


def _check_caption(caption: str, limits: RecordLimits) -> str:
    if not caption.strip():
        raise RecordError("empty_caption", "caption is empty or whitespace")
    if len(caption) > limits.max_caption_chars:
        raise RecordError(
            "caption_too_long", f"caption is {len(caption)} characters, limit {limits.max_caption_chars}"
        )
    return caption


def _normalise_content_type(content_type: str) -> str | None:
    ctype = content_type.split(";", 1)[0].strip().lower()
    ctype = _CONTENT_TYPE_ALIASES.get(ctype, ctype)
    return ctype if ctype in CONTENT_TYPES else None
