"""Fixtures of the deploy tests: a clean clone of the committed tree, the demo bundle, and `stylecast serve`
replicas as real processes on fixed loopback ports (a replica restarted after SIGTERM comes back on its port).

Helpers reach the tests as fixtures (`replica_factory`, `free_ports`, `dev_env`), since the tests run with
--import-mode=importlib.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports that were free a moment ago (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def dev_command() -> list[str]:
    """`stylecast` of the development install (this interpreter, this checkout)."""
    return [sys.executable, "-m", "stylecast"]


def dev_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


class Replica:
    """One `stylecast serve` process on fixed ports; `start()` again after it stopped restarts it on the same ports.

    Every life's JSON log lines are kept in `lives[i]`; `wait_ready` waits for the current life's initial load.
    """

    def __init__(self, models: Path, port: int, metrics_port: int, *extra: str, command: list[str] | None = None,
                 env: dict[str, str] | None = None, cwd: Path = ROOT):
        self.models, self.port, self.metrics_port, self.extra = models, port, metrics_port, extra
        self.command = command or dev_command()
        self.env = env or dev_env()
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.lives: list[list[dict]] = []

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Replica":
        assert self.proc is None or self.proc.poll() is not None, "replica already running"
        cmd = [*self.command, "serve", "--models", str(self.models), "--port", str(self.port),
               "--metrics-port", str(self.metrics_port), *self.extra]
        self.proc = subprocess.Popen(cmd, cwd=self.cwd, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        lines: list[dict] = []
        self.lives.append(lines)
        threading.Thread(target=self._read, args=(self.proc, lines), daemon=True).start()
        return self

    @staticmethod
    def _read(proc: subprocess.Popen, lines: list[dict]) -> None:
        for line in proc.stderr:
            try:
                lines.append(json.loads(line))
            except ValueError:
                lines.append({"raw": line.rstrip()})

    def events(self, name: str, life: int = -1) -> list[dict]:
        return [d for d in self.lives[life] if d.get("event") == name]

    def wait_ready(self, timeout: float = 60) -> "Replica":
        deadline = time.monotonic() + timeout
        while not self.events("initial load done"):
            if self.proc.poll() is not None:
                raise AssertionError(f"replica on port {self.port} exited {self.proc.returncode}: {self.lives[-1]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"replica on port {self.port} did not start: {self.lives[-1]}")
            time.sleep(0.05)
        return self

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def requests(self, method: str = "Generate") -> int:
        """stylecast_requests_total of `method` in this life (the counters start at 0 in every life)."""
        from serving.metrics import parse_exposition
        return int(sum(v for k, v in parse_exposition(self.metrics_text()).items()
                       if k.startswith("stylecast_requests_total{") and f'method="{method}"' in k))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(name="dev_env")
def dev_env_fixture() -> dict[str, str]:
    return dev_env()


@pytest.fixture(name="free_ports")
def free_ports_fixture():
    return free_ports


@pytest.fixture
def replica_factory(request):
    """Make Replica(models, port, metrics_port, *serve_args, command=..., env=...); each is killed at the end."""
    def make(*args, **kw) -> Replica:
        replica = Replica(*args, **kw)
        request.addfinalizer(replica.kill)
        return replica
    return make


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> Path:
    """A model repository holding the demo bundle (`python -m export.demo`, 128 px). Do not modify: copy."""
    models = tmp_path_factory.mktemp("deploy-models")
    r = subprocess.run([*dev_command()[:1], "-m", "export.demo", "--out", str(models / "demo")], cwd=ROOT,
                       env=dev_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return models


@pytest.fixture(scope="session")
def clean_clone(tmp_path_factory) -> Path:
    """A clone of the committed tree (what a new user gets), without this checkout's generated or ignored files."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout to clone")
    dest = tmp_path_factory.mktemp("clone") / "stylecast"
    r = subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(dest)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return dest
