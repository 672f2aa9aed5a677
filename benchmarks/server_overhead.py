"""Server overhead: p50 / p99 latency of Generate (1 seed, PNG) through `stylecast serve` vs the same pipeline
called in-process (ONNX Runtime mapping + truncation + synthesis + PNG encode), measured side by side.

    python -m benchmarks.server_overhead [--bundle demo/models/demo] [--requests 200] [--out runs/bench]

The server runs as a separate process (as in production; the client would otherwise share its GIL) with the
default settings, once with --max-queue-delay-ms 0 (pure overhead) and once with the default 5 ms (what a lone
client pays for dynamic batching). The three paths are called in turn, request by request, so background load
affects them alike. Writes server_overhead.json and server_overhead.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "n": len(ms)}


class Server:
    def __init__(self, models: Path, *extra: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "stylecast", "serve", "--models", str(models), "--port",
                                      "0", "--metrics-port", "0", "--reload-interval", "0",
                                      *extra], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.port = None
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if doc.get("event") == "listening":
                    self.port = int(doc["address"].rsplit(":", 1)[1])
                if doc.get("event") == "initial load done":
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120):
            self.proc.kill()
            raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def bench(bundle: Path, models: Path, model: str, requests: int, warmup: int) -> dict[str, dict]:
    """Interleave the three paths request by request, so that any background load hits them alike."""
    from serving.client import StyleClient
    from serving.offline import BundleRenderer
    direct = BundleRenderer(bundle)
    servers = {"server_delay0": Server(models, "--max-queue-delay-ms", "0"),
               "server_delay5": Server(models, "--max-queue-delay-ms", "5")}
    clients = {k: StyleClient(f"127.0.0.1:{srv.port}") for k, srv in servers.items()}
    calls = {"direct": lambda s: direct.render([s], psi=0.7)[0],
             **{k: (lambda s, c=c: c.generate(model, seeds=[s], psi=0.7)[0].data) for k, c in clients.items()}}
    times: dict[str, list[float]] = {k: [] for k in calls}
    try:
        for s in range(warmup):
            for fn in calls.values():
                fn(s)
        for s in range(requests):
            for k, fn in calls.items():
                t0 = time.perf_counter()
                data = fn(s)
                times[k].append((time.perf_counter() - t0) * 1000)
                assert data[:4] == b"\x89PNG"
    finally:
        for c in clients.values():
            c.close()
        for srv in servers.values():
            srv.stop()
        direct.close()
    return {k: percentiles(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "demo" / "models" / "demo",
                    help="a stylegan2 bundle (built with `python -m export.demo` when it is the missing demo)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    args = ap.parse_args(argv)
    if not args.bundle.exists() and args.bundle.name == "demo":
        from export.demo import build_demo_bundle
        build_demo_bundle(args.bundle)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    # the server serves a repository: the bundle's parent, or a temporary one holding only a link to it
    import tempfile
    tmp = Path(tempfile.mkdtemp(prefix="stylecast-bench-"))
    (tmp / args.bundle.name).symlink_to(args.bundle.resolve())
    load_before = os.getloadavg()[0]
    results = bench(args.bundle, tmp, manifest["name"], args.requests, args.warmup)
    (tmp / args.bundle.name).unlink()
    tmp.rmdir()
    d = results["direct"]
    for k in ("server_delay0", "server_delay5"):
        results[k]["p50_ratio"] = results[k]["p50_ms"] / d["p50_ms"]
        results[k]["p99_ratio"] = results[k]["p99_ms"] / d["p99_ms"]
    meta = {"bundle": str(args.bundle), "model": manifest["model"]["resolution"], "requests": args.requests,
            "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(), "loadavg_1min_before_after": [load_before, os.getloadavg()[0]]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server_overhead.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    rows = [("in-process ONNX Runtime (mapping + synthesis + PNG)", d, None),
            ("stylecast serve, --max-queue-delay-ms 0", results["server_delay0"], results["server_delay0"]),
            ("stylecast serve, --max-queue-delay-ms 5 (default)", results["server_delay5"], results["server_delay5"])]
    lines = [f"Generate, 1 seed, PNG, {manifest['model']['resolution']} px bundle `{manifest['name']}`, "
             f"{args.requests} sequential requests, {os.cpu_count()} CPU cores "
             f"(1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)", "",
             "| path | p50 ms | p99 ms | p50 ratio | p99 ratio |", "|---|---|---|---|---|"]
    for name, r, ratio in rows:
        p50r = 1.0 if ratio is None else ratio["p50_ratio"]
        p99r = 1.0 if ratio is None else ratio["p99_ratio"]
        lines.append(f"| {name} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {p50r:.2f} | {p99r:.2f} |")
    table = "\n".join(lines) + "\n"
    (args.out / "server_overhead.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
