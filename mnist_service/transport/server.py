"""A grpclib `Server` whose connections make one socket write per event-loop turn, whose
unary calls take the lean path of `transport.unary`, whose every call reads its messages
through `codec.read_message` (the size limit checked from the prefix, before the body) and
answers with `grpc-accept-encoding: gzip`, and whose every call is recorded as an
`api.calls.Call` for the request log.

grpclib writes a call's headers, data and trailers with a `transport.write` each, and every
concurrent call does the same: three `send` syscalls per call, ~110 us each under load. Here
each connection's transport is wrapped so that writes are buffered and flushed once, at the
end of the loop turn in which they were made: all the calls answered in that turn leave in
one `send`. Ordering is kept (one buffer per connection), and flow control is untouched (the
real transport still calls `pause_writing`/`resume_writing` on grpclib's protocol).

This relies on grpclib 0.4.9's `Server._protocol_factory` and the private attributes it
uses (pinned in pyproject.toml; tests/test_transport.py covers them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, cast

import grpclib.server
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.protocol import H2Protocol

from ..api.calls import Call, CallObserver, enter, expiry, ignore
from .codec import ACCEPT_ENCODING, SizeLimitedCodec, read_message, refuse_missing_message
from .unary import Handler, UnaryMethod, observe


class CoalescingTransport:
    """Proxy of an asyncio transport that joins the writes of one loop turn into one."""

    __slots__ = ("_buffer", "_loop", "_scheduled", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes) -> None:
        """Buffer `data`; it is sent with the rest of this loop turn's writes."""
        if not data:
            return
        self._buffer.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send what is buffered, in one write."""
        self._scheduled = False
        if not self._buffer:
            return
        data = b"".join(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        """Send what is buffered, then close."""
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingProtocol(asyncio.Protocol):
    """grpclib's `H2Protocol`, given a `CoalescingTransport` instead of the socket's own."""

    def __init__(self, inner: H2Protocol) -> None:
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Wrap the transport, then let grpclib set up HTTP/2."""
        # A stream transport (uvloop's do not subclass asyncio.Transport, hence the cast).
        wrapped = CoalescingTransport(
            cast(asyncio.Transport, transport), asyncio.get_running_loop()
        )
        self.inner.connection_made(wrapped)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        """Feed HTTP/2 frames to grpclib."""
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        """The peer closed its side (grpclib has no use for half-closed connections)."""
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        """The socket's buffer is full: grpclib stops writing."""
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        """The socket's buffer drained: grpclib may write again."""
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: grpclib ends its streams."""
        self.inner.connection_lost(exc)


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
        **kwargs: Any,
    ) -> None:
        super().__init__(handlers, **kwargs)
        self._unary = dict(unary or {})
        self._observer = observer
        checked = isinstance(self._codec, SizeLimitedCodec)
        self._mapping = {
            path: handler._replace(func=_observed(path, handler.func, observer, checked=checked))
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
        )
        self._handlers.add(handler)
        return CoalescingProtocol(H2Protocol(handler, self._config, self._h2_config))


GrpclibHandler = Callable[[grpclib.server.Stream[Any, Any]], Awaitable[None]]


def _observed(
    path: str, func: GrpclibHandler, observer: CallObserver, *, checked: bool
) -> GrpclibHandler:
    """A handler on grpclib's own path, with the call recorded (and, when `checked`, its
    messages read through `read_message`, as on the lean path)."""

    async def handler(stream: grpclib.server.Stream[Any, Any]) -> None:
        if checked:
            stream.recv_message = partial(_recv_message, stream)  # type: ignore[method-assign]
        # grpclib refuses grpc-* names as metadata, so the header joins at the HTTP/2 stream.
        h2_stream = stream._stream
        h2_stream.send_headers = partial(  # type: ignore[method-assign]
            _send_headers, h2_stream.send_headers
        )
        call = Call(path, expiry(stream.deadline), peer=stream.peer.addr())
        enter(call)
        try:
            if call.expired:  # it waited past its deadline: no work for an answer nobody awaits
                raise GRPCError(Status.DEADLINE_EXCEEDED)
            await func(stream)
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
    send_headers: Callable[..., Awaitable[None]],
    headers: list[tuple[str, str]],
    end_stream: bool = False,
) -> None:
    """An HTTP/2 stream's `send_headers`, adding `grpc-accept-encoding` to the response
    headers (the first block: it starts with `:status`), not to trailers."""
    if headers and headers[0][0] == ":status":
        headers = [*headers, ACCEPT_ENCODING]
    await send_headers(headers, end_stream=end_stream)


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
