"""Deadlines and cancellation through a real in-process server (the shipped ConvNet, counted).

A call whose deadline passes while it waits is answered DEADLINE_EXCEEDED without reaching
the model; a client's cancel frees everything the call held; both are recorded as what they
are (DEADLINE_EXCEEDED, CANCELLED), never as server faults.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from mnist_service._proto.mnist import MnistImage, MnistStub, StreamPrediction
from mnist_service.config import ServerConfig
from mnist_service.engine.inference import FloatArray, ModelInfo, OnnxClassifier
from mnist_service.runtime.server import MnistServer

from .conftest import MnistSplit, png_bytes
from .test_message_limits import WAIT_S, grpc_message, record_statuses, start_call

WEIGHTS_CONFIG = ServerConfig(port=0, workers=1, http_port=0)  # both on free ports


@dataclass
class CountingClassifier:
    """The real classifier, counting the images it is asked to classify."""

    inner: OnnxClassifier
    images: int = 0

    @property
    def info(self) -> ModelInfo:
        return self.inner.info

    def classify(self, batch: FloatArray) -> FloatArray:
        self.images += len(batch)
        return self.inner.classify(batch)


@pytest.fixture(scope="module")
def onnx_classifier() -> OnnxClassifier:
    return OnnxClassifier.load(WEIGHTS_CONFIG.weights_path, architecture="conv")


@pytest.fixture
async def served(
    onnx_classifier: OnnxClassifier, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[tuple[MnistServer, CountingClassifier, Channel]]:
    caplog.set_level(logging.DEBUG, logger="mnist_service.requests")
    classifier = CountingClassifier(onnx_classifier)
    with ThreadPoolExecutor(1) as executor:
        app = MnistServer(WEIGHTS_CONFIG, classifier, executor)
        await app.start(announce=False)
        assert app.port is not None
        channel = Channel("::1", app.port)
        try:
            yield app, classifier, channel
        finally:
            channel.close()
            await app.stop(grace_period=5)


def logged_statuses(caplog: pytest.LogCaptureFixture, method: str) -> Counter[str]:
    return Counter(
        record.fields["status"]  # type: ignore[attr-defined]
        for record in caplog.records
        if record.name == "mnist_service.requests" and record.fields["method"] == method  # type: ignore[attr-defined]
    )


async def call_status(stub: MnistStub, data: bytes, timeout: float | None) -> Status:
    try:
        await stub.predict(MnistImage(data=data), timeout=timeout)
    except GRPCError as exc:
        return exc.status
    except TimeoutError:
        return Status.DEADLINE_EXCEEDED  # grpclib's client raises this when its timer fires
    return Status.OK


def burst(port: int, bodies: list[bytes], timeouts: list[str | None]) -> list[Status]:
    """One raw HTTP/2 connection, one Predict call per body sent all at once, with the given
    `grpc-timeout` headers; the client never cancels, so what comes back is the server's own
    doing. The status of each call, in order."""
    with socket.create_connection(("::1", port), timeout=WAIT_S) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        ids = []
        for body, timeout in zip(bodies, timeouts, strict=True):
            extra = (("grpc-timeout", timeout),) if timeout is not None else ()
            stream_id = start_call(conn, port, "/mnist.Mnist/Predict", extra)
            conn.send_data(stream_id, grpc_message(body), end_stream=True)
            ids.append(stream_id)
        sock.sendall(conn.data_to_send())
        statuses: dict[int, Status] = {}
        deadline = time.monotonic() + WAIT_S
        while len(statuses) < len(ids) and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            record_statuses(conn, data, statuses)
            sock.sendall(conn.data_to_send())
        return [statuses.get(i, Status.UNKNOWN) for i in ids]


async def test_calls_that_expire_waiting_are_answered_without_inference(
    served: tuple[MnistServer, CountingClassifier, Channel],
    mnist_test_set: MnistSplit,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, classifier, _ = served
    images, _ = mnist_test_set
    bodies = [png_bytes(images[i]) for i in range(100)]
    classifier.images = 0

    # 100 calls in one burst: the first 50 without a deadline, the last 50 with 1 ms. The
    # server works through the burst in order, and preprocessing 50 PNGs alone takes longer
    # than 1 ms, so the short calls expire while they wait for their turn.
    timeouts = [None] * 50 + ["1m"] * 50
    assert app.port is not None
    statuses = await asyncio.to_thread(burst, app.port, bodies, timeouts)

    assert statuses[:50] == [Status.OK] * 50
    assert set(statuses[50:]) <= {Status.OK, Status.DEADLINE_EXCEEDED}
    assert statuses.count(Status.DEADLINE_EXCEEDED) > 25
    # Only the calls answered OK reached the model.
    assert classifier.images == statuses.count(Status.OK)
    # The server's record agrees, and an expired deadline is nobody's fault.
    logged = logged_statuses(caplog, "/mnist.Mnist/Predict")
    assert logged == Counter(status.name for status in statuses)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_client_deadlines_under_load_never_look_like_faults(
    served: tuple[MnistServer, CountingClassifier, Channel],
    mnist_test_set: MnistSplit,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, classifier, channel = served
    images, _ = mnist_test_set
    stub = MnistStub(channel)
    data = [png_bytes(images[i]) for i in range(50)]

    # A real client that enforces its 1 ms deadlines itself (it resets the stream when its
    # timer fires): the server sees some expire and some cancelled, and says so.
    timeouts = [0.001 if i % 2 else 30.0 for i in range(300)]
    statuses = await asyncio.gather(
        *(call_status(stub, data[i % 50], t) for i, t in enumerate(timeouts))
    )

    assert [s for s, t in zip(statuses, timeouts, strict=True) if t > 1] == [Status.OK] * 150
    assert set(statuses) <= {Status.OK, Status.DEADLINE_EXCEEDED}
    await asyncio.sleep(0.1)  # the server's side of the reset calls
    logged = logged_statuses(caplog, "/mnist.Mnist/Predict")
    assert set(logged) <= {"OK", "DEADLINE_EXCEEDED", "CANCELLED"}
    assert logged["OK"] == statuses.count(Status.OK)
    assert classifier.images <= logged["OK"] + logged["CANCELLED"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_client_cancels_leave_nothing_behind(
    served: tuple[MnistServer, CountingClassifier, Channel],
    mnist_test_set: MnistSplit,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _, channel = served
    images, _ = mnist_test_set
    stub = MnistStub(channel)
    data = [png_bytes(images[i]) for i in range(50)]
    await call_status(stub, data[0], None)
    baseline_tasks = len(asyncio.all_tasks())

    async def cancelled_stream(index: int) -> None:
        async with channel.request(
            "/mnist.Mnist/PredictStream", Cardinality.STREAM_STREAM, MnistImage, StreamPrediction
        ) as stream:
            for i in range(5):
                await stream.send_message(MnistImage(data=data[(index + i) % 50]))
            await stream.recv_message()
            raise asyncio.CancelledError  # leave mid-stream: the context manager resets it

    # 1,000 unary calls, each cancelled by the client a moment after it is sent.
    for round_ in range(10):
        calls = [asyncio.ensure_future(stub.predict(MnistImage(data=d))) for d in data * 2]
        streams = [asyncio.ensure_future(cancelled_stream(round_ * 5 + i)) for i in range(5)]
        await asyncio.sleep(0.002 * (round_ % 4))  # cancel at different stages
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, *streams, return_exceptions=True)

    def open_streams() -> int:  # grpclib's registry of a connection's streams
        return sum(len(c.inner.processor.streams) for c in app.server._connections)

    async def settled() -> bool:
        for _ in range(100):
            if (
                len(asyncio.all_tasks()) <= baseline_tasks
                and app.pipeline.pending == 0
                and open_streams() == 0
            ):
                return True
            await asyncio.sleep(0.05)
        return False

    assert await settled(), [t.get_coro() for t in asyncio.all_tasks()]
    logged = logged_statuses(caplog, "/mnist.Mnist/Predict")
    assert set(logged) <= {"OK", "CANCELLED"}
    assert logged["CANCELLED"] > 0
    assert set(logged_statuses(caplog, "/mnist.Mnist/PredictStream")) <= {"CANCELLED", "OK"}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # And the server still answers.
    assert await call_status(stub, data[1], 10) is Status.OK


@pytest.mark.parametrize("method", ["/mnist.Mnist/Predict", "/mnist.Mnist/PredictStream"])
async def test_a_malformed_grpc_timeout_is_invalid_argument_on_both_paths(
    served: tuple[MnistServer, CountingClassifier, Channel], method: str
) -> None:
    app, classifier, _ = served
    assert app.port is not None

    def call() -> dict[bytes, bytes]:
        with socket.create_connection(("::1", app.port), timeout=WAIT_S) as sock:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(
                stream_id,
                [(":method", "POST"), (":scheme", "http"), (":authority", "x"),
                 (":path", method), ("content-type", "application/grpc"), ("te", "trailers"),
                 ("grpc-timeout", "soon")],
            )  # fmt: skip
            conn.send_data(stream_id, grpc_message(b"\x00" * 784), end_stream=True)
            sock.sendall(conn.data_to_send())
            answer: dict[bytes, bytes] = {}
            while b"grpc-status" not in answer:
                data = sock.recv(65536)
                assert data, "the server closed the connection without an answer"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                        answer.update(dict(event.headers))
            return answer

    answer = await asyncio.to_thread(call)

    assert Status(int(answer[b"grpc-status"])) is Status.INVALID_ARGUMENT
    assert answer[b"grpc-message"] == b"the grpc-timeout header is malformed"
    assert classifier.images == 0
