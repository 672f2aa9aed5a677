"""Image input/output and colour handling for neural style transfer, including the luminance-only
("original colours") transfer of Gatys et al., "Preserving Color in Neural Artistic Style Transfer", 2016.

Every tensor here is ``img``: float32 [N, 3, H, W] in [-1, 1] (the house convention).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

#: Largest input image decoded (pixels), PIL's own decompression-bomb threshold (about 89.5 MP).
MAX_INPUT_PIXELS = 89_478_485

# FCC NTSC RGB -> YIQ. Rows of I and Q sum to 0 and the row of Y to 1, so YIQ of a grey is (grey, 0, 0) and
# the chroma (I, Q) of an image in [-1, 1] is exactly twice its chroma in [0, 1].
RGB_TO_YIQ = ((0.299, 0.587, 0.114),
              (0.595716, -0.274453, -0.321263),
              (0.211456, -0.522591, 0.311135))


def load_image(path: str | os.PathLike, max_pixels: int = MAX_INPUT_PIXELS) -> torch.Tensor:
    """Decode an image file (any format Pillow reads; EXIF rotation applied; alpha dropped) to ``img``.

    Args:
        path: image file.
        max_pixels: refuse images with more pixels than this before decoding them.
    Returns:
        [1, 3, H, W] float32 in [-1, 1].
    Raises:
        FileNotFoundError: no such file. ValueError: not a readable image, or too large.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such image file")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected an image file")
    too_big = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    too_big = (w, h)
                else:
                    im = ImageOps.exif_transpose(im)
                    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: cannot read image ({msg})") from None
    if too_big is not None:
        w, h = too_big
        raise ValueError(f"{path}: image is {w}x{h} = {w * h / 1e6:.1f} MP, more than the "
                         f"{max_pixels / 1e6:.1f} MP allowed; downscale it first")
    return from_uint8(arr)


def from_uint8(arr: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [1, 3, H, W] float32 in [-1, 1] (x / 127.5 - 1)."""
    t = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).unsqueeze(0).float()
    return t / 127.5 - 1.0


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> [N, H, W, 3] uint8 via round((img + 1) * 127.5), clamped."""
    from training.generate import to_uint8 as _to_uint8
    return _to_uint8(img)


def save_image(path: str | os.PathLike, img: torch.Tensor) -> None:
    """Write the first image of ``img`` ([N, 3, H, W] in [-1, 1]) as a PNG, atomically."""
    from training.generate import save_png
    save_png(path, to_uint8(img[:1])[0])


def scaled_size(h: int, w: int, max_side: int) -> tuple[int, int]:
    """(H', W') with the longer side equal to ``max_side`` and the aspect ratio kept (each side >= 1)."""
    s = max_side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with antialiasing when shrinking. [N, C, H, W] -> [N, C, size[0], size[1]]."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=True)


def resize_max_side(img: torch.Tensor, max_side: int) -> torch.Tensor:
    """Resize so that the longer side is ``max_side`` (aspect ratio kept). [N, C, H, W] -> [N, C, H', W']."""
    return resize(img, scaled_size(img.shape[-2], img.shape[-1], max_side))


def _yiq_matrix(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(RGB_TO_YIQ, dtype=dtype, device=device)


def rgb_to_yiq(img: torch.Tensor) -> torch.Tensor:
    """RGB -> YIQ per pixel (linear, no offset). [N, 3, H, W] -> [N, 3, H, W] (Y, I, Q)."""
    return torch.einsum("ij,njhw->nihw", _yiq_matrix(img.dtype, img.device), img)


def yiq_to_rgb(yiq: torch.Tensor) -> torch.Tensor:
    """Inverse of rgb_to_yiq (the exact matrix inverse, computed in float64). [N, 3, H, W] -> [N, 3, H, W]."""
    inv = torch.linalg.inv(_yiq_matrix(torch.float64, yiq.device)).to(yiq.dtype)
    return torch.einsum("ij,njhw->nihw", inv, yiq)


def transfer_original_colors(stylized: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Keep the content's colours: luminance (Y) from ``stylized``, chroma (I, Q) from ``content``, exactly.

    Where the stylized luminance combined with the content's chroma would leave the RGB cube, the luminance
    is clamped into the interval that keeps all three channels in range, so the chroma is never changed by a
    later clamp (the content's own luminance always lies in that interval). Computed in float64.

    Args:
        stylized: [N, 3, H, W] in [-1, 1].
        content: [N or 1, 3, H, W] in [-1, 1], the same H and W.
    Returns:
        [N, 3, H, W] in [-1, 1], dtype of ``stylized``.
    """
    if stylized.shape[-2:] != content.shape[-2:]:
        raise ValueError(f"original colours: stylized {tuple(stylized.shape[-2:])} and content "
                         f"{tuple(content.shape[-2:])} sizes differ")
    s01 = (stylized.double() + 1) * 0.5
    c01 = (content.double().to(stylized.device) + 1) * 0.5
    y = rgb_to_yiq(s01)[:, :1]
    chroma = rgb_to_yiq(c01)[:, 1:].expand(s01.shape[0], -1, -1, -1)
    # RGB = Y * (1, 1, 1) + d(I, Q): the first column of the inverse matrix is all ones (rows of I, Q sum to 0).
    d = yiq_to_rgb(torch.cat([torch.zeros_like(y), chroma], dim=1))  # [N, 3, H, W]
    lo = (-d).amax(dim=1, keepdim=True)
    hi = (1 - d).amin(dim=1, keepdim=True)
    y = torch.minimum(torch.maximum(y, lo), hi)
    rgb01 = (y + d).clamp(0, 1)  # the clamp only removes float64 rounding (~1e-16)
    return (rgb01 * 2 - 1).to(stylized.dtype)


def check_size(what: str, size: int, max_size: int) -> None:
    """Raise ValueError when a working resolution exceeds ``max_size`` (or is not positive)."""
    if size < 1:
        raise ValueError(f"{what} must be >= 1 px, got {size}")
    if size > max_size:
        raise ValueError(f"{what} {size} px is larger than --max-size {max_size}; raise --max-size if you "
                         f"really want it (memory grows with the square of the size)")


def ceil_scale(scale: float, size: int) -> int:
    """ceil(scale * size), as neural-style sizes its style images."""
    return max(1, math.ceil(scale * size))
