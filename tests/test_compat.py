"""Every private name `mnist_service._compat` relies on, checked against the installed libraries.

An upgrade of grpclib, h2, betterproto2 or Python that moves one of them fails here, by name,
rather than somewhere in the request path. The libraries are pinned exactly (the first tests).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import re
from pathlib import Path
from typing import Any

import grpclib.client
import h2.config
import h2.connection
import pytest
from grpclib.config import Configuration
from grpclib.encoding.proto import ProtoCodec
from grpclib.protocol import AbstractHandler, Connection, EventsProcessor, H2Protocol
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, PingAckReceived
from h2.utilities import SizeLimitDict
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame

from mnist_service import _compat
from mnist_service._proto.mnist import MnistImage
from mnist_service.transport.channel import Channel
from mnist_service.transport.server import Handler

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("library", ["grpclib", "h2", "betterproto2"])
def test_the_libraries_are_pinned_exactly(library: str) -> None:
    pin = re.search(rf'"{library}(?:\[[^\]]*\])?==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin is not None, f"{library} must be pinned exactly: _compat uses its private names"
    assert importlib.metadata.version(library) == pin.group(1)


async def test_ready_callbacks_counts_this_turns_callbacks() -> None:
    loop = asyncio.get_running_loop()
    before = _compat.ready_callbacks(loop)
    loop.call_soon(lambda: None)
    loop.call_soon(lambda: None)

    assert before is not None
    assert _compat.ready_callbacks(loop) == before + 2
    assert _compat.ready_callbacks(object()) is None  # type: ignore[arg-type]  # uvloop-like


def _connected_protocol() -> H2Protocol:
    protocol = H2Protocol(
        Handler({}, ProtoCodec()),
        _compat.server_configuration(None),
        h2.config.H2Configuration(client_side=False),
    )
    protocol.connection_made(_Transport())
    return protocol


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def test_h2_connection_is_the_protocols_h2_connection() -> None:
    protocol = _connected_protocol()

    assert isinstance(protocol.connection, Connection)
    assert isinstance(_compat.h2_connection(protocol), H2Connection)


def test_limit_closed_streams_keeps_the_newest() -> None:
    """h2 keeps closed streams in `_closed_streams`, a `SizeLimitDict` sized at construction,
    and reads it only in `_stream_closed_by` (the late-frame decisions)."""
    connection = H2Connection()
    assert isinstance(connection._closed_streams, SizeLimitDict)
    source = inspect.getsource(h2.connection)
    assert source.count("self._closed_streams") == 4  # made, filled, looked up twice
    assert "if stream_id in self._closed_streams:" in inspect.getsource(
        H2Connection._stream_closed_by
    )

    _compat.limit_closed_streams(connection, kept=3)
    for stream_id in range(1, 20, 2):
        connection._closed_streams[stream_id] = None
    assert list(connection._closed_streams) == [15, 17, 19]


def test_defer_frame_reprs_formats_a_received_frame_only_when_logged() -> None:
    """`h2.connection` calls the module-level `repr` only for the received-frame trace line
    (checked against the installed h2), and the line a real trace logger writes is what it
    was."""
    source = inspect.getsource(h2.connection)
    assert source.count("repr(") == 1
    assert 'self.config.logger.trace("Received frame: %s", repr(frame))' in source

    _compat.defer_frame_reprs()
    frame = HeadersFrame(1, data=b"header block")
    deferred = h2.connection.repr(frame)  # type: ignore[attr-defined]
    assert isinstance(deferred, _compat.LazyRepr)
    assert str(deferred) == repr(frame)
    assert "Received frame: %s" % deferred == f"Received frame: {frame!r}"  # noqa: UP031 - h2's own formatting

    lines: list[str] = []

    class Recording(h2.config.OutputLogger):
        def trace(self, fmtstr: str, *args: Any) -> None:
            lines.append(fmtstr % args)

    server = H2Connection(
        h2.config.H2Configuration(client_side=False, logger=Recording(trace_level=True))
    )
    server.initiate_connection()
    client = H2Connection()
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                            (":authority", "x")], end_stream=True)  # fmt: skip
    server.receive_data(client.data_to_send())
    received = [line for line in lines if line.startswith("Received frame: ")]
    assert any("HeadersFrame(stream_id=1" in line and "<hex:" in line for line in received)


async def test_on_ping_ack_calls_back_after_grpclibs_own_handling() -> None:
    protocol = _connected_protocol()
    assert isinstance(protocol.processor, EventsProcessor)
    assert ConnectionTerminated in protocol.processor.processors
    acks: list[bytes] = []
    _compat.on_ping_ack(protocol, lambda event: acks.append(event.ping_data))
    event = PingAckReceived(ping_data=b"12345678")

    protocol.processor.process(event)

    assert acks == [b"12345678"]


def test_server_configuration_fills_in_the_servers_defaults() -> None:
    """grpclib's server keeps the connection alive every 2 hours by default (a field with a
    'server-default'), which only `__for_server__` fills in."""
    assert not isinstance(Configuration()._keepalive_time, float)  # grpclib's placeholder
    config = _compat.server_configuration(Configuration(http2_stream_window_size=70_000))

    assert config.http2_stream_window_size == 70_000
    assert config._keepalive_time == 7200.0
    assert _compat.server_configuration(None)._keepalive_time == 7200.0


def test_unknown_fields_are_the_bytes_a_message_did_not_know() -> None:
    unknown = b"\x98\x06\x07"  # field 99, varint 7
    message = MnistImage.parse(b"\x0a\x01x" + unknown)

    assert message.data == b"x"
    assert _compat.unknown_fields(message) == unknown
    assert _compat.unknown_fields(MnistImage(data=b"x")) == b""


def test_take_goaway_reception_wraps_h2s_own() -> None:
    connection = H2Connection()
    assert GoAwayFrame in connection._frame_dispatch_table
    assert callable(connection._receive_goaway_frame)
    seen: list[Frame] = []

    def make(h2_own: _compat.Reception) -> _compat.Reception:
        def receive(frame: Frame) -> Any:
            seen.append(frame)
            return h2_own(frame)

        return receive

    _compat.take_goaway_reception(connection, make)
    connection.initiate_connection()
    peer = H2Connection(h2.config.H2Configuration(client_side=False))
    peer.initiate_connection()
    connection.receive_data(peer.data_to_send())
    peer.close_connection()
    events = connection.receive_data(peer.data_to_send())

    assert [type(frame) for frame in seen] == [GoAwayFrame]
    assert any(isinstance(event, ConnectionTerminated) for event in events)


async def test_channel_protocols_and_current_protocol() -> None:
    """grpclib's channel makes each connection's protocol in `_protocol_factory`, from its
    `_config` and `_h2_config`, and keeps the current one in `_protocol`."""
    assert "self._protocol_factory" in inspect.getsource(grpclib.client.Channel)
    channel = Channel("::1", 1)
    try:
        assert channel._config is not None
        assert channel._h2_config is not None
        assert _compat.current_protocol(channel) is None  # not connected yet
        made = channel._protocol_factory()  # what grpclib calls on connecting
        assert isinstance(made, H2Protocol)
        assert made in channel._all_protocols  # our make_protocol made it
    finally:
        channel.close()


class _NoCalls(AbstractHandler):
    """Takes streams and does nothing with them (the test answers them itself)."""

    def __init__(self) -> None:
        self.streams: list[Any] = []

    def accept(self, stream: Any, headers: Any, release_stream: Any) -> None:
        self.streams.append(stream)

    def cancel(self, stream: Any) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("size", [10, 20_000], ids=["small", "over-a-frame"])
async def test_write_answer_writes_a_whole_answer_or_nothing(size: int) -> None:
    """grpclib's stream keeps its h2 connection in `_h2_connection` and its transport in
    `_transport`: a small answer goes out in one write, headers, data and trailers; one that
    does not fit a frame is left to grpclib's own methods (nothing written)."""
    handler = _NoCalls()
    protocol = H2Protocol(
        handler, _compat.server_configuration(None), h2.config.H2Configuration(client_side=False)
    )
    wire = _Transport()
    protocol.connection_made(wire)
    client = H2Connection()
    client.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":path", "/x"), (":scheme", "http"),
                            (":authority", "x")], end_stream=True)  # fmt: skip
    protocol.data_received(client.data_to_send())
    (stream,) = handler.streams
    client.receive_data(b"".join(wire.written))
    wire.written.clear()

    written = _compat.write_answer(stream, [(":status", "200")], b"d" * size, [("t", "1")])

    if size > 16_384:
        assert written is False
        assert wire.written == []
        return
    assert written is True
    assert len(wire.written) == 1
    kinds = [type(event).__name__ for event in client.receive_data(wire.written[0])]
    assert kinds == ["ResponseReceived", "DataReceived", "TrailersReceived", "StreamEnded"]
    assert stream.data_sent == size
