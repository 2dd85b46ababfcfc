"""A grpclib `Server` whose connections make one socket write per event-loop turn, whose
unary calls take the lean path of `transport.unary`, whose every call reads its messages
through `codec.read_message` (the size limit checked from the prefix, before the body) and
answers with `grpc-accept-encoding: gzip`, and whose every call is recorded as an
`calls.Call` for the request log.

grpclib writes a call's headers, data and trailers with a `transport.write` each, and every
concurrent call does the same: three `send` syscalls per call, ~110 us each under load. Here
each connection's transport is wrapped (`transport.coalescing`) so that writes are buffered
and flushed once, at the end of the loop turn in which they were made: all the calls answered
in that turn leave in one `send`. Ordering is kept (one buffer per connection), and flow
control is untouched (the real transport still calls `pause_writing`/`resume_writing` on
grpclib's protocol). h2's per-frame trace formatting is made lazy (`transport.h2trace`), and
each connection remembers 1,024 closed streams rather than h2's 65,536 (`transport.h2streams`).

The server keeps its connections, for the drain (`transport.drain`): `stop_accepting` closes
the listening socket, `goaway` sends the two-step GOAWAY on every connection (after which
late streams are refused), `stop_stream_reads` ends streaming calls' requests, `calls` are
the calls still running, and `close_connections` ends what is left.

This relies on grpclib 0.4.9's `Server._protocol_factory` and the private attributes it
uses, `Server._server`, `H2Protocol.processor.processors` (the drain's PING ack is
recognised there) and `H2Protocol.connection._connection` (the h2 connection); pinned in
pyproject.toml, tests/test_transport.py covers them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, cast

import grpclib.server
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.protocol import H2Protocol
from grpclib.protocol import Stream as H2Stream
from h2.errors import ErrorCodes
from h2.events import PingAckReceived
from hyperframe.frame import SettingsFrame

from ..calls import (
    Call,
    CallObserver,
    enter,
    expiry,
    ignore,
    request_id,
)
from .coalescing import CoalescingTransport
from .codec import ACCEPT_ENCODING, SizeLimitedCodec, read_message, refuse_missing_message
from .drain import (
    DRAIN_PING,
    DRAINING_TRAILER,
    MAX_STREAM_ID,
    StreamReads,
    goaway_frame,
    ping_frame,
)
from .h2streams import limit_closed_streams
from .h2trace import defer_frame_reprs
from .unary import Handler, RefusedCallback, UnaryMethod, observe, request_id_header

log = logging.getLogger(__name__)

_TOO_MANY_CONNECTIONS = bytes(SettingsFrame(0).serialize()) + goaway_frame(
    0, ErrorCodes.ENHANCE_YOUR_CALM, b"too many connections to this worker; retry"
)
"""A server preface (an empty SETTINGS frame) and a GOAWAY: what a turned-away client reads."""

_LINGER_S = 1.0
"""How long a client has, once our side of the connection ended, to read what we sent and
close; then the connection is aborted."""

_CLOSE_WAIT_S = 1.0
"""How long cancelled calls have to end before their connection closes anyway."""


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
        limit_closed_streams(self.inner.connection._connection)
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
        processors = self.inner.processor.processors
        on_ping_ack = cast(Callable[[PingAckReceived], None], processors[PingAckReceived])

        def on_drain_ping_ack(event: PingAckReceived) -> None:
            on_ping_ack(event)
            if event.ping_data == DRAIN_PING and not acked.done():
                acked.set_result(None)

        processors[PingAckReceived] = on_drain_ping_ack
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


class Server(grpclib.server.Server):
    """`grpclib.server.Server` with write coalescing on every connection, the lean path of
    `transport.unary` for the `unary` methods given, and a `Call` record for every call,
    handed to `observer` when the call ends."""

    def __init__(
        self,
        handlers: Any,
        *,
        unary: Mapping[str, UnaryMethod] | None = None,
        observer: CallObserver = ignore,
        on_refused: RefusedCallback | None = None,
        max_connections: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handlers, **kwargs)
        defer_frame_reprs()
        self._unary = dict(unary or {})
        self._observer = observer
        self._on_refused = on_refused
        self._max_connections = max_connections
        self._connections: set[CoalescingProtocol] = set()
        self._stream_reads = StreamReads()
        # Every call is recorded; calls on grpclib's own path read their messages through
        # `read_message` too, and streaming calls' reads end when the drain starts.
        checked = isinstance(self._codec, SizeLimitedCodec)
        self._mapping = {
            path: handler._replace(
                func=_observed(
                    path,
                    handler.func,
                    observer,
                    checked=checked,
                    stream_reads=self._stream_reads
                    if handler.cardinality in (Cardinality.STREAM_UNARY, Cardinality.STREAM_STREAM)
                    else None,
                )
            )
            for path, handler in self._mapping.items()
        }

    def _protocol_factory(self) -> CoalescingProtocol:  # type: ignore[override]
        # grpclib's own factory, with our Handler in place of grpclib's.
        self.__gc_step__()
        handler = Handler(
            self._mapping,
            self._codec,
            self._status_details_codec,
            self.__dispatch__,
            unary=self._unary,
            observer=self._observer,
            on_refused=self._on_refused,
        )
        self._handlers.add(handler)
        return CoalescingProtocol(
            H2Protocol(handler, self._config, self._h2_config),
            self._connections,
            self._max_connections,
        )

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
            "handlers": len(self._handlers),  # grpclib's, one a connection, pruned lazily
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


GrpclibHandler = Callable[[grpclib.server.Stream[Any, Any]], Awaitable[None]]


def _observed(
    path: str,
    func: GrpclibHandler,
    observer: CallObserver,
    *,
    checked: bool,
    stream_reads: StreamReads | None,
) -> GrpclibHandler:
    """A handler on grpclib's own path, with the call recorded; reading through
    `codec.read_message` when `checked`; its reads ended by the drain when `stream_reads` is
    given (then its trailers say it was drained)."""

    async def handler(stream: grpclib.server.Stream[Any, Any]) -> None:
        read = partial(_recv_message, stream) if checked else stream.recv_message
        drained = False
        if stream_reads is not None:

            async def recv_message() -> Any:
                nonlocal drained
                message = await stream_reads.read(read)
                drained = message is None and stream_reads.stopped
                return message

            stream.recv_message = recv_message  # type: ignore[method-assign]
        elif checked:
            stream.recv_message = read  # type: ignore[method-assign]
        h2_stream = stream._stream
        # The record `Handler.accept` opened on the call's arrival (deadline, request id).
        call: Call = getattr(h2_stream, "call", None) or Call(
            path, expiry(stream.deadline), peer=stream.peer.addr(), request_id=request_id(None)
        )
        # grpclib refuses grpc-* names as metadata, so these join at the HTTP/2 stream.
        h2_stream.send_headers = partial(  # type: ignore[method-assign]
            _send_headers,
            h2_stream,
            h2_stream.send_headers,
            [ACCEPT_ENCODING, request_id_header(call)],
        )
        enter(call)
        try:
            if call.expired:  # it waited past its deadline: no work for an answer nobody awaits
                raise GRPCError(Status.DEADLINE_EXCEEDED)
            await func(stream)
            if drained:  # the drain, not the client, ended the requests: say so
                await stream.send_trailing_metadata(metadata={DRAINING_TRAILER: "true"})
        except GRPCError as exc:
            call.end(exc.status, exc.message)
            raise
        except (asyncio.CancelledError, TimeoutError, StreamTerminatedError):
            # grpclib cancels the handler at the deadline and on the client's RST_STREAM.
            call.end(Status.DEADLINE_EXCEEDED if call.expired else Status.CANCELLED)
            raise
        except Exception:
            call.end(Status.UNKNOWN, "Internal Server Error")  # grpclib answers so, and logs it
            raise
        finally:
            observe(observer, call)

    return handler


async def _send_headers(
    stream: H2Stream,
    send_headers: Callable[..., Awaitable[None]],
    extra: list[tuple[str, str]],
    headers: list[tuple[str, str]],
    end_stream: bool = False,
) -> None:
    """An HTTP/2 stream's `send_headers`, adding `extra` (`grpc-accept-encoding`, the request
    id) to the response headers (the first block: it starts with `:status`), not to trailers.

    After the trailers of a call whose client is still sending (a stream ended by the drain,
    or by the server), a RST_STREAM NO_ERROR asks it to stop, as RFC 9113 section 8.1 allows
    and the grpc-core and grpc-go servers do (grpclib sends one only after an error status):
    the client then ends the call at once instead of writing to a connection about to close.
    """
    if headers and headers[0][0] == ":status":
        headers = [*headers, *extra]
    await send_headers(headers, end_stream=end_stream)
    if end_stream and stream.closable:
        stream.reset_nowait()


async def _recv_message(stream: grpclib.server.Stream[Any, Any]) -> Any:
    """`grpclib.server.Stream.recv_message`, reading through `codec.read_message`."""
    codec = stream._codec
    assert isinstance(codec, SizeLimitedCodec)  # only such servers install this
    message = await read_message(stream._stream, codec, stream._recv_type)
    if message is None:
        if not stream._cardinality.client_streaming:
            # The generated handler would fail an assertion: UNKNOWN and a traceback.
            refuse_missing_message()
        return None
    (message,) = await stream._dispatch.recv_message(message)
    stream._messages_received += 1
    stream._stream.connection.messages_received += 1
    stream._stream.connection.last_message_received = time.monotonic()
    return message
