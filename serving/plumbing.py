"""One request plumbing for every front end (StyleService, KServe v2, later HTTP/REST): request ids, metrics and the
access log, errors -> status codes, deadlines and cancellation.

`Plumbing.begin` / `finish` are protocol-neutral (a request is counted, timed and logged once, with its request id
and status code name); `Plumbing.unary` wraps a gRPC handler with them and turns the outcome into the gRPC status.
Error codes are the names of gRPC status codes (serving.errors), which other protocols map to their own statuses.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import grpc

from .errors import ServingError
from .logs import log
from .metrics import Metrics

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
REQUEST_ID_KEY = "x-request-id"
# The client's own deadline fires a transit time before the server's copy of it: a cancellation within this many
# seconds of the deadline is the deadline.
DEADLINE_SLACK_S = 0.05


def request_id(metadata: Any = None) -> str:
    """The client's `x-request-id` (metadata pairs) when it is a sane id, else a fresh one."""
    rid = dict(metadata or ()).get(REQUEST_ID_KEY, "")
    return rid if isinstance(rid, str) and REQUEST_ID_RE.match(rid) else uuid.uuid4().hex[:16]


def deadline_from(remaining: float | None) -> float | None:
    """Seconds left on a request (None = no deadline) -> the absolute time.monotonic() deadline the batchers use."""
    return None if remaining is None else time.monotonic() + max(0.0, remaining)


def cancelled_code(remaining: float | None) -> str:
    """The status of a cancelled request: DEADLINE_EXCEEDED when its deadline (nearly) passed, else CANCELLED."""
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= DEADLINE_SLACK_S else "CANCELLED"


@dataclass
class Call:
    """One request in flight: what the access log says of it. Handlers add fields to `extra`."""

    method: str
    model: str
    label: str
    request_id: str
    peer: str = ""
    deadline: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    code: str = "OK"
    detail: str = ""
    started: float = field(default_factory=time.perf_counter)
    in_flight: bool = True

    def fail(self, exc: BaseException) -> None:
        """Record an exception as the call's status: a ServingError keeps its code; anything else is INTERNAL (the
        client sees only the request id, the log the details)."""
        if isinstance(exc, ServingError):
            self.code, self.detail = exc.code, exc.message
        else:
            self.code, self.detail = "INTERNAL", f"internal error (request id {self.request_id})"
            self.extra["error"] = repr(exc)


class Plumbing:
    """Metrics and access log of one front end.

    Args:
        label: model name as the client wrote it -> the metrics label (only known names become label values, so a
            client cannot grow the metric set).
    """

    def __init__(self, metrics: Metrics, logger: logging.Logger, label: Callable[[str], str]):
        self.metrics = metrics
        self.logger = logger
        self.label = label

    def begin(self, method: str, model: str, rid: str, peer: str = "", deadline: float | None = None,
              in_flight: bool = True) -> Call:
        """Count a request and start its clock (in_flight=False: counted in the in-flight gauge by its caller)."""
        call = Call(method, model, self.label(model) if model else "", rid, peer, deadline, in_flight=in_flight)
        self.metrics.requests.labels(method, call.label).inc()
        if in_flight:
            self.metrics.in_flight.labels(method).inc()
        return call

    def finish(self, call: Call) -> None:
        """Observe the latency, count an error, write the access-log line."""
        elapsed = time.perf_counter() - call.started
        m = self.metrics
        if call.in_flight:
            m.in_flight.labels(call.method).dec()
        m.latency.labels(call.method, call.label).observe(elapsed)
        if call.code != "OK":
            m.errors.labels(call.method, call.label, call.code).inc()
        log(self.logger, logging.INFO if call.code in ("OK", "CANCELLED") else logging.WARNING, "rpc",
            method=call.method, model=call.model, request_id=call.request_id, code=call.code,
            latency_ms=round(elapsed * 1000, 3), peer=call.peer, **({"detail": call.detail} if call.detail else {}),
            **call.extra)

    async def guarded(self, call: Call, work: Awaitable[Any], time_remaining: Callable[[], float | None]
                      ) -> tuple[bool, Any]:
        """Await a request's work: (True, its result), or (False, None) with the call's status taken from the error
        (an internal one logged with its traceback). Cancellation propagates, recorded as CANCELLED or, near the
        deadline, DEADLINE_EXCEEDED."""
        try:
            return True, await work
        except asyncio.CancelledError:
            call.code = cancelled_code(time_remaining())
            raise
        except Exception as exc:
            call.fail(exc)
            if call.code == "INTERNAL":
                self.logger.exception("unhandled error", extra={"request_id": call.request_id, "method": call.method})
            return False, None

    async def unary(self, method: str, model: str, context: grpc.aio.ServicerContext,
                    fn: Callable[[Call], Awaitable[Any]]) -> Any:
        """Run a gRPC handler `fn(call)`: its result, or the gRPC status of its error (with the request id in the
        trailing metadata either way)."""
        rid = request_id(context.invocation_metadata())
        call = self.begin(method, model, rid, context.peer(), deadline_from(context.time_remaining()))
        trailing = ((REQUEST_ID_KEY, rid),)
        try:
            ok, result = await self.guarded(call, fn(call), context.time_remaining)
        finally:
            self.finish(call)
        if ok:
            context.set_trailing_metadata(trailing)
            return result
        await context.abort(grpc.StatusCode[call.code], call.detail, trailing_metadata=trailing)
