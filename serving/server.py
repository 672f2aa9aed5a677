"""The stylecast gRPC server: StyleService + grpc.health.v1 (overall and per model) + reflection on one port,
Prometheus metrics on another, over a hot-reloaded model repository.

    server = StyleServer(ServerConfig(models_dir=Path("models"), port=0))
    await server.start()          # loads and golden-checks every bundle, only then binds and reports SERVING
    ...                           # server.port, server.metrics_port
    await server.stop()           # stop accepting, drain in-flight work (grace period), unload
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
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
# Health service names. Readiness ("" = the whole server, as gRPC's convention, and each API's service name): the
# initial load is done, every configured model is READY and the server is not draining. Liveness: the process
# listens and is not draining, whatever its models (a Kubernetes liveness probe must not restart a replica whose
# bundle is broken: that is what readiness reports).
LIVENESS_SERVICE = "liveness"
READINESS_SERVICES = ("", SERVICE_NAME, kserve.SERVICE_NAME)
READINESS_POLL_S = 0.5  # also catches a refused bundle being removed, which no model-state event reports


def bind_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{port}"


def check_port_free(host: str, port: int) -> None:
    """Fail before a long model load, not after it, when the gRPC port is taken (port 0 always binds).

    Raises:
        OSError: the address cannot be bound.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {bind_address(host, port)}: {exc}") from None
    family, _, _, _, sockaddr = infos[0]
    # SO_REUSEADDR as gRPC sets it: a port in TIME_WAIT is free, one with a listener is not.
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            raise OSError(f"cannot listen on {bind_address(host, port)}: {exc.strerror or exc}") from None


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
        self._initial_dirs: frozenset[str] | None = None  # bundle directories present at the initial scan
        self._is_ready = False
        self._readiness_task: asyncio.Task | None = None

    async def start(self) -> None:
        """Load every bundle of the repository, then listen: a starting replica accepts no connection (clients and
        proxies see UNAVAILABLE: connection refused, and try another replica) before its initial load is done."""
        cfg = self.config
        if not cfg.models_dir.is_dir():
            raise FileNotFoundError(f"model repository not found: {cfg.models_dir}")
        check_port_free(cfg.host, cfg.port)
        self._inference_pool = ThreadPoolExecutor(cfg.inference_workers, thread_name_prefix="inference")
        self._encode_pool = ThreadPoolExecutor(cfg.encode_workers, thread_name_prefix="encode")
        self.repository = repo = ModelRepository(cfg.models_dir, backend=cfg.backend, batch=cfg.batch,
                                                 threads=cfg.threads, executor=self._inference_pool,
                                                 metrics=self.metrics, golden_check=cfg.golden_check,
                                                 probe=self.probe)
        self.health = health_aio.HealthServicer()
        for service in (*READINESS_SERVICES, LIVENESS_SERVICE):
            await self.health.set(service, NOT_SERVING)
        repo.listeners.append(self._on_model_state)
        if cfg.metrics_port:  # before the load: a taken port fails fast, and the load shows in the metrics
            self._metrics_http = MetricsHTTPServer(self.metrics, cfg.host, max(0, cfg.metrics_port))
            self.metrics_port = self._metrics_http.port
        t0 = time.monotonic()
        await repo.scan()
        self._initial_dirs = frozenset(repo.entries)
        load_s = round(time.monotonic() - t0, 3)

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
        await self.health.set(LIVENESS_SERVICE, SERVING)
        await server.start()
        log(logger, logging.INFO, "listening", address=bind_address(cfg.host, port), tls=cfg.tls,
            auth=bool(cfg.auth_tokens), metrics_port=self.metrics_port, models_dir=str(cfg.models_dir),
            backend=cfg.backend, max_batch=cfg.batch.max_batch, max_queue_delay_ms=cfg.batch.max_queue_delay_ms,
            max_queue=cfg.batch.max_queue)
        if cfg.exposed and not (cfg.tls and cfg.auth_tokens):
            missing = " and ".join(x for x, on in (("TLS", cfg.tls), ("auth", bool(cfg.auth_tokens))) if not on)
            log(logger, logging.WARNING, f"listening on non-loopback address {cfg.host} without {missing}: "
                "anyone who can reach this port can use it" + ("" if cfg.tls else " and read its traffic"),
                host=cfg.host)
        await self._update_readiness()
        log(logger, logging.INFO, "initial load done", ready=sorted(repo.models),
            failed=[s.name for s in repo.statuses() if not s.ready], load_s=load_s,
            required=sorted(self.required_models()), serving=self._is_ready)
        repo.start_reloading(cfg.reload_interval_s)
        self._readiness_task = asyncio.get_running_loop().create_task(self._readiness_loop())

    def required_models(self) -> set[str]:
        """The configured models readiness waits for: `require_models`, or else the model name of every bundle
        directory present at the initial scan and still present (a removed directory is no longer configured)."""
        repo = self.repository
        if self.config.require_models:
            return set(self.config.require_models)
        if repo is None or self._initial_dirs is None:
            return set()
        return {e.name or e.dir_name for d, e in repo.entries.items() if d in self._initial_dirs}

    def _compute_ready(self) -> bool:
        repo = self.repository
        if self._stopping or repo is None or self._initial_dirs is None:
            return False
        if self.config.require_models:
            return all(repo.models.get(n) is not None and repo.models[n].accepting for n in self.config.require_models)
        # Every initial bundle directory serves its own model (a refused duplicate name or a failed load does not).
        return all(e.model is not None and e.model.accepting and repo.models.get(e.model.name) is e.model
                   for d, e in repo.entries.items() if d in self._initial_dirs)

    async def _update_readiness(self) -> None:
        ready = self._compute_ready()
        if self.health is None or self._stopping or ready == self._is_ready:
            return
        self._is_ready = ready
        for service in READINESS_SERVICES:
            await self.health.set(service, SERVING if ready else NOT_SERVING)
        log(logger, logging.INFO, "readiness", serving=ready, required=sorted(self.required_models()),
            ready_models=sorted(self.repository.models) if self.repository else [])

    async def _readiness_loop(self) -> None:
        while True:
            await asyncio.sleep(READINESS_POLL_S)
            await self._update_readiness()

    def _ready(self) -> bool:
        """KServe ServerReady: the same readiness as the health service (initial load done, every configured model
        READY, not shutting down)."""
        return self._is_ready and not self._stopping

    async def _on_model_state(self, name: str, ready: bool) -> None:
        if self.health is not None and not self._stopping:
            await self.health.set(name, SERVING if ready else NOT_SERVING)
            if self._initial_dirs is not None:
                await self._update_readiness()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: health NOT_SERVING, keep serving for the drain delay (if any), refuse new RPCs, let
        in-flight ones finish within the grace period (then cancel them), drain the batchers and unload the models."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.grace_s if grace is None else grace
        t0 = time.monotonic()
        log(logger, logging.INFO, "shutting down", grace_s=grace)
        if self._readiness_task is not None:
            self._readiness_task.cancel()
        self._is_ready = False
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.repository is not None:
            await self.repository.stop_reloading()
        if self._server is not None and self.config.drain_delay_s > 0:
            # Lame duck: keep serving while health-checking clients and load balancers see NOT_SERVING and move
            # away. Stopping at once would cancel the calls that already reached the server but no handler yet.
            log(logger, logging.INFO, "draining", drain_delay_s=self.config.drain_delay_s)
            await asyncio.sleep(self.config.drain_delay_s)
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
        # SIGTERM during the initial load (a pod deleted while it starts) stops at once instead of loading first.
        starting = asyncio.ensure_future(server.start())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            log(logger, logging.INFO, "stopped during the initial load")
        else:
            starting.result()  # re-raise a start-up error
            if ready_callback is not None:
                ready_callback(server)
            await stopping
        stopping.cancel()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop()
