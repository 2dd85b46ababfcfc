"""The HTTP listener: aiohttp's HTTP/1.1 connections in the gRPC server's event loop.

`HttpServer` builds the aiohttp application (the one call runner as its middleware, the JSON
API, the Open Inference Protocol's REST API, the page), listens on the socket it is given
(the same socket strategy as gRPC: one per process, or SO_REUSEPORT siblings per worker), and
drains with the gRPC server:

1. `stop_accepting` closes the listening socket and idle keep-alive connections; a connection
   with a request in its handler ends after its answer, which says `Connection: close`;
2. `calls` are the requests still running, which the server's drain waits for;
3. `close` cancels what is left and ends every connection.

Each connection is wrapped (`_Connection`) to bound what a client can hold: past
`max_connections` a new connection gets a 503 and is closed, and a request's headers must
arrive within `max_message_seconds` of its first byte (a slow-loris client gets a 408 and
loses the connection). aiohttp bounds each header line and field (8 KiB) and their count.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Final, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ..calls import CallObserver
from ..config import Limits
from . import documents
from .api import Models, PredictApi
from .oip import OipApi
from .page import page_routes
from .runner import RUNNER, CallRunner, Cors

log = logging.getLogger(__name__)

MAX_LINE_BYTES: Final = 8190
"""Longest request line or header line aiohttp takes (its default): longer is a 400."""
MAX_HEADERS: Final = 64
"""Most header fields in a request."""
KEEPALIVE_S: Final = 75.0
"""How long an idle keep-alive connection stays open (nginx's default)."""
SHUTDOWN_S: Final = 1.0
"""How long requests still running at the end of the drain get once cancelled."""


def _refusal(status: int, reason: str, code: str, message: str) -> bytes:
    body = documents.dumps({"error": {"code": code, "message": message}})
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


_TOO_MANY_CONNECTIONS: Final = _refusal(
    503,
    "Service Unavailable",
    "UNAVAILABLE",
    "too many connections to this worker; retry, later or on another connection",
)


class _ConnectionLog(logging.LoggerAdapter):  # type: ignore[type-arg]  # generic in 3.11's stubs only
    """aiohttp's per-connection log, where it reports requests it could not parse: a client's
    doing, so at debug level, and without the exception, whose text quotes the client's bytes
    (the request log never carries a payload)."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        kwargs.pop("exc_info", None)
        kwargs.pop("stack_info", None)
        super().log(min(level, logging.DEBUG), msg, *args, **kwargs)


class HttpServer:
    """The HTTP API over the engine's pipelines, in the running event loop."""

    def __init__(
        self,
        models: Models,
        *,
        limits: Limits,
        executor: Executor,
        observer: CallObserver,
        ready: Callable[[], bool],
        cors_allow_origins: tuple[str, ...] = (),
        web_ui: bool = True,
    ) -> None:
        self._limits = limits
        self.call_runner = CallRunner(
            observer,
            cors=Cors(cors_allow_origins),
            max_body_bytes=limits.max_message_bytes,
            max_body_seconds=limits.max_message_seconds,
            on_start=self._request_started,
            on_end=self._request_ended,
        )
        app = web.Application(
            middlewares=[self.call_runner],
            client_max_size=limits.max_message_bytes,
            handler_args={
                "max_line_size": MAX_LINE_BYTES,
                "max_field_size": MAX_LINE_BYTES,
                "max_headers": MAX_HEADERS,
                "keepalive_timeout": KEEPALIVE_S,
            },
        )
        app[RUNNER] = self.call_runner
        app.add_routes(PredictApi(models, limits=limits, executor=executor).routes())
        app.add_routes(
            OipApi(models, max_batch_images=limits.max_batch_images, ready=ready).routes()
        )
        if web_ui:
            app.add_routes(page_routes())
        self._app = app
        self._runner: web.AppRunner | None = None
        self._web: web.Server | None = None
        self._server: asyncio.Server | None = None
        self._connections: dict[Any, _Connection] = {}
        self.port: int | None = None

    async def start(self, sock: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
        """Listen on `sock` (bound, listening or not)."""
        runner = web.AppRunner(
            self._app,
            handle_signals=False,
            # A client that leaves cancels its request's handler, as a gRPC client's reset
            # cancels its call: its image leaves the batch queue, and the request log says
            # CANCELLED (aiohttp's default since 3.9 lets the handler run on for nobody).
            handler_cancellation=True,
            access_log=None,
            logger=_ConnectionLog(logging.getLogger(f"{__name__}.connections"), {}),
        )
        await runner.setup()
        self._runner = runner
        self._web = runner.server
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, sock=sock, ssl=ssl_context, backlog=1024
        )
        self.port = sock.getsockname()[1]

    def _protocol(self) -> _Connection:
        assert self._web is not None
        return _Connection(self._web(), self, self._limits.max_message_seconds)

    @property
    def connections(self) -> int:
        """How many connections are open."""
        return len(self._connections)

    def calls(self) -> set[asyncio.Future[None]]:
        """The requests still running (each future is done once answered)."""
        return self.call_runner.calls()

    def stop_accepting(self) -> None:
        """Close the listening socket; every connection ends after its current request."""
        self.call_runner.draining = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections.values()):
            connection.close_if_idle()

    async def close(self) -> None:
        """Cancel what still runs and close every connection."""
        self.stop_accepting()
        if self._web is not None:
            await self._web.shutdown(SHUTDOWN_S)
        for connection in list(self._connections.values()):
            connection.abort()
        if self._runner is not None:
            await self._runner.cleanup()

    def _request_started(self, transport: Any) -> None:
        connection = self._connections.get(transport)
        if connection is not None:
            connection.set_busy(True)

    def _request_ended(self, transport: Any) -> None:
        connection = self._connections.get(transport)
        if connection is not None:
            connection.set_busy(False)

    def register(self, connection: _Connection, transport: Any) -> bool:
        """Count a new connection in; False when the worker has `max_connections` already."""
        if len(self._connections) >= self._limits.max_connections:
            return False
        self._connections[transport] = connection
        return True

    def forget(self, transport: Any) -> None:
        """A connection is gone."""
        self._connections.pop(transport, None)


class _Connection(asyncio.Protocol):
    """aiohttp's `RequestHandler` for one connection, with a connection limit and a bound on
    how long a request's headers may take (see the module's docstring)."""

    busy = False
    """A request of this connection is in its handler (its headers are in)."""

    def __init__(self, inner: RequestHandler, server: HttpServer, header_s: float) -> None:
        self._inner = inner
        self._server = server
        self._header_s = header_s
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)
        if not self._server.register(self, stream):
            self._refused = True
            stream.write(_TOO_MANY_CONNECTIONS)
            stream.close()
            return
        self._transport = stream
        self._inner.connection_made(stream)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if not self.busy and self._timer is None:
            # The first bytes of a request: its headers must all come within the time.
            self._timer = asyncio.get_running_loop().call_later(self._header_s, self._too_slow)
        self._inner.data_received(data)

    def set_busy(self, busy: bool) -> None:
        """A request's handler starts (its headers are all in) or ends."""
        self.busy = busy
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        if self.busy or self._transport is None:
            return
        message = (
            f"the request's headers did not arrive within {self._header_s:g} s; "
            "the connection is closed"
        )
        self._transport.write(_refusal(408, "Request Timeout", "RESOURCE_EXHAUSTED", message))
        self._transport.close()

    def eof_received(self) -> bool | None:
        if self._refused:
            return None
        self._inner.eof_received()
        return None

    def pause_writing(self) -> None:
        if not self._refused:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if not self._refused:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._refused:
            return
        self._server.forget(self._transport)
        self._inner.connection_lost(exc)

    def close_if_idle(self) -> None:
        """Close the connection unless a request is in its handler (whose answer will say
        `Connection: close`, and end it): aiohttp's own `close` stops reading a body."""
        if not self.busy:
            self._inner.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
