"""Safe image decoding and the deterministic transform from an image to a model input tensor.

:func:`decode_image` never trusts the bytes: the format comes from the magic number (PNG, JPEG or
WebP only, so no permissive plugin can "identify" random bytes), the size from the header is
checked against :class:`RecordLimits` *before* any pixel is decoded (decompression bombs), and the
pixels are then fully loaded so a truncated stream fails here rather than later in a batch.

Failures are :class:`RecordError` with reason ``not_an_image`` (unknown magic number),
``decompression_bomb`` (header claims too many pixels), ``truncated_image`` (decoding failed and
the stream ends before the format's end marker) or ``bad_image`` (any other decode failure).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

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


def decode_image(data: bytes, limits: RecordLimits, min_side: int | None = None) -> Image.Image:
    """Decodes encoded PNG / JPEG / WebP bytes into a fully loaded PIL image.

    ``min_side``: the caller only needs both sides at least this long (it resizes afterwards), so a
    JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still covers it: several times
    cheaper for large photos, at the cost of pixel values that differ slightly from a full decode
    followed by the resize. The size limits apply to the size the header claims, before any scaling.
    """
    ctype = sniff_content_type(data)  # RecordError("not_an_image") for unknown bytes
    try:
        img = _PLUGINS[ctype](io.BytesIO(data))
    except Exception as e:  # header parse failure: Pillow raises SyntaxError, OSError, struct.error, ...
        raise _decode_error(ctype, data, "header", e) from None

    width, height = img.size
    if width <= 0 or height <= 0:
        raise RecordError("bad_image", f"image header claims size {width}x{height}")
    if max(width, height) > limits.max_image_side or width * height > limits.max_image_pixels:
        raise RecordError(
            "decompression_bomb",
            f"image header claims {width}x{height}, limits {limits.max_image_side} per side and "
            f"{limits.max_image_pixels} pixels",
        )
    if min_side is not None and ctype == "image/jpeg":
        img.draft(img.mode, (min_side, min_side))
    try:
        img.load()
    except Exception as e:
        raise _decode_error(ctype, data, "pixels", e) from None
    return img


def _decode_error(ctype: str, data: bytes, stage: str, err: Exception) -> RecordError:
    reason = "bad_image" if _stream_is_complete(ctype, data) else "truncated_image"
    return RecordError(
        reason, f"{ctype} {stage} failed to decode ({len(data)} bytes): {type(err).__name__}: {err}"
    )


def _stream_is_complete(ctype: str, data: bytes) -> bool:
    """Whether the bytes reach the format's end: PNG's IEND chunk, JPEG's EOI, WebP's RIFF length."""
    if ctype == "image/png":
        return data.endswith(b"IEND\xaeB`\x82")
    if ctype == "image/jpeg":
        return data.endswith(b"\xff\xd9")
    riff_payload = int.from_bytes(data[4:8], "little")
    return len(data) >= 8 + riff_payload


@dataclass(frozen=True)
class ImageTransform:
    """Image -> (channels, size, size) float32 tensor, deterministic.

    Transparent pixels are composited onto white, the image is converted to grayscale (channels=1)
    or RGB (channels=3), its shorter side is resized to ``size`` (bicubic, antialiased), it is
    center-cropped to a square, and values are normalised to ``(x - 0.5) / 0.5`` in [-1, 1].
    """

    size: int
    channels: int  # 1 = grayscale, 3 = RGB

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"ImageTransform.size must be positive, got {self.size}")
        if self.channels not in (1, 3):
            raise ValueError(f"ImageTransform.channels must be 1 or 3, got {self.channels}")

    def from_bytes(self, data: bytes, limits: RecordLimits) -> torch.Tensor:
        """Decode and transform encoded image bytes: the one path training, serving and evaluation
        share, so a model sees the same pixels in all three."""
        return self(decode_image(data, limits, min_side=self.size))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = _to_mode(img, "L" if self.channels == 1 else "RGB")
        img = _resize_shorter_side(img, self.size)
        img = _center_crop(img, self.size)
        arr = np.array(img, dtype=np.uint8)  # a writable copy, as torch.from_numpy wants
        # (H, W) -> (1, H, W) or (H, W, 3) -> (3, H, W)
        arr = arr[None, :, :] if self.channels == 1 else arr.transpose(2, 0, 1)
        x = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32).div_(255.0)
        return x.sub_(MEAN).div_(STD)


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


def _resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    width, height = img.size
    if min(width, height) == size:
        return img
    scale = size / min(width, height)
    new_w = max(size, round(width * scale))
    new_h = max(size, round(height * scale))
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC)


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    width, height = img.size
    if width == size and height == size:
        return img
    left = (width - size) // 2
    top = (height - size) // 2
    return img.crop((left, top, left + size, top + size))
