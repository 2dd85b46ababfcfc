"""Memory stays bounded under hostile sizes: the server's RSS, measured with psutil.

Each case runs against a real server process while a thread samples its resident set size;
the peak during the case may exceed the level before it by less than 50 MB. Without the
prefix check, the connection budget, the bounded gzip inflate and the header-only pixel
check, each of these would cost hundreds of megabytes (a 1 GiB announcement was measured at
+290 MB on grpclib alone).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import psutil
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from mnist_service.client import MnistClient

from .conftest import MnistSplit, ServerProcess
from .test_hostile_inputs import chunks, gzip_bomb, png_bomb
from .test_message_limits import GIB, frame, image_message, record_statuses, start_call

MB = 1 << 20
BOUND = 50 * MB
SEND_S = 5.0


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = ServerProcess("--workers", "1", "--log-level", "info")
    yield process
    assert process.stop() == 0


class PeakRss:
    """Samples a process's RSS every few milliseconds while in the `with` block."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.before = self.peak = self.process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)  # what the server does right after the client stops
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.before


def push(port: int, streams: list[tuple[str, bytes, list[tuple[str, str]]]]) -> dict[int, Status]:
    """Open one call per (method, bytes, extra headers) on one connection and push each body
    as fast as flow control lets, for at most SEND_S; the grpc-status each call ended with."""
    with socket.create_connection(("::1", port), timeout=1) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        pending: dict[int, list[bytes]] = {}
        for method, body, extra in streams:
            stream_id = start_call(conn, port, method, tuple(extra))
            pending[stream_id] = chunks(body)
        statuses: dict[int, Status] = {}
        end = time.monotonic() + SEND_S
        while time.monotonic() < end and len(statuses) < len(pending):
            for stream_id, queue in pending.items():
                while queue and stream_id not in statuses:
                    window = min(
                        conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size
                    )
                    if window < len(queue[0]):
                        break
                    try:
                        conn.send_data(stream_id, queue.pop(0), end_stream=not queue)
                    except h2.exceptions.StreamClosedError:
                        queue.clear()
            sock.sendall(conn.data_to_send())
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not data:
                break
            record_statuses(conn, data, statuses)
            sock.sendall(conn.data_to_send())
        return statuses


PREDICT = "/mnist.Mnist/Predict"


def announced_gigabyte() -> list[tuple[str, bytes, list[tuple[str, str]]]]:
    """A prefix announcing 1 GiB, then 100 MB of body pushed behind it."""
    body = b"\x00" * (100 * MB)
    return [(PREDICT, b"\x00" + GIB.to_bytes(4, "big") + body, [])]


def hundred_megabytes_in_messages() -> list[tuple[str, bytes, list[tuple[str, str]]]]:
    """25 calls on one connection, each sending a whole 4 MB message (just under the limit):
    100 MB sent at once."""
    message = frame(image_message(b"\x00" * (4 * MB - 64)))
    return [(PREDICT, message, []) for _ in range(25)]


def png_bombs() -> list[tuple[str, bytes, list[tuple[str, str]]]]:
    """Ten 20000×20000 PNGs (50 MB of pixels each, 50 kB on the wire)."""
    return [(PREDICT, frame(image_message(png_bomb())), []) for _ in range(10)]


def gzip_bombs() -> list[tuple[str, bytes, list[tuple[str, str]]]]:
    """30 gzip messages that would inflate to 50 MiB each (the server stops at 4 MiB: before a
    reference cycle was broken in `codec._refuse`, each one refused kept its 4 MiB until the
    next garbage collection, +130 MB here)."""
    bomb = gzip_bomb()
    return [(PREDICT, frame(bomb, compressed=True), [("grpc-encoding", "gzip")]) for _ in range(30)]


CASES: dict[
    str, tuple[Callable[[], list[tuple[str, bytes, list[tuple[str, str]]]]], set[Status]]
] = {
    "announced-1-GiB-then-100-MB": (announced_gigabyte, {Status.RESOURCE_EXHAUSTED}),
    "100-MB-of-4-MB-messages": (
        hundred_megabytes_in_messages,
        {
            Status.RESOURCE_EXHAUSTED,
            Status.INVALID_ARGUMENT,
        },  # over the connection budget / not an image
    ),
    "png-decompression-bombs": (png_bombs, {Status.INVALID_ARGUMENT}),
    "gzip-bombs": (gzip_bombs, {Status.RESOURCE_EXHAUSTED}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_sizes_leave_rss_bounded(
    server: ServerProcess, mnist_test_set: MnistSplit, case: str
) -> None:
    build, expected = CASES[case]
    streams = build()
    assert server.port is not None

    with PeakRss(server.process.pid) as rss:
        statuses = push(server.port, streams)

    assert len(statuses) == len(streams), statuses
    assert set(statuses.values()) <= expected
    assert rss.growth < BOUND, f"RSS grew {rss.growth / MB:.0f} MB"


async def test_a_worker_turns_away_connections_past_its_limit(
    mnist_test_set: MnistSplit,
) -> None:
    images, _ = mnist_test_set
    data = images[0].tobytes()
    limited = ServerProcess("--workers", "1", "--log-level", "info", "--max-connections", "2")
    try:
        assert limited.port is not None
        async with MnistClient(limited.address) as first, MnistClient(limited.address) as second:
            await first.predict(data)
            await second.predict(data)

            # A third connection: the server's preface, then GOAWAY ENHANCE_YOUR_CALM, then EOF.
            events = await asyncio.to_thread(_third_connection, limited.port)
            goaways = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
            assert goaways
            assert goaways[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
            assert b"too many connections" in (goaways[0].additional_data or b"")

            # The two connections it keeps are unharmed.
            assert (await first.predict(data)).label == (await second.predict(data)).label

        # Once the server has seen them go (its side closes a moment after the client's), a
        # new client gets in.
        assert await _eventually_served(limited.address, data)
    finally:
        assert limited.stop() == 0
    assert not [e for e in limited.logs if e.get("level") in ("warning", "error")]


async def _eventually_served(address: str, data: bytes) -> bool:
    deadline = time.monotonic() + 10
    while True:
        try:
            async with MnistClient(address, timeout=5) as client:
                return (await client.predict(data)).label >= 0
        except (OSError, GRPCError, StreamTerminatedError):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)


def _third_connection(port: int) -> list[h2.events.Event]:
    with socket.create_connection(("::1", port), timeout=5) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        events: list[h2.events.Event] = []
        while data := sock.recv(65536):
            events += conn.receive_data(data)
        return events
