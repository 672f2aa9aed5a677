"""Image encoding for responses: PNG, JPEG, WebP or raw RGB8, with optional Lanczos resizing.

Blocking (PIL); the server runs it in a thread pool, never on the event loop. PNG uses exactly the call of
`stylecast generate` (`Image.fromarray(u8).save(buf, format="PNG")`, no options), so the bytes are identical.
"""

from __future__ import annotations

import io

import numpy as np

FORMATS = ("png", "jpeg", "webp", "raw")


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
