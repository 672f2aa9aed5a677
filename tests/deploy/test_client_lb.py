"""Client settings for several replicas: gRPC targets from replica lists, the service config, CLI errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_channel_target():
    from serving.client import channel_target
    assert channel_target("127.0.0.1:50051") == "127.0.0.1:50051"
    assert channel_target("dns:///stylecast-headless.ns.svc:50051") == "dns:///stylecast-headless.ns.svc:50051"
    assert channel_target("127.0.0.1:1, 127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert channel_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    for bad in ("localhost:1,localhost:2", "127.0.0.1,127.0.0.2:2", "127.0.0.1:1,[::1]:2", "127.0.0.1:0,127.0.0.1:1"):
        with pytest.raises(ValueError):
            channel_target(bad)


def test_service_config():
    from serving.client import load_balancing_options, service_config
    cfg = service_config()
    assert cfg["loadBalancingConfig"] == [{"round_robin": {}}] and cfg["healthCheckConfig"] == {"serviceName": ""}
    (method,) = cfg["methodConfig"]
    assert {n["service"] for n in method["name"]} == {"stylecast.v1.StyleService", "inference.GRPCInferenceService"}
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"] and method["retryPolicy"]["maxAttempts"] == 5
    assert "methodConfig" not in service_config(max_attempts=1)
    assert "healthCheckConfig" not in service_config("pick_first", health_service=None)
    for kw in ({"load_balancing": "random"}, {"load_balancing": "pick_first"}, {"max_attempts": 6}):
        with pytest.raises(ValueError):
            service_config(**kw)
    opts = dict(load_balancing_options("pick_first"))
    assert opts["grpc.enable_retries"] == 1 and "healthCheckConfig" not in opts["grpc.service_config"]


def test_cli_rejects_a_bad_replica_list():
    r = subprocess.run([sys.executable, "-m", "stylecast", "client", "list", "--server", "localhost:1,localhost:2",
                        "--load-balancing", "round-robin"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "IP:PORT" in r.stderr and "Traceback" not in r.stderr
