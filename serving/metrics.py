"""Prometheus metrics of one server instance, in a private registry, served on their own HTTP port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    """All server metrics. One instance per server (tests start several servers in one process)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("stylecast_requests", "RPCs received", ["method", "model"], registry=r)
        self.errors = Counter("stylecast_errors", "RPCs that ended with a non-OK status",
                              ["method", "model", "code"], registry=r)
        self.latency = Histogram("stylecast_request_latency_seconds", "RPC latency (whole stream for streams)",
                                 ["method", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("stylecast_queue_time_seconds", "Time a row waited in the batcher queue",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("stylecast_batch_size", "Rows per executed batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_latency = Histogram("stylecast_batch_latency_seconds", "Model execution time of one batch",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("stylecast_queue_depth", "Rows waiting in the batcher queue", ["model"], registry=r)
        self.rows_executed = Counter("stylecast_rows_executed", "Rows run through the model", ["model"], registry=r)
        self.rows_dropped = Counter("stylecast_rows_dropped",
                                    "Rows dropped before reaching the model (cancelled or expired)",
                                    ["model", "reason"], registry=r)
        self.in_flight = Gauge("stylecast_in_flight_requests", "RPCs being handled", ["method"], registry=r)
        self.model_ready = Gauge("stylecast_model_ready", "1 when the model is READY", ["model"], registry=r)
        self.model_loads = Counter("stylecast_model_loads", "Bundle load attempts", ["result"], registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsHTTPServer:
    """prometheus_client's WSGI exporter on a daemon thread; port 0 binds any free port."""

    def __init__(self, metrics: Metrics, host: str, port: int):
        from prometheus_client import start_http_server
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self.port = int(self._httpd.server_address[1])

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def parse_exposition(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value} (for tests and the benchmark)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, val = line.rpartition(" ")
        try:
            out[key] = float(val)
        except ValueError:
            continue
    return out
