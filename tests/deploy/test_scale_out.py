"""Three `stylecast serve` replicas of one models directory behind (a) gRPC client-side round_robin with health
checking and retries, (b) nginx `grpc_pass`: 16 clients while one replica is SIGTERMed mid-run and restarted lose
no request, every image is byte-identical to a single replica's, and every replica serves a share of the load.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "deploy" / "nginx" / "stylecast.conf"
SEEDS = 48          # distinct seeds; request i asks for seed i % SEEDS
CLIENTS = 16
EXTRA_BUNDLES = 5   # loaded before "demo" (sorted names): a restarted replica's initial load takes a few seconds
SERVE_ARGS = ("--threads", "1", "--grace", "5", "--drain-delay", "1", "--reload-interval", "0")


@dataclass
class LoadResult:
    sent: int = 0
    failures: list[str] = field(default_factory=list)
    mismatches: list[int] = field(default_factory=list)
    per_replica: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    restart: dict[str, float] = field(default_factory=dict)

    def report(self, how: str) -> str:
        rate = self.sent / self.wall_s if self.wall_s else 0.0
        return (f"{how}: {self.sent} requests from {CLIENTS} clients in {self.wall_s:.1f} s ({rate:.0f}/s), "
                f"{len(self.failures)} failed, {len(self.mismatches)} not byte-identical, per replica "
                f"{self.per_replica}, restart {self.restart}")


def models_dir(demo_models: Path, tmp: Path) -> Path:
    """The demo bundle plus EXTRA_BUNDLES copies named so that they load first: a replica that took traffic before
    its initial load ended would answer "demo" with FAILED_PRECONDITION for seconds."""
    import json
    models = tmp / "models"
    shutil.copytree(demo_models / "demo", models / "demo")
    for i in range(EXTRA_BUNDLES):
        extra = shutil.copytree(demo_models / "demo", models / f"a{i}")
        doc = json.loads((extra / "manifest.json").read_text())
        doc["name"] = f"a{i}"
        (extra / "manifest.json").write_text(json.dumps(doc))
    return models


def start_replicas(replica_factory, models: Path, free_ports, n: int = 3) -> list:
    ports = free_ports(2 * n)
    replicas = [replica_factory(models, ports[2 * i], ports[2 * i + 1], *SERVE_ARGS).start() for i in range(n)]
    for r in replicas:
        r.wait_ready()
    return replicas


def reference_images(replica) -> dict[int, bytes]:
    """PNG bytes of every seed from one replica alone (a plain single-address channel)."""
    from serving.client import StyleClient
    with StyleClient(replica.target) as c:
        return {s: img.data for s, img in zip(range(SEEDS), c.generate("demo", seeds=list(range(SEEDS))))}


def run_load(replicas: list, target: str, total: int, reference: dict[int, bytes], **client_kw) -> LoadResult:
    """`total` single-seed Generate calls from CLIENTS threads (one channel each); replicas[1] gets SIGTERM once a
    quarter of the calls are done and is restarted as soon as it exited. Per-replica counts come from each replica's
    metrics (the restarted one: its last scrape before it exited + its second life)."""
    from serving.client import StyleClient
    res = LoadResult()
    counter = itertools.count()
    lock = threading.Lock()
    quarter = threading.Event()
    baseline = {r.target: r.requests() for r in replicas}  # e.g. the reference calls

    def client() -> None:
        with StyleClient(target, timeout=30, **client_kw) as c:
            while (i := next(counter)) < total:
                if i == total // 4:
                    quarter.set()
                seed = i % SEEDS
                try:
                    data = c.generate("demo", seeds=[seed])[0].data
                except Exception as exc:  # grpc.RpcError and anything else is a lost request
                    with lock:
                        res.failures.append(f"{i}: {exc!r}"[:300])
                    continue
                if data != reference[seed]:
                    with lock:
                        res.mismatches.append(i)

    victim = replicas[1]
    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        assert quarter.wait(300), "load did not get going"
        first_life = victim.requests()
        victim.sigterm()
        t_term = time.monotonic()
        while victim.proc.poll() is None:  # scrape until the drain ends: its last count is the first life's total
            try:
                first_life = victim.requests()
            except OSError:
                pass
            time.sleep(0.05)
        assert victim.proc.returncode == 0, victim.lives[-1]
        t_exit = time.monotonic()
        victim.start().wait_ready()
        res.restart = {"drain_s": round(t_exit - t_term, 2), "restart_s": round(time.monotonic() - t_exit, 2),
                       "sigterm_at_s": round(t_term - t0, 2)}
    finally:
        for t in threads:
            t.join(300)
    res.wall_s = time.monotonic() - t0
    res.sent = min(next(counter), total)
    for r in replicas:
        n = r.requests() - (baseline[r.target] if r is not victim else 0)
        res.per_replica[f":{r.port}"] = n
    res.per_replica[f":{victim.port}"] = f"{first_life - baseline[victim.target]} + {res.per_replica[f':{victim.port}']}"
    return res


def check(res: LoadResult, replicas: list, total: int) -> None:
    assert res.sent == total
    assert res.failures == [], res.failures[:5]
    assert res.mismatches == []
    victim = replicas[1]
    second_life = replicas[1].requests()
    assert second_life > 0, "the restarted replica got no traffic"
    for r in replicas:
        if r is not victim:
            assert r.requests() > total // 10, res.per_replica
    # SIGTERM drained: the victim's first life stopped with a clean shutdown
    assert victim.events("stopped", life=0) and victim.events("shutting down", life=0)


def nginx_config(tmp: Path, listen_port: int, replicas: list) -> Path:
    """deploy/nginx/stylecast.conf with the replicas' addresses, wrapped in a runnable top-level config."""
    upstreams = "\n".join(f"    server {r.target} max_fails=1 fail_timeout=1s;" for r in replicas)
    site = NGINX_CONF.read_text()
    site = site.replace("    server stylecast-0:50051 max_fails=1 fail_timeout=2s;\n"
                        "    server stylecast-1:50051 max_fails=1 fail_timeout=2s;\n"
                        "    server stylecast-2:50051 max_fails=1 fail_timeout=2s;", upstreams)
    site = site.replace("listen 50051 http2;", f"listen 127.0.0.1:{listen_port} http2;")
    assert upstreams in site and str(listen_port) in site, "deploy/nginx/stylecast.conf changed shape"
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(f"""daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{site}
}}
""")
    return conf


def load_round_robin(replica_factory, demo_models, free_ports, tmp_path, total: int) -> None:
    replicas = start_replicas(replica_factory, models_dir(demo_models, tmp_path), free_ports)
    reference = reference_images(replicas[0])
    target = ",".join(r.target for r in replicas)
    res = run_load(replicas, target, total, reference, load_balancing="round_robin")
    print(res.report("round_robin"))
    check(res, replicas, total)


def load_nginx(replica_factory, demo_models, free_ports, tmp_path, total: int) -> None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    replicas = start_replicas(replica_factory, models_dir(demo_models, tmp_path), free_ports)
    reference = reference_images(replicas[0])
    (port,) = free_ports(1)
    conf = nginx_config(tmp_path / "nginx", port, replicas)
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(conf.parent)], stderr=subprocess.PIPE, text=True)
    try:
        from serving.client import StyleClient
        deadline = time.monotonic() + 20
        while True:  # nginx is up once a call through it succeeds
            try:
                with StyleClient(f"127.0.0.1:{port}", timeout=2) as c:
                    c.list_models()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"nginx did not start: {proc.stderr.read() if proc.poll() is not None else ''}")
                time.sleep(0.1)
        # One address (the proxy): pick_first, but retries on UNAVAILABLE (a stream refused by a draining replica)
        res = run_load(replicas, f"127.0.0.1:{port}", total, reference, load_balancing="pick_first")
    finally:
        proc.terminate()
        proc.wait(10)
    print(res.report("nginx grpc_pass"))
    check(res, replicas, total)


def test_round_robin_replicas_restart_without_loss(replica_factory, demo_models, free_ports, tmp_path):
    load_round_robin(replica_factory, demo_models, free_ports, tmp_path, total=480)


def test_nginx_replicas_restart_without_loss(replica_factory, demo_models, free_ports, tmp_path):
    load_nginx(replica_factory, demo_models, free_ports, tmp_path, total=480)


@pytest.mark.slow
def test_round_robin_3000_requests(replica_factory, demo_models, free_ports, tmp_path):
    load_round_robin(replica_factory, demo_models, free_ports, tmp_path, total=3000)



@pytest.mark.slow
def test_nginx_3000_requests(replica_factory, demo_models, free_ports, tmp_path):
    load_nginx(replica_factory, demo_models, free_ports, tmp_path, total=3000)
