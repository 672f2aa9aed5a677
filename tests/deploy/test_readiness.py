"""A starting replica takes no traffic before its models are READY; readiness = every configured model READY;
liveness stays up while a bundle is broken; client-side health checking keeps calls off a replica that is not ready.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]


def health(target: str, service: str = "") -> str:
    """The grpc.health.v1 Check status name of `service`, or the RPC's status code name when it failed."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(target) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def server_ready(target: str) -> bool:
    from protos.inference import grpc_service_pb2 as kpb
    from protos.inference import grpc_service_pb2_grpc as kpb_grpc
    with grpc.insecure_channel(target) as ch:
        return kpb_grpc.GRPCInferenceServiceStub(ch).ServerReady(kpb.ServerReadyRequest(), timeout=5).ready


def healthcheck(target: str, *args: str) -> int:
    """Exit code of the images' HEALTHCHECK script (deploy/healthcheck.py) against `target`."""
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "healthcheck.py"), "--address", target, *args],
                          capture_output=True, text=True, timeout=30).returncode


def wait_for(cond, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def copy_as(src: Path, dst: Path, name: str) -> Path:
    """Copy a bundle under another model name (a new manifest, so a new model)."""
    shutil.copytree(src, dst)
    doc = json.loads((dst / "manifest.json").read_text())
    doc["name"] = name
    (dst / "manifest.json").write_text(json.dumps(doc, indent=2))
    return dst


def test_no_connection_before_the_initial_load(monkeypatch, demo_models, free_ports):
    """While the bundles load, the gRPC port refuses connections (UNAVAILABLE, which clients and proxies retry
    elsewhere), never FAILED_PRECONDITION "still loading"; afterwards the same call succeeds."""
    import serving.repository as repository
    from serving.client import StyleClient
    from serving.config import ServerConfig
    from serving.server import StyleServer

    loading, release = threading.Event(), threading.Event()
    real_load = repository.load_model

    def gated(*args, **kwargs):
        loading.set()
        assert release.wait(60), "test never released the load"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(repository, "load_model", gated)
    port, metrics_port = free_ports(2)
    target = f"127.0.0.1:{port}"
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = StyleServer(ServerConfig(models_dir=demo_models, port=port, metrics_port=metrics_port,
                                      reload_interval_s=0, grace_s=2))
    started = asyncio.run_coroutine_threadsafe(server.start(), loop)
    try:
        assert loading.wait(30)
        with StyleClient(target, timeout=5) as c:
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as err:
                    c.generate("demo", seeds=[0])
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert health(target) == "UNAVAILABLE" and health(target, "liveness") == "UNAVAILABLE"
        assert healthcheck(target, "--service", "liveness", "--timeout", "1") == 1
        # the metrics port is up already (a taken port fails before the load); the model is not ready there yet
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            assert 'stylecast_model_ready{model="demo"} 1.0' not in r.read().decode()
        assert not started.done()
        release.set()
        started.result(60)
        assert health(target) == "SERVING" and health(target, "stylecast.v1.StyleService") == "SERVING"
        assert health(target, "inference.GRPCInferenceService") == "SERVING" and server_ready(target)
        assert health(target, "liveness") == "SERVING" and health(target, "demo") == "SERVING"
        with StyleClient(target, timeout=30) as c:
            assert len(c.generate("demo", seeds=[0])) == 1
    finally:
        release.set()
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_readiness_is_every_configured_model(replica_factory, demo_models, free_ports, tmp_path):
    """Default: every bundle present at start must be READY (a broken one keeps the replica unready, not dead,
    until it is removed or repaired). --require-model: exactly the named models."""
    models = tmp_path / "models"
    shutil.copytree(demo_models / "demo", models / "demo")
    broken = copy_as(demo_models / "demo", models / "broken", "broken")
    (broken / "manifest.json").write_text("{not json")
    p = free_ports(4)
    a = replica_factory(models, p[0], p[1], "--reload-interval", "0.2").start().wait_ready()
    assert health(a.target) == "NOT_SERVING" and not server_ready(a.target)
    assert health(a.target, "liveness") == "SERVING" and health(a.target, "demo") == "SERVING"
    assert a.events("initial load done")[0]["serving"] is False
    assert healthcheck(a.target) == 1 and healthcheck(a.target, "--service", "liveness") == 0
    shutil.rmtree(broken)  # no longer configured
    wait_for(lambda: health(a.target) == "SERVING", what="readiness after the broken bundle was removed")
    assert server_ready(a.target) and healthcheck(a.target) == 0

    b = replica_factory(models, p[2], p[3], "--reload-interval", "0.2", "--require-model", "demo",
                        "--require-model", "other").start().wait_ready()
    assert health(b.target) == "NOT_SERVING" and health(b.target, "liveness") == "SERVING"
    copy_as(demo_models / "demo", models / ".other.partial", "other").rename(models / "other")
    wait_for(lambda: health(b.target) == "SERVING", what="readiness once the required model loaded")
    shutil.rmtree(models / "other")  # an explicitly required model going away makes the replica unready
    wait_for(lambda: health(b.target) == "NOT_SERVING", what="unready after a required model was removed")
    assert health(b.target, "liveness") == "SERVING"


def test_round_robin_skips_an_unready_replica(replica_factory, demo_models, free_ports, dev_env, tmp_path):
    """Client-side health checking (the service config of serving.client.load_balancing_options): a replica whose
    readiness is NOT_SERVING gets no calls, from Python or from `stylecast client --load-balancing round-robin`;
    without health checking round_robin would send it every other call."""
    from serving.client import StyleClient
    p = free_ports(4)
    unready = replica_factory(demo_models, p[0], p[1], "--require-model", "absent").start().wait_ready()
    ready = replica_factory(demo_models, p[2], p[3]).start().wait_ready()
    assert health(unready.target) == "NOT_SERVING" and health(ready.target) == "SERVING"
    replicas = f"{unready.target},{ready.target}"
    with StyleClient(replicas, load_balancing="round_robin", timeout=30) as c:
        for seed in range(20):
            assert len(c.generate("demo", seeds=[seed])) == 1
    r = subprocess.run([sys.executable, "-m", "stylecast", "client", "generate", "--server", replicas,
                        "--load-balancing", "round-robin", "--model", "demo", "--seeds", "0-3", "--outdir",
                        str(tmp_path / "out")], cwd=ROOT, env=dev_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert unready.requests() == 0 and ready.requests() == 21
    # the same round_robin without health checking: the unready replica gets its share
    from protos.stylecast.v1 import style_pb2 as pb, style_pb2_grpc as pb_grpc
    from serving.client import channel_target, latents, load_balancing_options
    with grpc.insecure_channel(channel_target(replicas),
                               options=load_balancing_options("round_robin", health_service=None)) as ch:
        stub = pb_grpc.StyleServiceStub(ch)
        for seed in range(20):
            stub.Generate(pb.GenerateRequest(model="demo", latents=latents(seeds=[seed])), timeout=30)
    assert unready.requests() >= 5


def test_sigterm_during_the_initial_load_stops_at_once(demo_models, free_ports, tmp_path, dev_env):
    """A replica deleted while it starts does not load every remaining bundle before it exits."""
    models = tmp_path / "models"
    for i in range(4):
        copy_as(demo_models / "demo", models / f"m{i}", f"m{i}")
    port, metrics_port = free_ports(2)
    # Each bundle load takes 3 s longer than it would (a big TensorRT engine, say): 4 bundles = 12 s or more.
    code = textwrap.dedent(f"""
        import sys, time
        import serving.repository as repository
        real = repository.load_model
        def slow(*a, **kw):
            time.sleep(3)
            return real(*a, **kw)
        repository.load_model = slow
        from stylecast.cli import main
        main(["serve", "--models", {str(models)!r}, "--port", "{port}", "--metrics-port", "{metrics_port}"])
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dev_env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    try:
        def metrics_up() -> bool:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1).close()
                return True
            except OSError:
                return False
        wait_for(metrics_up, what="the metrics port (opened before the load)")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        elapsed = time.monotonic() - t0
        log = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert rc == 0, log
    assert "stopped during the initial load" in log
    assert elapsed < 6, f"took {elapsed:.1f} s to stop (the whole load is 12 s or more)"


def test_a_taken_port_fails_before_the_load(replica_factory, demo_models, free_ports, dev_env):
    """The port is bound only after the load, so it is checked first: a clash is a one-line error at once."""
    p = free_ports(3)
    first = replica_factory(demo_models, p[0], p[1]).start().wait_ready()
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "stylecast", "serve", "--models", str(demo_models), "--port", str(p[0]),
                        "--metrics-port", str(p[2])], cwd=ROOT, env=dev_env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{p[0]}" in r.stderr and "Traceback" not in r.stderr
    assert '"event": "model ready"' not in r.stderr, "it loaded the bundles before finding the port taken"
    assert time.monotonic() - t0 < 20
    assert health(first.target) == "SERVING"
