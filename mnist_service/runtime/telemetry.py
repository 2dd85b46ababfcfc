"""Canonical request log lines, from grpclib server events (no decorators on handlers).

`RecvRequest` opens a per-call context (a `ContextVar`, so it follows the handler's task);
handlers add fields with `annotate_request`; `SendTrailingMetadata` writes one line per call
with method, peer, status, duration and those fields. Streams a draining server refuses before
any call starts (REFUSED_STREAM) get their line from `log_refused_stream`.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from typing import Any

from grpclib.const import Status
from grpclib.events import RecvRequest, SendTrailingMetadata, listen
from grpclib.server import Server

log = logging.getLogger("mnist_service.requests")

_call: ContextVar[dict[str, Any] | None] = ContextVar("mnist_service_call", default=None)
_SERVER_FAULTS = frozenset({Status.INTERNAL, Status.UNKNOWN, Status.DATA_LOSS})


def annotate_request(**fields: Any) -> None:
    """Add fields to the current call's log line (a no-op outside a call)."""
    call = _call.get()
    if call is not None:
        call.update(fields)


async def _on_recv_request(event: RecvRequest) -> None:
    peer = event.peer.addr()
    _call.set(
        {
            "method": event.method_name,
            "peer": f"{peer[0]}:{peer[1]}" if peer else None,
            "started": time.perf_counter(),
        }
    )


async def _on_send_trailing_metadata(event: SendTrailingMetadata) -> None:
    call = _call.get()
    if call is None:
        return
    fields = dict(call)
    duration_ms = (time.perf_counter() - fields.pop("started")) * 1000
    fields.update(status=event.status.name, duration_ms=round(duration_ms, 3))
    if event.status is not Status.OK and event.status_message:
        fields["error"] = event.status_message
    level = logging.WARNING if event.status in _SERVER_FAULTS else logging.DEBUG
    log.log(level, "call %s %s", fields["method"], event.status.name, extra={"fields": fields})


def log_refused_stream(method: str, peer: tuple[str, int] | None) -> None:
    """The log line of a call refused with REFUSED_STREAM (opened after the final GOAWAY)."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    fields = {
        "method": method,
        "peer": f"{peer[0]}:{peer[1]}" if peer else None,
        "status": "REFUSED_STREAM",
        "error": "opened after the final GOAWAY of a drain; the client may retry it elsewhere",
    }
    log.debug("call %s REFUSED_STREAM", method, extra={"fields": fields})


def install_request_log(server: Server) -> None:
    """Log one line per call handled by `server`, when debug logging is on.

    Below debug the listeners would build and drop a record per call: two event dispatches
    and a dict for nothing. Server faults are logged anyway, with their traceback, by
    `api.status.as_grpc_errors` (INTERNAL) and by grpclib itself (UNKNOWN).
    """
    if not log.isEnabledFor(logging.DEBUG):
        return
    listen(server, RecvRequest, _on_recv_request)
    listen(server, SendTrailingMetadata, _on_send_trailing_metadata)
