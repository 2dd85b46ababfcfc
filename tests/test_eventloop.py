"""The busy-polling event loop: it sees events as a plain loop does, and it never spins idle."""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from mnist_service.runtime.eventloop import BusyPollSelector, loop_factory

WINDOW_S = 200e-6


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_select_returns_events_that_arrive_while_waiting(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    with BusyPollSelector(WINDOW_S) as selector:
        selector.register(reader, selectors.EVENT_READ, "reader")
        for _ in range(3):  # the first wait sleeps, later ones poll first (recent waits short)
            threading.Timer(0.005, writer.send, args=(b"x",)).start()
            ready = selector.select(timeout=5)
            assert [key.data for key, _ in ready] == ["reader"]
            assert reader.recv(16) == b"x"


def test_select_with_nothing_to_do_times_out_empty(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, _ = pair
    with BusyPollSelector(WINDOW_S) as selector:
        selector.register(reader, selectors.EVENT_READ)
        assert selector.select(timeout=0) == []
        assert selector.select(timeout=0.01) == []


def test_an_idle_loop_sleeps_instead_of_polling(pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    with BusyPollSelector(WINDOW_S) as selector:
        selector.register(reader, selectors.EVENT_READ)
        writer.send(b"x")
        assert selector.select(timeout=1)  # a short wait: the next one polls first
        reader.recv(16)
        # Nothing arrives: at most one window of polling, then a real sleep. A selector that
        # kept polling would burn the whole half second of CPU.
        cpu = time.process_time()
        assert selector.select(timeout=0.5) == []
        assert time.process_time() - cpu < 0.1
        # That long wait switched polling off: the next idle wait sleeps straight away.
        cpu = time.process_time()
        assert selector.select(timeout=0.5) == []
        assert time.process_time() - cpu < 0.1


def test_loop_factory_polls_only_when_asked() -> None:
    plain = loop_factory(0)()
    polling = loop_factory(200)()
    try:
        assert not isinstance(getattr(plain, "_selector", None), BusyPollSelector)
        assert isinstance(polling._selector, BusyPollSelector)  # type: ignore[attr-defined]
        # And it runs coroutines, timers and socket I/O like any loop.
        assert polling.run_until_complete(_echo_once()) == b"ping"
    finally:
        plain.close()
        polling.close()


async def _echo_once() -> bytes:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(16))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        data = await reader.read(16)
        writer.close()
        await writer.wait_closed()
    return data
