"""Structured logs: one JSON object per line on stderr, with the ``extra={...}`` fields of each call."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def __init__(self, static_fields: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.static_fields = static_fields or {}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self.static_fields,
        }
        entry.update({key: value for key, value in record.__dict__.items() if key not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class PlainFormatter(logging.Formatter):
    """One readable line per record for commands run by hand: time, level, logger, message, then the record's
    ``extra={...}`` fields as key=value (without them "redis unavailable, retrying" says neither what nor why)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {key: value for key, value in record.__dict__.items() if key not in _STANDARD}
        if fields:
            line += " (" + ", ".join(f"{key}={value}" for key, value in fields.items()) + ")"
        return line


# Libraries whose INFO records read like failures to an operator: faiss's loader logs "Could not load library with
# AVX512 support ... ModuleNotFoundError" for every instruction set it probes before the one it loads
NOISY_LIBRARY_LOGGERS = ("faiss.loader",)


def quiet_noisy_libraries(level: int | str) -> None:
    """Keep ``NOISY_LIBRARY_LOGGERS`` to warnings unless ``level`` is DEBUG."""
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if numeric != logging.DEBUG:
        for name in NOISY_LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def setup_logging(role: str, level: str = "INFO", **static_fields: Any) -> None:
    """Send every log record to stderr as JSON tagged with the worker role."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter({"role": role, **static_fields}))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_noisy_libraries(level)
