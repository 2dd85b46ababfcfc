"""The grpclib adapter in `mnist_service.transport.server`: write coalescing.

It relies on grpclib 0.4.9's private `Server._protocol_factory`; these tests fail loudly if
an upgrade moves it, instead of the server quietly losing its coalescing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpclib
import pytest
from grpclib.health.service import Health
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.protocol import H2Protocol

from mnist_service.transport.server import CoalescingProtocol, CoalescingTransport, Server


class RecordingTransport(asyncio.Transport):
    """Stands in for a socket's transport; records every write that reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("::1", 1234)}.get(name, default)


def test_grpclib_is_the_pinned_version() -> None:
    assert grpclib.__version__ == "0.4.9"


async def test_writes_of_one_loop_turn_leave_in_one_write_in_order() -> None:
    real = RecordingTransport()
    transport = CoalescingTransport(real, asyncio.get_running_loop())

    for part in (b"headers", b"", b"data", b"trailers"):
        transport.write(part)
    assert real.writes == []  # nothing is sent before the turn ends
    await asyncio.sleep(0)
    transport.write(b"next")
    await asyncio.sleep(0)

    assert real.writes == [b"headersdatatrailers", b"next"]


async def test_close_sends_what_is_buffered_first() -> None:
    real = RecordingTransport()
    transport = CoalescingTransport(real, asyncio.get_running_loop())

    transport.write(b"goodbye")
    transport.close()
    await asyncio.sleep(0)

    assert real.writes == [b"goodbye"]
    assert real.closed
    assert transport.get_extra_info("peername") == ("::1", 1234)  # the rest is delegated


async def test_nothing_is_written_to_a_closing_transport() -> None:
    real = RecordingTransport()
    transport = CoalescingTransport(real, asyncio.get_running_loop())

    transport.write(b"late")
    real.closed = True
    await asyncio.sleep(0)

    assert real.writes == []


async def test_server_connections_use_the_coalescing_protocol() -> None:
    server = Server([Health()])
    protocol = server._protocol_factory()

    assert isinstance(protocol, CoalescingProtocol)
    assert isinstance(protocol.inner, H2Protocol)


@pytest.mark.parametrize("calls", [1, 32])
async def test_real_calls_through_the_coalescing_server(calls: int) -> None:
    """Concurrent calls over a real loopback connection all complete."""
    from grpclib.client import Channel

    server = Server([Health()])
    await server.start("::1", 0)
    port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    channel = Channel("::1", port)
    try:
        stub = HealthStub(channel)
        replies = await asyncio.gather(
            *(stub.Check(HealthCheckRequest(), timeout=10) for _ in range(calls))
        )
    finally:
        channel.close()
        server.close()
        await server.wait_closed()

    assert all(r.status == HealthCheckResponse.SERVING for r in replies)
