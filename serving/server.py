"""The stylecast gRPC server: StyleService + grpc.health.v1 (overall and per model) + reflection on one port,
Prometheus metrics on another, over a hot-reloaded model repository.

    server = StyleServer(ServerConfig(models_dir=Path("models"), port=0))
    await server.start()          # binds, loads and golden-checks every bundle, then reports SERVING
    ...                           # server.port, server.metrics_port
    await server.stop()           # stop accepting, drain in-flight work (grace period), unload
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from common.version import stylecast_version
from protos.stylecast.v1 import style_pb2, style_pb2_grpc

from .auth import BearerTokenInterceptor
from . import kserve
from .backends import SystemProbe
from .config import ServerConfig
from .logs import log
from .metrics import Metrics, MetricsHTTPServer
from .repository import ModelRepository
from .style_service import StyleServicer

logger = logging.getLogger("serving.server")

SERVICE_NAME = style_pb2.DESCRIPTOR.services_by_name["StyleService"].full_name  # "stylecast.v1.StyleService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING




def bind_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{port}"


class StyleServer:
    def __init__(self, config: ServerConfig, probe: SystemProbe | None = None):
        self.config = config
        self.probe = probe
        self.metrics = Metrics()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.repository: ModelRepository | None = None
        self.health = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http: MetricsHTTPServer | None = None
        self._inference_pool: ThreadPoolExecutor | None = None
        self._encode_pool: ThreadPoolExecutor | None = None
        self._stopped = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        cfg = self.config
        if not cfg.models_dir.is_dir():
            raise FileNotFoundError(f"model repository not found: {cfg.models_dir}")
        self._inference_pool = ThreadPoolExecutor(cfg.inference_workers, thread_name_prefix="inference")
        self._encode_pool = ThreadPoolExecutor(cfg.encode_workers, thread_name_prefix="encode")
        self.repository = repo = ModelRepository(cfg.models_dir, backend=cfg.backend, batch=cfg.batch,
                                                 threads=cfg.threads, executor=self._inference_pool,
                                                 metrics=self.metrics, golden_check=cfg.golden_check,
                                                 probe=self.probe)
        self.health = health_aio.HealthServicer()
        await self.health.set("", NOT_SERVING)
        await self.health.set(SERVICE_NAME, NOT_SERVING)
        repo.listeners.append(self._on_model_state)

        options = [("grpc.max_send_message_length", cfg.max_message_bytes),
                   ("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.so_reuseport", 0)]  # a second server on the same port must fail, not share it
        interceptors = [BearerTokenInterceptor(cfg.auth_tokens)] if cfg.auth_tokens else []
        server = grpc.aio.server(interceptors=interceptors, options=options)
        style_pb2_grpc.add_StyleServiceServicer_to_server(
            StyleServicer(repo, cfg.limits, self.metrics, self._encode_pool), server)
        kserve.pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            kserve.KServeServicer(repo, cfg.limits, self.metrics, server_ready=self._ready, version=stylecast_version(),
                                  encode_pool=self._encode_pool), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, kserve.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                             reflection.SERVICE_NAME), server)
        address = bind_address(cfg.host, cfg.port)
        try:
            if cfg.tls:
                creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])
                port = server.add_secure_port(address, creds)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc raises when the port cannot be bound
            raise OSError(f"cannot listen on {address}: {exc}") from None
        if not port:
            raise OSError(f"cannot listen on {address}")
        self.port = port
        self._server = server
        await server.start()
        if cfg.metrics_port:
            self._metrics_http = MetricsHTTPServer(self.metrics, cfg.host, max(0, cfg.metrics_port))
            self.metrics_port = self._metrics_http.port
        log(logger, logging.INFO, "listening", address=bind_address(cfg.host, port), tls=cfg.tls,
            auth=bool(cfg.auth_tokens), metrics_port=self.metrics_port, models_dir=str(cfg.models_dir),
            backend=cfg.backend, max_batch=cfg.batch.max_batch, max_queue_delay_ms=cfg.batch.max_queue_delay_ms,
            max_queue=cfg.batch.max_queue)
        if cfg.exposed and not (cfg.tls and cfg.auth_tokens):
            missing = " and ".join(x for x, on in (("TLS", cfg.tls), ("auth", bool(cfg.auth_tokens))) if not on)
            log(logger, logging.WARNING, f"listening on non-loopback address {cfg.host} without {missing}: "
                "anyone who can reach this port can use it" + ("" if cfg.tls else " and read its traffic"),
                host=cfg.host)
        t0 = time.monotonic()
        await repo.scan()
        ready = sorted(repo.models)
        log(logger, logging.INFO, "initial load done", ready=ready,
            failed=[s.name for s in repo.statuses() if not s.ready], load_s=round(time.monotonic() - t0, 3))
        await self.health.set("", SERVING)
        await self.health.set(SERVICE_NAME, SERVING)
        repo.start_reloading(cfg.reload_interval_s)

    def _ready(self) -> bool:
        """KServe ServerReady: the initial repository scan is done and the server is not shutting down."""
        return not self._stopping and self.repository is not None and self.repository.scans > 0

    async def _on_model_state(self, name: str, ready: bool) -> None:
        if self.health is not None and not self._stopping:
            await self.health.set(name, SERVING if ready else NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: health NOT_SERVING, refuse new RPCs, let in-flight ones finish within the grace
        period (then cancel them), drain the batchers and unload the models."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.grace_s if grace is None else grace
        t0 = time.monotonic()
        log(logger, logging.INFO, "shutting down", grace_s=grace)
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.repository is not None:
            await self.repository.stop_reloading()
        if self._server is not None:
            await self._server.stop(grace)
        if self.repository is not None:
            await self.repository.close()
        if self._metrics_http is not None:
            self._metrics_http.close()
        for pool in (self._inference_pool, self._encode_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        log(logger, logging.INFO, "stopped", drain_s=round(time.monotonic() - t0, 3))
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(config: ServerConfig, ready_callback=None) -> None:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully (the `stylecast serve` main loop)."""
    server = StyleServer(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        if ready_callback is not None:
            ready_callback(server)
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop()
