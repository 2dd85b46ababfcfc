"""A grpclib `Channel` whose calls survive a server's graceful GOAWAY.

grpclib's client closes its connection on any GOAWAY, ending the calls still running on it,
and h2 moves its state machine to CLOSED, after which it refuses the answers to those calls.
A draining server (ours, grpc-go, grpc-java...) sends GOAWAY with NO_ERROR precisely so that
the calls it has accepted can finish. Here such a GOAWAY retires the connection instead: the
calls on it run to their end, new calls open a new connection, and the retired connection
closes once its last call is done (or when the channel is closed). Any other GOAWAY keeps
grpclib's behaviour.

This relies on grpclib 0.4.9's `Channel._protocol_factory`, `_config`, `_h2_config` and
`EventsProcessor`, and on h2's `H2Connection._frame_dispatch_table` (where a GOAWAY frame is
received); tests/test_transport.py covers them.
"""

from __future__ import annotations

import weakref
from typing import Any, cast

import grpclib.client
from grpclib.protocol import Connection, EventsProcessor, H2Protocol
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, Event
from hyperframe.frame import Frame, GoAwayFrame


class Channel(grpclib.client.Channel):
    """`grpclib.client.Channel`, moving to a new connection on a graceful GOAWAY."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._all_protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()

    def _protocol_factory(self) -> H2Protocol:
        protocol = _Protocol(grpclib.client.Handler(), self._config, self._h2_config)
        self._all_protocols.add(protocol)
        return protocol

    def close(self) -> None:
        """Close the connection, and any retired one whose calls still run."""
        current = self._protocol
        super().close()
        for protocol in list(self._all_protocols):
            if protocol is not current and hasattr(protocol, "processor"):
                protocol.processor.close()


class _Protocol(H2Protocol):
    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.processor = _Processor(cast(grpclib.client.Handler, self.handler), self.connection)
        h2_connection: H2Connection = self.connection._connection
        h2_connection._frame_dispatch_table[GoAwayFrame] = _graceful_goaway(h2_connection)


def _graceful_goaway(h2_connection: H2Connection) -> Any:
    """h2's GOAWAY reception, but a NO_ERROR GOAWAY leaves the connection open."""
    receive = h2_connection._receive_goaway_frame

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

    def __init__(self, handler: grpclib.client.Handler, connection: Connection) -> None:
        super().__init__(handler, connection)
        self._handler = handler

    def process_connection_terminated(self, event: ConnectionTerminated) -> None:
        if event.error_code != ErrorCodes.NO_ERROR:
            super().process_connection_terminated(event)
            return
        self.retired = True
        self._handler.connection_lost = True  # the channel opens a new connection for new calls
        if not self.streams:
            self.close("Received GOAWAY frame, closing connection; error_code: 0")

    def register(self, stream: Any) -> Any:
        release = super().register(stream)

        def release_stream() -> None:
            release()
            if self.retired and not self.streams:
                self.close("Received GOAWAY frame, closing connection; error_code: 0")

        return release_stream
