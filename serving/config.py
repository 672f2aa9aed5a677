"""Server configuration: one frozen dataclass that `stylecast serve` fills from its options (and tests build)."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

BACKENDS = ("auto", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class Limits:
    """Per-request limits; anything beyond them is INVALID_ARGUMENT."""

    max_seeds: int = 64             # latents per Generate request (also the mixing latents)
    max_output_size: int = 2048     # width / height of an encoded image
    max_stream_frames: int = 4096   # frames of one GenerateStream call
    max_waypoints: int = 64         # interpolation waypoints
    psi_range: tuple[float, float] = (-2.0, 2.0)
    default_quality: int = 90       # JPEG / WebP
    max_photo_size: int = 4096      # Stylize: largest side of an uploaded photo (stylegan2-family models)
    max_faces: int = 8              # Stylize: faces stylized per photo (the largest ones)


@dataclass(frozen=True)
class BatchConfig:
    """Dynamic batching of one model: rows from any requests are run together."""

    max_batch: int = 8
    max_queue_delay_ms: float = 5.0   # how long the oldest queued row may wait for the batch to fill
    max_queue: int = 256              # queued rows per model; beyond -> RESOURCE_EXHAUSTED
    stream_window: int = 0            # rows a stream keeps queued at once; 0 = 2 * max_batch


@dataclass(frozen=True)
class ServerConfig:
    models_dir: Path
    host: str = "127.0.0.1"
    port: int = 50051                 # 0 = any free port (read StyleServer.port)
    metrics_port: int = 0             # 0 = no metrics endpoint; -1 = any free port (tests)
    backend: str = "auto"             # auto | onnxruntime | tensorrt
    batch: BatchConfig = field(default_factory=BatchConfig)
    limits: Limits = field(default_factory=Limits)
    max_message_mb: int = 64          # gRPC send / receive limit
    reload_interval_s: float = 2.0    # model repository poll period; 0 = load once, never reload
    threads: int = 0                  # ONNX Runtime intra-op threads per session; 0 = ORT default
    inference_workers: int = 2        # threads running model batches and mapping
    encode_workers: int = 2           # threads encoding images (PIL releases the GIL)
    auth_tokens: tuple[str, ...] = () # accepted bearer tokens; empty = no auth
    tls_cert: Path | None = None
    tls_key: Path | None = None
    grace_s: float = 10.0             # shutdown: how long in-flight work may take to finish
    drain_delay_s: float = 0.0        # shutdown: keep serving this long after health went NOT_SERVING
    golden_check: bool = True
    # Readiness (health "" SERVING, KServe ServerReady) waits for these models to be READY; empty = every bundle
    # directory present at the initial scan (and still present).
    require_models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be in 0..65535, got {self.metrics_port}")
        b = self.batch
        delay_ok = math.isfinite(b.max_queue_delay_ms) and b.max_queue_delay_ms >= 0
        if b.max_batch < 1 or b.max_queue < 1 or not delay_ok:
            raise ValueError("max batch and max queue must be >= 1 and the queue delay a finite number >= 0")
        if b.max_queue < b.max_batch:
            raise ValueError(f"max queue ({b.max_queue}) must be at least max batch ({b.max_batch})")
        if self.max_message_mb < 1:
            raise ValueError("max message size must be at least 1 MB")
        if self.reload_interval_s < 0 or self.grace_s < 0 or self.threads < 0 or self.drain_delay_s < 0:
            raise ValueError("reload interval, grace period, drain delay and threads must not be negative")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key")
        if self.limits.max_seeds < 1 or self.limits.max_output_size < 1:
            raise ValueError("limits must be positive")
        if any(not n or n != n.strip() for n in self.require_models):
            raise ValueError(f"required model names must be non-empty without spaces around, got {self.require_models}")

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def exposed(self) -> bool:
        """True when the server listens on a non-loopback address."""
        return not is_loopback(self.host)

    def with_(self, **kw) -> "ServerConfig":
        return replace(self, **kw)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_tokens(path: str | Path) -> tuple[str, ...]:
    """Bearer tokens from a file: one per line, blank lines and # comments ignored."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"auth token file not found: {p}")
    tokens = tuple(t for line in p.read_text().splitlines() if (t := line.strip()) and not t.startswith("#"))
    if not tokens:
        raise ValueError(f"auth token file {p} holds no tokens")
    for t in tokens:
        if len(t) < 16 or any(c.isspace() for c in t):
            raise ValueError(f"auth token file {p}: tokens must be at least 16 characters without spaces")
    return tokens
