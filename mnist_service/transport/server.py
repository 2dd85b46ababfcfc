"""The server: grpclib's HTTP/2 connections, our call handler on each, the drain.

grpclib provides the HTTP/2 layer (`grpclib.protocol.H2Protocol` over h2) and nothing above
it: each connection's streams go to a `Handler` of ours, which starts every call in the one
call runner (`transport.runner`), or refuses it. The `Server` listens, makes a connection's
protocol and keeps its connections for the drain (`transport.drain`): `stop_accepting` closes
the listening socket, `goaway` sends the two-step GOAWAY on every connection (after which
late streams are refused), `stop_stream_reads` ends streaming calls' requests, `calls` are
the calls still running, and `close_connections` ends what is left.

Each connection's transport is wrapped (`transport.coalescing`) so that writes are buffered
and flushed once, at the end of the loop turn in which they were made: grpclib writes a
call's headers, data and trailers with a `transport.write` each, three `send` syscalls a
call, ~110 us each under load; here all the calls answered in one turn leave in one `send`.
Ordering is kept (one buffer per connection), and flow control is untouched (the real
transport still calls `pause_writing`/`resume_writing` on grpclib's protocol). h2's
per-frame trace formatting is made lazy, and each connection remembers 1,024 closed streams
rather than h2's 65,536 (`CLOSED_STREAMS_KEPT`); the private names behind both, and the
drain's PING ack, are in `mnist_service._compat`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
import weakref
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, cast

from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.encoding.base import GRPC_CONTENT_TYPE, CodecBase
from grpclib.encoding.proto import ProtoCodec
from grpclib.metadata import decode_timeout
from grpclib.protocol import AbstractHandler, H2Protocol
from grpclib.protocol import Stream as H2Stream
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import PingAckReceived
from hyperframe.frame import SettingsFrame

from .. import _compat
from ..calls import REQUEST_ID_HEADER, Call, CallObserver, ignore, observe, request_id
from .coalescing import CoalescingTransport
from .drain import DRAIN_PING, MAX_STREAM_ID, StreamReads, goaway_frame, ping_frame
from .header_blocks import cache_header_blocks
from .runner import Method, methods, run_call

log = logging.getLogger(__name__)

__all__ = ["CLOSED_STREAMS_KEPT", "CoalescingProtocol", "Handler", "Server"]

CLOSED_STREAMS_KEPT = 1024
"""Closed streams each connection's h2 remembers (h2's own default is 65,536).

h2 keeps the id and the manner of closing of every stream it has closed, dropping the oldest
past the limit: some 120 bytes each, 7.7 MB once a connection has carried 65,536 calls, so a
worker's memory rose for as long as its long-lived connections had made fewer calls than
that (issue 21), and 256 connections could hold 2 GB. What h2 needs it for (h2 4.4.1,
`H2Connection._receive_frame`): a frame for a stream that is no longer open. DATA is answered
with RST_STREAM and its flow-control credit returned, and WINDOW_UPDATE, RST_STREAM and
PRIORITY are dropped, whether the stream is remembered or not. Only a HEADERS frame on a
closed stream reads the memory: on a stream that we reset it gets a RST_STREAM, otherwise (a
stream that ended, or one forgotten) it is a connection error. A gRPC client sends HEADERS
only to open a stream, never on one it knows, so for gRPC the memory decides nothing; for
other HTTP/2 clients (request trailers after our reset) the late HEADERS was in flight for
about one round trip, while the client had at most 100 streams open (the
MAX_CONCURRENT_STREAMS that h2 announces). 1,024 entries keep ten times that, at about
0.17 MB a connection (45 MB for `--max-connections` 256)."""

_TOO_MANY_CONNECTIONS = bytes(SettingsFrame(0).serialize()) + goaway_frame(
    0, ErrorCodes.ENHANCE_YOUR_CALM, b"too many connections to this worker; retry"
)
"""A server preface (an empty SETTINGS frame) and a GOAWAY: what a turned-away client reads."""

_LINGER_S = 1.0
"""How long a client has, once our side of the connection ended, to read what we sent and
close; then the connection is aborted."""

_CLOSE_WAIT_S = 1.0
"""How long cancelled calls have to end before their connection closes anyway."""

_H2_CONFIG = H2Configuration(
    client_side=False,
    header_encoding="ascii",
    validate_inbound_headers=False,
    validate_outbound_headers=False,
    normalize_inbound_headers=False,
    normalize_outbound_headers=False,
)
"""h2's settings for a gRPC server connection (grpclib's `Server` uses these)."""

RefusedCallback = Callable[[str, tuple[str, int] | None], None]
"""Told of each stream refused after the final GOAWAY: its method and the peer's address."""


def _nothing() -> None:
    pass


class Handler(AbstractHandler):
    """One connection's calls: each stream grpclib accepts starts in the call runner, or is
    refused (REFUSED_STREAM, after this connection's final GOAWAY), or is answered at once
    as grpclib answers a request that is not a gRPC call of ours."""

    last_stream_id = MAX_STREAM_ID
    """Streams above this id are refused (lowered by the final GOAWAY of a drain)."""
    highest_stream_id = 0
    refused = 0
    closing = False

    def __init__(
        self,
        methods: dict[str, Method],
        codec: CodecBase,
        *,
        observer: CallObserver = ignore,
        on_refused: RefusedCallback | None = None,
        stream_reads: StreamReads | None = None,
    ) -> None:
        self._methods = methods
        self._codec = codec
        self._observer = observer
        self._on_refused = on_refused
        self._stream_reads = stream_reads
        self._tasks: dict[H2Stream, asyncio.Task[None]] = {}
        self._cancelled: set[asyncio.Task[None]] = set()
        self.flush_if_last: Callable[[], None] = _nothing
        """The connection's transport's `flush_if_last` (the protocol sets it)."""
        self._peer: tuple[tuple[str, int] | None] | None = None
        """The client's address, once looked up (one per connection)."""

    def accept(self, stream: H2Stream, headers: Any, release_stream: Callable[[], None]) -> None:
        """Start the call whose headers just arrived (or refuse it)."""
        stream_id = stream.id
        assert stream_id is not None
        if stream_id > self.last_stream_id:
            self._refuse(stream, headers, release_stream)
            return
        self.highest_stream_id = stream_id  # h2 makes sure ids only grow
        # The request headers, for `codec.read_message` to find a compressed message's
        # grpc-encoding (a server-side stream's `headers` is otherwise unused).
        stream.headers = headers
        fields = dict(headers)
        path = fields.get(":path", "")
        method = self._methods.get(path)
        refusal = self._not_a_call(fields, method)
        loop = asyncio.get_running_loop()
        if refusal is not None or method is None:
            refusal = refusal or (200, Status.UNIMPLEMENTED, "Method not found")
            self._start(stream, loop.create_task(_abort(stream, release_stream, *refusal)))
            return
        if self._peer is None:
            self._peer = (stream.connection.get_peer().addr(),)
        call = Call(
            path, None, peer=self._peer[0], request_id=request_id(fields.get(REQUEST_ID_HEADER))
        )
        release = _Release(release_stream)
        timeout = fields.get("grpc-timeout")
        if timeout is not None:
            # The deadline runs from now, when the call arrived, not from when its task
            # starts: under load a call can wait its whole deadline away before that.
            try:
                call.expires_at = time.monotonic() + decode_timeout(timeout)
            except ValueError:  # grpclib would answer UNKNOWN
                call.end(Status.INVALID_ARGUMENT, "the grpc-timeout header is malformed")
        task = loop.create_task(
            run_call(
                call,
                method,
                stream,
                headers,
                self._codec,
                release,
                self._observer,
                self._stream_reads,
                self.flush_if_last,
            )
        )
        self._start(stream, task, partial(_never_started, release, call, self._observer))

    def _start(
        self,
        stream: H2Stream,
        task: asyncio.Task[None],
        then: Callable[[asyncio.Task[None]], None] | None = None,
    ) -> None:
        self._tasks[stream] = task
        task.add_done_callback(partial(self._forget, stream, then))

    def _forget(
        self,
        stream: H2Stream,
        then: Callable[[asyncio.Task[None]], None] | None,
        task: asyncio.Task[None],
    ) -> None:
        if self._tasks.get(stream) is task:
            del self._tasks[stream]
        self._cancelled.discard(task)
        if then is not None:
            then(task)

    def _not_a_call(
        self, fields: dict[str, str], method: Method | None
    ) -> tuple[int, Status | None, str | None] | None:
        """Why a request is not a gRPC call of ours, as grpclib answers it: (HTTP status,
        grpc-status, grpc-message); None for a call."""
        if fields.get(":method") != "POST":
            return 405, None, None
        content_type = fields.get("content-type")
        if content_type is None:
            return 415, Status.UNKNOWN, "Missing content-type header"
        base, _, subtype = content_type.partition("+")
        if base != GRPC_CONTENT_TYPE or (subtype or "proto") != self._codec.__content_subtype__:
            return 415, Status.UNKNOWN, "Unacceptable content-type header"
        if fields.get("te") != "trailers":
            return 400, Status.UNKNOWN, 'Required "te: trailers" header is missing'
        if method is None:
            return 200, Status.UNIMPLEMENTED, "Method not found"
        return None

    def cancel(self, stream: H2Stream) -> None:
        """The client reset the stream: its call is cancelled."""
        task = self._tasks.pop(stream, None)
        if task is not None:
            task.cancel()
            self._cancelled.add(task)

    def close(self) -> None:
        """Cancel every call of this connection."""
        for task in self._tasks.values():
            task.cancel()
        self._cancelled.update(self._tasks.values())
        self.closing = True

    async def wait_closed(self) -> None:
        """Wait until the cancelled calls have ended."""
        if self._cancelled:
            await asyncio.wait(self._cancelled)

    def running(self) -> set[asyncio.Task[None]]:
        """This connection's calls that have not finished."""
        return {task for task in self._tasks.values() if not task.done()}

    def _refuse(self, stream: H2Stream, headers: Any, release_stream: Callable[[], None]) -> None:
        self.refused += 1
        stream.reset_nowait(ErrorCodes.REFUSED_STREAM)
        release_stream()
        if self._on_refused is not None:
            self._on_refused(dict(headers).get(":path", ""), stream.connection.get_peer().addr())


async def _abort(
    stream: H2Stream,
    release_stream: Callable[[], None],
    http_status: int,
    grpc_status: Status | None,
    message: str | None,
) -> None:
    """Answer a request that is not a gRPC call of ours, as grpclib does."""
    try:
        headers = [(":status", str(http_status))]
        if grpc_status is not None:
            headers.append(("grpc-status", str(grpc_status.value)))
        if message is not None:
            headers.append(("grpc-message", message))
        await stream.send_headers(headers, end_stream=True)
        if stream.closable:
            stream.reset_nowait()
    except Exception:
        log.debug("could not answer a request that is no call", exc_info=True)
    finally:
        release_stream()


class _Release:
    """A stream's `release_stream`, callable once.

    A task cancelled before its first step (the client reset the stream at once) never runs
    its coroutine, so the `finally` that releases the stream never runs either, and the
    connection would keep the stream (and its buffers, ~10 KB) for as long as it lives: one
    per client cancel that lands before the handler starts, about 30 a second (+18 MB a
    minute) under the soak's mix. `_never_started` releases it from the task's done callback
    instead.
    """

    __slots__ = ("_release", "done")

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release
        self.done = False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self._release()


def _never_started(
    release: _Release, call: Call, observer: CallObserver, task: asyncio.Task[None]
) -> None:
    """A call's task has ended: if it never ran (cancelled before its first step), release
    its stream and record the call as what it was, a client's cancel."""
    if release.done:
        return
    release()
    call.end(Status.CANCELLED)
    observe(observer, call)


class CoalescingProtocol(asyncio.Protocol):
    """grpclib's `H2Protocol`, given a `CoalescingTransport` instead of the socket's own;
    registered in `connections` while connected."""

    transport: CoalescingTransport | None = None
    _linger: asyncio.TimerHandle | None = None
    refused = False
    """Turned away on arrival: the worker already had `max_connections`."""
    ended = False
    """Our side is done (turned away, or closed by the drain): what the client sends is read
    and dropped until it closes too."""

    def __init__(
        self,
        inner: H2Protocol,
        connections: set[CoalescingProtocol] | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.inner = inner
        self._connections = connections if connections is not None else set()
        self._max_connections = max_connections
        self.lost = asyncio.Event()

    @property
    def handler(self) -> Handler:
        """The connection's call handler."""
        return cast(Handler, self.inner.handler)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Wrap the transport, then let grpclib set up HTTP/2; or, past `max_connections`,
        say GOAWAY (ENHANCE_YOUR_CALM) and close: the client retries, later or elsewhere."""
        if self._max_connections is not None and len(self._connections) >= self._max_connections:
            self.refused = True
            log.debug("connection refused: %d open already", len(self._connections))
            stream_transport = cast(asyncio.Transport, transport)
            stream_transport.write(_TOO_MANY_CONNECTIONS)
            self._end(stream_transport)
            self.handler.close()  # never used: the server may forget it
            return
        # A stream transport (uvloop's do not subclass asyncio.Transport, hence the cast).
        self.transport = CoalescingTransport(
            cast(asyncio.Transport, transport), asyncio.get_running_loop()
        )
        self.inner.connection_made(self.transport)  # type: ignore[arg-type]
        connection = _compat.h2_connection(self.inner)
        _compat.limit_closed_streams(connection, CLOSED_STREAMS_KEPT)
        cache_header_blocks(connection)
        self.handler.flush_if_last = self.transport.flush_if_last
        self._connections.add(self)

    def data_received(self, data: bytes) -> None:
        """Feed HTTP/2 frames to grpclib (or drop them once our side has ended)."""
        if not self.ended:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        """The peer closed its side (grpclib has no use for half-closed connections)."""
        return None if self.ended else self.inner.eof_received()  # None: close ours too

    def pause_writing(self) -> None:
        """The socket's buffer is full: grpclib stops writing."""
        if not self.refused:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        """The socket's buffer drained: grpclib may write again."""
        if not self.refused:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: grpclib ends its streams."""
        self.lost.set()
        if self._linger is not None:
            self._linger.cancel()
        if self.refused:
            return
        self._connections.discard(self)
        self.inner.connection_lost(exc)

    async def goaway(self, ping_timeout: float) -> None:
        """The two-step GOAWAY: 2^31-1 and a PING; on its ack (or after `ping_timeout`) the
        real last stream id, above which the handler refuses streams."""
        if self.transport is None or self.lost.is_set():
            return
        acked = asyncio.get_running_loop().create_future()

        def on_drain_ping_ack(event: PingAckReceived) -> None:
            if event.ping_data == DRAIN_PING and not acked.done():
                acked.set_result(None)

        _compat.on_ping_ack(self.inner, on_drain_ping_ack)
        self.transport.write(goaway_frame(MAX_STREAM_ID) + ping_frame())
        lost = asyncio.ensure_future(self.lost.wait())
        try:
            await asyncio.wait(
                {acked, lost}, timeout=ping_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            lost.cancel()
            acked.cancel()
        if self.lost.is_set():
            return
        handler = self.handler
        handler.last_stream_id = handler.highest_stream_id
        self.transport.write(goaway_frame(handler.last_stream_id))

    async def close(self) -> None:
        """Cancel what still runs here, then end the connection (`_end`) and wait until it
        is gone."""
        self.handler.close()
        try:
            await asyncio.wait_for(self.handler.wait_closed(), _CLOSE_WAIT_S)
        except TimeoutError:
            log.warning("calls did not end when cancelled")
        if self.transport is None or self.lost.is_set():
            return
        self.transport.end()
        self._end(self.transport.raw)
        await self.lost.wait()  # the client closes, or the linger aborts the connection

    def _end(self, transport: asyncio.Transport) -> None:
        """A lingering close: our side ends (a FIN once all is sent; over TLS, the TLS close),
        what the client still sends is read and dropped until it closes too, and after
        `_LINGER_S` the connection is aborted.

        Closing the socket with the client's frames unread would make the kernel answer its
        next write with a reset, and a client whose write fails may drop what it has not yet
        read: grpcio, on EPIPE, lost the answers and trailers of streams that were drained.
        """
        self.ended = True
        if not transport.can_write_eof():
            transport.close()
        else:
            try:
                transport.write_eof()
            except OSError:  # the client is gone already (ENOTCONN): nothing to linger for
                transport.abort()
                return
        self._linger = asyncio.get_running_loop().call_later(_LINGER_S, transport.abort)


class Server:
    """A gRPC server over grpclib's HTTP/2 connections: every call of `services` (objects
    with grpclib's `__mapping__`: betterproto2 services, grpclib's health and reflection)
    runs in the one call runner; each call's `Call` record is handed to `observer` when the
    call ends."""

    def __init__(
        self,
        services: Iterable[Any],
        *,
        codec: CodecBase | None = None,
        config: Configuration | None = None,
        observer: CallObserver = ignore,
        on_refused: RefusedCallback | None = None,
        max_connections: int | None = None,
    ) -> None:
        _compat.defer_frame_reprs()
        self._methods = methods(services)
        self._codec = codec or ProtoCodec()
        self._config = _compat.server_configuration(config)
        self._observer = observer
        self._on_refused = on_refused
        self._max_connections = max_connections
        self._connections: set[CoalescingProtocol] = set()
        self._handlers: weakref.WeakSet[Handler] = weakref.WeakSet()
        self._stream_reads = StreamReads()
        self._server: asyncio.Server | None = None

    @property
    def methods(self) -> dict[str, Method]:
        """What the server serves, by path."""
        return self._methods

    def protocol(self) -> CoalescingProtocol:
        """The protocol of a new connection (the listening socket's protocol factory)."""
        handler = Handler(
            self._methods,
            self._codec,
            observer=self._observer,
            on_refused=self._on_refused,
            stream_reads=self._stream_reads,
        )
        self._handlers.add(handler)
        return CoalescingProtocol(
            H2Protocol(handler, self._config, _H2_CONFIG),
            self._connections,
            self._max_connections,
        )

    async def start(
        self,
        host: str | None = None,
        port: int | None = None,
        *,
        sock: socket.socket | None = None,
        ssl: ssl.SSLContext | None = None,
    ) -> None:
        """Listen on `sock` (or bind `host`:`port`)."""
        if self._server is not None:
            raise RuntimeError("the server is started already")
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(self.protocol, sock=sock, ssl=ssl)
        else:
            self._server = await loop.create_server(self.protocol, host, port or 0, ssl=ssl)

    @property
    def port(self) -> int:
        """The port the server listens on (once started)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the server is not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def connections(self) -> int:
        """How many connections are open."""
        return len(self._connections)

    def stop_accepting(self) -> None:
        """Close the listening socket; open connections are untouched."""
        if self._server is not None:
            self._server.close()

    def stop_stream_reads(self) -> None:
        """Streaming calls see the end of their requests now; each answers what it has read
        and ends OK with `mnist-draining: true` in its trailers."""
        self._stream_reads.stop()

    async def goaway(self, ping_timeout: float) -> None:
        """The two-step GOAWAY on every connection, at once."""
        await asyncio.gather(*(c.goaway(ping_timeout) for c in list(self._connections)))

    def calls(self) -> set[asyncio.Task[None]]:
        """The calls running on every connection."""
        return {task for c in self._connections for task in c.handler.running()}

    def held(self) -> dict[str, int]:
        """What the server holds now, by registry: each should come back to its idle count."""
        return {
            "connections": len(self._connections),
            "calls": len(self.calls()),
            "stream_reads": self._stream_reads.waiting,
            "handlers": len(self._handlers),  # one a connection, until collected
        }

    @property
    def refused_streams(self) -> int:
        """Streams refused on open connections after their final GOAWAY."""
        return sum(c.handler.refused for c in self._connections)

    async def close_connections(self) -> None:
        """Cancel whatever still runs and close every connection; one that fails to close is
        logged, and does not stop the others or the drain."""
        closing = (c.close() for c in list(self._connections))
        results = await asyncio.gather(*closing, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("closing a connection failed", exc_info=result)

    async def close(self) -> None:
        """Stop listening and close every connection (the drain's last step, at once)."""
        self.stop_accepting()
        await self.close_connections()
        if self._server is not None:
            await self._server.wait_closed()
