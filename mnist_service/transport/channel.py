"""A grpclib client `Channel` whose calls survive a server's graceful GOAWAY, and whose close
can be awaited until its connections are gone.

**Graceful GOAWAY.** grpclib's client closes its connection on any GOAWAY, ending the calls
still running on it, and h2 moves its state machine to CLOSED, after which it refuses the
answers to those calls. A draining server (ours, grpc-go, grpc-java...) sends GOAWAY with
NO_ERROR precisely so that the calls it has accepted can finish. Here such a GOAWAY retires
the connection instead: the calls on it run to their end, new calls open a new connection,
and the retired connection closes once its last call is done (or when the channel is
closed). Any other GOAWAY keeps grpclib's behaviour.

**Awaitable close.** grpclib's `Channel.close()` only starts closing. A plaintext socket
closes on the next loop turn, but a TLS connection first exchanges close_notify with the
server, and an event loop that ends before then leaves the socket open (a ResourceWarning,
and a file descriptor held until the collector runs). `aclose` waits for every connection to
be lost, and aborts those whose server does not answer in time.

The private names of grpclib and h2 this needs (the channel's protocol factory, where h2
receives a GOAWAY frame) are in `mnist_service._compat`; `EventsProcessor` is grpclib's own
events processor, subclassed.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Any, cast

import grpclib.client
from grpclib.config import Configuration
from grpclib.protocol import Connection, EventsProcessor, H2Protocol
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, Event
from hyperframe.frame import Frame, GoAwayFrame

from .. import _compat

CLOSE_TIMEOUT_S = 1.0
"""How long `aclose` waits for the server's side of a TLS close before aborting."""


@_compat.channel_protocols
class Channel(grpclib.client.Channel):
    """`grpclib.client.Channel`, moving to a new connection on a graceful GOAWAY, with
    `aclose`, which returns once its connections are closed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._all_protocols: weakref.WeakSet[_Protocol] = weakref.WeakSet()
        self.retired = 0
        """How many GOAWAY frames (with NO_ERROR: a draining server) have retired its
        connections so far (a drain sends two per connection)."""

    def make_protocol(self, config: Configuration, h2_config: Any) -> H2Protocol:
        """grpclib's client protocol, retiring on a graceful GOAWAY and reporting its end."""
        protocol = _Protocol(grpclib.client.Handler(), config, h2_config)
        protocol.on_retired = self._count_retired
        self._all_protocols.add(protocol)
        return protocol

    def _count_retired(self) -> None:
        self.retired += 1

    def close(self) -> None:
        """Close the connection, and any retired one whose calls still run."""
        current = _compat.current_protocol(self)
        super().close()
        for protocol in list(self._all_protocols):
            if protocol is not current and hasattr(protocol, "processor"):
                protocol.processor.close()

    async def aclose(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Close, and wait until the sockets are closed (aborting any after `timeout` s)."""
        protocols = [p for p in self._all_protocols if p.transport is not None]
        self.close()
        for protocol in protocols:
            try:
                await asyncio.wait_for(protocol.lost.wait(), timeout)
            except TimeoutError:
                protocol.transport.abort()  # type: ignore[union-attr]  # a stream transport


def _nothing() -> None:
    pass


class _Protocol(H2Protocol):
    """grpclib's client protocol: a graceful GOAWAY retires it, and it remembers its
    transport and when the connection ended."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.lost = asyncio.Event()
        self.transport: asyncio.BaseTransport | None = None
        self.on_retired: Callable[[], None] = _nothing

    def connection_made(self, transport: Any) -> None:
        """Keep the transport (to abort it), set up HTTP/2, then take over GOAWAY."""
        self.transport = transport
        super().connection_made(transport)
        self.processor = _Processor(
            cast(grpclib.client.Handler, self.handler), self.connection, self.on_retired
        )
        _compat.take_goaway_reception(_compat.h2_connection(self), _graceful_goaway)

    def connection_lost(self, exc: BaseException | None) -> None:
        """The socket is closed: grpclib ends its streams, and `aclose` may return."""
        super().connection_lost(exc)
        self.lost.set()


def _graceful_goaway(receive: _compat.Reception) -> _compat.Reception:
    """h2's GOAWAY reception (`receive`), but a NO_ERROR GOAWAY leaves the connection open."""

    def receive_goaway(frame: Frame) -> tuple[list[Frame], list[Event]]:
        assert isinstance(frame, GoAwayFrame)
        if frame.error_code != ErrorCodes.NO_ERROR:
            result: tuple[list[Frame], list[Event]] = receive(frame)
            return result
        event = ConnectionTerminated()
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    return receive_goaway


class _Processor(EventsProcessor):
    """grpclib's events processor; a graceful GOAWAY retires the connection."""

    retired = False

    def __init__(
        self,
        handler: grpclib.client.Handler,
        connection: Connection,
        on_retired: Callable[[], None],
    ) -> None:
        super().__init__(handler, connection)
        self._handler = handler
        self._on_retired = on_retired

    def process_connection_terminated(self, event: ConnectionTerminated) -> None:
        if event.error_code != ErrorCodes.NO_ERROR:
            super().process_connection_terminated(event)
            return
        self.retired = True
        self._handler.connection_lost = True  # the channel opens a new connection for new calls
        self._on_retired()
        if not self.streams:
            self.close("Received GOAWAY frame, closing connection; error_code: 0")

    def register(self, stream: Any) -> Any:
        release = super().register(stream)

        def release_stream() -> None:
            release()
            if self.retired and not self.streams:
                self.close("Received GOAWAY frame, closing connection; error_code: 0")

        return release_stream
