"""Request messages are checked from their 5-byte gRPC prefix, before the body is read.

A raw HTTP/2 client (the `h2` library) sends what no well-behaved gRPC client would: a prefix
announcing 1 GiB with no body behind it, the compressed flag without an encoding, a message
cut short. Each gets its precise status at once, unary calls and streams alike (every call
takes the one call runner, `transport.runner`), and the server keeps serving.
"""

from __future__ import annotations

import gzip
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import pytest
from grpclib.const import Status

from mnist_service.client import MnistClient

from .conftest import MnistSplit, ServerProcess, png_bytes

GIB = 1 << 30
GZIP_ENCODING = (("grpc-encoding", "gzip"),)
WAIT_S = 10.0


def grpc_message(data: bytes, *, compressed: bool = False, announced: int | None = None) -> bytes:
    """A gRPC length-prefixed MnistImage{data}; `announced` overrides the prefix's length."""
    body = image_message(data)
    return struct.pack(">?I", compressed, len(body) if announced is None else announced) + body


def frame(body: bytes, *, compressed: bool = False) -> bytes:
    """A gRPC length-prefixed message."""
    return struct.pack(">?I", compressed, len(body)) + body


def image_message(data: bytes) -> bytes:
    """A serialised MnistImage{data}, written by hand (not by the codec under test)."""
    return b"\x0a" + varint(len(data)) + data


def varint(value: int) -> bytes:
    """A protobuf base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def start_call(
    conn: h2.connection.H2Connection,
    port: int,
    method: str,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> int:
    """Open a gRPC call on `conn`: its request headers; the new stream's id."""
    stream_id: int = conn.get_next_available_stream_id()
    conn.send_headers(
        stream_id,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", f"[::1]:{port}"),
            (":path", method),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *extra_headers,
        ],
    )
    return stream_id


def record_statuses(
    conn: h2.connection.H2Connection, data: bytes, statuses: dict[int, Status]
) -> None:
    """Feed received bytes to `conn`: each call's grpc-status into `statuses` (by stream id),
    and received data acknowledged so that flow control lets the server go on."""
    for event in conn.receive_data(data):
        if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            fields = dict(event.headers)
            if b"grpc-status" in fields:
                statuses[event.stream_id] = Status(int(fields[b"grpc-status"]))
        elif isinstance(event, h2.events.DataReceived):
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)


def text_headers(headers: Any) -> dict[str, str]:
    """h2's header pairs (bytes or str) as a str dict."""
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in headers
    }


def raw_call(
    port: int,
    method: str,
    frames: list[bytes],
    *,
    end: bool = True,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> dict[str, str]:
    """Send `frames` as DATA on one call; the response's headers and trailers, merged."""
    with socket.create_connection(("::1", port), timeout=WAIT_S) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        stream_id = start_call(conn, port, method, extra_headers)
        for index, frame in enumerate(frames):
            conn.send_data(stream_id, frame, end_stream=end and index == len(frames) - 1)
        sock.sendall(conn.data_to_send())
        received: dict[str, str] = {}
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    received.update(text_headers(event.headers))
                if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return received
            sock.sendall(conn.data_to_send())
        raise AssertionError(f"no end of stream within {WAIT_S} s: {received}")


def status_of(received: dict[str, str]) -> tuple[Status, str]:
    return Status(int(received["grpc-status"])), unquote(received.get("grpc-message", ""))


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = ServerProcess("--workers", "1", "--log-level", "info")
    yield process
    assert process.stop() == 0


async def assert_still_serving(server: ServerProcess, mnist_test_set: MnistSplit) -> None:
    async with MnistClient(server.address) as client:
        prediction = await client.predict(png_bytes(mnist_test_set[0][0]))
    assert prediction.label == mnist_test_set[1][0]


async def test_an_announced_gigabyte_is_refused_before_its_body(
    server: ServerProcess, mnist_test_set: MnistSplit
) -> None:
    """Only the prefix is sent, and the call is left open: the answer cannot wait for a body."""
    prefix = struct.pack(">?I", False, GIB)

    received = raw_call(server.port or 0, "/mnist.Mnist/Predict", [prefix], end=False)

    status, message = status_of(received)
    assert status is Status.RESOURCE_EXHAUSTED
    assert f"{GIB} bytes" in message
    assert "limit is 4194304 bytes" in message
    await assert_still_serving(server, mnist_test_set)


async def test_an_oversize_message_inside_a_stream_ends_the_stream(
    server: ServerProcess, mnist_test_set: MnistSplit
) -> None:
    first = grpc_message(png_bytes(mnist_test_set[0][1]))
    second = struct.pack(">?I", False, GIB)

    received = raw_call(server.port or 0, "/mnist.Mnist/PredictStream", [first, second], end=False)

    assert status_of(received)[0] is Status.RESOURCE_EXHAUSTED
    await assert_still_serving(server, mnist_test_set)


async def test_a_gzip_message_is_inflated_and_gzip_is_advertised(
    server: ServerProcess, mnist_test_set: MnistSplit
) -> None:
    body = gzip.compress(grpc_message(png_bytes(mnist_test_set[0][2]))[5:])
    frame = struct.pack(">?I", True, len(body)) + body

    received = raw_call(
        server.port or 0, "/mnist.Mnist/Predict", [frame], extra_headers=GZIP_ENCODING
    )

    assert status_of(received) == (Status.OK, "")
    assert received["grpc-accept-encoding"] == "gzip"


async def test_an_unsupported_encoding_is_unimplemented_naming_gzip(
    server: ServerProcess, mnist_test_set: MnistSplit
) -> None:
    frame = grpc_message(png_bytes(mnist_test_set[0][2]), compressed=True)

    received = raw_call(
        server.port or 0,
        "/mnist.Mnist/Predict",
        [frame],
        extra_headers=(("grpc-encoding", "snappy"),),
    )

    status, message = status_of(received)
    assert status is Status.UNIMPLEMENTED
    assert "'snappy' are not supported; this server accepts gzip and identity" in message
    assert received["grpc-accept-encoding"] == "gzip"
    await assert_still_serving(server, mnist_test_set)


async def test_the_compressed_flag_without_an_encoding_is_internal_not_unknown(
    server: ServerProcess, mnist_test_set: MnistSplit
) -> None:
    """What grpc-go and grpc-java answer: the client broke the protocol."""
    frame = grpc_message(png_bytes(mnist_test_set[0][2]), compressed=True)

    received = raw_call(server.port or 0, "/mnist.Mnist/Predict", [frame])

    status, message = status_of(received)
    assert status is Status.INTERNAL
    assert "grpc-encoding is missing" in message
    await assert_still_serving(server, mnist_test_set)


async def test_a_message_cut_short_is_invalid_argument(
    server: ServerProcess, mnist_test_set: MnistSplit
) -> None:
    whole = grpc_message(png_bytes(mnist_test_set[0][3]))

    received = raw_call(server.port or 0, "/mnist.Mnist/Predict", [whole[:40]])

    status, message = status_of(received)
    assert status is Status.INVALID_ARGUMENT
    assert "ended" in message
    await assert_still_serving(server, mnist_test_set)


def open_streams(port: int, bodies: list[bytes]) -> dict[int, dict[str, str]]:
    """One connection, one Predict stream per body (each left open); the answers that come
    within a second, by stream id."""
    with socket.create_connection(("::1", port), timeout=WAIT_S) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        for body in bodies:
            conn.send_data(start_call(conn, port, "/mnist.Mnist/Predict"), body)
        sock.sendall(conn.data_to_send())
        answers: dict[int, dict[str, str]] = {}
        sock.settimeout(0.2)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    answers.setdefault(event.stream_id, {}).update(text_headers(event.headers))
            sock.sendall(conn.data_to_send())
        return answers


async def test_a_slow_body_is_given_up_on(mnist_test_set: MnistSplit) -> None:
    server = ServerProcess("--workers", "1", "--log-level", "info", "--max-message-seconds", "0.5")
    try:
        started = time.monotonic()
        partial = struct.pack(">?I", False, 100_000) + b"\x0a" * 10  # 10 of 100 kB, then nothing
        received = raw_call(server.port or 0, "/mnist.Mnist/Predict", [partial], end=False)
        waited = time.monotonic() - started
        await assert_still_serving(server, mnist_test_set)
    finally:
        assert server.stop() == 0

    status, message = status_of(received)
    assert status is Status.RESOURCE_EXHAUSTED
    assert "did not arrive within 0.5 s" in message
    assert waited < WAIT_S


async def test_one_connection_cannot_multiply_the_message_limit(
    mnist_test_set: MnistSplit,
) -> None:
    """Three streams each announce 100 kB (big enough to count: over 64 KiB); the connection
    may have 250 kB arriving."""
    server = ServerProcess(
        "--workers", "1", "--log-level", "info",
        "--max-message-bytes", "100000", "--max-connection-bytes", "250000",
    )  # fmt: skip
    try:
        partial = struct.pack(">?I", False, 100_000) + b"\x0a" * 10
        answers = open_streams(server.port or 0, [partial, partial, partial])
        await assert_still_serving(server, mnist_test_set)
    finally:
        assert server.stop() == 0

    assert list(answers) == [5]  # streams 1 and 3 still wait for their bodies
    status, message = status_of(answers[5])
    assert status is Status.RESOURCE_EXHAUSTED
    assert "already has 200000 bytes of messages arriving" in message
