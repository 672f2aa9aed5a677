"""Structured logs for the server: one JSON object per line on stderr.

Use `log(logger, level, event, **fields)`; the fields end up as top-level keys of the JSON line, e.g.
{"ts": "...", "level": "info", "logger": "serving.access", "event": "rpc", "method": "Generate", "code": "OK"}.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from typing import Any

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, val in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                doc[key] = val
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(level: str = "info", stream=None) -> None:
    """Send the `serving` loggers to stderr as JSON lines (called by `stylecast serve`, not by tests)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("serving")
    for h in list(logger.handlers):
        logger.removeHandler(h)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def log(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log `event` with structured fields (keys must not clash with LogRecord attributes)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={k if k not in _RESERVED else f"{k}_": v for k, v in fields.items()})
