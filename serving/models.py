"""Loaded models: the protocol-neutral interface every kind of bundle implements and every front end uses.

`LoadedModel` is one version of one bundle with its own dynamic batcher(s). Front ends (StyleService, KServe v2 gRPC,
HTTP/REST) never test a model's class: they ask its capabilities (`generates`, `stylizes_photos`, `style_library`,
`endpoints`) and call the protocol-neutral methods (`infer`, `stylize_photo`, and for generators `to_ws` /
`synthesize` / `enqueue`). `LatentModel` is what the generator kinds share (mapping, truncation, the optional photo
encoder, their inference endpoints). The kinds live in their own modules (serving.stylegan2_model,
serving.dualstyle_model, serving.fast_style_model) and register in serving.kinds; this module imports none of them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protos.manifest import check_bundle_files as _check_bundle_files

from . import golden as G
from . import latents as L
from . import photo
from .backends import OrtEncoder, OrtMapping, SystemProbe, ort_available_providers
from .batcher import BatchItem, DynamicBatcher
from .codecs import encode
from .config import BatchConfig, Limits
from .errors import BundleRefused, InvalidArgument, ModelNotFound, ServingError
from .logs import log
from .metrics import Metrics
from .tensors import Endpoint, ParamSpec, TensorSpec, require_inputs

__all__ = ["BundleRefused", "LatentModel", "Lease", "LoadedModel", "RequestContext", "StyleLibrary", "StyleOptions",
           "check_bundle_files"]

logger = logging.getLogger("serving.models")

SYNTHESIS = ".synthesis"  # inference endpoint suffixes of the generator kinds
STYLIZE = ".stylize"


def check_bundle_files(bundle: Path, manifest: dict) -> list[str]:
    """Every listed file exists with its size and sha256; no unlisted (non-hidden) files."""
    return _check_bundle_files(bundle, manifest, ignore_hidden=True)


@dataclass
class RequestContext:
    """What a front end hands a model with a request besides its data: the repository (the encoder serving a latent
    space), the request limits, the thread pool for blocking work (decode, align, image encoding) and the absolute
    time.monotonic() deadline (None = none)."""

    repo: Any
    limits: Limits
    pool: Executor | None = None
    deadline: float | None = None


@dataclass(frozen=True)
class StyleOptions:
    """Extrinsic style options of a request as a protocol gives them (StyleService `dualstyle`, KServe parameters),
    not yet checked against a model: at most one source (library id or name, exemplar image, exstyle_z / exstyle_w as
    (shape, values)), per-layer weights, preserve_color. `where` prefixes error messages ("dualstyle", "parameter")."""

    style_id: int | None = None
    style_name: str | None = None
    image: bytes | None = None
    exstyle_z: tuple[tuple[int, ...], list[float]] | None = None
    exstyle_w: tuple[tuple[int, ...], list[float]] | None = None
    weights: list[float] | None = None
    preserve_color: bool = False
    where: str = "dualstyle"

    PARAMS = ("style_id", "weights", "preserve_color")  # the inference-protocol parameters that carry a style

    def what(self, field: str) -> str:
        return f"parameter {field!r}" if self.where == "parameter" else f"{self.where}.{field}"

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "StyleOptions | None":
        """Inference-protocol parameters `style_id` (int64, or a style name as string), `weights` (string
        "w0,w1,..."), `preserve_color` (bool) -> StyleOptions; None when none is given."""
        if not any(k in params for k in cls.PARAMS):
            return None
        sid = params.get("style_id")
        weights = params.get("weights")
        if weights is not None:
            if not isinstance(weights, str):
                raise InvalidArgument(f"parameter 'weights': expected a string 'w0,w1,...', got {weights!r}")
            try:
                weights = [float(v) for v in weights.replace(" ", "").split(",") if v != ""]
            except ValueError:
                raise InvalidArgument(f"parameter 'weights': expected comma-separated numbers, got "
                                      f"{params['weights']!r}") from None
        if sid is not None and (isinstance(sid, bool) or not isinstance(sid, (int, str))):
            raise InvalidArgument(f"parameter 'style_id': an int64 id or a style name, got {sid!r}")
        return cls(style_id=sid if isinstance(sid, int) else None, style_name=sid if isinstance(sid, str) else None,
                   weights=weights, preserve_color=bool(params.get("preserve_color", False)), where="parameter")


@dataclass(frozen=True)
class StyleLibrary:
    """A model's style library (ListStyles): names in id order, default per-layer weights, the layer split."""

    names: list[str]
    default_weights: list[float]
    num_ws: int
    res_index: int


class LoadedModel:
    """One loaded version of a bundle. Requests hold a lease (`Lease`) while they use it, so a replaced or
    removed version finishes its in-flight requests before `retire` closes it.

    A kind subclasses it and provides `_open` (build the runners; the bundle's files are already checked),
    `golden_checks`, and whichever capabilities it has.
    """

    kind = "?"
    generates = False            # Generate / GenerateStream: latents -> images (LatentModel)
    serves_engines = False       # may run a TensorRT engine of the bundle (backend "tensorrt")
    encoder = None               # a photo encoder runner (generator kinds with encoder.onnx)
    latent_space = ""

    def __init__(self, name: str, version: str, path: Path, manifest: dict):
        self.name = name
        self.version = version
        self.path = path
        self.manifest = manifest
        self.backend_name = ""
        self.max_batch = 1
        self.batch_cfg = BatchConfig()
        self.manifest_sha = ""
        self.accepting = True
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self.loaded_at = time.time()

    # -- loading (blocking; runs in a loader thread) ----------------------------------------------------------

    @classmethod
    def load(cls, path: Path, manifest: dict, version: str, *, backend: str = "auto", threads: int = 0,
             batch: BatchConfig | None = None, golden_check: bool = True, probe: SystemProbe | None = None,
             providers: list[str] | None = None, warm: bool = True, check_files: bool = True) -> "LoadedModel":
        """Check the bundle's files, open its graphs, run the golden checks (unless golden_check=False).

        Args:
            backend: "auto" | "onnxruntime" | "tensorrt" (only for kinds that serve engines).
            providers: ONNX Runtime execution providers for every graph (default: CUDA when available, else CPU).
            warm: load what the first request would otherwise wait for (the face models); off for verify.
            check_files: check every file against the manifest's sha256 first (off when the caller just did).
        Raises:
            BundleRefused: files, graphs, golden outputs or the backend do not fit.
        """
        problems = check_bundle_files(path, manifest) if check_files else []
        if problems:
            raise BundleRefused("; ".join(problems))
        if backend == "tensorrt" and not cls.serves_engines:
            raise BundleRefused(f"{cls.kind} bundles have no TensorRT engines; serve them with onnxruntime or auto")
        try:
            model = cls._open(path, manifest, version, backend=backend, threads=threads, batch=batch or BatchConfig(),
                              probe=probe, providers=providers)
        except (ServingError, BundleRefused):
            raise
        except Exception as exc:  # ORT refuses a graph, wrong graph signature, TensorRT forced but unusable, ...
            raise BundleRefused(f"cannot load graphs: {exc}") from exc
        if golden_check:
            model.check_golden()
        if warm:
            model.after_load()
        return model

    @classmethod
    def _open(cls, path: Path, manifest: dict, version: str, *, backend: str, threads: int, batch: BatchConfig,
              probe: SystemProbe | None, providers: list[str] | None) -> "LoadedModel":
        raise NotImplementedError

    @staticmethod
    def ort_providers(providers: list[str] | None) -> list[str]:
        """The execution providers of a batched graph: the given ones, else CUDA when available, then CPU."""
        if providers:
            return list(providers)
        return [p for p in ("CUDAExecutionProvider",) if p in ort_available_providers()] + ["CPUExecutionProvider"]

    def after_load(self) -> None:
        """Warm-up after the golden checks passed (blocking)."""

    # -- golden checks ----------------------------------------------------------------------------------------

    def golden_checks(self, thorough: bool = False) -> list[G.Check]:
        """Run golden.npz through this model's own runners, with the manifest's tolerances.

        Args:
            thorough: also check what this server would not run (every graph output, graph variants such as the fp16
                synthesis), as `stylecast export verify` does.
        Raises:
            BundleRefused: golden.npz unreadable or lacking an array.
        """
        raise NotImplementedError

    @classmethod
    def engine_checks(cls, bundle: Path, manifest: dict, entry: dict) -> list[G.Check]:
        """The golden checks of one TensorRT engine of a bundle, on this machine (serving.verify; the server runs
        the same ones on the engine it serves with)."""
        return [G.Check(f"engine.{entry.get('precision', '?')}", "*", math.nan, math.nan, False,
                        f"{entry.get('file')}: {cls.kind} bundles carry no TensorRT engines")]

    def check_golden(self) -> None:
        """The golden checks the server runs before READY; BundleRefused naming the first one outside tolerance."""
        checks = self.golden_checks()
        G.require(checks)
        log(logger, logging.INFO, "golden check passed", model=self.name, version=self.version, kind=self.kind,
            **{f"{c.graph}_{c.output}_max_abs": c.max_abs for c in checks})

    # -- what the front ends ask ------------------------------------------------------------------------------

    @property
    def description(self) -> str:
        return str(self.manifest.get("description") or self.manifest.get("model", {}).get("description") or "")

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "version": self.version, "backend": self.backend_name,
                "max_batch": self.max_batch, "description": self.description, "bundle": self.path.name}

    @property
    def stylizes_photos(self) -> bool:
        """Whether Stylize can work on this model at all (an encoder may still have to be loaded)."""
        return False

    @property
    def uses_face_encoder(self) -> bool:
        """Whether Stylize goes through a face encoder (the repository's `encoder_for`)."""
        return False

    def style_library(self) -> StyleLibrary | None:
        """The style library (ListStyles), or None for a model without one."""
        return None

    def endpoints(self) -> dict[str, Endpoint]:
        """The inference-protocol models of this bundle by name suffix ("" = the bundle's own name)."""
        return {}

    async def infer(self, suffix: str, inputs: dict[str, np.ndarray], params: dict[str, Any],
                    ctx: RequestContext) -> dict[str, np.ndarray]:
        """Run one inference request of endpoint `suffix` on inputs already decoded against its TensorSpecs.

        Returns:
            {output name: array [N, ...]} (BYTES outputs as object arrays of bytes).
        """
        raise ModelNotFound(f"model {self.name!r} has no inference endpoint {suffix!r}")

    def check_stylize(self, ctx: RequestContext) -> None:
        """Raise FAILED_PRECONDITION now (before any work) when Stylize cannot run on this model."""
        raise ServingError(f"model {self.name!r} is a {self.kind!r} model, which cannot stylize photos",
                           code="FAILED_PRECONDITION")

    async def stylize_photo(self, image: bytes, face: photo.FaceRequest, style: StyleOptions | None,
                            ctx: RequestContext) -> photo.PhotoResult:
        """One uploaded photo (encoded bytes) -> the stylized image."""
        self.check_stylize(ctx)
        raise NotImplementedError(f"{type(self).__name__} accepts photos but implements no stylize_photo")

    def parse_style(self, opts: StyleOptions | None, ctx: RequestContext) -> Any:
        """Style options -> this model's checked style request (None = the model's default); a model without a
        style library takes none (INVALID_ARGUMENT)."""
        if opts is not None:
            raise InvalidArgument(f"{opts.where}: model {self.name!r} is a {self.kind!r} model, which takes no "
                                  f"{opts.where} options (it has no style library)")
        return None

    # -- leases (event-loop thread only) ----------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

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

    def _batcher(self, name: str, run, max_batch: int, delay_s: float | None, executor: Executor | None,
                 metrics: Metrics | None) -> DynamicBatcher:
        """A started dynamic batcher of this model (queue size and delay from its batch config)."""
        b = self.batch_cfg
        batcher = DynamicBatcher(name, run, max_batch=max_batch,
                                 max_queue_delay_s=b.max_queue_delay_ms / 1000 if delay_s is None else delay_s,
                                 max_queue=b.max_queue, executor=executor, metrics=metrics)
        batcher.start()
        return batcher

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


# ----------------------------------------------------------------------------------------------------------
# The generator kinds


class LatentModel(LoadedModel):
    """What the generator-family bundles (stylegan2, dualstylegan) share: mapping.onnx (z -> w, run per request), the
    latent geometry, the truncation rule, the optional photo encoder (encoder.onnx, dynamically batched) and their
    inference endpoints (`<name>`: seeds or z, `<name>.synthesis`: ws, `<name>.stylize`: face photos).

    `await map_w(z)` / `await seeds_to_w(seeds)` -> untruncated w [N, w_dim]; `to_ws(w, psi, cutoff)` -> ws truncated
    towards `trunc_origin` (stylegan2: w_avg; dualstylegan: 0); `await synthesize(ws, deadline, stats, style=,
    content_ws=)` -> img_u8 [N, R, R, 3] and `enqueue(...)` (streams) run the batched synthesis with the model's
    parsed style (None for stylegan2); a bundle with encoder.onnx adds `await encode(aligned_u8, deadline)` -> ws.
    Subclasses provide the synthesis (`_run_synthesis` rows), `render_faces` and their tensors (`extra_inputs`).
    """

    generates = True

    def __init__(self, name: str, version: str, path: Path, manifest: dict, mapping: OrtMapping, batch: BatchConfig,
                 encoder: OrtEncoder | None = None):
        super().__init__(name, version, path, manifest)
        self.encoder = encoder
        self.encoder_info: dict = dict(manifest.get("encoder") or {}) if encoder is not None else {}
        self.encoder_batcher: DynamicBatcher | None = None
        self.batcher: DynamicBatcher | None = None
        m = manifest["model"]
        self.latent_space = str(m.get("latent_space") or "")
        self.resolution = int(m["resolution"])
        self.z_dim, self.w_dim, self.num_ws = int(m["z_dim"]), int(m["w_dim"]), int(m["num_ws"])
        self.default_psi = float(m["default_psi"])
        self.trunc_origin = np.zeros(self.w_dim, dtype=np.float32)  # set by subclasses
        self.mapping = mapping
        self.batch_cfg = batch
        self.max_batch = batch.max_batch
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
    def load_encoder(path: Path, manifest: dict, threads: int, providers: list[str] | None = None) -> OrtEncoder | None:
        """encoder.onnx of the bundle (CUDA execution provider when available), or None."""
        graphs = manifest["graphs"]
        if "encoder" not in graphs:
            return None
        return OrtEncoder(path / graphs["encoder"]["file"], LoadedModel.ort_providers(providers), threads)

    def after_load(self) -> None:
        """Load dlib's face models now (once per process, ~1 s), not on the first Stylize request. Missing models
        only disable Stylize (it answers FAILED_PRECONDITION); Generate keeps working."""
        if self.encoder is None and not self.latent_space:
            return
        from common.faces import FaceModelsError, get_aligner
        try:
            get_aligner()
        except FaceModelsError as exc:
            log(logger, logging.WARNING, "face models unavailable: Stylize disabled", model=self.name, error=str(exc))

    # -- golden checks shared by the generator kinds ----------------------------------------------------------

    def mapping_checks(self, gold: G.Golden) -> list[G.Check]:
        """mapping.onnx on golden z against golden w, and this model's numpy truncation of it (per row psi, towards
        trunc_origin) against golden ws: the very path Generate takes."""
        tol = gold.tolerance["max_abs_fp32"]
        w = self.mapping(gold["z"].astype(np.float32))
        ws = np.concatenate([self.to_ws(w[i: i + 1], float(p)) for i, p in enumerate(gold["psi"])])
        return [G.close("mapping", "w", w, gold["w"], tol), G.close("mapping", "ws", ws, gold["ws"], tol)]

    def encoder_checks(self, gold: G.Golden) -> list[G.Check]:
        """The encoder on golden aligned crops against the PyTorch ws (none without an encoder)."""
        if self.encoder is None:
            return []
        keys = self.encoder_info["golden"]
        ws = self.encoder(gold[keys["img_u8"]])
        ref = gold[keys["ws"]]
        if ws.shape[1:] != (self.num_ws, self.w_dim):
            return [G.Check("encoder", "ws", math.nan, math.nan, False,
                            f"encoder output {list(ws.shape)}; synthesis takes [N, {self.num_ws}, {self.w_dim}]")]
        return [G.close("encoder", "ws", ws, ref, gold.tolerance["max_abs_encoder"])]

    # -- serving ----------------------------------------------------------------------------------------------

    @property
    def stylizes_photos(self) -> bool:
        return self.encoder is not None or bool(self.latent_space)

    @property
    def uses_face_encoder(self) -> bool:
        return True

    def _run_synthesis(self, rows: np.ndarray) -> np.ndarray:
        """A batch of synthesis rows -> img_u8 [B, R, R, 3] (blocking; in the inference pool)."""
        raise NotImplementedError

    def _rows(self, ws: np.ndarray, style: Any, content_ws: np.ndarray | None) -> np.ndarray:
        """The batcher rows of truncated ws [N, num_ws, w_dim] in a parsed style."""
        return self._check_ws(ws)

    async def start(self, executor: Executor | None, metrics: Metrics | None) -> None:
        """Start the dynamic batchers: synthesis (up to `self.max_batch` rows) and, with encoder.onnx, the encoder's."""
        await super().start(executor, metrics)
        self.executor = executor
        self.batcher = self._batcher(self.name, self._run_synthesis, self.max_batch, None, executor, metrics)
        if self.encoder is not None:
            self.encoder_batcher = self._batcher(f"{self.name}.encoder", self.encoder, self.batch_cfg.max_batch, None,
                                                 executor, metrics)

    async def close(self) -> None:
        await self._close_runners([self.batcher, self.encoder_batcher], self._runners())

    def _runners(self) -> list:
        return [self.mapping, self.encoder]

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

    async def resolve_style(self, style: Any, ctx: RequestContext) -> Any:
        """A parsed style request -> the style synthesize takes (an exemplar image is encoded here); None = none."""
        return None

    @staticmethod
    def library_id(style: Any) -> int | None:
        """The library style id a parsed style request uses (None: none, or not a library style)."""
        return None

    async def synthesize(self, ws: np.ndarray, deadline: float | None = None, stats: dict[str, float] | None = None,
                         *, style: Any = None, content_ws: np.ndarray | None = None) -> np.ndarray:
        """Truncated ws [N, num_ws, w_dim] float32 -> img_u8 [N, R, R, 3] through the dynamic batcher.

        Args:
            deadline: absolute time.monotonic() after which queued rows are dropped (DeadlineExceeded).
            stats: filled with queue_s, the longest time one of the rows waited in the queue.
            style: a resolved style (`resolve_style`; None for models without a style library).
            content_ws: the untruncated ws (dualstylegan's preserve_color reads them).
        """
        return await self.synthesize_rows(self._rows(ws, style, content_ws), deadline, stats)

    async def synthesize_rows(self, rows: np.ndarray, deadline: float | None = None,
                              stats: dict[str, float] | None = None) -> np.ndarray:
        """Batcher rows -> img_u8 [N, R, R, 3]."""
        assert self.batcher is not None, "model not started"
        out, queue_s = await self.batcher.submit(rows, deadline)
        if stats is not None:
            stats["queue_s"] = queue_s
        return out

    def enqueue(self, ws: np.ndarray, deadline: float | None = None, *, style: Any = None,
                content_ws: np.ndarray | None = None) -> list[BatchItem]:
        """Queue rows without waiting (streams): await each item's future, cancel it to drop the row."""
        assert self.batcher is not None, "model not started"
        return self.batcher.enqueue(self._rows(ws, style, content_ws), deadline)

    async def render_faces(self, ws: np.ndarray, psi: float | None, deadline: float | None,
                           stats: dict[str, float], style: Any = None,
                           exemplar_ws: np.ndarray | None = None) -> np.ndarray:
        """Encoded faces ws [F, num_ws, w_dim] (untruncated) -> crops img_u8 [F, R, R, 3] (the photo path's last
        step, serving.photo.stylize_faces)."""
        raise NotImplementedError

    # -- Stylize (face photos) --------------------------------------------------------------------------------

    def check_stylize(self, ctx: RequestContext) -> None:
        ctx.repo.encoder_for(self).release()

    async def stylize_photo(self, image: bytes, face: photo.FaceRequest, style: StyleOptions | None,
                            ctx: RequestContext) -> photo.PhotoResult:
        """A face photo through the photo path (serving.photo.stylize_faces) with this model's style options."""
        parsed = self.parse_style(style, ctx)
        lim = ctx.limits
        res = await photo.stylize_faces(ctx.repo, self, image, face, max_photo_size=lim.max_photo_size,
                                        max_faces=lim.max_faces, pool=ctx.pool, deadline=ctx.deadline, style=parsed)
        res.style_id = self.library_id(parsed)
        return res

    # -- inference endpoints ----------------------------------------------------------------------------------

    def extra_inputs(self, suffix: str) -> tuple[TensorSpec, ...]:
        """The kind's own inputs of endpoint `suffix` beyond the shared ones."""
        return ()

    def extra_params(self, suffix: str) -> tuple[ParamSpec, ...]:
        return ()

    def endpoints(self) -> dict[str, Endpoint]:
        r = self.resolution
        image = TensorSpec("IMAGE", "UINT8", (-1, r, r, 3), description="img_u8, RGB")
        eps = {
            "": Endpoint("", (TensorSpec("SEED", "INT64", (-1, 1), description="seed -> z by the numpy rule"),
                              TensorSpec("Z", "FP32", (-1, self.z_dim), optional=True,
                                         description="instead of SEED"),
                              TensorSpec("PSI", "FP32", (-1, 1), optional=True,
                                         description="truncation, 1 or N rows (default the bundle's)"))
                         + self.extra_inputs(""), (image,), self.extra_params(""),
                         description="seeds or z through the mapping, truncation and synthesis"),
            SYNTHESIS: Endpoint(SYNTHESIS, (TensorSpec("WS", "FP32", (-1, self.num_ws, self.w_dim)),)
                                + self.extra_inputs(SYNTHESIS), (image,), self.extra_params(SYNTHESIS),
                                description="the synthesis graph's own inputs"),
        }
        if self.stylizes_photos:
            eps[STYLIZE] = Endpoint(
                STYLIZE, (TensorSpec("IMAGE", "BYTES", (-1, 1), description="encoded face photos"),),
                (TensorSpec("STYLIZED", "BYTES", (-1, 1), description="PNG"),),
                (ParamSpec("faces", "string", "'largest' | 'all' | an index"),
                 ParamSpec("composite", "string", "'paste' | 'crop'"),
                 ParamSpec("psi", "double", "truncation of the encoded latents")) + self.extra_params(STYLIZE),
                description="the photo path of StyleService.Stylize")
        return eps

    async def infer(self, suffix: str, inputs: dict[str, np.ndarray], params: dict[str, Any],
                    ctx: RequestContext) -> dict[str, np.ndarray]:
        if suffix == STYLIZE and self.stylizes_photos:
            return await self._infer_stylize(inputs, params, ctx)
        if suffix == SYNTHESIS:
            require_inputs(inputs, [t.name for t in self.endpoints()[SYNTHESIS].inputs if not t.optional])
            ws = inputs["WS"]
        elif suffix == "":
            ws = await self.ws_from_inputs(inputs, ctx.limits.psi_range)
        else:
            return await super().infer(suffix, inputs, params, ctx)
        return {"IMAGE": await self.synthesize_rows(self.infer_rows(suffix, ws, inputs), ctx.deadline)}

    def infer_rows(self, suffix: str, ws: np.ndarray, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The batcher rows of an inference request (`<name>` / `.synthesis`) from its truncated ws and inputs."""
        return self._check_ws(ws)

    async def ws_from_inputs(self, x: dict[str, np.ndarray], psi_range: tuple[float, float]) -> np.ndarray:
        """SEED or Z, optional PSI (1 or N rows; absent = default_psi) -> truncated ws [N, num_ws, w_dim]."""
        if ("SEED" in x) == ("Z" in x):
            raise InvalidArgument("give exactly one of the inputs 'SEED' or 'Z'")
        if "SEED" in x:
            seeds = [int(s) for s in x["SEED"][:, 0]]
            for s in seeds:
                if not 0 <= s <= L.MAX_SEED:
                    raise InvalidArgument(f"input 'SEED': seed {s} out of range 0..{L.MAX_SEED}")
            w = await self.seeds_to_w(seeds)
        else:
            w = await self.map_w(x["Z"])
        n = len(w)
        if "PSI" not in x:
            return self.to_ws(w, None)
        psi = x["PSI"][:, 0]
        if len(psi) not in (1, n):
            raise InvalidArgument(f"input 'PSI': {len(psi)} rows for {n} latents (give 1 or {n})")
        lo, hi = psi_range
        for p in psi:
            if not lo <= float(p) <= hi:
                raise InvalidArgument(f"input 'PSI': psi must be in [{lo}, {hi}], got {float(p)}")
        if len(psi) == 1 or (psi == psi[0]).all():
            return self.to_ws(w, float(psi[0]))
        return np.concatenate([self.to_ws(w[i: i + 1], float(p)) for i, p in enumerate(psi)])

    async def _infer_stylize(self, x: dict[str, np.ndarray], params: dict[str, Any],
                             ctx: RequestContext) -> dict[str, np.ndarray]:
        """`<name>.stylize`: each encoded photo through the photo path, answered as PNG bytes."""
        require_inputs(x, ["IMAGE"])
        face = photo.FaceRequest.from_params(params, ctx.limits.psi_range)
        style = self.parse_style(StyleOptions.from_params(params), ctx)
        lim = ctx.limits
        outs = await asyncio.gather(*(photo.stylize_faces(
            ctx.repo, self, bytes(im), face, max_photo_size=lim.max_photo_size, max_faces=lim.max_faces,
            pool=ctx.pool, deadline=ctx.deadline, style=style) for im in x["IMAGE"][:, 0]))
        loop = asyncio.get_running_loop()
        pngs = await asyncio.gather(*(loop.run_in_executor(ctx.pool, encode, r.image, "png") for r in outs))
        out = np.empty((len(pngs), 1), dtype=object)
        out[:, 0] = pngs
        return {"STYLIZED": out}
