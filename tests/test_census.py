"""The memory census a worker logs on SIGUSR2 (`runtime.census`), in process and for real."""

from __future__ import annotations

import asyncio
import inspect
import signal
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from mnist_service.client import MnistClient
from mnist_service.runtime.census import TOP, Census

from .conftest import MnistSplit, ServerProcess, png_bytes
from .waiting import wait_until


@pytest.fixture
def tracing() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


async def test_a_census_counts_tasks_registries_and_objects_by_type() -> None:
    census = Census(lambda: {"connections": 3, "calls": 0})
    waiting = asyncio.ensure_future(asyncio.sleep(10))
    try:
        fields = census.take()
    finally:
        waiting.cancel()

    assert fields["tasks"] == 2  # this test's and the sleep
    assert fields["connections"] == 3
    assert fields["calls"] == 0
    assert isinstance(fields["rss_mb"], float)
    gc_top = fields["gc_top"]
    assert isinstance(gc_top, dict)
    assert len(gc_top) == TOP
    assert "function" in gc_top
    assert "tracemalloc_top" not in fields  # only when allocations are traced


class Kept:
    """Something a test holds on to, in numbers."""


async def test_under_tracemalloc_a_census_names_where_memory_grew(tracing: None) -> None:
    census = Census(dict)
    kept = [Kept() for _ in range(20_000)]  # the line the census should name first
    line = f"test_census.py:{inspect.currentframe().f_lineno - 1}"  # type: ignore[union-attr]
    fields = census.take()
    again = census.take()

    top, later = fields["tracemalloc_top"], again["tracemalloc_top"]
    assert isinstance(top, list)
    assert isinstance(later, list)
    assert line in top[0]
    assert "Kept" in fields["gc_top"]  # type: ignore[operator]
    # the next census compares with this one, not with the start
    assert not any(line in entry for entry in later)
    assert len(kept) == 20_000


def census(server: ServerProcess) -> dict[str, Any]:
    """Signal the server and wait for the census line it logs."""
    before = len(censuses(server))
    server.process.send_signal(signal.SIGUSR2)
    # Under PYTHONTRACEMALLOC the first census snapshots the whole traced heap: 5 s on an idle
    # machine, 30 s was seen on a busy one; a debugging aid may be slow, but must come.
    wait_until(lambda: len(censuses(server)) > before, "the census line", timeout=120)
    return censuses(server)[-1]


def censuses(server: ServerProcess) -> list[dict[str, Any]]:
    return [entry for entry in server.logs if entry.get("message") == "memory census"]


def test_a_worker_logs_its_census_on_sigusr2(mnist_test_set: MnistSplit) -> None:
    server = ServerProcess("--workers", "1", "--log-level", "info", env={"PYTHONTRACEMALLOC": "1"})
    try:
        idle = census(server)

        async def calls() -> None:
            async with MnistClient(server.address, timeout=30) as client:
                for pixels in mnist_test_set[0][:20]:
                    await client.predict(png_bytes(pixels))

        asyncio.run(calls())
        after = census(server)
        deadline = time.monotonic() + 5
        while after["connections"] and time.monotonic() < deadline:  # the close, on its side
            time.sleep(0.1)
            after = census(server)
    finally:
        code = server.stop()

    assert code == 0  # the signal neither killed nor disturbed it
    assert idle["connections"] == 0
    assert idle["calls"] == 0
    assert idle["tasks"] >= 1
    assert idle["rss_mb"] > 0
    assert len(idle["tracemalloc_top"]) == TOP
    assert after["connections"] == 0
    assert after["calls"] == 0
    assert after["stream_reads"] == 0
    assert after["tasks"] <= idle["tasks"]
