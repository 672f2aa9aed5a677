"""`fast_style` bundles: a feed-forward stylizer (stylizer.onnx, img [N, 3, H, W] in [-1, 1] -> same shape) for
photos of any size up to the bundle's model.max_size.

`await model.stylize(img_u8 [H, W, 3], deadline) -> img_u8 [H, W, 3]` is the whole interface the front ends
(StyleService.Stylize / StylizeStream, KServe v2) need; `decode_image` turns uploaded PNG / JPEG / WebP bytes into
img_u8 with every size check done before the pixels are decoded. Images of different sizes cannot share a batch,
so the batcher runs one image at a time (it still gives the bounded queue, deadlines and cancellation).
"""

from __future__ import annotations

import io
import logging
import warnings
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np

from protos.manifest import GOLDEN_NAME
from common.faces import to_rgb_u8

from .backends import OrtGraph, img_to_u8, ort_available_providers, u8_to_img
from .batcher import BatchItem, DynamicBatcher
from .config import BatchConfig
from .errors import InvalidArgument
from .logs import log
from .metrics import Metrics
from .models import BundleRefused, LoadedModel, check_bundle_files

logger = logging.getLogger("serving.fast_style")

MIN_SIZE = 5               # the network's smallest input side (training.style.fast_style.MIN_SIZE)
GOLDEN_MAX_ABS = 1e-4      # ONNX Runtime fp32 against the PyTorch outputs in golden.npz
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")


def decode_image(data: bytes, max_side: int, max_pixels: int | None = None) -> np.ndarray:
    """PNG / JPEG / WebP bytes -> img_u8 [H, W, 3] (EXIF orientation applied; grayscale, alpha over white,
    palette and 16-bit images converted to RGB8 by common.faces.to_rgb_u8). Blocking.

    The size is checked from the header before any pixel is decoded (decompression bombs never expand).

    Raises:
        InvalidArgument: empty, corrupt or unsupported data; a side > max_side or < MIN_SIZE; more than
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
    if min(arr.shape[0], arr.shape[1]) < MIN_SIZE:
        raise InvalidArgument(f"image: {arr.shape[1]}x{arr.shape[0]} is smaller than {MIN_SIZE}x{MIN_SIZE} px")
    return np.ascontiguousarray(arr)


class FastStyleModel(LoadedModel):
    """A fast_style bundle in ONNX Runtime."""

    kind = "fast_style"

    def __init__(self, name: str, version: str, path: Path, manifest: dict, graph: OrtGraph, batch: BatchConfig):
        super().__init__(name, version, path, manifest)
        m = manifest["model"]
        self.max_size = int(m["max_size"])
        g = manifest["graphs"]["stylizer"]
        self.input_name = next(iter(g["inputs"]))
        self.output_name = next(iter(g["outputs"]))
        self.graph = graph
        self.backend_name = f"onnxruntime:{graph.providers[0]}"
        self.max_batch = 1  # images of different sizes cannot be stacked
        self.batch_cfg = batch
        self.batcher: DynamicBatcher | None = None
        self.executor: Executor | None = None

    def info(self) -> dict[str, Any]:
        d = super().info()
        d.update(max_size=self.max_size)
        return d

    # -- loading (blocking; runs in a loader thread) ----------------------------------------------------------

    @classmethod
    def load(cls, path: Path, manifest: dict, version: str, *, backend: str = "auto", threads: int = 0,
             batch: BatchConfig | None = None, golden_check: bool = True, probe=None) -> "FastStyleModel":
        problems = check_bundle_files(path, manifest)
        if problems:
            raise BundleRefused("; ".join(problems))
        if backend == "tensorrt":
            raise BundleRefused("fast_style bundles have no TensorRT engines; serve them with onnxruntime or auto")
        providers = [p for p in ("CUDAExecutionProvider",) if p in ort_available_providers()]
        try:
            graph = OrtGraph(path / manifest["graphs"]["stylizer"]["file"], providers + ["CPUExecutionProvider"],
                             threads)
        except Exception as exc:
            raise BundleRefused(f"cannot load graphs: {exc}") from exc
        model = cls(manifest["name"], version, path, manifest, graph, batch or BatchConfig())
        if golden_check:
            model.check_golden()
        return model

    def run_float(self, img: np.ndarray) -> np.ndarray:
        return self.graph.run([self.output_name], {self.input_name: img})[0]

    def check_golden(self) -> None:
        """Every golden input (img_i) against its PyTorch output (out_i); raise BundleRefused beyond 1e-4."""
        gold = self.manifest.get("golden")
        if not gold:
            raise BundleRefused("the manifest lists no golden outputs (golden.npz); refusing an unchecked bundle")
        try:
            with np.load(self.path / gold.get("file", GOLDEN_NAME), allow_pickle=False) as g:
                pairs = [(g[f"img_{i}"], g[f"out_{i}"]) for i in range(len(g.files) // 2)]
        except (OSError, KeyError, ValueError) as exc:
            raise BundleRefused(f"golden.npz unreadable: {exc}") from exc
        if not pairs:
            raise BundleRefused("golden.npz holds no inputs")
        errs = []
        for x, ref in pairs:
            out = self.run_float(x.astype(np.float32))
            if out.shape != ref.shape:
                raise BundleRefused(f"golden check failed: stylizer output {out.shape}, golden {ref.shape}")
            errs.append(float(np.abs(out.astype(np.float64) - ref).max()))
        if max(errs) > GOLDEN_MAX_ABS:
            raise BundleRefused(f"golden check failed: stylizer max |out - golden| = {max(errs):.3g} "
                                f"(tolerance {GOLDEN_MAX_ABS})")
        log(logger, logging.INFO, "golden check passed", model=self.name, version=self.version,
            stylizer_max_abs=max(errs), sizes=[list(x.shape[2:]) for x, _ in pairs])

    # -- serving ----------------------------------------------------------------------------------------------

    def _run(self, batch_u8: np.ndarray) -> np.ndarray:
        """[B, H, W, 3] uint8 -> [B, H, W, 3] uint8 (blocking; in the inference pool)."""
        return img_to_u8(self.run_float(u8_to_img(batch_u8)))

    async def start(self, executor: Executor | None, metrics: Metrics | None) -> None:
        await super().start(executor, metrics)
        self.executor = executor
        b = self.batch_cfg
        self.batcher = DynamicBatcher(self.name, self._run, max_batch=1, max_queue_delay_s=0.0,
                                      max_queue=b.max_queue, executor=executor, metrics=metrics)
        self.batcher.start()

    def check_image(self, img_u8: np.ndarray) -> np.ndarray:
        if img_u8.ndim != 3 or img_u8.shape[2] != 3 or img_u8.dtype != np.uint8:
            raise InvalidArgument(f"image must be uint8 [H, W, 3], got {img_u8.dtype} {list(img_u8.shape)}")
        h, w = img_u8.shape[:2]
        if max(h, w) > self.max_size:
            raise InvalidArgument(f"image {w}x{h} exceeds the model's limit of {self.max_size}x{self.max_size} px")
        if min(h, w) < MIN_SIZE:
            raise InvalidArgument(f"image {w}x{h} is smaller than {MIN_SIZE}x{MIN_SIZE} px")
        return np.ascontiguousarray(img_u8)

    def decode(self, data: bytes) -> np.ndarray:
        """Blocking: decode_image with this model's size limit."""
        return decode_image(data, self.max_size)

    async def stylize(self, img_u8: np.ndarray, deadline: float | None = None,
                      stats: dict[str, float] | None = None) -> np.ndarray:
        """img_u8 [H, W, 3] -> stylized img_u8 [H, W, 3] through the batcher."""
        assert self.batcher is not None, "model not started"
        out, queue_s = await self.batcher.submit(self.check_image(img_u8)[None], deadline)
        if stats is not None:
            stats["queue_s"] = queue_s
        return out[0]

    def enqueue(self, img_u8: np.ndarray, deadline: float | None = None) -> BatchItem:
        """Queue one image without waiting: await the item's future, cancel it to drop the image."""
        assert self.batcher is not None, "model not started"
        return self.batcher.enqueue(self.check_image(img_u8)[None], deadline)[0]

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        self.graph = None  # type: ignore[assignment]
        log(logger, logging.INFO, "model unloaded", model=self.name, version=self.version)
