"""The drain on SIGTERM: no accepted call lost, clients moved on with the two-step GOAWAY.

Real server processes and real clients throughout (grpcio, and a raw `h2` client to see the
frames themselves), on loopback.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import h2.config
import h2.connection
import h2.events
from grpclib.const import Status
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame

from mnist_service._proto.mnist import StreamPrediction

from .conftest import MnistSplit, ServerProcess, png_bytes
from .test_census import census
from .test_message_limits import grpc_message, start_call, status_of, text_headers
from .test_workers import children
from .waiting import wait_until

GRACE_S = 10.0
WAIT_S = 20.0
UNARY_CALLS = 100
STREAMS = 5
MAX_STREAM_ID = 2**31 - 1
LOCAL = [("grpc.use_local_subchannel_pool", 1)]


def log_entries(server: ServerProcess, message: str) -> list[dict[str, Any]]:
    return [entry for entry in server.logs if entry.get("message") == message]


def wait_for_log(server: ServerProcess, message: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not log_entries(server, message):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {message!r} in the log: {server.logs}")
        time.sleep(0.02)


def test_sigterm_during_calls_and_streams_loses_nothing(
    mnist_test_set: MnistSplit, grpcio_modules: tuple[ModuleType, ...]
) -> None:
    """100 unary calls held in one batch (a long batch delay) and 5 streams sending an item
    every 50 ms: after SIGTERM every unary call is answered, every stream ends OK with the
    drain trailer after a contiguous run of correct answers, and the process exits 0 well
    within the grace period."""
    import grpc

    pb2, pb2_grpc = grpcio_modules
    images, labels = mnist_test_set
    server = ServerProcess(
        "--workers", "1", "--log-level", "info", "--grace-period", str(GRACE_S),
        "--max-batch-size", "256", "--max-batch-delay", "1000000",
    )  # fmt: skip
    stop_sending = threading.Event()

    def requests() -> Iterator[Any]:
        for index in range(1000):
            if stop_sending.is_set():
                return
            yield pb2.MnistImage(data=png_bytes(images[index % 16]))
            time.sleep(0.05)

    def stream() -> tuple[list[Any], Any, Any]:
        call = stream_stub.PredictStream(requests(), timeout=WAIT_S)
        answers = list(call)
        return answers, call.code(), dict(call.trailing_metadata() or ())

    try:
        with (
            grpc.insecure_channel(server.address) as channel,
            # A connection of their own: h2 allows 100 streams per connection.
            grpc.insecure_channel(server.address, options=LOCAL) as stream_channel,
            ThreadPoolExecutor(STREAMS) as pool,
        ):
            stub = pb2_grpc.MnistStub(channel)
            stream_stub = pb2_grpc.MnistStub(stream_channel)
            streams = [pool.submit(stream) for _ in range(STREAMS)]
            unary = [
                stub.Predict.future(pb2.MnistImage(data=png_bytes(images[i])), timeout=WAIT_S)
                for i in range(UNARY_CALLS)
            ]
            wait_until(  # all in flight: the unary calls wait for their batch
                lambda: census(server)["calls"] == UNARY_CALLS + STREAMS, "every call in flight"
            )
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = server.wait(WAIT_S)
            exited_after = time.monotonic() - signalled
            replies = [call.result() for call in unary]
            stream_results = [future.result(WAIT_S) for future in streams]
            stop_sending.set()
    finally:
        server.stop(signal.SIGKILL)

    assert code == 0, server.logs[-40:]
    assert exited_after < GRACE_S
    assert [reply.label for reply in replies] == list(labels[:UNARY_CALLS])
    for answers, status, trailers in stream_results:
        assert status == grpc.StatusCode.OK
        assert trailers.get("mnist-draining") == "true"
        assert answers, "each stream had items answered before the drain"
        assert [a.index for a in answers] == list(range(len(answers)))
        assert [a.prediction.label for a in answers] == [
            labels[i % 16] for i in range(len(answers))
        ]
    (drained,) = log_entries(server, "drained")
    assert drained["calls_finished"] >= UNARY_CALLS + STREAMS
    assert drained["calls_cut_off"] == 0
    assert log_entries(server, "draining")


class RawClient:
    """An HTTP/2 client over a socket, through h2, that keeps the GOAWAY frames it receives.

    h2 closes a connection on the first GOAWAY it sees and then refuses every other frame,
    so GOAWAY frames are taken out of what the server sends before h2 reads it.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection(("::1", port), timeout=WAIT_S)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.goaways: list[GoAwayFrame] = []
        self.pings_before_final: list[bytes] = []
        self.events: list[h2.events.Event] = []
        self._buffer = b""
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def receive(self) -> None:
        """Read once from the socket; sort the frames."""
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError(f"the server closed the connection: {self.events}")
        self._buffer += data
        passed = b""
        while len(self._buffer) >= 9:
            length = int.from_bytes(self._buffer[:3], "big")
            if len(self._buffer) < 9 + length:
                break
            raw, self._buffer = self._buffer[: 9 + length], self._buffer[9 + length :]
            frame, _ = Frame.parse_frame_header(memoryview(raw[:9]))
            if isinstance(frame, GoAwayFrame):
                frame.parse_body(memoryview(raw[9:]))
                self.goaways.append(frame)
            else:
                if raw[3] == 6 and len(self.goaways) == 1:  # a PING between the GOAWAYs
                    self.pings_before_final.append(raw[9:])
                passed += raw
        self.events += self.conn.receive_data(passed)
        self.flush()

    def receive_until(self, done: Any) -> None:
        deadline = time.monotonic() + WAIT_S
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out: {self.events} {self.goaways}")
            self.receive()

    def stream_events(self, stream_id: int) -> list[h2.events.Event]:
        return [e for e in self.events if getattr(e, "stream_id", None) == stream_id]

    def ended(self, stream_id: int) -> bool:
        return any(
            isinstance(e, h2.events.StreamEnded | h2.events.StreamReset)
            for e in self.stream_events(stream_id)
        )


def test_raw_h2_client_sees_the_two_step_goaway_and_a_late_stream_is_refused(
    mnist_test_set: MnistSplit,
) -> None:
    """The first call is held in flight by sending only half its message until both GOAWAYs
    are in; a call opened after them is refused, the first is then completed and answered."""
    images, labels = mnist_test_set
    server = ServerProcess("--workers", "1")
    message = grpc_message(png_bytes(images[0]))
    client = RawClient(server.port or 0)
    try:
        first = start_call(client.conn, client.port, "/mnist.Mnist/Predict")
        client.conn.send_data(first, message[:20])
        client.flush()
        wait_until(lambda: census(server)["calls"] == 1, "the call in flight, reading its message")
        server.process.send_signal(signal.SIGTERM)
        client.receive_until(lambda: len(client.goaways) == 2)
        late = start_call(client.conn, client.port, "/mnist.Mnist/Predict")
        client.conn.send_data(late, grpc_message(png_bytes(images[1])), end_stream=True)
        client.flush()
        client.receive_until(lambda: client.ended(late))
        client.conn.send_data(first, message[20:], end_stream=True)
        client.flush()
        client.receive_until(lambda: client.ended(first) and client.ended(late))
        code = server.wait(WAIT_S)
    finally:
        client.sock.close()
        server.stop(signal.SIGKILL)

    initial, final = client.goaways
    assert (initial.last_stream_id, initial.error_code) == (MAX_STREAM_ID, ErrorCodes.NO_ERROR)
    assert client.pings_before_final, "a PING follows the first GOAWAY"
    assert (final.last_stream_id, final.error_code) == (first, ErrorCodes.NO_ERROR)
    answer: dict[str, str] = {}
    for event in client.stream_events(first):
        if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            answer.update(text_headers(event.headers))
        if isinstance(event, h2.events.DataReceived):
            assert struct.unpack(">?I", event.data[:5])[1] == len(event.data) - 5
            assert event.data[5:7] == b"\x08" + bytes([labels[0]])  # field 1: the label
    assert status_of(answer)[0] is Status.OK
    (reset,) = [e for e in client.stream_events(late) if isinstance(e, h2.events.StreamReset)]
    assert reset.error_code == ErrorCodes.REFUSED_STREAM
    assert code == 0
    refused = [e for e in server.logs if e.get("status") == "REFUSED_STREAM"]
    assert [e["method"] for e in refused] == ["/mnist.Mnist/Predict"]
    (drained,) = log_entries(server, "drained")
    assert drained["streams_refused"] == 1


def test_a_drained_stream_is_reset_without_error_and_the_connection_lingers(
    mnist_test_set: MnistSplit,
) -> None:
    """A stream whose client is still sending when the drain ends it gets its trailers, then
    RST_STREAM NO_ERROR (stop sending); the server then ends its side of the connection
    (EOF) but still reads: a client that writes after that is not answered with a reset,
    which would make grpcio drop the answers it had not read yet."""
    images, labels = mnist_test_set
    server = ServerProcess("--workers", "1", "--grace-period", str(GRACE_S))
    client = RawClient(server.port or 0)
    try:
        stream = start_call(client.conn, client.port, "/mnist.Mnist/PredictStream")
        client.conn.send_data(stream, grpc_message(png_bytes(images[0])))  # no END_STREAM
        client.flush()
        client.receive_until(
            lambda: any(isinstance(e, h2.events.DataReceived) for e in client.stream_events(stream))
        )
        server.process.send_signal(signal.SIGTERM)
        client.receive_until(lambda: client.ended(stream) and len(client.goaways) == 2)
        client.receive_until(
            lambda: any(isinstance(e, h2.events.StreamReset) for e in client.stream_events(stream))
        )
        client.sock.settimeout(WAIT_S)
        while client.sock.recv(65536):  # up to the server's FIN: it has ended its side
            pass
        # Written after that FIN: read and dropped. Had the server closed its socket, the
        # kernel would answer the first with a reset and the second write would fail
        # (BrokenPipeError), as grpcio's did.
        for data in (b"lingered", b"still ok"):
            client.conn.ping(data)
            client.flush()
            time.sleep(0.1)  # the scenario itself: a second write well after the first
        after_fin = client.sock.recv(65536)
        client.sock.close()
        code = server.wait(WAIT_S)
    finally:
        client.sock.close()
        server.stop(signal.SIGKILL)

    kinds = [type(e) for e in client.stream_events(stream)]
    assert kinds[-3:] == [h2.events.TrailersReceived, h2.events.StreamEnded, h2.events.StreamReset]
    (trailers,) = [e for e in client.events if isinstance(e, h2.events.TrailersReceived)]
    received = text_headers(trailers.headers)
    assert status_of(received)[0] is Status.OK
    assert received["mnist-draining"] == "true"
    (reset,) = [e for e in client.stream_events(stream) if isinstance(e, h2.events.StreamReset)]
    assert reset.error_code == ErrorCodes.NO_ERROR
    (answer,) = [e for e in client.stream_events(stream) if isinstance(e, h2.events.DataReceived)]
    item = StreamPrediction.parse(answer.data[5:])
    assert (item.index, item.prediction and item.prediction.label) == (0, labels[0])
    assert after_fin == b"", "nothing is sent after the server ended its side"
    assert code == 0


def test_a_draining_worker_hands_its_client_to_the_other_with_no_failed_call(
    mnist_test_set: MnistSplit, grpcio_modules: tuple[ModuleType, ...]
) -> None:
    """`--workers 2`: the worker serving a grpcio channel is sent SIGTERM while four threads
    call continuously; the channel moves to the other worker and not one call fails."""
    import grpc

    pb2, pb2_grpc = grpcio_modules
    images, labels = mnist_test_set
    server = ServerProcess("--workers", "2")
    failures: list[BaseException] = []
    answered: list[tuple[int, int]] = []
    stop = threading.Event()

    def call_continuously(stub: Any, offset: int) -> None:
        index = offset
        while not stop.is_set():
            try:
                reply = stub.Predict(pb2.MnistImage(data=png_bytes(images[index])), timeout=10)
                answered.append((reply.label, int(labels[index])))
            except grpc.RpcError as exc:
                failures.append(exc)
            index = (index + 1) % 16  # images the model gets right

    try:
        workers = children(server.process.pid)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb2_grpc.MnistStub(channel)
            stub.Predict(pb2.MnistImage(data=png_bytes(images[0])), timeout=10)
            deadline = time.monotonic() + WAIT_S  # the call's log line follows its answer
            while not (oks := {e["pid"] for e in server.logs if e.get("status") == "OK"}):
                assert time.monotonic() < deadline, "the call was not logged"
                time.sleep(0.02)
            (serving,) = oks
            threads = [
                threading.Thread(target=call_continuously, args=(stub, 4 * n)) for n in range(4)
            ]
            for thread in threads:
                thread.start()
            wait_until(lambda: len(answered) >= 20, "calls flowing from the four threads")
            before = len(answered)
            drain_started = len(server.logs)
            signal_sent = time.monotonic()
            os.kill(serving, signal.SIGTERM)
            while time.monotonic() - signal_sent < WAIT_S and not any(
                e.get("message") == "drained" for e in server.logs[drain_started:]
            ):
                time.sleep(0.05)
            drained_at = len(answered)
            wait_until(  # calls go on, on the other worker
                lambda: len(answered) >= drained_at + 20, "calls answered after the drain"
            )
            stop.set()
            for thread in threads:
                thread.join(WAIT_S)
        after_drain = {e["pid"] for e in server.logs[drain_started:] if e.get("status") == "OK"}
    finally:
        assert server.stop() == 0

    assert failures == []
    assert len(answered) > before
    assert all(label == expected for label, expected in answered)
    assert serving in workers
    assert after_drain - {serving}, "calls went on on the other worker"
    drained = [e for e in server.logs if e.get("message") == "drained" and e["pid"] == serving]
    assert drained
    assert drained[0]["calls_cut_off"] == 0
