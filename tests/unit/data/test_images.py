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

from growclip_stream.data import images
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


# -- the fast decoder (OpenCV) and the general one (Pillow) give the same pixels -------------------


def via_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sends every image through the general decoder."""
    monkeypatch.setattr(images, "_png_fast_flags", lambda *a: None)
    monkeypatch.setattr(images, "_jpeg_fast_flags", lambda *a: None)


def no_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails if an image reaches the general decoder."""

    def fail(*a: object, **k: object) -> None:
        raise AssertionError("the general decoder was used")

    monkeypatch.setattr(images, "decode_image", fail)


def both_paths(
    monkeypatch: pytest.MonkeyPatch, t: ImageTransform, data: bytes
) -> tuple[np.ndarray, np.ndarray]:
    """(pixels from the fast decoder, pixels from the general one) of the same bytes."""
    with monkeypatch.context() as m:
        no_pillow(m)
        fast = t.pixels(data, LIMITS)
    with monkeypatch.context() as m:
        via_pillow(m)
        slow = t.pixels(data, LIMITS)
    return fast, slow


@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("channels", [1, 3])
def test_png_fast_path_matches_pillow(monkeypatch: pytest.MonkeyPatch, mode: str, channels: int) -> None:
    data = encoded(noise(50, 30, mode), "PNG")
    fast, slow = both_paths(monkeypatch, ImageTransform(size=24, channels=channels), data)
    assert fast.dtype == slow.dtype == np.uint8 and fast.shape == slow.shape == (channels, 24, 24)
    diff = np.abs(fast.astype(int) - slow.astype(int))
    # lossless: identical, up to rounding in the RGB -> grey conversion
    assert diff.max() <= (1 if (mode, channels) == ("RGB", 1) else 0)


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_fast_path_matches_pillow(monkeypatch: pytest.MonkeyPatch, channels: int) -> None:
    base = Image.fromarray(np.random.default_rng(3).integers(0, 256, (12, 12, 3), dtype=np.uint8))
    data = encoded(base.resize((96, 64), Image.Resampling.BICUBIC), "JPEG", quality=95)
    # 64 / 2 >= 24: both decode at half scale
    fast, slow = both_paths(monkeypatch, ImageTransform(size=24, channels=channels), data)
    assert fast.shape == slow.shape == (channels, 24, 24)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 2.0  # same library, same DCT scale


def test_fast_path_keeps_rgb_order() -> None:
    red = encoded(Image.new("RGB", (8, 8), (255, 0, 0)), "PNG")
    x = ImageTransform(8, 3).pixels(red, LIMITS)
    assert (x[0] == 255).all() and (x[1] == 0).all() and (x[2] == 0).all()
    red_jpeg = encoded(Image.new("RGB", (16, 16), (255, 0, 0)), "JPEG", quality=100)
    y = ImageTransform(8, 3).pixels(red_jpeg, LIMITS).astype(int)
    assert y[0].min() > 200 and y[1].max() < 40 and y[2].max() < 40


def test_fast_path_failures_have_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    t = ImageTransform(16, 1)

    def reason(data: bytes, limits: RecordLimits = LIMITS) -> str:
        with pytest.raises(RecordError) as err:
            t.pixels(data, limits)
        return err.value.reason

    no_pillow(monkeypatch)  # each of these is decided before or inside the fast decoder
    assert reason(png_claiming(3000, 3000)) == "decompression_bomb"
    jpeg = bytearray(encoded(noise(64, 48), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = (5000).to_bytes(2, "big") + (5000).to_bytes(2, "big")  # claims 5000x5000
    assert reason(bytes(jpeg)) == "decompression_bomb"
    data = bytearray(encoded(noise(64, 64), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 20 : idat + 60] = b"\x00" * 40  # corrupt compressed pixels; the stream is complete
    assert reason(bytes(data)) == "bad_image"
    corrupt_jpeg = bytearray(encoded(noise(64, 64), "JPEG"))
    sos = corrupt_jpeg.index(b"\xff\xda")
    corrupt_jpeg[sos + 2 : sos + 4] = b"\x00\x01"  # an impossible scan header length
    assert reason(bytes(corrupt_jpeg)) == "bad_image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_streams_through_the_transform(fmt: str) -> None:
    data = encoded(noise(64, 64), fmt)
    for cut in (len(data) // 3, len(data) - 40):
        with pytest.raises(RecordError) as err:
            ImageTransform(16, 3).pixels(data[:cut], LIMITS)
        assert err.value.reason == "truncated_image", (fmt, cut)


def test_exotic_images_take_the_general_decoder_and_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Palette, alpha, 16-bit and WebP images are decoded by Pillow, with the same transform."""
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    cases = [
        encoded(rgba, "PNG"),
        encoded(Image.new("P", (8, 8), 0), "PNG", transparency=0),
        encoded(Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)), "PNG"),
        encoded(Image.new("RGB", (8, 8), (255, 255, 255)), "WEBP", lossless=True),
    ]
    used: list[int] = []
    real = images.decode_image
    monkeypatch.setattr(images, "decode_image", lambda *a, **k: used.append(1) or real(*a, **k))
    for data in cases:
        assert (ImageTransform(8, 1).pixels(data, LIMITS) == 255).all()
    assert len(used) == len(cases)


def test_normalize_maps_uint8_to_unit_range() -> None:
    x = images.normalize(torch.tensor([0, 255, 128], dtype=torch.uint8))
    assert x.dtype == torch.float32
    assert torch.allclose(x, torch.tensor([-1.0, 1.0, 128 / 255 * 2 - 1]), atol=1e-6)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_corrupted_bytes_never_escape_as_anything_but_a_reason(fmt: str) -> None:
    """Untrusted bytes reach a C decoder: random byte flips, cuts and splices of valid images must
    each end as pixels of the right shape or a RecordError, in this process (no crash, no hang)."""
    rng = np.random.default_rng(7)
    mode = "L" if fmt == "PNG" else "RGB"
    base = encoded(noise(48, 40, mode), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    t = ImageTransform(16, 3)
    outcomes: dict[str, int] = {}
    for _ in range(300):
        data = bytearray(base)
        for _ in range(int(rng.integers(1, 8))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            cut = int(rng.integers(len(data) // 2, len(data)))
            data = data[:cut] + (data[-12:] if rng.random() < 0.5 else b"")  # keep or drop the end marker
        try:
            x = t.pixels(bytes(data), LIMITS)
        except RecordError as e:
            outcomes[e.reason] = outcomes.get(e.reason, 0) + 1
            continue
        assert x.shape == (3, 16, 16) and x.dtype == np.uint8
        outcomes["decoded"] = outcomes.get("decoded", 0) + 1
    assert set(outcomes) <= {"decoded", "bad_image", "truncated_image", "not_an_image", "decompression_bomb"}
    assert outcomes.get("decoded", 0) > 0 and len(outcomes) > 1  # both outcomes were exercised


def test_png_transparency_is_found_by_walking_the_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A grey PNG whose text chunk spells "IDAT" before its real tRNS chunk: the transparent pixels
    still become white (Pillow's path), and an opaque PNG with the same text stays on the fast path."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "IDAT tRNS IDAT")
    grey = Image.new("L", (4, 4), 0)
    transparent = encoded(grey, "PNG", pnginfo=info, transparency=0)
    assert transparent.index(b"IDAT") < transparent.index(b"tRNS")  # the text comes first
    assert (ImageTransform(4, 1).pixels(transparent, LIMITS) == 255).all()
    opaque = encoded(grey, "PNG", pnginfo=info)
    no_pillow(monkeypatch)
    assert (ImageTransform(4, 1).pixels(opaque, LIMITS) == 0).all()
