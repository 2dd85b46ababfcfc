"""Logging setup for the application (the library itself never configures logging).

Two formats: `pretty` for people (time, level, message, then key=value fields) and `json`
for machines (one object per line). Structured fields travel in `extra={"fields": {...}}`.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


class PrettyFormatter(logging.Formatter):
    """`HH:MM:SS.mmm LEVEL message key=value ...`, readable in a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one record on one line (plus a traceback, if any)."""
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S.%f")[:-3]
        extras = " ".join(f"{key}={value}" for key, value in _fields(record).items())
        line = f"{stamp} {record.levelname:<7} {record.getMessage()}"
        if extras:
            line = f"{line}  {extras}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, pid, message, then the structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one record as a JSON line."""
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """Send logs to stderr in the chosen format: this package's at `level`, others' from INFO.

    Debug logs of the libraries (h2 and hpack frame dumps, Pillow's chunk reader) would drown
    the one-line-per-call request log, so only this package goes below INFO. grpclib's INFO
    lines are per call ("Request was cancelled", "Deadline exceeded": a client's doing, not a
    fault), so below debug only its warnings and errors are shown.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else PrettyFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    numeric = logging.getLevelName(level.upper())
    root.setLevel(max(numeric, logging.INFO))
    logging.getLogger("mnist_service").setLevel(numeric)
    logging.getLogger("grpclib").setLevel(
        logging.INFO if numeric <= logging.DEBUG else logging.WARNING
    )
