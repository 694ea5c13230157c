"""Record codec: round trips, one crafted bad input per rejection reason, the held-out split."""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from growclip_stream.data.images import decode_image
from growclip_stream.data.records import (
    REASONS,
    Record,
    RecordError,
    RecordLimits,
    decode_binary,
    decode_json,
    decode_message,
    encode_binary,
    encode_json,
    is_held_out,
)

LIMITS = RecordLimits()


def png_bytes(width: int = 16, height: int = 12, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed, tiny PNG whose header claims width x height (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def png_with_corrupt_pixels() -> bytes:
    """A complete PNG (IEND present, CRCs valid) whose compressed pixel data is garbage."""
    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0)
    idat = b"\x78\x9c" + bytes(range(7, 200, 3))  # zlib header, then not a deflate stream
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def json_value(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def check(value: bytes, headers: list[tuple[str, bytes]] | None = None, limits: RecordLimits = LIMITS) -> str:
    """Runs the full decode (envelope, then image) and returns 'ok' or the rejection reason."""
    try:
        rec = decode_message(value, headers, limits)
        decode_image(rec.image, limits)
    except RecordError as e:
        assert e.reason in REASONS
        assert e.detail
        return e.reason
    return "ok"


GOOD_PNG = png_bytes()
GOOD_B64 = base64.b64encode(GOOD_PNG).decode()
GOOD = {"id": "r1", "caption": "a red square", "image": GOOD_B64}

# reason -> a crafted message (value, headers) of that kind
BAD_INPUTS: dict[str, Callable[[], tuple[bytes, list[tuple[str, bytes]] | None]]] = {
    "too_large": lambda: (json_value(**GOOD, pad="x" * LIMITS.max_message_bytes), None),
    "bad_utf8": lambda: (b'{"id": "r1", "caption": "caf\xe9", "image": ""}', None),
    "bad_json": lambda: (b'{"id": "r1", "caption": ', None),
    "wrong_type": lambda: (json_value(id="r1", caption=["a", "list"], image=GOOD_B64), None),
    "missing_field": lambda: (json_value(id="r1", image=GOOD_B64), None),
    "empty_caption": lambda: (json_value(id="r1", caption="  \n", image=GOOD_B64), None),
    "caption_too_long": lambda: (json_value(id="r1", caption="w" * 1001, image=GOOD_B64), None),
    "bad_base64": lambda: (json_value(id="r1", caption="c", image="not*base64!"), None),
    "bad_content_type": lambda: (
        GOOD_PNG,
        [("id", b"r1"), ("caption", b"c"), ("content-type", b"image/gif")],
    ),
    "not_an_image": lambda: (
        json_value(id="r1", caption="c", image=base64.b64encode(np.random.bytes(500)).decode()),
        None,
    ),
    "truncated_image": lambda: (
        json_value(id="r1", caption="c", image=base64.b64encode(GOOD_PNG[: len(GOOD_PNG) // 2]).decode()),
        None,
    ),
    "decompression_bomb": lambda: (
        json_value(id="r1", caption="c", image=base64.b64encode(png_claiming(100_000, 100_000)).decode()),
        None,
    ),
    "bad_image": lambda: (
        json_value(id="r1", caption="c", image=base64.b64encode(png_with_corrupt_pixels()).decode()),
        None,
    ),
}


def test_every_reason_has_a_crafted_input() -> None:
    assert set(BAD_INPUTS) == set(REASONS)


@pytest.mark.parametrize("reason", REASONS)
def test_crafted_bad_input_gives_its_reason(reason: str) -> None:
    value, headers = BAD_INPUTS[reason]()
    assert check(value, headers) == reason


def test_good_inputs_pass() -> None:
    assert check(json_value(**GOOD)) == "ok"
    value, headers = encode_binary(Record("r1", "a caption", GOOD_PNG), "image/png")
    assert check(value, headers) == "ok"


def test_json_round_trip() -> None:
    rec = Record(
        id="fmnist-train-000001", caption="un café, s'il vous plaît", image=GOOD_PNG, ts=1700000000.25
    )
    assert decode_json(encode_json(rec), LIMITS) == rec
    no_ts = Record(id="x", caption="y", image=GOOD_PNG)
    assert decode_json(encode_json(no_ts), LIMITS) == no_ts
    assert "ts" not in json.loads(encode_json(no_ts))


def test_binary_round_trip() -> None:
    rec = Record(id="x-1", caption="ünïcode caption", image=GOOD_PNG, ts=12.5)
    value, headers = encode_binary(rec, "image/png")
    assert value == GOOD_PNG
    assert dict(headers)["content-type"] == b"image/png"
    assert decode_binary(value, headers, LIMITS) == rec
    assert decode_message(value, headers, LIMITS) == rec  # picks binary: content-type header present
    with pytest.raises(ValueError):
        encode_binary(rec, "image/gif")


def test_message_without_content_type_is_json() -> None:
    rec = Record(id="x", caption="y", image=GOOD_PNG)
    assert decode_message(encode_json(rec), [("trace", b"abc")], LIMITS) == rec


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"[1, 2]", "wrong_type"),
        (b'"a string"', "wrong_type"),
        (json_value(id=7, caption="c", image=GOOD_B64), "wrong_type"),
        (json_value(id="r", caption="c", image=12), "wrong_type"),
        (json_value(id="r", caption="c", image=GOOD_B64, ts="yesterday"), "wrong_type"),
        (json_value(id="r", caption="c", image=GOOD_B64, ts=True), "wrong_type"),
        (json_value(id="", caption="c", image=GOOD_B64), "missing_field"),
        (json_value(caption="c", image=GOOD_B64), "missing_field"),
        (json_value(id="r", caption="c"), "missing_field"),
        (json_value(id="r", caption=None, image=GOOD_B64), "missing_field"),
        (b"", "bad_json"),
        (b"\xff\xfe{}", "bad_utf8"),
        (b"[" * 100_000, "bad_json"),
    ],
)
def test_json_envelope_errors(value: bytes, reason: str) -> None:
    with pytest.raises(RecordError) as err:
        decode_json(value, LIMITS)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([("caption", b"c"), ("content-type", b"image/png")], "missing_field"),
        ([("id", b"r"), ("content-type", b"image/png")], "missing_field"),
        ([("id", b"r"), ("caption", b"\xc3\x28"), ("content-type", b"image/png")], "bad_utf8"),
        ([("id", b"r"), ("caption", b""), ("content-type", b"image/png")], "empty_caption"),
        ([("id", b"r"), ("caption", b"c"), ("content-type", b"text/plain")], "bad_content_type"),
        ([("id", b"r"), ("caption", b"c"), ("content-type", b"image/png"), ("ts", b"noon")], "wrong_type"),
    ],
)
def test_binary_envelope_errors(headers: list[tuple[str, bytes]], reason: str) -> None:
    with pytest.raises(RecordError) as err:
        decode_binary(GOOD_PNG, headers, LIMITS)
    assert err.value.reason == reason


def test_binary_content_type_is_normalised() -> None:
    headers = [("id", b"r"), ("caption", b"c"), ("content-type", b"Image/JPG; q=1")]
    assert decode_binary(GOOD_PNG, headers, LIMITS).id == "r"


def test_size_limit_counts_the_whole_message() -> None:
    small = RecordLimits(max_message_bytes=len(GOOD_PNG) + 10)
    value, headers = encode_binary(Record("r1", "a long enough caption", GOOD_PNG), "image/png")
    with pytest.raises(RecordError) as err:
        decode_binary(value, headers, small)
    assert err.value.reason == "too_large"


def test_tombstone_is_rejected() -> None:
    with pytest.raises(RecordError) as err:
        decode_message(None, None, LIMITS)
    assert err.value.reason == "missing_field"


def test_unknown_reason_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown record error reason"):
        RecordError("no_such_reason", "x")


def test_held_out_hits_the_fraction() -> None:
    ids = [f"rec-{i}" for i in range(20_000)]
    for fraction in (0.0, 0.05, 0.2, 1.0):
        share = sum(is_held_out(i, fraction) for i in ids) / len(ids)
        assert abs(share - fraction) < 0.01, (fraction, share)
    # nested: a record held out at 5% is held out at 20% too
    assert all(is_held_out(i, 0.2) for i in ids if is_held_out(i, 0.05))
    with pytest.raises(ValueError):
        is_held_out("x", 1.5)


def test_held_out_ignores_the_repetition_suffix() -> None:
    ids = [f"fmnist-train-{i:06d}" for i in range(2000)]
    assert [is_held_out(i, 0.1) for i in ids] == [is_held_out(f"{i}#e3", 0.1) for i in ids]


def test_held_out_is_stable_across_processes() -> None:
    ids = [f"id-{i}" for i in range(300)]
    here = [is_held_out(i, 0.3) for i in ids]
    code = (
        "import json, sys; from growclip_stream.data.records import is_held_out; "
        f"print(json.dumps([is_held_out(f'id-{{i}}', 0.3) for i in range({len(ids)})]))"
    )
    # a different hash seed proves the answer does not come from Python's salted hash()
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    assert json.loads(out.stdout) == here
    # and a pinned value: the split must never change between releases
    assert [is_held_out(f"id-{i}", 0.3) for i in range(12)] == PINNED_HELD_OUT


PINNED_HELD_OUT = [False, False, True, False, False, False, True, True, True, False, True, False]
