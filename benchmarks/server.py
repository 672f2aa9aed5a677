"""`stylecast bench server`: closed-loop load through the stylecast gRPC API (StyleService.Generate and
GenerateStream) at rising concurrency, next to the same bundle called in-process, so the server's overhead is a
ratio measured in one run.

Closed loop: `c` clients each send a request, wait for the answer, and send the next one, for `duration_s`
seconds (no new request starts after that); requests still in flight are awaited for up to `drain_timeout_s`
and then cancelled (counted as errors "DRAIN_TIMEOUT").
- latency percentiles (harness.percentile, numpy 'linear') over every request that completed without error,
  including those that finished while draining (dropping them would hide the slowest requests);
- throughput = images of the requests that completed inside the window / window length;
- errors by gRPC status code name;
- average batch size = delta of the server's `stylecast_batch_size` histogram (sum / count) over the level,
  scraped from its Prometheus endpoint before and after.
The server runs as a subprocess (`python -m stylecast serve`) on 127.0.0.1 with a free port; the load
generator is one asyncio loop in this process over one gRPC channel. The in-process side runs the same graphs
through the same serving classes (serving.backends) on a thread pool of `c` workers, one request per call and
no cross-request batching: what an application gets by calling the model directly.
"""

from __future__ import annotations

import asyncio
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
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np

from .harness import JsonlWriter, latency_stats

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ServerBenchOptions:
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    duration_s: float = 20.0
    model: str = "config-f"
    size: int = 256
    bundle: Path | None = None
    seeds_per_request: int = 1
    fmt: str = "raw"
    max_batch: int = 8
    max_queue_delay_ms: float = 5.0
    backend: str = "auto"
    stream_frames: int = 64
    in_process: bool = True
    target: str | None = None          # an already running server (HOST:PORT)
    model_name: str | None = None
    metrics_url: str | None = None
    drain_timeout_s: float = 60.0
    request_timeout_s: float = 300.0
    psi: float = 0.7
    threads: int = 0
    work_dir: Path | None = None
    startup_timeout_s: float = 900.0


# ----------------------------------------------------------------------------------------------------------
# The closed-loop load generator (independent of gRPC: tests drive it with fake callables)


@dataclass
class LoadResult:
    concurrency: int
    window_s: float
    latencies_s: list[float] = field(default_factory=list)
    requests_ok: int = 0
    images_in_window: int = 0
    images_total: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        st = latency_stats(self.latencies_s, 1) if self.latencies_s else None
        return {
            "concurrency": self.concurrency, "window_s": round(self.window_s, 3), "wall_s": round(self.wall_s, 3),
            "requests_ok": self.requests_ok, "error_count": int(sum(self.errors.values())),
            "errors": dict(self.errors), "images_in_window": self.images_in_window,
            "throughput_img_per_s": self.images_in_window / self.window_s if self.window_s > 0 else None,
            "p50_ms": st["median_ms"] if st else None, "p95_ms": st["p95_ms"] if st else None,
            "p99_ms": st["p99_ms"] if st else None, "mean_ms": st["mean_ms"] if st else None,
            "max_ms": st["max_ms"] if st else None,
            "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        }


def error_code(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            c = code()
            return getattr(c, "name", str(c))
        except Exception:  # noqa: BLE001
            pass
    return type(exc).__name__


async def closed_loop(call: Callable[[int], Awaitable[int]], concurrency: int, duration_s: float,
                      drain_timeout_s: float = 60.0, clock: Callable[[], float] = time.perf_counter) -> LoadResult:
    """Run `concurrency` clients that each await `call(request_index)` (returns images produced) back to back
    for `duration_s` seconds. See the module docstring for what is counted."""
    res = LoadResult(concurrency, duration_s)
    t0 = clock()
    deadline = t0 + duration_s
    counter = iter(range(1 << 62))

    async def client() -> None:
        while clock() < deadline:
            start = clock()
            try:
                n = await call(next(counter))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is counted by its code
                code = error_code(exc)
                res.errors[code] = res.errors.get(code, 0) + 1
                continue
            end = clock()
            res.latencies_s.append(end - start)
            res.requests_ok += 1
            res.images_total += n
            if end <= deadline:
                res.images_in_window += n

    tasks = [asyncio.ensure_future(client()) for _ in range(concurrency)]
    done, pending = await asyncio.wait(tasks, timeout=duration_s + drain_timeout_s)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
        res.errors["DRAIN_TIMEOUT"] = res.errors.get("DRAIN_TIMEOUT", 0) + len(pending)
    for t in done:
        if t.exception() is not None:  # a bug in the client loop itself
            code = error_code(t.exception())
            res.errors[code] = res.errors.get(code, 0) + 1
    res.wall_s = clock() - t0
    return res


# ----------------------------------------------------------------------------------------------------------
# Metrics


def scrape(url: str, timeout: float = 10.0) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value}."""
    from serving.metrics import parse_exposition
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback URL we built
        return parse_exposition(r.read().decode())


def metric_total(metrics: dict[str, float], name: str, model: str | None = None) -> float:
    """Sum of a metric over its label sets (only those with model="<model>" when given)."""
    total = 0.0
    for key, val in metrics.items():
        base = key.split("{", 1)[0]
        if base != name:
            continue
        if model is not None and "{" in key and f'model="{model}"' not in key:
            continue
        total += val
    return total


def avg_batch_size(before: dict[str, float], after: dict[str, float], model: str | None) -> float | None:
    ds = metric_total(after, "stylecast_batch_size_sum", model) - metric_total(before, "stylecast_batch_size_sum", model)
    dc = metric_total(after, "stylecast_batch_size_count", model) - metric_total(before, "stylecast_batch_size_count", model)
    return ds / dc if dc > 0 else None


# ----------------------------------------------------------------------------------------------------------
# The server subprocess


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`python -m stylecast serve` on 127.0.0.1 (gRPC on a free port, metrics on another); stderr JSON log lines
    are drained on a thread (the "listening" line gives the address)."""

    def __init__(self, models_dir: Path, args: list[str], startup_timeout_s: float = 900.0):
        self.models_dir = models_dir
        self.args = args
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.metrics_port = free_port()
        self.loaded = threading.Event()
        self.tail: deque[str] = deque(maxlen=40)
        self.ready_models: list[str] = []

    def start(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", "stylecast", "serve", "--models", str(self.models_dir), "--host", "127.0.0.1",
               "--port", "0", "--metrics-port", str(self.metrics_port), "--reload-interval", "0", *self.args]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        threading.Thread(target=self._drain, daemon=True).start()
        t0 = time.monotonic()
        while not self.loaded.wait(0.2):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}: "
                                   + " | ".join(list(self.tail)[-5:]))
            if time.monotonic() - t0 > self.startup_timeout_s:
                self.stop()
                raise RuntimeError(f"the server did not finish loading within {self.startup_timeout_s:.0f} s")
        if not self.address:
            raise RuntimeError("the server never logged its address: " + " | ".join(list(self.tail)[-5:]))
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            self.tail.append(line[:500])
            if '"event"' not in line:
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue
            if doc.get("event") == "listening":
                self.address = doc.get("address")
            elif doc.get("event") == "initial load done":
                self.ready_models = list(doc.get("ready") or [])
                self.loaded.set()
        self.loaded.set()

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def build_bench_bundle(model: str, size: int, work: Path, log: Callable[[str], None]) -> Path:
    """Export a random-initialised generator to a serving bundle under work/models/."""
    from export.bundle import BundleOptions, build_bundle
    from training.checkpoints import save_native

    from .sweep import make_generator
    name = f"bench-{model}-{size}"
    G = make_generator(model, size)
    ckpt = save_native(work / "checkpoint", G)
    t0 = time.perf_counter()
    log(f"exporting bundle {name} ...")
    path = build_bundle(ckpt, work / "models" / name, BundleOptions(name=name))
    log(f"bundle {name} ready in {time.perf_counter() - t0:.1f} s")
    return path


# ----------------------------------------------------------------------------------------------------------
# Callers: gRPC and in-process


class GrpcCaller:
    """Generate / GenerateStream through one grpc.aio channel."""

    def __init__(self, target: str, model: str, seeds_per_request: int, fmt: str, psi: float, timeout_s: float):
        import grpc

        from protos.stylecast.v1 import common_pb2 as cpb
        from protos.stylecast.v1 import style_pb2 as pb
        from protos.stylecast.v1 import style_pb2_grpc as pb_grpc
        self.cpb, self.pb = cpb, pb
        opts = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
        self.channel = grpc.aio.insecure_channel(target, options=opts)
        self.stub = pb_grpc.StyleServiceStub(self.channel)
        self.model, self.k, self.psi, self.timeout = model, seeds_per_request, psi, timeout_s
        self.format = {"raw": cpb.IMAGE_FORMAT_RAW_RGB8, "png": cpb.IMAGE_FORMAT_PNG,
                       "jpeg": cpb.IMAGE_FORMAT_JPEG}[fmt]

    async def generate(self, i: int) -> int:
        seeds = [(i * self.k + j) % (1 << 32) for j in range(self.k)]
        req = self.pb.GenerateRequest(model=self.model, psi=self.psi,
                                      latents=self.cpb.Latents(seeds=self.cpb.SeedList(seeds=seeds)),
                                      output=self.cpb.OutputOptions(format=self.format))
        resp = await self.stub.Generate(req, timeout=self.timeout)
        if len(resp.images) != self.k:
            raise RuntimeError(f"expected {self.k} images, got {len(resp.images)}")
        return len(resp.images)

    async def model_info(self) -> dict[str, Any]:
        m = await self.stub.GetModel(self.pb.GetModelRequest(name=self.model), timeout=self.timeout)
        return {"name": m.name, "backend": m.backend, "max_batch": m.max_batch, "resolution": m.resolution,
                "ready": m.ready, "version": m.version}

    async def stream(self, frames: int) -> dict[str, Any]:
        req = self.pb.GenerateStreamRequest(model=self.model, psi=self.psi,
                                            seeds=self.cpb.SeedList(seeds=list(range(frames))),
                                            output=self.cpb.OutputOptions(format=self.format))
        t0 = time.perf_counter()
        first = None
        n = 0
        async for _ in self.stub.GenerateStream(req, timeout=self.timeout):
            n += 1
            if first is None:
                first = time.perf_counter() - t0
        total = time.perf_counter() - t0
        return {"frames": n, "total_s": total, "first_frame_ms": None if first is None else first * 1e3,
                "frames_per_s": n / total if total > 0 else None}

    async def close(self) -> None:
        await self.channel.close()


class InProcessModel:
    """The bundle's mapping and synthesis graphs through the serving classes, called directly."""

    def __init__(self, bundle: Path, backend: str, threads: int, psi: float, fmt: str, seeds_per_request: int):
        from protos.manifest import load_manifest
        from serving.backends import OrtMapping, create_synthesis
        from serving.codecs import encode
        from serving.latents import broadcast, seeds_to_z, truncate
        self.manifest = load_manifest(bundle)
        m = self.manifest["model"]
        self.mapping = OrtMapping(bundle / self.manifest["graphs"]["mapping"]["file"], threads)
        self.synthesis = create_synthesis(bundle, self.manifest, backend, threads)
        self.backend_name = getattr(self.synthesis, "name", type(self.synthesis).__name__)
        self.w_avg = np.asarray(m["w_avg"], dtype=np.float32)
        self.z_dim, self.num_ws = int(m["z_dim"]), int(m["num_ws"])
        self._f = (broadcast, seeds_to_z, truncate, encode)
        self.psi, self.fmt, self.k = psi, fmt, seeds_per_request

    def __call__(self, i: int) -> int:
        broadcast, seeds_to_z, truncate, encode = self._f
        seeds = [(i * self.k + j) % (1 << 32) for j in range(self.k)]
        w = self.mapping(seeds_to_z(seeds, self.z_dim))
        ws = truncate(broadcast(w, self.num_ws), self.w_avg, self.psi)
        img = self.synthesis(np.ascontiguousarray(ws, dtype=np.float32))
        return len([encode(im, self.fmt) for im in img])

    def close(self) -> None:
        for g in (self.mapping, self.synthesis):
            close = getattr(g, "close", None)
            if close:
                close()


# ----------------------------------------------------------------------------------------------------------
# The benchmark


def run_server_bench(opts: ServerBenchOptions, writer: JsonlWriter, log: Callable[[str], None] = print) -> list[dict]:
    """Concurrency sweep (server and in-process interleaved per level) and the streaming test.

    Returns:
        the records written (kind "server"; test "model" | "load" | "stream").
    """
    import tempfile
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    out: list[dict] = []
    work = Path(opts.work_dir) if opts.work_dir else Path(tempfile.mkdtemp(prefix="stylecast-bench-server-"))
    base = {"run_id": run_id, "model": opts.model if opts.bundle is None else None, "size": opts.size,
            "seeds_per_request": opts.seeds_per_request, "format": opts.fmt, "max_batch": opts.max_batch,
            "max_queue_delay_ms": opts.max_queue_delay_ms}

    def write(rec: dict) -> None:
        out.append(writer.write("server", {**base, **rec}))

    server: ServerProcess | None = None
    inproc: InProcessModel | None = None
    try:
        bundle = opts.bundle.resolve() if opts.bundle is not None else None
        if opts.target:
            target, model_name, metrics_url = opts.target, opts.model_name, opts.metrics_url
        else:
            if bundle is not None:
                (work / "models").mkdir(parents=True, exist_ok=True)
                link = work / "models" / bundle.name
                if not link.exists():
                    os.symlink(bundle, link)
            else:
                bundle = build_bench_bundle(opts.model, opts.size, work, log)
            from protos.manifest import load_manifest
            manifest = load_manifest(bundle)
            model_name = manifest["name"]
            base["size"] = int(manifest["model"]["resolution"])
            max_queue = max(256, 2 * max(opts.concurrency) * opts.seeds_per_request)
            args = ["--max-batch", str(opts.max_batch), "--max-queue-delay-ms", str(opts.max_queue_delay_ms),
                    "--max-queue", str(max_queue), "--backend", opts.backend,
                    "--max-seeds", str(max(64, opts.seeds_per_request))]
            if opts.threads:
                args += ["--threads", str(opts.threads)]
            log("starting the server ...")
            t0 = time.perf_counter()
            server = ServerProcess(work / "models", args, opts.startup_timeout_s).start()
            log(f"server at {server.address} (metrics {server.metrics_url}), ready in "
                f"{time.perf_counter() - t0:.1f} s; models {server.ready_models}")
            if model_name not in server.ready_models:
                raise RuntimeError(f"the server did not load {model_name}: " + " | ".join(list(server.tail)[-5:]))
            target, metrics_url = server.address, server.metrics_url
        if opts.in_process and bundle is not None:
            inproc = InProcessModel(bundle, opts.backend, opts.threads, opts.psi, opts.fmt, opts.seeds_per_request)
            log(f"in-process model: {inproc.backend_name}")
        asyncio.run(_sweep(opts, target, model_name, metrics_url, inproc, write, log))
    finally:
        if inproc is not None:
            inproc.close()
        if server is not None:
            rc = server.stop()
            log(f"server stopped (exit code {rc})")
        if opts.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return out


async def _sweep(opts: ServerBenchOptions, target: str, model_name: str, metrics_url: str | None,
                 inproc: InProcessModel | None, write, log) -> None:
    caller = GrpcCaller(target, model_name, opts.seeds_per_request, opts.fmt, opts.psi, opts.request_timeout_s)
    loop = asyncio.get_running_loop()
    try:
        info = await caller.model_info()
        log(f"server model {model_name}: backend {info.get('backend')}, max batch {info.get('max_batch')}")
        write({"test": "model", "side": "server", **info,
               "in_process_backend": inproc.backend_name if inproc is not None else None})
        # One untimed request per side first: connection set-up, first-run allocations.
        await caller.generate(0)
        if inproc is not None:
            await loop.run_in_executor(None, inproc, 0)
        for li, c in enumerate(opts.concurrency):
            sides = ["server", "in-process"] if inproc is not None else ["server"]
            if li % 2:
                sides.reverse()  # alternate which side goes first
            summaries = {}
            for side in sides:
                if side == "server":
                    before = _scrape_or_none(metrics_url)
                    res = await closed_loop(caller.generate, c, opts.duration_s, opts.drain_timeout_s)
                    after = _scrape_or_none(metrics_url)
                    s = res.summary()
                    s["avg_batch_size"] = (avg_batch_size(before, after, model_name)
                                           if before is not None and after is not None else None)
                else:
                    pool = ThreadPoolExecutor(c, thread_name_prefix="inproc")

                    async def call(i: int, pool=pool) -> int:
                        return await loop.run_in_executor(pool, inproc, i)
                    res = await closed_loop(call, c, opts.duration_s, opts.drain_timeout_s)
                    pool.shutdown(wait=True)
                    s = res.summary()
                    s["avg_batch_size"] = float(opts.seeds_per_request)
                summaries[side] = s
            srv = summaries["server"]
            ip = summaries.get("in-process")
            ratios = {}
            if ip:
                ratios = {
                    "p50_ratio_server_vs_inprocess": _ratio(srv["p50_ms"], ip["p50_ms"]),
                    "throughput_ratio_server_vs_inprocess": _ratio(srv["throughput_img_per_s"],
                                                                   ip["throughput_img_per_s"]),
                }
            for side, s in summaries.items():
                write({"test": "load", "side": side, **s, **(ratios if side == "server" else {})})
            log(_line(c, srv, ip, ratios))
        if opts.stream_frames:
            st = await caller.stream(opts.stream_frames)
            rec = {"test": "stream", "side": "server", **st}
            if inproc is not None:
                t0 = time.perf_counter()
                first = None
                for i in range(opts.stream_frames):
                    await loop.run_in_executor(None, inproc, i)
                    first = first if first is not None else time.perf_counter() - t0
                total = time.perf_counter() - t0
                ipr = {"frames": opts.stream_frames, "total_s": total, "first_frame_ms": first * 1e3,
                       "frames_per_s": opts.stream_frames / total}
                write({"test": "stream", "side": "in-process", **ipr})
                rec["frames_per_s_ratio_server_vs_inprocess"] = _ratio(st["frames_per_s"], ipr["frames_per_s"])
            write(rec)
            log(f"stream of {opts.stream_frames} frames: {st['frames_per_s']:.2f} frames/s, first frame "
                f"{st['first_frame_ms']:.0f} ms" + (f" (x{rec['frames_per_s_ratio_server_vs_inprocess']:.2f} "
                                                     "vs in-process)" if inproc is not None else ""))
    finally:
        await caller.close()


def _scrape_or_none(url: str | None) -> dict[str, float] | None:
    if not url:
        return None
    try:
        return scrape(url)
    except OSError:
        return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _line(c: int, srv: dict, ip: dict | None, ratios: dict) -> str:
    def f(x, fmt="{:.1f}"):
        return "-" if x is None else fmt.format(x)
    s = (f"c={c:<3d} server p50 {f(srv['p50_ms'])} p95 {f(srv['p95_ms'])} p99 {f(srv['p99_ms'])} ms, "
         f"{f(srv['throughput_img_per_s'], '{:.2f}')} img/s, errors {srv['error_count']}, "
         f"avg batch {f(srv.get('avg_batch_size'), '{:.2f}')}")
    if ip:
        s += (f" | in-process p50 {f(ip['p50_ms'])} ms, {f(ip['throughput_img_per_s'], '{:.2f}')} img/s"
              f" | p50 x{f(ratios.get('p50_ratio_server_vs_inprocess'), '{:.2f}')}, "
              f"throughput x{f(ratios.get('throughput_ratio_server_vs_inprocess'), '{:.2f}')}")
    return s
