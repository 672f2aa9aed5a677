"""Image codecs: responses encoded as PNG, JPEG, WebP or raw RGB8 (optional Lanczos resizing), and uploaded photos
decoded with every size check done before a pixel is decoded.

Blocking (PIL); the server runs it in a thread pool, never on the event loop. PNG uses exactly the call of
`stylecast generate` (`Image.fromarray(u8).save(buf, format="PNG")`, no options), so the bytes are identical.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from common.faces import to_rgb_u8

from .errors import InvalidArgument

FORMATS = ("png", "jpeg", "webp", "raw")
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
MIN_SIDE = 5  # the smallest photo side accepted (the fast stylizer's smallest input, training.style.fast_style)


def output_size(resolution: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """(width, height) of the encoded image: 0 = native; one of them 0 = keep the aspect ratio."""
    h0, w0 = resolution
    if width == 0 and height == 0:
        return w0, h0
    if width == 0:
        width = max(1, round(w0 * height / h0))
    if height == 0:
        height = max(1, round(h0 * width / w0))
    return width, height


def encode(img_u8: np.ndarray, fmt: str = "png", quality: int = 90, size: tuple[int, int] | None = None) -> bytes:
    """Encode one [H, W, 3] uint8 image.

    Args:
        fmt: "png" | "jpeg" | "webp" | "raw" (H*W*3 bytes, row-major RGB).
        quality: JPEG / WebP quality 1..100.
        size: (width, height) to resize to with Lanczos; None = as is.
    """
    from PIL import Image

    if fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r}")
    img = None
    if size is not None and size != (img_u8.shape[1], img_u8.shape[0]):
        img = Image.fromarray(img_u8).resize(size, Image.Resampling.LANCZOS)
    if fmt == "raw":
        return np.ascontiguousarray(img_u8).tobytes() if img is None else img.tobytes()
    img = img if img is not None else Image.fromarray(img_u8)
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    elif fmt == "jpeg":
        img.save(buf, format="JPEG", quality=int(quality))
    else:
        img.save(buf, format="WEBP", quality=int(quality))
    return buf.getvalue()


def decode(data: bytes, fmt: str, width: int, height: int) -> np.ndarray:
    """Encoded bytes -> [H, W, 3] uint8 (clients and tests)."""
    if fmt == "raw":
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3).copy()
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_image(data: bytes, max_side: int, max_pixels: int | None = None) -> np.ndarray:
    """PNG / JPEG / WebP bytes -> img_u8 [H, W, 3] (EXIF orientation applied; grayscale, alpha over white,
    palette and 16-bit images converted to RGB8 by common.faces.to_rgb_u8). Blocking.

    The size is checked from the header before any pixel is decoded (decompression bombs never expand).

    Raises:
        InvalidArgument: empty, corrupt or unsupported data; a side > max_side or < MIN_SIDE; more than
            max_pixels (default max_side ** 2) pixels.
    """
    from PIL import Image

    if not data:
        raise InvalidArgument("image: empty; send PNG, JPEG or WebP bytes")
    max_pixels = max_pixels or max_side * max_side
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im = Image.open(io.BytesIO(data))
            except Image.DecompressionBombError as exc:
                raise InvalidArgument(f"image: exceeds the model's limit of {max_side}x{max_side} px ({exc})") from None
            if im.format not in INPUT_FORMATS:
                raise InvalidArgument(f"image: format {im.format} is not supported (PNG, JPEG or WebP)")
            w, h = im.size
            if w > max_side or h > max_side or w * h > max_pixels:
                raise InvalidArgument(f"image: {w}x{h} exceeds the model's limit of {max_side}x{max_side} px "
                                      f"({max_pixels} pixels)")
            # Decodes, applies EXIF orientation (the size may swap; the limits above are symmetric) and brings
            # grayscale, alpha, palette and 16-bit images to RGB8.
            arr = to_rgb_u8(im)
    except InvalidArgument:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises many types on corrupt data (OSError, SyntaxError, ValueError, ...)
        raise InvalidArgument(f"image: cannot decode ({type(exc).__name__}: {exc})") from None
    if min(arr.shape[0], arr.shape[1]) < MIN_SIDE:
        raise InvalidArgument(f"image: {arr.shape[1]}x{arr.shape[0]} is smaller than {MIN_SIDE}x{MIN_SIDE} px")
    return np.ascontiguousarray(arr)
