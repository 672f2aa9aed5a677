"""Image generation helpers shared by `stylecast generate`, training previews and export parity checks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from training.networks.stylegan2 import Generator, seeds_to_z


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[-1, 1] float NCHW -> uint8 NHWC via round((img + 1) * 127.5) clamped to 0..255.

    Args:
        img: [N, C, H, W] float tensor.
    Returns:
        [N, H, W, C] uint8 numpy array.
    """
    x = ((img.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate_images(G: Generator, seeds: Sequence[int], psi: float = 1.0, cutoff: int | None = None,
                    noise_mode: str = "const", batch_size: int = 8, device: str | torch.device = "cpu",
                    progress: bool = False) -> np.ndarray:
    """Render seeds to uint8 images [len(seeds), R, R, 3] (batched; the same bytes for any batch size)."""
    G = G.to(device).eval()
    out = []
    it = range(0, len(seeds), batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="generate", unit="batch", total=math.ceil(len(seeds) / batch_size))
    for i in it:
        z = seeds_to_z(seeds[i: i + batch_size], G.z_dim).to(device)
        out.append(to_uint8(G(z, psi=psi, cutoff=cutoff, noise_mode=noise_mode)))
    return np.concatenate(out, axis=0)


def make_grid(images: np.ndarray, cols: int | None = None, pad: int = 0) -> np.ndarray:
    """Tile [N, H, W, C] uint8 images into one [rows*H, cols*W, C] image (row-major)."""
    n, h, w, c = images.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * (h + pad) - pad, cols * (w + pad) - pad, c), dtype=images.dtype)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * (h + pad): r * (h + pad) + h, q * (w + pad): q * (w + pad) + w] = im
    return grid


def encode_png(img_u8: np.ndarray) -> bytes:
    """[H, W, 3] uint8 -> PNG bytes (deterministic: no timestamps or metadata)."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img_u8).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str | Path, img_u8: np.ndarray) -> None:
    """Write a PNG atomically."""
    from common.files import atomic_write_bytes
    atomic_write_bytes(path, encode_png(img_u8))
