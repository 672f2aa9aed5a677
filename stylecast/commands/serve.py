"""`stylecast serve`: the torch-free gRPC server over a directory of bundles."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(context_settings={"show_default": True})
@click.option("--models", "models_dir", required=True, type=click.Path(path_type=Path),
              help="Model repository: a directory with one bundle directory per model (hot-reloaded).")
@click.option("--host", default="127.0.0.1", help="Address to bind; a non-loopback address without TLS and auth logs a warning.")
@click.option("--port", type=click.IntRange(0, 65535), default=50051, help="gRPC port (0 = any free port).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=9090,
              help="Prometheus /metrics HTTP port (0 = disabled).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto",
              help="auto: a matching TensorRT engine if any, else ONNX Runtime (CUDA EP when installed, else CPU).")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=8, help="Most rows per model batch.")
@click.option("--max-queue-delay-ms", type=click.FloatRange(0, 10_000), default=5.0,
              help="How long the oldest queued row waits for a batch to fill.")
@click.option("--max-queue", type=click.IntRange(1, 1_000_000), default=256,
              help="Queued rows per model before requests get RESOURCE_EXHAUSTED.")
@click.option("--max-seeds", type=click.IntRange(1, 100_000), default=64, help="Latents per Generate request.")
@click.option("--max-output-size", type=click.IntRange(1, 16384), default=2048, help="Largest output width/height.")
@click.option("--max-photo-size", type=click.IntRange(64, 16384), default=4096,
              help="Stylize (face models): largest side of an uploaded photo.")
@click.option("--max-faces", type=click.IntRange(1, 256), default=8,
              help="Stylize (face models): faces stylized per photo (the largest ones).")
@click.option("--max-message-mb", type=click.IntRange(1, 2047), default=64, help="gRPC message size limit.")
@click.option("--reload-interval", type=click.FloatRange(0, 3600), default=2.0,
              help="Seconds between model repository scans (0 = never reload).")
@click.option("--threads", type=click.IntRange(0, 1024), default=0,
              help="ONNX Runtime intra-op threads per session (0 = all cores).")
@click.option("--auth-token-file", type=click.Path(path_type=Path), default=None,
              help="File with accepted bearer tokens, one per line; clients send 'authorization: Bearer <token>'.")
@click.option("--tls-cert", type=click.Path(path_type=Path), default=None, help="PEM server certificate (chain).")
@click.option("--tls-key", type=click.Path(path_type=Path), default=None, help="PEM private key.")
@click.option("--grace", type=click.FloatRange(0, 3600), default=10.0,
              help="Seconds in-flight requests get to finish on SIGTERM / SIGINT.")
@click.option("--drain-delay", type=click.FloatRange(0, 3600), default=0.0,
              help="On SIGTERM / SIGINT, seconds to keep serving after health turns NOT_SERVING, so that "
                   "health-checking clients and load balancers move away before the port closes (e.g. 2).")
@click.option("--require-model", "require_models", multiple=True, metavar="NAME",
              help="Readiness (health '' SERVING) waits for this model to be READY (repeatable); "
                   "default: every bundle present at start.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
def serve(models_dir: Path, host: str, port: int, metrics_port: int, backend: str, max_batch: int,
          max_queue_delay_ms: float, max_queue: int, max_seeds: int, max_output_size: int, max_photo_size: int,
          max_faces: int, max_message_mb: int,
          reload_interval: float, threads: int, auth_token_file: Path | None, tls_cert: Path | None,
          tls_key: Path | None, grace: float, drain_delay: float, require_models: tuple[str, ...],
          log_level: str) -> None:
    """Serve every bundle in a directory over gRPC (StyleService, KServe v2, health, reflection) with dynamic
    batching. The port opens only once every bundle present at start is loaded (or refused).

    \b
    Example:
      stylecast serve --models demo/models --port 50051 --metrics-port 9090
      stylecast serve --models /models --host 0.0.0.0 --require-model ffhq --require-model ffhq-toon
    Logs are JSON lines on stderr; SIGTERM / SIGINT drain in-flight requests and exit 0. Health: '' (and each
    API's service name) is SERVING while every required model is READY (readiness); 'liveness' while the server
    listens and is not draining.
    """
    import asyncio

    from serving.config import BatchConfig, Limits, ServerConfig, load_tokens
    from serving.logs import configure_logging
    from serving.server import serve as run

    if not models_dir.is_dir():
        raise FileNotFoundError(f"model repository not found: {models_dir}")
    for p in (tls_cert, tls_key):
        if p is not None and not p.is_file():
            raise FileNotFoundError(f"TLS file not found: {p}")
    if max_queue < max_batch:
        raise ValueError(f"--max-queue ({max_queue}) must be at least --max-batch ({max_batch})")
    config = ServerConfig(
        models_dir=models_dir, host=host, port=port, metrics_port=metrics_port, backend=backend,
        batch=BatchConfig(max_batch=max_batch, max_queue_delay_ms=max_queue_delay_ms, max_queue=max_queue),
        limits=Limits(max_seeds=max_seeds, max_output_size=max_output_size, max_photo_size=max_photo_size,
                      max_faces=max_faces), max_message_mb=max_message_mb,
        reload_interval_s=reload_interval, threads=threads,
        auth_tokens=load_tokens(auth_token_file) if auth_token_file else (), tls_cert=tls_cert, tls_key=tls_key,
        grace_s=grace, drain_delay_s=drain_delay, require_models=tuple(require_models))
    configure_logging(log_level)
    try:
        asyncio.run(run(config))
    except OSError as exc:  # e.g. the port is taken
        raise click.ClickException(str(exc)) from None
