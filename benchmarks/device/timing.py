"""Timings of the StyleGAN2 synthesis network (Karras et al., 2020) for the device check: the machine's two ceilings
(a large matrix product per precision, a device-to-device copy), then PyTorch eager fp32 / fp16 / bf16,
torch.compile and the fused kernels (eager and under CUDA graphs), side by side through benchmarks.harness.

torch.compile is the slow part: its compilations run in background processes (benchmarks.backends'
COMPILE_PROBE, one per resolution and batch kind) that start with the check and fill inductor's on-disk cache
while the kernels build; the timed backend then compiles from that cache. Each process has a deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.backends import COMPILE_PROBE, BenchContext, TorchCompile, TorchEager
from benchmarks.harness import STATUS_ERROR, STATUS_OK, cell_record, measure_cell
from benchmarks.sweep import latents, make_generator

from .generator import gflop_per_image

ROOT = Path(__file__).resolve().parents[2]
# Backends of the timing step, in table order; the first is the reference of speed-ups and PSNR.
TIMED = ("torch-fp32", "torch-fp16", "torch-bf16", "torch-compile", "torch-plugin", "torch-plugin-graph",
         "torch-plugin-fp16-graph")


def _events_ms(fn: Callable[[], Any], warmup: int, reps: int) -> list[float]:
    """Milliseconds of each of `reps` calls of fn between two CUDA events, after `warmup` untimed calls."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def measure_ceilings(device: str, matmul_n: int = 8192, copy_bytes: int = 4 << 30, reps: int = 10) -> list[dict]:
    """The peak rates this run measures instead of trusting a datasheet: dense matmul TFLOP/s in fp16, bf16 (the
    tensor cores) and fp32 (TF32 off), and device-to-device copy GB/s (bytes read + written). Random data: zeros
    run faster than real data. On the CPU (dry run) the sizes shrink and the timer is perf_counter.

    Returns:
        records {name, precision, n, median_ms, tflops | gb_per_s}.
    """
    import torch
    out = []
    cuda = device == "cuda"
    dtypes = [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)] if cuda \
        else [("fp32", torch.float32)]
    for label, dtype in dtypes:
        n = matmul_n if cuda else 256
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = _median(_time(lambda: torch.mm(a, b), cuda, reps))
        out.append({"name": f"matmul_{label}", "precision": label, "n": n, "median_ms": ms,
                    "tflops": 2 * n ** 3 / (ms / 1e3) / 1e12})
        del a, b
    nbytes = copy_bytes if cuda else 64 << 20
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = _median(_time(lambda: dst.copy_(src), cuda, reps))
    out.append({"name": "copy_d2d", "bytes": nbytes, "median_ms": ms, "gb_per_s": 2 * nbytes / (ms / 1e3) / 1e9})
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    return out


def _time(fn: Callable[[], Any], cuda: bool, reps: int) -> list[float]:
    if cuda:
        return _events_ms(fn, warmup=3, reps=reps)
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _median(xs: list[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64)))


# ----------------------------------------------------------------------------------------------------------
# torch.compile in the background


@dataclass
class Job:
    """One background process: its command, deadline and what came of it."""

    name: str
    argv: list[str]
    timeout_s: float
    status: str = "pending"      # pending | running | ok | error | timeout
    seconds: float | None = None
    result: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


class BackgroundJobs:
    """Runs jobs one after another in a thread (each with its own timeout), so CPU-heavy preparation overlaps
    other steps; wait() blocks until all have finished or a deadline passes (then the running one is killed)."""

    def __init__(self, jobs: list[Job], cwd: Path = ROOT, env: dict[str, str] | None = None) -> None:
        self.jobs = jobs
        self.cwd = cwd
        self.env = env
        self._proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "BackgroundJobs":
        self._thread.start()
        return self

    def _run(self) -> None:
        for job in self.jobs:
            if self._stop.is_set():
                job.status, job.reason = "timeout", "not started before the deadline"
                continue
            job.status = "running"
            t0 = time.monotonic()
            try:
                self._proc = subprocess.Popen(job.argv, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True, start_new_session=True)
                stdout, stderr = self._proc.communicate(timeout=job.timeout_s)
                job.seconds = time.monotonic() - t0
                if self._proc.returncode == 0:
                    job.status = "ok"
                    last = stdout.strip().splitlines()[-1:] or ["{}"]
                    try:
                        job.result = json.loads(last[0])
                    except json.JSONDecodeError:
                        job.result = {"stdout": last[0][:300]}
                elif self._stop.is_set():
                    job.status, job.reason = "timeout", "killed at the check's deadline"
                else:
                    job.status = "error"
                    tail = (stderr or stdout).strip().splitlines()[-1:] or ["?"]
                    job.reason = f"exit code {self._proc.returncode}: {tail[0][:300]}"
            except subprocess.TimeoutExpired:
                self._kill()
                job.seconds = time.monotonic() - t0
                job.status, job.reason = "timeout", f"did not finish within {job.timeout_s:.0f} s"
            except OSError as exc:
                job.status, job.reason = "error", str(exc)

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, 9)  # its own session: the compile workers it forked go too
            except (ProcessLookupError, PermissionError):
                proc.kill()
            proc.wait()

    def wait(self, deadline: float) -> list[Job]:
        """Block until every job has finished or time.monotonic() reaches deadline; returns the jobs."""
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._stop.set()
            self._kill()
            self._thread.join()
        return self.jobs


def compile_jobs(model: str, sizes: list[int], batches: list[int], device: str,
                 timeout_s: float) -> dict[int, list[Job]]:
    """COMPILE_PROBE runs that fill inductor's cache for what TorchCompile will compile, keyed by size: the
    batch-1 graph (dynamo specialises size 1) when batch 1 is timed, and the dynamic-batch graph for the others."""
    from training.networks.stylegan2 import GeneratorConfig
    jobs: dict[int, list[Job]] = {}
    for size in sizes:
        cfg = GeneratorConfig.rosinality(size, 2) if model == "config-f" else make_generator(model, size).cfg
        kinds = ([1] if 1 in batches else []) + ([2] if any(b > 1 for b in batches) else [])
        jobs[size] = [Job(f"compile_{size}px_b{'1' if b == 1 else 'N'}",
                          [sys.executable, "-c", COMPILE_PROBE, json.dumps(cfg.to_dict()), device, str(b)], timeout_s)
                      for b in kinds]
    return jobs


# ----------------------------------------------------------------------------------------------------------
# The timed backends


class GraphedTorch(TorchEager):
    """A TorchEager backend replayed from a CUDA graph: prepare() captures the whole synthesis for that (static)
    input, run() replays it. One graph per cell; release() frees its memory pool."""

    def __init__(self, ctx: BenchContext, precision: str, impl: str, name: str):
        super().__init__(ctx, precision, impl=impl, name=name)
        self._graph = None
        self._static_out = None

    def available(self) -> tuple[bool, str]:
        if self.device != "cuda":
            return False, "CUDA graphs need a CUDA device (none here)"
        return super().available()

    def prepare(self, ws: np.ndarray):
        import torch
        x = super().prepare(ws)
        self.release()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph: lazy initialisation, allocator pools
                super().run(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = super().run(x)
        self._graph, self._static_out = graph, out
        return x

    def run(self, x):
        self._graph.replay()
        return self._static_out

    def release(self) -> None:
        self._graph = self._static_out = None

    def close(self) -> None:
        self.release()
        super().close()


class WarmCompile(TorchCompile):
    """TorchCompile whose bounded compilations already ran in the background (compile_jobs, keyed by size):
    setup compiles in-process from inductor's cache, or fails with the background job's reason instead of
    compiling without a bound. Sizes without background jobs fall back to TorchCompile's own bounded probe."""

    def __init__(self, ctx: BenchContext, jobs: dict[int, list[Job]]):
        super().__init__(ctx)
        self.jobs = jobs

    def _probe(self, G, batch: int) -> None:
        jobs = self.jobs.get(G.resolution) or []
        if not jobs:
            super()._probe(G, batch)
            return
        bad = [j for j in jobs if j.status != "ok"]
        if bad:
            raise RuntimeError(f"torch.compile in the background ({bad[0].name}): {bad[0].status}: {bad[0].reason}")


def timed_backends(ctx: BenchContext, compiled: dict[int, list[Job]] | None = None) -> list[Any]:
    """The backends of TIMED, constructed (availability is checked by the caller)."""
    return [TorchEager(ctx, "fp32"), TorchEager(ctx, "fp16"), TorchEager(ctx, "bf16"), WarmCompile(ctx, compiled or {}),
            TorchEager(ctx, "fp32", impl="cuda", name="torch-plugin"),
            GraphedTorch(ctx, "fp32", "cuda", "torch-plugin-graph"),
            GraphedTorch(ctx, "fp16", "cuda", "torch-plugin-fp16-graph")]


def roofline_fields(rec: dict[str, Any], gflop: float, peak_tflops: float | None) -> dict[str, Any]:
    """% of the fp16 tensor-core peak measured in this run that the backend's throughput reaches."""
    img_s = rec.get("img_per_s")
    if not img_s or not peak_tflops or rec.get("status") != STATUS_OK:
        return {"gflop_per_image": gflop, "achieved_tflops": None, "pct_of_fp16_tc_peak": None}
    achieved = gflop * img_s / 1e3
    return {"gflop_per_image": gflop, "achieved_tflops": achieved, "pct_of_fp16_tc_peak": 100 * achieved / peak_tflops}


def run_timings(ctx: BenchContext, model: str, sizes: list[int], batches: list[int], peak_tflops: float | None,
                write: Callable[[str, str, dict], None], deadline: float, warmup: int = 2, min_reps: int = 5,
                reps: int = 30, cell_time_s: float = 1.0, seed: int = 0,
                compiled: dict[int, list[Job]] | None = None, exclude: dict[str, str] | None = None) -> None:
    """Every size x batch cell: the available backends interleaved by benchmarks.harness.measure_cell, PSNR
    against torch-fp32 on the same latents, speed-up vs torch-fp32 and % of the measured fp16 tensor-core peak.

    write(name, status, fields) records one result; cells past `deadline` are recorded as incomplete;
    `exclude` {backend: why} leaves backends out, recorded as planned (a dry run's GPU-only work).
    """
    import torch
    backends = []
    for b in timed_backends(ctx, compiled):
        if b.name in (exclude or {}):
            write(b.name, "planned", {"backend": b.name, "precision": b.precision, "reason": exclude[b.name]})
            continue
        ok, why = b.available()
        if ok:
            backends.append(b)
        else:
            write(b.name, "skipped", {"backend": b.name, "precision": b.precision, "reason": why})
    for size in sizes:
        G = make_generator(model, size, seed)
        gflop = gflop_per_image(G.cfg)
        ws_all = latents(G, max(batches), 0.7)
        for batch in batches:
            tag = f"{size}px_b{batch}"
            if time.monotonic() > deadline:
                for b in backends:
                    write(f"{tag}_{b.name}", "incomplete", {"backend": b.name, "size": size, "batch": batch,
                                                            "reason": "the timing step ran out of its time budget"})
                continue
            ready, xs = [], {}
            for b in backends:
                try:
                    b.setup(G, batch)
                    xs[b.name] = b.prepare(ws_all[:batch])
                    ready.append(b)
                except Exception as exc:  # noqa: BLE001 - a backend that cannot set up is a result
                    write(f"{tag}_{b.name}", STATUS_ERROR, {"backend": b.name, "size": size, "batch": batch,
                                                            "reason": f"{type(exc).__name__}: {exc}"[:500]})
            results = measure_cell(ready, xs, batch, reps, warmup, cell_time_s, min_reps,
                                   reference_backend="torch-fp32")
            ref = results.get("torch-fp32")
            ref_med = ref.stats()["median_ms"] if ref is not None and ref.status == STATUS_OK and ref.latencies_s \
                else None
            for b in ready:
                res = results[b.name]
                res.setup_s, res.output = b.setup_s, None
                rec = cell_record(res, size, model, reps, warmup, ref_med, b.timing)
                rec.update(roofline_fields(rec, gflop, peak_tflops))
                rec["cuda_graph"] = isinstance(b, GraphedTorch)
                write(f"{tag}_{b.name}", rec["status"], rec)
            for b in ready:
                if isinstance(b, GraphedTorch):
                    b.release()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        for b in backends:
            b.close()
        del G
