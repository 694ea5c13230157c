"""Safe image decode and the deterministic image -> tensor transform."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from growclip_stream.data.images import ImageTransform, decode_image
from growclip_stream.data.records import RecordError, RecordLimits

LIMITS = RecordLimits()


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed, tiny PNG whose header claims width x height."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def encoded(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(1)
    shape = (height, width, len(mode)) if mode != "L" else (height, width)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8).squeeze(), mode=mode)


def reason_of(data: bytes, limits: RecordLimits = LIMITS) -> str:
    with pytest.raises(RecordError) as err:
        decode_image(data, limits)
    return err.value.reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decodes_supported_formats(fmt: str) -> None:
    img = decode_image(encoded(noise(40, 30), fmt), LIMITS)
    assert img.size == (40, 30)
    assert np.asarray(img).shape[:2] == (30, 40)  # pixels really loaded


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_streams_are_truncated_image(fmt: str) -> None:
    data = encoded(noise(64, 64), fmt)
    for cut in (len(data) // 3, len(data) // 2, len(data) - 40):
        assert reason_of(data[:cut]) == "truncated_image", (fmt, cut)


def test_png_missing_only_its_end_chunk_is_accepted() -> None:
    data = encoded(noise(16, 16), "PNG")
    assert data.endswith(b"IEND\xaeB`\x82")
    assert decode_image(data[:-12], LIMITS).size == (16, 16)  # every pixel is there


@pytest.mark.parametrize(
    "data", [b"", b"hello world", b"GIF89a" + b"\x00" * 64, np.random.default_rng(2).bytes(2000)]
)
def test_other_bytes_are_not_an_image(data: bytes) -> None:
    assert reason_of(data) == "not_an_image"


def test_corrupt_header_in_a_complete_stream_is_bad_image() -> None:
    data = bytearray(encoded(noise(8, 8), "PNG"))
    data[16:20] = b"\xff\xff\xff\xff"  # IHDR width; its CRC no longer matches
    assert reason_of(bytes(data)) == "bad_image"


def test_bomb_is_rejected_from_the_header_before_any_pixel(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load(self: Image.Image) -> None:
        raise AssertionError("pixels must not be decoded for a bomb")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_load)
    t0 = time.perf_counter()
    assert reason_of(png_claiming(100_000, 100_000)) == "decompression_bomb"  # above Pillow's own limit
    assert reason_of(png_claiming(3000, 3000)) == "decompression_bomb"  # 9 Mpx: only our limit catches it
    assert reason_of(png_claiming(5000, 10)) == "decompression_bomb"  # side over 4096
    assert time.perf_counter() - t0 < 0.5


def test_limits_are_configurable() -> None:
    data = encoded(noise(100, 100), "PNG")
    assert decode_image(data, LIMITS).size == (100, 100)
    assert reason_of(data, RecordLimits(max_image_pixels=9_999)) == "decompression_bomb"
    assert reason_of(data, RecordLimits(max_image_side=99)) == "decompression_bomb"


def test_transform_shape_dtype_and_range() -> None:
    for channels in (1, 3):
        x = ImageTransform(size=24, channels=channels)(noise(50, 30))
        assert x.shape == (channels, 24, 24)
        assert x.dtype == torch.float32
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    black = ImageTransform(8, 1)(Image.new("L", (8, 8), 0))
    white = ImageTransform(8, 1)(Image.new("L", (8, 8), 255))
    assert torch.all(black == -1.0) and torch.all(white == 1.0)


def test_transform_is_deterministic() -> None:
    img = decode_image(encoded(noise(64, 48), "JPEG"), LIMITS)
    t = ImageTransform(size=32, channels=3)
    assert torch.equal(t(img), t(img))
    assert torch.equal(t(img), t(decode_image(encoded(noise(64, 48), "JPEG"), LIMITS)))


def test_transform_resizes_shorter_side_and_center_crops() -> None:
    # a wide image: left third black, middle white, right third black -> the crop keeps the middle
    arr = np.zeros((20, 60), dtype=np.uint8)
    arr[:, 20:40] = 255
    x = ImageTransform(size=10, channels=1)(Image.fromarray(arr))
    assert x.shape == (1, 10, 10)
    assert float(x.mean()) > 0.9  # the white middle, resized from 20x20 to 10x10
    # a tall image keeps its vertical middle
    arr = np.zeros((60, 20), dtype=np.uint8)
    arr[20:40, :] = 255
    assert float(ImageTransform(size=20, channels=1)(Image.fromarray(arr)).mean()) > 0.9


def test_transform_upsamples_small_images() -> None:
    x = ImageTransform(size=56, channels=1)(noise(28, 28, "L"))
    assert x.shape == (1, 56, 56)


def test_transparency_becomes_white() -> None:
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    x = ImageTransform(4, 3)(decode_image(encoded(clear, "PNG"), LIMITS))
    assert torch.allclose(x, torch.ones_like(x))
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    x = ImageTransform(4, 1)(decode_image(encoded(palette, "PNG", transparency=0), LIMITS))
    assert torch.allclose(x, torch.ones_like(x))


def test_grayscale_to_rgb_and_rgb_to_grayscale() -> None:
    gray = Image.new("L", (6, 6), 128)
    x = ImageTransform(6, 3)(gray)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert ImageTransform(6, 1)(Image.new("RGB", (6, 6), (128, 128, 128))).shape == (1, 6, 6)


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    arr = np.full((4, 4), 65535 // 2, dtype=np.uint16)
    data = encoded(Image.fromarray(arr), "PNG")
    x = ImageTransform(4, 1)(decode_image(data, LIMITS))
    assert abs(float(x.mean())) < 0.02  # mid-grey, not saturated white


def test_transform_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        ImageTransform(size=0, channels=1)
    with pytest.raises(ValueError):
        ImageTransform(size=8, channels=2)


def test_large_jpeg_decodes_at_a_reduced_scale_close_to_the_full_decode() -> None:
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).resize(
        (224, 224), Image.Resampling.BICUBIC
    )
    buf = io.BytesIO()
    base.convert("RGB").save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    limits = RecordLimits()
    full = decode_image(data, limits)
    scaled = decode_image(data, limits, min_side=28)
    assert full.size == (224, 224) and min(scaled.size) >= 28 and scaled.size[0] < 224  # DCT-scaled
    transform = ImageTransform(28, 1)
    a, b = transform(full), transform.from_bytes(data, limits)
    assert a.shape == b.shape == (1, 28, 28)
    assert float((a - b).abs().mean()) < 0.05  # per-pixel noise is the worst case; real photos differ less
    png = io.BytesIO()
    base.save(png, format="PNG")
    assert decode_image(png.getvalue(), limits, min_side=28).size == (224, 224)  # only JPEG is scaled
