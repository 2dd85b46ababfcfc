"""h2's memory of closed streams, bounded on every server connection
(`transport.server.CLOSED_STREAMS_KEPT`, `_compat.limit_closed_streams`).

h2 remembers 65,536 closed streams per connection by default, about 7.7 MB resident on a
connection that lived through as many calls (issue 21); ours remember 1,024. These tests
check a real connection after more calls than that, and show that what gRPC clients send on
a forgotten stream is answered as before (tests/test_compat.py checks the private names).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import h2.connection
import h2.events
import h2.exceptions
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from h2.config import H2Configuration
from h2.connection import H2Connection
from hyperframe.frame import Frame, RstStreamFrame

from mnist_service._compat import limit_closed_streams
from mnist_service._proto.mnist import MnistImage, MnistStub
from mnist_service.transport.server import CLOSED_STREAMS_KEPT, Server

from .test_transport import Service

ROOT = Path(__file__).resolve().parent.parent


async def test_a_connection_remembers_only_its_last_closed_streams() -> None:
    """More calls than the limit on one real connection (answered, refused, past their
    deadline) leave h2 remembering exactly the limit, the newest ones; without the limit it
    would hold every one of them."""
    calls = CLOSED_STREAMS_KEPT + 476
    service = Service()
    server = Server([service])
    await server.start("::1", 0)
    port = server.port
    channel = Channel("::1", port)
    stub = MnistStub(channel)

    async def call(index: int) -> Status:
        data, timeout = {0: (b"refuse", None), 1: (b"slow", 0.01)}.get(index % 10, (b"x", None))
        try:
            await stub.predict(MnistImage(data=data), timeout=timeout)
        except GRPCError as exc:
            return exc.status
        except TimeoutError:  # the client's own timer beat the server's answer
            return Status.DEADLINE_EXCEEDED
        return Status.OK

    try:
        statuses: list[Status] = []
        for start in range(0, calls, 50):
            statuses += await asyncio.gather(*(call(i) for i in range(start, start + 50)))
        (connection,) = server._connections
        h2_connection = connection.inner.connection._connection
        remembered = set(h2_connection._closed_streams)
        highest = h2_connection.highest_inbound_stream_id
    finally:
        channel.close()
        await server.close()

    assert {Status.OK, Status.INVALID_ARGUMENT, Status.DEADLINE_EXCEEDED} == set(statuses)
    # one connection carried them (a few calls past their deadline never left the client)
    assert highest > 2 * (CLOSED_STREAMS_KEPT + 400)
    assert len(remembered) == CLOSED_STREAMS_KEPT
    # the newest: a client's stream ids are odd and rising, the last few may still be open
    assert min(remembered) > highest - 2 * (CLOSED_STREAMS_KEPT + 100)


HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/mnist.Mnist/Predict"),
    (":authority", "localhost"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


def _frames(data: bytes) -> list[Frame]:
    frames = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(frame)
        data = data[9 + length :]
    return frames


def _reset_and_pushed_out(kept: int) -> tuple[H2Connection, H2Connection]:
    """A server connection that reset stream 1 (say, its deadline passed) and then served
    three more calls; and the client, which has not yet read the reset."""
    server = H2Connection(H2Configuration(client_side=False))
    limit_closed_streams(server, kept=kept)
    client = H2Connection(H2Configuration(client_side=True))
    server.initiate_connection()
    client.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    client.send_headers(1, HEADERS)
    server.receive_data(client.data_to_send())
    server.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
    for stream_id in (3, 5, 7):  # each new stream moves the closed ones into the memory
        client.send_headers(stream_id, HEADERS, end_stream=True)
        server.receive_data(client.data_to_send())
        server.send_headers(stream_id, [(":status", "200")], end_stream=True)
    server.data_to_send()
    return server, client


@pytest.mark.parametrize("kept", [1, CLOSED_STREAMS_KEPT], ids=["forgotten", "remembered"])
def test_what_grpc_clients_send_on_a_closed_stream_is_answered_alike(kept: int) -> None:
    """A message's DATA, a WINDOW_UPDATE and the client's own RST_STREAM on a stream we have
    reset: whether h2 still remembers it or not, the connection lives and DATA is answered
    with RST_STREAM (its flow-control credit is returned as on an open stream)."""
    server, client = _reset_and_pushed_out(kept)
    assert (1 in server._closed_streams) is (kept == CLOSED_STREAMS_KEPT)

    client.send_data(1, b"\x00\x00\x00\x00\x05" + b"x" * 5)
    client.increment_flow_control_window(100, stream_id=1)
    client.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
    events = server.receive_data(client.data_to_send())

    assert not any(isinstance(event, h2.events.ConnectionTerminated) for event in events)
    answer = _frames(server.data_to_send())
    assert any(isinstance(f, RstStreamFrame) and f.stream_id == 1 for f in answer)
    client.send_headers(9, HEADERS, end_stream=True)  # and the connection takes new calls
    assert any(
        isinstance(event, h2.events.RequestReceived) and event.stream_id == 9
        for event in server.receive_data(client.data_to_send())
    )


def test_only_late_trailers_read_the_memory() -> None:
    """The one difference: request trailers (HEADERS) on a stream we reset get a RST_STREAM
    while it is remembered, and end the connection once it is forgotten. gRPC clients send
    no request trailers."""
    server, client = _reset_and_pushed_out(CLOSED_STREAMS_KEPT)
    client.send_headers(1, [("x-trailer", "1")], end_stream=True)
    server.receive_data(client.data_to_send())
    assert any(isinstance(f, RstStreamFrame) for f in _frames(server.data_to_send()))

    server, client = _reset_and_pushed_out(1)
    client.send_headers(1, [("x-trailer", "1")], end_stream=True)
    with pytest.raises(h2.exceptions.ProtocolError):
        server.receive_data(client.data_to_send())
