"""`fast_style` bundles: a feed-forward stylizer (Johnson et al., "Perceptual Losses for Real-Time Style Transfer and
Super-Resolution", ECCV 2016; stylizer.onnx, img [N, 3, H, W] in [-1, 1] -> same shape) for photos of any size up
to the bundle's model.max_size.

`await model.stylize(img_u8 [H, W, 3], deadline) -> img_u8 [H, W, 3]` is the whole runtime; the front ends reach it
through `stylize_photo` (StyleService.Stylize / StylizeStream) and the `<name>` inference endpoint (IMAGE UINT8
[-1, -1, -1, 3] -> STYLIZED, KServe v2). Images of different sizes cannot share a batch, so the batcher runs one
image at a time (it still gives the bounded queue, deadlines and cancellation).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np

from . import golden as G
from . import photo
from .backends import OrtGraph, SystemProbe, img_to_u8, u8_to_img
from .batcher import BatchItem
from .codecs import MIN_SIDE, decode_image
from .config import BatchConfig
from .errors import InvalidArgument
from .metrics import Metrics
from .models import LoadedModel, RequestContext, StyleOptions
from .tensors import Endpoint, TensorSpec, require_inputs

MIN_SIZE = MIN_SIDE  # the network's smallest input side (training.style.fast_style.MIN_SIZE)


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
        self.batcher = None
        self.executor: Executor | None = None

    def info(self) -> dict[str, Any]:
        d = super().info()
        d.update(max_size=self.max_size)
        return d

    @classmethod
    def _open(cls, path: Path, manifest: dict, version: str, *, backend: str, threads: int, batch: BatchConfig,
              probe: SystemProbe | None, providers: list[str] | None) -> "FastStyleModel":
        graph = OrtGraph(path / manifest["graphs"]["stylizer"]["file"], cls.ort_providers(providers), threads)
        return cls(manifest["name"], version, path, manifest, graph, batch)

    def run_float(self, img: np.ndarray) -> np.ndarray:
        return self.graph.run([self.output_name], {self.input_name: img})[0]

    def golden_checks(self, thorough: bool = False) -> list[G.Check]:
        """Every golden input (img_i, of different sizes) against its PyTorch output (out_i), max abs."""
        gold = G.Golden(self.path, self.manifest)
        checks = []
        i = 0
        while f"img_{i}" in gold and f"out_{i}" in gold:
            x, ref = gold[f"img_{i}"], gold[f"out_{i}"]
            checks.append(G.close("stylizer", f"out_{i}", self.run_float(x.astype(np.float32)), ref,
                                  gold.tolerance["max_abs_fp32"], f"{ref.shape[2]}x{ref.shape[3]}"))
            i += 1
        if not checks:
            raise G.BundleRefused("golden.npz holds no inputs")
        return checks

    # -- serving ----------------------------------------------------------------------------------------------

    def _run(self, batch_u8: np.ndarray) -> np.ndarray:
        """[B, H, W, 3] uint8 -> [B, H, W, 3] uint8 (blocking; in the inference pool)."""
        return img_to_u8(self.run_float(u8_to_img(batch_u8)))

    async def start(self, executor: Executor | None, metrics: Metrics | None) -> None:
        await super().start(executor, metrics)
        self.executor = executor
        self.batcher = self._batcher(self.name, self._run, 1, 0.0, executor, metrics)

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
        await self._close_runners([self.batcher], [])
        self.graph = None  # type: ignore[assignment]

    # -- what the front ends ask ------------------------------------------------------------------------------

    @property
    def stylizes_photos(self) -> bool:
        return True

    def check_stylize(self, ctx: RequestContext) -> None:
        pass

    async def stylize_photo(self, image: bytes, face: photo.FaceRequest, style: StyleOptions | None,
                            ctx: RequestContext) -> photo.PhotoResult:
        """Decode (thread pool), stylize the whole image (batcher); face options do not apply."""
        self.parse_style(style, ctx)
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        img = await loop.run_in_executor(ctx.pool, self.decode, image)
        t1 = time.perf_counter()
        stats: dict[str, float] = {}
        out = await self.stylize(img, ctx.deadline, stats)
        return photo.PhotoResult(out, seconds={"decode": t1 - t0, "synthesis": time.perf_counter() - t1,
                                               "queue": stats.get("queue_s", 0.0)})

    def endpoints(self) -> dict[str, Endpoint]:
        # -1: any height/width (checked against the bundle's max_size per image)
        return {"": Endpoint("", (TensorSpec("IMAGE", "UINT8", (-1, -1, -1, 3), description="RGB pixels"),),
                             (TensorSpec("STYLIZED", "UINT8", (-1, -1, -1, 3), description="same size"),),
                             description=f"photos of any size up to {self.max_size} px")}

    async def infer(self, suffix: str, inputs: dict[str, np.ndarray], params: dict[str, Any],
                    ctx: RequestContext) -> dict[str, np.ndarray]:
        if suffix != "":
            return await super().infer(suffix, inputs, params, ctx)
        require_inputs(inputs, ["IMAGE"])
        # One image per batcher row (sizes differ between requests); rows of one request run concurrently.
        rows = [np.ascontiguousarray(im) for im in inputs["IMAGE"]]
        out = await asyncio.gather(*(self.stylize(im, ctx.deadline) for im in rows))
        return {"STYLIZED": np.stack(out)}
