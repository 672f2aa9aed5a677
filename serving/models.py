"""Loaded models: the protocol-neutral interface every kind of bundle implements and every front end uses.

`LoadedModel` is one version of one bundle with its own dynamic batcher(s). Front ends (StyleService, KServe v2 gRPC,
HTTP/REST) never test a model's class: they ask its capabilities (`generates`, `stylizes_photos`, `style_library`,
`endpoints`) and call the protocol-neutral methods (`infer`, `stylize_photo`, and for generators `to_ws` /
`synthesize` / `enqueue`); serving.latent_model.LatentModel is what the generator kinds share. The kinds live in
their own modules (serving.stylegan2_model, serving.dualstyle_model, serving.fast_style_model) and register in
serving.kinds; this module imports none of them.
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
from . import photo
from .backends import SystemProbe, ort_available_providers
from .batcher import DynamicBatcher
from .config import BatchConfig, Limits
from .errors import BundleRefused, InvalidArgument, ModelNotFound, ServingError
from .logs import log
from .metrics import Metrics
from .tensors import Endpoint

__all__ = ["BundleRefused", "Lease", "LoadedModel", "RequestContext", "StyleLibrary", "StyleOptions",
           "check_bundle_files"]

logger = logging.getLogger("serving.models")

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
