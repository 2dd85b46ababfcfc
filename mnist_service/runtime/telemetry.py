"""Canonical request log lines: one per call, from the `calls.Call` the transport records.

The transport opens a call when it arrives and hands it here when it ends (no event
listeners, no decorators on handlers); handlers add fields with `calls.annotate`. Client
cancels (CANCELLED) and expired deadlines (DEADLINE_EXCEEDED) are ordinary outcomes, logged
like OK; only server faults are warnings. Streams a draining server refuses before any call
starts (REFUSED_STREAM) get their line from `log_refused_stream`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from grpclib.const import Status

from ..calls import Call
from .logs import DirectLines, direct_lines

log = logging.getLogger("mnist_service.requests")

SERVER_FAULTS = frozenset({Status.INTERNAL, Status.UNKNOWN, Status.DATA_LOSS})


class RequestLog:
    """The observer of finished calls that writes the request log.

    One line per call at info level (with `access_log`), carrying method, status, latency,
    the model, the size of the model run the image rode in (`batch`), the peer, the request
    id and what the handler annotated. Server faults (INTERNAL, UNKNOWN, DATA_LOSS) are
    warnings, with or without `access_log`.
    """

    def __init__(self, *, access_log: bool = True, model: str | None = None) -> None:
        self.access_log = access_log
        self.model = model
        self._lines: DirectLines | bool | None = False  # False: not looked up yet

    def __call__(self, call: Call) -> None:
        if call.status in SERVER_FAULTS:
            level = logging.WARNING
        elif self.access_log:
            level = logging.INFO
        else:
            return
        if not log.isEnabledFor(level):
            return
        if self._lines is False:
            self._lines = direct_lines(log)  # the app's own handler: the fast way to it
        fields: dict[str, Any] = {
            "method": call.method,
            "status": call.status.name,
            "duration_ms": round((time.perf_counter() - call.started) * 1000, 3),
            "model": self.model,
            **call.fields,
            "peer": _peer(call.peer),
            "request_id": call.request_id,
        }
        if call.status is not Status.OK and call.message:
            fields["error"] = call.message
        lines = self._lines
        if level == logging.INFO and isinstance(lines, DirectLines):
            message = f"call {call.method} {call.status.name}"
            lines.write(time.time(), "info", log.name, message, fields)
        else:
            log.log(level, "call %s %s", call.method, call.status.name, extra={"fields": fields})


def log_refused_stream(method: str, peer: tuple[str, int] | None) -> None:
    """The log line of a call refused with REFUSED_STREAM (opened after the final GOAWAY)."""
    if not log.isEnabledFor(logging.DEBUG):
        return  # a client retries these on its own: detail for debugging, not for the log
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
