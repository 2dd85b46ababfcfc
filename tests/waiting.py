"""Bounded waits for tests: wait for something observable to happen, never for a fixed time.

A test that sleeps "long enough" for a call to arrive or a worker to stop is slow when the
machine is idle and flaky when it is busy. These poll a condition instead (a count, a log
line, a process's state) and fail the test with what they waited for once `timeout` passes.

    await eventually(lambda: batcher.queued == 5, "five callers queued")
    wait_until(lambda: not alive(pid), f"worker {pid} to exit")
    answers = await within(asyncio.gather(*calls), "the answers")

`eventually` is for async tests, whose event loop must keep running while they wait (the
client calls under test run on it); `wait_until` is its twin for plain tests. `within` waits
for an awaitable the same way, where a test would otherwise hang on a call that never ends.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

__all__ = ["POLL_S", "TIMEOUT_S", "eventually", "wait_until", "within"]

T = TypeVar("T")

TIMEOUT_S = 20.0
"""How long a wait may take before it fails the test: far beyond what any condition here
needs on an idle machine, so that only a real failure reaches it."""
POLL_S = 0.01
"""How often a condition is checked."""


@overload
async def eventually(
    condition: Callable[[], Awaitable[T | None]], what: str, *, timeout: float = ...
) -> T: ...
@overload
async def eventually(
    condition: Callable[[], T | None], what: str, *, timeout: float = ...
) -> T: ...
async def eventually(condition: Callable[[], Any], what: str, *, timeout: float = TIMEOUT_S) -> Any:
    """The first true value of `condition()` (a function or a coroutine function), checked
    every `POLL_S` while the event loop runs on; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:g} s waiting for {what}")
        await asyncio.sleep(POLL_S)


def wait_until(condition: Callable[[], T | None], what: str, *, timeout: float = TIMEOUT_S) -> T:
    """The first true value of `condition()`, checked every `POLL_S` (blocking the thread);
    fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(POLL_S)
    return value


async def within(awaitable: Awaitable[T], what: str, *, timeout: float = TIMEOUT_S) -> T:
    """`await awaitable`, failing the test after `timeout` seconds with what it waited for
    (and cancelling it); its own exceptions, a TimeoutError included, pass through as they are."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # a gather's "cancelled" is an exception: retrieved, not logged
        raise AssertionError(f"gave up after {timeout:g} s waiting for {what}")
    return task.result()
