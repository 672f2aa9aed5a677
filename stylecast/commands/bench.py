"""`stylecast bench backends|server|report`: timing of inference backends and of the gRPC server."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

CTX = {"show_default": True}

def _bench_dir() -> Path:
    import benchmarks
    return Path(benchmarks.__file__).resolve().parent


def _ints(spec: str, what: str) -> list[int]:
    try:
        vals = [int(s) for s in spec.replace(" ", "").split(",") if s]
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated integers, e.g. 1,2,4") from None
    if not vals or min(vals) < 1:
        raise click.BadParameter(f"{what} must be positive integers")
    return vals


def _default_out(kind: str) -> Path:
    dev = "cpu"
    if "torch" in sys.modules:
        import torch
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    return _bench_dir() / "results" / f"{kind}-{dev}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(context_settings=CTX)
def bench() -> None:
    """Benchmarks: backends (PyTorch, ONNX Runtime, TensorRT, plugins) and the gRPC server.

    \b
    Example:
      stylecast bench backends --quick
      stylecast bench server --quick
      stylecast bench report
    """


@bench.command("backends", context_settings=CTX)
@click.option("--sizes", default=None, help="Resolutions, comma-separated [default: 256,512,1024; --quick: 256].")
@click.option("--batches", default=None, help="Batch sizes [default: 1,2,4,8,16,32; --quick: 1,2,4,8].")
@click.option("--backends", "backends_spec", default=None,
              help="'all', 'quick' (torch-fp32,torch-bf16,ort-cpu) or names: torch-fp32, torch-bf16, torch-fp16, "
                   "torch-compile, torch-plugin, ort-cpu, ort-cuda, ort-cuda-fp16, trt-fp32, trt-fp16 "
                   "[default: all; --quick: quick].")
@click.option("--reps", type=click.IntRange(1), default=None, help="Timed rounds per cell [default: 50; --quick: 5].")
@click.option("--warmup", type=click.IntRange(0), default=None, help="Untimed rounds first [default: 3; --quick: 1].")
@click.option("--max-time", type=click.FloatRange(0, min_open=True), default=None,
              help="In each cell a backend stops once its timed calls add up to this many seconds (after --min-reps "
                   "rounds) [default: 60; --quick: 30].")
@click.option("--min-reps", type=click.IntRange(1), default=3, help="Timed rounds always run.")
@click.option("--model", type=click.Choice(["config-f", "small"]), default="config-f",
              help="config-f: rosinality channel multiplier 2 (random weights); small: a reduced-width generator.")
@click.option("--device", type=click.Choice(["auto", "cpu"]), default="auto",
              help="auto: PyTorch backends on CUDA when available.")
@click.option("--threads", type=click.IntRange(0), default=0, help="CPU threads for torch and ONNX Runtime (0 = torch's default).")
@click.option("--compile-timeout", type=click.FloatRange(1), default=900.0, help="Bound on torch.compile (seconds).")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Where ONNX graphs and engines go (kept) [default: a temporary directory, removed afterwards].")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="JSON-lines results file (appended) [default: benchmarks/results/backends-<device>-<date>.jsonl].")
@click.option("--quick", is_flag=True, help="The default CPU set of `make bench` (a few minutes on 2 cores).")
@click.option("--report/--no-report", default=True, help="Regenerate benchmarks/RESULTS.md and the plots afterwards.")
def backends_cmd(sizes: str | None, batches: str | None, backends_spec: str | None, reps: int | None,
                 warmup: int | None, max_time: float | None, min_reps: int, model: str, device: str, threads: int,
                 compile_timeout: float, work_dir: Path | None, out: Path | None, quick: bool, report: bool) -> None:
    """Time the synthesis network through every available backend, side by side, checked against fp32.

    Backends this machine cannot run are recorded as skipped with the reason; a backend whose output is wrong
    (PSNR below the threshold of its precision) is recorded as failed, not fast.

    \b
    Example:
      stylecast bench backends --quick
      stylecast bench backends --sizes 256,512,1024 --batches 1,2,4,8,16,32 --backends all
    """
    os.environ.setdefault("STYLECAST_STRICT_OPS", "1")
    from benchmarks.backends import parse_backends
    from benchmarks.harness import JsonlWriter, environment
    from benchmarks.sweep import QUICK, SweepOptions, run_backend_sweep

    q = QUICK if quick else {}
    try:
        names = parse_backends(backends_spec, quick=quick)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--backends") from None
    opts = SweepOptions(
        sizes=_ints(sizes, "--sizes") if sizes else list(q.get("sizes", [256, 512, 1024])),
        batches=_ints(batches, "--batches") if batches else list(q.get("batches", [1, 2, 4, 8, 16, 32])),
        backends=names,
        reps=reps if reps is not None else q.get("reps", 50),
        warmup=warmup if warmup is not None else q.get("warmup", 3),
        max_time_s=max_time if max_time is not None else q.get("max_time_s", 60.0),
        min_reps=min_reps, model=model, device=device, threads=threads, compile_timeout_s=compile_timeout,
        work_dir=work_dir)
    for s in opts.sizes:
        if s < 4 or s & (s - 1):
            raise click.BadParameter(f"--sizes: {s} is not a power of two >= 4")
    import torch  # noqa: F401 - environment() reads CUDA facts from it
    out = out or _default_out("backends")
    writer = JsonlWriter(out, environment())
    _log(f"writing {out}")
    run_backend_sweep(opts, writer, log=_log)
    click.echo(f"wrote {len(writer.records)} records to {out}")
    if report:
        _report([out], include_results_dir=True)


@bench.command("server", context_settings=CTX)
@click.option("--concurrency", default=None, help="Closed-loop client counts [default: 1,2,4,8,16,32,64].")
@click.option("--duration", type=click.FloatRange(0, min_open=True), default=None,
              help="Seconds of load per concurrency level (and per side) [default: 20; --quick: 6].")
@click.option("--model", type=click.Choice(["config-f", "small"]), default=None,
              help="Generator served (random weights) [default: config-f; --quick: small].")
@click.option("--size", type=click.IntRange(4), default=None, help="Resolution [default: 256; --quick: 128].")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Serve this existing bundle instead of exporting a random generator.")
@click.option("--seeds-per-request", type=click.IntRange(1), default=1, help="Images per Generate request.")
@click.option("--format", "fmt", type=click.Choice(["raw", "png", "jpeg"]), default="raw",
              help="Image format requested (raw = no encoding cost).")
@click.option("--max-batch", type=click.IntRange(1), default=8, help="Server --max-batch.")
@click.option("--max-queue-delay-ms", type=click.FloatRange(0), default=5.0, help="Server --max-queue-delay-ms.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto",
              help="Server --backend.")
@click.option("--stream-frames", type=click.IntRange(0), default=None,
              help="Frames of the GenerateStream test (0 = skip) [default: 64; --quick: 16].")
@click.option("--in-process/--no-in-process", default=True,
              help="Also call the same model in-process at each level (for the overhead ratio).")
@click.option("--server", "target", default=None,
              help="Benchmark an already running server at HOST:PORT instead of starting one (needs --model-name).")
@click.option("--model-name", default=None, help="Model name on --server.")
@click.option("--metrics-url", default=None, help="Prometheus /metrics URL of --server.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="JSON-lines results file [default: benchmarks/results/server-<device>-<date>.jsonl].")
@click.option("--quick", is_flag=True, help="The default CPU set of `make bench`.")
@click.option("--report/--no-report", default=True, help="Regenerate benchmarks/RESULTS.md and the plots afterwards.")
def server_cmd(concurrency: str | None, duration: float | None, model: str | None, size: int | None,
               bundle: Path | None, seeds_per_request: int, fmt: str, max_batch: int, max_queue_delay_ms: float,
               backend: str, stream_frames: int | None, in_process: bool, target: str | None,
               model_name: str | None, metrics_url: str | None, out: Path | None, quick: bool, report: bool) -> None:
    """Closed-loop load through the gRPC API at rising concurrency (loopback only), next to the same model
    called in-process, so the server's overhead is a ratio from one run.

    \b
    Example:
      stylecast bench server --quick
      stylecast bench server --model config-f --size 1024 --concurrency 1,2,4,8,16,32,64 --duration 30
    """
    from benchmarks.harness import JsonlWriter, environment
    from benchmarks.server import ServerBenchOptions, run_server_bench

    if target and not model_name:
        raise click.BadParameter("--server needs --model-name")
    opts = ServerBenchOptions(
        concurrency=_ints(concurrency, "--concurrency") if concurrency else [1, 2, 4, 8, 16, 32, 64],
        duration_s=duration if duration is not None else (6.0 if quick else 20.0),
        model=model or ("small" if quick else "config-f"), size=size or (128 if quick else 256),
        bundle=bundle, seeds_per_request=seeds_per_request, fmt=fmt, max_batch=max_batch,
        max_queue_delay_ms=max_queue_delay_ms, backend=backend,
        stream_frames=stream_frames if stream_frames is not None else (16 if quick else 64),
        in_process=in_process, target=target, model_name=model_name, metrics_url=metrics_url)
    out = out or _default_out("server")
    writer = JsonlWriter(out, environment())
    _log(f"writing {out}")
    run_server_bench(opts, writer, log=_log)
    click.echo(f"wrote {len(writer.records)} records to {out}")
    if report:
        _report([out], include_results_dir=True)


@bench.command("report", context_settings=CTX)
@click.argument("results", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Markdown file [default: benchmarks/RESULTS.md].")
@click.option("--plots", type=click.Path(path_type=Path), default=None, help="PNG directory [default: benchmarks/plots].")
def report_cmd(results: tuple[Path, ...], out: Path | None, plots: Path | None) -> None:
    """Write RESULTS.md (tables) and PNG plots from JSON-lines results (default: every file in
    benchmarks/results/; the latest run of each kind and device is shown).

    \b
    Example:
      stylecast bench report benchmarks/results/*.jsonl
    """
    _report(list(results), out, plots, include_results_dir=not results)


def _report(paths: list[Path], out: Path | None = None, plots: Path | None = None,
            include_results_dir: bool = True) -> None:
    """Report over the given files (and every file in benchmarks/results/ when include_results_dir)."""
    from benchmarks.report import write_report
    out = out or _bench_dir() / "RESULTS.md"
    plots = plots or _bench_dir() / "plots"
    results_dir = _bench_dir() / "results"
    files = {Path(p).resolve() for p in paths}
    if include_results_dir and results_dir.is_dir():
        files |= {p.resolve() for p in results_dir.glob("*.jsonl")}
    files = sorted(files)
    if not files:
        raise FileNotFoundError("no results: run `stylecast bench backends` or `stylecast bench server` first")
    written = write_report(files, out, plots)
    click.echo(f"wrote {out} and {len(written)} plot(s) in {plots}")
