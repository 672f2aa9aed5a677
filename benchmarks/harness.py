"""The timing harness of the stylecast benchmarks: interleaved timing loops, latency statistics, PSNR checks
against the fp32 reference, peak memory, and JSON-lines records that carry the environment they came from.

Definitions (the tests in tests/benchmarks/ hold the code to them):

- Latency of one call: wall time of `backend.run(x)` measured with `time.perf_counter` on the CPU; on a CUDA
  device it is the time between two CUDA events recorded on the current stream around the call (then
  synchronised), i.e. GPU time including the launch gaps inside the call, excluding host->device input copies
  and device->host output copies (those happen in `prepare` / `to_numpy`, outside the timed region).
- Percentiles: numpy's default 'linear' method (Hyndman & Fan type 7): for sorted x[0..n-1] the q-th
  percentile is x[k] + (x[k+1] - x[k]) * f where k + f = (n - 1) * q / 100. The median is the 50th percentile.
  With n samples, p99 is only meaningful for n >= 100 and p95 for n >= 20; `n` is recorded with every figure.
- Throughput (images/s): batch / median latency (steady state of one stream of calls); `img_per_s_mean` is
  batch * n / sum(latencies) for comparison.
- Correctness: PSNR in dB of the backend's float image against the fp32 reference on the same latents,
  10 * log10(peak^2 / MSE) with peak = 2 (images are nominally in [-1, 1]; the same definition as
  `stylecast export verify`). A backend below the threshold of its precision (PSNR_THRESHOLDS) or with a
  non-finite output is reported as `failed`, whatever its speed; without a reference (the fp32 backend itself
  failed) every other backend is `unchecked`, never `ok`.
- Peak memory on the CPU: the process's resident-set high-water mark (VmHWM in /proc/self/status), reset
  before every call by writing "5" to /proc/self/clear_refs; `peak_mib` is the largest VmHWM seen during the
  backend's calls and `delta_mib` the largest VmHWM minus the RSS just before the call (the call's own working
  memory; the process-wide figure also counts every other loaded backend). Where clear_refs cannot be written,
  it falls back to `resource.getrusage(RUSAGE_SELF).ru_maxrss`, the lifetime high-water mark (method
  "ru_maxrss", not per backend). On a CUDA device, backends that allocate through PyTorch report
  `torch.cuda.max_memory_allocated` (reset before each call); others (ONNX Runtime, TensorRT) report the
  device memory in use after the call from cudaMemGetInfo (method "cuda_mem_get_info", not a true peak).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import resource
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

RECORD_SCHEMA = "stylecast.bench/v1"
PERCENTILE_METHOD = "linear"  # numpy's default; Hyndman & Fan type 7
PSNR_PEAK = 2.0
# Minimum PSNR (dB) against the fp32 reference, by precision. fp32 backends differ only by summation order
# (~100+ dB in practice); fp16 follows `stylecast export verify` (FP16_MIN_PSNR); bf16 keeps 3 fewer mantissa
# bits than fp16 (~18 dB less at equal range), so a correct bf16 generator lands in the high 30s to 40s. A
# broken backend (garbage, NaN, wrong layout) is far below every threshold.
PSNR_THRESHOLDS = {"fp32": 60.0, "tf32": 45.0, "fp16": 40.0, "bf16": 30.0}

STATUS_OK = "ok"
STATUS_FAILED = "failed"     # ran, but its output is wrong (PSNR below threshold or non-finite)
STATUS_ERROR = "error"       # raised during setup or run
STATUS_SKIPPED = "skipped"   # not available here (missing library, no GPU, ...)
STATUS_UNCHECKED = "unchecked"  # ran, but there was no fp32 reference to check it against (never "ok")


# ----------------------------------------------------------------------------------------------------------
# Statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with numpy's 'linear' method (see the module docstring)."""
    if len(values) == 0:
        raise ValueError("percentile of no values")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q, method=PERCENTILE_METHOD))


def latency_stats(latencies_s: Sequence[float], batch: int = 1) -> dict[str, Any]:
    """Summary of per-call latencies in seconds -> milliseconds and images/s.

    Returns:
        {"n", "median_ms", "p95_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "std_ms", "img_per_s",
         "img_per_s_mean"}
    """
    if len(latencies_s) == 0:
        raise ValueError("no latencies")
    a = np.asarray(latencies_s, dtype=np.float64)
    med = percentile(a, 50)
    return {
        "n": int(a.size),
        "median_ms": med * 1e3,
        "p95_ms": percentile(a, 95) * 1e3,
        "p99_ms": percentile(a, 99) * 1e3,
        "mean_ms": float(a.mean()) * 1e3,
        "min_ms": float(a.min()) * 1e3,
        "max_ms": float(a.max()) * 1e3,
        "std_ms": float(a.std(ddof=1)) * 1e3 if a.size > 1 else 0.0,
        "img_per_s": batch / med if med > 0 else float("inf"),
        "img_per_s_mean": batch * a.size / float(a.sum()) if a.sum() > 0 else float("inf"),
    }


def psnr(a: np.ndarray, ref: np.ndarray, peak: float = PSNR_PEAK) -> float:
    """PSNR (dB) of a against ref; +inf when identical, nan when either holds a non-finite value.

    Raises:
        ValueError: when the shapes differ (a wrong layout is a failure, not a low PSNR).
    """
    a = np.asarray(a)
    ref = np.asarray(ref)
    if a.shape != ref.shape:
        raise ValueError(f"output shape {a.shape} != reference shape {ref.shape}")
    a64 = a.astype(np.float64)
    r64 = ref.astype(np.float64)
    if not (np.isfinite(a64).all() and np.isfinite(r64).all()):
        return float("nan")
    mse = float(np.mean((a64 - r64) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def check_output(out: np.ndarray, ref: np.ndarray, precision: str) -> tuple[bool, float | None, str]:
    """Is `out` a correct rendering of `ref` at `precision`? Returns (ok, psnr_db or None, reason)."""
    threshold = PSNR_THRESHOLDS[precision]
    try:
        p = psnr(out, ref)
    except ValueError as exc:
        return False, None, str(exc)
    if math.isnan(p):
        return False, None, "non-finite values in the output"
    if p < threshold:
        return False, p, f"PSNR {p:.1f} dB < {threshold:.0f} dB ({precision}) against the fp32 reference"
    return True, p, ""


# ----------------------------------------------------------------------------------------------------------
# Memory


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _ru_maxrss_kib() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


class CpuMemoryMeter:
    """Resident-set high-water mark around calls (see the module docstring)."""

    def __init__(self) -> None:
        self.method = "vmhwm" if self._can_reset() else "ru_maxrss"

    @staticmethod
    def _can_reset() -> bool:
        if _status_kib("VmHWM") is None:
            return False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def before(self) -> int:
        """Reset the high-water mark (when possible); returns the current RSS in KiB."""
        if self.method == "vmhwm":
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.method = "ru_maxrss"
            return _status_kib("VmRSS") or 0
        return _ru_maxrss_kib()

    def after(self) -> int:
        """The high-water mark in KiB since before()."""
        if self.method == "vmhwm":
            return _status_kib("VmHWM") or 0
        return _ru_maxrss_kib()


class MemoryTracker:
    """Largest peak and per-call delta (MiB) over the calls of one backend."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.peak_mib: float | None = None
        self.delta_mib: float | None = None

    def add(self, peak_mib: float | None, delta_mib: float | None) -> None:
        if peak_mib is not None:
            self.peak_mib = peak_mib if self.peak_mib is None else max(self.peak_mib, peak_mib)
        if delta_mib is not None:
            self.delta_mib = delta_mib if self.delta_mib is None else max(self.delta_mib, delta_mib)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "peak_mib": _round(self.peak_mib), "delta_mib": _round(self.delta_mib)}


def _round(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(float(x), nd)


# ----------------------------------------------------------------------------------------------------------
# Timing


class Timer:
    """Times one call of a backend on the CPU (perf_counter) or a CUDA device (events on the current stream)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock

    def time_call(self, backend, x) -> tuple[float, Any]:
        if getattr(backend, "timing", "wall") == "cuda_events":
            import torch
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = backend.run(x)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, out
        t0 = self.clock()
        out = backend.run(x)
        backend_sync(backend)
        return self.clock() - t0, out


def backend_sync(backend) -> None:
    sync = getattr(backend, "sync", None)
    if sync is not None:
        sync()


@dataclass
class CellResult:
    """The outcome of one backend at one (size, batch)."""

    backend: str
    precision: str
    device: str
    batch: int
    status: str = STATUS_OK
    reason: str = ""
    latencies_s: list[float] = field(default_factory=list)
    psnr_db: float | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    setup_s: float | None = None
    output: np.ndarray | None = None  # the checked output (dropped before writing)

    def stats(self) -> dict[str, Any] | None:
        return latency_stats(self.latencies_s, self.batch) if self.latencies_s else None


def measure_cell(backends: Sequence[Any], x_by_backend: dict[str, Any], batch: int, reps: int, warmup: int,
                 max_time_s: float | None = None, min_reps: int = 3, reference: np.ndarray | None = None,
                 reference_backend: str | None = None, timer: Timer | None = None,
                 memory: bool = True) -> dict[str, CellResult]:
    """Time `backends` side by side, interleaved: warm-up rounds, then rounds in which every backend runs once,
    starting from a different backend each round (so that none always follows the same neighbour).

    Args:
        backends: objects with name, precision, device, run(x), to_numpy(out) (setup already done).
        x_by_backend: the prepared input of each backend (the same latents, on its device / in its format).
        batch: images per call.
        reps: timed rounds; a backend stops early (after `min_reps` rounds) once its timed calls add up to
            `max_time_s`; the others go on.
        warmup: untimed rounds first. The output of the first warm-up call (or of the first timed call when
            warmup is 0) is the one checked for correctness.
        reference: fp32 reference images [N, 3, R, R]; when None, `reference_backend`'s checked output is used.
    Returns:
        {backend name: CellResult}; a backend that raises gets status "error" and leaves the rotation.
    """
    timer = timer or Timer()
    cpu_meter = CpuMemoryMeter() if memory else None
    results = {b.name: CellResult(b.name, b.precision, getattr(b, "device", "cpu"), batch) for b in backends}
    trackers: dict[str, MemoryTracker] = {}
    active = list(backends)

    def call(b, timed: bool) -> None:
        res = results[b.name]
        try:
            mem_before = _mem_before(b, cpu_meter)
            dt, out = timer.time_call(b, x_by_backend[b.name])
            _mem_after(b, cpu_meter, mem_before, trackers)
            if timed:
                res.latencies_s.append(dt)
            if res.output is None and (not timed or warmup == 0):
                res.output = np.asarray(b.to_numpy(out), dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - any backend failure is a result, not a crash
            res.status, res.reason = STATUS_ERROR, f"{type(exc).__name__}: {exc}"[:500]
            active.remove(b)
            _free_cuda()

    for _ in range(warmup):
        for b in list(active):
            call(b, timed=False)
    for r in range(reps):
        if not active:
            break
        k = r % len(active)
        for b in list(active[k:] + active[:k]):
            if b in active:
                call(b, timed=True)
        if max_time_s is not None and r + 1 >= min_reps:
            # A backend leaves the rotation once its own timed calls add up to max_time_s, so that a slow
            # backend (say, the CPU next to a GPU) does not cut the fast ones short.
            for b in list(active):
                if sum(results[b.name].latencies_s) >= max_time_s:
                    active.remove(b)

    for name, tr in trackers.items():
        results[name].memory = tr.as_dict()
    ref = reference
    if ref is None and reference_backend is not None:
        rb = results.get(reference_backend)
        ref = rb.output if rb is not None and rb.status == STATUS_OK else None
    for res in results.values():
        if res.status != STATUS_OK:
            continue
        if ref is None:
            res.status, res.reason = STATUS_UNCHECKED, "no fp32 reference in this run: output not checked"
            continue
        ok, p, why = check_output(res.output, ref, res.precision)
        res.psnr_db = p
        if not ok:
            res.status, res.reason = STATUS_FAILED, why
    return results


def _mem_before(b, cpu_meter: CpuMemoryMeter | None):
    if cpu_meter is None:
        return None
    if getattr(b, "device", "cpu") == "cuda":
        import torch
        if getattr(b, "uses_torch_allocator", False):
            torch.cuda.reset_peak_memory_stats()
            return ("torch", torch.cuda.memory_allocated())
        return ("info", None)
    return ("cpu", cpu_meter.before())


def _mem_after(b, cpu_meter: CpuMemoryMeter | None, before, trackers: dict[str, MemoryTracker]) -> None:
    if cpu_meter is None or before is None:
        return
    kind, base = before
    if kind == "torch":
        import torch
        peak = torch.cuda.max_memory_allocated()
        tr = trackers.setdefault(b.name, MemoryTracker("cuda_max_memory_allocated"))
        tr.add(peak / 2**20, (peak - base) / 2**20)
    elif kind == "info":
        import torch
        free, total = torch.cuda.mem_get_info()
        tr = trackers.setdefault(b.name, MemoryTracker("cuda_mem_get_info"))
        tr.add((total - free) / 2**20, None)
    else:
        hwm = cpu_meter.after()
        tr = trackers.setdefault(b.name, MemoryTracker(cpu_meter.method))
        tr.add(hwm / 1024, (hwm - base) / 1024 if cpu_meter.method == "vmhwm" else None)


def _free_cuda() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# Environment and records


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    names = {"torch": ["torch"], "onnxruntime": ["onnxruntime", "onnxruntime-gpu"],
             "tensorrt": ["tensorrt", "tensorrt-cu13", "tensorrt-cu12"],
             "tensorrt_rtx": ["tensorrt_rtx_cu13", "tensorrt-rtx-cu13", "tensorrt_rtx"],
             "numpy": ["numpy"], "onnx": ["onnx"], "grpcio": ["grpcio"]}.get(module, [module])
    for n in names:
        try:
            return version(n)
        except PackageNotFoundError:
            continue
    return None


def environment(command: Sequence[str] | None = None) -> dict[str, Any]:
    """Where a result came from: device, driver and library versions, CPU, load, command line and date."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(command if command is not None else _command_line()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch": _version("torch"), "onnxruntime": _version("onnxruntime"), "onnx": _version("onnx"),
        "tensorrt": _version("tensorrt"), "tensorrt_rtx": _version("tensorrt_rtx"), "numpy": _version("numpy"),
        "device": "cpu", "device_name": cpu_model(), "gpu": None, "driver": None, "cuda": None,
    }
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        env["torch_threads"] = torch.get_num_threads()
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env.update(device="cuda", device_name=props.name, gpu=props.name,
                       gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       compute_capability=f"{props.major}.{props.minor}", driver=_nvidia_driver(),
                       cudnn=torch.backends.cudnn.version())
    return env


def _command_line() -> list[str]:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("__main__.py", "stylecast")):
        argv[0] = "stylecast"
    return argv


def _nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as f:
            first = f.readline()
        for tok in first.split():
            if tok.count(".") >= 1 and tok.replace(".", "").isdigit():
                return tok
    except OSError:
        pass
    try:
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) else (str(x) if math.isinf(x) else x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return _jsonable(x.item())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, Path):
        return str(x)
    return x


class JsonlWriter:
    """Appends one JSON object per line (flushed each time, so an interrupted sweep keeps what it measured).

    Every record gets `schema`, `kind` and the run's `env` (see `environment`).
    """

    def __init__(self, path: str | Path | None, env: dict[str, Any]) -> None:
        self.path = Path(path) if path is not None else None
        self.env = env
        self.records: list[dict[str, Any]] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, kind: str, record: dict[str, Any]) -> dict[str, Any]:
        doc = _jsonable({"schema": RECORD_SCHEMA, "kind": kind, **record, "env": self.env})
        self.records.append(doc)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(doc, sort_keys=False, allow_nan=False) + "\n")
        return doc


def read_jsonl(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """All records of the given JSON-lines files (blank lines ignored)."""
    out = []
    for p in paths:
        with open(p) as f:
            for i, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{p}:{i}: not JSON ({exc.msg})") from None
    return out


def cell_record(res: CellResult, size: int, model: str, reps: int, warmup: int,
                ref_median_ms: float | None, timing: str = "wall") -> dict[str, Any]:
    """The JSON record of one backend at one (size, batch)."""
    st = res.stats()
    speedup = None
    if st is not None and ref_median_ms and res.status == STATUS_OK:
        speedup = ref_median_ms / st["median_ms"]
    return {
        "backend": res.backend, "precision": res.precision, "device": res.device, "model": model,
        "size": size, "batch": res.batch, "status": res.status, "reason": res.reason,
        "reps_requested": reps, "warmup": warmup, "timer": timing, "latency": st,
        "img_per_s": st["img_per_s"] if st else None,
        "speedup_vs_torch_fp32": speedup,
        "psnr_db": res.psnr_db, "psnr_min_db": PSNR_THRESHOLDS.get(res.precision),
        "memory": res.memory or None, "setup_s": res.setup_s,
        "latencies_ms": [round(t * 1e3, 4) for t in res.latencies_s],
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
