"""Every private name of the libraries under the service, in one place.

grpclib (pinned exactly), h2 (pinned exactly), betterproto2 and asyncio leave a few things
out of their public API that the service needs. Each use is one small function here, named
for what it does, with the private name it relies on in its docstring; tests/test_compat.py
checks each of them against the installed libraries, so an upgrade that moves one fails
there, by name, and not somewhere in the request path. Nothing else in the package touches
a private name of another library (tests/test_layers.py checks it).

=============================  ===========================================================
function                       relies on
=============================  ===========================================================
`ready_callbacks`              asyncio's `BaseEventLoop._ready` (callbacks due this turn)
`h2_connection`                grpclib's `Connection._connection` (the h2 connection)
`limit_closed_streams`         h2's `H2Connection._closed_streams`, `utilities.SizeLimitDict`
`defer_frame_reprs`            the module global `repr` that `h2.connection` calls
`on_ping_ack`                  grpclib's `EventsProcessor.processors` (event -> callback)
`write_answer`                 grpclib's `Stream._h2_connection`, `Stream._transport`
`server_configuration`         grpclib's `Configuration.__for_server__`
`unknown_fields`               betterproto2's `Message._unknown_fields`
`take_goaway_reception`        h2's `_frame_dispatch_table`, `_receive_goaway_frame`
`channel_protocols`            grpclib's `Channel._protocol_factory`, `_config`,
                               `_h2_config`
`current_protocol`             grpclib's `Channel._protocol`
=============================  ===========================================================

The libraries are imported inside the functions that use them, so that importing this module
(the engine does, for `ready_callbacks`) imports no gRPC or HTTP/2 library.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # the libraries are imported where used: the engine imports this module
    import betterproto2
    from grpclib.config import Configuration
    from grpclib.protocol import H2Protocol
    from grpclib.protocol import Stream as GrpclibStream
    from h2.connection import H2Connection
    from h2.events import Event as H2Event
    from h2.events import PingAckReceived
    from hyperframe.frame import Frame

__all__ = [
    "LazyRepr",
    "channel_protocols",
    "current_protocol",
    "defer_frame_reprs",
    "h2_connection",
    "limit_closed_streams",
    "on_ping_ack",
    "ready_callbacks",
    "server_configuration",
    "take_goaway_reception",
    "unknown_fields",
    "write_answer",
]


# --- asyncio --------------------------------------------------------------------------------


def ready_callbacks(loop: asyncio.AbstractEventLoop) -> int | None:
    """How many callbacks the loop will run in this turn (CPython's `_ready` queue), or None
    on a loop without one (uvloop): then callers must assume there are others."""
    ready = getattr(loop, "_ready", None)
    return None if ready is None else len(ready)


# --- h2 and grpclib's HTTP/2 layer ---------------------------------------------------------


def h2_connection(protocol: H2Protocol) -> H2Connection:
    """The h2 connection under a connected grpclib protocol (`Connection._connection`)."""
    connection: H2Connection = protocol.connection._connection
    return connection


def limit_closed_streams(connection: H2Connection, kept: int) -> None:
    """Make a new h2 connection remember only its last `kept` closed streams
    (`H2Connection._closed_streams`, a `SizeLimitDict` of 2**16 by default)."""
    from h2.utilities import SizeLimitDict

    remembered = SizeLimitDict(size_limit=kept)
    remembered.update(connection._closed_streams)  # empty on a new connection
    connection._closed_streams = remembered


class LazyRepr:
    """`repr(value)`, computed when it is formatted with ``%s``/``%r`` or `str`, never before."""

    __slots__ = ("_value",)

    def __init__(self, value: object) -> None:
        self._value = value

    def __str__(self) -> str:
        return builtins.repr(self._value)

    __repr__ = __str__


def defer_frame_reprs() -> None:
    """Make h2's received-frame trace lazy: `h2.connection` formats every received frame with
    its module-level `repr` before asking its logger (which drops it); a `LazyRepr` formats
    only when written (idempotent; process-wide, h2.connection only)."""
    import h2.connection

    h2.connection.repr = LazyRepr  # type: ignore[attr-defined]


def on_ping_ack(protocol: H2Protocol, callback: Callable[[PingAckReceived], None]) -> None:
    """Call `callback` on every PING ack the connection receives, after grpclib's own
    handling (`EventsProcessor.processors`, its event -> method table)."""
    from h2.events import PingAckReceived

    processors = protocol.processor.processors
    grpclib_ack: Callable[[PingAckReceived], None] = processors[PingAckReceived]  # type: ignore[assignment]

    def on_ack(event: PingAckReceived) -> None:
        grpclib_ack(event)
        callback(event)

    processors[PingAckReceived] = on_ack


def write_answer(
    stream: GrpclibStream,
    headers: list[tuple[str, str]] | None,
    data: bytes,
    trailers: list[tuple[str, str]] | None,
) -> bool:
    """Write `headers`, one DATA frame and `trailers` (ending the stream), those given, with
    one h2 serialisation and one transport write, as grpclib's `Stream.send_headers` and
    `send_data` would in one each (`Stream._h2_connection`, `_transport`). False, with
    nothing written, when that cannot be done at once: the connection's writes are paused,
    the stream is gone, or `data` does not fit the flow-control window or a frame; the
    caller then sends through grpclib's own methods, which wait."""
    connection = stream.connection
    h2_connection = stream._h2_connection
    stream_id = stream.id
    if (
        not connection.write_ready.is_set()
        or stream_id not in h2_connection.streams
        or len(data) > h2_connection.local_flow_control_window(stream_id)
        or len(data) > h2_connection.max_outbound_frame_size
    ):
        return False
    if headers is not None:
        h2_connection.send_headers(stream_id, headers)
    h2_connection.send_data(stream_id, data)
    if trailers is not None:
        h2_connection.send_headers(stream_id, trailers, end_stream=True)
    stream._transport.write(h2_connection.data_to_send())
    stream.data_sent += len(data)
    connection.data_sent += len(data)
    connection.data_send_process()  # what grpclib notes for its keepalive pings
    return True


def server_configuration(config: Configuration | None) -> Configuration:
    """grpclib's `Configuration` with the server's defaults filled in, as its `Server` does
    (`Configuration.__for_server__`)."""
    from grpclib.config import Configuration

    return (config or Configuration()).__for_server__()


Reception = Callable[["Frame"], "tuple[list[Frame], list[H2Event]]"]


def take_goaway_reception(connection: H2Connection, make: Callable[[Reception], Reception]) -> None:
    """Replace how the h2 connection receives a GOAWAY frame by `make(h2's own)` (the entry
    of `_frame_dispatch_table`, h2's own being `_receive_goaway_frame`)."""
    from hyperframe.frame import GoAwayFrame

    table = connection._frame_dispatch_table
    h2_own: Reception = connection._receive_goaway_frame  # type: ignore[assignment]
    table[GoAwayFrame] = make(h2_own)


_Channel = TypeVar("_Channel", bound=type)


def channel_protocols(channel_class: _Channel) -> _Channel:
    """Class decorator for a `grpclib.client.Channel` subclass: a new connection's protocol
    comes from its `make_protocol(config, h2_config)` method (grpclib calls the private
    `Channel._protocol_factory`, and keeps the two configurations in `_config` and
    `_h2_config`)."""

    def _protocol_factory(self: Any) -> H2Protocol:
        protocol: H2Protocol = self.make_protocol(self._config, self._h2_config)
        return protocol

    channel_class._protocol_factory = _protocol_factory  # type: ignore[attr-defined]
    return channel_class


def current_protocol(channel: Any) -> H2Protocol | None:
    """The protocol of the connection a channel's new calls go to (`Channel._protocol`)."""
    protocol: H2Protocol | None = channel._protocol
    return protocol


# --- betterproto2 ---------------------------------------------------------------------------


def unknown_fields(message: betterproto2.Message) -> bytes:
    """The bytes of the fields a parsed message did not know (`Message._unknown_fields`)."""
    fields: bytes = message._unknown_fields
    return fields
