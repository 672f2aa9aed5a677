"""Errors raised by the protocol-independent parts of the server (repository, batcher, models).

Each carries the name of a gRPC status code; the gRPC services map it with `grpc.StatusCode[err.code]`, so the
same model repository can sit behind other protocols (e.g. KServe v2) without importing grpc here.
"""

from __future__ import annotations


class ServingError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidArgument(ServingError):
    code = "INVALID_ARGUMENT"


class ModelNotFound(ServingError):
    code = "NOT_FOUND"


class ModelNotReady(ServingError):
    code = "FAILED_PRECONDITION"


class QueueFull(ServingError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ServingError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(ServingError):
    """The server or model is shutting down / being unloaded."""

    code = "UNAVAILABLE"


class BundleRefused(ValueError):
    """A bundle cannot be served (files, checksums, graphs, golden outputs, kind); the repository marks it FAILED."""
