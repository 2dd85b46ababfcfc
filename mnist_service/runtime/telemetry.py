"""Canonical request log lines: one per call, from the `api.calls.Call` the transport records.

The transport opens a call before its handler runs and hands it here when it ends (no event
listeners, no decorators on handlers); handlers add fields with `api.calls.annotate`. A line
carries method, peer, status, duration and those fields. Client cancels (CANCELLED) and
expired deadlines (DEADLINE_EXCEEDED) are ordinary outcomes, logged like OK; only server faults
are warnings. Streams a draining server refuses before any call starts (REFUSED_STREAM) get
their line from `log_refused_stream`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from grpclib.const import Status

from ..api.calls import Call

log = logging.getLogger("mnist_service.requests")

SERVER_FAULTS = frozenset({Status.INTERNAL, Status.UNKNOWN, Status.DATA_LOSS})


def log_call(call: Call) -> None:
    """Log `call`: at debug, or as a warning when the server failed it."""
    level = logging.WARNING if call.status in SERVER_FAULTS else logging.DEBUG
    if not log.isEnabledFor(level):
        return
    fields: dict[str, Any] = {
        "method": call.method,
        "peer": _peer(call.peer),
        "status": call.status.name,
        "duration_ms": round((time.perf_counter() - call.started) * 1000, 3),
        **call.fields,
    }
    if call.status is not Status.OK and call.message:
        fields["error"] = call.message
    log.log(level, "call %s %s", call.method, call.status.name, extra={"fields": fields})


def log_refused_stream(method: str, peer: tuple[str, int] | None) -> None:
    """The log line of a call refused with REFUSED_STREAM (opened after the final GOAWAY)."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    fields = {
        "method": method,
        "peer": _peer(peer),
        "status": "REFUSED_STREAM",
        "error": "opened after the final GOAWAY of a drain; the client may retry it elsewhere",
    }
    log.debug("call %s REFUSED_STREAM", method, extra={"fields": fields})


def _peer(address: Any) -> str | None:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return None if address is None else str(address)
