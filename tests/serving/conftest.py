"""Fixtures of the serving tests: one tiny bundle per session, bundle copies and edits, and real StyleServers
on loopback ports, each in a background event loop thread (the test thread uses blocking clients).

Helpers reach the tests as fixtures (`copy_bundle`, `edit_manifest`, `refresh_file_entry`, `server_factory`),
since the tests run with --import-mode=importlib.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import threading
import urllib.request
from pathlib import Path

import pytest

TOKEN = "test-token-0123456789abcdef"
def copy_bundle(src: Path, dst: Path, **manifest_changes) -> Path:
    """Copy a bundle; keyword arguments replace top-level manifest fields (a new manifest sha = a new version)."""
    shutil.copytree(src, dst)
    if manifest_changes:
        edit_manifest(dst, lambda m: m.update(manifest_changes))
    return dst

def edit_manifest(bundle: Path, fn) -> None:
    path = bundle / "manifest.json"
    doc = json.loads(path.read_text())
    fn(doc)
    tmp = path.with_name(".manifest.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)

def refresh_file_entry(bundle: Path, fname: str) -> None:
    """Update a file's sha256 / byte count in the manifest after rewriting it (to get past the checksum check)."""
    data = (bundle / fname).read_bytes()
    edit_manifest(bundle, lambda m: m["files"].__setitem__(
        fname, {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}))

class ServerThread:
    """A StyleServer running in its own event loop thread (the test thread uses blocking clients)."""

    def __init__(self, models_dir: Path, **config):
        from serving.config import BatchConfig, Limits, ServerConfig
        from serving.server import StyleServer
        probe = config.pop("probe", None)  # a serving.backends.SystemProbe (fake GPUs in tests)
        batch = config.pop("batch", {})
        limits = config.pop("limits", {})
        config.setdefault("port", 0)
        config.setdefault("metrics_port", -1)
        config.setdefault("reload_interval_s", 0)
        config.setdefault("grace_s", 5.0)
        self.config = ServerConfig(models_dir=Path(models_dir), batch=BatchConfig(**batch), limits=Limits(**limits),
                                   **config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="server-loop")
        self.thread.start()
        self.server = StyleServer(self.config, probe=probe)
        try:
            self.run(self.server.start(), timeout=60)
        except BaseException:
            self.close()
            raise

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def repository(self):
        return self.server.repository

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, timeout: float = 30):
        """Run a plain function on the server's loop thread (to read repository state safely)."""
        async def wrapper():
            return fn()
        return self.run(wrapper(), timeout)

    def client(self, **kw):
        from serving.client import StyleClient
        return StyleClient(self.target, **kw)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.server.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def metrics(self) -> dict[str, float]:
        from serving.metrics import parse_exposition
        return parse_exposition(self.metrics_text())

    def metric(self, name: str, **labels) -> float:
        """Sum of a metric's samples whose labels include `labels`."""
        total = 0.0
        for key, val in self.metrics().items():
            base, _, rest = key.partition("{")
            if base != name:
                continue
            if all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += val
        return total

    def stop(self, grace: float | None = None) -> None:
        if self.server is not None and self.loop.is_running():
            self.run(self.server.stop(grace), timeout=60)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)




@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_G) -> Path:
    from training.checkpoints import save_native
    return save_native(tmp_path_factory.mktemp("ckpt") / "tiny", tiny_G)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    """A real exported bundle of the conftest tiny generator (32 px, w_dim 64, 8 latents). Do not modify: copy."""
    from export.bundle import BundleOptions, build_bundle
    return build_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundles") / "tiny", BundleOptions(name="tiny"))


@pytest.fixture
def server_factory():
    """Start servers with ServerThread(models_dir, **config); all are stopped at the end of the test."""
    servers: list[ServerThread] = []

    def make(models_dir: Path, **config) -> ServerThread:
        s = ServerThread(models_dir, **config)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory, tiny_bundle):
    """One server over the tiny bundle (+ metrics) for the read-only tests of a module."""
    models = tmp_path_factory.mktemp("models")
    copy_bundle(tiny_bundle, models / "tiny")
    s = ServerThread(models)
    yield s
    s.close()


@pytest.fixture(name="copy_bundle")
def copy_bundle_fixture():
    return copy_bundle


@pytest.fixture(name="edit_manifest")
def edit_manifest_fixture():
    return edit_manifest


@pytest.fixture(name="refresh_file_entry")
def refresh_file_entry_fixture():
    return refresh_file_entry


@pytest.fixture
def auth_token() -> str:
    return TOKEN
