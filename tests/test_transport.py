"""The transport over grpclib's HTTP/2 layer: write coalescing, the server and its handler,
the one call runner (`transport.runner`), the drain.

The private names of grpclib and h2 this relies on are checked in tests/test_compat.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpclib
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.service import Health
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.protocol import H2Protocol

from mnist_service import _compat
from mnist_service._proto.mnist import (
    MnistBase,
    MnistImage,
    MnistPrediction,
    MnistStub,
    ModelInfo,
    ModelInfoRequest,
    PredictBatchRequest,
    StreamPrediction,
)
from mnist_service.calls import Call, ignore
from mnist_service.transport.coalescing import CoalescingTransport
from mnist_service.transport.runner import methods
from mnist_service.transport.server import CoalescingProtocol, Handler, Server


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


async def test_end_sends_what_is_buffered_and_drops_later_writes() -> None:
    """Our side of the connection ends after `end` (a FIN follows): a late write, which the
    socket's transport would refuse after its FIN, is dropped."""
    real = RecordingTransport()
    transport = CoalescingTransport(real, asyncio.get_running_loop())

    transport.write(b"trailers")
    transport.end()
    transport.write(b"a late frame")
    await asyncio.sleep(0)

    assert real.writes == [b"trailers"]
    assert transport.raw is real
    assert not real.closed  # ending is the caller's to do


async def test_nothing_is_written_to_a_closing_transport() -> None:
    real = RecordingTransport()
    transport = CoalescingTransport(real, asyncio.get_running_loop())

    transport.write(b"late")
    real.closed = True
    await asyncio.sleep(0)

    assert real.writes == []


async def test_a_last_flush_sends_at_once_when_nothing_else_is_queued() -> None:
    real = RecordingTransport()
    transport = CoalescingTransport(real, asyncio.get_running_loop())

    transport.write(b"headers")
    transport.write(b"trailers")
    transport.flush_if_last()  # only its own flush is queued: nothing could join the write

    assert real.writes == [b"headerstrailers"]
    await asyncio.sleep(0)  # the queued flush finds nothing left
    assert real.writes == [b"headerstrailers"]


async def test_a_last_flush_waits_for_the_turn_when_other_work_is_queued() -> None:
    real = RecordingTransport()
    loop = asyncio.get_running_loop()
    transport = CoalescingTransport(real, loop)

    loop.call_soon(transport.write, b"theirs")  # another call, queued to answer this turn
    transport.write(b"mine")
    transport.flush_if_last()

    assert real.writes == []
    await asyncio.sleep(0)
    assert real.writes == [b"minetheirs"]


async def test_concurrent_unary_calls_share_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A unary answer (headers, data, trailers) is one write to the transport, and the
    answers of one loop turn leave in one socket write."""
    flushed: list[int] = []  # buffered pieces per socket write
    flush = CoalescingTransport.flush

    def counting_flush(self: CoalescingTransport) -> None:
        if self._buffer:
            flushed.append(len(self._buffer))
        flush(self)

    monkeypatch.setattr(CoalescingTransport, "flush", counting_flush)
    async with serving(Service()) as stub:
        await stub.predict(MnistImage(data=b"warm up"))
        flushed.clear()
        replies = await asyncio.gather(*(stub.predict(MnistImage(data=b"x")) for _ in range(32)))

    assert all(reply.label == 1 for reply in replies)
    assert sum(flushed) >= 32  # an answer each (and the client's window updates)
    assert sum(flushed) < 2 * 32  # each answer in one piece, not three
    assert len(flushed) <= 8  # 32 answers, a few writes: the early flush did not split them


async def test_server_connections_use_the_coalescing_protocol() -> None:
    server = Server([Health()])
    protocol = server.protocol()

    assert isinstance(protocol, CoalescingProtocol)
    assert isinstance(protocol.inner, H2Protocol)
    assert isinstance(protocol.inner.handler, Handler)


class GoneTransport(RecordingTransport):
    """A socket's transport whose peer has just reset the connection: `connection_lost` is
    still to come, and ending our side fails as `socket.shutdown` does then."""

    def __init__(self, protocol: CoalescingProtocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.aborted = False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        raise OSError(107, "Transport endpoint is not connected")

    def abort(self) -> None:
        self.aborted = True
        asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)


async def test_closing_a_connection_the_client_just_reset_is_not_an_error() -> None:
    """The drain closes every connection at once; one whose client reset it a moment before
    is aborted instead of failing the drain (which exited 1)."""
    protocol = Server([Health()]).protocol()
    assert isinstance(protocol, CoalescingProtocol)
    transport = GoneTransport(protocol)
    protocol.connection_made(transport)

    await asyncio.wait_for(protocol.close(), 5)

    assert transport.aborted
    assert protocol.lost.is_set()


@pytest.mark.parametrize("calls", [1, 32])
async def test_real_calls_through_the_coalescing_server(calls: int) -> None:
    """Concurrent calls over a real loopback connection all complete."""
    server = Server([Health()])
    await server.start("::1", 0)
    port = server.port
    channel = Channel("::1", port)
    try:
        stub = HealthStub(channel)
        replies = await asyncio.gather(
            *(stub.Check(HealthCheckRequest(), timeout=10) for _ in range(calls))
        )
    finally:
        channel.close()
        await server.close()

    assert all(r.status == HealthCheckResponse.SERVING for r in replies)


# -- the one call runner (transport.runner) -----------------------------------------------------


class Service(MnistBase):
    """Predict answers label 1, or fails on cue; records its cancellation."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def predict(self, message: MnistImage) -> MnistPrediction:
        if message.data == b"slow":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if message.data == b"refuse":
            raise GRPCError(Status.INVALID_ARGUMENT, "no thanks: ünïcode and 100%")
        if message.data == b"bug":
            raise RuntimeError("a bug")
        return MnistPrediction(label=1, probabilities=[0.5, 0.5])

    async def get_model_info(self, message: ModelInfoRequest) -> ModelInfo:
        return ModelInfo(architecture="conv")

    async def predict_stream(
        self, messages: AsyncIterator[MnistImage]
    ) -> AsyncIterator[StreamPrediction]:
        index = 0
        async for _ in messages:
            yield StreamPrediction(index=index, prediction=MnistPrediction(label=1))
            index += 1


@contextlib.asynccontextmanager
async def serving(
    service: MnistBase, *, observed: list[Call] | None = None
) -> AsyncIterator[MnistStub]:
    server = Server([service], observer=observed.append if observed is not None else ignore)
    await server.start("::1", 0)
    port = server.port
    channel = Channel("::1", port)
    try:
        yield MnistStub(channel)
    finally:
        channel.close()
        await server.close()


def test_methods_are_found_with_their_message_functions() -> None:
    """Every method of every service is served; a unary method of a betterproto2 service is
    called with its message (found by its Python name), every other through a stream."""
    service = Service()
    found = methods([service, Health()])

    assert set(found) == {
        "/mnist.Mnist/Predict",
        "/mnist.Mnist/PredictBatch",
        "/mnist.Mnist/PredictStream",
        "/mnist.Mnist/GetModelInfo",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
    }
    assert found["/mnist.Mnist/Predict"].unary == service.predict
    assert found["/mnist.Mnist/PredictBatch"].request_type is PredictBatchRequest
    assert found["/mnist.Mnist/PredictStream"].unary is None  # bidi: through a stream
    assert found["/grpc.health.v1.Health/Check"].unary is None  # grpclib's: through a stream


async def test_lean_path_answers_with_and_without_a_deadline() -> None:
    async with serving(Service()) as stub:
        plain = await stub.predict(MnistImage(data=b"x"))
        timed = await stub.predict(MnistImage(data=b"x"), timeout=10)
        info = await stub.get_model_info(ModelInfoRequest(), timeout=10)

    assert plain.label == timed.label == 1
    assert info.architecture == "conv"


async def test_every_kind_of_call_is_recorded_by_the_one_runner() -> None:
    """A unary call, a bidi stream and grpclib's own health check (a handler written against
    grpclib's stream) all end with a call record: method, status, request id."""
    observed: list[Call] = []
    health = Health()
    server = Server([Service(), health], observer=observed.append)
    await server.start("::1", 0)
    channel = Channel("::1", server.port)
    try:
        stub = MnistStub(channel)
        await stub.predict(MnistImage(data=b"x"))
        with pytest.raises(GRPCError):
            await stub.predict(MnistImage(data=b"refuse"))
        answers = [a async for a in stub.predict_stream([MnistImage(data=b"x")] * 2)]
        checked = await HealthStub(channel).Check(HealthCheckRequest())
        with pytest.raises(GRPCError) as unknown:
            await HealthStub(channel).Check(HealthCheckRequest(service="nope"))
    finally:
        channel.close()
        await server.close()

    assert [a.index for a in answers] == [0, 1]
    assert checked.status == HealthCheckResponse.SERVING
    assert unknown.value.status is Status.NOT_FOUND
    assert [(c.method, c.status) for c in observed] == [
        ("/mnist.Mnist/Predict", Status.OK),
        ("/mnist.Mnist/Predict", Status.INVALID_ARGUMENT),
        ("/mnist.Mnist/PredictStream", Status.OK),
        ("/grpc.health.v1.Health/Check", Status.OK),
        ("/grpc.health.v1.Health/Check", Status.NOT_FOUND),
    ]
    assert all(c.request_id for c in observed)


async def test_lean_path_sends_grpc_errors_as_trailers() -> None:
    async with serving(Service()) as stub:
        with pytest.raises(GRPCError) as refused:
            await stub.predict(MnistImage(data=b"refuse"))
        with pytest.raises(GRPCError) as bug:
            await stub.predict(MnistImage(data=b"bug"))
        after = await stub.predict(MnistImage(data=b"x"))

    assert refused.value.status is Status.INVALID_ARGUMENT
    assert refused.value.message == "no thanks: ünïcode and 100%"
    assert bug.value.status is Status.UNKNOWN
    assert after.label == 1


async def test_lean_path_deadline_cancels_the_handler() -> None:
    """The server stops working on a call whose grpc-timeout passed (grpclib's client gives
    up at the same moment, with its own TimeoutError)."""
    service = Service()
    async with serving(service) as stub:
        with pytest.raises(TimeoutError):
            await stub.predict(MnistImage(data=b"slow"), timeout=0.2)
        await asyncio.wait_for(service.cancelled.wait(), 5)
        after = await stub.predict(MnistImage(data=b"x"))

    assert after.label == 1


async def test_a_client_cancel_cancels_the_handler() -> None:
    service = Service()
    async with serving(service) as stub:
        call = asyncio.ensure_future(stub.predict(MnistImage(data=b"slow")))
        await asyncio.sleep(0.2)
        call.cancel()
        await asyncio.wait_for(service.cancelled.wait(), 5)
        after = await stub.predict(MnistImage(data=b"x"))

    assert after.label == 1


# -- the drain (transport.drain, Server.goaway) and the GOAWAY-tolerant Channel ----------------


class HeldService(MnistBase):
    """Predict waits until released, so a call stays in flight across a GOAWAY."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()

    async def predict(self, message: MnistImage) -> MnistPrediction:
        self.entered.set()
        await self.release.wait()
        return MnistPrediction(label=1, probabilities=[0.5, 0.5])


async def test_calls_survive_a_graceful_goaway_and_late_streams_are_refused() -> None:
    """Server.goaway on a real connection: the held call is still answered over it, the
    client's next call opens a new connection, and the old one closes when its call ends."""
    from mnist_service.transport.channel import Channel as DrainChannel

    service = HeldService()
    refused: list[str] = []
    server = Server([service], on_refused=lambda method, peer: refused.append(method))
    await server.start("::1", 0)
    port = server.port
    channel = DrainChannel("::1", port)
    try:
        stub = MnistStub(channel)
        held = asyncio.ensure_future(stub.predict(MnistImage(data=b"x"), timeout=10))
        await asyncio.wait_for(service.entered.wait(), 5)
        first_connection = _compat.current_protocol(channel)
        server.stop_accepting()
        await asyncio.wait_for(server.goaway(ping_timeout=5), 5)  # returns on the PING ack
        assert len(server.calls()) == 1
        service.release.set()
        reply = await asyncio.wait_for(held, 5)
        with pytest.raises(ConnectionRefusedError):  # not listening any more
            await stub.predict(MnistImage(data=b"x"), timeout=5)
    finally:
        channel.close()
        await server.close_connections()

    assert reply.label == 1
    assert first_connection is not None
    assert first_connection.handler.connection_lost  # type: ignore[attr-defined]  # retired, closed
    assert server.connections == 0
    assert refused == []


async def test_stream_reads_end_a_waiting_read_and_every_later_one() -> None:
    from mnist_service.transport.drain import StreamReads

    reads = StreamReads()
    never = asyncio.Event()

    async def wait_forever() -> bytes:
        await never.wait()
        return b"never"

    async def ready() -> bytes:
        return b"message"

    assert await reads.read(ready) == b"message"
    waiting = asyncio.ensure_future(reads.read(wait_forever))
    await asyncio.sleep(0)
    reads.stop()

    assert await asyncio.wait_for(waiting, 5) is None
    assert await reads.read(ready) is None


async def test_a_read_cancelled_by_someone_else_stays_cancelled() -> None:
    from mnist_service.transport.drain import StreamReads

    reads = StreamReads()
    never = asyncio.Event()

    async def wait_forever() -> None:
        await never.wait()

    waiting = asyncio.ensure_future(reads.read(wait_forever))
    await asyncio.sleep(0)
    waiting.cancel()  # a client's cancel, not the drain
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_a_failing_observer_is_logged_and_the_call_still_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The request log and the metrics are observers (`calls.observe`, shared by the gRPC and
    HTTP call runners): one that raises is logged, and the client still gets its answer."""

    def failing(call: Call) -> None:
        raise RuntimeError("observer broke")

    server = Server([Service()], observer=failing)
    await server.start("::1", 0)
    channel = Channel("::1", server.port)
    try:
        with caplog.at_level(logging.ERROR, logger="mnist_service.calls"):
            reply = await MnistStub(channel).predict(MnistImage(data=b"x"))
    finally:
        channel.close()
        await server.close()

    assert reply.label == 1
    failure = next(r for r in caplog.records if r.getMessage() == "call observer failed")
    assert failure.exc_info is not None
    assert "observer broke" in str(failure.exc_info[1])
