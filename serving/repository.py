"""The model repository: a directory of bundles, loaded, golden-checked and hot-reloaded while serving.

Each subdirectory (names starting with "." are ignored, so `atomic_directory`'s temporary dirs never count) is
one bundle. A bundle's identity is the sha256 of its manifest.json:
- new directory        -> validate, load, golden-check -> READY (or FAILED with the reason; others keep serving)
- changed manifest     -> load the new version alongside the old one, swap atomically, let the old version
                          finish its in-flight requests, then close it (a refused new version leaves the old one)
- removed directory    -> stop taking requests for it, drain, unload
Two bundles with the same manifest name: the second is refused (and retried once the name is free).
A refused bundle is retried when any of its files changes (e.g. a copy that was still in progress).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from protos.manifest import MANIFEST_NAME, ManifestError, validate_manifest

from .backends import SystemProbe
from .config import BatchConfig
from .errors import BundleRefused, ModelNotFound, ModelNotReady
from .kinds import load_model
from .logs import log
from .metrics import Metrics
from .models import Lease, LoadedModel

logger = logging.getLogger("serving.repository")


class State(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class BundleEntry:
    """What the repository knows about one bundle directory."""

    dir_name: str
    path: Path
    fingerprint: tuple | None = None     # (manifest sha256, file stats) of the last load attempt
    state: State = State.LOADING
    name: str | None = None              # manifest name once parsed
    kind: str = ""
    error: str = ""
    model: LoadedModel | None = None     # the version being served from this directory
    waiting_for_name: str | None = None  # refused for a name collision: retry when this name is free


@dataclass
class ModelStatus:
    name: str
    state: State
    error: str = ""
    bundle: str = ""
    kind: str = ""
    info: dict = field(default_factory=dict)  # LoadedModel.info() when loaded

    @property
    def ready(self) -> bool:
        return self.state is State.READY


def fingerprint(path: Path) -> tuple | None:
    """(sha256 of manifest.json, sorted (name, size, mtime_ns) of the files), or None without a manifest."""
    try:
        manifest_sha = hashlib.sha256((path / MANIFEST_NAME).read_bytes()).hexdigest()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        manifest_sha = None
    stats = []
    try:
        for p in sorted(path.iterdir()):
            st = p.stat()
            stats.append((p.name, st.st_size, st.st_mtime_ns))
    except OSError:
        return None
    return manifest_sha, tuple(stats)


def read_manifest(path: Path) -> dict:
    import json
    try:
        doc = json.loads((path / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        raise ManifestError("no manifest.json (not a bundle)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"manifest.json is not valid JSON ({exc})") from None
    errors = validate_manifest(doc)
    if errors:
        raise ManifestError("invalid manifest: " + "; ".join(errors))
    return doc


StateListener = Callable[[str, bool], Awaitable[None] | None]


class ModelRepository:
    """Bundles under `root`, keyed by manifest name. Use from the event loop thread only.

    `acquire(name)` returns a `Lease` on the current version (raises ModelNotFound / ModelNotReady).
    """

    def __init__(self, root: str | Path, *, backend: str = "auto", batch: BatchConfig | None = None,
                 threads: int = 0, executor: Executor | None = None, metrics: Metrics | None = None,
                 golden_check: bool = True, probe: SystemProbe | None = None):
        self.root = Path(root)
        self.backend = backend
        self.batch = batch or BatchConfig()
        self.threads = threads
        self.executor = executor
        self.metrics = metrics
        self.golden_check = golden_check
        self.probe = probe
        self.entries: dict[str, BundleEntry] = {}
        self.models: dict[str, LoadedModel] = {}
        self.listeners: list[StateListener] = []
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="bundle-loader")
        self._retiring: set[asyncio.Task] = set()
        self._reloader: asyncio.Task | None = None
        self._scan_lock = asyncio.Lock()
        self.scans = 0
        self.closed = False

    # -- lookups ---------------------------------------------------------------------------------------------

    def get(self, name: str) -> LoadedModel:
        """The current version of a READY model (for metadata; hold `acquire` while running requests)."""
        with self.acquire(name) as model:
            return model

    def acquire(self, name: str) -> Lease:
        model = self.models.get(name)
        if model is not None and model.accepting:
            return Lease(model)
        entry = self._entry_named(name)
        if entry is not None and entry.state is State.LOADING:
            raise ModelNotReady(f"model {name!r} is still loading")
        if entry is not None and entry.state is State.FAILED:
            raise ModelNotReady(f"model {name!r} is not ready: {entry.error}")
        known = ", ".join(sorted(self.models)) or "none"
        raise ModelNotFound(f"unknown model {name!r} (ready models: {known})")

    def encoder_for(self, model: LoadedModel) -> Lease:
        """A lease on the model whose encoder serves `model`'s latent space: the model itself when its bundle has an
        encoder, else a READY bundle with an encoder declaring the same `latent_space` (first by name).

        Raises:
            ModelNotReady: no encoder for that latent space is loaded.
        """
        if model.encoder is not None:
            return Lease(model)
        space = model.latent_space
        if space:
            for name in sorted(self.models):
                m = self.models[name]
                if (m.accepting and m.encoder is not None and m.latent_space == space
                        and getattr(m, "num_ws", None) == getattr(model, "num_ws", None)
                        and getattr(m, "w_dim", None) == getattr(model, "w_dim", None)):
                    return Lease(m)
        why = (f"no loaded bundle has an encoder for its latent space {space!r}" if space else
               "its bundle has no encoder and declares no latent_space (export it with --encoder or --encoder-from)")
        raise ModelNotReady(f"{model.kind} model {model.name!r} cannot stylize photos: {why}")

    def _entry_named(self, name: str) -> BundleEntry | None:
        for e in self.entries.values():
            if e.name == name and e.model is None:
                return e
        return None

    def statuses(self) -> list[ModelStatus]:
        out: dict[str, ModelStatus] = {}
        for e in sorted(self.entries.values(), key=lambda e: e.dir_name):
            if e.model is not None and self.models.get(e.model.name) is e.model:
                out[e.model.name] = ModelStatus(e.model.name, State.READY, e.error, e.dir_name, e.model.kind,
                                                e.model.info())
        for e in sorted(self.entries.values(), key=lambda e: e.dir_name):
            name = e.name or e.dir_name
            if e.model is None and name not in out:
                out[name] = ModelStatus(name, e.state, e.error, e.dir_name, e.kind)
            elif e.model is None:  # a refused duplicate: list it under its directory
                out[f"{name}@{e.dir_name}"] = ModelStatus(name, e.state, e.error, e.dir_name, e.kind)
        return [out[k] for k in sorted(out)]

    def status(self, name: str) -> ModelStatus | None:
        return next((s for s in self.statuses() if s.name == name), None)

    # -- scanning --------------------------------------------------------------------------------------------

    async def scan(self) -> None:
        """One pass over the directory: load new bundles, reload changed ones, unload removed ones."""
        async with self._scan_lock:
            self.scans += 1
            try:
                dirs = {p.name: p for p in sorted(self.root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
            except OSError as exc:
                log(logger, logging.ERROR, "cannot list model repository", root=str(self.root), error=str(exc))
                return
            for dir_name in list(self.entries):
                if dir_name not in dirs:
                    await self._remove(dir_name)
            for dir_name, path in dirs.items():
                fp = fingerprint(path)
                entry = self.entries.get(dir_name)
                if entry is None:
                    entry = self.entries[dir_name] = BundleEntry(dir_name, path)
                    await self._load(entry, fp)
                elif fp != entry.fingerprint and (entry.model is None or fp is None
                                                  or fp[0] != entry.model.manifest_sha):
                    await self._load(entry, fp)
                elif entry.waiting_for_name is not None and entry.waiting_for_name not in self.models:
                    await self._load(entry, fp)

    async def _load(self, entry: BundleEntry, fp: tuple | None) -> None:
        loop = asyncio.get_running_loop()
        entry.fingerprint = fp
        entry.waiting_for_name = None
        old = entry.model
        t0 = time.monotonic()
        if old is None:
            entry.state = State.LOADING
        try:
            if fp is None or fp[0] is None:
                raise BundleRefused("no manifest.json (not a bundle, or still being copied)")
            manifest = await loop.run_in_executor(self._loader, read_manifest, entry.path)
            name, kind = manifest["name"], manifest["kind"]
            if old is None:
                entry.name, entry.kind = name, kind
            owner = self.models.get(name)
            if owner is not None and owner is not old:
                entry.waiting_for_name = name
                raise BundleRefused(f"name collision: model {name!r} is already served from bundle "
                                    f"{owner.path.name!r}")
            version = fp[0][:12]
            model = await loop.run_in_executor(
                self._loader, lambda: load_model(entry.path, manifest, version, backend=self.backend,
                                                 threads=self.threads, batch=self.batch,
                                                 golden_check=self.golden_check, probe=self.probe))
            model.manifest_sha = fp[0]
            await model.start(self.executor, self.metrics)
        except (BundleRefused, ManifestError, OSError, ValueError) as exc:
            self._count("refused")
            msg = str(exc)
            entry.error = msg if old is None else f"new version refused, still serving {old.version}: {msg}"
            if old is None:
                entry.state = State.FAILED
            log(logger, logging.ERROR, "bundle refused", bundle=entry.dir_name, model=entry.name, error=msg,
                still_serving=old.version if old else None)
            return
        except Exception as exc:  # a bug or an unexpected runtime failure: refuse this bundle, keep serving
            self._count("error")
            entry.error = f"load failed: {exc!r}"
            if old is None:
                entry.state = State.FAILED
            logger.exception("bundle load failed", extra={"bundle": entry.dir_name})
            return
        # Swap atomically (no await between these lines): new requests get the new version from here on.
        if old is not None and old.name != model.name:
            self._unpublish(old)
        self.models[model.name] = model
        entry.model, entry.name, entry.kind, entry.state, entry.error = model, model.name, model.kind, State.READY, ""
        self._count("ready")
        log(logger, logging.INFO, "model ready", model=model.name, version=model.version, bundle=entry.dir_name,
            backend=model.backend_name, load_s=round(time.monotonic() - t0, 3),
            replaced=old.version if old else None)
        await self._notify(model.name, True)
        if old is not None:
            if old.name != model.name:
                await self._notify(old.name, False)
            self._retire(old)

    async def _remove(self, dir_name: str) -> None:
        entry = self.entries.pop(dir_name)
        if entry.model is not None:
            model = entry.model
            self._unpublish(model)
            log(logger, logging.INFO, "bundle removed, unloading", model=model.name, version=model.version,
                bundle=dir_name, in_flight=model.in_flight)
            await self._notify(model.name, False)
            self._retire(model)

    def _unpublish(self, model: LoadedModel) -> None:
        if self.models.get(model.name) is model:
            del self.models[model.name]
        model.accepting = False

    def _retire(self, model: LoadedModel) -> None:
        task = asyncio.get_running_loop().create_task(model.retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.model_loads.labels(result).inc()

    async def _notify(self, name: str, ready: bool) -> None:
        if self.metrics is not None:
            self.metrics.model_ready.labels(name).set(1 if ready else 0)
        for fn in self.listeners:
            res = fn(name, ready)
            if asyncio.iscoroutine(res):
                await res

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start_reloading(self, interval_s: float) -> None:
        if interval_s > 0 and self._reloader is None:
            self._reloader = asyncio.get_running_loop().create_task(self._reload_loop(interval_s))

    async def _reload_loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.scan()
            except Exception:
                logger.exception("model repository scan failed")

    async def stop_reloading(self) -> None:
        if self._reloader is not None:
            self._reloader.cancel()
            try:
                await self._reloader
            except asyncio.CancelledError:
                pass
            self._reloader = None

    async def close(self) -> None:
        """Stop reloading, drain and unload every model."""
        await self.stop_reloading()
        async with self._scan_lock:
            self.closed = True
            for model in list(self.models.values()):
                self._unpublish(model)
                await self._notify(model.name, False)
                self._retire(model)
            self.models.clear()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        self._loader.shutdown(wait=False)
