"""Image-folder dataset for GAN finetuning: recursive jpg/png/webp/bmp, EXIF-transposed, RGB, resized (shorter
side) and centre-cropped to the generator's resolution, with a seeded, stateless sampling order.

The order is a pure function of (seed, index of the image shown), so a resumed run sees exactly the images an
uninterrupted run would have seen without any sampler state to save.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Preload decoded images up to this many bytes; above it they are decoded again on every use.
DEFAULT_PRELOAD_BYTES = 2 << 30


class DatasetWarning(UserWarning):
    """A file of the dataset folder could not be read and was skipped."""


def list_image_files(root: str | os.PathLike) -> list[Path]:
    """All files under root (recursively) with an image extension, sorted by relative path."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"--data must be a folder of images, got a file: {root}")
    files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_image(path: Path, resolution: int) -> np.ndarray:
    """Decode one file -> [R, R, 3] uint8: EXIF transpose, RGB, resize the shorter side to R (Lanczos), centre crop.

    Raises:
        OSError / ValueError (from PIL) for unreadable files.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            # Composite transparency on white rather than letting convert() turn it black.
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
        w, h = im.size
        if w < 1 or h < 1:
            raise ValueError("empty image")
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.LANCZOS, reducing_gap=3.0 if scale < 0.5 else None)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.uint8)
    if arr.shape != (resolution, resolution, 3):
        raise ValueError(f"decoded to shape {arr.shape}")
    return arr


class ImageFolderDataset:
    """Images of a folder at one resolution, as float [-1, 1] NCHW batches.

    Args:
        root: folder, searched recursively for .jpg/.jpeg/.png/.webp/.bmp.
        resolution: output size R (the generator's resolution).
        mirror: also use the x-flipped images (a random half of the images shown are flipped).
        seed: sampling-order seed.
        preload_bytes: decode all images once and keep them in memory when they fit in this many bytes.
        progress: show a progress bar while scanning.
    Raises:
        FileNotFoundError / NotADirectoryError for a bad path, ValueError when no file is readable.
    Attributes:
        num_skipped: files with an image extension that could not be decoded (each warned about once).
    """

    def __init__(self, root: str | os.PathLike, resolution: int, mirror: bool = False, seed: int = 0,
                 preload_bytes: int = DEFAULT_PRELOAD_BYTES, progress: bool = False):
        self.root = Path(root)
        self.resolution = int(resolution)
        self.mirror = bool(mirror)
        self.seed = int(seed)
        files = list_image_files(self.root)
        preload = len(files) * self.resolution**2 * 3 <= preload_bytes
        self.files: list[Path] = []
        images: list[np.ndarray] = []
        self.skipped: list[tuple[Path, str]] = []
        it = files
        if progress and files:
            from tqdm import tqdm
            it = tqdm(files, desc="scan dataset", unit="img", leave=False)
        for f in it:
            try:
                arr = load_image(f, self.resolution)
            except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self.skipped.append((f, reason))
                warnings.warn(f"skipping unreadable image {f}: {reason}", DatasetWarning, stacklevel=2)
                continue
            self.files.append(f)
            if preload:
                images.append(arr)
        if not self.files:
            raise ValueError(f"no readable images in {self.root} ({len(files)} files tried)")
        self._images = np.stack(images) if preload else None  # [N, R, R, 3] uint8

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> np.ndarray:
        """[R, R, 3] uint8 image i (not flipped)."""
        if self._images is not None:
            return self._images[i]
        return load_image(self.files[i], self.resolution)

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation [N], flip flags [N] bool) of one epoch: a pure function of (seed, epoch)."""
        rng = np.random.RandomState([self.seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, 0x5EED])
        perm = rng.permutation(len(self))
        flips = rng.rand(len(self)) < 0.5 if self.mirror else np.zeros(len(self), dtype=bool)
        return perm, flips

    def batch(self, start: int, size: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """Images number start .. start+size-1 of the endless shuffled stream -> [size, 3, R, R] float32 in [-1, 1]."""
        n = len(self)
        out = np.empty((size, self.resolution, self.resolution, 3), dtype=np.uint8)
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for j in range(size):
            epoch, pos = divmod(start + j, n)
            if epoch not in cache:
                cache[epoch] = self.order(epoch)
            perm, flips = cache[epoch]
            img = self.image(int(perm[pos]))
            out[j] = img[:, ::-1] if flips[pos] else img
        x = torch.from_numpy(out).to(device).permute(0, 3, 1, 2).to(torch.float32)
        return x / 127.5 - 1.0

    def mean_color(self) -> np.ndarray:
        """Mean RGB of the dataset in [-1, 1] (float64 [3]); used by tests and logs."""
        acc = np.zeros(3, dtype=np.float64)
        for i in range(len(self)):
            acc += self.image(i).reshape(-1, 3).mean(axis=0)
        return acc / len(self) / 127.5 - 1.0


__all__ = ["DatasetWarning", "IMAGE_EXTENSIONS", "ImageFolderDataset", "list_image_files", "load_image"]
