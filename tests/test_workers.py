"""`--workers N`: N server processes share the port under one supervisor.

Real processes throughout: both workers serve, a killed worker is replaced, SIGTERM drains
every worker and exits 0 with in-flight calls answered, and the port checks still hold.
"""

from __future__ import annotations

import asyncio
import os
import signal
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from mnist_service.client import MnistClient, Prediction

from .conftest import MnistSplit, ServerProcess, png_bytes
from .test_end_to_end import serve_and_fail
from .waiting import eventually, wait_until, within

WAIT_S = 20.0
HOLD_US = "2000000"
"""A batch delay (--max-batch-delay) that holds calls in flight, waiting for their batch, for
far longer than a test takes to see them there and signal the server."""


def children(pid: int) -> set[int]:
    """The live child processes of `pid` (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


async def call_many(address: str, payload: bytes, connections: int, calls: int) -> list[object]:
    """`calls` Predict calls on each of `connections` separate connections, concurrently."""
    clients = [MnistClient(address, timeout=30) for _ in range(connections)]
    try:
        return await asyncio.gather(
            *(c.predict(payload) for c in clients for _ in range(calls)), return_exceptions=True
        )
    finally:
        for client in clients:
            client.close()


def census(server: ServerProcess, pid: int, after: int) -> dict[str, Any] | None:
    """Worker `pid`'s first memory census among the log entries from index `after` on."""
    return next(
        (
            entry
            for entry in server.logs[after:]
            if entry.get("message") == "memory census" and entry.get("pid") == pid
        ),
        None,
    )


async def calls_held(server: ServerProcess, workers: set[int]) -> int:
    """The calls the workers hold now, from a fresh memory census of each (SIGUSR2)."""
    held = 0
    for pid in workers:
        after = len(server.logs)
        os.kill(pid, signal.SIGUSR2)
        entry = await eventually(partial(census, server, pid, after), f"worker {pid}'s census")
        held += int(entry["calls"])
    return held


async def until_held(server: ServerProcess, workers: set[int], calls: int) -> None:
    """Wait until the workers hold `calls` calls between them."""

    async def all_held() -> bool:
        return await calls_held(server, workers) == calls

    await eventually(all_held, f"the workers to hold {calls} calls")


def logged(server: ServerProcess, message: str) -> list[dict[str, Any]]:
    """The log entries with this message."""
    return [entry for entry in server.logs if entry.get("message") == message]


def worker_pids_in_request_log(server: ServerProcess) -> set[int]:
    return {
        int(entry["pid"])
        for entry in server.logs
        if entry.get("logger") == "mnist_service.requests" and entry.get("status") == "OK"
    }


async def test_every_worker_serves(mnist_test_set: MnistSplit) -> None:
    """With SO_REUSEPORT (the default) the kernel spreads connections over the workers."""
    server = ServerProcess("--workers", "2")
    try:
        workers = children(server.process.pid)
        results: list[object] = []
        for _ in range(5):  # connections land where the kernel puts them: retry a few rounds
            results += await call_many(server.address, png_bytes(mnist_test_set[0][0]), 16, 4)
            if worker_pids_in_request_log(server) == workers:
                break
    finally:
        assert server.stop() == 0

    assert len(workers) == 2
    assert all(isinstance(r, Prediction) and r.label == mnist_test_set[1][0] for r in results)
    assert worker_pids_in_request_log(server) == workers


async def test_workers_sharing_one_socket_answer_correctly(mnist_test_set: MnistSplit) -> None:
    """--no-reuse-port: one inherited socket (which worker accepts is up to the kernel)."""
    server = ServerProcess("--workers", "2", "--no-reuse-port")
    workers = children(server.process.pid)
    try:
        results = await call_many(server.address, png_bytes(mnist_test_set[0][4]), 8, 4)
    finally:
        assert server.stop() == 0

    assert len(workers) == 2
    assert all(isinstance(r, Prediction) and r.label == mnist_test_set[1][4] for r in results)
    assert worker_pids_in_request_log(server) <= workers


async def test_a_dead_worker_is_restarted(mnist_test_set: MnistSplit) -> None:
    server = ServerProcess("--workers", "2")
    try:
        before = children(server.process.pid)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)

        def replaced() -> set[int] | None:
            now = children(server.process.pid)
            return now if len(now) == 2 and victim not in now else None

        now = await eventually(replaced, f"a new worker in place of {victim}", timeout=WAIT_S)
        results = await call_many(server.address, png_bytes(mnist_test_set[0][1]), 8, 2)
    finally:
        assert server.stop() == 0

    assert len(now) == 2
    assert victim not in now
    assert any(
        "restarting" in str(entry.get("message")) and entry.get("pid") == server.process.pid
        for entry in server.logs
    )
    assert all(isinstance(r, Prediction) for r in results)


async def test_sigterm_drains_every_worker_and_exits_zero(mnist_test_set: MnistSplit) -> None:
    """Calls queued in both workers (a long batch delay holds them) all get their answer."""
    server = ServerProcess("--workers", "2", "--max-batch-delay", HOLD_US, "--grace-period", "10")
    workers = children(server.process.pid)
    calls = asyncio.ensure_future(call_many(server.address, png_bytes(mnist_test_set[0][2]), 8, 2))
    await until_held(server, workers, 16)  # in flight, waiting for their batch
    server.process.send_signal(signal.SIGTERM)
    results = await within(calls, "the answers", timeout=WAIT_S)
    code = server.wait(WAIT_S)

    assert code == 0
    assert len(results) == 16
    assert all(isinstance(r, Prediction) and r.label == mnist_test_set[1][2] for r in results)
    assert not any(alive(pid) for pid in workers)
    draining = logged(server, "draining")
    assert {e["pid"] for e in draining} == workers
    assert sum(e["in_flight"] for e in draining) == 16  # the drain began with every call held
    drained = logged(server, "drained")
    assert {e["pid"] for e in drained} == workers  # every worker drained, none cut a call
    assert sum(e["calls_finished"] for e in drained) == 16
    assert all(e["calls_cut_off"] == 0 for e in drained)


async def test_after_sigterm_no_worker_takes_new_connections_while_calls_finish(
    mnist_test_set: MnistSplit,
) -> None:
    """Every worker closes its listening socket (the supervisor keeps no listening copy), and
    the call in flight on the old connection, which got GOAWAY, is still answered; the client
    then takes its next call to a new connection, which is refused too."""
    server = ServerProcess("--workers", "2", "--max-batch-delay", HOLD_US)
    workers = children(server.process.pid)
    image = png_bytes(mnist_test_set[0][3])
    async with MnistClient(server.address, timeout=30) as client:
        first = asyncio.ensure_future(client.predict(image))
        await until_held(server, workers, 1)  # in flight, waiting for its batch
        server.process.send_signal(signal.SIGTERM)
        # A worker logs "draining" once its listening socket is closed.
        await eventually(
            lambda: {e["pid"] for e in logged(server, "draining")} == workers,
            "every worker to start draining",
        )
        async with MnistClient(server.address, timeout=30) as newcomer:
            with pytest.raises(ConnectionRefusedError):
                await newcomer.predict(image)
        assert not first.done()  # refused while the first call is still being worked on
        answered = await within(first, "the first call's answer", timeout=WAIT_S)
        # Its answer came after the GOAWAY, on the same connection: the client has left it.
        with pytest.raises(ConnectionRefusedError):
            await client.predict(image)
    assert server.wait(WAIT_S) == 0

    assert isinstance(answered, Prediction)
    assert answered.label == mnist_test_set[1][3]
    assert sum(e["in_flight"] for e in logged(server, "draining")) == 1


def test_workers_exit_when_the_supervisor_is_killed() -> None:
    server = ServerProcess("--workers", "2")
    workers = children(server.process.pid)
    server.process.kill()  # not `stop`: it reads the log pipe to its end, and workers hold it
    server.process.wait(WAIT_S)
    try:
        wait_until(
            lambda: not any(alive(pid) for pid in workers), "the workers to exit", timeout=WAIT_S
        )
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    server.wait(WAIT_S)

    assert len(workers) == 2
    assert not any(alive(pid) for pid in workers)


@pytest.mark.parametrize("reuse_port", [False, True], ids=["shared-socket", "reuse-port"])
def test_port_in_use_is_one_clear_line_with_workers(reuse_port: bool) -> None:
    mode = "--reuse-port" if reuse_port else "--no-reuse-port"
    first = ServerProcess("--workers", "2", mode)
    try:
        args = ["--workers", "2", mode]
        result = serve_and_fail("--address", first.address, *args)
    finally:
        assert first.stop() == 0

    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1
    assert len(lines) == 1, result.stderr
    assert "address already in use" in lines[0].lower()


def test_a_startup_failure_in_the_workers_is_one_clear_line() -> None:
    result = serve_and_fail(
        "--address", "[::1]:0", "--workers", "2", "--model-weights", "/nonexistent/model.onnx"
    )

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "mnist-service: error: model weights not found: /nonexistent/model.onnx"
    ]
