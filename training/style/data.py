"""Content images for training a fast stylizer (Johnson et al., "Perceptual Losses for Real-Time Style Transfer
and Super-Resolution", ECCV 2016): a recursive image folder streamed in a seeded, resumable order.

Order: epoch e visits the files in ``numpy.random.RandomState(seed + e).permutation(n)``; the stream position
is just (epoch, cursor), so a run resumed from a checkpoint sees exactly the batches an uninterrupted run would.
Files that cannot be decoded are skipped (with a warning, once per file) and counted; the batch is filled
from the next files of the permutation, which is deterministic too.

Preprocessing (deterministic, no augmentation): EXIF rotation, RGB, resize the shorter side to ``image_size``
(Pillow bilinear, antialiased), centre crop to ``image_size`` x ``image_size``, scale to [-1, 1].
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

#: File name endings (lower case) that count as images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def find_images(root: str | os.PathLike) -> list[Path]:
    """Every .jpg/.jpeg/.png/.webp file under root (recursive, case-insensitive), sorted by relative path.

    Raises:
        FileNotFoundError: root does not exist. NotADirectoryError: root is a file.
        ValueError: no image files under root.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such data folder")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: --data must be a folder of content images")
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in the folder or below it")
    return files


def load_training_image(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """Decode, resize the shorter side to image_size, centre crop a square. -> [3, S, S] float32 in [-1, 1].

    Raises:
        Exception: whatever Pillow raises for unreadable files (the stream catches and skips them).
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        w, h = im.size
        if w * h > Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"image is {w}x{h}, too large")
        im = ImageOps.exif_transpose(im).convert("RGB")
        s = image_size / min(w, h)
        nw, nh = max(image_size, round(w * s)), max(image_size, round(h * s))
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        im = im.crop((left, top, left + image_size, top + image_size))
        arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class ContentStream:
    """An endless, seeded, resumable stream of content batches from a list of image files.

    Args:
        files: image paths (their order matters: keep the list of the original run when resuming).
        image_size: side of the square crops.
        batch_size: images per batch.
        seed: seed of the per-epoch permutations.
        workers: threads decoding ahead (0 = decode in the calling thread); never changes the result.
    """

    def __init__(self, files: Sequence[str | os.PathLike], image_size: int, batch_size: int, seed: int = 0,
                 workers: int = 0):
        if not files:
            raise ValueError("no content images")
        if batch_size < 1 or image_size < 1:
            raise ValueError("batch size and image size must be >= 1")
        self.files = [Path(f) for f in files]
        self.image_size = image_size
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.cursor = 0  # files of the current epoch's permutation consumed so far
        self.bad: set[str] = set()  # files that could not be decoded (skipped)
        self.workers = workers
        self._perm = self._permutation(0)
        self._pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
        self._ahead: dict[tuple[int, int], Future] = {}

    # -- order ------------------------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.RandomState((self.seed + epoch) % 2**32).permutation(len(self.files))

    def _positions(self, count: int) -> list[tuple[int, int]]:
        """The next ``count`` (epoch, cursor) positions, without consuming them."""
        out, e, c = [], self.epoch, self.cursor
        for _ in range(count):
            if c >= len(self.files):
                e, c = e + 1, 0
            out.append((e, c))
            c += 1
        return out

    def _file_at(self, pos: tuple[int, int]) -> Path:
        e, c = pos
        perm = self._perm if e == self.epoch else self._permutation(e)
        return self.files[int(perm[c])]

    def _advance(self) -> None:
        self.cursor += 1
        if self.cursor >= len(self.files):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)

    # -- decoding ---------------------------------------------------------------------------------------

    def _decode(self, path: Path) -> torch.Tensor | str:
        try:
            return load_training_image(path, self.image_size)
        except Exception as exc:  # corrupt, truncated, unsupported: skip (returned as the error text)
            if isinstance(exc, (MemoryError, KeyboardInterrupt)):
                raise
            return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__

    def _result(self, pos: tuple[int, int]) -> torch.Tensor | str:
        fut = self._ahead.pop(pos, None)
        if fut is not None:
            return fut.result()
        return self._decode(self._file_at(pos))

    def _prefetch(self) -> None:
        if self._pool is None:
            return
        for pos in self._positions(self.batch_size * 2):
            if pos not in self._ahead:
                self._ahead[pos] = self._pool.submit(self._decode, self._file_at(pos))

    def next_batch(self) -> torch.Tensor:
        """The next batch. Returns [batch_size, 3, S, S] float32 in [-1, 1].

        Raises:
            ValueError: when no file in a whole pass over the data could be decoded.
        """
        images: list[torch.Tensor] = []
        misses = 0
        while len(images) < self.batch_size:
            self._prefetch()
            pos = (self.epoch, self.cursor)
            path = self._file_at(pos)
            res = self._result(pos)
            self._advance()
            if isinstance(res, str):
                misses += 1
                if str(path) not in self.bad:
                    self.bad.add(str(path))
                    warnings.warn(f"skipping unreadable training image {path}: {res}", stacklevel=2)
                if misses >= len(self.files):
                    raise ValueError(f"none of the {len(self.files)} training images could be read")
                continue
            misses = 0
            images.append(res)
        return torch.stack(images)

    def peek_readable(self, count: int) -> list[torch.Tensor]:
        """The first ``count`` readable images in sorted file order (fixed preview images); does not advance.

        Returns:
            Up to ``count`` tensors [3, S, S] in [-1, 1].
        """
        out: list[torch.Tensor] = []
        for p in self.files:
            if len(out) >= count:
                break
            res = self._decode(p)
            if not isinstance(res, str):
                out.append(res)
        return out

    # -- state ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready position of the stream: {"epoch", "cursor", "seed", "bad"}."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "bad": sorted(self.bad)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position (the file list must be the same)."""
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data stream seed {state['seed']} differs from {self.seed}")
        self._ahead.clear()
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.bad = set(state.get("bad", []))
        self._perm = self._permutation(self.epoch)

    def close(self) -> None:
        """Stop the decoding threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._ahead.clear()
