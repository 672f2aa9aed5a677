"""Loaded models: one version of one bundle, ready to run, with its own dynamic batcher.

`LoadedModel` is the protocol-independent interface every front end (StyleService, KServe v2) uses; `LatentModel`
is what the generator kinds share (mapping, truncation, the optional photo encoder), with `StyleGAN2Model` here and
`serving.dualstyle_model.DualStyleGANModel`. The kinds of bundle are dispatched on manifest["kind"] through
`MODEL_KINDS`; a kind this server cannot run is refused with a clear message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from protos.manifest import GOLDEN_NAME
from protos.manifest import check_bundle_files as _check_bundle_files

from . import latents as L
from .backends import OrtEncoder, OrtMapping, SystemProbe, create_synthesis, ort_available_providers
from .batcher import BatchItem, DynamicBatcher
from .config import BatchConfig
from .errors import InvalidArgument, ServingError
from .logs import log
from .metrics import Metrics

logger = logging.getLogger("serving.models")

# Golden check tolerances on uint8 images: (max level difference, fraction of values allowed to differ).
U8_TOLERANCE = {"fp32": (1, 0.01), "fp16": (8, 0.25)}
MAPPING_TOLERANCE = 1e-4
# The encoder is a deep ResNet: ONNX Runtime and PyTorch fp32 differ by float rounding accumulated over ~100 layers.
ENCODER_TOLERANCE = 1e-3


class BundleRefused(ValueError):
    """The bundle cannot be served (files, checksums, graphs, golden outputs, kind)."""


def check_bundle_files(bundle: Path, manifest: dict) -> list[str]:
    """Every listed file exists with its size and sha256; no unlisted (non-hidden) files."""
    return _check_bundle_files(bundle, manifest, ignore_hidden=True)


class LoadedModel:
    """One loaded version of a bundle. Requests hold a lease (`Lease`) while they use it, so a replaced or
    removed version finishes its in-flight requests before `retire` closes it."""

    kind = "?"

    def __init__(self, name: str, version: str, path: Path, manifest: dict):
        self.name = name
        self.version = version
        self.path = path
        self.manifest = manifest
        self.backend_name = ""
        self.max_batch = 1
        self.manifest_sha = ""
        self.accepting = True
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self.loaded_at = time.time()

    @property
    def description(self) -> str:
        return str(self.manifest.get("description") or self.manifest.get("model", {}).get("description") or "")

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "version": self.version, "backend": self.backend_name,
                "max_batch": self.max_batch, "description": self.description, "bundle": self.path.name}

    # Leases (event-loop thread only)
    def _acquire(self) -> None:
        self._in_flight += 1
        if self._idle is not None:
            self._idle.clear()

    def _release(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def start(self, executor: Executor | None, metrics: Metrics | None) -> None:
        self._idle = asyncio.Event()
        if self._in_flight == 0:
            self._idle.set()

    async def retire(self) -> None:
        """Stop taking requests, wait for those in flight, release resources."""
        self.accepting = False
        if self._idle is not None:
            await self._idle.wait()
        await self.close()

    async def close(self) -> None:
        pass


class Lease:
    """`with repository.acquire(name) as model:` keeps that version alive until the block ends."""

    def __init__(self, model: LoadedModel):
        self.model = model
        model._acquire()
        self._released = False

    def __enter__(self) -> LoadedModel:
        return self.model

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.model._release()


class LatentModel(LoadedModel):
    """What the generator-family bundles (stylegan2, dualstylegan) share: mapping.onnx (z -> w, run per request), the
    latent geometry, the truncation rule and the optional photo encoder (encoder.onnx, dynamically batched).

    `await map_w(z)` / `await seeds_to_w(seeds)` -> untruncated w [N, w_dim]; `to_ws(w, psi, cutoff)` -> ws
    truncated towards `trunc_origin` (stylegan2: w_avg; dualstylegan: 0); a bundle with encoder.onnx adds
    `await encode(aligned_u8, deadline)` -> ws [N, num_ws, w_dim]. Subclasses add synthesis and `render_faces`.
    """

    def __init__(self, name: str, version: str, path: Path, manifest: dict, mapping: OrtMapping, batch: BatchConfig,
                 encoder: OrtEncoder | None = None):
        super().__init__(name, version, path, manifest)
        self.encoder = encoder
        self.encoder_info: dict = dict(manifest.get("encoder") or {}) if encoder is not None else {}
        self.encoder_batcher: DynamicBatcher | None = None
        m = manifest["model"]
        self.latent_space = str(m.get("latent_space") or "")
        self.resolution = int(m["resolution"])
        self.z_dim, self.w_dim, self.num_ws = int(m["z_dim"]), int(m["w_dim"]), int(m["num_ws"])
        self.default_psi = float(m["default_psi"])
        self.trunc_origin = np.zeros(self.w_dim, dtype=np.float32)  # set by subclasses
        self.mapping = mapping
        self.batch_cfg = batch
        self.executor: Executor | None = None

    def info(self) -> dict[str, Any]:
        d = super().info()
        d.update(resolution=self.resolution, z_dim=self.z_dim, w_dim=self.w_dim, num_ws=self.num_ws,
                 default_psi=self.default_psi, has_encoder=self.encoder is not None, latent_space=self.latent_space)
        return d

    @property
    def encoder_size(self) -> int:
        """Side of the aligned crops the encoder takes (0 = no encoder)."""
        return int(self.encoder_info.get("input_size", 0))

    @staticmethod
    def load_encoder(path: Path, manifest: dict, threads: int) -> OrtEncoder | None:
        """encoder.onnx of the bundle (CUDA execution provider when available), or None."""
        graphs = manifest["graphs"]
        if "encoder" not in graphs:
            return None
        providers = [p for p in ("CUDAExecutionProvider",) if p in ort_available_providers()]
        return OrtEncoder(path / graphs["encoder"]["file"], providers + ["CPUExecutionProvider"], threads)

    def warm_face_models(self) -> None:
        """Load dlib's face models now (once per process, ~1 s), not on the first Stylize request. Missing models
        only disable Stylize (it answers FAILED_PRECONDITION); Generate keeps working."""
        from common.faces import FaceModelsError, get_aligner
        try:
            get_aligner()
        except FaceModelsError as exc:
            log(logger, logging.WARNING, "face models unavailable: Stylize disabled", model=self.name, error=str(exc))

    def _check_golden_encoder(self) -> float:
        """The encoder on golden aligned crops against the PyTorch ws; raise BundleRefused beyond the tolerance."""
        keys = self.encoder_info["golden"]
        try:
            with np.load(self.path / self.manifest["golden"].get("file", GOLDEN_NAME), allow_pickle=False) as g:
                img_u8, ref = g[keys["img_u8"]], g[keys["ws"]]
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise BundleRefused(f"golden.npz: encoder inputs unreadable: {exc}") from exc
        ws = self.encoder(img_u8)
        if ws.shape != ref.shape or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise BundleRefused(f"golden check failed: encoder output {list(ws.shape)}, golden {list(ref.shape)}, "
                                f"synthesis takes [N, {self.num_ws}, {self.w_dim}]")
        err = float(np.abs(ws.astype(np.float64) - ref).max())
        if not err <= ENCODER_TOLERANCE:
            raise BundleRefused(f"golden check failed: encoder max |ws - golden| = {err:.3g} "
                                f"(tolerance {ENCODER_TOLERANCE})")
        return err

    # -- serving ----------------------------------------------------------------------------------------------

    async def start(self, executor: Executor | None, metrics: Metrics | None) -> None:
        """Start the dynamic batchers: synthesis (`self.synthesis`, up to `self.max_batch` rows, set by the
        subclass) and, with encoder.onnx, the encoder's."""
        await super().start(executor, metrics)
        self.executor = executor
        b = self.batch_cfg
        self.batcher = DynamicBatcher(self.name, self.synthesis, max_batch=self.max_batch,
                                      max_queue_delay_s=b.max_queue_delay_ms / 1000, max_queue=b.max_queue,
                                      executor=executor, metrics=metrics)
        self.batcher.start()
        if self.encoder is not None:
            b = self.batch_cfg
            self.encoder_batcher = DynamicBatcher(f"{self.name}.encoder", self.encoder, max_batch=b.max_batch,
                                                  max_queue_delay_s=b.max_queue_delay_ms / 1000,
                                                  max_queue=b.max_queue, executor=executor, metrics=metrics)
            self.encoder_batcher.start()

    async def encode(self, aligned_u8: np.ndarray, deadline: float | None = None,
                     stats: dict[str, float] | None = None) -> np.ndarray:
        """FFHQ-aligned crops img_u8 [N, S, S, 3] (S = encoder_size) -> ws [N, num_ws, w_dim] float32."""
        if self.encoder_batcher is None:
            raise ServingError(f"model {self.name!r} has no encoder", code="FAILED_PRECONDITION")
        s = self.encoder_size
        if aligned_u8.ndim != 4 or aligned_u8.shape[1:] != (s, s, 3) or aligned_u8.dtype != np.uint8:
            raise InvalidArgument(f"aligned faces must be uint8 [N, {s}, {s}, 3], got {aligned_u8.dtype} "
                                  f"{list(aligned_u8.shape)}")
        out, queue_s = await self.encoder_batcher.submit(np.ascontiguousarray(aligned_u8), deadline)
        if stats is not None:
            stats["encoder_queue_s"] = queue_s
        return out

    def psi_or_default(self, psi: float | None) -> float:
        return self.default_psi if psi is None else float(psi)

    def check_cutoff(self, cutoff: int | None) -> None:
        if cutoff is not None and not 0 <= cutoff <= self.num_ws:
            raise InvalidArgument(f"truncation cutoff {cutoff} out of range 0..{self.num_ws}")

    async def map(self, z: np.ndarray, psi: float | None = None, cutoff: int | None = None,
                  ) -> tuple[np.ndarray, np.ndarray]:
        """z [N, z_dim] -> (w [N, w_dim], ws [N, num_ws, w_dim] truncated with psi on layers [0, cutoff))."""
        w = await self.map_w(z)
        return w, self.to_ws(w, psi, cutoff)

    async def map_w(self, z: np.ndarray) -> np.ndarray:
        """z [N, z_dim] -> untruncated w [N, w_dim] (in the inference thread pool)."""
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise InvalidArgument(f"z must be [N, {self.z_dim}], got {list(z.shape)}")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.mapping, np.ascontiguousarray(z, np.float32))

    async def seeds_to_w(self, seeds: list[int]) -> np.ndarray:
        """seeds -> untruncated w [N, w_dim]: seed -> z and the mapping, both in the inference thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: self.mapping(L.seeds_to_z(seeds, self.z_dim)))

    def to_ws(self, w: np.ndarray, psi: float | None = None, cutoff: int | None = None) -> np.ndarray:
        """w [N, w_dim] or ws [N, num_ws, w_dim] -> ws truncated towards trunc_origin (numpy; psi None =
        default_psi)."""
        self.check_cutoff(cutoff)
        return L.truncate(L.broadcast(w, self.num_ws), self.trunc_origin, self.psi_or_default(psi), cutoff)

    def _check_ws(self, ws: np.ndarray) -> np.ndarray:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise InvalidArgument(f"ws must be [N, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}")
        return np.ascontiguousarray(ws, dtype=np.float32)

    async def _close_runners(self, batchers: list, runners: list) -> None:
        for batcher in batchers:
            if batcher is not None:
                await batcher.close()
        for runner in runners:
            if runner is None:
                continue
            try:
                runner.close()
            except Exception as exc:  # never let a failing close stop an unload
                log(logger, logging.WARNING, "close failed", model=self.name, error=repr(exc))
        log(logger, logging.INFO, "model unloaded", model=self.name, version=self.version)


class StyleGAN2Model(LatentModel):
    """A StyleGAN2 bundle: mapping.onnx (z -> w, run per request) and synthesis (ws -> uint8, dynamically batched).

    `await map(z, psi, cutoff)` -> (w [N, w_dim], ws [N, num_ws, w_dim]) and
    `await synthesize(ws, deadline)` -> img_u8 [N, R, R, 3] are the whole interface the front ends need; a bundle
    with encoder.onnx adds `await encode(aligned_u8, deadline)` -> ws (dynamically batched too).
    """

    kind = "stylegan2"

    def __init__(self, name: str, version: str, path: Path, manifest: dict, mapping: OrtMapping, synthesis,
                 batch: BatchConfig, encoder: OrtEncoder | None = None):
        super().__init__(name, version, path, manifest, mapping, batch, encoder)
        self.w_avg = np.asarray(manifest["model"]["w_avg"], dtype=np.float32)
        self.trunc_origin = self.w_avg
        self.synthesis = synthesis
        self.backend_name = synthesis.name
        self.precision = getattr(synthesis, "precision", "fp32")
        limit = getattr(synthesis, "max_batch", None)
        self.max_batch = min(batch.max_batch, limit) if limit else batch.max_batch
        self.batcher: DynamicBatcher | None = None

    # -- loading (blocking; runs in a loader thread) ----------------------------------------------------------

    @classmethod
    def load(cls, path: Path, manifest: dict, version: str, *, backend: str = "auto", threads: int = 0,
             batch: BatchConfig | None = None, golden_check: bool = True,
             probe: SystemProbe | None = None) -> "StyleGAN2Model":
        problems = check_bundle_files(path, manifest)
        if problems:
            raise BundleRefused("; ".join(problems))
        graphs = manifest["graphs"]
        try:
            mapping = OrtMapping(path / graphs["mapping"]["file"], threads)
            synthesis = create_synthesis(path, manifest, backend, threads, probe)
            encoder = cls.load_encoder(path, manifest, threads)
        except ServingError:
            raise
        except Exception as exc:  # ORT refuses a graph, TensorRT forced but unusable, ...
            raise BundleRefused(f"cannot load graphs: {exc}") from exc
        model = cls(manifest["name"], version, path, manifest, mapping, synthesis, batch or BatchConfig(), encoder)
        if golden_check:
            model.check_golden()
        if encoder is not None or model.latent_space:
            model.warm_face_models()
        return model

    def check_golden(self) -> None:
        """Run golden.npz through mapping and synthesis; raise BundleRefused outside the tolerances."""
        gold = self.manifest.get("golden")
        if not gold:
            raise BundleRefused("the manifest lists no golden outputs (golden.npz); refusing an unchecked bundle")
        try:
            with np.load(self.path / gold.get("file", GOLDEN_NAME), allow_pickle=False) as g:
                ref = {k: g[k] for k in ("z", "psi", "w", "ws", "img_u8")}
        except (OSError, KeyError, ValueError) as exc:
            raise BundleRefused(f"golden.npz unreadable: {exc}") from exc
        w = self.mapping(ref["z"].astype(np.float32))
        err_w = float(np.abs(w - ref["w"]).max())
        ws = np.stack([L.truncate(L.broadcast(w[i: i + 1], self.num_ws), self.w_avg, float(p))[0]
                       for i, p in enumerate(ref["psi"])])
        err_ws = float(np.abs(ws - ref["ws"]).max())
        if not (err_w <= MAPPING_TOLERANCE and err_ws <= MAPPING_TOLERANCE):
            raise BundleRefused(f"golden check failed: mapping max |w - golden| = {err_w:.3g}, "
                                f"|ws - golden| = {err_ws:.3g} (tolerance {MAPPING_TOLERANCE})")
        img = self.synthesis(ref["ws"].astype(np.float32))
        max_diff, frac = check_u8_golden(img, ref["img_u8"], self.precision)
        err_enc = self._check_golden_encoder() if self.encoder is not None else None
        log(logger, logging.INFO, "golden check passed", model=self.name, version=self.version,
            mapping_max_abs=err_w, synthesis_max_diff=max_diff, synthesis_frac_diff=frac,
            encoder_max_abs=err_enc)

    # -- serving ----------------------------------------------------------------------------------------------

    async def synthesize(self, ws: np.ndarray, deadline: float | None = None,
                         stats: dict[str, float] | None = None) -> np.ndarray:
        """ws [N, num_ws, w_dim] float32 -> img_u8 [N, R, R, 3] through the dynamic batcher.

        Args:
            deadline: absolute time.monotonic() after which queued rows are dropped (DeadlineExceeded).
            stats: filled with queue_s, the longest time one of the rows waited in the queue.
        """
        assert self.batcher is not None, "model not started"
        out, queue_s = await self.batcher.submit(self._check_ws(ws), deadline)
        if stats is not None:
            stats["queue_s"] = queue_s
        return out

    async def render_faces(self, ws: np.ndarray, psi: float | None, deadline: float | None,
                           stats: dict[str, float], style=None, exemplar_ws: np.ndarray | None = None) -> np.ndarray:
        """Encoded faces ws [F, num_ws, w_dim] (untruncated) -> crops img_u8 [F, R, R, 3]: psi (None = 1, none)
        pulls towards w_avg, then the batched synthesis. `style` / `exemplar_ws` must be None (dualstylegan only)."""
        if style is not None or exemplar_ws is not None:
            raise InvalidArgument(f"model {self.name!r} is a stylegan2 model: dualstyle options do not apply")
        if psi is not None:
            ws = L.truncate(ws, self.w_avg, psi, None)
        return await self.synthesize(ws, deadline, stats)

    def enqueue(self, ws: np.ndarray, deadline: float | None = None) -> list[BatchItem]:
        """Queue rows without waiting (streams): await each item's future, cancel it to drop the row."""
        assert self.batcher is not None, "model not started"
        return self.batcher.enqueue(self._check_ws(ws), deadline)

    async def close(self) -> None:
        await self._close_runners([self.batcher, self.encoder_batcher], [self.synthesis, self.mapping, self.encoder])


def check_u8_golden(img: np.ndarray, ref: np.ndarray, precision: str) -> tuple[int, float]:
    """A synthesis output img_u8 against its golden uint8 image; BundleRefused outside U8_TOLERANCE.

    Returns:
        (max level difference, fraction of values that differ).
    """
    if img.shape != ref.shape:
        raise BundleRefused(f"golden check failed: synthesis output {img.shape}, golden {ref.shape}")
    diff = np.abs(img.astype(np.int16) - ref.astype(np.int16))
    frac = float((diff > 0).mean())
    max_diff, max_frac = U8_TOLERANCE.get(precision, U8_TOLERANCE["fp16"])
    if int(diff.max()) > max_diff or frac > max_frac:
        raise BundleRefused(f"golden check failed: synthesis differs from golden by up to {int(diff.max())} "
                            f"levels in {frac:.2%} of values (tolerance {max_diff} / {max_frac:.0%})")
    return int(diff.max()), frac


def _unsupported(kind: str) -> Callable[..., LoadedModel]:
    def load(*args, **kwargs) -> LoadedModel:
        raise BundleRefused(f"bundle kind {kind!r} is not supported by this server version "
                            f"(supported: {', '.join(k for k, v in MODEL_KINDS.items() if v is not None)})")
    return load


def _load_fast_style(*args, **kwargs) -> LoadedModel:
    from .fast_style_model import FastStyleModel  # imports this module: import it at call time
    return FastStyleModel.load(*args, **kwargs)


def _load_dualstylegan(*args, **kwargs) -> LoadedModel:
    from .dualstyle_model import DualStyleGANModel  # imports this module: import it at call time
    return DualStyleGANModel.load(*args, **kwargs)


# manifest["kind"] -> loader(path, manifest, version, **options); None marks a kind still to come.
MODEL_KINDS: dict[str, Callable[..., LoadedModel] | None] = {
    "stylegan2": StyleGAN2Model.load,
    "fast_style": _load_fast_style,
    "dualstylegan": _load_dualstylegan,
}


def loader_for(kind: str) -> Callable[..., LoadedModel]:
    fn = MODEL_KINDS.get(kind)
    return fn if fn is not None else _unsupported(kind)

