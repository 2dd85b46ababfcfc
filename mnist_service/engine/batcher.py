"""Dynamic batching: a `Predictor` that gathers concurrent requests into one model run.

Greedy by default: a request that finds the model idle runs at the end of the current
event-loop turn, together with whatever else was queued in that turn; requests that arrive
while a batch runs form the next one. `max_delay` trades latency for throughput by holding an
incomplete batch open for at most that long (the idea of Triton's
`max_queue_delay_microseconds`).

The model runs either inline on the event loop (`executor=None`: no thread hand-off at all,
the right choice when the process owns one core) or in `executor`, one hand-off per batch,
with the loop free to gather the next batch meanwhile. A caller that is cancelled (client
cancel) or whose deadline (`expires_at`) passes before its batch starts is dropped from the
batch (the latter with `DeadlineExpiredError`); a failed model run fails only the callers in
that batch. Nothing here knows about gRPC.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from .. import _compat
from ..errors import DeadlineExpiredError
from .inference import Classifier, FloatArray, ModelInfo


@dataclass(slots=True)
class _Pending:
    images: FloatArray
    future: asyncio.Future[FloatArray]
    expires_at: float | None = None
    """`time.monotonic()` after which nobody waits for the answer (None: no deadline)."""
    queued_at: float = 0.0
    """`time.monotonic()` when it joined the queue (0: it never waited)."""
    on_batch: Callable[[int], None] | None = None
    """Told the size of the model run the images rode in (for the caller's request log)."""


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """One model run, for metrics: its images, how long each caller's images waited for it,
    and how long the model took."""

    images: int
    waits: list[float]
    seconds: float


BatchObserver = Callable[[BatchRecord], None]


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Running totals, for tests and metrics: images inferred and model executions."""

    images: int
    executions: int
    largest_batch: int
    dropped: int


class Batcher:
    """A `Predictor` that runs concurrent `predict` calls as shared batches of a `Classifier`."""

    def __init__(
        self,
        classifier: Classifier,
        *,
        max_batch_size: int = 32,
        max_delay: float = 0.0,
        executor: Executor | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_delay < 0:
            raise ValueError(f"max_delay must not be negative, got {max_delay}")
        self._classifier = classifier
        self._max_batch_size = max_batch_size
        self._max_delay = max_delay
        self._executor = executor
        self._observer = observer
        self._queue: deque[_Pending] = deque()
        self._queued_images = 0
        self._scheduled: asyncio.Handle | None = None
        self._running = False  # executor mode: a batch is in the executor
        self._images = self._executions = self._largest = self._dropped = 0

    @property
    def info(self) -> ModelInfo:
        """What is being served."""
        return self._classifier.info

    @property
    def stats(self) -> BatchStats:
        """Totals since start."""
        return BatchStats(
            images=self._images,
            executions=self._executions,
            largest_batch=self._largest,
            dropped=self._dropped,
        )

    @property
    def queued(self) -> int:
        """Images waiting for a batch."""
        return self._queued_images

    async def predict(
        self,
        batch: FloatArray,
        expires_at: float | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> FloatArray:
        """Float32 [N, 1, 28, 28] -> [N, 10], run together with other callers' images."""
        if len(batch) > self._max_batch_size:
            chunks = [
                self.submit(batch[start : start + self._max_batch_size], expires_at, on_batch)
                for start in range(0, len(batch), self._max_batch_size)
            ]
            return np.concatenate(await asyncio.gather(*chunks))
        return await self.submit(batch, expires_at, on_batch)

    def submit(
        self,
        batch: FloatArray,
        expires_at: float | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> asyncio.Future[FloatArray]:
        """Queue up to `max_batch_size` images; the future gets their probabilities [N, 10].

        Cancelling the future before its batch starts drops the images from the batch, and so
        does reaching `expires_at` (a `time.monotonic()` value) first: the future then gets a
        `DeadlineExpiredError`. `on_batch` is told the size of the model run they rode in.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[FloatArray] = loop.create_future()
        if self._alone(loop):
            # Nothing queued, nothing else about to run this turn: nobody could join the
            # batch, so run it now rather than after another trip round the loop.
            self._run_inline([_Pending(batch, future, on_batch=on_batch)])
            return future
        self._queue.append(_Pending(batch, future, expires_at, time.monotonic(), on_batch))
        self._queued_images += len(batch)
        self._schedule()
        return future

    def _alone(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether an inline batch can start now: the model idle, no delay asked for, and no
        other callback ready in this loop turn (`_compat.ready_callbacks`; on loops that
        cannot tell, such as uvloop, the answer is no and calls take the usual path)."""
        return (
            self._executor is None
            and not self._max_delay
            and not self._queue
            and self._scheduled is None
            and _compat.ready_callbacks(loop) == 0
        )

    def _schedule(self) -> None:
        if self._running:
            return  # the executor loop takes the queue when its batch is done
        full = self._queued_images >= self._max_batch_size
        if self._scheduled is not None:
            if not (full and isinstance(self._scheduled, asyncio.TimerHandle)):
                return
            self._scheduled.cancel()  # a delay timer, but the batch is full: go now
            self._scheduled = None
        loop = asyncio.get_running_loop()
        if self._max_delay and not full:
            self._scheduled = loop.call_later(self._max_delay, self._start)
        else:
            self._scheduled = loop.call_soon(self._start)

    def _start(self) -> None:
        self._scheduled = None
        if self._executor is None:
            while self._queue:
                pending = self._take()
                if pending:
                    self._run_inline(pending)
        elif self._queue:
            self._running = True
            asyncio.get_running_loop().create_task(self._run_in_executor())

    def _take(self) -> list[_Pending]:
        """Up to `max_batch_size` images from the head of the queue, skipping cancelled callers."""
        taken: list[_Pending] = []
        size = 0
        now = time.monotonic()
        while self._queue and size + len(self._queue[0].images) <= self._max_batch_size:
            pending = self._queue.popleft()
            self._queued_images -= len(pending.images)
            if pending.future.done():  # the caller was cancelled while queued
                self._dropped += len(pending.images)
                continue
            if pending.expires_at is not None and pending.expires_at <= now:
                self._dropped += len(pending.images)
                pending.future.set_exception(
                    DeadlineExpiredError("the call's deadline passed while it waited for the model")
                )
                continue
            taken.append(pending)
            size += len(pending.images)
        return taken

    def _run_inline(self, pending: list[_Pending]) -> None:
        batch = self._stack(pending)
        started = time.monotonic()
        try:
            probabilities = self._classifier.classify(batch)
        except Exception as exc:
            self._fail(pending, exc)
        else:
            self._deliver(pending, probabilities)
        if self._observer is not None:
            _observe(self._observer, pending, len(batch), started)

    async def _run_in_executor(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                pending = self._take()
                if not pending:
                    continue
                batch = self._stack(pending)
                started = time.monotonic()
                try:
                    probabilities = await loop.run_in_executor(
                        self._executor, self._classifier.classify, batch
                    )
                except Exception as exc:
                    self._fail(pending, exc)
                else:
                    self._deliver(pending, probabilities)
                if self._observer is not None:
                    _observe(self._observer, pending, len(batch), started)
        finally:
            self._running = False
            if self._queue:
                self._schedule()

    def _stack(self, pending: list[_Pending]) -> FloatArray:
        if len(pending) == 1:
            batch = pending[0].images
        else:
            batch = np.concatenate([p.images for p in pending])
        self._count(batch)
        return batch

    def _count(self, batch: FloatArray) -> None:
        self._executions += 1
        self._images += len(batch)
        self._largest = max(self._largest, len(batch))

    @staticmethod
    def _deliver(pending: list[_Pending], probabilities: FloatArray) -> None:
        start = 0
        for p in pending:
            end = start + len(p.images)
            if not p.future.done():
                p.future.set_result(probabilities[start:end])
                if p.on_batch is not None:
                    p.on_batch(len(probabilities))
            start = end

    @staticmethod
    def _fail(pending: list[_Pending], exc: Exception) -> None:
        # Each caller gets the error; the service logs it and answers INTERNAL.
        for p in pending:
            if not p.future.done():
                p.future.set_exception(exc)


def _observe(observer: BatchObserver, pending: list[_Pending], images: int, started: float) -> None:
    waits = [started - p.queued_at if p.queued_at else 0.0 for p in pending]
    observer(BatchRecord(images, waits, time.monotonic() - started))
