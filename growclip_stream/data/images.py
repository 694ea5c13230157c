"""Safe image decoding and the deterministic transform from encoded bytes to model input pixels.

Nothing about the bytes is trusted: the format comes from the magic number (PNG, JPEG or WebP
only, so no permissive decoder can "identify" random bytes), the size from the header is checked
against :class:`RecordLimits` *before* any pixel is decoded (decompression bombs), and the pixels
are fully decoded so a truncated stream fails here rather than later in a batch.

Two decoders, one result. The common cases (8-bit grey or RGB PNG without transparency, baseline
or progressive grey / YCbCr JPEG, complete streams) go straight to OpenCV's ``imdecode``, which
decodes grey directly and JPEGs at the smallest DCT scale that still covers the model input:
ingest is bounded by decode CPU, and with orjson and pybase64 for the envelope a record's whole
``route()`` went from 162 to 72 us (2 KB PNG) and from 402 to 184 us (20 KB JPEG) on one core
(``bench/decode_stages.py``).
Everything else (palette, alpha, 16-bit, CMYK, WebP, streams without their end marker) goes
through Pillow (:func:`decode_image`), which also names the failure. Both feed the same resize
and crop (:func:`_resize_and_crop`).

Failures are :class:`RecordError` with reason ``not_an_image`` (unknown magic number),
``decompression_bomb`` (header claims too many pixels), ``truncated_image`` (decoding failed and
the stream ends before the format's end marker) or ``bad_image`` (any other decode failure).

Pixels stay ``uint8`` until a batch is formed (:func:`normalize`): a quarter of the bytes to move
between decode processes and to keep in replay buffers, and one vectorised op per batch instead
of several small tensor ops per image.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from growclip_stream.data.records import RecordError, RecordLimits, sniff_content_type

# Opening through the plugin class (rather than Image.open) parses only the format the magic
# number names and skips Pillow's process-global MAX_IMAGE_PIXELS check: our limits apply instead.
_PLUGINS: dict[str, type[ImageFile.ImageFile]] = {
    "image/png": PngImagePlugin.PngImageFile,
    "image/jpeg": JpegImagePlugin.JpegImageFile,
    "image/webp": WebPImagePlugin.WebPImageFile,
}

# Fixed normalisation: pixel values in [0, 1] map to [-1, 1].
MEAN = 0.5
STD = 0.5

# A bad record is counted and dead-lettered with its reason; OpenCV's own warnings about it
# would only be unstructured noise on stderr.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

_PNG_END = b"IEND\xaeB`\x82"
_JPEG_SOF_FAST = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive Huffman
_JPEG_SOF_ALL = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_REDUCED = {
    1: {
        2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
        4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
        8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
    },
    3: {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8},
}
_FULL = {1: cv2.IMREAD_GRAYSCALE, 3: cv2.IMREAD_COLOR}


def silence_native_warnings() -> None:
    """Points this process's file descriptor 2 at /dev/null. For decode worker processes only.

    libpng and libjpeg write their warnings about damaged images ("libpng error: IDAT: incorrect
    data check", "Corrupt JPEG data: ...") straight to descriptor 2, past OpenCV's log level and
    our structured logs; a stream with many such images would bury the daemon's log in them. A
    bad image is reported where it belongs: dead-lettered with its reason. A worker that dies is
    logged by the process that watches it.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
    finally:
        os.close(devnull)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """``uint8`` pixels (any shape) -> float32 in [-1, 1]: ``(x / 255 - MEAN) / STD``."""
    return pixels.to(torch.float32).mul_(1.0 / (255.0 * STD)).sub_(MEAN / STD)


def normalize_batch(pixels: Sequence[np.ndarray]) -> torch.Tensor:
    """(C, H, W) ``uint8`` arrays from :meth:`ImageTransform.pixels` -> one (N, C, H, W) float32
    batch in [-1, 1], normalised with one op."""
    return normalize(torch.from_numpy(np.stack(pixels)))


def decode_image(data: bytes, limits: RecordLimits, min_side: int | None = None) -> Image.Image:
    """Decodes encoded PNG / JPEG / WebP bytes into a fully loaded PIL image (the general decoder).

    ``min_side``: the caller only needs both sides at least this long (it resizes afterwards), so a
    JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still covers it. The size limits
    apply to the size the header claims, before any scaling.
    """
    ctype = sniff_content_type(data)  # RecordError("not_an_image") for unknown bytes
    try:
        img = _PLUGINS[ctype](io.BytesIO(data))
    except Exception as e:  # header parse failure: Pillow raises SyntaxError, OSError, struct.error, ...
        raise _decode_error(ctype, data, "header", e) from None
    _check_size(*img.size, limits)
    if min_side is not None and ctype == "image/jpeg":
        img.draft(img.mode, (min_side, min_side))
    try:
        img.load()
    except Exception as e:
        raise _decode_error(ctype, data, "pixels", e) from None
    return img


def _decode(
    data: bytes, limits: RecordLimits, channels: int, min_side: int | None
) -> tuple[np.ndarray, bool]:
    """Encoded bytes -> (``uint8`` pixels, whether their channels are in BGR order): (H, W) for
    ``channels=1``, (H, W, 3) otherwise. Transparent pixels are composited onto white."""
    ctype = sniff_content_type(data)  # RecordError("not_an_image") for unknown bytes
    flags = None
    if ctype == "image/png":
        flags = _png_fast_flags(data, limits, channels)
    elif ctype == "image/jpeg":
        flags = _jpeg_fast_flags(data, limits, channels, min_side)
    if flags is None:
        return _pil_pixels(decode_image(data, limits, min_side), channels), False
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags | cv2.IMREAD_IGNORE_ORIENTATION)
    if arr is None:  # the header was fine; the compressed data is not
        raise _decode_error(ctype, data, "pixels", ValueError("corrupt compressed data"))
    return arr, channels == 3  # OpenCV decodes colour as BGR


def _check_size(width: int, height: int, limits: RecordLimits) -> None:
    if width <= 0 or height <= 0:
        raise RecordError("bad_image", f"image header claims size {width}x{height}")
    if max(width, height) > limits.max_image_side or width * height > limits.max_image_pixels:
        raise RecordError(
            "decompression_bomb",
            f"image header claims {width}x{height}, limits {limits.max_image_side} per side and "
            f"{limits.max_image_pixels} pixels",
        )


def _png_fast_flags(data: bytes, limits: RecordLimits, channels: int) -> int | None:
    """OpenCV flags for an 8-bit grey or RGB PNG without transparency that ends with IEND, after
    the size check; None sends anything else to Pillow."""
    if len(data) < 33 or data[12:16] != b"IHDR" or not data.endswith(_PNG_END):
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, color_type = data[24], data[25]
    if depth != 8 or color_type not in (0, 2):
        return None
    if not _png_opaque(data):
        return None
    _check_size(width, height, limits)
    return _FULL[channels]


def _png_opaque(data: bytes) -> bool:
    """Whether the chunks before the first IDAT hold no tRNS (transparency), walking them by their
    lengths (a search for the bytes could be fooled by text chunks)."""
    i, n = 8, len(data)
    while i + 8 <= n:
        kind = data[i + 4 : i + 8]
        if kind == b"IDAT":
            return True
        if kind == b"tRNS":
            return False
        i += 12 + int.from_bytes(data[i : i + 4], "big")  # length, type, data, CRC
    return False


def _jpeg_fast_flags(data: bytes, limits: RecordLimits, channels: int, min_side: int | None) -> int | None:
    """OpenCV flags (with DCT scaling) for a complete grey or YCbCr Huffman JPEG, after the size
    check; None sends anything else to Pillow."""
    if not data.endswith(b"\xff\xd9"):
        return None
    frame = _jpeg_frame(data)
    if frame is None:
        return None
    marker, width, height, components = frame
    if marker not in _JPEG_SOF_FAST or components not in (1, 3):
        return None
    _check_size(width, height, limits)
    if min_side is not None:
        for factor in (8, 4, 2):
            if -(-min(width, height) // factor) >= min_side:
                return _REDUCED[channels][factor]
    return _FULL[channels]


def _jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """(SOF marker, width, height, components) from the first frame header, walking the marker
    segments before it; None when the stream does not reach one."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # scan data before any frame header
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _JPEG_SOF_ALL:
            if length < 8 or i + 10 > n:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return marker, width, height, data[i + 9]
        i += 2 + length
    return None


def _decode_error(ctype: str, data: bytes, stage: str, err: Exception) -> RecordError:
    reason = "bad_image" if _stream_is_complete(ctype, data) else "truncated_image"
    return RecordError(
        reason, f"{ctype} {stage} failed to decode ({len(data)} bytes): {type(err).__name__}: {err}"
    )


def _stream_is_complete(ctype: str, data: bytes) -> bool:
    """Whether the bytes reach the format's end: PNG's IEND chunk, JPEG's EOI, WebP's RIFF length."""
    if ctype == "image/png":
        return data.endswith(_PNG_END)
    if ctype == "image/jpeg":
        return data.endswith(b"\xff\xd9")
    riff_payload = int.from_bytes(data[4:8], "little")
    return len(data) >= 8 + riff_payload


@dataclass(frozen=True)
class ImageTransform:
    """Encoded image -> (channels, size, size) pixels, deterministic.

    Transparent pixels are composited onto white, the image is converted to grayscale (channels=1)
    or RGB (channels=3), its shorter side is resized to ``size`` (area averaging when shrinking,
    bicubic when enlarging), it is center-cropped to a square; :func:`normalize` maps the ``uint8``
    pixels to [-1, 1].
    """

    size: int
    channels: int  # 1 = grayscale, 3 = RGB

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"ImageTransform.size must be positive, got {self.size}")
        if self.channels not in (1, 3):
            raise ValueError(f"ImageTransform.channels must be 1 or 3, got {self.channels}")

    def pixels(self, data: bytes, limits: RecordLimits) -> np.ndarray:
        """Encoded bytes -> (C, size, size) ``uint8``: the one decode path that training, serving
        and evaluation share, so a model sees the same pixels in all three."""
        return self._finish(*_decode(data, limits, self.channels, min_side=self.size))

    def from_bytes(self, data: bytes, limits: RecordLimits) -> torch.Tensor:
        """Encoded bytes -> (C, size, size) float32 in [-1, 1]."""
        return normalize(torch.from_numpy(self.pixels(data, limits)))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """A decoded PIL image -> (C, size, size) float32 in [-1, 1]."""
        return normalize(torch.from_numpy(self._finish(_pil_pixels(img, self.channels), bgr=False)))

    def _finish(self, arr: np.ndarray, bgr: bool) -> np.ndarray:
        arr = _resize_and_crop(arr, self.size)
        if arr.ndim == 2:
            return np.ascontiguousarray(arr[None])  # (1, H, W)
        chw = arr.transpose(2, 0, 1)  # (3, H, W)
        return np.ascontiguousarray(chw[::-1] if bgr else chw)  # one copy: contiguous, writable, RGB


def _pil_pixels(img: Image.Image, channels: int) -> np.ndarray:
    img = _to_mode(img, "L" if channels == 1 else "RGB")
    return np.array(img, dtype=np.uint8)  # a writable copy, as torch.from_numpy wants


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    if img.mode.startswith("I;16"):  # 16-bit grayscale: scale to 8 bits rather than clip
        arr = (np.asarray(img, dtype=np.float32) / 257.0).round().astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img if img.mode == mode else img.convert(mode)


def _resize_and_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size`` (area averaging down, bicubic up), then the centered square."""
    height, width = arr.shape[:2]
    if min(width, height) != size:
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        arr = cv2.resize(arr, (new_w, new_h), interpolation=interpolation)
        height, width = new_h, new_w
    top, left = (height - size) // 2, (width - size) // 2
    return arr[top : top + size, left : left + size]
